"""`TimeSeries`: a validated, host-side container of irregularly sampled series.

A `TimeSeries` holds `S` series on a common padded grid of `T` positions:

- `times` `[S, T]` float64: the time of each position. Positions without a valid time
  (padding) are filled with the nearest valid time of the same series, so every row is
  non-decreasing and safe to integrate over; `time_mask` says which positions are real.
- `values` `[S, T, C]` float64: 0.0 wherever the value is not observed.
- `mask` `[S, T, C]` bool: which values are observed, per channel (one channel may be
  observed while another is missing at the same time).
- `time_mask` `[S, T]` bool: positions that carry a valid time (observed or not; a valid
  time with no observed value is a position to predict).
- optional `static` `[S, K]` covariates and `labels` `[S]` (integers).
- `meta`: channel names, time units and origin, series ids and everything needed to
  write the data back to xarray exactly. It is a static field (kept out of jit).

Arrays are NumPy (float64), so conversions are exact; `ctmodels.data.batches` turns
slices of them into device-side `Batch`es in JAX's default float dtype.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import equinox as eqx
import numpy as np


@dataclasses.dataclass(frozen=True, eq=False)
class Metadata:
    """Everything about a `TimeSeries` that is not an array of numbers.

    Compared by identity (it is a static pytree field: two series with the same metadata
    object share compiled code).

    - `channels`: channel (variable) names, length `C`.
    - `static_names`, `label_name`, `label_classes`: names of static covariates and of
      the label variable and its class names (if any).
    - `series_ids`: one id per series (NumPy array), `series_dim`, `obs_dim`: dim names.
    - `time_name`, `time_units` (e.g. `"days"`), `time_kind` (`"float"`, `"datetime"`
      or `"timedelta"`), `time_origin` (a `numpy.datetime64` for datetime times: float
      time 0), `shared_time`: whether the source had one 1-D time coordinate for all
      series.
    - `xarray`: what `to_xarray` needs to restore the source exactly (attrs, extra
      coordinates); filled in by `from_xarray`.
    """

    channels: tuple[str, ...]
    series_ids: np.ndarray
    static_names: tuple[str, ...] = ()
    label_name: str | None = None
    label_classes: tuple[str, ...] | None = None
    series_dim: str = "series"
    obs_dim: str = "obs"
    time_name: str = "time"
    time_units: str | None = None
    time_kind: str = "float"
    time_origin: Any = None
    shared_time: bool = False
    xarray: dict = dataclasses.field(default_factory=dict)

    def replace(self, **changes) -> Metadata:
        return dataclasses.replace(self, **changes)


def _as_float_array(x, name: str, ndim: int) -> np.ndarray:
    arr = np.asarray(x)
    if arr.dtype == object or not (
        np.issubdtype(arr.dtype, np.number) or np.issubdtype(arr.dtype, np.bool_)
    ):
        raise ValueError(
            f"TimeSeries `{name}` must be numeric, got dtype {arr.dtype}. Convert "
            "categorical or string data to numbers (e.g. one-hot or codes) first."
        )
    if arr.ndim != ndim:
        raise ValueError(
            f"TimeSeries `{name}` must have {ndim} dimensions, got shape {arr.shape}."
        )
    return arr.astype(np.float64)


def _fill_padding_times(times: np.ndarray, time_mask: np.ndarray) -> np.ndarray:
    """Forward-fill invalid times along each row (back-fill leading ones)."""
    S, T = times.shape
    idx = np.where(time_mask, np.arange(T)[None, :], -1)
    np.maximum.accumulate(idx, axis=1, out=idx)
    first = np.argmax(time_mask, axis=1)
    idx = np.where(idx < 0, first[:, None], idx)
    filled = np.take_along_axis(times, idx, axis=1)
    return np.where(np.isfinite(filled), filled, 0.0)


class TimeSeries(eqx.Module):
    """Irregularly sampled multichannel time series (see the module docstring).

    Build one with `TimeSeries.from_arrays`, `ctmodels.data.from_xarray` or
    `ctmodels.data.from_pandas`. Index with an integer array or slice to select
    series (`ts[train_idx]`).
    """

    times: np.ndarray
    values: np.ndarray
    mask: np.ndarray
    time_mask: np.ndarray
    static: np.ndarray | None
    labels: np.ndarray | None
    meta: Metadata = eqx.field(static=True)

    # ------------------------------------------------------------------ construction

    @classmethod
    def from_arrays(
        cls,
        times,
        values,
        mask=None,
        *,
        static=None,
        labels=None,
        channels: Sequence[str] | None = None,
        series_ids=None,
        meta: Metadata | None = None,
    ) -> TimeSeries:
        """Validate arrays and build a `TimeSeries`.

        **Arguments:**

        - `times`: `[S, T]` (or `[T]`, shared by all series). NaN marks padding
          positions (no time); valid times must be strictly increasing within each
          series.
        - `values`: `[S, T, C]` (or `[S, T]` for one channel). NaN means missing.
        - `mask`: optional `[S, T, C]` bool of observed values; by default the non-NaN
          entries of `values`. Where given, it is combined with `~isnan(values)`.
        - `static`: optional `[S, K]` static covariates (no NaN).
        - `labels`: optional `[S]` integer labels.
        - `channels`, `series_ids`: names; default `c0, c1, ...` and `0..S-1`.
        - `meta`: a complete `Metadata` (overrides `channels`/`series_ids`).

        **Raises:** `ValueError` for non-numeric data, mismatched shapes, unsorted or
        duplicate times within a series, NaN or infinite times at observed positions,
        infinite values, and series with no observed value.
        """
        values = _as_float_array(
            values, "values", np.ndim(values) if np.ndim(values) in (2, 3) else 3
        )
        if values.ndim == 2:
            values = values[:, :, None]
        S, T, C = values.shape
        times = np.asarray(times)
        if times.ndim == 1:
            times = np.broadcast_to(times, (S, times.shape[0]))
        times = _as_float_array(times, "times", 2)
        if times.shape != (S, T):
            raise ValueError(
                f"TimeSeries `times` has shape {times.shape} but `values` has shape "
                f"{values.shape}: times must be [S, T] (or [T]) matching values' "
                "first two dims."
            )
        observed = ~np.isnan(values)
        if mask is not None:
            mask = np.asarray(mask)
            if mask.ndim == 2:
                mask = mask[:, :, None]
            if mask.shape != values.shape:
                raise ValueError(
                    f"TimeSeries `mask` has shape {mask.shape}, expected "
                    f"{values.shape} (the shape of `values`)."
                )
            if mask.dtype != np.bool_:
                if not np.isin(mask, (0, 1)).all():
                    raise ValueError("TimeSeries `mask` must be boolean (or 0/1).")
                mask = mask.astype(bool)
            observed = observed & mask
        ids = meta.series_ids if meta is not None else series_ids
        ids = None if ids is None else np.asarray(ids)  # (a pandas index: by position)
        if ids is not None and (ids.ndim != 1 or len(ids) != S):
            ids = None  # the shape check comes later, with its own message
        names = meta.channels if meta is not None else channels

        def series(s) -> str:  # its id where the data name one, and its position
            if ids is None or str(ids[s]) == str(s):
                return f"series {s}"
            return f"series {_show(ids[s])} (index {s})"

        if np.isinf(values[observed]).any():
            s, t, c = np.argwhere(np.isinf(values) & observed)[0]
            names = None if names is None else [str(n) for n in names]
            chan = (
                f"channel {names[c]!r}"
                if names is not None and len(names) == C
                else f"channel {c}"
            )
            raise ValueError(
                f"TimeSeries values contain an infinite value ({series(s)}, position "
                f"{t}, {chan}). Mark it missing (NaN) or fix the data."
            )
        time_valid = ~np.isnan(times)
        obs_any = observed.any(axis=2)
        bad = obs_any & ~time_valid
        if bad.any():
            s, t = np.argwhere(bad)[0]
            raise ValueError(
                f"TimeSeries has an observed value at a NaN time ({series(s)}, "
                f"position {t}). Every observed value needs a finite time; drop the "
                "value or supply its time."
            )
        if np.isinf(times[time_valid]).any():
            s, t = np.argwhere(np.isinf(times))[0]
            raise ValueError(
                f"TimeSeries times contain an infinite time ({series(s)}, position "
                f"{t}). Times must be finite."
            )
        _check_sorted(times, time_valid, series)
        empty = ~obs_any.any(axis=1)
        if S == 0 or T == 0:
            raise ValueError(
                f"TimeSeries is empty (values shape {values.shape}): need at least "
                "one series with one observation."
            )
        if empty.any():
            s = int(np.flatnonzero(empty)[0])
            raise ValueError(
                f"The data's {series(s)} has no observed value ({int(empty.sum())} "
                f"of the {S} series have none). Drop "
                "series without observations from the data first (e.g. "
                "ds.dropna('series', how='all') or ds.isel(series=...))."
            )
        if static is not None:
            static = _as_float_array(static, "static", 2 if np.ndim(static) == 2 else 1)
            if static.ndim == 1:
                static = static[:, None]
            if static.shape[0] != S:
                raise ValueError(
                    f"TimeSeries `static` has {static.shape[0]} rows, expected {S} "
                    "(one per series)."
                )
            if not np.isfinite(static).all():
                raise ValueError(
                    "TimeSeries `static` covariates contain NaN or infinite values; "
                    "impute them (or drop the covariate) first."
                )
        if labels is not None:
            labels = np.asarray(labels)
            if labels.shape != (S,):
                raise ValueError(
                    f"TimeSeries `labels` must have shape ({S},), got {labels.shape}."
                )
            if not np.issubdtype(labels.dtype, np.integer):
                if np.issubdtype(labels.dtype, np.floating) and np.all(
                    labels == np.round(labels)
                ):
                    labels = labels.astype(np.int64)
                else:
                    raise ValueError(
                        "TimeSeries `labels` must be integer class codes, got dtype "
                        f"{labels.dtype}."
                    )
        if meta is None:
            meta = Metadata(
                channels=tuple(channels)
                if channels is not None
                else tuple(f"c{i}" for i in range(C)),
                series_ids=np.arange(S)
                if series_ids is None
                else np.asarray(series_ids),
                static_names=tuple(f"s{i}" for i in range(static.shape[1]))
                if static is not None
                else (),
            )
        if len(meta.channels) != C:
            raise ValueError(
                f"TimeSeries has {C} channels but {len(meta.channels)} channel names "
                f"({list(meta.channels)})."
            )
        if len(meta.series_ids) != S:
            raise ValueError(
                f"TimeSeries has {S} series but {len(meta.series_ids)} series ids."
            )
        return cls(
            times=_fill_padding_times(times, time_valid),
            values=np.where(observed, values, 0.0),
            mask=observed,
            time_mask=time_valid,
            static=static,
            labels=labels,
            meta=meta,
        )

    # ------------------------------------------------------------------ properties

    @property
    def num_series(self) -> int:
        return self.values.shape[0]

    @property
    def num_times(self) -> int:
        return self.values.shape[1]

    @property
    def num_channels(self) -> int:
        return self.values.shape[2]

    @property
    def channels(self) -> tuple[str, ...]:
        return self.meta.channels

    @property
    def lengths(self) -> np.ndarray:
        """Number of valid time positions per series."""
        return self.time_mask.sum(axis=1)

    def __len__(self) -> int:
        return self.num_series

    def __getitem__(self, index) -> TimeSeries:
        """Select series (an int, slice, integer array or boolean mask)."""
        if isinstance(index, (int, np.integer)):
            index = [int(index)]
        index = np.arange(self.num_series)[index]
        if index.size == 0:
            raise ValueError("Selecting no series gives an empty TimeSeries.")
        return TimeSeries(
            times=self.times[index],
            values=self.values[index],
            mask=self.mask[index],
            time_mask=self.time_mask[index],
            static=None if self.static is None else self.static[index],
            labels=None if self.labels is None else self.labels[index],
            meta=self.meta.replace(series_ids=np.asarray(self.meta.series_ids)[index]),
        )

    def with_values(self, values, mask=None) -> TimeSeries:
        """The same series with new `values` (and optionally `mask`); unchecked."""
        values = np.asarray(values, np.float64)
        mask = self.mask if mask is None else np.asarray(mask, bool)
        return dataclasses.replace(self, values=np.where(mask, values, 0.0), mask=mask)

    def nan_values(self) -> np.ndarray:
        """`values` with NaN where not observed."""
        return np.where(self.mask, self.values, np.nan)

    def nan_times(self) -> np.ndarray:
        """`times` with NaN at padding positions."""
        return np.where(self.time_mask, self.times, np.nan)

    def __repr__(self) -> str:
        n_obs = int(self.mask.sum())
        missing = 1.0 - n_obs / max(1, int(self.time_mask.sum()) * self.num_channels)
        return (
            f"TimeSeries(series={self.num_series}, times={self.num_times}, "
            f"channels={list(self.channels)}, observed={n_obs}, "
            f"missing={missing:.1%}, static={list(self.meta.static_names)}, "
            f"labels={'yes' if self.labels is not None else 'no'})"
        )


def _show(x) -> str:
    """A series id as written in messages: numbers plain, text quoted."""
    x = x.item() if isinstance(x, np.generic) else x
    return repr(x) if isinstance(x, str) else str(x)


def _check_sorted(times: np.ndarray, valid: np.ndarray, series=None) -> None:
    """Valid times must be strictly increasing within each series (`series(s)`
    names series `s` in the message)."""
    series = series or (lambda s: f"series {s}")
    T = times.shape[1]
    # previous valid time at each position (NaN if none)
    idx = np.where(valid, np.arange(T)[None, :], -1)
    prev_idx = np.maximum.accumulate(idx, axis=1)
    prev_idx = np.concatenate([np.full((times.shape[0], 1), -1), prev_idx[:, :-1]], 1)
    has_prev = prev_idx >= 0
    prev = np.take_along_axis(times, np.maximum(prev_idx, 0), axis=1)
    with np.errstate(invalid="ignore"):
        dup = valid & has_prev & (times == prev)
        down = valid & has_prev & (times < prev)
    if dup.any():
        s, t = np.argwhere(dup)[0]
        raise ValueError(
            f"TimeSeries has a duplicate time {float(times[s, t])!r} in {series(s)} "
            f"at position {t}. Merge observations at the same time into one row "
            "(one value per channel), e.g. with pandas groupby + first/mean."
        )
    if down.any():
        s, t = np.argwhere(down)[0]
        raise ValueError(
            f"TimeSeries times are not sorted in {series(s)}: position {t} has time "
            f"{float(times[s, t])!r} after {float(prev[s, t])!r}. Sort each series by "
            "time first."
        )
