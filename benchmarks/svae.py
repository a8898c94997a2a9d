"""SVAE quality: pbcseq, the periodic toy data and a dense bundled set, against the
latent ODE, GRU-Δt and the fixed baselines, side by side in one run (issue 20).

The protocol is `benchmarks/latent_ode_pbcseq.py`'s, whose functions this script
runs (same splits by seed, train-split normalisation, the job's tasks and masks,
checked identical for every model, MSE in normalised units over the test split):

- `pbcseq` (312 patients, 7 lab channels, irregular visits): `SVAE` (as `ctmodels fit
  svae` trains it: the job's defaults and recipe, padded layout), `LatentODE` and
  `GRUDelta` (as in `latent_ode_pbcseq.py`, on the latent ODE job's recipe),
  `LinearInterpolation`, `LOCF`. Targets (issue 20): the SVAE beats GRU-Δt at
  extrapolation and the latent ODE at interpolation (means over seeds; reported
  with the paired per-seed differences).
- `periodic` (SVAE and the fixed baselines; Rubanova et al. 2019's toy data, 1000
  series, 50 of 100 irregular times observed with noise, scored against the
  noise-free truth), one data seed per seed: the SVAE must beat linear interpolation
  at interpolation and LOCF at extrapolation.
- `basic_motions` (likewise; bundled, dense: 80 smartwatch recordings, 6 channels,
  100 regular steps, nothing missing), split 80/10/10 by the seed like pbcseq: the
  same two targets as the periodic data.

Output: one JSON line per (dataset, model, seed, task) as `latent_ode_pbcseq.py`
writes them, then a summary line per dataset (mean ± std over seeds, sample std,
the paired differences of the SVAE to each target line and whether each target is
met by the mean and in every seed), then a Markdown table on stderr.

Usage:
  python benchmarks/svae.py                       # seeds 0 1 2, all three datasets
  python benchmarks/svae.py --quick               # smoke run
  python benchmarks/svae.py --data pbcseq --seeds 3 4 5
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import argparse  # noqa: E402
import copy  # noqa: E402
import json  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import latent_ode_pbcseq as lop  # noqa: E402  (sets the one-thread XLA flags)

DATASETS = ("pbcseq", "periodic", "basic_motions")
MODELS = {
    "pbcseq": ["SVAE", "LatentODE", "GRUDelta", "LinearInterpolation", "LOCF"],
    # the latent ODE's periodic figures are in benchmarks/README.md; its dense-data
    # ones are not targets here: left out to keep the run under an hour on 2 cores
    "periodic": ["SVAE", "LinearInterpolation", "LOCF"],
    "basic_motions": ["SVAE", "LinearInterpolation", "LOCF"],
}
#: (task, model the SVAE must beat) per dataset
TARGETS = {
    "pbcseq": [("interpolation", "LatentODE"), ("extrapolation", "GRUDelta")],
    "periodic": [("interpolation", "LinearInterpolation"), ("extrapolation", "LOCF")],
    "basic_motions": [
        ("interpolation", "LinearInterpolation"),
        ("extrapolation", "LOCF"),
    ],
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--data", nargs="+", default=list(DATASETS), choices=DATASETS)
    p.add_argument(
        "--svae-only",
        action="store_true",
        help="train only the SVAE (the fixed baselines are still scored)",
    )
    p.add_argument("--periodic-series", type=int, default=1000)
    p.add_argument("--quick", action="store_true", help="1 seed, 3 epochs, small data")
    p.add_argument("--out", default=None, help="also append the JSON lines here")
    return p.parse_args(argv)


def lop_args(args, models):
    """The argument namespace `latent_ode_pbcseq`'s runners read."""
    a = lop.parse_args(["--seeds", *map(str, args.seeds), "--models", *models]
                       + (["--quick"] if args.quick else []))  # fmt: skip
    a.periodic_series = min(args.periodic_series, 200 if args.quick else 10**9)
    return a


def summarise(results, data):
    rows = [r for r in results if r["data"] == data]
    if not rows:
        return None
    models = list(dict.fromkeys(r["model"] for r in rows))
    seeds = sorted({r["seed"] for r in rows})
    table = lop.mse_table(rows, models)
    targets = {}
    for task, rival in TARGETS[data]:
        if "SVAE" not in models or rival not in models:
            continue
        diff = [lop._get(rows, "SVAE", s, task) - lop._get(rows, rival, s, task)
                for s in seeds]  # fmt: skip
        targets[f"{task} vs {rival}"] = {
            "svae": table[f"SVAE/{task}"]["mean"],
            "rival": table[f"{rival}/{task}"]["mean"],
            "paired_diff_mean": statistics.fmean(diff),
            "paired_diff_se": (
                statistics.stdev(diff) / len(diff) ** 0.5 if len(diff) > 1 else 0.0
            ),  # fmt: skip
            "met_by_mean": statistics.fmean(diff) < 0,
            "met_every_seed": all(d < 0 for d in diff),
        }
    return {"summary": True, "data": data, "seeds": seeds, "table": table,
            "targets": targets}  # fmt: skip


def markdown(summary):
    data, table = summary["data"], summary["table"]
    models = list(dict.fromkeys(k.split("/")[0] for k in table))
    lines = [f"\n{data} (test MSE, normalised units, mean ± std over seeds "
             f"{summary['seeds']})", "", "| model | interpolation | extrapolation |",
             "|---|---|---|"]  # fmt: skip
    for m in models:
        cells = [f"{table[f'{m}/{t}']['mean']:.3f} ± {table[f'{m}/{t}']['std']:.3f}"
                 for t in lop.TASKS]  # fmt: skip
        lines.append(f"| {m} | {cells[0]} | {cells[1]} |")
    for name, t in summary["targets"].items():
        lines.append(
            f"- SVAE {name}: {t['svae']:.3f} vs {t['rival']:.3f}, paired difference "
            f"{t['paired_diff_mean']:+.3f} ± {t['paired_diff_se']:.3f} (se); met by "
            f"the mean: {t['met_by_mean']}, in every seed: {t['met_every_seed']}"
        )
    return "\n".join(lines)


def main(argv=None):
    args = parse_args(argv)
    t0 = time.perf_counter()
    results = []
    for data in args.data:
        skip = set(lop.LEARNED) - {"SVAE"} if args.svae_only else set()
        models = [m for m in MODELS[data] if m not in skip]
        a = lop_args(args, models)
        if data == "periodic":
            for seed in a.seeds:  # a fresh draw of the data per seed
                one = copy.copy(a)
                one.seeds = [seed]
                lop.run_periodic(one, results)
        else:
            lop.run_pbcseq(a, results, data)
        summary = summarise(results, data)
        summary.update(quick=args.quick, load_avg_1min=os.getloadavg()[0],
                       jax=jax.__version__)  # fmt: skip
        lop.emit(summary)
        print(markdown(summary), file=sys.stderr, flush=True)
        if args.out:
            with open(args.out, "a") as f:
                for r in [r for r in results if r["data"] == data] + [summary]:
                    f.write(json.dumps(r) + "\n")
    lop.log(f"done in {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
