"""The latent-ODE jobs behind `ctmodels fit latent-ode`, `predict` and `evaluate`.

`fit_latent_ode` loads a dataset (a bundled name or a netCDF path in the layout
`ctmodels.data.from_xarray` accepts by default), splits it by series (80/10/10),
normalises with statistics of the training split only (log first for channels whose
attrs say `transform="log"`), trains a `LatentODE` with `ctmodels.train.fit`
(checkpoints in `OUT/checkpoint`) on `mixed_task` (half the steps interpolation,
half extrapolation) with the dataset's training recipe (`recipe`), then writes:

- `history.csv` (one row per epoch), `metrics.json` (test-set interpolation and
  extrapolation MSE, in normalised units, with the baselines LOCF and linear
  interpolation on the same points, timings, compilations),
- `predictions.nc`: for every series, each channel `V` as the predicted mean and `V_std`
  as the predictive standard deviation at every valid time, in original units,
  conditioned on all of that series' observations,
- `plots/series_<id>.png` for a few test series.

`predict_checkpoint` and `evaluate_checkpoint` reuse a checkpoint on new data.

Predictive spread. A trained latent ODE's own spread (posterior samples plus its fixed
observation noise, 0.01 in normalised units) is far below its error: on pbcseq its 95%
intervals held 25-40% of held-out values. The job therefore widens it with a residual
scale per channel estimated on the validation split (`calibrate_spread`: the variance
of the validation errors of both tasks that the model's spread leaves unexplained),
written next to the checkpoint (`calibration.json`) and used by every `V_std` the jobs
write (`predictions.nc`, `predict`). `metrics.json` and `evaluate` report the coverage
of the central 90% predictive interval next to the MSE. A constant scale per channel
does not grow with the forecast horizon.
"""

from __future__ import annotations

import json
import time as _time
from pathlib import Path
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import xarray as xr

from . import data as cdata
from ._integrate import resolve_adjoint
from ._outputs import check_out_dir, check_out_file, json_safe
from .models._predict import (
    _predict_grid,
    _series,
    _tasks,
    calibrate_spread,
    check_time_kind,
    in_time_units,
    predict,
    with_spread,
)

_JOB_VERSION = 1

#: The training recipe of `fit_latent_ode` when the caller leaves a setting unset:
#: Adam on the warmup-cosine schedule of `ctmodels.train.fit` with this peak
#: `learning_rate`, `epochs`, `batch_size`, and early stopping after `patience`
#: epochs without a better validation `monitor` (None: off; the best epoch is
#: restored either way). Monitoring the validation MSE instead of the loss was
#: measured on pbcseq over 6 seeds and changed nothing beyond training noise, so
#: the loss it stays. Measured with `benchmarks/latent_ode_pbcseq.py` (figures in
#: benchmarks/README.md).
DEFAULT_RECIPE: dict[str, Any] = {
    "epochs": 40,
    "learning_rate": 1e-2,
    "batch_size": 32,
    "patience": 10,
    "monitor": "loss",
}

#: Per-dataset recipes for bundled / synthetic datasets (by name) that train badly on
#: `DEFAULT_RECIPE`. The periodic toy data needs a smaller step and a long schedule:
#: at 1e-2 the latent ODE stalls at a plateau (interpolation MSE against the truth
#: 0.55 after 40 epochs, 0.96 after 200), at 2e-3 for 200 epochs it learns the
#: oscillation (0.100) and extrapolates it (0.091); early stopping would end the run
#: on that plateau.
RECIPES: dict[str, dict[str, Any]] = {
    "periodic": {
        "epochs": 200,
        "learning_rate": 2e-3,
        "batch_size": 50,
        "patience": None,
        "monitor": "loss",
    },
}


def recipe(data_name: str) -> dict[str, Any]:
    """The training recipe for the bundled dataset `data_name`: its entry of
    `RECIPES` over `DEFAULT_RECIPE` (a setting an entry leaves out is the default's;
    data from a file gets the default); a new dict."""
    return {**DEFAULT_RECIPE, **RECIPES.get(str(data_name), {})}


def _resolve_recipe(data, *, epochs, learning_rate, batch_size, patience):
    """The training plan of `fit_latent_ode`: the recipe of the bundled dataset
    `data` (`DEFAULT_RECIPE` for a file, whatever its name) with the settings the
    caller gave over it. Checks them before any work is done."""
    from ._errors import is_int as _is_int

    plan = dict(DEFAULT_RECIPE) if _is_file(data) else recipe(str(data))
    given = {"epochs": epochs, "learning_rate": learning_rate, "batch_size": batch_size}
    plan.update({k: v for k, v in given.items() if v is not None})
    if not (isinstance(patience, str) and patience == FROM_RECIPE):
        plan["patience"] = patience
    for name in ("epochs", "batch_size"):
        v = plan[name]
        if not _is_int(v) or v < 1:
            raise ValueError(f"{name} must be an int >= 1, got {v!r}.")
    lr = plan["learning_rate"]
    if isinstance(lr, bool) or not isinstance(lr, int | float) or not lr > 0:
        raise ValueError(f"learning_rate must be a number > 0, got {lr!r}.")
    p = plan["patience"]
    if p is not None and (not _is_int(p) or p < 0):
        raise ValueError(
            f"patience must be None or an int >= 0 (0 or None: no early stopping), "
            f"got {p!r}."
        )
    plan["patience"] = p or None
    return plan


#: Posterior samples behind the predictive means that metrics score (`metrics.json`,
#: `evaluate`): the mean of a few samples adds their spread / K to the MSE.
EVAL_SAMPLES = 32

#: Marks a `fit_latent_ode` setting left to the dataset's recipe.
FROM_RECIPE: Any = "recipe"


def _is_file(data: str | Path) -> bool:
    """Whether `_open` reads `data` from a file (else it is a dataset name)."""
    path = Path(str(data))
    return path.suffix in (".nc", ".nc4", ".netcdf") or path.exists()


def _open(data: str | Path) -> tuple[xr.Dataset, str]:
    from . import datasets

    path = Path(str(data))
    if _is_file(data):
        if not path.exists():
            raise FileNotFoundError(f"Data file {str(path)!r} does not exist.")
        if path.suffix.lower() in (".csv", ".tsv", ".parquet", ".xlsx"):
            raise ValueError(
                f"--data {str(path)!r}: the jobs read netCDF (.nc) or zarr. For a "
                "table, build the series with ctmodels.data.from_pandas(df, id=..., "
                "time=...) and save ctmodels.data.to_xarray(ts).to_netcdf('x.nc')."
            )
        if path.is_dir():
            zarr_marks = (".zgroup", ".zattrs", "zarr.json")
            if path.suffix != ".zarr" and not any(
                (path / m).exists() for m in zarr_marks
            ):
                raise ValueError(
                    f"--data {str(path)!r} is a directory but not a zarr store; give "
                    "a netCDF file, a zarr store or a bundled dataset name."
                )
            return xr.open_zarr(path), path.stem
        return xr.load_dataset(path), path.stem
    return datasets.load(str(data)), str(data)


def _log_channels(ds: xr.Dataset, channels) -> list[str]:
    return [c for c in channels if ds[c].attrs.get("transform") == "log"]


def _batches(ts, batch_size, layout="union"):
    return cdata.batches(ts, batch_size, layout=layout)


def _baseline_mse(ts, ctx, tgt):
    """LOCF and linear interpolation from the context points, per channel."""
    from .models import LOCF, LinearInterpolation

    out = {}
    for name, cls in (("locf", LOCF), ("linear_interpolation", LinearInterpolation)):
        model = cls(ts.num_channels)
        mean = np.full(ts.values.shape, np.nan)
        for batch in _batches(ts, 64, layout="padded"):
            idx = np.asarray(batch.index)
            pos = np.asarray(batch.position)
            b, t = np.nonzero((pos >= 0) & (idx >= 0)[:, None])
            m = np.zeros(batch.mask.shape, bool)
            g = np.zeros(batch.mask.shape, bool)
            m[b, t] = ctx[idx[b], pos[b, t]]
            g[b, t] = tgt[idx[b], pos[b, t]]
            batch = eqx.tree_at(
                lambda x: (x.mask, x.target_mask),
                batch,
                (jnp.asarray(m), jnp.asarray(g)),
            )
            mu, _ = model.predict(batch, key=jax.random.key(0))
            cdata.unbatch(batch, np.asarray(mu), mean)
        out[name] = _mse(mean, ts.values, tgt)
    return out


def _mse(pred, truth, mask) -> float:
    n = int(mask.sum())
    if n == 0:
        return float("nan")
    return float(((pred - truth) ** 2)[mask].sum() / n)


CALIBRATION = "calibration.json"


def _coverage(mean, std, truth, mask, level: float = 0.9) -> float:
    """Fraction of the `mask`ed values inside the central `level` Gaussian predictive
    interval `mean +- z * std`."""
    from statistics import NormalDist

    z = NormalDist().inv_cdf(0.5 + level / 2)
    inside = np.abs(np.nan_to_num(truth) - mean) <= z * std
    return float(inside[mask].mean()) if mask.any() else float("nan")


def mixed_task(batch, *, key, fraction: float = 0.5, split: float = 0.5):
    """The job's training task: with probability 1/2 each, an interpolation context
    (a random `fraction` of the observed values hidden) or an extrapolation context
    (the values in the first `split` of each series' time span); the target is every
    observed value. Trained on interpolation alone, a model never sees a long
    stretch without observations, which extrapolation asks of it. (Scoring only the
    values after the cut in the extrapolation draws was measured too: every model's
    extrapolation MSE on pbcseq fell by about 0.01, the latent ODE's interpolation
    MSE rose by 0.03; see benchmarks/README.md.) jit-safe."""
    k_interp, k_pick = jax.random.split(key)
    a = cdata.interpolation_task(batch, key=k_interp, fraction=fraction, score="all")
    b = cdata.extrapolation_task(batch, split=split)
    mask = jnp.where(jax.random.bernoulli(k_pick), a.mask, b.mask)
    return eqx.tree_at(lambda x: (x.mask, x.target_mask), batch, (mask, batch.mask))


def _evaluate(model, ts_n, *, seed, n_samples, batch_size, fraction=0.5, split=0.5,
              tasks=("interpolation", "extrapolation"), baselines=True,
              scale=None):  # fmt: skip
    metrics: dict[str, Any] = {}
    all_tasks = _tasks(fraction, split)
    for name in tasks:
        mean, std, ctx, tgt = _predict_grid(
            model,
            ts_n,
            key=jax.random.key(seed + 1000),
            n_samples=n_samples,
            batch_size=batch_size,
            task=all_tasks[name],
        )
        std = with_spread(model, std, scale)
        entry = {
            "mse": _mse(mean, ts_n.values, tgt),
            "coverage_90": _coverage(mean, std, ts_n.values, tgt),
            "points": int(tgt.sum()),
            "per_channel": {
                ch: _mse(mean[..., c], ts_n.values[..., c], tgt[..., c])
                for c, ch in enumerate(ts_n.channels)
            },
        }
        if baselines:
            entry["baselines"] = _baseline_mse(ts_n, ctx, tgt)
        if not tgt.any():
            entry["note"] = (
                f"no points to score: no series here has enough observations for "
                f"the {name} task, so the MSE and coverage are null"
            )
        metrics[name] = entry
    return metrics


def fit_latent_ode(
    data: str | Path = "pbcseq",
    out: str | Path = "runs/latent_ode",
    *,
    epochs: int | None = None,
    seed: int = 0,
    batch_size: int | None = None,
    latent_size: int = 8,
    encoder_size: int = 24,
    units: int = 64,
    solver: str = "dopri5",
    adjoint: str = "checkpoint",
    anchor: str = "first",
    learning_rate: float | None = None,
    n_samples: int = 3,
    patience: int | None | str = FROM_RECIPE,
    progress: bool | None = None,
    max_plots: int = 6,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Fit a latent ODE end to end and write the outputs listed in the module doc.

    `epochs`, `batch_size`, `learning_rate` left as None and `patience` left as
    `FROM_RECIPE` take the dataset's training recipe (`recipe(name)`: `RECIPES` for
    the datasets that need their own, else `DEFAULT_RECIPE`: 40 epochs, batch 32,
    peak learning rate 1e-2, patience 10, early stopping and the restored epoch on
    the validation loss: `monitor`); `patience=None` or 0 turns early stopping off.
    A file gets `DEFAULT_RECIPE` whatever its name.
    `anchor` is `LatentODE`'s (`"first"`: the paper's model; `"last"`: the latent
    state at each series' last context observation).
    The recipe used is recorded in `metrics.json` (`"recipe"`).
    A run already in `out` is resumed when the settings match (after a kill: the
    same result as an uninterrupted run) and refused when they differ;
    `overwrite=True` (`--overwrite`) starts afresh there instead.

    Returns the metrics dict (also written to `OUT/metrics.json`).
    """
    from .models import LatentODE
    from .train import fit
    from .train._fit import ResumeRefused

    t_start = _time.perf_counter()
    plan = _resolve_recipe(
        data, epochs=epochs, learning_rate=learning_rate, batch_size=batch_size,
        patience=patience,
    )  # fmt: skip
    out = check_out_dir(out)
    resolve_adjoint(adjoint, "integrate")  # before anything is written
    ds, data_name = _open(data)
    epochs, learning_rate = plan["epochs"], plan["learning_rate"]
    batch_size, patience = plan["batch_size"], plan["patience"]
    ts = cdata.from_xarray(ds, static=[])
    if isinstance(ts, cdata.LazyTimeSeries):
        ts = ts.load()
    train, valid, test = cdata.split_series(ts, (0.8, 0.1, 0.1), seed=seed)
    norm = cdata.Normalizer.fit(
        train, log=_log_channels(ds, ts.channels), time_scale="span"
    )
    train_n, valid_n, test_n = map(norm.transform, (train, valid, test))
    hyper = dict(
        latent_size=latent_size,
        encoder_size=encoder_size,
        units=units,
        solver=solver,
        adjoint=adjoint,
        anchor=anchor,
    )
    model = LatentODE(ts.num_channels, **hyper, key=jax.random.key(seed))
    task = mixed_task
    # only now (the data and the settings passed their checks): no empty output
    # directory is left behind by a run that could not start
    out.mkdir(parents=True, exist_ok=True)
    # a calibration.json from an earlier run here names the checkpoint it was made
    # for; once this run writes a checkpoint it no longer matches, and predictions
    # use the model's own spread until this run calibrates (`_read_calibration`)
    _stamp_legacy_calibration(out / "checkpoint")
    extra = {
        "job": "latent-ode",
        "job_version": _JOB_VERSION,
        "data": str(data),
        "channels": list(ts.channels),
        "time_units": ts.meta.time_units,
        "normalizer": norm.to_dict(),
        "n_samples": n_samples,
        "split_seed": seed,
        "batch_size": batch_size,
    }
    try:
        model, history = fit(
            model,
            train_n,
            valid=valid_n,
            epochs=epochs,
            batch_size=batch_size,
            key=jax.random.key(seed + 1),
            learning_rate=learning_rate,
            task=task,
            eval_task=task,
            layout="union",
            checkpoint_dir=out / "checkpoint",
            patience=patience,
            monitor=plan["monitor"],
            progress=progress,
            extra_state=extra,
            loss_kwargs={"n_samples": n_samples},
            resume=not overwrite,
        )
    except ResumeRefused as err:
        raise ValueError(_cli_words(err, out)) from None
    history.to_csv(out / "history.csv", index=False)
    t_fit = _time.perf_counter() - t_start
    scale = calibrate_spread(
        model, valid_n, key=jax.random.key(seed + 3000), n_samples=EVAL_SAMPLES,
        batch_size=batch_size,
    )  # fmt: skip
    calibration = {
        "residual_std": dict(zip(ts.channels, scale, strict=True)),
        "units": "normalised (train-split statistics)",
        "estimated_on": "validation split, interpolation and extrapolation tasks",
    }
    calibration["checkpoint_sha256"] = _fingerprint(out / "checkpoint")
    _write_json(out / "checkpoint" / CALIBRATION, calibration)
    metrics = {
        "data": data_name,
        "model": "LatentODE",
        "channels": list(ts.channels),
        "ignored_variables": _ignored_variables(ds, ts),
        "hyperparameters": dict(model.hyperparameters),
        "series": {"train": len(train), "valid": len(valid), "test": len(test)},
        "recipe": plan,
        "epochs_run": int(len(history)),
        "test": _evaluate(
            model,
            test_n,
            seed=seed,
            n_samples=EVAL_SAMPLES,
            batch_size=batch_size,
            scale=scale,
        ),  # fmt: skip
        "calibration": calibration,
        "units": "MSE in normalised units (train-split statistics)",
        "fit_seconds": round(t_fit, 1),
        "compilations": history.attrs.get("compilations"),
    }
    # predictions for every series, conditioned on all its observations
    pred = predict(
        model, ts, key=jax.random.key(seed + 2), n_samples=EVAL_SAMPLES,
        normalizer=norm, spread=scale, batch_size=batch_size,
    )  # fmt: skip
    pred.attrs.update(
        {"model": "ctmodels LatentODE", "conditioned_on": "all observed values"}
    )
    pred.to_netcdf(out / "predictions.nc")
    from ._plot import plot_series

    observed = cdata.to_xarray(ts)
    test_ids = list(test.meta.series_ids[:max_plots])
    plot_series(
        observed, pred, out / "plots", series=test_ids, title="latent ODE, test"
    )
    metrics["total_seconds"] = round(_time.perf_counter() - t_start, 1)
    _write_json(out / "metrics.json", metrics)
    return metrics


def _cli_words(err, out: Path) -> str:
    """`fit`'s refusal to resume (`ResumeRefused`), in the job's (and CLI's) terms."""
    diffs = "".join(f"\n  - {d}" for d in err.diffs)
    if any(d.startswith("schedule_steps") for d in err.diffs):
        diffs += (
            "\n(schedule_steps is the number of training steps: --epochs times the "
            "batches per epoch.)"
        )
    again = "Rerun with that run's options to resume it, g" if err.diffs else "G"
    return (
        f"--out {str(out)!r} holds {err.reason}, so it cannot be resumed"
        f"{':' if diffs else '.'}{diffs}\n{again}ive another --out, or pass "
        "--overwrite (overwrite=True) to start afresh there, replacing it."
    )


def _stamp_legacy_calibration(checkpoint: Path) -> None:
    """A calibration.json written before it named its checkpoint describes the
    checkpoint next to it (the job deleted it whenever a run started there): name
    that one now, so a run that changes the checkpoint makes it stale, as for a
    current one; without a checkpoint it describes nothing and is removed."""
    path = checkpoint / CALIBRATION
    if not path.is_file():
        return
    try:
        stored = json.loads(path.read_text())
    except ValueError:
        return  # damaged: reading it says so
    if not isinstance(stored, dict) or "checkpoint_sha256" in stored:
        return
    made_for = _fingerprint(checkpoint)
    if made_for is None:
        path.unlink()
    else:
        _write_json(path, {**stored, "checkpoint_sha256": made_for})


def _fingerprint(checkpoint: Path) -> str | None:
    """The SHA-256 of the checkpoint header at `checkpoint` (None if there is none):
    it changes with every save, so it names one checkpoint exactly."""
    import hashlib

    from .train._checkpoint import HEADER, resolve_checkpoint

    where = resolve_checkpoint(checkpoint)
    if where is None:
        return None
    return hashlib.sha256((where / HEADER).read_bytes()).hexdigest()


def _ignored_variables(ds: xr.Dataset, ts) -> dict[str, str]:
    """The data variables of `ds` that are not channels of `ts`, and why (the
    job models only numeric variables on the series' observation dims)."""
    used = set(ts.channels) | {ts.meta.time_name}
    dims = (ts.meta.series_dim, ts.meta.obs_dim)
    out = {}
    for name, var in ds.data_vars.items():
        if name in used:
            continue
        role = var.attrs.get("role")
        if var.dims == (dims[0],):
            out[str(name)] = "one value per series (the job models only channels)"
        elif set(var.dims) != set(dims):
            out[str(name)] = f"dims {tuple(map(str, var.dims))}, not {dims}"
        elif not (np.issubdtype(var.dtype, np.number) or var.dtype == bool):
            out[str(name)] = f"dtype {var.dtype} is not numeric"
        elif role is not None and role != "channel":
            out[str(name)] = f"role {role!r}, not 'channel'"
        else:
            out[str(name)] = "not read as a channel"
    return out


def _write_json(path: Path, obj) -> None:
    """Write `obj` as strict JSON atomically (a reader sees the old file or the new
    one); NaN (no points to score) is written as null."""
    from .train._checkpoint import write_text_atomic

    text = json.dumps(json_safe(obj), indent=1, default=_json, allow_nan=False)
    write_text_atomic(path, text)


def _json(x):
    if isinstance(x, (np.integer, np.floating)):
        return x.item()
    if isinstance(x, np.ndarray):
        return x.tolist()
    return str(x)


def _load(checkpoint: str | Path):
    from .train import load_checkpoint

    model, meta = load_checkpoint(Path(checkpoint))
    extra = dict(meta.get("extra_state") or {})
    if extra.get("job") != "latent-ode":
        raise ValueError(
            f"{checkpoint} is not a latent-ode checkpoint (written by `ctmodels fit "
            "latent-ode`)."
        )
    extra["scale"] = _read_calibration(Path(checkpoint), extra["channels"])
    return model, cdata.Normalizer.from_dict(extra["normalizer"]), extra


def _read_calibration(checkpoint: Path, channels) -> list[float] | None:
    """The residual std per channel that `fit_latent_ode` wrote next to the
    checkpoint (None for a checkpoint without one: the model's own spread)."""
    for path in (checkpoint / CALIBRATION, checkpoint.parent / CALIBRATION):
        if path.is_file():
            try:
                stored = json.loads(path.read_text())
                scale = [stored["residual_std"][c] for c in channels]
                nulls = [c for c, v in zip(channels, scale, strict=True) if v is None]
                if nulls:  # NaN is written as null
                    raise ValueError(
                        f"no finite residual std for channel(s) {nulls}: the "
                        "model's validation predictions were not finite"
                    )
                scale = [float(v) for v in scale]
            except (ValueError, KeyError, TypeError) as e:
                raise ValueError(
                    f"{path} is damaged or does not match the checkpoint's channels "
                    f"{list(channels)} ({type(e).__name__}: {e}); delete it to use "
                    "the model's own (uncalibrated) predictive spread."
                ) from e
            made_for = stored.get("checkpoint_sha256")  # absent: written before 0.1
            if made_for is not None and made_for != _fingerprint(path.parent):
                import warnings

                warnings.warn(
                    f"{path} was made for an earlier checkpoint than the one in "
                    f"{str(path.parent)!r} (training went on after it, or a new run "
                    "started there and has not finished), so it is not used: "
                    "predictive spreads are the model's own, which are far too "
                    "narrow. Finish the run (rerun `ctmodels fit` with its options) "
                    "to calibrate it.",
                    stacklevel=2,
                )
                return None
            return scale
    return None


def _resolve_checkpoint(path: str | Path) -> Path:
    path = Path(path)
    if (path / "checkpoint").is_dir():
        path = path / "checkpoint"
    if not path.exists():
        raise FileNotFoundError(f"Checkpoint {str(path)!r} does not exist.")
    return path


def _load_with_data(checkpoint, data):
    """A checkpoint's model, normaliser and job state, and the series of `data` (a
    bundled name or a file) on its channels, their time kind checked against it."""
    model, norm, extra = _load(_resolve_checkpoint(checkpoint))
    ts = _series(_open(data)[0], norm)
    check_time_kind(ts, extra.get("time_units"))
    return model, norm, extra, ts


def predict_checkpoint(
    checkpoint: str | Path,
    data: str | Path,
    out: str | Path,
    *,
    n_samples: int = 16,
    seed: int = 0,
    plots: str | Path | None = None,
    max_plots: int = 6,
) -> xr.Dataset:
    """Condition on the observed values of `data` and write predictions at every
    position with a valid time to `out` (netCDF, same dims and coordinates)."""
    out = check_out_file(out, "--out", example="predictions.nc")
    if plots is not None:
        check_out_dir(plots, "--plots")
    model, norm, extra, ts = _load_with_data(checkpoint, data)
    pred = predict(
        model, ts, key=jax.random.key(seed), n_samples=n_samples, normalizer=norm,
        spread=extra["scale"], time_units=extra.get("time_units"),
        batch_size=int(extra.get("batch_size", 32)),
    )  # fmt: skip
    pred.attrs.update({"model": "ctmodels LatentODE", "checkpoint": str(checkpoint)})
    pred.attrs["spread"] = (
        "calibrated on the validation split (calibration.json)"
        if extra["scale"] is not None
        else "the model's own (no calibration.json for this checkpoint)"
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    try:
        pred.to_netcdf(tmp)
        tmp.replace(out)
    finally:
        tmp.unlink(missing_ok=True)
    if plots is not None:
        from ._plot import plot_series

        plot_series(
            cdata.to_xarray(ts), pred, plots, max_series=max_plots, title="latent ODE"
        )
    return pred


def evaluate_checkpoint(
    checkpoint: str | Path,
    data: str | Path,
    *,
    task: str = "both",
    out: str | Path | None = None,
    seed: int = 0,
    n_samples: int = EVAL_SAMPLES,
    fraction: float = 0.5,
    split: float = 0.5,
) -> dict[str, Any]:
    """Interpolation / extrapolation MSE (normalised units) of a checkpoint on `data`,
    with LOCF and linear-interpolation baselines on the same points."""
    if task not in ("interpolation", "extrapolation", "both"):
        raise ValueError(
            f"task must be interpolation, extrapolation or both, got {task!r}."
        )
    if out is not None:
        out = check_out_file(out, "--out", example="metrics.json")
    model, norm, extra, ts = _load_with_data(checkpoint, data)
    tasks = ("interpolation", "extrapolation") if task == "both" else (task,)
    ts_n = norm.transform(in_time_units(ts, extra.get("time_units")))
    metrics = _evaluate(
        model, ts_n, seed=seed, n_samples=n_samples,
        batch_size=int(extra.get("batch_size", 32)), fraction=fraction, split=split,
        tasks=tasks, scale=extra["scale"],
    )  # fmt: skip
    metrics = {"data": str(data), "checkpoint": str(checkpoint), **metrics}
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        _write_json(out, metrics)
    return metrics
