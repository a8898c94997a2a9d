"""The bundled Puromycin data (R `datasets::Puromycin`) against the raw file and
against the published nonlinear least-squares fit of the Michaelis-Menten model
(Bates & Watts 1988; R's `nls`), reproduced with scipy."""

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from scipy.optimize import curve_fit

import ctmodels.datasets as cd
from ctmodels.datasets._load import _summary

DATA = Path(__file__).resolve().parent.parent / "datasets"


def michaelis_menten(conc, vm, k):
    return vm * conc / (k + conc)


def test_puromycin_against_csv():
    raw = pd.read_csv(DATA / "puromycin.csv")
    ds = cd.load("puromycin")
    assert ds.sizes == {"sample": 23}
    assert ds.attrs["channels"] == "rate" and ds.attrs["label"] == "state"
    np.testing.assert_array_equal(ds["rate"].values, raw["rate"].to_numpy(np.float64))
    np.testing.assert_array_equal(ds["conc"].values, raw["conc"].to_numpy(np.float64))
    classes = ds["state"].attrs["flag_meanings"].split()
    assert classes == ["treated", "untreated"]
    assert [classes[i] for i in ds["state"].values] == raw["state"].tolist()
    assert np.bincount(ds["state"].values).tolist() == [12, 11]
    assert sorted(set(ds["conc"].values)) == [0.02, 0.06, 0.11, 0.22, 0.56, 1.1]
    assert _summary(ds) == {
        "series": 23, "channels": 1, "observations": 23, "missing_fraction": 0.0,
    }  # fmt: skip
    assert "8525dff6499558f67ddd8ec101ad26e6ae4412b95547144aabf500730faa5b7b" in (
        cd.card("puromycin")
    )


# Bates & Watts (1988) / R: nls(rate ~ Vm * conc / (K + conc), subset = state == ...)
# estimates, standard errors and residual sums of squares.
PUBLISHED = {
    "treated": ((212.68, 0.06412), (6.947, 0.008281), 1195.449),
    "untreated": ((160.28, 0.04771), (6.480, 0.007782), 859.604),
}


@pytest.mark.parametrize("state", ["treated", "untreated"])
def test_puromycin_reproduces_published_nls(state):
    ds = cd.load("puromycin")
    code = ds["state"].attrs["flag_meanings"].split().index(state)
    rows = ds["state"].values == code
    conc, rate = ds["conc"].values[rows], ds["rate"].values[rows]
    params, cov = curve_fit(michaelis_menten, conc, rate, p0=[200.0, 0.1])
    (vm, k), (se_vm, se_k), rss = PUBLISHED[state]
    np.testing.assert_allclose(params, [vm, k], rtol=2e-4)
    np.testing.assert_allclose(np.sqrt(np.diag(cov)), [se_vm, se_k], rtol=2e-3)
    residual = rate - michaelis_menten(conc, *params)
    np.testing.assert_allclose(np.sum(residual**2), rss, rtol=1e-5)
