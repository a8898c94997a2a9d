"""The generic jobs: `fit`, `predict`, `evaluate` and `sample` for any registered
family (`ctmodels fit FAMILY`, `ctmodels predict|evaluate|sample --checkpoint DIR`).

`fit` opens the data (a bundled name or a file), splits it by series (80/10/10),
normalises with statistics of the training split only, builds the family's model
from the data and its options, trains it with `ctmodels.train.fit` (checkpoints in
`OUT/checkpoint`, resumed when the settings match, refused when they differ) with
the recipe for the data (`Family.recipe_for`), then writes:

- `history.csv` (one row per epoch) and `metrics.json` (test-set metrics of the
  family's evaluation tasks in normalised units, with baselines on the same points,
  the recipe, timings, compilations),
- `checkpoint/calibration.json` (for families that calibrate: a residual std per
  channel estimated on the validation split, which every predictive std the jobs
  write includes; see `ctmodels.models.calibrate_spread`),
- `predictions.nc` (the family's `predict` on every series, conditioned on all of
  its observations) and `plots/` (the family's `plot`, a few test series).
"""

from __future__ import annotations

import inspect
import math
import time as _time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax

from .. import train as _train
from .._errors import is_int
from .._integrate import resolve_adjoint
from .._outputs import check_out_dir, check_out_file
from ..models import Fitted, calibrate_spread
from ._family import Family, get_family
from ._files import (
    load_job_checkpoint,
    stamp_legacy_calibration,
    write_calibration,
    write_json,
)
from ._series import EVAL_SAMPLES

#: The version of the job state a checkpoint records.
JOB_VERSION = 1

#: Marks a `fit` setting left to the recipe.
FROM_RECIPE: Any = "recipe"


def resolve_recipe(family, data, *, epochs=None, learning_rate=None, batch_size=None,
                   patience=FROM_RECIPE, n_train=None) -> dict[str, Any]:  # fmt: skip
    """The training plan of `fit`: the family's recipe for `data` with the settings
    the caller gave over it, and, given `n_train` (the number of training series or
    examples), the recipe's step budget applied (`budget`). Checks the settings
    before any work is done (`fit` calls it once without `n_train`, before reading
    the data, and once with it)."""
    from .._errors import is_int as _is_int

    plan = get_family(family).recipe_for(data)
    given = {"epochs": epochs, "learning_rate": learning_rate, "batch_size": batch_size}
    plan.update({k: v for k, v in given.items() if v is not None})
    patience_given = not (isinstance(patience, str) and patience == FROM_RECIPE)
    if patience_given:
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
    _check_budget(plan)
    if n_train is not None:
        plan = budget(plan, n_train, epochs_given=epochs is not None,
                      patience_given=patience_given)  # fmt: skip
    elif not patience_given:
        plan["patience"] = _scaled_patience(plan)
    return plan


def budget(recipe, n_train: int, *, epochs_given: bool = False,
           patience_given: bool = False) -> dict[str, Any]:  # fmt: skip
    """The recipe's step budget for `n_train` training series (or examples): a new
    plan with its `epochs` and `patience` as they will run. Pure arithmetic.

    With `steps_per_epoch = ceil(n_train / batch_size)` (the batches `fit` makes):

    - `epochs = max(epochs, ceil(min_steps / steps_per_epoch))`: small data gets
      more epochs, so that every run takes at least `min_steps` optimiser steps;
    - then, if that is more than `max_steps` steps, `epochs = max(1, max_steps //
      steps_per_epoch)`: huge data gets fewer epochs than the recipe's `epochs`;
    - `patience = max(patience, ceil(patience_fraction * epochs))`: early stopping
      waits the same share of a longer run (None stays None: no early stopping).

    A setting that is missing or None is not applied (a per-dataset recipe without
    them runs as written); `epochs_given` / `patience_given` (the caller set them)
    keep those as they are.

    **Arguments:**

    - `recipe`: a recipe (`DEFAULT_RECIPE`'s keys).
    - `n_train`: the number of training series (or rows).
    - `epochs_given`, `patience_given`: whether the caller fixed them.

    **Returns:** a new dict: the recipe with the `epochs` and `patience` to run.
    """
    from .._errors import is_int as _is_int

    if not _is_int(n_train) or n_train < 1:
        raise ValueError(f"n_train must be an int >= 1, got {n_train!r}.")
    plan = dict(recipe)
    _check_budget(plan)
    per_epoch = -(-int(n_train) // int(plan["batch_size"]))
    if not epochs_given:
        lo, hi = plan.get("min_steps"), plan.get("max_steps")
        if lo is not None:
            plan["epochs"] = max(plan["epochs"], -(-lo // per_epoch))
        if hi is not None and plan["epochs"] * per_epoch > hi:
            plan["epochs"] = max(1, hi // per_epoch)
    if not patience_given:
        plan["patience"] = _scaled_patience(plan)
    return plan


def _scaled_patience(plan) -> int | None:
    p, frac = plan.get("patience"), plan.get("patience_fraction")
    if p is None or frac is None:
        return p
    return max(p, math.ceil(frac * plan["epochs"]))


def _check_budget(plan) -> None:
    from .._errors import is_int as _is_int

    for name in ("min_steps", "max_steps"):
        v = plan.get(name)
        if v is not None and (not _is_int(v) or v < 1):
            raise ValueError(f"A recipe's {name} must be None or an int >= 1, got "
                             f"{v!r}.")  # fmt: skip
    lo, hi = plan.get("min_steps"), plan.get("max_steps")
    if lo is not None and hi is not None and lo > hi:
        raise ValueError(f"A recipe's min_steps ({lo}) must not exceed its max_steps "
                         f"({hi}).")  # fmt: skip
    frac = plan.get("patience_fraction")
    if frac is not None and (
        isinstance(frac, bool)
        or not isinstance(frac, int | float)
        or not 0 <= frac <= 1
    ):
        raise ValueError(
            f"A recipe's patience_fraction must be None or a number in [0, 1], got "
            f"{frac!r}."
        )


def _num_examples(data) -> int:
    """How many series (or rows) `fit` batches from `data`."""
    try:
        return len(data)
    except TypeError:
        return int(jax.tree.leaves(data)[0].shape[0])


def _check_options(model_kw: dict[str, Any]) -> None:
    """Checks that need no data, made before anything is read or written."""
    if isinstance(model_kw.get("adjoint"), str):
        resolve_adjoint(model_kw["adjoint"], "integrate")


def _check_devices(devices: int | str | None, batch_size: int, given: bool) -> None:
    """`--devices` against this machine and the batch size (the recipe's, unless
    given), in the CLI's words, before anything is read or written
    (`ctmodels.train.fit` checks the same in its own)."""
    if jax.process_count() > 1 and devices != "all":
        raise ValueError(
            f"This is a distributed run of {jax.process_count()} processes "
            "(--coordinator): train over every process's devices with --devices "
            f"all, not --devices {devices}."
        )
    if devices is None:
        return
    if devices == "all":  # every device of every process (jax.distributed)
        count = jax.device_count()
        _check_divides(f"--devices all ({count} devices)", count, batch_size, given)
        return
    if not is_int(devices) or devices < 1:
        raise ValueError(
            f"devices (--devices) must be an int >= 1 or 'all', got {devices!r}."
        )
    have = jax.local_device_count()
    if devices > have:
        raise ValueError(
            f"--devices {devices}: this machine has {have} {jax.default_backend()} "
            f"device{'s' * (have != 1)}. Pass --devices {have} or fewer (on CPU, "
            f"XLA_FLAGS=--xla_force_host_platform_device_count={devices} simulates "
            "more, sharing the cores)."
        )
    _check_divides(f"--devices {devices}", devices, batch_size, given,
                   or_else=", or fewer devices")  # fmt: skip


def _check_divides(
    what: str, count: int, batch_size: int, given: bool, or_else: str = ""
) -> None:
    """A batch size that does not split evenly over `count` devices, refused in the
    CLI's words (`what`: how the devices were asked for)."""
    if batch_size % count:
        whose = "--batch-size" if given else "the recipe's batch size"
        good = -(-batch_size // count) * count
        raise ValueError(
            f"{what} does not divide {whose} {batch_size}: every batch is split "
            f"evenly over the devices. Pass --batch-size {good} (a multiple of "
            f"{count}){or_else}."
        )


def _check_inference_devices(devices: int | None) -> None:
    """`--devices` of `predict`, `evaluate` and `sample` against this machine, in
    the CLI's words, before anything is read or written. Inference pads what does
    not divide, so any count up to the machine's works."""
    if devices is not None:
        _check_devices(devices, batch_size=int(devices) if is_int(devices) else 1,
                       given=True)  # fmt: skip


def _accepts_devices(hook) -> bool:
    """Whether a family hook takes `devices=` (by name: a hook's `**kwargs` may be
    options of its own)."""
    try:
        return "devices" in inspect.signature(hook).parameters
    except (TypeError, ValueError):
        return False


def _devices_kw(fam: Family, hook, what: str, devices) -> dict[str, Any]:
    """`{"devices": devices}` for a family hook that takes them (nothing for None);
    a hook that does not is refused with what to do."""
    if devices is None:
        return {}
    if not _accepts_devices(hook):
        raise ValueError(
            f"The {fam.name} family's {what} does not take devices (its hook has no "
            "`devices` argument), so it runs on one device: leave out --devices "
            "(devices=None)."
        )
    return {"devices": devices}


def fit(
    family: str | Family,
    data: str | Path,
    out: str | Path,
    *,
    seed: int = 0,
    epochs: int | None = None,
    learning_rate: float | None = None,
    batch_size: int | None = None,
    patience: int | None | str = FROM_RECIPE,
    progress: bool | None = None,
    max_plots: int = 6,
    overwrite: bool = False,
    channels: Sequence[str] | str | None = None,
    max_series: int | None = None,
    devices: int | str | None = None,
    **options: Any,
) -> dict[str, Any]:
    """Fit a model of `family` to `data` end to end and write the outputs listed in
    the module doc into `out`.

    **Arguments:**

    - `family`: a registered family's name (`ctmodels.jobs.families()`) or a
      `Family`.
    - `data`: a bundled dataset name or a netCDF file / zarr store.
    - `out`: the output directory. A run already there is resumed when the settings
      match (after a kill: the same result as an uninterrupted run) and refused when
      they differ; `overwrite=True` (`--overwrite`) starts afresh there instead.
    - `epochs`, `learning_rate`, `batch_size` left as None and `patience` left as
      `FROM_RECIPE` take the recipe for `data` (`Family.recipe_for`), whose step
      budget sets the epochs and patience from the number of training series
      (`budget`; `metrics.json`'s `recipe` records them); `patience=None` or 0
      turns early stopping off.
    - `seed`: the split, the initialisation and the training draws.
    - `progress`: the progress bar (None: when the output is a terminal).
    - `max_plots`: test series plotted.
    - `channels`: the variables to model (names, or one comma-separated string;
      None: every channel of the data); `max_series`: train on a random subset of
      that many series.
    - `devices`: train data-parallel on this many local devices
      (`ctmodels.train.fit(devices=...)`; `--devices`); None: one; `"all"`: every
      device of every process (`jax.devices()`: with `jax.distributed`, one model
      over every host's devices, `--coordinator`). The batch size must be a
      multiple of the count. `metrics.json` records it; a run resumes on any number
      of devices. In a distributed run only process 0 evaluates and writes `out`
      (the others train with it and return a short summary); `out` must be a
      folder every process sees (to resume).
    - `**options`: the family's options (`Family.options`: its model constructor's
      keyword arguments and the loss options it exposes); unset ones take the
      recipe's for `data` where it sets some (its `"options"` entry; digits:
      `levels`), else the family's defaults.

    **Returns:** the metrics dict (also written to `OUT/metrics.json`).
    """
    family = get_family(family)
    t_start = _time.perf_counter()
    plan = resolve_recipe(
        family, data, epochs=epochs, learning_rate=learning_rate,
        batch_size=batch_size, patience=patience,
    )  # fmt: skip
    # a dataset's recipe may set model options too, under "options" (digits:
    # `levels`); the caller's options win
    recipe_options = dict(plan.get("options") or {})
    model_kw, loss_kw = family.resolve_options({**recipe_options, **options})
    out = check_out_dir(out)
    _check_options(model_kw)  # before anything is written
    _check_devices(devices, plan["batch_size"], given=batch_size is not None)
    if isinstance(channels, str):
        channels = [c.strip() for c in channels.split(",") if c.strip()]
    data_kw = {k: v for k, v in (("channels", channels), ("max_series", max_series))
               if v is not None}  # fmt: skip
    if "batch_size" in inspect.signature(family.data.prepare).parameters:
        # a family whose data can be too small for one batch refuses it up front
        data_kw["batch_size"] = plan["batch_size"]
    if "model_options" in inspect.signature(family.data.prepare).parameters:
        # data whose reading depends on the model (images: `levels`)
        data_kw["model_options"] = model_kw
    prepared = family.data.prepare(data, seed=seed, **data_kw)
    # the recipe's step budget, now that the training split's size is known
    plan = resolve_recipe(
        family, data, epochs=epochs, learning_rate=learning_rate,
        batch_size=batch_size, patience=patience,
        n_train=_num_examples(prepared.train_n),
    )  # fmt: skip
    batch_size = plan["batch_size"]
    model = family.model(
        **family.from_data(prepared), **model_kw, key=jax.random.key(seed)
    )
    # only now (the data and the settings passed their checks): no empty output
    # directory is left behind by a run that could not start
    writer = jax.process_index() == 0  # a distributed run writes `out` once
    if writer:
        out.mkdir(parents=True, exist_ok=True)
        # a calibration.json from an earlier run here names the checkpoint it was
        # made for; once this run writes a checkpoint it no longer matches, and
        # predictions use the model's own spread until this run calibrates
        # (`read_calibration`)
        stamp_legacy_calibration(out / "checkpoint")
    fit_devices = devices
    if devices == "all":
        fit_devices = jax.devices() if jax.device_count() > 1 else None
    n_devices = (
        1 if devices is None else jax.device_count() if devices == "all" else devices
    )
    extra = {
        "job": family.name,
        "job_version": JOB_VERSION,
        "data": str(data),
        **prepared.state,
        **loss_kw,
        "split_seed": seed,
        "batch_size": batch_size,
    }
    task_kw = {} if family.task is None else {"task": family.task,
                                                "eval_task": family.task}  # fmt: skip
    try:
        model, history = _train.fit(
            model,
            prepared.train_n,
            valid=prepared.valid_n,
            epochs=plan["epochs"],
            batch_size=batch_size,
            key=jax.random.key(seed + 1),
            learning_rate=plan["learning_rate"],
            **task_kw,
            **family.fit_options,
            checkpoint_dir=out / "checkpoint",
            patience=plan["patience"],
            monitor=plan["monitor"],
            progress=progress,
            extra_state=extra,
            loss_kwargs=loss_kw,
            resume=not overwrite,
            devices=fit_devices,
        )
    except _train.ResumeRefused as err:
        raise ValueError(_cli_words(err, out)) from None
    t_fit = _time.perf_counter() - t_start
    if not writer:  # process 0 evaluates and writes
        return {"process": jax.process_index(), "epochs_run": int(len(history)),
                "fit_seconds": round(t_fit, 1), "devices": n_devices}  # fmt: skip
    history.to_csv(out / "history.csv", index=False)
    scale, calibration = None, None
    # the evaluations and predictions run on the training devices too, where the
    # family's hooks take them (a hook without `devices` runs on one device); after
    # a distributed run ("all"), process 0 evaluates on its own devices
    if devices == "all":
        devices = jax.local_device_count() if jax.local_device_count() > 1 else None
    if family.calibrate:
        scale = calibrate_spread(
            model, prepared.valid_n, key=jax.random.key(seed + 3000),
            n_samples=EVAL_SAMPLES, batch_size=batch_size, devices=devices,
        )  # fmt: skip
        calibration = write_calibration(out / "checkpoint", prepared.ts.channels, scale)
    eval_kw = {"devices": devices} if _accepts_devices(family.evaluate) else {}
    pred_kw = (
        {"devices": devices}
        if family.predict is not None and _accepts_devices(family.predict)
        else {}
    )
    metrics = {
        "data": prepared.name,
        "model": type(model).__name__,
        **prepared.summary,
        "hyperparameters": dict(model.hyperparameters),
        "series": prepared.sizes,
        "recipe": plan,
        "epochs_run": int(len(history)),
        "test": family.evaluate(
            model,
            prepared.test_n,
            seed=seed,
            n_samples=EVAL_SAMPLES,
            batch_size=batch_size,
            tasks=family.eval_tasks,
            scale=scale,
            **eval_kw,
        ),  # fmt: skip
    }
    if calibration is not None:
        metrics["calibration"] = calibration
    metrics.update({
        "units": family.metric_units,
        "fit_seconds": round(t_fit, 1),
        "devices": n_devices,
        "compilations": history.attrs.get("compilations"),
    })  # fmt: skip
    if family.predict is not None:
        # predictions for every series, conditioned on all its observations
        pred = family.predict(
            model, prepared.ts, prepared.state, key=jax.random.key(seed + 2),
            n_samples=EVAL_SAMPLES, spread=scale, batch_size=batch_size, **pred_kw,
        )  # fmt: skip
        pred.attrs.update({
            "model": f"ctmodels {type(model).__name__}",
            "conditioned_on": "all observed values",
        })  # fmt: skip
        pred.to_netcdf(out / "predictions.nc")
        if family.plot is not None:
            test_ids = list(prepared.test.meta.series_ids[:max_plots])
            family.plot(prepared.ts, pred, out / "plots", series=test_ids,
                        title=f"{family.title}, test")  # fmt: skip
    metrics["total_seconds"] = round(_time.perf_counter() - t_start, 1)
    write_json(out / "metrics.json", metrics)
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


def load(checkpoint: str | Path, data: str | Path, *, family: str | None = None):
    """`(family, model, state, series)`: a job checkpoint and the series of `data`
    read the way the checkpoint's data were (its channels, time kind)."""
    name, model, state = load_job_checkpoint(checkpoint, family)
    fam = get_family(name)
    return fam, model, state, fam.data.reload(data, state)


def load_fitted(checkpoint: str | Path) -> Fitted:
    """Load what `ctmodels fit FAMILY --out DIR` saved (`DIR` or `DIR/checkpoint`):
    the model, the training data's `Normalizer`, the validation-calibrated residual
    std per channel (`calibration.json`; None if absent, or made for an earlier
    checkpoint: then with a warning) and the training data's time unit, for
    `ctmodels.models.predict`:

    ```python
    fitted = ctmodels.jobs.load_fitted("runs/pbcseq")
    pred = ctmodels.models.predict(fitted, xr.load_dataset("patients.nc"),
                                   [0.0, 1.0, 2.0, 5.0], key=jax.random.key(0))
    ```
    """
    from .. import data as cdata

    _, model, state = load_job_checkpoint(checkpoint)
    return Fitted(
        model, cdata.Normalizer.from_dict(state["normalizer"]), state["scale"],
        state.get("time_units"), tuple(state["channels"]),
    )  # fmt: skip


def predict(
    checkpoint: str | Path,
    data: str | Path,
    out: str | Path,
    *,
    n_samples: int = 16,
    seed: int = 0,
    plots: str | Path | None = None,
    max_plots: int = 6,
    family: str | None = None,
    devices: int | None = None,
):
    """Condition on the observed values of `data` and write the family's
    predictions (time series: at every position with a valid time) to `out`
    (netCDF, same dims and coordinates). `family`: refuse a checkpoint of another.
    `devices` (`--devices`): split the predictions over this many local devices
    (`ctmodels.models.predict(devices=...)`; None: one)."""
    out = check_out_file(out, "--out", example="predictions.nc")
    _check_inference_devices(devices)
    if plots is not None:
        check_out_dir(plots, "--plots")
    fam, model, state, ts = load(checkpoint, data, family=family)
    if fam.predict is None:
        raise ValueError(f"The {fam.name} family has no predict job.")
    pred = fam.predict(
        model, ts, state, key=jax.random.key(seed), n_samples=n_samples,
        spread=state["scale"], time_units=state.get("time_units"),
        batch_size=int(state.get("batch_size", 32)),
        **_devices_kw(fam, fam.predict, "predict", devices),
    )  # fmt: skip
    pred.attrs.update(
        {"model": f"ctmodels {type(model).__name__}", "checkpoint": str(checkpoint)}
    )
    if fam.calibrate:
        pred.attrs["spread"] = (
            "calibrated on the validation split (calibration.json)"
            if state["scale"] is not None
            else "the model's own (no calibration.json for this checkpoint)"
        )
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    try:
        pred.to_netcdf(tmp)
        tmp.replace(out)
    finally:
        tmp.unlink(missing_ok=True)
    if plots is not None and fam.plot is not None:
        fam.plot(ts, pred, plots, max_series=max_plots, title=fam.title)
    return pred


def evaluate(
    checkpoint: str | Path,
    data: str | Path,
    *,
    task: str = "both",
    out: str | Path | None = None,
    seed: int = 0,
    n_samples: int = EVAL_SAMPLES,
    fraction: float = 0.5,
    split: float = 0.5,
    family: str | None = None,
    devices: int | None = None,
) -> dict[str, Any]:
    """The family's metrics of a checkpoint on `data` (time series: interpolation /
    extrapolation MSE in normalised units, with LOCF and linear-interpolation
    baselines on the same points); `task`: one of the family's evaluation tasks or
    `"both"` (all); `devices` (`--devices`): the model's predictions split over
    this many local devices (None: one)."""
    if out is not None:
        out = check_out_file(out, "--out", example="metrics.json")
    _check_inference_devices(devices)
    fam, model, state, ts = load(checkpoint, data, family=family)
    if task in ("both", "all"):
        tasks = fam.eval_tasks
    elif task in fam.eval_tasks:
        tasks = (task,)
    else:
        raise ValueError(
            f"task must be {', '.join(fam.eval_tasks)} or both, got {task!r}."
        )
    metrics = fam.evaluate(
        model, fam.data.to_model_units(ts, state), seed=seed, n_samples=n_samples,
        batch_size=int(state.get("batch_size", 32)), fraction=fraction, split=split,
        tasks=tasks, scale=state["scale"],
        **_devices_kw(fam, fam.evaluate, "evaluate", devices),
    )  # fmt: skip
    metrics = {"data": str(data), "checkpoint": str(checkpoint), **metrics}
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        write_json(out, metrics)
    return metrics


def sample(
    checkpoint: str | Path,
    out: str | Path,
    *,
    n: int = 16,
    seed: int = 0,
    family: str | None = None,
    devices: int | None = None,
    **options: Any,
) -> Any:
    """Draw `n` samples from a checkpoint's model and write them to `out` (what and
    how: the family's `sample`); a family without one is refused. `devices`
    (`--devices`): the sampling split over this many local devices, the same
    samples (None: one)."""
    _check_inference_devices(devices)
    name, model, state = load_job_checkpoint(checkpoint, family)
    fam = get_family(name)
    if fam.sample is None:
        have = sorted(f for f, s in _sample_families().items() if s)
        raise ValueError(
            f"The {fam.name} family has no sample job (its checkpoint {checkpoint} "
            "can be used with predict and evaluate). Families that sample: "
            f"{', '.join(have) or 'none registered'}."
        )
    out = check_out_file(out, "--out")
    out.parent.mkdir(parents=True, exist_ok=True)
    return fam.sample(model, state, key=jax.random.key(seed), n=n, out=out,
                      **_devices_kw(fam, fam.sample, "sample", devices),
                      **options)  # fmt: skip


def _sample_families() -> dict[str, bool]:
    from ._family import families

    return {name: f.sample is not None for name, f in families().items()}
