"""The FFJORD family as a job: `ctmodels fit ffjord` / `evaluate` / `sample` on
points, every NLL in the data's original units (the standardisation's
log-determinant counted), and the errors for data it cannot model."""

from __future__ import annotations

import json
import math

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pandas as pd
import pytest
import xarray as xr
from scipy import stats

from ctmodels import jobs
from ctmodels._cli import main
from ctmodels.jobs import _ffjord, _points
from ctmodels.models import FFJORD

TINY = ["--width", "4", "--depth", "1", "--rtol", "1e-2", "--atol", "1e-2",
        "--kinetic-weight", "0", "--solver", "bosh3"]  # fmt: skip


def _write_csv(path, values, columns=("a", "b")):
    pd.DataFrame(values, columns=list(columns)).to_csv(path, index=False)
    return path


@pytest.fixture(scope="module")
def points():
    rng = np.random.default_rng(0)
    return rng.normal(size=(60, 2)) * [2.0, 0.5] + [10.0, -3.0]


def _still(model):
    """`model` with every vector-field parameter 0: the flow is the identity, so
    its log-density is N(0, I) of the standardised points."""
    return eqx.tree_at(
        lambda m: m.field,
        model,
        jax.tree.map(
            lambda p: jnp.zeros_like(p) if eqx.is_inexact_array(p) else p, model.field
        ),
    )


def test_cli_round_trip_fit_evaluate_sample(points, tmp_path, capsys):
    csv = _write_csv(tmp_path / "pts.csv", points)
    out = tmp_path / "run"
    rc = main(["fit", "ffjord", "--data", str(csv), "--out", str(out), "--quiet",
               "--epochs", "2", "--batch-size", "16", *TINY])  # fmt: skip
    assert rc == 0, capsys.readouterr().err
    summary = json.loads(capsys.readouterr().out)
    metrics = json.loads((out / "metrics.json").read_text())
    test = metrics["test"]
    assert summary["test_nll"] == pytest.approx(test["nll"])
    assert metrics["series"] == {"train": 48, "valid": 6, "test": 6}
    assert metrics["channels"] == ["a", "b"]
    # original units: the standardised NLL plus sum(log scale) of the training split
    rows = np.random.default_rng(0).permutation(60)
    sigma = points[rows[:48]].std(0)
    assert test["log_scale"] == pytest.approx(np.log(sigma).sum(), rel=1e-6)
    assert test["nll"] == pytest.approx(test["nll_standardised"] + test["log_scale"])
    assert test["bits_per_dim"] == pytest.approx(test["nll"] / (2 * math.log(2)))
    # the Gaussian baseline against scipy
    train, held = points[rows[:48]], points[rows[54:]]
    ref = -stats.multivariate_normal(train.mean(0), np.cov(train.T, bias=True)).logpdf(
        held
    )
    assert test["baselines"]["gaussian"]["nll"] == pytest.approx(ref.mean(), rel=1e-6)
    assert (out / "plots" / "density.png").is_file()
    pred = xr.load_dataset(out / "predictions.nc")
    assert pred["density"].shape == (_ffjord.GRID, _ffjord.GRID)
    assert set(pred["split"].values) == {"train", "valid", "test"}

    target = tmp_path / "m.json"
    rc = main(["evaluate", "--checkpoint", str(out), "--data", str(csv),
               "--out", str(target)])  # fmt: skip
    assert rc == 0, capsys.readouterr().err
    scored = json.loads(target.read_text())
    assert scored["points"] == 60 and np.isfinite(scored["nll"])
    assert scored["bits_per_dim"] == pytest.approx(scored["nll"] / (2 * math.log(2)))
    # the same as the per-row log-densities written by fit
    assert scored["nll"] == pytest.approx(-float(pred["log_density"].mean()), rel=1e-5)

    for name in ("s.csv", "s.nc"):
        rc = main(["sample", "--checkpoint", str(out), "-n", "7", "--seed", "3",
                   "--out", str(tmp_path / name)])  # fmt: skip
        assert rc == 0, capsys.readouterr().err
    drawn = pd.read_csv(tmp_path / "s.csv")
    assert list(drawn.columns) == ["a", "b"] and len(drawn) == 7
    nc = xr.load_dataset(tmp_path / "s.nc")
    np.testing.assert_allclose(nc["a"].values, drawn["a"].values, rtol=1e-6)
    # in the data's units: near the data, not near the standardised origin
    assert abs(drawn["a"].mean() - 10.0) < 3.0 and abs(drawn["b"].mean() + 3.0) < 1.0
    assert main(["sample", "--checkpoint", str(out), "--out",
                 str(tmp_path / "s.json")]) == 2  # fmt: skip
    assert "give a .csv or a .nc file" in capsys.readouterr().err
    # a checkpoint of another family is refused when one is asked for
    with pytest.raises(ValueError, match="is not a latent-ode checkpoint"):
        jobs.evaluate(out, csv, family="latent-ode")


def test_nll_in_original_units_against_a_closed_form(points, tmp_path):
    """With a still flow (identity) the model is N(0, I) on standardised data, i.e.
    the Gaussian N(mean, diag(scale²)) in the data's units: the job's NLL must be
    scipy's. A scaled and shifted copy `a x + b` (a negative scale included) is
    standardised to the same points, and its NLL differs by sum(log |a|)."""
    a, b = np.array([-3.0, 0.25]), np.array([5.0, 1.0])
    model = _still(FFJORD(2, width=4, depth=1, rtol=1e-3, atol=1e-3,
                          key=jax.random.key(0)))  # fmt: skip
    nll = {}
    for name, values in (("x", points), ("ax", a * points + b)):
        prep = _points.prepare(_write_csv(tmp_path / f"{name}.csv", values), seed=1)
        nll[name] = _ffjord.nll_metrics(model, prep.test_n)
        std = prep.standardiser
        ref = -stats.norm.logpdf(prep.test.values, std.mean, std.scale).sum(1).mean()
        assert nll[name]["nll"] == pytest.approx(ref, abs=1e-4)
    shift = float(np.log(np.abs(a)).sum())
    assert nll["ax"]["nll"] - nll["x"]["nll"] == pytest.approx(shift, abs=1e-4)
    assert nll["ax"]["nll_standardised"] == pytest.approx(
        nll["x"]["nll_standardised"], abs=1e-4
    )
    g = {k: v["baselines"]["gaussian"]["nll"] for k, v in nll.items()}
    assert g["ax"] - g["x"] == pytest.approx(shift, abs=1e-6)


def test_bad_points_are_refused_or_dropped_with_a_count(points, tmp_path):
    frame = pd.DataFrame(points, columns=["a", "b"])
    bad = frame.assign(kind=["u"] * 60)
    bad.to_csv(tmp_path / "text.csv", index=False)
    with pytest.raises(ValueError, match=r"column\(s\) \['kind'\] are not numeric"):
        _points.prepare(tmp_path / "text.csv", seed=0)
    # --channels picks the numeric ones
    prep = _points.prepare(tmp_path / "text.csv", seed=0, channels="a,b")
    assert prep.ts.columns == ("a", "b")

    frame.assign(c=1.5).to_csv(tmp_path / "const.csv", index=False)
    with pytest.raises(ValueError, match=r"column\(s\) \['c'\] are constant"):
        _points.prepare(tmp_path / "const.csv", seed=0)

    holes = frame.copy()
    holes.iloc[[3, 17], 1] = np.nan
    holes.to_csv(tmp_path / "nan.csv", index=False)
    with pytest.warns(UserWarning, match="dropped 2 of 60 rows with a missing"):
        prep = _points.prepare(tmp_path / "nan.csv", seed=0)
    assert len(prep.ts) == 58 and prep.summary["dropped_rows"] == 2

    frame.iloc[:5].to_csv(tmp_path / "few.csv", index=False)
    with pytest.raises(ValueError, match="5 rows are too few"):
        _points.prepare(tmp_path / "few.csv", seed=0)
    with pytest.raises(ValueError, match="48 rows, fewer than a batch"):
        _points.prepare(tmp_path / "text.csv", seed=0, channels="a,b", batch_size=64)
    with pytest.raises(ValueError, match="no column"):
        _points.prepare(tmp_path / "text.csv", seed=0, channels=["a", "z"])
    (tmp_path / "x.json").write_text("{}")
    with pytest.raises(ValueError, match="give a CSV"):
        _points.prepare(tmp_path / "x.json", seed=0)


def test_netcdf_and_bundled_points(points, tmp_path):
    ds = xr.Dataset(
        {
            "u": ("obs", points[:, 0]),
            "v": ("obs", points[:, 1]),
            "img": (("obs", "k"), np.zeros((60, 3))),
        }
    )
    ds.to_netcdf(tmp_path / "p.nc")
    # an array per sample is flattened into columns VAR_i (here constant: refused)
    with pytest.raises(ValueError, match=r"\['img_0', 'img_1', 'img_2'\] are const"):
        _points.prepare(tmp_path / "p.nc", seed=0)
    ds.assign(w=("other", np.zeros(5))).to_netcdf(tmp_path / "q.nc")
    with pytest.raises(ValueError, match="over one sample dim"):
        _points.prepare(tmp_path / "q.nc", seed=0, channels=["u", "w"])
    prep = _points.prepare(tmp_path / "p.nc", seed=0, channels=["u", "v"])
    np.testing.assert_allclose(np.sort(prep.ts.values[:, 0]), np.sort(points[:, 0]))
    # a bundled set: its own channels (the toy sets' label `component` is left out)
    prep = _points.prepare("eight_gaussians", seed=0)
    assert prep.ts.columns == ("x", "y") and len(prep.ts) == 2000
    assert jobs.get_family("ffjord").recipe_for("eight_gaussians")["monitor"] == "nll"


# ------------------------------------------------------------------ images


LEVELS, ALPHA = 5, 0.05


@pytest.fixture(scope="module")
def pixels():
    """60 tiny 2x2 "images" of integer grey levels 0..4 (pixel 0 always 0)."""
    rng = np.random.default_rng(1)
    x = rng.integers(0, LEVELS, size=(60, 4))
    x[:, 0] = 0
    return pd.DataFrame(x, columns=["p00", "p01", "p10", "p11"])


def _logit_density(v, levels, alpha):
    """log N(s; 0, I) + log|ds/dv| of v's logit s (numpy, float64): a still flow's
    log-density of dequantised images."""
    p = alpha + (1 - 2 * alpha) * v / levels
    s = np.log(p) - np.log1p(-p)
    jac = np.log((1 - 2 * alpha) / levels) - np.log(p) - np.log1p(-p)
    return (stats.norm.logpdf(s) + jac).sum(1)


def test_image_nll_against_a_closed_form(pixels, tmp_path):
    """Images are not standardised; a still flow's NLL is that of N(0, I) in logit
    space with both log-determinants counted, on the job's fixed dequantisation of
    the test split; the Gaussian baseline is scipy's on the same points."""
    csv = tmp_path / "img.csv"
    pixels.to_csv(csv, index=False)
    prep = _points.prepare(csv, seed=2, model_options={"levels": LEVELS})
    assert prep.standardiser.log_scale == 0.0  # constant pixel 0 is allowed
    np.testing.assert_array_equal(prep.train_n, prep.train.values)
    assert prep.state["levels"] == LEVELS and prep.state["image_shape"] == [2, 2]
    alpha = ALPHA
    # TINY's model (so the round trip below reuses the compiled log-density)
    model = _still(FFJORD(4, width=4, depth=1, rtol=1e-2, atol=1e-2, solver="bosh3",
                          kinetic_weight=0.0, levels=LEVELS, logit_alpha=alpha,
                          key=jax.random.key(0)))  # fmt: skip
    m = _ffjord.nll_metrics(model, prep.test_n)
    v = _points.dequantise(prep.test.values, seed=_ffjord.DEQUANTISE_SEED)
    assert np.all((v >= 0) & (v < LEVELS)) and not np.allclose(v, np.round(v))
    ref = -_logit_density(v, LEVELS, alpha).mean()
    assert m["nll"] == pytest.approx(ref, abs=1e-3)
    assert m["nll"] == m["nll_standardised"] and m["log_scale"] == 0.0
    assert m["bits_per_dim"] == pytest.approx(ref / (4 * math.log(2)), abs=1e-3)
    train_v = _points.dequantise(prep.train.values, seed=2)  # prepare's fit draw
    g = stats.multivariate_normal(train_v.mean(0), np.cov(train_v.T, bias=True))
    assert m["baselines"]["gaussian"]["nll"] == pytest.approx(
        -g.logpdf(v).mean(), rel=1e-6
    )


def test_image_cli_round_trip(pixels, tmp_path, capsys):
    csv = tmp_path / "img.csv"
    pixels.to_csv(csv, index=False)
    out = tmp_path / "run"
    rc = main(["fit", "ffjord", "--data", str(csv), "--out", str(out), "--quiet",
               "--epochs", "1", "--batch-size", "16", *TINY,
               "--option", f"levels={LEVELS}",
               "--logit-alpha", str(ALPHA)])  # fmt: skip
    assert rc == 0, capsys.readouterr().err
    capsys.readouterr()
    metrics = json.loads((out / "metrics.json").read_text())
    hyper = metrics["hyperparameters"]
    assert metrics["levels"] == hyper["levels"] == LEVELS
    assert hyper["logit_alpha"] == ALPHA
    assert metrics["test"]["log_scale"] == 0.0 and "dequantised" in metrics["units"]
    pred = xr.load_dataset(out / "predictions.nc")
    assert pred["samples"].dims == ("draw", "row", "col")
    assert pred["samples"].shape == (_ffjord.GRID_IMAGES, 2, 2)
    assert (out / "plots" / "samples.png").is_file()

    target = tmp_path / "m.json"
    assert main(["evaluate", "--checkpoint", str(out), "--data", str(csv),
                 "--out", str(target)]) == 0  # fmt: skip
    scored = json.loads(target.read_text())
    assert scored["nll"] == pytest.approx(-float(pred["log_density"].mean()), rel=1e-5)

    assert main(["sample", "--checkpoint", str(out), "-n", "9",
                 "--out", str(tmp_path / "s.csv")]) == 0  # fmt: skip
    drawn = pd.read_csv(tmp_path / "s.csv")
    assert list(drawn.columns) == list(pixels.columns) and len(drawn) == 9
    assert all(pd.api.types.is_integer_dtype(drawn[c]) for c in drawn)
    assert drawn.values.min() >= 0 and drawn.values.max() < LEVELS

    # new data outside the checkpoint's grey levels is refused
    pixels.assign(p11=LEVELS).to_csv(tmp_path / "hi.csv", index=False)
    with pytest.raises(ValueError, match=r"grey level in \[0, 5\)"):
        jobs.evaluate(out, tmp_path / "hi.csv")


def test_image_data_errors(pixels, tmp_path):
    opts = {"levels": LEVELS}
    pixels.assign(p01=pixels.p01 + 1).to_csv(tmp_path / "hi.csv", index=False)
    with pytest.raises(
        ValueError,
        match=r"values run from 0 to 5\. Give --option "
        r"levels=N with N > the largest value \(6 here\)",
    ):
        _points.prepare(tmp_path / "hi.csv", seed=0, model_options=opts)
    pixels.assign(p01=-1).to_csv(tmp_path / "neg.csv", index=False)
    with pytest.raises(ValueError, match="from -1 to 4. Grey levels start at 0"):
        _points.prepare(tmp_path / "neg.csv", seed=0, model_options=opts)
    pixels.assign(p01=pixels.p01 + 0.5).to_csv(tmp_path / "frac.csv", index=False)
    with pytest.raises(ValueError, match="must be an integer grey level"):
        _points.prepare(tmp_path / "frac.csv", seed=0, model_options=opts)
    # without levels, the same file is continuous data: its constant pixel refused
    pixels.to_csv(tmp_path / "ok.csv", index=False)
    with pytest.raises(ValueError, match=r"\['p00'\] are constant"):
        _points.prepare(tmp_path / "ok.csv", seed=0)


def test_digits_recipe_is_an_image_model():
    fam = jobs.get_family("ffjord")
    recipe = fam.recipe_for("digits")
    assert recipe["options"]["levels"] == 17  # grey levels 0..16 (datasets/digits.md)
    model_kw, _ = fam.resolve_options(recipe["options"])
    assert model_kw["levels"] == 17 and model_kw["logit_alpha"] == 0.05
    # the other sets: no model options, and the recipe's step settings (max_steps
    # is also an FFJORD option) are never read as options
    assert "options" not in fam.recipe_for("eight_gaussians")
    prep = _points.prepare("digits", seed=0, model_options={"levels": 17})
    assert prep.dim == 64 and prep.state["image_shape"] == [8, 8]
    assert prep.ts.columns[:2] == ("image_0_0", "image_0_1")
    assert prep.ts.values.max() == 16 and prep.standardiser.log_scale == 0.0
    # digits as points (no levels): pixel (0, 0) is always 0, so no density
    with pytest.raises(ValueError, match="constant"):
        _points.prepare("digits", seed=0)
