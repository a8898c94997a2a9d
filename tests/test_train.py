"""Tests for `ctmodels.train`: fit, exact resume, atomic checkpoints, NaN guard."""

import functools
import gc
import io
import json
import os
import signal
import subprocess
import sys
import textwrap

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pandas as pd
import pytest

import ctmodels
from ctmodels._errors import discard_failed_callbacks
from ctmodels.data import TimeSeries, batches, bucket_length, interpolation_task
from ctmodels.train import (
    _checkpoint as ckpt_module,
    fit,
    load_checkpoint,
    save_checkpoint,
)

# ------------------------------------------------------------------ tiny models


class Regressor(eqx.Module):
    """Linear regression on array data `(x, y)` (or `(x, y, bad)`: a row with
    `bad != 0` makes its batch's loss NaN)."""

    linear: eqx.nn.Linear
    hyperparameters: tuple = eqx.field(static=True)

    def __init__(self, in_size, out_size, *, key):
        self.linear = eqx.nn.Linear(in_size, out_size, key=key)
        self.hyperparameters = (("in_size", in_size), ("out_size", out_size))

    def loss(self, batch, *, key):
        x, y = batch[0], batch[1]
        pred = jax.vmap(self.linear)(x)
        mse = jnp.mean((pred - y) ** 2)
        if len(batch) == 3:
            mse = mse + jnp.where(jnp.any(batch[2] != 0), jnp.nan, 0.0)
        return mse, {"mae": jnp.mean(jnp.abs(pred - y))}


class Curve(eqx.Module):
    """`value(t) = a + b t + c sin(t)` per channel, scored on `batch.target_mask`,
    with a key-dependent jitter and a KL-like penalty weighted by `kl_weight`."""

    a: jax.Array
    b: jax.Array
    c: jax.Array
    hyperparameters: tuple = eqx.field(static=True)

    def __init__(self, channels, jitter=1e-3, *, key):
        ka, kb = jax.random.split(key)
        self.a = 0.1 * jax.random.normal(ka, (channels,))
        self.b = 0.1 * jax.random.normal(kb, (channels,))
        self.c = jnp.zeros(channels)
        self.hyperparameters = (("channels", channels), ("jitter", jitter))

    def loss(self, batch, *, key, kl_weight=1.0):
        t = batch.times[..., None]
        pred = self.a + self.b * t + self.c * jnp.sin(t)
        pred = pred + dict(self.hyperparameters)["jitter"] * jax.random.normal(
            key, pred.shape
        )
        w = batch.target_mask * batch.weight[:, None, None]
        mse = jnp.sum(w * (pred - batch.values) ** 2) / jnp.maximum(w.sum(), 1.0)
        kl = 0.5 * jnp.sum(self.a**2)
        return mse + 1e-2 * kl_weight * kl, {
            "mse": mse,
            "kl_weight": jnp.asarray(kl_weight, jnp.float32),
        }


class Quartic(eqx.Module):
    """loss = w^4 / 4: plain SGD with a large step diverges to inf."""

    w: jax.Array

    def loss(self, batch, *, key):
        return 0.25 * jnp.sum(self.w**4) + 0.0 * jnp.sum(batch), {}


def _series(n=24, t=10, channels=2, seed=0):
    rng = np.random.default_rng(seed)
    times = np.sort(rng.uniform(0, 3, size=(n, t)), axis=1)
    slope = np.array([1.0, -0.5])[:channels]
    values = 0.5 + slope * times[..., None] + 0.05 * rng.normal(size=(n, t, channels))
    values[rng.uniform(size=values.shape) < 0.2] = np.nan  # missing values
    values[:, 0, :] = 1.0  # every series observed
    return TimeSeries.from_arrays(times, values)


def _arrays(n=64, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 3)).astype(np.float32)
    y = (x @ np.array([[1.0], [2.0], [-1.0]]) + 0.5).astype(np.float32)
    return x, y


def _assert_same_leaves(a, b):
    la, lb = (
        jax.tree.leaves(eqx.filter(a, eqx.is_array)),
        jax.tree.leaves(eqx.filter(b, eqx.is_array)),
    )
    assert len(la) == len(lb) and la
    for x, y in zip(la, lb, strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


class _Kill(BaseException):
    """Simulates SIGKILL: `fit` does not get to save anything."""


def _stop_at(k, exc):
    def callback(info):
        if info["step"] == k:
            raise exc

    return callback


TASK = functools.partial(interpolation_task, fraction=0.3)

# ------------------------------------------------------------------ fitting


def test_fit_arrays_reduces_loss_history_and_csv(tmp_path):
    x, y = _arrays()
    model = Regressor(3, 1, key=jax.random.key(0))
    lines = []
    out, hist = fit(
        model,
        (x, y),
        valid=(x[:20], y[:20]),
        epochs=8,
        batch_size=16,
        key=jax.random.key(1),
        learning_rate=0.2,
        checkpoint_dir=tmp_path,
        log=lines.append,
        extra_state={"x_mean": x.mean(0), "note": "standardised"},
    )
    assert list(hist.columns) == [
        "epoch",
        "step",
        "train_loss",
        "train_mae",
        "valid_loss",
        "valid_mae",
        "lr",
        "time",
        "nan_skips",
    ]
    assert hist["epoch"].tolist() == list(range(1, 9))
    assert hist["step"].tolist() == [4 * e for e in range(1, 9)]
    assert hist["train_loss"].iloc[-1] < 0.2 * hist["train_loss"].iloc[0]
    assert hist["valid_loss"].iloc[-1] < 0.2 * hist["valid_loss"].iloc[0]
    assert np.isfinite(hist["lr"]).all() and (hist["nan_skips"] == 0).all()
    assert hist.attrs["compilations"]["train_step"] == 1
    assert len(lines) == 8 and lines[0].startswith("epoch 1 | step 4")
    csv = pd.read_csv(tmp_path / "history.csv")
    pd.testing.assert_frame_equal(
        csv.drop(columns="time"), hist.drop(columns="time"), check_dtype=False
    )
    # the checkpoint loads back as the returned (best) model, with the run's metadata
    loaded, meta = load_checkpoint(tmp_path, model_class=Regressor)
    _assert_same_leaves(loaded, out)
    assert meta["state"]["epoch"] == 8 and meta["fit"]["batch_size"] == 16
    assert len(meta["history"]) == 8
    np.testing.assert_allclose(meta["extra_state"]["x_mean"], x.mean(0), rtol=1e-6)
    assert meta["extra_state"]["note"] == "standardised"
    # learning rate, run length and clip norm are traced: no new compilation
    _, hist2 = fit(
        model,
        (x, y),
        epochs=3,
        batch_size=16,
        key=jax.random.key(2),
        learning_rate=1e-2,
        clip_norm=5.0,
        log=False,
    )
    assert hist2.attrs["compilations"]["train_step"] == 0


def test_steps_trace_with_the_garbage_collector_paused():
    """`fit` traces its steps with Python's collector paused (a faster first step) and
    leaves the collector as it found it, also when it was off."""
    x, y = _arrays()
    seen = []

    def task(batch, *, key):  # runs while the step is traced
        seen.append(gc.isenabled())
        return batch

    for enabled in (True, False):
        (gc.enable if enabled else gc.disable)()
        try:
            fit(
                Regressor(3, 1, key=jax.random.key(0)),
                (x, y),
                epochs=1,
                batch_size=16,
                key=jax.random.key(1),
                task=functools.partial(task),  # a new task: traced again
                log=False,
            )
            assert gc.isenabled() == enabled
        finally:
            gc.enable()
    assert seen == [False, False]


def test_fit_time_series_compiles_once_and_uses_lazy_sources():
    ts = _series()
    model = Curve(2, key=jax.random.key(0))
    # one time bucket for every batch: 8 series x 10 distinct times -> 128
    shapes = {b.values.shape for b in batches(ts, 8, layout="union")}
    assert shapes == {(8, 128, 2)}
    out, hist = fit(
        model,
        ts,
        valid=ts[:8],
        epochs=6,
        batch_size=8,
        key=jax.random.key(3),
        learning_rate=5e-2,
        task=functools.partial(interpolation_task, fraction=0.4),  # a new config
    )
    assert hist.attrs["compilations"] == {"train_step": 1, "eval_step": 1}
    assert len(hist) == 6 and hist["step"].iloc[-1] == 18
    assert hist["train_mse"].iloc[-1] < 0.5 * hist["train_mse"].iloc[0]
    assert {"valid_loss", "valid_mse", "train_kl_weight"} <= set(hist.columns)

    class Lazy:  # anything with len() and source[idx] -> TimeSeries
        def __len__(self):
            return len(ts)

        def __getitem__(self, idx):
            return ts[idx]

    out2, hist2 = fit(
        model,
        Lazy(),
        steps=5,
        batch_size=8,
        key=jax.random.key(3),
        layout="padded",
        log=False,
    )
    assert hist2["step"].tolist() == [3, 5]  # a full epoch, then a partial one
    assert np.isfinite(hist2["train_loss"]).all()


def test_auto_time_bucket_pads_the_few_short_batches_to_the_common_shape():
    # 12 series with 3 times and 4 with 8: a union batch of 4 series has 12 times
    # (bucket 16) when it holds only short series, about one batch in four, and 17-32
    # (bucket 32) otherwise
    rng = np.random.default_rng(7)
    times = np.sort(rng.uniform(0, 3, size=(16, 8)), axis=1)
    times[4:, 3:] = np.nan
    values = np.where(np.isnan(times), np.nan, 0.5 + times)[..., None]
    ts = TimeSeries.from_arrays(times, values)
    lengths = np.isfinite(times).sum(axis=1)
    run = functools.partial(
        fit, train=ts, valid=ts[:8], epochs=5, batch_size=4, key=jax.random.key(2),
        log=False,
    )  # fmt: skip
    _, hist = run(Curve(1, key=jax.random.key(0)), time_bucket="pow2")
    assert hist.attrs["min_times"] == 0
    # the oracle: the buckets of this run's batches, from their series' lengths
    data_key = jax.random.fold_in(jax.random.key(2), 0)  # fit's epoch orders
    seen = {
        bucket_length(lengths[np.asarray(b.index)[np.asarray(b.weight) > 0]].sum())
        for e in range(5)
        for b in batches(ts, 4, key=jax.random.fold_in(data_key, e), layout="union")
    }
    assert hist.attrs["compilations"]["train_step"] == len(seen) == 2
    # validation: a batch of the 4 long series (32 times) and one of 4 short (12)
    assert hist.attrs["compilations"]["eval_step"] == 2
    # a model of its own (a static setting differs): no compilation to reuse
    _, hist = run(Curve(1, jitter=2e-3, key=jax.random.key(0)), time_bucket="auto")
    assert hist.attrs["min_times"] == 32
    # every short training and validation batch padded to 32 times
    assert hist.attrs["compilations"] == {"train_step": 1, "eval_step": 1}
    assert np.isfinite(hist["valid_loss"]).all()


def test_epoch_order_matches_batches():
    from ctmodels.train._data import as_data

    ts = _series(n=10)
    data = as_data(ts, 4, layout="union", time_bucket="pow2", name="train")
    key = jax.random.fold_in(jax.random.fold_in(jax.random.key(5), 0), 2)
    order = data.order(key)
    for b, ref in enumerate(batches(ts, 4, key=key, layout="union")):
        got = data.batch(order, b, train=True)
        _assert_same_leaves(got, ref)

    class Lazy:  # a lazy source: block-shuffled, and read ahead by a thread
        block_size = 3

        def __len__(self):
            return len(ts)

        def __getitem__(self, idx):
            return ts[idx]

    lazy = as_data(Lazy(), 4, layout="union", time_bucket="pow2", name="train")
    order = lazy.order(key)
    refs = list(batches(Lazy(), 4, key=key, layout="union", shuffle="block"))
    assert len(refs) == lazy.num_batches(train=True) == 3
    for b, ref in enumerate(refs):
        got = lazy.batch(order, b, train=True)
        _assert_same_leaves(got, ref)
        lazy.prefetch(order, b + 1)  # as fit does while the step runs
    lazy.close()


def test_kl_weight_is_annealed_without_recompiling():
    seen = []
    _, hist = fit(
        Curve(2, key=jax.random.key(0)),
        _series(n=16),
        steps=6,
        batch_size=4,
        key=jax.random.key(0),
        kl_anneal_steps=4,
        callback=lambda info: seen.append(info["metrics"]["kl_weight"]),
        log=False,
    )
    np.testing.assert_allclose(seen, [0.25, 0.5, 0.75, 1.0, 1.0, 1.0])
    assert hist.attrs["compilations"]["train_step"] == 1
    assert "kl_weight" in hist.columns and hist["kl_weight"].iloc[-1] == 1.0


def test_progress_bar_and_quiet_default(capsys):
    x, y = _arrays(16)
    fit(
        Regressor(3, 1, key=jax.random.key(0)),
        (x, y),
        epochs=2,
        batch_size=8,
        key=jax.random.key(0),
        progress=True,
    )
    err = capsys.readouterr().err
    assert "it/s" in err and "ETA" in err and "epoch 2 | step 4" in err
    fit(  # stderr is not a terminal under pytest: no bar, summaries to the logger
        Regressor(3, 1, key=jax.random.key(0)),
        (x, y),
        epochs=1,
        batch_size=8,
        key=jax.random.key(0),
    )
    assert capsys.readouterr().err == ""


# ------------------------------------------------------------------ exact resume


def _resume_run(ckpt, **kw):
    args = dict(
        valid=_series(n=8, seed=1),
        epochs=3,
        batch_size=4,
        key=jax.random.key(7),
        learning_rate=3e-2,
        task=TASK,
        kl_anneal_steps=5,
        log=False,
    )
    args.update(kw)
    return fit(
        Curve(2, key=jax.random.key(0)), _series(n=18), checkpoint_dir=ckpt, **args
    )


def test_exact_resume_after_keyboard_interrupt(tmp_path):
    ref, ref_hist = _resume_run(None)
    with pytest.raises(KeyboardInterrupt):  # mid-epoch 2 (5 batches per epoch)
        _resume_run(tmp_path, callback=_stop_at(7, KeyboardInterrupt()))
    _, meta = load_checkpoint(tmp_path, model_class=Curve, which="model")
    assert (meta["state"]["step"], meta["state"]["epoch"], meta["state"]["batch"]) == (
        7,
        1,
        2,
    )
    out, hist = _resume_run(tmp_path)
    assert hist.attrs["resumed_from_step"] == 7
    _assert_same_leaves(out, ref)
    # the same history, columns in the same order (the header sorts its JSON keys)
    assert list(hist.columns) == list(ref_hist.columns)
    cols = [c for c in ref_hist.columns if c != "time"]
    pd.testing.assert_frame_equal(hist[cols], ref_hist[cols])


def test_checkpoint_from_the_pow2_default_resumes_exactly_with_pow2(tmp_path):
    """A run checkpointed when "pow2" was fit's default resumes under the new
    default ("auto") as it was started, bitwise; with a checkpoint that records its
    choice (`min_times`), "pow2" against "auto" is a different run."""
    from ctmodels.train._checkpoint import FIT_SUBDIR, HEADER

    ref, _ = _resume_run(None, time_bucket="pow2")
    old = tmp_path / "old"
    with pytest.raises(KeyboardInterrupt):
        _resume_run(old, time_bucket="pow2", callback=_stop_at(7, KeyboardInterrupt()))
    path = old / FIT_SUBDIR / HEADER
    header = json.loads(path.read_text())
    assert header["metadata"]["fit"]["min_times"] == 0
    del header["metadata"]["fit"]["min_times"]  # as written before "auto"
    del header["metadata"]["compare"]["min_times"]
    path.write_text(json.dumps(header))
    said = []
    out, hist = _resume_run(old, log=said.append)  # the new default
    assert hist.attrs["resumed_from_step"] == 7 and hist.attrs["min_times"] == 0
    assert any("continuing with its time_bucket='pow2'" in m for m in said)
    _assert_same_leaves(out, ref)
    new = tmp_path / "new"
    _resume_run(new, time_bucket="pow2", steps=2, epochs=None)
    with pytest.raises(ValueError, match="time_bucket: checkpoint 'pow2', now 'auto'"):
        _resume_run(new, steps=2, epochs=None)
    # "auto" whose floor came out differently (other data, another version's rule)
    auto = tmp_path / "auto"
    _, hist = _resume_run(auto, steps=2, epochs=None)
    path = auto / FIT_SUBDIR / HEADER
    header = json.loads(path.read_text())
    header["metadata"]["compare"]["min_times"] = 2 * hist.attrs["min_times"]
    path.write_text(json.dumps(header))
    with pytest.raises(ValueError, match="min_times: checkpoint"):
        _resume_run(auto, steps=2, epochs=None)


def test_exact_resume_after_kill_from_periodic_checkpoint(tmp_path):
    ref, _ = _resume_run(None, restore_best=False)
    with pytest.raises(_Kill):  # nothing saved at the kill: resume from step 6
        _resume_run(
            tmp_path,
            checkpoint_every=3,
            restore_best=False,
            callback=_stop_at(8, _Kill()),
        )
    out, hist = _resume_run(tmp_path, checkpoint_every=3, restore_best=False)
    assert hist.attrs["resumed_from_step"] == 6
    _assert_same_leaves(out, ref)
    # a finished run resumes to the same result without training
    again, _ = _resume_run(tmp_path, checkpoint_every=3, restore_best=False)
    _assert_same_leaves(again, ref)


def test_resume_with_different_run_is_refused(tmp_path):
    x, y = _arrays(32)
    args = dict(epochs=1, batch_size=8, key=jax.random.key(0), checkpoint_dir=tmp_path)
    fit(Regressor(3, 1, key=jax.random.key(0)), (x, y), **args)
    x2 = np.concatenate([x, x], axis=1)
    with pytest.raises(ValueError, match="in_size: checkpoint 3, now 6") as e:
        fit(Regressor(6, 1, key=jax.random.key(0)), (x2, y), **args)
    assert "resume=False" in str(e.value)
    with pytest.raises(ValueError, match="batch_size: checkpoint 8, now 16"):
        fit(
            Regressor(3, 1, key=jax.random.key(0)), (x, y), **{**args, "batch_size": 16}
        )
    with pytest.raises(ValueError, match="key"):
        fit(
            Regressor(3, 1, key=jax.random.key(0)),
            (x, y),
            **{**args, "key": jax.random.key(1)},
        )
    with pytest.raises(ValueError, match="monitor: checkpoint 'loss', now 'mae'"):
        fit(
            Regressor(3, 1, key=jax.random.key(0)),
            (x, y),
            valid=(x, y),
            **{**args, "monitor": "mae"},
        )
    # resume=False starts afresh
    _, hist = fit(Regressor(6, 1, key=jax.random.key(0)), (x2, y), resume=False, **args)
    assert hist.attrs["resumed_from_step"] is None


def test_checkpoint_from_before_monitor_resumes_as_loss(tmp_path):
    """Checkpoints written before `fit` had `monitor` lack it in their run
    description: they resume as `monitor="loss"` and refuse another monitor."""
    from ctmodels.train._checkpoint import FIT_SUBDIR, HEADER

    x, y = _arrays(32)
    args = dict(
        valid=(x[:16], y[:16]), epochs=1, batch_size=8, key=jax.random.key(0),
        checkpoint_dir=tmp_path, log=False,
    )  # fmt: skip
    fit(Regressor(3, 1, key=jax.random.key(0)), (x, y), **args)
    path = tmp_path / FIT_SUBDIR / HEADER
    header = json.loads(path.read_text())
    assert header["metadata"]["compare"].pop("monitor") == "loss"
    path.write_text(json.dumps(header))
    with pytest.raises(ValueError, match="monitor: checkpoint 'loss', now 'mae'"):
        fit(Regressor(3, 1, key=jax.random.key(0)), (x, y), monitor="mae", **args)
    _, hist = fit(Regressor(3, 1, key=jax.random.key(0)), (x, y), **args)
    assert hist.attrs["resumed_from_step"] == 4


class ScaledRegressor(Regressor):
    """`Regressor` with a later-added constructor option (default 1.0)."""

    def __init__(self, in_size, out_size, *, scale=1.0, key):
        super().__init__(in_size, out_size, key=key)
        self.hyperparameters = (*self.hyperparameters, ("scale", scale))


def test_checkpoint_from_before_a_new_hyperparameter_resumes_at_its_default(
    tmp_path,
):
    """A hyperparameter added to a model after a checkpoint was written is absent
    from it: resuming with the constructor's default works, another value is
    refused (as `LatentODE`'s `anchor`, added later)."""
    from ctmodels.train._checkpoint import FIT_SUBDIR, HEADER

    x, y = _arrays(32)
    args = dict(epochs=1, batch_size=8, key=jax.random.key(0), checkpoint_dir=tmp_path,
                log=False)  # fmt: skip
    fit(ScaledRegressor(3, 1, key=jax.random.key(0)), (x, y), **args)
    path = tmp_path / FIT_SUBDIR / HEADER
    header = json.loads(path.read_text())
    assert header["hyperparameters"][-1] == ["scale", 1.0]
    header["hyperparameters"] = header["hyperparameters"][:-1]
    path.write_text(json.dumps(header))
    with pytest.raises(ValueError, match="scale: checkpoint 1.0, now 2.0"):
        fit(ScaledRegressor(3, 1, scale=2.0, key=jax.random.key(0)), (x, y), **args)
    _, hist = fit(ScaledRegressor(3, 1, key=jax.random.key(0)), (x, y), **args)
    assert hist.attrs["resumed_from_step"] == 4


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")
def test_sigterm_saves_a_checkpoint_and_resume_is_exact(tmp_path):
    script = textwrap.dedent(
        f"""
        import os, signal, sys
        sys.path.insert(0, {os.path.dirname(__file__)!r})
        import jax
        from test_train import Regressor, _arrays
        from ctmodels.train import fit

        def cb(info):
            if info["step"] == 5:
                os.kill(os.getpid(), signal.SIGTERM)

        x, y = _arrays(40)
        fit(Regressor(3, 1, key=jax.random.key(0)), (x, y), epochs=3, batch_size=8,
            key=jax.random.key(2), checkpoint_dir={str(tmp_path)!r}, callback=cb,
            log=False)
        print("not reached")
        """
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    # other test modules may have switched this process to float64: match it
    env["JAX_ENABLE_X64"] = "1" if jax.config.jax_enable_x64 else "0"
    proc = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True
    )
    assert proc.returncode == -signal.SIGTERM, proc.stderr
    assert "not reached" not in proc.stdout
    _, meta = load_checkpoint(tmp_path, model_class=Regressor)
    assert meta["state"]["step"] == 5
    x, y = _arrays(40)
    args = dict(epochs=3, batch_size=8, key=jax.random.key(2), log=False)
    ref, _ = fit(Regressor(3, 1, key=jax.random.key(0)), (x, y), **args)
    out, hist = fit(
        Regressor(3, 1, key=jax.random.key(0)), (x, y), checkpoint_dir=tmp_path, **args
    )
    assert hist.attrs["resumed_from_step"] == 5
    _assert_same_leaves(out, ref)


# ------------------------------------------------------------------ checkpoints


def test_save_load_checkpoint_round_trip(tmp_path):
    model = Curve(3, jitter=0.5, key=jax.random.key(4))
    opt = optax.adam(1e-3)
    opt_state = opt.init(model)
    path = save_checkpoint(
        tmp_path / "ck", model, opt_state=opt_state, metadata={"mean": [1.0, 2.0]}
    )
    assert sorted(os.listdir(path)) == ["checkpoint.json", "model.eqx", "opt_state.eqx"]
    header = json.loads((path / "checkpoint.json").read_text())
    assert header["model_class"] == "Curve"
    assert header["hyperparameters"] == [["channels", 3], ["jitter", 0.5]]
    for kwargs in (
        {"model_class": Curve},
        {"model_classes": {"Curve": Curve}},
        {"like": Curve(3, jitter=0.5, key=jax.random.key(0))},
    ):
        loaded, meta = load_checkpoint(path, **kwargs)
        _assert_same_leaves(loaded, model)
        assert loaded.hyperparameters == model.hyperparameters
        assert meta == {"mean": [1.0, 2.0]}
    st, _ = load_checkpoint(path, which="opt_state", like=opt_state)
    _assert_same_leaves(st, opt_state)
    with pytest.raises(ValueError, match="model_class=Curve"):
        load_checkpoint(path)
    with pytest.raises(ValueError, match="not a 'Regressor'"):
        load_checkpoint(path, model_class=Regressor)
    with pytest.raises(ValueError, match="does not match"):
        load_checkpoint(path, like=Curve(4, key=jax.random.key(0)))
    with pytest.raises(ValueError, match="not JSON-serialisable"):
        save_checkpoint(tmp_path / "bad", model, metadata={"f": object()})
    save_checkpoint(tmp_path / "q", Quartic(w=jnp.ones(2)))  # no hyperparameters
    with pytest.raises(ValueError, match="stored no hyperparameters"):
        load_checkpoint(tmp_path / "q", model_classes={"Quartic": Quartic})
    q, _ = load_checkpoint(tmp_path / "q", like=Quartic(w=jnp.zeros(2)))
    np.testing.assert_array_equal(q.w, np.ones(2))
    with pytest.raises(FileNotFoundError):
        load_checkpoint(tmp_path / "missing", model_class=Curve)


def test_crash_while_writing_keeps_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "ck"
    first = Curve(2, key=jax.random.key(0))
    save_checkpoint(path, first, metadata={"n": 1})
    second = Curve(2, key=jax.random.key(1))

    calls = {"n": 0}
    real = eqx.tree_serialise_leaves

    def crash_after_a_few_leaves(f, tree):  # dies half-way through the model file
        calls["n"] += 1
        f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(
        ckpt_module.eqx, "tree_serialise_leaves", crash_after_a_few_leaves
    )
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(path, second, metadata={"n": 2})
    monkeypatch.setattr(ckpt_module.eqx, "tree_serialise_leaves", real)
    loaded, meta = load_checkpoint(path, model_class=Curve)
    _assert_same_leaves(loaded, first)
    assert meta == {"n": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck"]  # no temp left

    # a crash between moving the old checkpoint aside and moving the new one in
    real_replace = os.replace

    def replace(src, dst):
        if ".tmp-" in os.path.basename(src):  # moving the new one in
            raise OSError("power cut")
        return real_replace(src, dst)

    monkeypatch.setattr(ckpt_module.os, "replace", replace)
    with pytest.raises(OSError, match="power cut"):
        save_checkpoint(path, second, metadata={"n": 2})
    monkeypatch.setattr(ckpt_module.os, "replace", real_replace)
    assert not path.exists() and (tmp_path / "ck.old").exists()
    loaded, meta = load_checkpoint(path, model_class=Curve)  # falls back to .old
    _assert_same_leaves(loaded, first)
    save_checkpoint(path, second, metadata={"n": 2})  # and the next save recovers
    loaded, meta = load_checkpoint(path, model_class=Curve)
    _assert_same_leaves(loaded, second)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck"]


# ------------------------------------------------------------------ NaN guard


def test_nan_guard_skips_bad_step_and_leaves_params_unchanged():
    x, y = _arrays(32)
    bad = np.zeros(32, np.float32)
    bad[5] = 1.0  # the batch holding row 5 has a NaN loss, once per epoch
    models = [Regressor(3, 1, key=jax.random.key(0))]
    skipped = []

    def cb(info):
        models.append(info["model"])
        skipped.append(info["skipped"])

    out, hist = fit(
        models[0],
        (x, y, bad),
        epochs=3,
        batch_size=8,
        key=jax.random.key(0),
        callback=cb,
    )
    assert sum(skipped) == 3 and hist["nan_skips"].tolist() == [1, 1, 1]
    assert hist.attrs["nan_skips"] == 3 and np.isfinite(hist["train_loss"]).all()
    for i, s in enumerate(skipped):
        if s:
            _assert_same_leaves(models[i + 1], models[i])
        else:
            assert not np.array_equal(
                models[i + 1].linear.weight, models[i].linear.weight
            )
    assert np.isfinite(out.linear.weight).all()

    with pytest.raises(FloatingPointError, match="learning_rate"):
        fit(
            models[0],
            (x, y, bad),
            epochs=1,
            batch_size=8,
            key=jax.random.key(0),
            nan_policy="raise",
        )
    with pytest.raises(FloatingPointError, match="3 consecutive"):
        fit(
            models[0],
            (x, y, np.ones(32, np.float32)),
            epochs=1,
            batch_size=8,
            key=jax.random.key(0),
            max_nan_skips=3,
        )


class Growth(eqx.Module):
    """Fits `dy/dt = a y` through `ctmodels.integrate` (dopri5, few max_steps): a batch
    whose rows ask for a long horizon (`x > 100`) makes the solve hit max_steps."""

    a: jax.Array

    def loss(self, batch, *, key):
        x, y = batch

        def one(t1, target):
            sol = ctmodels.integrate(
                lambda t, z, args: self.a * z,
                jnp.ones(()),
                jnp.stack([jnp.zeros(()), t1]),
                solver="dopri5",
                rtol=1e-6,
                atol=1e-6,
                max_steps=16,
            )
            return (sol.ys[-1] - target) ** 2

        return jnp.mean(jax.vmap(one)(x, y)), {}


def _growth_data(long_row=None):
    x = np.linspace(0.1, 1.0, 16).astype(np.float32)
    y = np.exp(0.5 * x).astype(np.float32)
    if long_row is not None:
        x[long_row] = 1e3
    return x, y


def test_solver_failure_in_fit_is_a_skipped_step_and_diagnosed():
    """Inside fit a failed solve makes the step non-finite (skipped, parameters kept),
    not a runtime error from inside the compiled step; `nan_policy="raise"` reruns the
    step with the checks on and names the solver failure."""
    model = Growth(jnp.array(0.1))
    x, y = _growth_data(long_row=3)
    out, hist = fit(
        model, (x, y), epochs=2, batch_size=8, key=jax.random.key(0),
        learning_rate=0.05, log=False,
    )  # fmt: skip
    assert hist.attrs["nan_skips"] == 2  # the batch with row 3, once per epoch
    assert np.isfinite(out.a) and float(out.a) != 0.1
    # outside fit, the same solve raises at run time (on a GPU the error surfaces
    # when the result is awaited, not at dispatch: block on it)
    with pytest.raises(Exception, match="maximum number of steps"):
        jax.block_until_ready(
            jax.jit(lambda m: m.loss((jnp.asarray(x), jnp.asarray(y)), key=None))(model)
        )
    discard_failed_callbacks()  # that error is handled (GPU: see the test below)
    with pytest.raises(FloatingPointError, match="maximum number of steps") as e:
        fit(
            model, (x, y), epochs=1, batch_size=8, key=jax.random.key(0),
            nan_policy="raise", log=False,
        )  # fmt: skip
    # the cause is the check's own message, not Equinox's stack dump around it
    cause = str(e.value).split("Cause: ", 1)[1]
    assert cause.startswith("ctmodels.integrate with solver")
    assert "stack" not in str(e.value) and "\n" not in str(e.value)
    # fit's diagnosis caught the probe's error: nothing re-raises it later (on a GPU
    # it would, through the runtime token, at the latest at exit)
    jax.effects_barrier()


def test_discard_failed_callbacks_drops_a_failed_runtime_token():
    """On a GPU a runtime check that fired in a host callback also fails JAX's
    runtime token, which JAX raises again at every effects barrier (and at exit),
    even after the error was caught. Simulated with a token whose wait fails:
    `discard_failed_callbacks` leaves the barrier clean."""
    from jax._src import dispatch

    class FailedToken:
        def block_until_ready(self):
            raise RuntimeError("INTERNAL: CpuCallback error calling callback")

    dispatch.runtime_tokens.set_output_runtime_token(jax.devices()[0], FailedToken())
    for _ in range(2):  # JAX keeps a failed token: it raises every time
        with pytest.raises(RuntimeError, match="CpuCallback"):
            jax.effects_barrier()
    discard_failed_callbacks()
    jax.effects_barrier()
    discard_failed_callbacks()  # nothing pending: only waits


_CACHE_SCRIPT = """
import os, sys, jax, jax.numpy as jnp, numpy as np
jax.config.update("jax_compilation_cache_dir", sys.argv[1])
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
sys.path.insert(0, sys.argv[2])
import test_train as T
from ctmodels.train import fit
x, y = T._growth_data()
fit(T.Growth(jnp.array(0.1)), (x, y), epochs=1, batch_size=8,
    key=jax.random.key(0), log=False)
"""


def test_fit_steps_have_no_host_callbacks_and_persist_in_the_compilation_cache(
    tmp_path,
):
    """With `EQX_ON_ERROR=nan` (which the CLI sets), fit's compiled train step has
    no host callback, so JAX's persistent cache stores it: a second process reads it
    back instead of compiling (no new cache entry)."""
    cache = tmp_path / "jax-cache"
    env = {**os.environ, "EQX_ON_ERROR": "nan", "PYTHONPATH": os.pathsep.join(sys.path)}
    env["JAX_ENABLE_X64"] = "1" if jax.config.jax_enable_x64 else "0"
    script = tmp_path / "run.py"
    script.write_text(_CACHE_SCRIPT)
    here = os.path.dirname(os.path.abspath(__file__))

    def run():
        proc = subprocess.run(
            [sys.executable, str(script), str(cache), here],
            env=env, capture_output=True, text=True, timeout=300,
        )  # fmt: skip
        assert proc.returncode == 0, proc.stderr
        return {p.name for p in cache.iterdir()}

    first = run()
    assert any("_train_step" in name for name in first), first
    assert run() == first  # every compilation was a cache hit


def test_nan_rollback_lowers_learning_rate_and_recovers():
    model = Quartic(w=jnp.array([2.5]))
    data = np.zeros((8, 1), np.float32)  # batch_size=1: 8 steps per epoch
    sgd = optax.inject_hyperparams(optax.sgd)(learning_rate=1.0)
    out, hist = fit(
        model,
        data,
        steps=40,
        batch_size=1,
        key=jax.random.key(0),
        optimizer=sgd,
        nan_policy="rollback",
        log=False,
    )
    assert hist.attrs["nan_skips"] >= 1
    assert hist["lr"].iloc[-1] < 1.0
    assert abs(float(out.w[0])) < 0.5
    with pytest.raises(FloatingPointError, match="rollbacks"):
        fit(
            model,
            data,
            steps=40,
            batch_size=8,
            key=jax.random.key(0),
            optimizer=sgd,
            nan_policy="rollback",
            max_nan_skips=1,
            log=False,
        )


# ------------------------------------------------------------------ early stopping


def test_early_stopping_returns_best_model():
    x, y = _arrays(32)
    # validation targets disagree with training ones: valid loss soon rises
    xv, yv = x[:16], -y[:16] + 1.0
    model = Regressor(3, 1, key=jax.random.key(0))
    out, hist = fit(
        model,
        (x, y),
        valid=(xv, yv),
        epochs=50,
        batch_size=8,
        key=jax.random.key(0),
        learning_rate=5e-2,
        schedule="constant",
        patience=3,
    )
    best = hist.attrs["best_epoch"]
    assert hist.attrs["stopped_early"] and len(hist) == best + 3 < 50
    assert hist["valid_loss"].idxmin() == best - 1
    loss, _ = out.loss((jnp.asarray(xv), jnp.asarray(yv)), key=jax.random.key(0))
    np.testing.assert_allclose(float(loss), hist["valid_loss"].min(), rtol=1e-5)


class Contrarian(Regressor):
    """Reports the negated MSE as a metric: monitoring it keeps the worst epoch."""

    def loss(self, batch, *, key):
        mse, _ = super().loss(batch, key=key)
        return mse, {"neg_mse": -mse}


def test_monitor_chooses_the_epoch_by_the_named_metric():
    x, y = _arrays(32)
    xv, yv = x[:16], y[:16]  # validation agrees with training: its loss falls
    model = Contrarian(3, 1, key=jax.random.key(0))
    out, hist = fit(
        model, (x, y), valid=(xv, yv), epochs=20, batch_size=8, key=jax.random.key(0),
        learning_rate=5e-2, schedule="constant", monitor="neg_mse", patience=2,
        log=False,
    )  # fmt: skip
    # the monitored value is best at epoch 1 (the worst loss); two more epochs
    # without improving it stop the run, and epoch 1's model comes back
    assert hist.attrs["monitor"] == "neg_mse"
    assert hist["valid_loss"].is_monotonic_decreasing
    assert hist.attrs["best_epoch"] == 1
    assert hist.attrs["stopped_early"] and len(hist) == 3
    assert hist.attrs["best_valid"] == hist["valid_neg_mse"].iloc[0]
    assert hist.attrs["best_valid_loss"] == hist["valid_loss"].iloc[0]
    loss, _ = out.loss((jnp.asarray(xv), jnp.asarray(yv)), key=jax.random.key(0))
    np.testing.assert_allclose(float(loss), hist["valid_loss"].iloc[0], rtol=1e-5)
    assert float(loss) > hist["valid_loss"].iloc[-1]  # not the last model
    # a name the loss does not return: an error before any training
    with pytest.raises(ValueError, match=r"monitor='mse'.*\['loss', 'neg_mse'\]"):
        fit(
            model, (x, y), valid=(xv, yv), epochs=1, batch_size=8,
            key=jax.random.key(0), monitor="mse", log=False,
            callback=lambda info: pytest.fail("trained before checking monitor"),
        )  # fmt: skip


# ------------------------------------------------------------------ bad arguments


def test_series_data_mistakes_are_found_before_the_first_step():
    """A `valid` with other channels fails before any step runs (it was found when
    the first epoch ended, its steps lost); a Dataset / DataFrame as `train` says
    how to convert it (it was taken for a lazy source: a raw KeyError)."""
    import pandas as pd
    import xarray as xr

    from ctmodels.data import to_xarray

    train = _series(8, channels=2)
    steps = []
    with pytest.raises(ValueError, match=r"`valid` has channels \['c0'\] but `train`"):
        fit(Curve(2, key=jax.random.key(0)), train, valid=_series(4, channels=1),
            epochs=1, batch_size=4, key=jax.random.key(1), log=False,
            callback=steps.append)  # fmt: skip
    assert steps == []
    for data, how in ((to_xarray(train), "from_xarray"),
                      (pd.DataFrame({"t": [0.0]}), "from_pandas")):  # fmt: skip
        assert isinstance(data, (xr.Dataset, pd.DataFrame))
        with pytest.raises(ValueError, match=f"`train` is .*ctmodels.data.{how}"):
            fit(Curve(2, key=jax.random.key(0)), data, epochs=1,
                key=jax.random.key(1), log=False)  # fmt: skip


def test_bad_arguments():
    x, y = _arrays(16)
    m = Regressor(3, 1, key=jax.random.key(0))
    k = jax.random.key(0)
    with pytest.raises(ValueError, match="exactly one of epochs= or steps="):
        fit(m, (x, y), key=k)
    with pytest.raises(ValueError, match="exactly one of epochs= or steps="):
        fit(m, (x, y), epochs=1, steps=3, key=k)
    with pytest.raises(ValueError, match="batch_size"):
        fit(m, (x, y), epochs=1, batch_size=0, key=k)
    with pytest.raises(ValueError, match="empty"):
        fit(m, (x[:0], y[:0]), epochs=1, key=k)
    with pytest.raises(ValueError, match="leading"):
        fit(m, (x, y[:3]), epochs=1, key=k)
    with pytest.raises(ValueError, match="needs validation data"):
        fit(m, (x, y), epochs=1, key=k, patience=2)
    with pytest.raises(ValueError, match="nan_policy"):
        fit(m, (x, y), epochs=1, key=k, nan_policy="ignore")
    with pytest.raises(ValueError, match="monitor must be the name"):
        fit(m, (x, y), epochs=1, key=k, monitor="")
    with pytest.raises(ValueError, match="pass valid= as well"):
        fit(m, (x, y), epochs=1, key=k, monitor="mae")
    with pytest.raises(ValueError, match="kl_weight"):
        fit(m, (x, y), epochs=1, key=k, kl_anneal_steps=10)
    with pytest.raises(ValueError, match="schedule"):
        fit(m, (x, y), epochs=1, key=k, schedule="linear")
    with pytest.raises(ValueError, match="PRNG key"):
        fit(m, (x, y), epochs=1, key=0)
    with pytest.raises(ValueError, match="no `loss`"):
        fit(eqx.nn.Linear(3, 1, key=k), (x, y), epochs=1, key=k)
    with pytest.raises(ValueError, match="TimeSeries"):
        fit(m, "data.csv", epochs=1, key=k)
    with pytest.raises(ValueError, match="extra_state"):
        fit(m, (x, y), epochs=1, key=k, extra_state={"f": io.StringIO()})

    class Unread:  # a lazy source that must not be read
        def __len__(self):
            return 8

        def __getitem__(self, idx):
            raise AssertionError("read before time_bucket was checked")

    for bad in ("pow3", 0, 2.5):  # caught before any batch is read
        with pytest.raises(ValueError, match="time_bucket must be 'pow2'"):
            fit(Curve(2, key=k), Unread(), epochs=1, key=k, time_bucket=bad)
