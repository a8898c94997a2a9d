"""`ctmodels.models.predict`: a model's predictive mean and spread as xarray at any
times, in data units. Oracles: the model's own `predict` on hand-made batches and a
hand-applied `Normalizer`; the same request spelled three ways (shared, per series,
as dates)."""

from __future__ import annotations

import equinox as eqx
import jax
import numpy as np
import pytest
import xarray as xr

import ctmodels.data as cd
from ctmodels.models import GRUDelta, LatentODE, predict
from ctmodels.models._predict import model_spread

TOL = dict(rtol=2e-4, atol=2e-5)
# One query shape for the fixture's model: 4 shared times, 2 samples, batches of 8
# (its 5 series in one batch). Predictions asked this way share one compilation.
SHAPE = dict(n_samples=2, batch_size=8)


def _dataset(S=5, T=6, seed=0):
    """A pbcseq-like dataset: per-series float times in days, NaN padding, two
    channels (one positive, log-transformed)."""
    rng = np.random.default_rng(seed)
    t = np.sort(rng.uniform(0, 300, (S, T)), axis=1)
    t[1, -2:] = np.nan
    a = np.exp(rng.normal(1.0, 0.3, (S, T)))
    b = rng.normal(5.0, 1.0, (S, T))
    a[np.isnan(t)] = np.nan
    b[np.isnan(t)] = np.nan
    b[0, 2] = np.nan
    return xr.Dataset(
        {"a": (("series", "obs"), a, {"transform": "log", "units": "mg"}),
         "b": (("series", "obs"), b)},
        coords={"series": np.arange(10, 10 + S),
                "time": (("series", "obs"), t, {"units": "days"})},
    )  # fmt: skip


@pytest.fixture(scope="module")
def setup():
    ds = _dataset()
    ts = cd.from_xarray(ds)
    norm = cd.Normalizer.fit(ts, log=["a"], time_scale="span")
    model = LatentODE(2, latent_size=2, encoder_size=4, units=8, key=jax.random.key(0))
    return ds, ts, norm, model


def _by_hand(model, ts_n, times_n, key, n_samples, batch_size=8):
    """The model's own `predict` on one union batch of all series."""
    batch = next(iter(cd.batches(ts_n, batch_size, layout="union")))
    # compiled whole (run op by op, each small operation would compile on its own)
    mu, sd = eqx.filter_jit(type(model).predict)(
        model, batch, key=jax.random.fold_in(key, 0), n_samples=n_samples,
        times=times_n,
    )  # fmt: skip
    return np.asarray(mu)[: len(ts_n)], np.asarray(sd)[: len(ts_n)]


def test_requested_times_match_the_models_predict_in_data_units(setup):
    ds, ts, norm, model = setup
    key = jax.random.key(1)
    q = np.array([0.0, 50.0, 120.0, 400.0])  # days; 400 is past every series
    out = predict(model, ds, q, key=key, normalizer=norm, **SHAPE)
    mu, sd = _by_hand(model, norm.transform(ts), q / norm.time_scale, key, 2)
    mu, sd = norm.inverse(mu, sd)
    assert out["a"].dims == ("series", "time") and out.sizes["time"] == 4
    np.testing.assert_array_equal(out["time"].values, q)
    np.testing.assert_array_equal(out["series"].values, ds["series"].values)
    for c, v in enumerate(("a", "b")):
        np.testing.assert_allclose(out[v].values, mu[..., c], **TOL)
        np.testing.assert_allclose(out[f"{v}_std"].values, sd[..., c], **TOL)
    assert out["a"].attrs["units"] == "mg" and out["a_std"].attrs["prediction"] == "std"
    assert out["time"].attrs["units"] == "days"
    assert (out["a"].values > 0).all()  # a log channel, back in data units


def test_shared_per_series_and_dated_requests_agree(setup):
    ds, ts, norm, model = setup
    key = jax.random.key(2)
    q = np.array([10.0, 100.0, 200.0, 250.0])
    shared = predict(model, ds, q, key=key, normalizer=norm, **SHAPE)
    rows = np.tile(q, (len(ts), 1))
    per = predict(model, ds, rows, key=key, normalizer=norm, **SHAPE)
    assert per["b"].dims == ("series", "query") and per["time"].dims == (
        "series",
        "query",
    )
    np.testing.assert_allclose(per["b"].values, shared["b"].values, **TOL)
    np.testing.assert_allclose(per["a_std"].values, shared["a_std"].values, **TOL)
    # the same data with dates: from_xarray counts days from the earliest date
    origin = np.datetime64("2020-01-01", "ns")
    t = ds["time"].values
    ns = np.where(np.isnan(t), 0, np.round(t * 86400e9)).astype("timedelta64[ns]")
    dates = np.where(np.isnan(t), np.datetime64("NaT"), origin + ns)
    shift = np.nanmin(t)  # from_xarray's time 0 is the earliest date
    dated = ds.assign_coords(time=(("series", "obs"), dates))
    qd = origin + np.round(q * 86400e9).astype("timedelta64[ns]")
    norm_d = cd.Normalizer.fit(cd.from_xarray(dated), log=["a"], time_scale="span")
    by_date = predict(model, dated, qd, key=key, normalizer=norm_d, **SHAPE)
    np.testing.assert_array_equal(by_date["time"].values, qd)
    # the model sees times relative to each batch's earliest time: a constant shift
    # of every time (dates start at the earliest one) changes nothing
    assert shift > 0
    np.testing.assert_allclose(by_date["b"].values, shared["b"].values, **TOL)


def test_own_grid_spread_and_other_models(setup):
    ds, ts, norm, model = setup
    key = jax.random.key(3)
    own = predict(model, ts, key=key, normalizer=norm, **SHAPE)
    assert own["a"].dims == ("series", "obs")
    valid = ~np.isnan(ds["time"].values)
    assert np.isfinite(own["b"].values[valid]).all()
    assert np.isnan(own["b"].values[~valid]).all()
    # spread replaces the model's observation noise (model units, no normalizer)
    ts_n = norm.transform(ts)
    q = [0.0, 0.25, 0.5, 0.75]
    plain = predict(model, ts_n, q, key=key, **SHAPE)
    wide = predict(model, ts_n, q, key=key, spread=[0.3, 0.7], **SHAPE)
    # oracle: the model's own std is sqrt(Var_k + obs_std^2), its obs_std fixed
    var = plain["b_std"].values ** 2 - model.obs_std**2
    np.testing.assert_allclose(wide["b_std"].values ** 2, var + 0.7**2, rtol=1e-5)
    # (model_spread takes [..., channel]: both channels' std, then channel b's)
    stds = np.stack([plain["a_std"].values, plain["b_std"].values], axis=-1)
    spread_k = model_spread(model, stds)[..., 1]  # noise in float32: 1e-9
    np.testing.assert_allclose(spread_k, var, rtol=0, atol=1e-9)
    np.testing.assert_allclose(wide["b"].values, plain["b"].values)
    # any model with predict(batch, key=, n_samples=, times=): a filter
    gru = GRUDelta(2, hidden_size=4, units=8, key=jax.random.key(4))
    out = predict(gru, ts_n, [0.2, 0.7], key=key)
    assert np.isfinite(out["a"].values).all()


def test_errors(setup):
    ds, ts, norm, model = setup
    key = jax.random.key(0)
    with pytest.raises(ValueError, match=r"times must be \[Q\] or \[5, Q\]"):
        predict(model, ts, np.zeros((2, 3)), key=key)
    with pytest.raises(ValueError, match="series' times are float"):
        predict(model, ts, np.array(["2020-01-01"], "datetime64[ns]"), key=key)
    with pytest.raises(ValueError, match="n_samples"):
        predict(model, ts, [0.0], key=key, n_samples=0)
    with pytest.raises(ValueError, match="non-decreasing"):
        predict(model, ts, [1.0, 0.0], key=key)
    with pytest.raises(ValueError, match="finite"):
        predict(model, ts, [0.0, np.nan], key=key)
    with pytest.raises(ValueError, match="lacks the normaliser's channels"):
        predict(model, ds[["a"]], [0.0], key=key, normalizer=norm)
    with pytest.raises(TypeError, match="TimeSeries or an xarray.Dataset"):
        predict(model, np.zeros((2, 3)), key=key)
    with pytest.raises(ValueError, match="batch_size"):
        predict(model, ts, key=key, batch_size=0)
    with pytest.raises(ValueError, match=r"one residual std per channel \(2"):
        predict(model, ts, [0.0], key=key, spread=[0.1, 0.2, 0.3])
    # a check inside the compiled prediction: one ValueError naming the series
    fixed = LatentODE(2, latent_size=2, encoder_size=4, units=8, t0=0.0,
                      key=jax.random.key(0))  # fmt: skip
    with pytest.raises(ValueError, match=r"series 10, 11, .*before t0=0.0") as e:
        predict(fixed, ts, [-1.0, 5.0], key=key)
    assert "stack" not in str(e.value)
    assert np.isfinite(predict(fixed, ts, [0.0, 5.0], key=key)["b"].values).all()


def test_per_series_times_across_batches_against_np_interp(setup):
    """Distinct query times per series, several batches with padding rows: linear
    interpolation through `predict` is NumPy's interp of each series' observations
    (constant beyond them); the model's `transform` attrs come from the normaliser,
    not the file."""
    from ctmodels.models import LinearInterpolation

    ds, ts, norm, _ = setup
    rng = np.random.default_rng(5)
    rows = np.sort(rng.uniform(-20.0, 320.0, (len(ts), 4)), axis=1)
    out = predict(LinearInterpolation(2), ts, rows, key=jax.random.key(0),
                  batch_size=2)  # fmt: skip
    for s in range(len(ts)):
        for c, v in enumerate(("a", "b")):
            seen = ts.mask[s, :, c]
            want = np.interp(rows[s], ts.times[s][seen], ts.values[s, seen, c])
            np.testing.assert_allclose(out[v].values[s], want, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(out["time"].values, rows)
    bare = ds.copy()
    bare["a"].attrs.pop("transform")
    got = predict(LinearInterpolation(2), bare, rows[:, :2], key=jax.random.key(0),
                  normalizer=norm)  # fmt: skip
    assert got["a"].attrs["transform"] == "log" == got["a_std"].attrs["transform"]
    assert got["b"].attrs["transform"] == "none"


def test_numpy_int_sample_counts(setup):
    _, ts, _, model = setup
    out = predict(model, ts, [0.0, 0.25, 0.5, 0.75], key=jax.random.key(0),
                  n_samples=np.int64(2), batch_size=8)  # fmt: skip
    assert np.isfinite(out["a"].values).all()


def test_prediction_grid_compiles_once_for_every_task_and_short_batch():
    """`predict_grid` pads the short last batch to the others' time length and
    applies the task outside the compiled prediction: one compilation serves
    reconstruction, interpolation and extrapolation. Oracles: the model's own
    `predict` on unpadded batches, and the extrapolation task applied by hand."""
    import equinox as eqx

    from ctmodels.models import (
        LOCF,
        evaluation_tasks as _tasks,
        predict_grid as _predict_grid,
    )

    shapes = []

    class Counting(eqx.Module):  # records each trace of its predict
        inner: LOCF

        def predict(self, batch, *, key, n_samples):
            shapes.append(batch.times.shape)
            return self.inner.predict(batch, key=key, n_samples=n_samples)

    rng = np.random.default_rng(3)
    times = np.sort(rng.uniform(0, 1, (9, 6)), axis=1)
    values = np.sin(6 * times)[..., None] + rng.normal(0, 0.1, (9, 6, 1))
    ts = cd.TimeSeries.from_arrays(times, values)
    plain = list(cd.batches(ts, 4, layout="union"))
    # pow2 alone: 24 times (bucket 32) in the full batches, 6 (bucket 8) in the last
    assert [b.num_times for b in plain] == [32, 32, 8]
    model = Counting(LOCF(1))
    key = jax.random.key(0)
    tasks = _tasks(0.5, 0.5)
    out = {
        name: _predict_grid(
            model, ts, key=key, n_samples=1, batch_size=4, task=tasks.get(name)
        )
        for name in ("none", "interpolation", "extrapolation")
    }
    assert shapes == [(4, 32)]  # one trace for all three
    mean = out["none"][0]
    for b in plain:  # the model's predictions on the unpadded batches
        mu, _ = model.inner.predict(b, key=key, n_samples=1)
        want = np.full_like(mean, np.nan)
        cd.unbatch(b, np.asarray(mu), want)
        idx = np.asarray(b.index)
        idx = idx[idx >= 0]
        np.testing.assert_allclose(mean[idx], want[idx], rtol=1e-6)
    ctx = np.zeros(ts.values.shape, bool)
    tgt = np.zeros(ts.values.shape, bool)
    for b in plain:
        e = tasks["extrapolation"](b, key=key)
        cd.unbatch(b, np.asarray(e.mask), ctx)
        cd.unbatch(b, np.asarray(e.target_mask), tgt)
    np.testing.assert_array_equal(out["extrapolation"][2], ctx)
    np.testing.assert_array_equal(out["extrapolation"][3], tgt)
    interp_ctx, interp_tgt = out["interpolation"][2], out["interpolation"][3]
    assert not (interp_ctx & interp_tgt).any() and interp_tgt.any()
    np.testing.assert_array_equal(interp_ctx | interp_tgt, ts.mask)
