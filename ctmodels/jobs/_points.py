"""The points side of the jobs (density families such as FFJORD): data that are
independent samples, one row per sample and one column per dimension.

`prepare` opens a bundled dataset, a CSV file (one row per sample, every column a
dimension) or a netCDF file (data variables over one sample dim), drops rows with a
missing value (with a warning that counts them), splits the rows train / valid / test
(80/10/10) by seed and standardises each column with the training split's mean and
standard deviation. The standardisation is an affine map `x_std = (x - mean) / scale`
with log-determinant `-sum(log scale)` per sample, so a density fitted to the
standardised data gives, in the data's original units,

`NLL_orig = NLL_std + sum(log scale)`

(`Standardiser.log_scale`); every NLL the jobs report is in original units.

Images (`levels` given, e.g. `--option levels=17` for grey levels 0..16): every value
must be an integer grey level in `[0, levels)`; the data are not standardised (the
model's uniform dequantisation and logit transform take its place, with their
log-determinants counted), constant pixels are allowed, and NLLs are of the
dequantised data `v = x + u`, `u ~ U[0, 1)^D`, in grey-level units (nats per image,
and bits per dimension: the usual dequantised bound). A netCDF variable over the
sample dim and further dims (an image `[sample, row, col]`) is flattened row-major
into columns `VAR_i_j`.
"""

from __future__ import annotations

import dataclasses
import math
import types
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import xarray as xr

#: The split of the rows into train / valid / test.
SPLIT = (0.8, 0.1, 0.1)

#: The fewest rows `prepare` splits (8 / 1 / 1).
MIN_ROWS = 10

#: File suffixes read as a table (CSV) and as netCDF.
CSV_SUFFIXES = (".csv", ".txt")
NETCDF_SUFFIXES = (".nc", ".nc4", ".netcdf", ".cdf")

#: The name of the sample dim of the netCDF files the jobs write.
SAMPLE_DIM = "sample"


def is_file(data: str | Path) -> bool:
    """Whether `data` names a file (else a bundled dataset name)."""
    path = Path(str(data))
    return path.suffix.lower() in CSV_SUFFIXES + NETCDF_SUFFIXES or path.exists()


@dataclasses.dataclass
class Points:
    """Rows of points in the data's own units: `values [n, D]` (float64), the
    column names, and (for the data `fit` read) which split each row is in."""

    values: np.ndarray
    columns: tuple[str, ...]
    split: np.ndarray | None = None
    image_shape: tuple[int, ...] | None = None
    #: the variables (netCDF) the columns were read from, where they differ
    variables: tuple[str, ...] | None = None

    def __len__(self) -> int:
        return self.values.shape[0]

    @property
    def dim(self) -> int:
        return self.values.shape[1]

    @property
    def meta(self):
        # what the generic `fit` reads to pick the rows it plots (`series_ids`)
        return types.SimpleNamespace(series_ids=np.arange(len(self)))


@dataclasses.dataclass(frozen=True)
class Standardiser:
    """`x_std = (x - mean) / scale` per column (the training split's statistics)."""

    mean: np.ndarray
    scale: np.ndarray

    @classmethod
    def fit(cls, values: np.ndarray) -> Standardiser:
        return cls(values.mean(axis=0), values.std(axis=0))

    @classmethod
    def identity(cls, dim: int) -> Standardiser:
        """No standardisation (images: the model's logit transform replaces it)."""
        return cls(np.zeros(dim), np.ones(dim))

    @property
    def log_scale(self) -> float:
        """`sum(log scale)`: add it to an NLL of standardised data (nats per
        sample) for the NLL in the data's units."""
        return float(np.sum(np.log(self.scale)))

    def transform(self, values: np.ndarray) -> np.ndarray:
        return ((values - self.mean) / self.scale).astype(np.float32)

    def inverse(self, values: np.ndarray) -> np.ndarray:
        return np.asarray(values, np.float64) * self.scale + self.mean

    def to_dict(self) -> dict[str, list[float]]:
        return {"mean": self.mean.tolist(), "scale": self.scale.tolist()}

    @classmethod
    def from_dict(cls, d) -> Standardiser:
        return cls(np.asarray(d["mean"], float), np.asarray(d["scale"], float))


@dataclasses.dataclass
class ModelPoints:
    """Points as a model sees them (standardised, float32) with what it takes to
    report in the data's units: the original `values` and the `log_scale`."""

    x: np.ndarray
    values: np.ndarray
    columns: tuple[str, ...]
    log_scale: float
    gaussian: dict[str, Any] | None = None
    levels: int | None = None

    def __len__(self) -> int:
        return self.x.shape[0]


# ------------------------------------------------------------------ reading


def _numeric_frame_columns(frame, where: str, columns) -> list[str]:
    import pandas as pd

    if columns is None:
        columns = [str(c) for c in frame.columns]
    else:
        missing = [c for c in columns if c not in frame.columns]
        if missing:
            raise ValueError(
                f"{where} has no column(s) {missing}; its columns: "
                f"{[str(c) for c in frame.columns]}."
            )
    bad = [c for c in columns if not pd.api.types.is_numeric_dtype(frame[c])
           or pd.api.types.is_bool_dtype(frame[c])]  # fmt: skip
    if bad:
        raise ValueError(
            f"{where}: column(s) {bad} are not numeric (every column is a dimension "
            "of the points). Remove them, or choose the numeric columns with "
            "--channels a,b (channels=[...])."
        )
    return list(columns)


def _read_csv(path: Path, columns) -> Points:
    import pandas as pd

    try:
        frame = pd.read_csv(path)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as e:
        raise ValueError(f"--data {str(path)!r} is not a readable CSV file: {e}") from e
    where = f"--data {str(path)!r}"
    columns = _numeric_frame_columns(frame, where, columns)
    return Points(frame[columns].to_numpy(np.float64), tuple(columns))


def _from_dataset(ds: xr.Dataset, where: str, columns) -> Points:
    if columns is None:
        named = ds.attrs.get("channels")
        if isinstance(named, str) and all(c in ds.data_vars for c in named.split()):
            columns = named.split()
        else:
            columns = [str(v) for v in ds.data_vars]
    missing = [c for c in columns if c not in ds.data_vars]
    if missing:
        raise ValueError(
            f"{where} has no variable(s) {missing}; its data variables: "
            f"{[str(v) for v in ds.data_vars]}."
        )
    if not columns:
        raise ValueError(f"{where} has no data variables.")
    dims = {c: ds[c].dims for c in columns}
    first = {d[0] if d else None for d in dims.values()}
    if any(len(d) < 1 for d in dims.values()) or len(first) != 1:
        raise ValueError(
            f"{where}: the point variables must all lie over one sample dim (their "
            f"first dim), but their dims are {dims}. Choose variables over one dim "
            "with --channels a,b."
        )
    bad = [c for c in columns if not np.issubdtype(ds[c].dtype, np.number)
           or ds[c].dtype == bool]  # fmt: skip
    if bad:
        raise ValueError(
            f"{where}: variable(s) {bad} are not numeric. Choose the numeric ones "
            "with --channels a,b (channels=[...])."
        )
    parts, names = [], []
    shape = None
    for c in columns:
        arr = np.asarray(ds[c].values, np.float64)
        parts.append(arr.reshape(arr.shape[0], -1))
        if arr.ndim == 1:
            names.append(c)
        else:
            # an image [sample, row, col] (or any array per sample): row-major columns
            shape = arr.shape[1:] if len(columns) == 1 else None
            names += [f"{c}_" + "_".join(map(str, i))
                      for i in np.ndindex(arr.shape[1:])]  # fmt: skip
    return Points(
        np.concatenate(parts, 1),
        tuple(names),
        image_shape=shape,
        variables=tuple(columns),
    )


def open_points(data: str | Path, columns=None) -> tuple[Points, str, int]:
    """`(points, short name, rows dropped)`: the rows of `data` (a bundled dataset
    name, a CSV or a netCDF file) on `columns` (None: every column / every data
    variable; a bundled set's own `channels`), rows with a missing value dropped
    (with a warning that counts them). ValueError for what cannot be modelled."""
    from .. import datasets

    if isinstance(columns, str):
        columns = [c.strip() for c in columns.split(",") if c.strip()]
    path = Path(str(data))
    if is_file(data):
        if not path.exists():
            raise FileNotFoundError(f"Data file {str(path)!r} does not exist.")
        if path.suffix.lower() in NETCDF_SUFFIXES:
            points = _from_dataset(xr.load_dataset(path), f"--data {str(path)!r}",
                                   columns)  # fmt: skip
        elif path.suffix.lower() in CSV_SUFFIXES:
            points = _read_csv(path, columns)
        else:
            raise ValueError(
                f"--data {str(path)!r}: give a CSV (.csv, one row per sample) or a "
                "netCDF file (.nc, data variables over one sample dim), or a "
                "bundled dataset name."
            )
        name = path.stem
    else:
        points = _from_dataset(datasets.load(str(data)), f"dataset {str(data)!r}",
                               columns)  # fmt: skip
        name = str(data)
    where = f"--data {str(data)!r}"
    if np.isinf(points.values).any():
        cols = [c for c, bad in zip(points.columns, np.isinf(points.values).any(0),
                                    strict=True) if bad]  # fmt: skip
        raise ValueError(f"{where}: column(s) {cols} hold infinite values.")
    missing = np.isnan(points.values).any(axis=1)
    dropped = int(missing.sum())
    if dropped:
        if dropped == len(points):
            raise ValueError(f"{where}: every row has a missing (NaN) value.")
        warnings.warn(
            f"{where}: dropped {dropped} of {len(points)} rows with a missing (NaN) "
            "value; the rest are used.",
            stacklevel=3,
        )
        points = dataclasses.replace(points, values=points.values[~missing])
    return points, name, dropped


def _check_constant(values: np.ndarray, columns, where: str) -> None:
    const = [c for c, s in zip(columns, values.std(axis=0), strict=True)
             if not s > 0]  # fmt: skip
    if const:
        raise ValueError(
            f"{where}: column(s) {const} are constant, so they have no density "
            "(their standard deviation is 0). Leave them out with --channels a,b "
            "(channels=[...])."
        )


def gaussian_fit(values: np.ndarray) -> dict[str, Any]:
    """The maximum-likelihood full-covariance Gaussian of `values` (a baseline)."""
    mean = values.mean(axis=0)
    cov = np.atleast_2d(np.cov(values.T, bias=True))
    return {"mean": mean.tolist(), "cov": cov.tolist()}


def gaussian_nll(gaussian: dict[str, Any], values: np.ndarray) -> float:
    """Mean NLL (nats per sample) of `values` under `gaussian` (NaN if singular)."""
    mean, cov = np.asarray(gaussian["mean"]), np.asarray(gaussian["cov"])
    sign, logdet = np.linalg.slogdet(cov)
    if sign <= 0:
        return float("nan")
    diff = values - mean
    maha = np.einsum("ni,ij,nj->n", diff, np.linalg.inv(cov), diff)
    nll = 0.5 * (maha + logdet + values.shape[1] * math.log(2 * math.pi))
    return float(np.mean(nll))


def check_levels(values: np.ndarray, levels: int | None, where: str) -> None:
    """For images (`levels` not None): every value an integer grey level in
    `[0, levels)`, else ValueError saying what to do."""
    if levels is None:
        return
    lo, hi = float(values.min()), float(values.max())
    if lo < 0 or hi >= levels:
        todo = (
            "Grey levels start at 0: shift the data"
            if lo < 0
            else f"Give --option levels=N with N > the largest value "
            f"({math.floor(hi) + 1} here)"
        )
        raise ValueError(
            f"{where}: with levels={levels} every value must be a grey level in "
            f"[0, {levels}) (0 .. {levels - 1}), but the values run from {lo:g} to "
            f"{hi:g}. {todo}, or leave levels out for continuous data."
        )
    if not np.all(values == np.floor(values)):
        raise ValueError(
            f"{where}: with levels={levels} every value must be an integer grey "
            "level (images are dequantised with uniform noise), but some are not. "
            "Leave levels out for continuous data."
        )


def dequantise(values: np.ndarray, *, seed: int = 0) -> np.ndarray:
    """`values + u`, `u ~ U[0, 1)` per value (a fixed draw by `seed`): the points
    whose density the image NLLs score."""
    rng = np.random.default_rng(seed)
    return values + rng.uniform(size=values.shape)


def image_shape(state_or_points, dim: int) -> tuple[int, int] | None:
    """The 2-D shape of an image (recorded from the data, else square `dim`)."""
    shape = getattr(state_or_points, "image_shape", None)
    if shape is None and isinstance(state_or_points, dict):
        shape = state_or_points.get("image_shape")
    if shape is not None and len(shape) == 2:
        return int(shape[0]), int(shape[1])
    side = math.isqrt(dim)
    return (side, side) if side * side == dim else None


# ------------------------------------------------------------------ the data hooks


@dataclasses.dataclass
class Prepared:
    """What `prepare` made of the data for `fit` (see `Family.data`): every row
    (`ts`, with its split), the three splits in data units, the standardiser, the
    standardised training and validation arrays (`train_n`, `valid_n`, what
    `ctmodels.train.fit` trains on) and the test split as `ModelPoints` (`test_n`,
    scored in the data's units). Images (`levels`): the standardiser is the
    identity and the arrays are the grey levels."""

    name: str
    ts: Points
    train: Points
    valid: Points
    test: Points
    standardiser: Standardiser
    train_n: np.ndarray
    valid_n: np.ndarray
    test_n: ModelPoints
    dropped: int
    levels: int | None = None
    gaussian: dict[str, Any] | None = None

    @property
    def dim(self) -> int:
        return self.ts.dim

    @property
    def state(self) -> dict[str, Any]:
        out = {
            "channels": list(self.ts.columns),
            "standardiser": self.standardiser.to_dict(),
            "gaussian": self.gaussian,
        }
        if self.ts.variables is not None and list(self.ts.variables) != out["channels"]:
            out["variables"] = list(self.ts.variables)
        if self.levels is not None:
            out["levels"] = int(self.levels)
            shape = image_shape(self.ts, self.dim)
            out["image_shape"] = None if shape is None else list(shape)
        return out

    @property
    def summary(self) -> dict[str, Any]:
        out = {
            "channels": list(self.ts.columns),
            "dropped_rows": self.dropped,
            "dropped_rows_why": "a missing (NaN) value" if self.dropped else None,
            "log_scale": self.standardiser.log_scale,
        }
        if self.levels is not None:
            out["levels"] = int(self.levels)
            out["preprocessing"] = (
                f"images: grey levels 0..{self.levels - 1}, uniformly dequantised, "
                "logit transform in the model; not standardised"
            )
        return out

    @property
    def sizes(self) -> dict[str, int]:
        return {"train": len(self.train), "valid": len(self.valid),
                "test": len(self.test)}  # fmt: skip


def _levels(model_options) -> int | None:
    levels = (model_options or {}).get("levels")
    return None if levels is None else int(levels)


def prepare(data: str | Path, *, seed: int, channels=None,
            max_series: int | None = None, batch_size: int | None = None,
            model_options: dict[str, Any] | None = None) -> Prepared:  # fmt: skip
    """Open `data` (`open_points`), optionally keep a random `max_series` rows,
    split the rows 80/10/10 by `seed` and standardise with the training split's
    statistics. Constant columns, fewer than `MIN_ROWS` rows and (given
    `batch_size`) a training split smaller than a batch are refused.

    With `model_options["levels"]` (images) the values must be integer grey levels
    in `[0, levels)` (`check_levels`); they are not standardised, constant pixels
    are allowed, and the Gaussian baseline is fitted to the dequantised training
    split."""
    from .._errors import is_int

    levels = _levels(model_options)
    points, name, dropped = open_points(data, channels)
    where = f"--data {str(data)!r}"
    check_levels(points.values, levels, where)
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(points))
    if max_series is not None:
        if not is_int(max_series) or max_series < 3:
            raise ValueError(
                f"max_series (rows, for points) must be an int >= 3 "
                f"(train/valid/test), got {max_series!r}."
            )
        order = order[:max_series]
    n = len(order)
    n_train, n_valid = int(round(SPLIT[0] * n)), int(round(SPLIT[1] * n))
    if n < MIN_ROWS:
        raise ValueError(
            f"{where}: {n} rows are too few to split into train / valid / test "
            f"({SPLIT[0]:.0%}/{SPLIT[1]:.0%}/{SPLIT[2]:.0%}); give at least "
            f"{MIN_ROWS}."
        )
    if batch_size is not None and n_train < batch_size:
        raise ValueError(
            f"{where}: the training split has {n_train} rows, fewer than a batch "
            f"({batch_size}); give a --batch-size of at most {n_train}, or more "
            "rows."
        )
    if levels is None:  # a constant pixel of an image has a density (dequantised)
        _check_constant(points.values[order], points.columns, where)
    split = np.full(len(points), "", dtype=object)
    idx = np.split(order, [n_train, n_train + n_valid])
    for label, rows in zip(("train", "valid", "test"), idx, strict=True):
        split[rows] = label
    keep = np.sort(order)
    everything = dataclasses.replace(points, values=points.values[keep],
                                     split=split[keep])  # fmt: skip
    train, valid, test = (Points(points.values[i], points.columns) for i in idx)
    if levels is None:
        _check_constant(train.values, points.columns, f"{where} (its training split)")
        std = Standardiser.fit(train.values)
        gauss = gaussian_fit(train.values)
    else:
        std = Standardiser.identity(points.dim)
        gauss = gaussian_fit(dequantise(train.values, seed=seed))
    return Prepared(
        name, everything, train, valid, test, std,
        std.transform(train.values), std.transform(valid.values),
        ModelPoints(std.transform(test.values), test.values, test.columns,
                    std.log_scale, gauss, levels),
        dropped, levels, gauss,
    )  # fmt: skip


def reload(data: str | Path, state: dict[str, Any]) -> Points:
    """The rows of `data` on a checkpoint's columns (rows with a missing value
    dropped, with a warning); images: checked against the checkpoint's `levels`."""
    points, _, _ = open_points(data, list(state.get("variables", state["channels"])))
    if points.columns != tuple(state["channels"]):
        raise ValueError(
            f"--data {str(data)!r} gives {points.dim} columns "
            f"({', '.join(points.columns[:4])}, ...), but the checkpoint was "
            f"trained on {len(state['channels'])} "
            f"({', '.join(state['channels'][:4])}, ...)."
        )
    check_levels(points.values, state.get("levels"), f"--data {str(data)!r}")
    return points


def to_model_units(points: Points, state: dict[str, Any]) -> ModelPoints:
    """`points` standardised as the checkpoint's training data were (images: the
    grey levels as they are)."""
    std = Standardiser.from_dict(state["standardiser"])
    return ModelPoints(std.transform(points.values), points.values, points.columns,
                       std.log_scale, state.get("gaussian"),
                       state.get("levels"))  # fmt: skip


def write_points(values: np.ndarray, columns, out: Path, *, attrs=None) -> None:
    """Write rows `values [n, D]` with `columns` as CSV or netCDF (by `out`'s
    suffix; variables over the `sample` dim), atomically."""
    import pandas as pd

    suffix = out.suffix.lower()
    tmp = out.with_name(out.name + ".tmp")
    try:
        if suffix in NETCDF_SUFFIXES:
            ds = xr.Dataset(
                {c: (SAMPLE_DIM, values[:, i]) for i, c in enumerate(columns)},
                coords={SAMPLE_DIM: np.arange(values.shape[0])},
                attrs=dict(attrs or {}),
            )
            ds.to_netcdf(tmp)
        else:
            pd.DataFrame(values, columns=list(columns)).to_csv(tmp, index=False)
        tmp.replace(out)
    finally:
        tmp.unlink(missing_ok=True)


def check_points_out(out: str | Path) -> Path:
    """`out` as a CSV or netCDF path for points (ValueError for another suffix)."""
    out = Path(out)
    if out.suffix.lower() not in CSV_SUFFIXES + NETCDF_SUFFIXES:
        raise ValueError(
            f"--out {str(out)!r}: give a .csv or a .nc file (the format follows the "
            "suffix)."
        )
    return out
