"""The job layer's proof: a model family defined here, in a few lines of spec and a
tiny Equinox model, runs `fit` / `predict` / `evaluate` / `sample` through the
command line with no job file of its own; options come from its constructor."""

from __future__ import annotations

import json

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pandas as pd
import pytest
import xarray as xr

import ctmodels.data as cd
from ctmodels import jobs
from ctmodels._cli import main


class ToyMean(eqx.Module):
    """One learned level and spread per channel, whatever the context: its loss is
    the Gaussian negative log-likelihood of the scored values."""

    level: jax.Array
    log_std: jax.Array
    hyperparameters: tuple = eqx.field(static=True)

    def __init__(self, num_channels: int, *, width: int = 4, init: float = 0.0,
                 key):  # fmt: skip
        """**Arguments:**

        - `num_channels`: channels.
        - `width`: an unused size (to show a size option).
        - `init`: the level when training starts.
        """
        del key
        self.level = jnp.full((num_channels,), init)
        self.log_std = jnp.zeros((num_channels,))
        self.hyperparameters = (
            ("num_channels", num_channels), ("width", width), ("init", init),
        )  # fmt: skip

    def loss(self, batch, *, key):
        del key
        m = batch.target_mask * batch.weight[:, None, None]
        z = (batch.values - self.level) / jnp.exp(self.log_std)
        nll = jnp.where(m, 0.5 * z**2 + self.log_std, 0.0)
        loss = nll.sum() / jnp.maximum(m.sum(), 1)
        return loss, {"nll": loss}

    def predict(self, batch, *, key, n_samples=1, times=None):
        del key, n_samples
        shape = (
            batch.values.shape
            if times is None
            else (*batch.times.shape[:1], np.shape(times)[-1], self.level.shape[0])
        )
        mean = jnp.broadcast_to(self.level, shape)
        return mean, jnp.broadcast_to(jnp.exp(self.log_std), shape)


def _sample(model, state, *, key, n, out, **options):
    """The toy's samples: `n` draws of each channel, in data units, as CSV."""
    norm = cd.Normalizer.from_dict(state["normalizer"])
    z = model.level + jnp.exp(model.log_std) * jax.random.normal(
        key, (n, model.level.shape[0])
    )
    values, _ = norm.inverse(np.asarray(z))
    frame = pd.DataFrame(np.asarray(values), columns=state["channels"])
    frame.to_csv(out, index=False)
    return frame


TOY = jobs.Family(
    name="toy", model=ToyMean, title="toy mean", summary="a level per channel",
    defaults={"width": 3}, recipe={**jobs.DEFAULT_RECIPE, "epochs": 3,
                                   "batch_size": 8, "min_steps": None},
    sample=_sample,
)  # fmt: skip
TOY_PLAIN = jobs.Family(name="toy-plain", model=ToyMean, title="toy mean",
                        recipe=TOY.recipe, plot=None)  # fmt: skip


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    for family in (TOY, TOY_PLAIN):
        jobs.register_family(family, overwrite=True)
    rng = np.random.default_rng(0)
    t = np.sort(rng.uniform(0, 10, (20, 6)), axis=1)
    values = np.stack([2.0 + 0.3 * rng.normal(size=(20, 6)),
                       -1.0 + 0.1 * rng.normal(size=(20, 6))], axis=-1)  # fmt: skip
    values[rng.uniform(size=values.shape) < 0.2] = np.nan
    ts = cd.TimeSeries.from_arrays(t, values, channels=["a", "b"])
    path = tmp_path_factory.mktemp("toy") / "toy.nc"
    cd.to_xarray(ts).to_netcdf(path)
    yield path
    from ctmodels.jobs._family import _FAMILIES

    for family in (TOY, TOY_PLAIN):
        _FAMILIES.pop(family.name, None)


def test_a_family_from_a_spec_runs_every_job_through_the_cli(data, tmp_path, capsys):
    out = tmp_path / "run"
    rc = main(
        [
            "fit",
            "toy",
            "--data",
            str(data),
            "--out",
            str(out),
            "--quiet",
            "--option",
            "init=0.5",
            "--width",
            "2",
            "--learning-rate",
            "0.1",
        ]
    )
    assert rc == 0, capsys.readouterr().err
    summary = json.loads(capsys.readouterr().out)
    assert summary["recipe"]["epochs"] == 3 and summary["recipe"]["batch_size"] == 8
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["model"] == "ToyMean"
    assert metrics["hyperparameters"] == {"num_channels": 2, "width": 2, "init": 0.5}
    assert metrics["series"] == {"train": 16, "valid": 2, "test": 2}
    for task in ("interpolation", "extrapolation"):
        entry = metrics["test"][task]
        assert entry["points"] > 0 and np.isfinite(entry["mse"])
        assert set(entry["baselines"]) == {"locf", "linear_interpolation"}
    assert (out / "checkpoint" / "calibration.json").is_file()
    assert list((out / "plots").glob("series_*.png"))
    # the model learnt each channel's level (oracle: the training mean, normalised
    # to 0 by the job's normaliser): closer to it than where it started
    fitted = jobs.load_fitted(out)
    assert isinstance(fitted.model, ToyMean) and fitted.channels == ("a", "b")
    assert np.all(np.abs(np.asarray(fitted.model.level)) < 0.5)

    pred_path = tmp_path / "pred.nc"
    rc = main(["predict", "--checkpoint", str(out), "--data", str(data), "--out",
               str(pred_path), "--n-samples", "2"])  # fmt: skip
    assert rc == 0, capsys.readouterr().err
    pred = xr.load_dataset(pred_path)
    src = xr.load_dataset(data)
    # the level in data units: the train split's mean of each channel
    valid = src["time"].notnull().values
    for v in ("a", "b"):
        got = pred[v].values[valid]
        assert np.allclose(got, got[0]) and abs(got[0] - np.nanmean(src[v])) < 0.3
        assert (pred[f"{v}_std"].values[valid] > 0).all()

    target = tmp_path / "m.json"
    rc = main(["evaluate", "--checkpoint", str(out), "--data", str(data), "--out",
               str(target), "--task", "interpolation"])  # fmt: skip
    assert rc == 0, capsys.readouterr().err
    scored = json.loads(target.read_text())
    assert set(scored) == {"data", "checkpoint", "interpolation"}
    assert scored["interpolation"]["points"] > 0

    samples = tmp_path / "s.csv"
    rc = main(["sample", "--checkpoint", str(out), "--out", str(samples), "--n", "50"])
    assert rc == 0, capsys.readouterr().err
    drawn = pd.read_csv(samples)
    assert list(drawn.columns) == ["a", "b"] and len(drawn) == 50


def test_options_come_from_the_constructor(data, tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["fit", "toy", "--help"])
    text = capsys.readouterr().out
    assert "--width" in text and "(default: 3)" in text  # the family's own default
    assert "--init" in text and "(default: 0.0)" in text  # the constructor's
    assert "the level when training starts" in text  # its docstring
    model_kw, _ = TOY.resolve_options({})
    assert model_kw == {"width": 3, "init": 0.0}
    base = ["fit", "toy", "--data", str(data), "--out", str(tmp_path / "r")]
    assert main(base + ["--option", "widht=2"]) == 2
    err = capsys.readouterr().err
    assert "toy has no option 'widht'. Did you mean 'width'?" in err
    assert main(base + ["--option", "width=2", "--width", "3"]) == 2
    assert "give it once" in capsys.readouterr().err
    assert main(base + ["--option", "width=two"]) == 2
    assert "width: expected an int >= 1, got 'two'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(base + ["--width", "0"])
    assert "expected an int >= 1, got 0" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


def test_a_family_without_sample_says_so(data, tmp_path, capsys):
    out = tmp_path / "plain"
    assert main(["fit", "toy-plain", "--data", str(data), "--out", str(out),
                 "--quiet"]) == 0  # fmt: skip
    capsys.readouterr()
    assert not (out / "plots").exists()  # plot=None: no plots
    rc = main(["sample", "--checkpoint", str(out), "--out", str(tmp_path / "s.csv")])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1
    assert "The toy-plain family has no sample job" in err and "toy" in err
    assert not (tmp_path / "s.csv").exists()


def test_a_users_model_is_checkpointed_and_loaded_by_registration(tmp_path):
    from ctmodels.models import register, registered
    from ctmodels.train import load_checkpoint, save_checkpoint

    class Unlisted(eqx.Module):
        w: jax.Array
        hyperparameters: tuple = eqx.field(static=True)

        def __init__(self, n: int, *, key):
            self.w = jax.random.normal(key, (n,))
            self.hyperparameters = (("n", n),)

    model = Unlisted(3, key=jax.random.key(1))
    save_checkpoint(tmp_path / "ck", model)
    with pytest.raises(ValueError, match=r"Register it \(ctmodels.models.register"):
        load_checkpoint(tmp_path / "ck")
    register(Unlisted)
    try:
        loaded, _ = load_checkpoint(tmp_path / "ck")
        np.testing.assert_array_equal(loaded.w, model.w)
        assert registered()["Unlisted"] is Unlisted
        assert registered()["ToyMean"] is ToyMean  # the families' models too

        class Unlisted(eqx.Module):  # noqa: F811  (another class, the same name)
            pass

        with pytest.raises(ValueError, match="registered already"):
            register(Unlisted)
    finally:
        from ctmodels._catalog import _CATALOG

        _CATALOG.pop("Unlisted", None)


def test_deprecated_spellings_are_accepted_with_a_message(data, tmp_path, capsys):
    with pytest.warns(FutureWarning, match="'latent' is deprecated; its name is "
                      "'latent_size'"):  # fmt: skip
        model_kw, _ = jobs.get_family("latent-ode").resolve_options({"latent": 4})
    assert model_kw["latent_size"] == 4
    rc = main(["fit", "toy", "--data", str(data), "--out", str(tmp_path / "r"),
               "--quiet", "--lr", "0.05", "--epochs", "1"])  # fmt: skip
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    assert "--lr is deprecated; use --learning-rate" in captured.err
    metrics = json.loads((tmp_path / "r" / "metrics.json").read_text())
    assert metrics["recipe"]["learning_rate"] == 0.05
