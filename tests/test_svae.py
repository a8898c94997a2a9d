"""The SVAE in float32: the job and CLI round trip (fit -> predict -> evaluate) on a
tiny synthetic netCDF file, its predictions laid out as the latent ODE's, a finite
loss and gradient with missing values (whatever the masked entries hold), and
`ctmodels.train.fit` lowering the loss. (The bound against the exact likelihood is
in `test_svae_x64.py`.)"""

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
from ctmodels._cli import main
from ctmodels.jobs import EVAL_SAMPLES
from ctmodels.models import SVAE, LinearInterpolation, predict

TINY = ["--latent-size", "2", "--units", "8", "--epochs", "3", "--batch-size", "8",
        "--max-plots", "1", "--quiet"]  # fmt: skip
# fit's own sample count for its metrics and predictions: the predictions below
# reuse their compilation
SAMPLES = EVAL_SAMPLES


def _series(n: int = 20, seed: int = 0) -> cd.TimeSeries:
    """Noisy sines with random phases at irregular times, 2 channels, a fifth of
    the values missing, series of 5 to 8 times."""
    rng = np.random.default_rng(seed)
    T = 8
    times = np.sort(rng.uniform(0.0, 4.0, (n, T)), axis=1)
    phase = rng.uniform(0, 2 * np.pi, (n, 1))
    values = np.stack([np.sin(2 * times + phase), 0.5 * np.cos(2 * times + phase)], -1)
    values += 0.05 * rng.normal(size=values.shape)
    values[rng.uniform(size=values.shape) < 0.2] = np.nan
    lengths = rng.integers(5, T + 1, n)
    pad = np.arange(T)[None, :] >= lengths[:, None]
    times[pad] = np.nan
    values[pad] = np.nan
    return cd.TimeSeries.from_arrays(times, values, channels=["a", "b"])


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    root = tmp_path_factory.mktemp("svae")
    path = root / "sines.nc"
    cd.to_xarray(_series()).to_netcdf(path)
    out = root / "run"
    rc = main(["fit", "svae", "--data", str(path), "--out", str(out), *TINY])
    assert rc == 0
    return path, out


def test_cli_round_trip(fitted, tmp_path):
    path, out = fitted
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["series"] == {"train": 16, "valid": 2, "test": 2}
    for task in ("interpolation", "extrapolation"):
        entry = metrics["test"][task]
        assert np.isfinite(entry["mse"]) and entry["points"] > 0
        assert 0.0 <= entry["coverage_90"] <= 1.0
        assert set(entry["baselines"]) == {"locf", "linear_interpolation"}
    calibration = json.loads((out / "checkpoint" / "calibration.json").read_text())
    assert set(calibration["residual_std"]) == {"a", "b"}
    src = xr.load_dataset(path)
    rc = main(["predict", "--checkpoint", str(out), "--data", str(path), "--out",
               str(tmp_path / "p.nc"), "--n-samples", str(SAMPLES)])  # fmt: skip
    assert rc == 0
    pred = xr.load_dataset(tmp_path / "p.nc")
    valid = src["time"].notnull().values
    for v in ("a", "b"):
        assert np.isfinite(pred[v].values[valid]).all()
        assert np.isnan(pred[v].values[~valid]).all()
        assert (pred[f"{v}_std"].values[valid] > 0).all()
    rc = main(["evaluate", "--checkpoint", str(out), "--data", str(path), "--task",
               "extrapolation", "--out", str(tmp_path / "m.json")])  # fmt: skip
    assert rc == 0
    m = json.loads((tmp_path / "m.json").read_text())
    assert "interpolation" not in m and m["extrapolation"]["points"] > 0
    assert np.isfinite(m["extrapolation"]["mse"])


def test_predictions_are_laid_out_as_the_latent_odes(fitted):
    """`predict` on the fitted SVAE and on another model with the same normaliser
    (linear interpolation, through the very code that lays out the latent ODE's
    predictions, at a fraction of its compile time): the same variables, dims and
    coordinates, at the series' own times and at requested ones (inside the context
    and beyond it)."""
    from ctmodels.jobs import load_fitted

    path, out = fitted
    fit = load_fitted(out)
    assert isinstance(fit.model, SVAE)
    src = xr.load_dataset(path)  # all of it, in fit's batches: its compiled prediction
    other = LinearInterpolation(2)
    q = np.array([0.0, 1.5, 3.9, 6.0])  # 6 is past every observation
    for times in (None, q):
        ours = predict(fit, src, times, key=jax.random.key(1), n_samples=SAMPLES,
                       batch_size=8)  # fmt: skip
        theirs = predict(other, src, times, key=jax.random.key(1),
                         normalizer=fit.normalizer)  # fmt: skip
        names = {"a", "a_std", "b", "b_std"}
        assert set(ours.data_vars) == set(theirs.data_vars) == names
        assert ours.sizes == theirs.sizes
        for v in ours.data_vars:
            assert ours[v].dims == theirs[v].dims
            assert ours[v].attrs == theirs[v].attrs
        for c in theirs.coords:
            xr.testing.assert_identical(ours[c], theirs[c])
        valid = np.isfinite(theirs["a"].values)
        assert (np.isfinite(ours["a"].values) == valid).all()
        assert (ours["a_std"].values[valid] > 0).all()
    # far beyond the data the spread is wider than inside it: the posterior relaxes
    # to the prior
    assert (ours["a_std"].values[:, -1] >= ours["a_std"].values[:, 1]).mean() > 0.8


@pytest.fixture(scope="module")
def model():
    return SVAE(2, latent_size=2, units=8, key=jax.random.key(0))


@eqx.filter_jit
def _loss_and_grad(model, batch, key):
    return eqx.filter_value_and_grad(lambda m: m.loss(batch, key=key, n_samples=2),
                                     has_aux=True)(model)  # fmt: skip


def test_loss_and_gradient_are_finite_and_ignore_masked_entries(model):
    batch = cd.make_batch(_series(6), layout="padded")
    assert jnp.dtype(batch.values.dtype) == jnp.float32
    assert not batch.mask.all() and batch.mask.any(axis=-1).any()
    (loss, metrics), grads = _loss_and_grad(model, batch, jax.random.key(1))
    assert np.isfinite(loss) and all(np.isfinite(v) for v in metrics.values())
    assert metrics["kl"] > 0
    leaves = jax.tree.leaves(eqx.filter(grads, eqx.is_inexact_array))
    assert all(np.isfinite(x).all() for x in leaves)
    assert any((x != 0).any() for x in jax.tree.leaves(grads.prior))  # prior learns
    # junk (even NaN) in the masked entries changes nothing
    junk = jnp.where(batch.mask, batch.values, jnp.nan)
    (loss2, _), grads2 = _loss_and_grad(
        model, eqx.tree_at(lambda b: b.values, batch, junk), jax.random.key(1)
    )
    assert loss2 == loss
    for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(grads2), strict=True):
        np.testing.assert_array_equal(a, b)


def test_fit_lowers_the_loss(fitted):
    """The job's `ctmodels.train.fit` run: the validation loss (a fixed key, so it
    moves with the model only) falls from the first epoch to the last."""
    _, out = fitted
    hist = pd.read_csv(out / "history.csv")
    assert len(hist) == 3 and np.isfinite(hist["train_loss"]).all()
    assert hist["valid_loss"].iloc[-1] < hist["valid_loss"].iloc[0] - 0.5
