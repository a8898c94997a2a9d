"""The time-series side of the jobs: opening data, the train/valid/test split and its
normaliser, the evaluation protocol (interpolation and extrapolation against LOCF and
linear interpolation, 90% coverage), and the outputs (predictions.nc, plots).

Every family whose data are irregular time series (latent ODE, ODE-RNN, SVAE, ...)
uses these as they are; a family with other data (FFJORD's points) brings its own
`Family.data` and hooks.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import xarray as xr

from .. import data as cdata
from ..models import (
    LOCF,
    LinearInterpolation,
    as_series,
    check_time_kind,
    evaluation_tasks,
    in_time_units,
    predict as model_predict,
    predict_grid,
    with_spread,
)

#: Posterior samples behind the predictive means that metrics score (`metrics.json`,
#: `evaluate`): the mean of a few samples adds their spread / K to the MSE.
EVAL_SAMPLES = 32

#: The split of the series into train / valid / test.
SPLIT = (0.8, 0.1, 0.1)


def is_file(data: str | Path) -> bool:
    """Whether `open_data` reads `data` from a file (else it is a dataset name)."""
    path = Path(str(data))
    return path.suffix in (".nc", ".nc4", ".netcdf") or path.exists()


def open_data(data: str | Path) -> tuple[xr.Dataset, str]:
    """The dataset `data` names (a bundled name, a netCDF file or a zarr store) and
    its short name."""
    from .. import datasets

    path = Path(str(data))
    if is_file(data):
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


def log_channels(ds: xr.Dataset, channels) -> list[str]:
    """The channels whose attrs say `transform="log"` (modelled on the log scale)."""
    return [c for c in channels if ds[c].attrs.get("transform") == "log"]


@dataclasses.dataclass
class Prepared:
    """What `prepare` made of the data for `fit`: the dataset and its name, the
    series, its split (raw and normalised) and the normaliser; `state` goes into the
    checkpoint (what predict and evaluate need to read new data the same way),
    `summary` into metrics.json."""

    ds: xr.Dataset
    name: str
    ts: cdata.TimeSeries
    train: cdata.TimeSeries
    valid: cdata.TimeSeries
    test: cdata.TimeSeries
    normalizer: cdata.Normalizer
    train_n: cdata.TimeSeries
    valid_n: cdata.TimeSeries
    test_n: cdata.TimeSeries

    @property
    def num_channels(self) -> int:
        return self.ts.num_channels

    @property
    def state(self) -> dict[str, Any]:
        return {
            "channels": list(self.ts.channels),
            "time_units": self.ts.meta.time_units,
            "normalizer": self.normalizer.to_dict(),
        }

    @property
    def summary(self) -> dict[str, Any]:
        return {
            "channels": list(self.ts.channels),
            "ignored_variables": ignored_variables(self.ds, self.ts),
        }

    @property
    def sizes(self) -> dict[str, int]:
        return {"train": len(self.train), "valid": len(self.valid),
                "test": len(self.test)}  # fmt: skip


def prepare(data: str | Path, *, seed: int, channels=None,
            max_series: int | None = None) -> Prepared:  # fmt: skip
    """Open `data`, split it by series (80/10/10 with `seed`) and normalise with the
    training split's statistics (log first for channels marked `transform="log"`;
    times scaled by the training span). `channels`: the variables to model (None:
    every channel); `max_series`: a random subset of that many series (with
    `seed`)."""
    ds, name = open_data(data)
    if max_series is not None:
        from .._errors import is_int

        n = ds.sizes[ds["time"].dims[0]] if "time" in ds else None
        if not is_int(max_series) or max_series < 3:
            raise ValueError(
                f"max_series must be an int >= 3 (train/valid/test), got "
                f"{max_series!r}."
            )
        if n is not None and max_series < n:
            rng = np.random.default_rng(seed)
            keep = np.sort(rng.choice(n, size=max_series, replace=False))
            ds = ds.isel({ds["time"].dims[0]: keep})
    ts = cdata.from_xarray(ds, static=[], variables=channels)
    if isinstance(ts, cdata.LazyTimeSeries):
        ts = ts.load()
    train, valid, test = cdata.split_series(ts, SPLIT, seed=seed)
    norm = cdata.Normalizer.fit(
        train, log=log_channels(ds, ts.channels), time_scale="span"
    )
    train_n, valid_n, test_n = map(norm.transform, (train, valid, test))
    return Prepared(ds, name, ts, train, valid, test, norm, train_n, valid_n, test_n)


def reload(data: str | Path, state: dict[str, Any]) -> cdata.TimeSeries:
    """The series of `data` on a checkpoint's channels (its `state`), their time kind
    checked against the checkpoint's."""
    norm = cdata.Normalizer.from_dict(state["normalizer"])
    ts = as_series(open_data(data)[0], norm)
    check_time_kind(ts, state.get("time_units"))
    return ts


def ignored_variables(ds: xr.Dataset, ts) -> dict[str, str]:
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


# ------------------------------------------------------------ evaluation protocol


BASELINES = ("locf", "linear_interpolation")


def baseline_mse(ts, ctx, tgt, names=BASELINES) -> dict[str, float]:
    """The baselines' MSE on the target points: LOCF and linear interpolation from
    the context points, per channel; `train_mean` predicts the training mean (0 in
    normalised units)."""
    out = {}
    classes = {"locf": LOCF, "linear_interpolation": LinearInterpolation}
    for name in names:
        if name == "train_mean":
            out[name] = mse(np.zeros(ts.values.shape), ts.values, tgt)
            continue
        model = classes[name](ts.num_channels)
        mean = np.full(ts.values.shape, np.nan)
        for batch in cdata.batches(ts, 64, layout="padded"):
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
        out[name] = mse(mean, ts.values, tgt)
    return out


def mse(pred, truth, mask) -> float:
    """The mean squared error over the `mask`ed values (NaN when there are none)."""
    n = int(mask.sum())
    if n == 0:
        return float("nan")
    return float(((pred - truth) ** 2)[mask].sum() / n)


def coverage(mean, std, truth, mask, level: float = 0.9) -> float:
    """Fraction of the `mask`ed values inside the central `level` Gaussian predictive
    interval `mean +- z * std`."""
    from statistics import NormalDist

    z = NormalDist().inv_cdf(0.5 + level / 2)
    inside = np.abs(np.nan_to_num(truth) - mean) <= z * std
    return float(inside[mask].mean()) if mask.any() else float("nan")


TASKS = ("interpolation", "extrapolation")


def evaluate(model, ts_n, *, seed, n_samples, batch_size, fraction=0.5, split=0.5,
             tasks=TASKS, baselines=BASELINES, scale=None,
             extra_tasks=None, devices=None) -> dict[str, Any]:  # fmt: skip
    """The evaluation protocol on normalised series `ts_n`: per task (`interpolation`:
    a random `fraction` of the observed values hidden; `extrapolation`: the values
    after `split` of each series' span hidden; a family's own in `extra_tasks`,
    name -> `task(batch, *, key)`) the MSE of the predictive mean on the hidden
    values, overall and per channel, the coverage of the 90% interval (with the
    calibrated `scale`), and the `baselines`' MSE on the same points. `devices`:
    the model's predictions split over them (`ctmodels.models.predict`)."""
    from .. import _devices

    devices = _devices.resolve(devices, "evaluate")
    metrics: dict[str, Any] = {}
    all_tasks = {**evaluation_tasks(fraction, split), **(extra_tasks or {})}
    for name in tasks:
        mean, std, ctx, tgt = predict_grid(
            model,
            ts_n,
            key=jax.random.key(seed + 1000),
            n_samples=n_samples,
            batch_size=batch_size,
            task=all_tasks[name],
            devices=devices,
        )
        std = with_spread(model, std, scale)
        entry = {
            "mse": mse(mean, ts_n.values, tgt),
            "coverage_90": coverage(mean, std, ts_n.values, tgt),
            "points": int(tgt.sum()),
            "per_channel": {
                ch: mse(mean[..., c], ts_n.values[..., c], tgt[..., c])
                for c, ch in enumerate(ts_n.channels)
            },
        }
        if baselines:
            names = BASELINES if baselines is True else baselines
            entry["baselines"] = baseline_mse(ts_n, ctx, tgt, names)
        if not tgt.any():
            entry["note"] = (
                f"no points to score: no series here has enough observations for "
                f"the {name} task, so the MSE and coverage are null"
            )
        metrics[name] = entry
    return metrics


def to_model_units(ts: cdata.TimeSeries, state: dict[str, Any]) -> cdata.TimeSeries:
    """Series `ts` in data units as the model saw its training data: in the
    checkpoint's time unit and normalised as at training (`state`)."""
    norm = cdata.Normalizer.from_dict(state["normalizer"])
    return norm.transform(in_time_units(ts, state.get("time_units")))


def predict(model, ts, state, *, key, n_samples, spread, batch_size, time_units=None,
            devices=None):  # fmt: skip
    """Predictions at every position with a valid time, conditioned on the observed
    values of `ts` (data units), as xarray in data units (`V`, `V_std`); `devices`:
    split over them (`ctmodels.models.predict`)."""
    norm = cdata.Normalizer.from_dict(state["normalizer"])
    return model_predict(
        model, ts, key=key, n_samples=n_samples, normalizer=norm, spread=spread,
        time_units=time_units, batch_size=batch_size, devices=devices,
    )  # fmt: skip


def plot(observed_ts, pred, out_dir, *, series=None, max_series=6, title=""):
    """One PNG per series (`ctmodels._plot.plot_series`)."""
    from .._plot import plot_series

    kwargs = {"series": series} if series is not None else {"max_series": max_series}
    return plot_series(cdata.to_xarray(observed_ts), pred, out_dir, title=title,
                       **kwargs)  # fmt: skip
