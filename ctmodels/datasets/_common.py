"""Helpers shared by the dataset builders: the padded `(series, obs)` grid, roles."""

from __future__ import annotations

import numpy as np

DAYS_PER_YEAR = 365.25

#: The values of a variable's `attrs["role"]` that `ctmodels.data.from_xarray` reads.
ROLES = (
    "channel",
    "static",
    "label",
    "visit_covariate",
    "outcome",
    "truth",
    "split",
)


class PaddedGrid:
    """Scatter long-format rows (sorted by series id, then time) into a `[series, obs]`
    grid: each series' rows fill a prefix of its row, the rest is padding."""

    def __init__(self, ids: np.ndarray):
        ids = np.asarray(ids)
        if len(ids) and np.any(ids[1:] < ids[:-1]):
            raise ValueError("rows must be sorted by series id")
        self.ids, self.first = np.unique(ids, return_index=True)
        self.n_obs = np.diff(np.append(self.first, len(ids))).astype(np.int64)
        self.shape = (len(self.ids), int(self.n_obs.max()) if len(ids) else 0)
        self.row = np.searchsorted(self.ids, ids)
        self.col = np.arange(len(ids)) - self.first[self.row]

    def __call__(self, values, fill=np.nan, dtype=np.float64) -> np.ndarray:
        out = np.full(self.shape, fill, dtype=dtype)
        out[self.row, self.col] = values
        return out


def flag_attrs(meanings: list[str], dtype=np.int64, **attrs) -> dict:
    """CF-style attrs of an integer-coded categorical variable (codes 0..K-1)."""
    return {
        "flag_values": np.arange(len(meanings), dtype=dtype),
        "flag_meanings": " ".join(meanings),
        **attrs,
    }
