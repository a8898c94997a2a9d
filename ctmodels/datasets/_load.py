"""Find, parse and describe the bundled datasets.

Each dataset is one entry of `_REGISTRY`: a file in the data folder, a parser that
turns it into an `xarray.Dataset` with dims `(series, obs)`, and the metadata that
`available()` lists. The data cards (`datasets/<name>.md`) say where each file came
from, its license and how to regenerate it.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import xarray as xr

_DAYS_PER_YEAR = 365.25


@dataclasses.dataclass(frozen=True)
class _Entry:
    name: str
    filename: str
    parse: Callable[[Path], xr.Dataset]
    source: str
    license: str
    task: str
    doc: str


def _data_dirs() -> list[Path]:
    """Candidate data folders, in search order: the wheel's `ctmodels/_data_files`,
    then the top-level `datasets/` folder of a source checkout."""
    package = Path(__file__).resolve().parent.parent  # .../ctmodels
    return [package / "_data_files", package.parent / "datasets"]


def _find(filename: str) -> Path:
    for folder in _data_dirs():
        path = folder / filename
        if path.is_file():
            return path
    searched = ", ".join(str(d) for d in _data_dirs())
    raise FileNotFoundError(
        f"The data file {filename!r} is missing (searched {searched}). Reinstall "
        "ctmodels from a wheel or sdist (which bundles the top-level datasets/ "
        "folder), or run from a source checkout."
    )


# ---------------------------------------------------------------------------- pbcseq

_PBC_CHANNELS = {
    # column: (variable name, long name, units, transform suggested for modelling)
    "bili": ("bili", "serum bilirubin", "mg/dl", "log"),
    "chol": ("chol", "serum cholesterol", "mg/dl", "log"),
    "albumin": ("albumin", "serum albumin", "g/dl", "none"),
    "alk.phos": ("alk_phos", "alkaline phosphatase", "U/liter", "log"),
    "ast": ("ast", "aspartate aminotransferase (SGOT)", "U/ml", "log"),
    "platelet": ("platelet", "platelet count", "10^3/mm^3", "none"),
    "protime": ("protime", "standardised blood clotting time", "seconds", "log"),
}
_PBC_VISIT_COVARIATES = {
    "ascites": "presence of ascites (0/1)",
    "hepato": "presence of hepatomegaly or enlarged liver (0/1)",
    "spiders": "blood vessel malformations in the skin (0/1)",
    "edema": "0 no edema, 0.5 untreated or successfully treated, 1 despite diuretics",
    "stage": "histologic stage of disease (1-4, needs biopsy)",
}


def _parse_pbcseq(path: Path) -> xr.Dataset:
    df = pd.read_csv(path)
    df = df.sort_values(["id", "day"], kind="stable").reset_index(drop=True)
    ids, first = np.unique(df["id"].to_numpy(), return_index=True)
    n_obs = np.diff(np.append(first, len(df)))
    n_series, n_max = len(ids), int(n_obs.max())
    row = np.searchsorted(ids, df["id"].to_numpy())
    col = np.arange(len(df)) - first[row]

    def grid(values, fill=np.nan):
        out = np.full((n_series, n_max), fill, dtype=np.float64)
        out[row, col] = values
        return out

    visit = ("series", "obs")
    time = grid(df["day"].to_numpy(np.float64) / _DAYS_PER_YEAR)
    data_vars = {}
    for column, (name, long_name, units, transform) in _PBC_CHANNELS.items():
        data_vars[name] = (
            visit,
            grid(df[column].to_numpy(np.float64)),
            {
                "long_name": long_name,
                "units": units,
                "role": "channel",
                "transform": transform,
                "source_column": column,
            },
        )
    for column, long_name in _PBC_VISIT_COVARIATES.items():
        data_vars[column] = (
            visit,
            grid(df[column].to_numpy(np.float64)),
            {"long_name": long_name, "role": "visit_covariate"},
        )

    base = df.iloc[first]
    sex = base["sex"].astype(str).to_numpy()
    if not set(np.unique(sex)) <= {"f", "m"}:
        raise ValueError(f"{path}: unexpected values in column 'sex': {set(sex)}.")
    static = {"role": "static"}
    data_vars["age"] = (
        "series",
        base["age"].to_numpy(np.float64),
        {"long_name": "age at enrolment", "units": "years", **static},
    )
    data_vars["sex"] = (
        "series",
        (sex == "m").astype(np.int8),
        {
            "long_name": "sex",
            "flag_values": np.array([0, 1], np.int8),
            "flag_meanings": "female male",
            **static,
        },
    )
    data_vars["trt"] = (
        "series",
        base["trt"].to_numpy().astype(np.int8),
        {
            "long_name": "randomised treatment",
            "flag_values": np.array([0, 1], np.int8),
            "flag_meanings": "placebo D-penicillamine",
            **static,
        },
    )
    data_vars["futime"] = (
        "series",
        base["futime"].to_numpy(np.float64) / _DAYS_PER_YEAR,
        {
            "long_name": "time from enrolment to death, transplant or end of follow-up "
            "(July 1986); an outcome, not a baseline covariate",
            "units": "years",
            "role": "outcome",
        },
    )
    data_vars["status"] = (
        "series",
        base["status"].to_numpy().astype(np.int8),
        {
            "long_name": "status at futime",
            "flag_values": np.array([0, 1, 2], np.int8),
            "flag_meanings": "censored transplant dead",
            "role": "outcome",
        },
    )
    coords = {
        "series": ("series", ids, {"long_name": "patient id (case number)"}),
        "time": (
            visit,
            time,
            {
                "long_name": "time of visit since enrolment (NaN after a patient's "
                "last visit)",
                "units": "years",
                "description": f"days since enrolment / {_DAYS_PER_YEAR}",
            },
        ),
        "n_obs": ("series", n_obs.astype(np.int64), {"long_name": "number of visits"}),
    }
    return xr.Dataset(
        data_vars,
        coords=coords,
        attrs={
            "title": "Mayo Clinic primary biliary cirrhosis (PBC), sequential lab data",
            "source": "R package 'survival' (Therneau), dataset pbcseq",
            "license": "LGPL (>= 2), redistributed with attribution; see "
            "datasets/pbcseq.md",
            "channels": " ".join(v[0] for v in _PBC_CHANNELS.values()),
            "static": "age sex trt",
            "layout": "one series per patient; obs padded with NaN after n_obs visits",
        },
    )


_REGISTRY: dict[str, _Entry] = {
    e.name: e
    for e in [
        _Entry(
            name="pbcseq",
            filename="pbcseq.csv",
            parse=_parse_pbcseq,
            source="R survival::pbcseq (Mayo Clinic PBC trial)",
            license="LGPL (>= 2)",
            task="forecast lab trajectories (bili, albumin, protime) from the first "
            "visit; survival",
            doc="Primary biliary cirrhosis: 312 patients, 1-16 irregular visits "
            "over ~14 years, 7 lab channels.",
        )
    ]
}


def names() -> list[str]:
    """The names of the bundled datasets."""
    return sorted(_REGISTRY)


def _entry(name: str) -> _Entry:
    if not isinstance(name, str):
        raise ValueError(f"Dataset name must be a string, got {type(name).__name__}.")
    try:
        return _REGISTRY[name]
    except KeyError:
        pass
    close = difflib.get_close_matches(name, list(_REGISTRY), n=3, cutoff=0.5)
    close += [n for n in _REGISTRY if n.lower() == name.lower() and n not in close]
    hint = f" Did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
    raise ValueError(
        f"Unknown dataset {name!r}.{hint} Available: {', '.join(names())} "
        "(see ctmodels.datasets.available())."
    )


@functools.cache
def _load_cached(name: str) -> xr.Dataset:
    entry = _REGISTRY[name]
    return entry.parse(_find(entry.filename))


def load(name: str) -> xr.Dataset:
    """Load a bundled dataset as an `xarray.Dataset`.

    **Arguments:**

    - `name`: one of `ctmodels.datasets.names()`, e.g. `"pbcseq"`.

    **Returns:** an `xarray.Dataset` with dims `(series, obs)`: a 2-D float coordinate
    `time` `[series, obs]` (NaN after each series' last observation), one data variable
    per channel (NaN = missing or padding; `role="channel"` in its attrs), per-visit
    covariates, and static variables along `series`. The dataset's `attrs["channels"]`
    lists the channel names.

    **Raises:** `ValueError` for an unknown name (with close matches).
    """
    entry = _entry(name)
    return _load_cached(entry.name).copy(deep=True)


def available() -> pd.DataFrame:
    """One row per bundled dataset: name, source, license, series, channels,
    observations (visits), missing_fraction (of channel values at observed visits),
    task (suggested) and doc."""
    rows = []
    for name in names():
        entry = _REGISTRY[name]
        ds = _load_cached(name)
        channels = ds.attrs["channels"].split()
        observed_visit = ds["time"].notnull()
        values = xr.concat([ds[c] for c in channels], dim="channel")
        missing = values.isnull().where(observed_visit).mean(skipna=True)
        rows.append(
            {
                "name": name,
                "source": entry.source,
                "license": entry.license,
                "series": int(ds.sizes["series"]),
                "channels": len(channels),
                "observations": int(observed_visit.sum()),
                "missing_fraction": float(missing),
                "task": entry.task,
                "doc": entry.doc,
            }
        )
    return pd.DataFrame(rows)


def card(name: str) -> str:
    """The data card (Markdown: source, license, citation, preprocessing, shape,
    missingness) of a bundled dataset."""
    entry = _entry(name)
    return _find(Path(entry.filename).stem + ".md").read_text()
