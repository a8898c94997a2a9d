"""The latent-ODE job and CLI end to end on a small slice of pbcseq: fit writes its
outputs, predict answers interpolation and extrapolation queries on the input's own
coordinates, evaluate writes metrics JSON, bad input gives one line."""

from __future__ import annotations

import functools
import json
import re

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import xarray as xr

import ctmodels.data as cd
import ctmodels.datasets as D
from ctmodels._cli import main
from ctmodels.jobs._series import EVAL_SAMPLES

SMALL = dict(
    epochs=2, batch_size=16, latent_size=3, encoder_size=6, units=16, n_samples=2,
    max_plots=2,
)  # fmt: skip
# Every prediction below uses fit's own sample count, fit's batch size (16) and
# (where the oracle allows) 4 series, whose union of visit times falls in the same
# time bucket as fit's 4-series validation/test splits: they reuse the compiled
# prediction that the fixture's fit made instead of compiling their own.
N = EVAL_SAMPLES


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    from ctmodels.jobs import fit

    root = tmp_path_factory.mktemp("latent")
    path = root / "pbc40.nc"
    D.load("pbcseq").isel(series=slice(0, 40)).to_netcdf(path)
    out = root / "run"
    metrics = fit("latent-ode", path, out, progress=False, **SMALL)
    return path, out, metrics


def test_fit_writes_outputs(fitted):
    path, out, metrics = fitted
    for name in ("history.csv", "metrics.json", "predictions.nc"):
        assert (out / name).is_file(), name
    assert len(list((out / "plots").glob("series_*.png"))) == 2
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["series"] == {"train": 32, "valid": 4, "test": 4}
    src = xr.load_dataset(path)
    # what the job modelled, and what it left out of the data and why
    assert saved["channels"] == src.attrs["channels"].split()
    ignored = saved["ignored_variables"]
    assert set(ignored) == set(map(str, src.data_vars)) - set(saved["channels"])
    assert ignored["age"].startswith("one value per series")
    assert ignored["ascites"] == "role 'visit_covariate', not 'channel'"
    for task in ("interpolation", "extrapolation"):
        entry = saved["test"][task]
        assert np.isfinite(entry["mse"]) and entry["points"] > 0
        assert 0.0 <= entry["coverage_90"] <= 1.0
        assert set(entry["baselines"]) == {"locf", "linear_interpolation"}
    pred = xr.load_dataset(out / "predictions.nc")
    assert pred.sizes == src.sizes
    valid_t = src["time"].notnull().values
    for v in src.attrs["channels"].split():
        assert np.isfinite(pred[v].values[valid_t]).all()
        assert np.isnan(pred[v].values[~valid_t]).all()
        assert (pred[f"{v}_std"].values[valid_t] > 0).all()
    np.testing.assert_array_equal(pred["series"].values, src["series"].values)


def test_mixed_task_draws_interpolation_or_extrapolation():
    import jax

    from ctmodels.jobs import mixed_task

    ts = cd.from_xarray(D.load("pbcseq").isel(series=slice(0, 12)), static=[])
    batch = next(iter(cd.batches(ts, 12, layout="union")))
    obs = np.asarray(batch.mask)
    times = np.asarray(batch.times)[..., None]
    ot = np.where(obs, times, np.nan)
    first = np.nanmin(ot, axis=(1, 2))[:, None, None]
    last = np.nanmax(ot, axis=(1, 2))[:, None, None]
    early = times <= first + 0.5 * (last - first)
    kinds = set()
    for i in range(16):
        t = mixed_task(batch, key=jax.random.key(i))
        mask, target = np.asarray(t.mask), np.asarray(t.target_mask)
        assert not (mask & ~obs).any()
        assert (target == obs).all()  # every observed value is scored
        if (mask == (obs & early)).all():
            kinds.add("extrapolation")  # the context: the first half of the span
        else:  # about half of the values hidden at random, some late ones kept
            assert 0.3 < 1 - mask.sum() / obs.sum() < 0.7
            assert (mask & ~early).any()
            kinds.add("interpolation")
    assert kinds == {"interpolation", "extrapolation"}


def test_fit_records_its_recipe(fitted):
    # a file gets the default recipe, with the caller's settings over it
    from ctmodels.jobs import DEFAULT_RECIPE

    _, _, metrics = fitted
    want = dict(DEFAULT_RECIPE, epochs=2, batch_size=16)
    assert metrics["recipe"] == want
    assert metrics["epochs_run"] <= 2
    assert metrics["hyperparameters"]["adjoint"] == "checkpoint"


def test_recipes_per_dataset_and_cli_overrides(monkeypatch, tmp_path, capsys):
    import ctmodels.jobs as job

    family = job.get_family("latent-ode")
    _resolve_recipe = functools.partial(job.resolve_recipe, "latent-ode")
    assert family.recipe_for("periodic") == job.RECIPES["periodic"]
    # pbcseq's own recipe is the default's before its step budget (tests/test_recipe.py)
    assert family.recipe_for("pbcseq") == job.RECIPES["pbcseq"]
    assert family.recipe_for("lotka_volterra") == job.DEFAULT_RECIPE
    family.recipe_for("periodic")["epochs"] = -1  # a copy: the table is not changed
    assert job.RECIPES["periodic"]["epochs"] == 200
    unset = dict(epochs=None, learning_rate=None, batch_size=None,
                 patience=job.FROM_RECIPE)  # fmt: skip
    key = lambda p: (p["learning_rate"], p["epochs"], p["patience"])  # noqa: E731
    assert key(_resolve_recipe("periodic", **unset)) == (2e-3, 200, None)
    plan = _resolve_recipe("periodic", **dict(unset, epochs=5, patience=3))
    assert key(plan) == (2e-3, 5, 3)
    assert _resolve_recipe("pbcseq", **dict(unset, patience=0))["patience"] is None
    # a file gets the default recipe whatever its name, with or without a suffix
    monkeypatch.chdir(tmp_path)
    (tmp_path / "periodic").write_text("")
    for name in ("periodic", "periodic.nc"):
        assert _resolve_recipe(name, **unset) == job.DEFAULT_RECIPE
    for bad in (dict(epochs=0), dict(batch_size=2.5), dict(learning_rate=-1.0),
                dict(patience=-1)):  # fmt: skip
        with pytest.raises(ValueError, match=next(iter(bad))):
            _resolve_recipe("pbcseq", **dict(unset, **bad))
    seen = []

    def fake_fit(family, data, out, **options):
        assert family == "latent-ode"
        seen.append(options)
        test = {"mse": 0.0, "baselines": {}}
        return {"recipe": {}, "epochs_run": 0, "fit_seconds": 0.0,
                "test": {"interpolation": test, "extrapolation": test}}  # fmt: skip

    monkeypatch.setattr(job, "fit", fake_fit)
    base = ["fit", "latent-ode", "--data", "periodic", "--out", str(tmp_path)]
    assert main(base) == 0
    assert main(base + ["--epochs", "3", "--learning-rate", "0.1", "--patience", "0",
                        "--batch-size", "8", "--anchor", "last",
                        "--overwrite"]) == 0  # fmt: skip
    capsys.readouterr()
    # unset options reach the job as "use the recipe"; --patience 0 turns it off
    assert seen[0]["epochs"] is None and seen[0]["learning_rate"] is None
    assert seen[0]["batch_size"] is None and "patience" not in seen[0]
    assert (seen[1]["epochs"], seen[1]["learning_rate"]) == (3, 0.1)
    assert (seen[1]["batch_size"], seen[1]["patience"]) == (8, 0)
    # unset model options do not reach the job: it takes them from the family's
    # one table of defaults (the constructor's, the family's own sizes over it)
    assert "adjoint" not in seen[0] and "latent_size" not in seen[0]
    hyper = [
        family.resolve_options({k: v for k, v in s.items() if k in family.options})[0]
        for s in seen
    ]
    assert hyper[0]["adjoint"] == "checkpoint" and hyper[0]["latent_size"] == 8
    assert "anchor" not in seen[0] and seen[1]["anchor"] == "last"
    assert hyper[0]["anchor"] == "first" and hyper[1]["anchor"] == "last"
    assert "overwrite" not in seen[0] and seen[1]["overwrite"] is True


def test_cli_neural_ode_takes_the_shared_options(monkeypatch, tmp_path, capsys):
    import ctmodels.jobs as job

    seen = []

    def fake_fit(family, data, out, **options):
        assert family == "neural-ode"
        seen.append(options)
        return {"recipe": {}, "epochs_run": 0, "fit_seconds": 0.0, "test": {}}

    monkeypatch.setattr(job, "fit", fake_fit)
    base = ["fit", "neural-ode", "--data", "pbcseq", "--out", str(tmp_path)]
    assert main(base) == 0
    assert main(base + ["--batch-size", "8", "--learning-rate", "0.1",
                        "--latent-size", "3", "--epochs", "2"]) == 0  # fmt: skip
    # the job's defaults (its recipe)
    assert all(seen[0][k] is None for k in ("batch_size", "learning_rate", "epochs"))
    assert (seen[1]["batch_size"], seen[1]["learning_rate"]) == (8, 0.1)
    assert (seen[1]["latent_size"], seen[1]["epochs"]) == (3, 2)
    # the neural ODE now trains through ctmodels.train.fit: early stopping applies
    assert main(base + ["--patience", "3"]) == 0 and seen[2]["patience"] == 3
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:  # not silently ignored
        main(base + ["--anchor", "last"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "unrecognized arguments: --anchor last" in err


def test_predict_answers_hidden_and_future_positions(fitted, tmp_path):
    path, out, _ = fitted
    src = xr.load_dataset(path).isel(series=slice(0, 4))
    # hide the 2nd visit's values (interpolation) and add a future time (extrapolation)
    query = src.copy(deep=True)
    for v in src.attrs["channels"].split():
        query[v][:, 1] = np.nan
    last = src.sizes["obs"] - 1
    t = query["time"].values.copy()
    n = (~np.isnan(t)).sum(axis=1)
    for s in range(t.shape[0]):
        if n[s] <= last:
            t[s, n[s]] = np.nanmax(t[s]) + 1.0
    query = query.assign_coords(time=(("series", "obs"), t, src["time"].attrs))
    qpath = tmp_path / "query.nc"
    query.to_netcdf(qpath)
    rc = main(["predict", "--checkpoint", str(out), "--data", str(qpath),
               "--out", str(tmp_path / "pred.nc"), "--samples", str(N)])  # fmt: skip
    assert rc == 0
    pred = xr.load_dataset(tmp_path / "pred.nc")
    valid_t = ~np.isnan(t)
    assert np.isfinite(pred["bili"].values[valid_t]).all()
    assert np.isnan(pred["bili"].values[~valid_t]).all()
    xr.testing.assert_identical(pred["time"], query["time"])
    # the prediction conditions on observations: the same model on the same data is
    # reproducible with a fixed seed
    from ctmodels.jobs import predict as predict_checkpoint

    again = predict_checkpoint(out, qpath, tmp_path / "pred2.nc", n_samples=N)
    np.testing.assert_allclose(again["bili"].values, pred["bili"].values)


def test_evaluate_writes_metrics(fitted, tmp_path, capsys):
    path, out, _ = fitted
    target = tmp_path / "m.json"
    rc = main(["evaluate", "--checkpoint", str(out / "checkpoint"), "--data", str(path),
               "--task", "extrapolation", "--out", str(target)])  # fmt: skip
    assert rc == 0
    metrics = json.loads(target.read_text())
    assert set(metrics) >= {"extrapolation", "data", "checkpoint"}
    assert "interpolation" not in metrics
    ts = cd.from_xarray(xr.load_dataset(path))
    # extrapolation scores the later half of each series' observed span
    assert 0 < metrics["extrapolation"]["points"] < int(ts.mask.sum())


def test_cli_bad_input_is_one_line(tmp_path, capsys):
    rc = main(["predict", "--checkpoint", str(tmp_path / "nope"), "--data", "pbcseq",
               "--out", str(tmp_path / "x.nc")])  # fmt: skip
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and "does not exist" in err
    rc = main(["fit", "latent-ode", "--data", "pbcseqq", "--out", str(tmp_path)])
    err = capsys.readouterr().err
    assert rc == 2 and "Did you mean 'pbcseq'" in err


def _predict_bili(out, ds, path, **kw):
    from ctmodels.jobs import predict as predict_checkpoint

    ds.to_netcdf(path)
    return predict_checkpoint(out, path, path.with_suffix(".pred.nc"), n_samples=N,
                              **kw)["bili"].values  # fmt: skip


def test_predict_converts_the_time_unit_to_the_checkpoints(fitted, tmp_path):
    """pbcseq's times are in years; the same visits as dates (from_xarray: days) or
    in days give the same predictions (oracle: the file in years); a unit ctmodels
    cannot convert is refused."""
    path, out, _ = fitted
    src = xr.load_dataset(path).isel(series=slice(0, 4))
    assert src["time"].attrs["units"] == "years"
    want = _predict_bili(out, src, tmp_path / "years.nc")
    years = src["time"].values
    in_days = years * 365.25
    days = src.assign_coords(time=(("series", "obs"), in_days, {"units": "days"}))
    np.testing.assert_allclose(_predict_bili(out, days, tmp_path / "d.nc"), want,
                               rtol=1e-5, atol=1e-6)  # fmt: skip
    ns = np.where(np.isnan(years), 0, years * 365.25 * 86400e9).round()
    dates = np.datetime64("2001-01-01", "ns") + ns.astype("timedelta64[ns]")
    dates = np.where(np.isnan(years), np.datetime64("NaT"), dates)
    dated = src.assign_coords(time=(("series", "obs"), dates))
    np.testing.assert_allclose(_predict_bili(out, dated, tmp_path / "dt.nc"), want,
                               rtol=1e-5, atol=1e-6)  # fmt: skip
    odd = src.assign_coords(time=(("series", "obs"), years, {"units": "fortnights"}))
    with pytest.raises(ValueError, match="trained on times in 'years'.*cannot convert"):
        _predict_bili(out, odd, tmp_path / "odd.nc")


def test_job_errors_leave_no_debris(fitted, tmp_path, capsys):
    """A directory as predict's --out, a non-positive value in a log channel, a
    dataset too small to split, --samples 0: one clear line each (or a usage error),
    and no stray .tmp file or empty output directory."""
    path, out, _ = fitted
    (tmp_path / "pred").mkdir()
    rc = main(["predict", "--checkpoint", str(out), "--data", str(path),
               "--out", str(tmp_path / "pred")])  # fmt: skip
    err = capsys.readouterr().err
    assert rc == 2 and "is a directory; give a file path" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pred"]
    bad = xr.load_dataset(path).isel(series=slice(0, 3))
    assert bad["bili"].attrs.get("transform") == "log"
    bad["bili"][1, 0] = 0.0
    bad.to_netcdf(tmp_path / "bad.nc")
    rc = main(["predict", "--checkpoint", str(out), "--data", str(tmp_path / "bad.nc"),
               "--out", str(tmp_path / "p.nc")])  # fmt: skip
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1
    assert "'bili' is log-transformed" in err and "the first: 0" in err
    assert not (tmp_path / "p.nc").exists()
    xr.load_dataset(path).isel(series=slice(0, 2)).to_netcdf(tmp_path / "two.nc")
    rc = main(["fit", "latent-ode", "--data", str(tmp_path / "two.nc"),
               "--out", str(tmp_path / "run"), "--epochs", "1"])  # fmt: skip
    err = capsys.readouterr().err
    assert rc == 2 and "needs at least 3 series" in err
    assert not (tmp_path / "run").exists()
    for argv in (["predict", "--checkpoint", str(out), "--data", str(path), "--out",
                  str(tmp_path / "q.nc"), "--samples", "0"],
                 ["fit", "latent-ode", "--data", "pbcseq", "--out", str(tmp_path / "r"),
                  "--latent-size", "0"]):  # fmt: skip
        with pytest.raises(SystemExit) as e:
            main(argv)
        err = capsys.readouterr().err
        assert e.value.code == 2 and "expected an int >= 1, got 0" in err
    assert not (tmp_path / "q.nc").exists() and not (tmp_path / "r").exists()


def test_damaged_checkpoint_says_so(fitted, tmp_path, capsys):
    import shutil

    _, out, _ = fitted
    ck = tmp_path / "ck"
    shutil.copytree(out / "checkpoint", ck)
    header = ck / "checkpoint" / "checkpoint.json"  # fit's layout
    text = header.read_text()
    header.write_text(text[: len(text) // 2])
    rc = main(["evaluate", "--checkpoint", str(ck), "--data", "pbcseq"])
    err = capsys.readouterr().err
    assert rc == 2 and "checkpoint.json is damaged (not valid JSON" in err
    header.write_text(text)
    eqx_files = sorted(header.parent.glob("*.eqx"))
    assert eqx_files
    for name in eqx_files:
        name.write_bytes(name.read_bytes()[:100])
    from ctmodels.train import load_checkpoint

    with pytest.raises(ValueError, match="or the file is damaged"):
        load_checkpoint(ck)


class _Offset(eqx.Module):
    """A stand-in model whose prediction misses every value by `bias` and whose own
    spread is `sqrt(var + noise^2)`: the calibration's oracle is known."""

    bias: float
    var: float
    noise: float

    def _noise_log_std(self, dtype):
        return jnp.full((2,), np.log(self.noise), dtype)

    def predict(self, batch, *, key, n_samples):
        mean = batch.values + self.bias * jnp.arange(1, 3)  # channel c misses by c*bias
        std = jnp.sqrt(self.var + self.noise**2) * jnp.ones_like(mean)
        return mean, std


def test_calibrate_spread_against_the_closed_form():
    """Channel c's errors are c * bias; the model explains `var` of their square:
    the residual std is sqrt((c * bias)^2 - var), at least the model's noise; the
    calibrated intervals then hold the values exactly when they are wide enough."""
    from ctmodels.jobs._series import coverage as _coverage
    from ctmodels.models import calibrate_spread
    from ctmodels.models._predict import with_spread as _calibrated_std

    rng = np.random.default_rng(0)
    t = np.sort(rng.uniform(0, 1, (6, 5)), axis=1)
    ts = cd.TimeSeries.from_arrays(t, rng.normal(size=(6, 5, 2)))
    model = _Offset(bias=0.3, var=0.05, noise=0.01)
    key = jax.random.key(0)
    scale = calibrate_spread(model, ts, key=key, n_samples=2, batch_size=4)
    np.testing.assert_allclose(scale, [np.sqrt(0.09 - 0.05), np.sqrt(0.36 - 0.05)],
                               rtol=1e-5)  # fmt: skip
    small = _Offset(bias=0.1, var=0.05, noise=0.01)  # spread already too wide
    np.testing.assert_allclose(
        calibrate_spread(small, ts, key=key, n_samples=2, batch_size=4), 0.01, rtol=1e-5
    )
    std = np.full(ts.values.shape, np.sqrt(0.05 + 0.01**2))
    cal = _calibrated_std(model, std, scale)
    np.testing.assert_allclose(cal[..., 1], np.sqrt(0.36), rtol=1e-6)
    mean = ts.values + np.array([0.3, 0.6])
    # errors of exactly one calibrated std: inside a 90% interval (z = 1.64)
    assert _coverage(mean, cal, ts.values, ts.mask) == 1.0
    # uncalibrated (z * std = 0.37): channel 0's errors (0.3) inside, channel 1's out
    assert _coverage(mean, std, ts.values, ts.mask) == 0.5


def test_predict_uses_the_calibration(fitted, tmp_path):
    """predict's V_std includes the validation residual scale written by fit (wider
    than the model's own spread, the same means); without calibration.json it is the
    model's own."""
    import shutil

    from ctmodels.jobs import predict as predict_checkpoint

    path, out, _ = fitted
    cal = json.loads((out / "checkpoint" / "calibration.json").read_text())
    assert set(cal["residual_std"]) == set(
        xr.load_dataset(path).attrs["channels"].split()
    )
    assert min(cal["residual_std"].values()) > 0.01  # above the model's noise
    src = xr.load_dataset(path).isel(series=slice(0, 4))
    q = tmp_path / "q.nc"
    src.to_netcdf(q)
    with_cal = predict_checkpoint(out, q, tmp_path / "a.nc", n_samples=N)
    bare = tmp_path / "bare"
    shutil.copytree(out / "checkpoint", bare)
    (bare / "calibration.json").unlink()
    own = predict_checkpoint(bare, q, tmp_path / "b.nc", n_samples=N)
    assert own.attrs["spread"].startswith("the model's own")
    valid = np.isfinite(own["bili_std"].values)
    for v in ("albumin", "bili"):  # an affine channel and a log channel
        wider = with_cal[f"{v}_std"].values > own[f"{v}_std"].values
        assert wider[valid].all()
    # the same model means; in original units a log channel's mean is the log-normal
    # exp(mu + s^2 / 2), so a wider s raises it (and the median exp(mu) stays put)
    np.testing.assert_allclose(with_cal["albumin"].values, own["albumin"].values)
    assert (with_cal["bili"].values[valid] > own["bili"].values[valid]).all()


def test_predictive_interval_against_scipy():
    """Affine channels: the Gaussian interval; log channels: the log-normal with the
    given mean and std (scipy's quantiles), so the band stays positive."""
    from scipy import stats

    from ctmodels._plot import predictive_interval

    mean, std = np.array([2.0, 10.0]), np.array([1.5, 30.0])
    lo, hi = predictive_interval(mean, std)
    np.testing.assert_allclose(lo, stats.norm.ppf(0.025, mean, std))
    np.testing.assert_allclose(hi, stats.norm.ppf(0.975, mean, std))
    lo, hi = predictive_interval(mean, std, log=True)
    s2 = np.log1p((std / mean) ** 2)
    dist = stats.lognorm(s=np.sqrt(s2), scale=np.exp(np.log(mean) - s2 / 2))
    np.testing.assert_allclose(dist.mean(), mean)  # the parametrisation is right
    np.testing.assert_allclose(dist.std(), std)
    np.testing.assert_allclose(lo, dist.ppf(0.025))
    np.testing.assert_allclose(hi, dist.ppf(0.975))
    assert (lo > 0).all()


def test_load_fitted_predicts_at_any_times_in_data_units(fitted, tmp_path):
    """The Python route to what `ctmodels predict` writes, at any times: a fitted
    job's checkpoint carries its normaliser, calibrated spread and time unit."""
    import jax

    from ctmodels.jobs import predict as predict_checkpoint
    from ctmodels.models import load_fitted, predict

    path, out, _ = fitted
    fit = load_fitted(out)
    assert fit.time_units == "years" and len(fit.spread) == len(fit.channels) == 7
    src = xr.load_dataset(path).isel(series=slice(0, 4))
    q = np.array([0.0, 1.0, 3.0, 8.0])  # years; 8 is past every visit
    years = predict(fit, src, q, key=jax.random.key(0), n_samples=4)
    t = src["time"].values * 365.25
    days = src.assign_coords(time=(("series", "obs"), t, {"units": "days"}))
    in_days = predict(fit, days, q * 365.25, key=jax.random.key(0), n_samples=4)
    np.testing.assert_array_equal(in_days["time"].values, q * 365.25)
    for v in ("bili", "bili_std", "albumin"):
        np.testing.assert_allclose(in_days[v].values, years[v].values, rtol=1e-4)
    assert (years["bili_std"].values > 0).all()
    # on the file's own grid: exactly what `ctmodels predict` writes
    src.to_netcdf(tmp_path / "s.nc")
    cli = predict_checkpoint(out, tmp_path / "s.nc", tmp_path / "p.nc", n_samples=N)
    own = predict(fit, src, key=jax.random.key(0), n_samples=N, batch_size=16)
    xr.testing.assert_allclose(own[["bili", "bili_std"]], cli[["bili", "bili_std"]])


def _copy_run(out, to):
    import shutil

    shutil.copytree(out, to, ignore=shutil.ignore_patterns("plots"))
    return to


def _edit_header(run, **hyper):
    """Change the stored checkpoint (its header): any save after the calibration."""
    header = run / "checkpoint" / "checkpoint" / "checkpoint.json"  # fit's layout
    d = json.loads(header.read_text())
    hp = dict(d["hyperparameters"])
    hp.update(hyper)
    d["hyperparameters"] = [[k, v] for k, v in hp.items()]
    d["elapsed_edit"] = True  # a different header even with no hyperparameter
    header.write_text(json.dumps(d))


def test_calibration_belongs_to_its_checkpoint(fitted, tmp_path, capsys):
    """calibration.json names the checkpoint it was made for: a refused re-run into
    the same --out leaves it (and the calibrated spread) in place; once the
    checkpoint changes (training went on, a new run started there) it is not used,
    with a warning, instead of pairing an old scale with a new model."""
    from ctmodels.jobs import predict as predict_checkpoint
    from ctmodels.jobs._files import read_calibration as _read_calibration

    path, out, _ = fitted
    run = _copy_run(out, tmp_path / "run")
    cal = run / "checkpoint" / "calibration.json"
    want = json.loads(cal.read_text())
    channels = list(want["residual_std"])
    assert _read_calibration(run / "checkpoint", channels) == list(
        want["residual_std"].values()
    )
    # a re-run with other settings is refused before anything in --out changes
    argv = ["fit", "latent-ode", "--data", str(path), "--out", str(run), "--epochs",
            "3", "--batch-size", "16", "--latent-size", "3"]  # fmt: skip
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "holds a checkpoint of a different run" in err
    assert "pass --overwrite" in err and "resume=False" not in err
    assert json.loads(cal.read_text()) == want
    src = xr.load_dataset(path).isel(series=slice(0, 4))
    src.to_netcdf(tmp_path / "s.nc")
    kept = predict_checkpoint(run, tmp_path / "s.nc", tmp_path / "a.nc", n_samples=N)
    assert kept.attrs["spread"].startswith("calibrated")
    _edit_header(run)
    with pytest.warns(UserWarning, match="made for an earlier checkpoint"):
        assert _read_calibration(run / "checkpoint", channels) is None
    with pytest.warns(UserWarning, match="made for an earlier checkpoint"):
        own = predict_checkpoint(run, tmp_path / "s.nc", tmp_path / "b.nc", n_samples=N)
    assert own.attrs["spread"].startswith("the model's own")
    # a calibration written before it named its checkpoint is still read
    cal.write_text(json.dumps({"residual_std": want["residual_std"]}))
    assert _read_calibration(run / "checkpoint", channels) is not None


def test_a_legacy_calibration_is_not_paired_with_a_new_model(
    fitted, tmp_path, monkeypatch
):
    """A calibration.json from before it named its checkpoint: a run that starts in
    that --out (here: --overwrite, stopped after it rewrote the checkpoint) makes it
    stale like a current one; with no checkpoint beside it, it is removed."""
    import ctmodels.train
    from ctmodels.jobs import fit
    from ctmodels.jobs._files import read_calibration as _read_calibration

    fit_latent_ode = functools.partial(fit, "latent-ode")

    path, out, _ = fitted
    run = _copy_run(out, tmp_path / "run")
    cal = run / "checkpoint" / "calibration.json"
    legacy = json.loads(cal.read_text())
    del legacy["checkpoint_sha256"]
    cal.write_text(json.dumps(legacy))
    channels = list(legacy["residual_std"])

    def one_step_then_killed(*args, **kwargs):
        _edit_header(run)  # the new run's first checkpoint
        raise KeyboardInterrupt

    monkeypatch.setattr(ctmodels.train, "fit", one_step_then_killed)
    with pytest.raises(KeyboardInterrupt):
        fit_latent_ode(path, run, progress=False, overwrite=True, seed=1, **SMALL)
    with pytest.warns(UserWarning, match="made for an earlier checkpoint"):
        assert _read_calibration(run / "checkpoint", channels) is None
    lone = tmp_path / "lone"
    (lone / "checkpoint").mkdir(parents=True)
    (lone / "checkpoint" / "calibration.json").write_text(json.dumps(legacy))
    with pytest.raises(KeyboardInterrupt):
        fit_latent_ode(path, lone, progress=False, **SMALL)
    assert not (lone / "checkpoint" / "calibration.json").exists()


def test_a_failed_solve_in_predict_is_one_solver_error(fitted, tmp_path, capsys):
    """A latent ODE whose solve hits max_steps (the stored model with max_steps=2
    and tight tolerances: same weights) gives ctmodels.SolverError naming the
    series, in Python and as one line from the CLI, not a raw runtime error."""
    from ctmodels import SolverError
    from ctmodels.models import load_fitted, predict

    path, out, _ = fitted
    run = _copy_run(out, tmp_path / "run")
    _edit_header(run, max_steps=2, rtol=1e-10, atol=1e-12)
    (run / "checkpoint" / "calibration.json").unlink()  # made for the original
    src = xr.load_dataset(path).isel(series=slice(0, 4))
    fitted_model = load_fitted(run)
    # the CLI's evaluate draws EVAL_SAMPLES: with the same count and batch size all
    # three calls share one compilation of the edited model
    with pytest.raises(SolverError, match="maximum number of steps") as e:
        predict(fitted_model, src, key=jax.random.key(0), n_samples=N, batch_size=16)
    ids = [str(i) for i in src["series"].values]
    assert f"series {', '.join(ids)} failed" in str(e.value)
    assert e.value.solver == "dopri5" and "throw=False" not in str(e.value)
    src.to_netcdf(tmp_path / "s.nc")
    for cmd in (["predict", "--out", str(tmp_path / "p.nc"), "--n-samples", str(N)],
                ["evaluate"]):  # fmt: skip
        rc = main([cmd[0], "--checkpoint", str(run), "--data", str(tmp_path / "s.nc"),
                   *cmd[1:]])  # fmt: skip
        err = capsys.readouterr().err
        assert rc == 2, cmd
        errors = [ln for ln in err.splitlines() if ": error: " in ln]
        assert len(errors) == 1 and "maximum number of steps" in errors[0]
        assert "Traceback" not in err
    assert not (tmp_path / "p.nc").exists()


def test_bad_output_paths_fail_before_the_work(fitted, tmp_path, capsys):
    """--out under a file, --plots that is a file, evaluate's --out that is a
    directory: one line each, before anything is computed or written."""
    path, out, _ = fitted
    afile = tmp_path / "f.nc"
    afile.write_text("x")
    (tmp_path / "adir").mkdir()
    cases = [
        (["predict", "--checkpoint", str(out), "--data", str(path), "--out",
          str(afile / "x.nc")], "is a file, not a directory"),
        (["predict", "--checkpoint", str(out), "--data", str(path), "--out",
          str(tmp_path / "p.nc"), "--plots", str(afile)], "--plots .* is a file"),
        (["evaluate", "--checkpoint", str(out), "--data", str(path), "--out",
          str(tmp_path / "adir")], "is a directory; give a file path"),
        (["predict", "--checkpoint", str(out), "--data", str(path), "--out",
          str(tmp_path / "nd") + "/"], "ends in '/'"),
        (["fit", "latent-ode", "--data", str(path), "--out", str(afile / "run")],
         "is a file, not a directory"),
        (["fit", "latent-ode", "--data", str(path), "--out", str(tmp_path / "r"),
          "--adjoint", "implicit"], "differentiates a fixed point"),
        (["fit", "neural-ode", "--data", str(path), "--out", str(tmp_path / "n"),
          "--adjoint", "nope"], "Unknown adjoint"),
    ]  # fmt: skip
    for argv, match in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and re.search(match, err), (argv, err)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adir", "f.nc"]
    assert afile.read_text() == "x"


def test_metrics_without_points_are_null_with_a_note(fitted, tmp_path):
    """Data whose series have one visit each: nothing to extrapolate to, so strict
    JSON nulls and a note instead of NaN (interpolation still hides some of the
    visit's channels)."""
    from ctmodels.jobs import evaluate as evaluate_checkpoint

    path, out, _ = fitted
    one = xr.load_dataset(path).isel(series=slice(0, 3), obs=slice(0, 1))
    one.to_netcdf(tmp_path / "one.nc")
    target = tmp_path / "m.json"
    evaluate_checkpoint(out, tmp_path / "one.nc", out=target, n_samples=2)
    saved = json.loads(target.read_text(), parse_constant=pytest.fail)
    entry = saved["extrapolation"]
    assert entry["points"] == 0 and entry["mse"] is None
    assert entry["coverage_90"] is None and "no points to score" in entry["note"]
    assert saved["interpolation"]["points"] > 0
    assert np.isfinite(saved["interpolation"]["mse"])
    assert "note" not in saved["interpolation"]


def test_fit_builds_the_model_with_the_anchor(tmp_path, monkeypatch):
    """`fit_latent_ode(anchor=...)` reaches the model (and so its checkpoint's
    hyperparameters); a bad one is refused before the output directory exists."""
    import ctmodels.train
    from ctmodels.jobs import fit

    fit_latent_ode = functools.partial(fit, "latent-ode")

    path = tmp_path / "pbc8.nc"
    D.load("pbcseq").isel(series=slice(0, 8)).to_netcdf(path)
    seen = []

    def interrupted(model, *args, **kwargs):
        seen.append(model)
        raise KeyboardInterrupt

    monkeypatch.setattr(ctmodels.train, "fit", interrupted)
    with pytest.raises(KeyboardInterrupt):
        fit_latent_ode(path, tmp_path / "run", progress=False, anchor="last", **SMALL)
    assert dict(seen[0].hyperparameters)["anchor"] == seen[0].anchor == "last"
    # overwrite=True (--overwrite) starts afresh: fit is told not to resume
    kwargs = []
    monkeypatch.setattr(
        ctmodels.train, "fit",
        lambda *a, **k: (kwargs.append(k), interrupted(*a, **k)),
    )  # fmt: skip
    for overwrite in (False, True):
        with pytest.raises(KeyboardInterrupt):
            fit_latent_ode(path, tmp_path / "run", progress=False,
                           overwrite=overwrite, **SMALL)  # fmt: skip
    assert [k["resume"] for k in kwargs] == [True, False]
    with pytest.raises(ValueError, match="anchor must be 'first' or 'last'"):
        fit_latent_ode(path, tmp_path / "bad", progress=False, anchor="end", **SMALL)
    assert not (tmp_path / "bad").exists()
