"""The FFJORD family (`ctmodels fit ffjord`): a continuous normalizing flow
(`ctmodels.models.FFJORD`) on points (`ctmodels.jobs._points`: a bundled dataset, a
CSV with one row per sample, or a netCDF file with variables over one sample dim).

The flow is trained on the standardised training split (`ctmodels.train.fit` on
plain arrays, early stopping on the validation NLL with the exact trace); every NLL
the jobs report is in the data's original units, the standardisation's
log-determinant counted (`NLL = NLL_std + sum(log scale)`), in nats per sample and
bits per dimension, next to a full-covariance Gaussian fitted to the training split.

- `fit` writes `metrics.json` (`test`: `nll`, `bits_per_dim`, the Gaussian
  baseline), `history.csv`, `predictions.nc` (the log-density of every row, and for
  2-D data the density on a grid and samples) and, for 2-D data,
  `plots/density.png` (the learned density as a heat map with the training points
  and samples over it);
- `evaluate` writes `nll` and `bits_per_dim` of new data;
- `sample` writes samples in the data's units with its column names, CSV or netCDF
  by the `--out` suffix.

Images (`levels`, set by the `digits` recipe, or `--option levels=N` for a CSV of
integer pixels in `[0, N)`): the grey levels are not standardised; the model
dequantises them with uniform noise and models their logit (both
log-determinants counted), so `nll` is of the dequantised images in grey-level
units (nats per image) and `bits_per_dim` the usual dequantised bound; the test
split is scored with one fixed dequantisation draw (`DEQUANTISE_SEED`), the
Gaussian baseline on the same points. `predictions.nc` holds the images, their
log-densities and 64 samples in grey levels, `plots/samples.png` an 8 x 8 grid of
samples next to training images, and `sample` writes integer grey levels.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import xarray as xr

from .. import _devices
from ..models import FFJORD
from . import _points
from ._family import Family

#: Rows per compiled log-density evaluation (one compilation per process).
CHUNK = 256

#: Grid points per axis of the 2-D density (predictions.nc and the plot).
GRID = 80

#: Samples drawn for the 2-D plot.
PLOT_SAMPLES = 1000


@eqx.filter_jit
def _log_prob_chunk(model, x):
    return model.log_prob(x)


@eqx.filter_jit
def _draw(model, key, n):
    return model.sample(n, key=key)  # `n`, a Python int, is static


def draw(model, key, n: int, devices=None) -> np.ndarray:
    """`n` samples (standardised units) in chunks of `PLOT_SAMPLES` (one
    compilation whatever `n`; chunk `i` draws from `fold_in(key, i)`); `devices`:
    each chunk's reverse solve split over them (`FFJORD.sample`), the same
    samples."""
    place = _devices.resolve(devices, "sample")
    parts = [
        np.asarray(
            _draw(model, jax.random.fold_in(key, i), PLOT_SAMPLES)
            if place is None
            else model.sample(
                PLOT_SAMPLES, key=jax.random.fold_in(key, i), devices=place
            )  # fmt: skip
        )
        for i in range(-(-n // PLOT_SAMPLES))
    ]
    return np.concatenate(parts)[:n]


def log_prob_std(model, x: np.ndarray, devices=None) -> np.ndarray:
    """`log p(x)` (nats) of standardised points `x [n, D]`, exact trace, in fixed
    chunks of `CHUNK` rows (the last padded), so any `n` reuses one compilation.
    `devices`: each chunk split over them (`FFJORD.log_prob`); a device count that
    does not divide `CHUNK` rounds the chunk up to a multiple of it."""
    place = _devices.resolve(devices, "log_prob")
    chunk = CHUNK if place is None else place.round_up(CHUNK)
    x = np.asarray(x, np.float32)
    n = x.shape[0]
    out = np.empty(n, np.float64)
    for start in range(0, n, chunk):
        part = x[start : start + chunk]
        m = part.shape[0]
        if m < chunk:
            part = np.concatenate([part, np.zeros((chunk - m, x.shape[1]), x.dtype)])
        if place is None:
            lp = _log_prob_chunk(model, jnp.asarray(part))
        else:
            lp = model.log_prob(part, devices=place)
        out[start : start + m] = np.asarray(lp)[:m]
    return out


def log_prob_data(model, values: np.ndarray, standardiser, devices=None) -> np.ndarray:
    """`log p(x)` (nats) of points in the data's units: the flow's log-density of
    the standardised points minus `sum(log scale)` (the standardisation's
    log-determinant)."""
    return (log_prob_std(model, standardiser.transform(values), devices)
            - standardiser.log_scale)  # fmt: skip


#: The seed of the one uniform dequantisation draw with which image NLLs are scored.
DEQUANTISE_SEED = 0


def nll_metrics(model, points: _points.ModelPoints, devices=None) -> dict[str, Any]:
    """`nll` (nats per sample, the data's units), `bits_per_dim`, the standardised
    NLL and the log-determinant between them, and the Gaussian baseline.

    Images (`points.levels`): the NLL of the dequantised points `x + u` (one fixed
    draw `u ~ U[0, 1)^D`, the same for the Gaussian baseline), in grey-level units;
    nothing is standardised (`log_scale` 0)."""
    x, values = points.x, points.values
    if points.levels is not None:
        values = _points.dequantise(values, seed=DEQUANTISE_SEED)
        x = values.astype(np.float32)
    lp = log_prob_std(model, x, devices)
    nll_std = float(-np.mean(lp))
    nll = nll_std + points.log_scale
    dim = points.x.shape[1]
    out: dict[str, Any] = {
        "nll": nll,
        "bits_per_dim": nll / (dim * math.log(2.0)),
        "nll_standardised": nll_std,
        "log_scale": points.log_scale,
        "points": int(len(points)),
        "dims": int(dim),
        "non_finite": int((~np.isfinite(lp)).sum()),
    }
    if points.levels is not None:
        out["levels"] = int(points.levels)
        out["dequantised"] = (
            f"x + u, u ~ U[0, 1) per value (seed {DEQUANTISE_SEED}); density on "
            f"[0, {points.levels})^{dim} in grey-level units"
        )
    if points.gaussian is not None:
        g = _points.gaussian_nll(points.gaussian, values)
        out["baselines"] = {
            "gaussian": {"nll": g, "bits_per_dim": g / (dim * math.log(2.0))}
        }
    return out


def evaluate(model, data_n, *, batch_size=None, devices=None,
             **_: Any) -> dict[str, Any]:  # fmt: skip
    """The family's metrics (`Family.evaluate`): `nll_metrics` on `data_n`
    (`devices`: the log-densities split over them)."""
    del batch_size
    return nll_metrics(model, data_n, devices)


def _grid(values: np.ndarray, g: int = GRID):
    lo, hi = values.min(0), values.max(0)
    pad = 0.1 * (hi - lo)
    gx = np.linspace(lo[0] - pad[0], hi[0] + pad[0], g)
    gy = np.linspace(lo[1] - pad[1], hi[1] + pad[1], g)
    return gx, gy


def predict(model, points, state, *, key, n_samples=None, spread=None,
            batch_size=None, time_units=None, devices=None) -> xr.Dataset:  # fmt: skip
    """The log-density (nats, the data's units) of every row of `points`; for 2-D
    data also the density on a grid over their range (`density`, on `grid_x`,
    `grid_y`) and `PLOT_SAMPLES` samples (`sample_<column>`, on `draw`).
    `devices`: the log-densities and samples split over them."""
    del n_samples, spread, batch_size, time_units
    devices = _devices.resolve(devices, "predict")
    if state.get("levels") is not None:
        return _predict_images(model, points, state, key=key, devices=devices)
    std = _points.Standardiser.from_dict(state["standardiser"])
    cols = list(state["channels"])
    data = {c: (_points.SAMPLE_DIM, points.values[:, i]) for i, c in enumerate(cols)}
    data["log_density"] = (
        _points.SAMPLE_DIM,
        log_prob_data(model, points.values, std, devices),
    )
    if points.split is not None:
        data["split"] = (_points.SAMPLE_DIM, points.split.astype(str))
    coords: dict[str, Any] = {_points.SAMPLE_DIM: np.arange(len(points))}
    if len(cols) == 2:
        gx, gy = _grid(points.values)
        mx, my = np.meshgrid(gx, gy)
        grid = np.stack([mx.ravel(), my.ravel()], 1)
        dens = np.exp(log_prob_data(model, grid, std, devices)).reshape(my.shape)
        data["density"] = (("grid_y", "grid_x"), dens)
        coords.update(grid_x=gx, grid_y=gy)
        draws = std.inverse(draw(model, key, PLOT_SAMPLES, devices))
        for i, c in enumerate(cols):
            data[f"sample_{c}"] = ("draw", draws[:, i])
    ds = xr.Dataset(data, coords=coords)
    ds["log_density"].attrs["units"] = "nats, in the data's units"
    return ds


#: Images drawn for the sample grid of image data (an 8 x 8 grid).
GRID_IMAGES = 64


def to_grey_levels(v: np.ndarray, levels: int) -> np.ndarray:
    """Continuous samples `v ∈ [0, levels]` as integer grey levels `floor(v)` in
    `0 .. levels - 1` (the dequantisation's inverse)."""
    return np.clip(np.floor(v), 0, levels - 1).astype(np.int64)


def _predict_images(model, points, state, *, key, devices=None) -> xr.Dataset:
    """Images: the log-density (nats, grey-level units) of every row dequantised
    once, the images themselves (`image`, `[sample, row, col]`) and `GRID_IMAGES`
    samples in grey levels (`samples`, `[draw, row, col]`)."""
    levels = int(state["levels"])
    dim = points.values.shape[1]
    shape = _points.image_shape(state, dim)
    dims = ("row", "col") if shape is not None else ("pixel",)
    shape = shape or (dim,)
    v = _points.dequantise(points.values, seed=DEQUANTISE_SEED)
    data: dict[str, Any] = {
        "image": ((_points.SAMPLE_DIM, *dims),
                  points.values.reshape(-1, *shape).astype(np.int64)),
        "log_density": (_points.SAMPLE_DIM, log_prob_std(model, v, devices)),
    }  # fmt: skip
    if points.split is not None:
        data["split"] = (_points.SAMPLE_DIM, points.split.astype(str))
    drawn = to_grey_levels(draw(model, key, GRID_IMAGES, devices), levels)
    data["samples"] = (("draw", *dims), drawn.reshape(-1, *shape))
    ds = xr.Dataset(data, coords={_points.SAMPLE_DIM: np.arange(len(points))})
    ds["log_density"].attrs["units"] = (
        "nats, of the dequantised image (one draw u ~ U[0, 1) per pixel), "
        "grey-level units"
    )
    ds.attrs["levels"] = levels
    ds.attrs["columns"] = " ".join(state["channels"])
    return ds


def _plot_images(points, pred, out_dir, title):
    """`samples.png`: an 8 x 8 grid of sampled images next to one of training
    images (or of the data's rows, for new data)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    levels = int(pred.attrs["levels"])
    images = pred["image"].values
    if points.split is not None:
        images = images[points.split == "train"]
    side = math.isqrt(GRID_IMAGES)

    def mosaic(stack):
        stack = np.asarray(stack)[: side * side]
        if stack.ndim == 2:  # no 2-D shape: each image a row of pixels
            stack = stack[:, None, :]
        h, w = stack.shape[1:]
        out = np.full((side * (h + 1) - 1, side * (w + 1) - 1), np.nan)
        for i, img in enumerate(stack):
            r, c = divmod(i, side)
            out[r * (h + 1) : r * (h + 1) + h, c * (w + 1) : c * (w + 1) + w] = img
        return out

    fig, axes = plt.subplots(1, 2, figsize=(10, 5.2))
    label = "training images" if points.split is not None else "data"
    for ax, stack, name in ((axes[0], images, label),
                            (axes[1], pred["samples"].values, "samples")):  # fmt: skip
        ax.imshow(mosaic(stack), cmap="gray_r", vmin=0, vmax=levels - 1,
                  interpolation="nearest")  # fmt: skip
        ax.set_title(name)
        ax.axis("off")
    title = title.split(",")[0]
    fig.suptitle(f"{title}: samples" if title else "samples")
    return [_save(fig, out_dir, "samples.png")]


def _save(fig, out_dir, name: str) -> Path:
    """Write `fig` to `out_dir/name` (the folder made if missing) and close it."""
    import matplotlib.pyplot as plt

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / name
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)
    return path


def plot(points, pred, out_dir, *, series=None, max_series=6, title=""):
    """For 2-D data, `density.png`: the learned density (heat map) with the
    training points (or all rows, for new data) and samples over it; nothing for
    other dimensions."""
    del series, max_series
    if "samples" in pred and "levels" in pred.attrs:
        return _plot_images(points, pred, out_dir, title)
    if "density" not in pred:
        return []
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = [v for v in pred.data_vars if str(v).startswith("sample_")]
    names = [str(c)[len("sample_") :] for c in cols]
    values = points.values
    label = "data"
    if points.split is not None:
        values, label = values[points.split == "train"], "training points"
    fig, ax = plt.subplots(figsize=(6, 5.5))
    mesh = ax.pcolormesh(pred["grid_x"], pred["grid_y"], pred["density"],
                         shading="auto", cmap="viridis")  # fmt: skip
    fig.colorbar(mesh, ax=ax, label="density")
    ax.scatter(values[:, 0], values[:, 1], s=2, c="white", alpha=0.5, label=label)
    ax.scatter(pred[cols[0]], pred[cols[1]], s=2, c="C1", alpha=0.6, label="samples")
    ax.set_xlim(float(pred["grid_x"][0]), float(pred["grid_x"][-1]))
    ax.set_ylim(float(pred["grid_y"][0]), float(pred["grid_y"][-1]))
    ax.set_xlabel(names[0])
    ax.set_ylabel(names[1])
    # the generic fit says ", test" (its plots are of test series); this one shows
    # the density with the training points
    title = title.split(",")[0]
    ax.set_title(f"{title}: learned density" if title else "learned density")
    ax.legend(loc="upper right", markerscale=4, fontsize=8)
    return [_save(fig, out_dir, "density.png")]


def sample(model, state, *, key, n, out, devices=None, **options):
    """`n` samples by the reverse solve, in the data's units with its column names,
    written as CSV or netCDF by `out`'s suffix; returns them `[n, D]`. Images:
    integer grey levels `0 .. levels - 1` (the continuous sample floored).
    `devices`: the reverse solves split over them, the same samples."""
    if options:
        raise ValueError(
            f"The ffjord sample job takes no options, got {sorted(options)}."
        )
    out = _points.check_points_out(out)
    std = _points.Standardiser.from_dict(state["standardiser"])
    values = std.inverse(draw(model, key, int(n), devices))
    if state.get("levels") is not None:
        values = to_grey_levels(values, int(state["levels"]))
    _points.write_points(values, state["channels"], out,
                         attrs={"model": "ctmodels FFJORD"})  # fmt: skip
    return values


def _from_data(prepared) -> dict[str, Any]:
    return {"dim": prepared.dim}


#: The recipe for data the family has no recipe for: Adam at 3e-3 with batches of
#: 256 points, early stopping on the validation NLL (exact trace) after 15 epochs.
RECIPE = {
    "epochs": 100,
    "learning_rate": 3e-3,
    "batch_size": 256,
    "patience": 15,
    "monitor": "nll",
}

#: Per bundled dataset (2000 points by default for the 2-D toy sets). Measured with
#: the default recipe (2 cores, shared): eight_gaussians stops early at epoch 75
#: (test NLL 2.88 nats against the Gaussian's 4.25; 78 s), while pinwheel,
#: checkerboard and two_spirals were still improving after 100 epochs (2.47, 4.09,
#: 3.48 nats; Gaussian 3.67, 4.45, 3.71), so they train longer.
RECIPES: dict[str, dict[str, Any]] = {
    "old_faithful": {"batch_size": 64, "epochs": 200, "patience": 30},
    "pinwheel": {"epochs": 400, "patience": 40},
    "checkerboard": {"epochs": 400, "patience": 40},
    "two_spirals": {"epochs": 400, "patience": 40},
    # 8x8 images, grey levels 0..16 (datasets/digits.md): dequantised, logit
    # transform (alpha 0.05: logits in [-2.9, 2.9]; at 1e-6 the many blank pixels
    # spread over [-14, -3]), bits/dim of the dequantised data. 64 dimensions need
    # a wider field than the 2-D sets: width 32 reached 2.54 bits/dim in 300
    # epochs; width 128 reaches 2.18 (test, seed 0) in 500 epochs, ~15 min on 2
    # loaded cores (benchmarks/ffjord_density.py).
    # (model options under "options", the training settings beside them)
    "digits": {
        "options": {"levels": 17, "logit_alpha": 0.05, "width": 128},
        "epochs": 500,
        "patience": 50,
    },
}

FFJORD_FAMILY = Family(
    name="ffjord",
    model=FFJORD,
    title="FFJORD",
    summary="continuous normalizing flow density (Grathwohl et al. 2019) on points",
    from_data=_from_data,
    # the job's size and tolerances: a few minutes on 2 CPU cores for a 2-D toy set
    defaults={
        "width": 32,
        "depth": 2,
        "kinetic_weight": 0.01,
        "rtol": 1e-4,
        "atol": 1e-4,
    },
    recipe=RECIPE,
    recipes=RECIPES,
    fit_options={},
    data=_points,
    evaluate=evaluate,
    eval_tasks=("density",),
    metric_units="NLL in nats per sample in the data's original units (the "
    "standardisation's log-determinant counted); bits per dimension. Images "
    "(levels): NLL of the uniformly dequantised images in grey-level units (nats "
    "per image; bits per dimension), not standardised",
    calibrate=False,
    predict=predict,
    sample=sample,
    plot=plot,
)
