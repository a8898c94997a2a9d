"""`predict`: a trained model's predictive mean and spread as xarray, in data units."""

from __future__ import annotations

import dataclasses
import functools
import re
from typing import Any, NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import xarray as xr
from jaxtyping import PRNGKeyArray

from .. import _devices, data as cdata
from .._errors import (
    CODES,
    RESULTS,
    SolverError,
    discard_failed_callbacks,
    runtime_message,
)
from . import _common as C


@eqx.filter_jit
def _predict_step(model, batch, key, n_samples, times=None):
    """One compiled prediction (module level: repeated calls with the same model
    structure, batch bucket, `n_samples` and query shape reuse the compilation,
    whatever task set the batch's context)."""
    query = {} if times is None else {"times": times}  # grid: any model's predict
    return model.predict(batch, key=key, n_samples=n_samples, **query)


_FAILED = re.compile(r"ctmodels\.\w+ with solver '([^']*)' failed[^\n]*")


def _run_step(model, batch, key, n_samples, ts, times=None):
    """`_predict_step` as NumPy arrays; a solve that fails inside it (the model's
    ODE hit `max_steps`, ...) is raised as one `ctmodels.SolverError` naming the
    series, and another check that fires (times before a fixed `t0`, ...) as a
    `ValueError`, not as the compiled program's runtime error and its traceback."""
    try:
        mu, sd = _predict_step(model, batch, key, n_samples, times)
        return np.asarray(mu), np.asarray(sd)
    except eqx.EquinoxRuntimeError as err:
        discard_failed_callbacks()
        idx = np.asarray(batch.index)
        ids = [str(ts.meta.series_ids[i]) for i in idx[idx >= 0]]
        more = f" (+{len(ids) - 5} more)" if len(ids) > 5 else ""
        shown = ", ".join(ids[:5]) + more
        found = _FAILED.search(str(err))
        if found is None:  # a check on the input (times before t0, ...)
            raise ValueError(
                f"Prediction for the batch of series {shown}: {runtime_message(err)}"
            ) from None
        msg = found.group(0).split(" (Pass throw=False")[0]
        code = next(
            (c for c in CODES if c != "successful" and RESULTS[getattr(RESULTS, c)]
             in msg), "",
        )  # fmt: skip
        raise SolverError(
            f"Prediction for the batch of series {shown} failed: {msg} The solver "
            "settings are the trained model's (its solver, rtol/atol and max_steps "
            "hyperparameters); predicting nearer times, or a model trained longer, "
            "can avoid it.",
            result=getattr(RESULTS, code) if code else None,
            solver=found.group(1),
            entry="predict",
        ) from None


@eqx.filter_jit
def _apply_task(task, batch, key):
    """`task` sets the batch's context and targets: compiled apart from the
    prediction (a small program), so that every task shares one compiled
    prediction per batch shape."""
    return task(batch, key=key)


def _batches(ts: cdata.TimeSeries, batch_size: int):
    """`ts` in union batches of `batch_size` series, in order, each padded to at
    least the time length that 90% of them fit in (`common_length`): the few short
    batches share the common batches' compiled prediction."""
    rows = [
        slice(b * batch_size, (b + 1) * batch_size)
        for b in range(cdata.num_batches(len(ts), batch_size))
    ]
    lengths = [cdata.time_length(ts.times[r], ts.time_mask[r], "union") for r in rows]
    return cdata.batches(
        ts, batch_size, layout="union", min_times=cdata.common_length(lengths)
    )


def sharded_batch_size(batch_size: int, place) -> int:
    """The series per compiled prediction on the devices of `place` (a
    `ctmodels._devices.Rows`, or None for one device): `batch_size` rounded up to a
    multiple of the device count, so that every batch splits evenly."""
    return batch_size if place is None else place.round_up(batch_size)


def predict_grid(model, ts, *, key, n_samples, batch_size, task=None, devices=None):
    """Predict every position of `ts` (model units) batch by batch, each batch's
    context set by `task` (None: every observed value); returns (mean, std, context
    mask, target mask) on ts' grid, as NumPy arrays. `devices` as in `predict`: each
    batch is split over them along its series axis."""
    place = _devices.resolve(devices, "predict_grid")
    batch_size = sharded_batch_size(batch_size, place)
    shape = ts.values.shape
    mean = np.full(shape, np.nan)
    std = np.full(shape, np.nan)
    ctx = np.zeros(shape, bool)
    tgt = np.zeros(shape, bool)
    if place is not None:
        _devices.check_concrete(model, "predict")
        model = place.replicate(model)
    for i, batch in enumerate(_batches(ts, batch_size)):
        k = jax.random.fold_in(key, i)
        if task is not None:
            batch = _apply_task(task, batch, jax.random.fold_in(k, 1))
        if place is not None:  # the task ran on one device: a small program
            batch, k = place.split_rows(batch), place.replicate(k)
        mu, sd = _run_step(model, batch, k, n_samples, ts)
        cdata.unbatch(batch, mu, mean)
        cdata.unbatch(batch, sd, std)
        cdata.unbatch(batch, np.asarray(batch.mask), ctx)
        cdata.unbatch(batch, np.asarray(batch.target_mask), tgt)
    return mean, std, ctx.astype(bool), tgt.astype(bool)


@functools.cache  # the same task objects per setting: jit reuses its compilations
def evaluation_tasks(fraction: float, split: float):
    """The interpolation (hide `fraction` of the observed values) and extrapolation
    (context: the first `split` of each series' span) tasks by name."""
    return {
        "interpolation": functools.partial(cdata.interpolation_task, fraction=fraction),
        "extrapolation": lambda batch, *, key: cdata.extrapolation_task(
            batch, split=split
        ),
    }


def model_spread(model, std: np.ndarray) -> np.ndarray:
    """The variance in `std` (a model's predictive std, model units) that is not its
    observation noise: `std^2 - noise^2` (`std^2` for a model without one)."""
    std = np.asarray(std, np.float64)
    return np.maximum(std**2 - _noise2(model), 0.0)


def with_spread(model, std: np.ndarray, spread) -> np.ndarray:
    """`std` with the residual std per channel `spread` (model units) in place of
    the model's observation noise; `std` itself when `spread` is None."""
    if spread is None:
        return std
    return np.sqrt(model_spread(model, std) + np.asarray(spread, np.float64) ** 2)


def time_factor(have: str | None, want: str | None) -> float:
    """What times in unit `have` are multiplied by to be in unit `want` (1 when either
    is unknown or they are the same). Datetime times count in days and float times
    carry their `units` attribute, so a file with visit dates given to a model
    trained on years would otherwise be 365 times too slow."""
    if not want or not have or have == want:
        return 1.0
    try:
        return (
            cdata.TIME_UNITS[cdata.canonical_time_unit(have)]
            / cdata.TIME_UNITS[cdata.canonical_time_unit(want)]
        )
    except ValueError:
        raise ValueError(
            f"The data's times are in {have!r} but the model was trained on times "
            f"in {want!r}, and ctmodels cannot convert between them: give the "
            f"times in {want!r} (or set the time variable's `units` attribute to "
            f"one of {sorted(cdata.TIME_UNITS)})."
        ) from None


def in_time_units(ts: cdata.TimeSeries, units: str | None) -> cdata.TimeSeries:
    """`ts` with its times in the time unit `units` a model was trained in (see
    `time_factor`; `ts` itself when no conversion is needed)."""
    factor = time_factor(ts.meta.time_units, units)
    return ts if factor == 1.0 else dataclasses.replace(ts, times=ts.times * factor)


def check_time_kind(ts: cdata.TimeSeries, units: str | None) -> None:
    """Refuse dates (or durations) for a model trained on float times without a
    unit: they count in days, and nothing says what the training times counted in."""
    if units is None and ts.meta.time_kind != "float":
        raise ValueError(
            f"The data's times are {ts.meta.time_kind}s, but the model was trained on "
            "float times without a `units` attribute, so ctmodels cannot tell how "
            "to convert them (dates count in days). Give float times in the "
            "training data's unit, as they were at training."
        )


class Fitted(NamedTuple):
    """A model fitted by a job (`ctmodels fit ...`), with what its predictions need
    (see `ctmodels.jobs.load_fitted`; `predict` accepts it in place of a model)."""

    model: Any
    normalizer: cdata.Normalizer
    spread: list[float] | None
    time_units: str | None
    channels: tuple[str, ...]


def calibrate_spread(
    model: Any,
    series: cdata.TimeSeries | xr.Dataset,
    *,
    key: PRNGKeyArray,
    normalizer: cdata.Normalizer | None = None,
    time_units: str | None = None,
    n_samples: int = 32,
    batch_size: int = 64,
    fraction: float = 0.5,
    split: float = 0.5,
    devices: Any = None,
) -> list[float]:
    """A residual std per channel (model units) that makes a model's predictive
    spread match its errors on held-out `series` (the validation split): the
    `spread` for `predict`.

    A latent ODE's own spread (posterior samples and a fixed observation noise) is
    far narrower than its errors. This scores the model on two tasks, hiding a
    random `fraction` of the observed values (interpolation) and the values after
    `split` of each series' time span (extrapolation), and returns per channel `c`
    `s_c = sqrt(mean(err^2 - Var_k))` over the scored values, where `Var_k` is the
    model's spread without its noise; at least the model's noise std (also for a
    channel never scored). `predict(..., spread=s)` then gives `sqrt(Var_k + s_c^2)`.

    **Arguments:** `model`, `series`, `normalizer`, `time_units`, `n_samples`,
    `batch_size`, `devices` as in `predict` (series in data units with
    `normalizer`); `key`: a JAX PRNG key (posterior samples, hidden values);
    `fraction`, `split`: the tasks.

    **Returns:** a list of `C` floats.
    """
    n_samples = C.check_samples(n_samples)
    C.check_sizes("calibrate_spread", batch_size=(batch_size, 1))
    place = _devices.resolve(devices, "calibrate_spread")
    ts = in_time_units(as_series(series, normalizer), time_units)
    ts = ts if normalizer is None else normalizer.transform(ts)
    noise = np.broadcast_to(np.sqrt(_noise2(model)), (ts.num_channels,))
    sq, spread, count = (np.zeros(ts.num_channels) for _ in range(3))
    for task in evaluation_tasks(fraction, split).values():
        mean, std, _, tgt = predict_grid(
            model, ts, key=key, n_samples=n_samples, batch_size=batch_size, task=task,
            devices=place,
        )  # fmt: skip
        sq += np.where(tgt, (mean - ts.values) ** 2, 0.0).sum(axis=(0, 1))
        spread += np.where(tgt, model_spread(model, std), 0.0).sum(axis=(0, 1))
        count += tgt.sum(axis=(0, 1))
    excess = (sq - spread) / np.maximum(count, 1)
    return [float(x) for x in np.sqrt(np.maximum(excess, noise**2))]


def _noise2(model) -> np.ndarray:
    """The model's observation noise variance per channel (0 without one)."""
    if not hasattr(model, "_noise_log_std"):
        return np.zeros(())
    return np.exp(2 * np.asarray(model._noise_log_std(jnp.float32), np.float64))


def as_series(series, normalizer) -> cdata.TimeSeries:
    """`series` (a TimeSeries or an xarray.Dataset, read on `normalizer`'s channels)
    as a loaded TimeSeries."""
    if isinstance(series, xr.Dataset):
        channels = None if normalizer is None else list(normalizer.channels)
        if channels is not None:
            missing = [c for c in channels if c not in series.data_vars]
            if missing:
                have = sorted(map(str, series.data_vars))
                raise ValueError(
                    f"The dataset lacks the normaliser's channels {missing}, which the "
                    f"model was trained on (all: {channels}); its variables are "
                    f"{have}. Rename variables to the training names "
                    "(ds.rename({'old': 'new'})); a channel not measured at all can be "
                    "added as an all-NaN variable on the same dims."
                )
        series = cdata.from_xarray(series, variables=channels, static=[])
    if isinstance(series, cdata.LazyTimeSeries):
        series = series.load()
    if not isinstance(series, cdata.TimeSeries):
        raise TypeError(
            "series must be a ctmodels.data.TimeSeries or an xarray.Dataset, got "
            f"{type(series).__name__}."
        )
    return series


def _query_floats(meta, times) -> tuple[np.ndarray, np.ndarray]:
    """Requested times as floats in the series' time units (and as given, for the
    output coordinate)."""
    t = np.asarray(times)
    kind = meta.time_kind
    if np.issubdtype(t.dtype, np.datetime64) or np.issubdtype(t.dtype, np.timedelta64):
        want = "datetime" if np.issubdtype(t.dtype, np.datetime64) else "timedelta"
        if kind != want:
            unit = f" (in {meta.time_units!r})" if meta.time_units else ""
            raise ValueError(
                f"times are {t.dtype} but the series' times are {kind}{unit}: give "
                "the times as the series' are."
            )
        ns = t.astype(f"{want}64[ns]")
        base = meta.time_origin if want == "datetime" else np.timedelta64(0, "ns")
        floats = np.where(np.isnat(t), np.nan, (ns - base).astype(np.float64))
        return floats / cdata.ns_per_time_unit(meta.time_units), t
    if kind != "float":
        raise ValueError(
            f"The series' times are {kind}: give the times as numpy {kind}64 values "
            f"(got {t.dtype})."
        )
    if not (np.issubdtype(t.dtype, np.integer) or np.issubdtype(t.dtype, np.floating)):
        raise ValueError(f"times must be numbers or datetimes, got dtype {t.dtype}.")
    return t.astype(np.float64), t


def predict(
    model: Any,
    series: cdata.TimeSeries | xr.Dataset,
    times: Any = None,
    *,
    key: PRNGKeyArray,
    n_samples: int = 16,
    normalizer: cdata.Normalizer | None = None,
    spread: Any = None,
    time_units: str | None = None,
    batch_size: int = 64,
    devices: Any = None,
) -> xr.Dataset:
    """Predictive mean and standard deviation of a trained model for every series,
    conditioned on all of its observed values, at any times: interpolation inside a
    series' observations, extrapolation after them.

    **Arguments:**

    - `model`: a trained model with `predict(batch, *, key, n_samples, times)`
      (`LatentODE`, `RNNVAE`, `ODERNN`, `GRUDelta`, `LinearInterpolation`, `LOCF`),
      or a `Fitted` from `load_fitted`, which supplies `normalizer`, `spread` and
      `time_units` (arguments given here take precedence; `spread=None` keeps the
      stored one: to drop it, pass `fitted.model` and `normalizer=` instead).
    - `series`: the context, a `ctmodels.data.TimeSeries` or an `xarray.Dataset` in
      the layout `ctmodels.data.from_xarray` reads (with `normalizer`, its channels
      are read), in data units.
    - `times`: where to predict. None: at every valid time of each series (its own
      grid, observed or not). `[Q]`: the same times for every series; `[S, Q]`: per
      series; non-decreasing (along each row). Numbers in the series' time unit, or
      `datetime64` / `timedelta64` values where the series' times were.
    - `key`: a JAX PRNG key (posterior samples); `n_samples`: how many.
    - `normalizer`: the `ctmodels.data.Normalizer` the model was trained with: values
      and times are mapped to model units and the predictions back to data units
      (log channels as log-normal, see `Normalizer.inverse`). None: the series are in
      model units already.
    - `spread`: a residual std per channel (model units) that replaces the model's
      observation noise in the predictive std, such as the validation-calibrated one
      that `ctmodels fit latent-ode` writes (`checkpoint/calibration.json`, read by
      `load_fitted`). A latent ODE's own spread is far narrower than its errors.
    - `time_units`: the time unit the model was trained in; series (and `times`) in
      another known unit are converted (`time_factor`). None: taken as they are.
    - `batch_size`: series per compiled prediction.
    - `devices`: where to predict. None or 1: one device (the default device). An
      int `N`: the first `N` of `jax.local_devices()`; a sequence of devices: those
      (the same meaning and checks as `ctmodels.train.fit(devices=...)`). Each batch
      is split along its series axis over the devices and the model is replicated
      (one compiled prediction, partitioned by XLA); the predictions equal one
      device's up to the order of floating-point sums (with the same `batch_size`
      and `key`). A `batch_size` that is not a multiple of `N` is rounded up to one
      (the predictions then equal one device's with that batch size: the batch
      grouping matters for models that start from the batch's earliest time, see
      below); a number of series that does not fill the last batch is padded, as
      on one device. Call it outside `jax.jit`.

    Models that start from the earliest time of their batch (`LatentODE` with its
    default `anchor="first"` and no fixed `t0`, `RNNVAE`, `ODERNN`, `GRUDelta`)
    give predictions that depend on that time: a requested time before a series'
    first observation, or another series in the batch that starts earlier, moves
    the start back, and the prediction at a given time changes a little (by the
    model's own dynamics over the longer stretch). `LOCF`, `LinearInterpolation`
    and `LatentODE(anchor="last")` do not depend on it; a fixed `t0` removes it.

    **Returns:** an `xarray.Dataset` with `V` (mean) and `V_std` for each channel `V`
    (the std of a new measurement: with `spread`, also at the observed positions it
    conditioned on; with `normalizer`, their `transform` attribute says whether `V`
    was modelled on a log scale, which `ctmodels`' plots use for the band).
    With `times=None` it has the series' own dims and coordinates (as
    `ctmodels.data.to_xarray` writes predictions, NaN at padding positions); else
    dims `(series, time)` with the `[Q]` times as the `time` coordinate, or
    `(series, query)` with a 2-D `time` coordinate for `[S, Q]` times.
    """
    checkpoint_units = isinstance(model, Fitted) and time_units is None
    if isinstance(model, Fitted):
        normalizer = model.normalizer if normalizer is None else normalizer
        spread = model.spread if spread is None else spread
        time_units = model.time_units if time_units is None else time_units
        model = model.model
    n_samples = C.check_samples(n_samples)
    C.check_sizes("predict", batch_size=(batch_size, 1))
    place = _devices.resolve(devices, "predict")
    if spread is not None:
        spread = np.asarray(spread, np.float64)
    ts = as_series(series, normalizer)
    if checkpoint_units:
        check_time_kind(ts, time_units)
    ts_m = in_time_units(ts, time_units)
    ts_m = ts_m if normalizer is None else normalizer.transform(ts_m)
    factor = time_factor(ts.meta.time_units, time_units)
    scale = (1.0 if normalizer is None else normalizer.time_scale) / factor
    S, C_ = len(ts), ts.num_channels
    if spread is not None and spread.shape not in ((), (C_,)):
        raise ValueError(
            f"spread must be one residual std per channel ({C_}: {list(ts.channels)}) "
            f"or one for all, got shape {spread.shape}."
        )
    per_series = False
    if times is None:  # the series' own grid
        mean, std, _, _ = predict_grid(
            model, ts_m, key=key, n_samples=n_samples, batch_size=batch_size,
            devices=place,
        )  # fmt: skip
    else:
        floats, given = _query_floats(ts.meta, times)
        if floats.ndim == 2 and floats.shape[0] == S:
            per_series = True
        elif floats.ndim != 1:
            raise ValueError(
                f"times must be [Q] or [{S}, Q] ({S} series), got shape {floats.shape}."
            )
        C.check_query_times(floats, ordered=True)
        query = floats / scale
        mean = np.full((S, floats.shape[-1], C_), np.nan)
        std = np.full((S, floats.shape[-1], C_), np.nan)
        if place is not None:
            _devices.check_concrete(model, "predict")
            model = place.replicate(model)
        batch_size = sharded_batch_size(batch_size, place)
        for i, batch in enumerate(_batches(ts_m, batch_size)):
            idx = np.asarray(batch.index)
            rows = idx >= 0
            if per_series:
                q = query[np.maximum(idx, 0)]
                q[~rows] = q[rows][0]  # padding rows (weight 0): any valid times
            else:
                q = query
            q = jnp.asarray(q, batch.times.dtype)
            k = jax.random.fold_in(key, i)
            if place is not None:
                batch, k = place.split_rows(batch), place.replicate(k)
                q = place.split_rows(q) if per_series else place.replicate(q)
            mu, sd = _run_step(model, batch, k, n_samples, ts_m, q)
            mean[idx[rows]] = mu[rows]
            std[idx[rows]] = sd[rows]
    std = with_spread(model, std, spread)
    if normalizer is not None:
        mean, std = normalizer.inverse(mean, std)
    if times is None:
        out = cdata.to_xarray(ts, mean=mean, std=std)
    else:
        out = _query_dataset(ts, mean, std, given, per_series)
    if normalizer is not None:  # how the values were modelled, whatever the file says
        for name, log in zip(normalizer.channels, normalizer.log, strict=True):
            for v in (name, f"{name}_std"):
                out[v].attrs["transform"] = "log" if log else "none"
    return out


def _query_dataset(ts, mean, std, given, per_series) -> xr.Dataset:
    meta = ts.meta
    sd = meta.series_dim
    tdim = "query" if per_series else meta.time_name or "time"
    tname = meta.time_name or "time"
    var_attrs = (meta.xarray or {}).get("var_attrs", {})
    data_vars = {}
    for c, name in enumerate(meta.channels):
        attrs = dict(var_attrs.get(name, {}))
        data_vars[name] = ((sd, tdim), mean[..., c], dict(attrs, prediction="mean"))
        std_attrs = dict(attrs, prediction="std")
        std_attrs["long_name"] = (
            f"predictive standard deviation of {attrs.get('long_name', name)}"
        )
        data_vars[f"{name}_std"] = ((sd, tdim), std[..., c], std_attrs)
    time_attrs = dict(var_attrs.get(tname, {}))
    if meta.time_units and "units" not in time_attrs and meta.time_kind == "float":
        time_attrs["units"] = meta.time_units
    coords = {
        sd: np.asarray(meta.series_ids),  # as `ctmodels.data.to_xarray` writes them
        tname: ((sd, tdim) if per_series else (tdim,), given, time_attrs),
    }
    return xr.Dataset(data_vars, coords=coords)
