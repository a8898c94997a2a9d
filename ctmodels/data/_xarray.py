"""xarray in and out: `from_xarray`, `to_xarray`, lazy (dask/netCDF/zarr) sources.

Default layout accepted by `from_xarray` (the one `ctmodels.datasets.load` returns):

- a `series` dim and one more dim (`obs`, or `time` itself);
- times either a 2-D coordinate or variable `time` `[series, obs]`, NaN after a series'
  last time, or a shared 1-D dimension coordinate `time`;
- data variables along `(series, obs)` are channels (NaN = missing); if any variable has
  `attrs["role"] == "channel"`, only those are;
- 1-D numeric variables along `series` are static covariates (with roles: those whose
  role is `"static"`), and a variable with role `"label"` gives the labels;
- float, `datetime64` or `timedelta64` times.
"""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd
import xarray as xr

from ._time_units import canonical_time_unit, ns_per_time_unit
from ._timeseries import Metadata, TimeSeries


def _roles(ds: xr.Dataset) -> dict[str, str]:
    return {name: str(ds[name].attrs.get("role", "")) for name in ds.variables}


def _is_numeric(da: xr.DataArray) -> bool:
    return np.issubdtype(da.dtype, np.number) or np.issubdtype(da.dtype, np.bool_)


class _Layout:
    """How a dataset maps onto a TimeSeries (resolved once, reused per lazy batch)."""

    def __init__(
        self,
        ds: xr.Dataset,
        *,
        series_dim: str,
        time: str,
        variables: Sequence[str] | None,
        static: Sequence[str] | None,
        labels: str | None,
        time_units: str | None,
        time_origin: Any,
    ):
        if not isinstance(ds, xr.Dataset):
            raise ValueError(
                f"from_xarray expects an xarray.Dataset, got {type(ds).__name__} "
                "(use DataArray.to_dataset(name=...) for a single variable)."
            )
        if time not in ds.variables:
            raise ValueError(
                f"The dataset has no time variable or coordinate {time!r} (variables: "
                f"{sorted(map(str, ds.variables))}). Pass time='<name>'."
            )
        tvar = ds[time]
        self.squeeze_series = series_dim not in ds.dims
        dims = [d for d in tvar.dims if d != series_dim]
        if len(dims) != 1:
            raise ValueError(
                f"Time {time!r} has dims {tvar.dims}: expected one time/obs dim "
                f"(shared 1-D time) or ({series_dim!r}, obs) per-series times. If "
                f"the series dim has another name, rename it to {series_dim!r} "
                "(ds.rename) or pass series_dim='<name>'."
            )
        self.obs_dim = str(dims[0])
        self.shared_time = series_dim not in tvar.dims
        self.series_dim = series_dim
        self.time = time
        self.time_is_coord = time in ds.coords
        roles = _roles(ds)
        has_roles = any(r == "channel" for r in roles.values())
        want_dims = {self.obs_dim} | (
            {series_dim} if not self.squeeze_series else set()
        )
        if variables is None:
            variables = [
                str(n)
                for n, da in ds.data_vars.items()
                if n != time
                and set(da.dims) == want_dims
                and _is_numeric(da)
                and (roles.get(n) == "channel" if has_roles else roles.get(n) == "")
            ]
            if not variables:
                raise ValueError(
                    f"No channel variables found along dims {sorted(want_dims)}; "
                    "pass variables=[...]."
                )
        variables = [str(v) for v in variables]
        for v in variables:
            if v not in ds.data_vars:
                raise ValueError(
                    f"Variable {v!r} is not in the dataset (data variables: "
                    f"{sorted(map(str, ds.data_vars))})."
                )
            if set(ds[v].dims) != want_dims:
                raise ValueError(
                    f"Variable {v!r} has dims {ds[v].dims}; channels must have dims "
                    f"{tuple(sorted(want_dims))}."
                )
            if not _is_numeric(ds[v]):
                raise ValueError(
                    f"Variable {v!r} has non-numeric dtype {ds[v].dtype}; convert it "
                    "to numbers (codes, one-hot) first."
                )
        self.variables = variables
        if labels is None:
            cands = [n for n, r in roles.items() if r == "label" and n in ds.data_vars]
            labels = cands[0] if len(cands) == 1 else None
        self.labels = labels
        if static is None:
            static = [
                str(n)
                for n, da in ds.data_vars.items()
                if not self.squeeze_series
                and da.dims == (series_dim,)
                and _is_numeric(da)
                and n != labels
                and (roles.get(n) == "static" if has_roles else roles.get(n) == "")
            ]
        self.static = [str(s) for s in static]
        for s in self.static:
            if s not in ds.data_vars or ds[s].dims != (series_dim,):
                raise ValueError(
                    f"Static covariate {s!r} must be a data variable with dims "
                    f"({series_dim!r},)."
                )
        # time kind and units
        dtype = tvar.dtype
        if np.issubdtype(dtype, np.datetime64):
            self.time_kind = "datetime"
            self.time_units = canonical_time_unit(time_units or "days")
            if time_origin is None:
                tv = np.asarray(tvar.values)
                tv = tv[~np.isnat(tv)]
                if tv.size == 0:
                    raise ValueError(f"Time {time!r} has no valid (non-NaT) time.")
                time_origin = tv.min()
            self.time_origin = np.datetime64(time_origin, "ns")
        elif np.issubdtype(dtype, np.timedelta64):
            self.time_kind = "timedelta"
            self.time_units = canonical_time_unit(time_units or "days")
            self.time_origin = None
        elif np.issubdtype(dtype, np.number):
            self.time_kind = "float"
            self.time_units = time_units or tvar.attrs.get("units")
            self.time_origin = None
        else:
            raise ValueError(
                f"Time {time!r} has dtype {dtype}; expected float, datetime64 or "
                "timedelta64."
            )
        self.time_dtype = dtype
        # everything needed to write it back exactly
        self.xarray = {
            "attrs": dict(ds.attrs),
            "var_attrs": {
                v: dict(ds[v].attrs)
                for v in [*variables, *self.static, time] + ([labels] if labels else [])
            },
            "var_dtypes": {v: ds[v].dtype for v in [*variables, *self.static]},
            "label_dtype": ds[labels].dtype if labels else None,
            "time_is_coord": self.time_is_coord,
            "obs_coords": {
                str(n): (c.values.copy(), dict(c.attrs))
                for n, c in ds.coords.items()
                if c.dims == (self.obs_dim,) and n != time
            },
            "series_coords": {
                str(n): (c.values.copy(), dict(c.attrs))
                for n, c in ds.coords.items()
                if not self.squeeze_series
                and c.dims == (series_dim,)
                and n != series_dim
            },
            "series_index_attrs": dict(ds[series_dim].attrs)
            if series_dim in ds.coords
            else None,
            "squeeze_series": self.squeeze_series,
            "n_obs": int(ds.sizes[self.obs_dim]),
        }
        if self.squeeze_series:
            ids = np.array([0])
        elif series_dim in ds.coords:
            ids = np.asarray(ds[series_dim].values)
        else:
            ids = np.arange(ds.sizes[series_dim])
        self.all_series_ids = ids
        self.xarray["original_ids"] = ids
        self.num_series = len(ids)
        label_classes = None
        if labels:
            meanings = ds[labels].attrs.get("flag_meanings") or ds[labels].attrs.get(
                "classes"
            )
            if isinstance(meanings, str):
                label_classes = tuple(meanings.split())
            elif meanings is not None:
                label_classes = tuple(map(str, meanings))
        self.meta = Metadata(
            channels=tuple(variables),
            series_ids=ids,
            static_names=tuple(self.static),
            label_name=labels,
            label_classes=label_classes,
            series_dim=series_dim,
            obs_dim=self.obs_dim,
            time_name=time,
            time_units=self.time_units,
            time_kind=self.time_kind,
            time_origin=self.time_origin,
            shared_time=self.shared_time,
            xarray=self.xarray,
        )

    def times_to_float(self, t: np.ndarray) -> np.ndarray:
        if self.time_kind == "datetime":
            nat = np.isnat(t)
            out = (t.astype("datetime64[ns]") - self.time_origin).astype(np.float64)
            out = out / ns_per_time_unit(self.time_units)
            return np.where(nat, np.nan, out)
        if self.time_kind == "timedelta":
            nat = np.isnat(t)
            out = t.astype("timedelta64[ns]").astype(np.float64)
            return np.where(nat, np.nan, out / ns_per_time_unit(self.time_units))
        return np.asarray(t, np.float64)

    def convert(self, ds: xr.Dataset, index=None) -> TimeSeries:
        """Read (the selected series of) `ds` into a TimeSeries."""
        sd, od = self.series_dim, self.obs_dim
        names = [*self.variables, *self.static] + ([self.labels] if self.labels else [])
        names = names + [self.time]
        # index and load only the variables this conversion needs (not every
        # coordinate along the series dim), with one compute for all of them; the
        # synchronous scheduler because a block is a few small chunks and dask's
        # thread pool costs more than it saves (and competes with a training step)
        sub = xr.Dataset({n: ds[n].variable for n in names})
        if index is not None and sd in sub.dims:
            sub = sub.isel(
                {sd: index if isinstance(index, slice) else np.asarray(index)}
            )
        if self.squeeze_series:
            sub = sub.expand_dims(sd)
        sub = sub.load(scheduler="synchronous")
        values = np.stack(
            [
                sub[v].transpose(sd, od).values.astype(np.float64)
                for v in self.variables
            ],
            axis=-1,
        )
        t = sub[self.time]
        if self.shared_time:
            times = self.times_to_float(np.asarray(t.values))
            times = np.broadcast_to(times, values.shape[:2])
        else:
            times = self.times_to_float(np.asarray(t.transpose(sd, od).values))
        static = (
            np.stack([sub[s].values.astype(np.float64) for s in self.static], -1)
            if self.static
            else None
        )
        labels = sub[self.labels].values if self.labels else None
        if index is None:
            ids = self.all_series_ids
        elif isinstance(index, slice):
            ids = self.all_series_ids[index]
        else:
            ids = self.all_series_ids[np.asarray(index)]
        return TimeSeries.from_arrays(
            times,
            values,
            static=static,
            labels=labels,
            meta=self.meta.replace(series_ids=np.asarray(ids)),
        )


class LazyTimeSeries:
    """A dataset read series by series (dask-backed, or netCDF/zarr opened lazily).

    `len(src)` is the number of series; `src[indices]` reads only those series and
    returns a validated `TimeSeries`. `ctmodels.data.batches` and `ctmodels.train.fit`
    accept it directly: an epoch reads the file one block at a time (block shuffle),
    and a background thread reads the next batch while the current step runs.
    `src.load()` reads everything.

    Two ways to open a file lazily:

    - `from_xarray(xr.open_dataset(path, chunks={}))`: dask-backed (lazy by default);
    - `from_xarray(xr.open_dataset(path, cache=False), lazy=True)`: xarray's own lazy
      backend without dask. Reading a batch costs about half as much (no task graph
      per read; `benchmarks/data_throughput.py`), so prefer it for streaming
      training data. `cache=False` keeps xarray from holding whole variables.
    """

    def __init__(
        self,
        ds: xr.Dataset,
        layout: _Layout,
        *,
        block_size: int = 256,
        transform: Callable[[TimeSeries], TimeSeries] | None = None,
    ):
        if block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {block_size}.")
        self.ds = ds
        self.layout = layout
        self.meta = layout.meta
        self.block_size = int(block_size)
        self.transform = transform
        self._blocks: dict[int, TimeSeries] = {}  # the two most recently read
        self._lock = threading.Lock()  # batches may be read by a prefetch thread

    def map(self, fn: Callable[[TimeSeries], TimeSeries]) -> LazyTimeSeries:
        """The same source with `fn` applied to every `TimeSeries` it reads (after
        any earlier `map`): e.g. `Normalizer.transform`, which calls this for a lazy
        source. Nothing is read now."""
        before = self.transform
        fn_all = fn if before is None else (lambda ts: fn(before(ts)))
        return LazyTimeSeries(
            self.ds, self.layout, block_size=self.block_size, transform=fn_all
        )

    def _convert(self, index) -> TimeSeries:
        ts = self.layout.convert(self.ds, index)
        return ts if self.transform is None else self.transform(ts)

    def read(self, start: int, stop: int) -> TimeSeries:
        """Series `start` to `stop - 1` with one contiguous read (not cached): what
        a pass over the whole source in chunks uses (`Normalizer.fit`)."""
        return self._convert(slice(int(start), min(int(stop), len(self))))

    def __len__(self) -> int:
        return self.layout.num_series

    @property
    def num_series(self) -> int:
        return self.layout.num_series

    @property
    def channels(self) -> tuple[str, ...]:
        return self.meta.channels

    def _block(self, k: int) -> TimeSeries:
        if k not in self._blocks:
            if len(self._blocks) >= 2:
                self._blocks.pop(next(iter(self._blocks)))  # least recently read
            B = self.block_size
            self._blocks[k] = self._convert(slice(k * B, min(len(self), (k + 1) * B)))
        return self._blocks[k]

    def __getitem__(self, index) -> TimeSeries:
        """Read the selected series.

        Requests that fall within one or two aligned blocks of `block_size` series (as
        the batches of `batches(..., shuffle="block")` do) read each block once, with
        one contiguous slice, and serve later requests from it. Only the two most
        recently read blocks are kept, so memory stays bounded. Scattered requests
        read just the requested series.
        """
        index = np.atleast_1d(np.arange(len(self))[index])
        if index.size == 0:
            raise ValueError("Selecting no series gives an empty TimeSeries.")
        B = self.block_size
        ks = np.unique(index // B)
        if ks.size > 2:
            return self._convert(index)
        with self._lock:
            parts = [self._block(int(k)) for k in ks]
        if len(parts) == 1:
            return parts[0][index - ks[0] * B]
        # the requested series of each block, joined, then in the order asked for
        # (joining only the selections: not two whole blocks per batch)
        first = index // B == ks[0]
        pos = np.concatenate([np.flatnonzero(first), np.flatnonzero(~first)])
        got = _concat(
            [parts[0][index[first] - ks[0] * B], parts[1][index[~first] - ks[1] * B]]
        )
        return got if np.array_equal(pos, np.arange(len(pos))) else got[np.argsort(pos)]

    def load(self) -> TimeSeries:
        return self._convert(None)

    def __repr__(self) -> str:
        return (
            f"LazyTimeSeries(series={len(self)}, channels={list(self.channels)}, "
            f"source={self.ds.encoding.get('source', '<in memory>')})"
        )


def _concat(parts: list[TimeSeries]) -> TimeSeries:
    """Series from blocks of one file, one after the other (same time axis length)."""

    def cat(name):
        xs = [getattr(p, name) for p in parts]
        return None if xs[0] is None else np.concatenate(xs)

    ids = np.concatenate([np.asarray(p.meta.series_ids) for p in parts])
    return dataclasses.replace(
        parts[0],
        **{
            f: cat(f)
            for f in ("times", "values", "mask", "time_mask", "static", "labels")
        },
        meta=parts[0].meta.replace(series_ids=ids),
    )


def _is_lazy(ds: xr.Dataset) -> bool:
    return any(v.chunks is not None for v in ds.data_vars.values())


def from_xarray(
    ds: xr.Dataset,
    *,
    series_dim: str = "series",
    time: str = "time",
    variables: Sequence[str] | None = None,
    static: Sequence[str] | None = None,
    labels: str | None = None,
    time_units: str | None = None,
    time_origin: Any = None,
    lazy: bool | None = None,
    block_size: int = 256,
) -> TimeSeries | LazyTimeSeries:
    """Build a `TimeSeries` from an `xarray.Dataset` (layout in the module docstring).

    **Arguments:**

    - `ds`: the dataset.
    - `series_dim`: the dim that indexes series (absent = one series).
    - `time`: name of the time coordinate/variable (2-D per-series, or 1-D shared).
    - `variables`: channel variables; default: those with `role="channel"` in their
      attrs, else every numeric `(series, obs)` data variable.
    - `static`: static covariates (1-D along `series_dim`); default: role `"static"`
      (or every numeric 1-D variable if no roles are set). `[]` for none.
    - `labels`: the label variable; default the one with role `"label"`, if unique.
    - `time_units`: for datetime/timedelta times, the float unit (default `"days"`);
      for float times, overrides the `units` attribute.
    - `time_origin`: datetime that becomes time 0 (default: the earliest time).
    - `lazy`: return a `LazyTimeSeries` that reads series batch by batch. Default: lazy
      when the dataset is dask-backed (e.g. `xr.open_dataset(path, chunks={})`).
    - `block_size`: series per contiguous read of a lazy source (see
      `LazyTimeSeries.__getitem__`; shuffle with `batches(..., shuffle="block")`).

    **Returns:** a `TimeSeries` (or `LazyTimeSeries`). `to_xarray` inverts it.
    """
    layout = _Layout(
        ds,
        series_dim=series_dim,
        time=time,
        variables=variables,
        static=static,
        labels=labels,
        time_units=time_units,
        time_origin=time_origin,
    )
    if lazy is None:
        lazy = _is_lazy(ds)
    if lazy:
        return LazyTimeSeries(ds, layout, block_size=block_size)
    return layout.convert(ds)


def _float_to_times(meta: Metadata, t: np.ndarray) -> np.ndarray:
    if meta.time_kind == "datetime":
        ns = np.round(t * ns_per_time_unit(meta.time_units))
        out = meta.time_origin + np.where(np.isnan(ns), 0, ns).astype("timedelta64[ns]")
        return np.where(np.isnan(t), np.datetime64("NaT"), out)
    if meta.time_kind == "timedelta":
        ns = np.round(t * ns_per_time_unit(meta.time_units))
        out = np.where(np.isnan(ns), 0, ns).astype("timedelta64[ns]")
        return np.where(np.isnan(t), np.timedelta64("NaT"), out)
    return t


def _cast_back(x: np.ndarray, dtype) -> np.ndarray:
    if dtype is None or np.issubdtype(dtype, np.floating):
        return x.astype(dtype) if dtype is not None else x
    if np.isnan(x).any():
        return x  # integers with missing entries stay float
    return x.astype(dtype)


def to_xarray(
    ts: TimeSeries,
    *,
    mean: np.ndarray | None = None,
    std: np.ndarray | None = None,
    quantiles: Mapping[float, np.ndarray] | None = None,
) -> xr.Dataset:
    """Write a `TimeSeries` (or predictions on its grid) back to an `xarray.Dataset`.

    Without `mean`, this inverts `from_xarray` exactly: the same dims, coordinates,
    attrs, units, dtypes and NaN pattern (restricted to the channels, static covariates
    and labels that the `TimeSeries` holds).

    With `mean` (`[S, T, C]`, e.g. from a model's `predict` mapped back with
    `ctmodels.data.unbatch`), each channel `V` holds the predicted mean at every
    position with a valid time (observed or not) and NaN elsewhere; `std` adds
    `V_std`, and `quantiles={q: array}` adds `V_q{100q:g}` (e.g. `V_q10`).
    """
    meta = ts.meta
    xinfo = meta.xarray
    sd, od = meta.series_dim, meta.obs_dim
    dims = (sd, od)
    valid_t = ts.time_mask
    data_vars: dict[str, Any] = {}
    var_attrs = xinfo.get("var_attrs", {})
    var_dtypes = xinfo.get("var_dtypes", {})

    def grid(arr, c, only_observed):
        where = ts.mask[..., c] if only_observed else valid_t
        return np.where(where, arr[..., c], np.nan)

    for c, name in enumerate(meta.channels):
        if mean is None:
            x = _cast_back(grid(ts.values, c, True), var_dtypes.get(name))
            data_vars[name] = (dims, x, var_attrs.get(name, {}))
        else:
            attrs = dict(var_attrs.get(name, {}), prediction="mean")
            data_vars[name] = (dims, grid(np.asarray(mean), c, False), attrs)
            if std is not None:
                attrs = dict(var_attrs.get(name, {}), prediction="std")
                attrs["long_name"] = (
                    f"predictive standard deviation of {attrs.get('long_name', name)}"
                )
                data_vars[f"{name}_std"] = (
                    dims,
                    grid(np.asarray(std), c, False),
                    attrs,
                )
            for q, arr in (quantiles or {}).items():
                attrs = dict(var_attrs.get(name, {}), prediction=f"quantile {q:g}")
                data_vars[f"{name}_q{100 * q:g}"] = (
                    dims,
                    grid(np.asarray(arr), c, False),
                    attrs,
                )
    if ts.static is not None:
        for k, name in enumerate(meta.static_names):
            data_vars[name] = (
                (sd,),
                _cast_back(ts.static[:, k], var_dtypes.get(name)),
                var_attrs.get(name, {}),
            )
    if ts.labels is not None and meta.label_name:
        dtype = xinfo.get("label_dtype") or ts.labels.dtype
        data_vars[meta.label_name] = (
            (sd,),
            ts.labels.astype(dtype),
            var_attrs.get(meta.label_name, {}),
        )
    coords: dict[str, Any] = {}
    if xinfo.get("series_index_attrs") is not None or not xinfo:
        coords[sd] = (
            sd,
            np.asarray(meta.series_ids),
            xinfo.get("series_index_attrs") or {},
        )
    t = np.where(valid_t, ts.times, np.nan)
    time_attrs = var_attrs.get(meta.time_name, {})
    if meta.shared_time:
        t1 = _float_to_times(meta, ts.times[0])
        coords[meta.time_name] = (od, t1, time_attrs)
    else:
        t2 = _float_to_times(meta, t)
        if xinfo.get("time_is_coord", True):
            coords[meta.time_name] = (dims, t2, time_attrs)
        else:
            data_vars[meta.time_name] = (dims, t2, time_attrs)
    for name, (vals, attrs) in xinfo.get("obs_coords", {}).items():
        coords[name] = (od, vals, attrs)
    if xinfo.get("series_coords"):
        all_ids = None
        for name, (vals, attrs) in xinfo["series_coords"].items():
            if all_ids is None:
                all_ids = pd.Index(_original_ids(meta))
            pos = all_ids.get_indexer(np.asarray(meta.series_ids))
            if (pos < 0).any():
                continue
            coords[name] = (sd, vals[pos], attrs)
    out = xr.Dataset(data_vars, coords=coords, attrs=dict(xinfo.get("attrs", {})))
    if xinfo.get("squeeze_series") and out.sizes[sd] == 1:
        out = out.squeeze(sd, drop=True)
    return out


def _original_ids(meta: Metadata) -> np.ndarray:
    return meta.xarray.get("original_ids", meta.series_ids)
