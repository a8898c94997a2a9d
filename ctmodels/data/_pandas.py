"""pandas in: long format (`id, time, variable, value`) and wide format."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
import xarray as xr

from ._timeseries import TimeSeries
from ._xarray import from_xarray


def from_pandas(
    df: pd.DataFrame,
    *,
    id: str,
    time: str,
    variable: str | None = None,
    value: str | None = None,
    channels: Sequence[str] | None = None,
    static: Sequence[str] = (),
    labels: str | None = None,
    time_units: str | None = None,
    time_origin=None,
) -> TimeSeries:
    """Build a `TimeSeries` from a pandas DataFrame.

    - **Long format** (`variable` and `value` given): one row per observation, as
      PhysioNet-style data come: `id, time, variable, value`. Rows with the same
      `(id, time)` become one time position; each `variable` becomes a channel.
    - **Wide format** (neither given): one row per `(id, time)` and one column per
      channel (`channels`, default every numeric column other than `id`, `time`,
      `static` and `labels`). NaN means missing.

    `static` columns (numeric, constant within a series) become static
    covariates and `labels` the per-series label. Times may be numeric, datetime64 or
    timedelta64 (converted with `time_units`, default days, from `time_origin`, default
    the earliest time). Series are ordered by id, positions by time.

    **Raises:** `ValueError` for missing columns, duplicate `(id, time, variable)`
    (long) or `(id, time)` (wide) rows, and everything `TimeSeries` validates.
    """
    if not isinstance(df, pd.DataFrame):
        raise ValueError(f"from_pandas expects a DataFrame, got {type(df).__name__}.")
    if (variable is None) != (value is None):
        raise ValueError(
            "Long format needs both `variable` and `value` column names; wide format "
            "needs neither."
        )
    needed = [id, time] + ([variable, value] if variable else []) + list(static)
    needed += [labels] if labels else []
    missing = [c for c in needed if c not in df.columns]
    if missing:
        raise ValueError(
            f"Columns {missing} are not in the DataFrame (columns: {list(df.columns)})."
        )
    if len(df) == 0:
        raise ValueError("The DataFrame is empty: no observations.")
    if df[time].isna().any():
        row = int(np.flatnonzero(df[time].isna().to_numpy())[0])
        raise ValueError(
            f"Column {time!r} has a missing time (row {row}); every observation needs "
            "a time."
        )
    if df[id].isna().any():
        row = int(np.flatnonzero(df[id].isna().to_numpy())[0])
        raise ValueError(
            f"Column {id!r} has a missing id (row {row}); every observation needs "
            "the id of its series."
        )
    if pd.api.types.infer_dtype(df[id], skipna=True).startswith("mixed"):
        raise ValueError(
            f"Column {id!r} mixes kinds of ids (e.g. numbers and text); make them "
            f"one kind first, e.g. df[{id!r}] = df[{id!r}].astype(str)."
        )
    tdtype = df[time].dtype
    if isinstance(tdtype, pd.DatetimeTZDtype):
        raise ValueError(
            f"Column {time!r} holds timezone-aware datetimes ({tdtype.tz}); put them "
            f"on one clock first, e.g. df[{time!r}] = "
            f"df[{time!r}].dt.tz_convert('UTC').dt.tz_localize(None)."
        )
    if not (
        pd.api.types.is_numeric_dtype(tdtype)
        or pd.api.types.is_datetime64_dtype(tdtype)
        or pd.api.types.is_timedelta64_dtype(tdtype)
    ):
        raise ValueError(
            f"Column {time!r} holds {tdtype} values, not numbers or datetimes; "
            f"convert it first, e.g. df[{time!r}] = pd.to_datetime(df[{time!r}]) "
            "(or pd.to_numeric)."
        )
    if variable is not None:
        dup = df.duplicated([id, time, variable])
        if dup.any():
            r = df[dup].iloc[0]
            raise ValueError(
                f"Duplicate observation: id={_py(r[id])!r}, time={_py(r[time])!r}, "
                f"variable={_py(r[variable])!r} appears more than once. Aggregate "
                "first, e.g. df.groupby([id, time, variable], as_index=False).mean()."
            )
        if not pd.api.types.is_numeric_dtype(df[value]):
            raise ValueError(
                f"Column {value!r} must be numeric, got dtype {df[value].dtype}."
            )
        wide = df.pivot(index=[id, time], columns=variable, values=value)
        if channels is not None:
            unknown = [c for c in channels if c not in wide.columns]
            if unknown:
                raise ValueError(
                    f"Channels {unknown} never occur in column {variable!r} (its "
                    f"values: {sorted(map(str, wide.columns))})."
                )
            wide = wide.reindex(columns=list(channels))
        wide.columns = [str(c) for c in wide.columns]
        chan = list(wide.columns)
        wide = wide.reset_index()
        extra = df.groupby(id)[[*static] + ([labels] if labels else [])].first()
    else:
        dup = df.duplicated([id, time])
        if dup.any():
            r = df[dup].iloc[0]
            raise ValueError(
                f"Duplicate row: id={_py(r[id])!r}, time={_py(r[time])!r} appears "
                "more than once; wide format needs one row per (id, time)."
            )
        skip = {id, time, *static} | ({labels} if labels else set())
        cols = (
            list(channels)
            if channels is not None
            else [
                c
                for c in df.columns
                if c not in skip and pd.api.types.is_numeric_dtype(df[c])
            ]
        )
        for c in cols:
            if c not in df.columns:
                raise ValueError(f"Channel column {c!r} is not in the DataFrame.")
            if not pd.api.types.is_numeric_dtype(df[c]):
                raise ValueError(
                    f"Channel column {c!r} must be numeric, got {df[c].dtype}; "
                    f"convert it first, e.g. pd.to_numeric(df[{c!r}])."
                )
        # channel names are strings (xarray variables); columns keep their labels
        wide = df[[id, time, *cols]].rename(columns={c: str(c) for c in cols})
        chan = [str(c) for c in cols]
        extra = df.groupby(id)[[*static] + ([labels] if labels else [])].first()
    # per-series columns, in either format: one value per series, numbers for static
    by_id = df.groupby(id)
    for s in [*static] + ([labels] if labels else []):
        if (by_id[s].nunique(dropna=False) > 1).any():
            bad = by_id[s].nunique(dropna=False)
            raise ValueError(
                f"Column {s!r} is not constant within series "
                f"{_py(bad[bad > 1].index[0])!r}; static covariates and labels must "
                "be."
            )
    for s in static:
        if not pd.api.types.is_numeric_dtype(df[s]):
            raise ValueError(
                f"Static column {s!r} must be numeric, got {df[s].dtype}; encode it "
                f"first, e.g. df[{s!r}].astype('category').cat.codes."
            )
    if not chan:
        raise ValueError("No channel columns found; pass channels=[...].")
    wide = wide.sort_values([id, time], kind="stable")
    ids, first = np.unique(wide[id].to_numpy(), return_index=True)
    n_obs = np.diff(np.append(first, len(wide)))
    row = np.searchsorted(ids, wide[id].to_numpy())
    col = np.arange(len(wide)) - first[row]
    S, T = len(ids), int(n_obs.max())
    tcol = wide[time].to_numpy()
    if np.issubdtype(tcol.dtype, np.datetime64):
        times = np.full((S, T), np.datetime64("NaT"), dtype="datetime64[ns]")
    elif np.issubdtype(tcol.dtype, np.timedelta64):
        times = np.full((S, T), np.timedelta64("NaT"), dtype="timedelta64[ns]")
    else:
        times = np.full((S, T), np.nan)
    times[row, col] = tcol
    data_vars = {}
    for c in chan:
        grid = np.full((S, T), np.nan)
        grid[row, col] = wide[c].to_numpy(np.float64)
        data_vars[c] = (("series", "obs"), grid, {"role": "channel"})
    extra = extra.reindex(ids)
    for s in static:
        data_vars[s] = ("series", extra[s].to_numpy(), {"role": "static"})
    if labels:
        codes = extra[labels]
        attrs = {"role": "label"}
        if not pd.api.types.is_integer_dtype(codes):
            cat = pd.Categorical(codes)
            attrs["classes"] = " ".join(map(str, cat.categories))
            codes = cat.codes.astype(np.int64)
        data_vars[labels] = ("series", np.asarray(codes), attrs)
    ds = xr.Dataset(
        data_vars,
        coords={
            "series": ("series", ids, {"long_name": id}),
            "time": (("series", "obs"), times),
        },
    )
    return from_xarray(
        ds,
        variables=chan,
        static=list(static),
        labels=labels,
        time_units=time_units,
        time_origin=time_origin,
        lazy=False,
    )


def _py(x):
    """A NumPy scalar as a plain Python value (for readable error messages)."""
    return x.item() if hasattr(x, "item") else x
