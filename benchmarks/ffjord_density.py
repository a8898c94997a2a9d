"""Density-estimation quality of FFJORD (`ctmodels fit ffjord`, the default recipe)
against a full-covariance Gaussian, a KDE and flowjax's MAF and BNAF, on the same
splits (issue 18's quality table).

Data: the four 2-D toy sets of the FFJORD paper (`eight_gaussians`, `pinwheel`,
`checkerboard`, `two_spirals`; 2000 bundled points each), Old Faithful (272 rows,
2-D) and the 8x8 digits (1797 images, 64 dims, grey levels 0..16). Every method sees
the split the job makes (`ctmodels.jobs` with `--seed`: 80/10/10 by seed), trains on
the training split, picks what it tunes (KDE bandwidth, early stopping) on the
validation split, and is scored on the test split.

Units, the same for every method:

- 2-D sets and Old Faithful: `nll`, nats per sample in the data's **original units**
  (every method fits the standardised data; the standardisation's log-determinant
  `sum(log scale)` is added back); `nll_standardised` is the same figure on the
  standardised scale (what the issue's Old Faithful reference figures are: Gaussian
  2.070, tuned KDE 1.535, MAF 1.585, BNAF 1.752).
- digits: `bits_per_dim` of the uniformly dequantised images `v = x + u`,
  `u ~ U[0, 1)^64`, as a density on `[0, 17)^64` in grey-level units (one fixed draw
  for the test split, the job's own, `ctmodels.jobs._ffjord.DEQUANTISE_SEED`);
  `nll` is nats per image. The baselines model `v` through a transform whose
  log-determinant is counted: `raw` (standardised grey levels) or `logit` (FFJORD's
  logit transform with the same alpha, then standardised); their training and
  validation data are dequantised afresh each epoch (flows) or once (Gaussian, KDE).

Methods:

- `gaussian`: maximum-likelihood full-covariance Gaussian (digits: `gaussian` on raw
  grey levels, the job's own baseline, and `gaussian_logit`);
- `kde`: `scipy.stats.gaussian_kde` with the bandwidth factor chosen on the
  validation split over a grid (digits: also the space, raw or logit);
- `maf`, `bnaf`: flowjax's `masked_autoregressive_flow` and
  `block_neural_autoregressive_flow` with their default architectures, Adam
  (learning rate 5e-4, batches of 100, flowjax's `fit_to_data` defaults), trained
  here on the job's split with early stopping on the validation NLL (patience 20,
  at most 300 epochs; the best epoch restored), `pip install flowjax` (benchmark
  only);
- `ffjord`: `ctmodels.jobs.fit("ffjord", DATA, ...)` with the default recipe (the
  same as `ctmodels fit ffjord --data DATA`), its test `nll` / `bits_per_dim`.

One JSON line per (dataset, method) with the seed, the NLL, the wall time (training
and scoring; FFJORD: the job's `fit_seconds` and its total), then a summary line
per dataset (best method, FFJORD's rank) and an overall summary line; also appended
to `--out` (default `benchmarks/results/ffjord_density.jsonl`; `--quick` writes
`ffjord_density_quick.jsonl`).

```bash
nice -n 10 python benchmarks/ffjord_density.py            # the full table (long)
python benchmarks/ffjord_density.py --quick     # smoke run: Old Faithful and digits
python benchmarks/ffjord_density.py --datasets old_faithful --methods gaussian kde
```
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault(
    "XLA_FLAGS",
    "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1",
)

import numpy as np  # noqa: E402

try:  # the installed package, or else the checkout this script sits in
    import ctmodels  # noqa: F401
except ImportError:  # pragma: no cover
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ctmodels import jobs  # noqa: E402
from ctmodels.jobs import _ffjord, _points  # noqa: E402

DATASETS = ["eight_gaussians", "pinwheel", "checkerboard", "two_spirals",
            "old_faithful", "digits"]  # fmt: skip
METHODS = ["gaussian", "kde", "maf", "bnaf", "ffjord"]
#: The KDE bandwidth factors tried (scipy's `bw_method` as a number).
KDE_GRID = np.geomspace(0.02, 1.5, 30)
#: flowjax training: `fit_to_data`'s defaults, with early stopping on our split.
FLOW_LR, FLOW_BATCH, FLOW_EPOCHS, FLOW_PATIENCE = 5e-4, 100, 300, 20
#: `--quick`: rows kept per dataset, epochs, the datasets, a tiny FFJORD.
QUICK_ROWS, QUICK_EPOCHS = 300, 1
QUICK_DATASETS = ["old_faithful", "digits"]
QUICK_FFJORD = {"width": 8, "depth": 1, "rtol": 1e-2, "atol": 1e-2,
                "kinetic_weight": 0.0, "solver": "bosh3"}  # fmt: skip
QUICK_KDE_GRID = np.geomspace(0.05, 1.5, 6)
LOG2 = math.log(2.0)


# ------------------------------------------------------------------ data spaces


class Space:
    """The space a baseline models: standardised data (2-D), or for images the
    dequantised grey levels `v`, optionally through FFJORD's logit transform, then
    standardised. `to(v) -> (y, logdet)` with `log p_v(v) = log p_y(y) + logdet`."""

    def __init__(self, train_v, *, levels=None, logit=False, alpha=1e-6):
        self.levels, self.logit, self.alpha = levels, logit, alpha
        pre, _ = self._pre(train_v)
        self.mean, self.scale = pre.mean(0), pre.std(0)
        self.scale = np.where(self.scale > 0, self.scale, 1.0)

    def _pre(self, v):
        if not self.logit:
            return v, np.zeros(v.shape[0])
        a, L = self.alpha, self.levels
        p = a + (1 - 2 * a) * v / L
        s = np.log(p) - np.log1p(-p)
        per = math.log((1 - 2 * a) / L) - np.log(p) - np.log1p(-p)
        return s, per.sum(1)

    def to(self, v):
        s, logdet = self._pre(v)
        return (s - self.mean) / self.scale, logdet - np.log(self.scale).sum()


def load_splits(name: str, seed: int, max_rows: int | None):
    """The job's split of `name` (the same `prepare` the job runs) and, for images,
    the recipe's `levels` and `logit_alpha` (the baselines use the same)."""
    options = jobs.get_family("ffjord").recipe_for(name).get("options", {})
    levels = options.get("levels")
    alpha = options.get("logit_alpha", 1e-6)
    kw = {"max_series": max_rows} if max_rows else {}
    prep = _points.prepare(name, seed=seed, model_options={"levels": levels}, **kw)
    return prep, levels, alpha


def dequantised(values, rng):
    return values + rng.uniform(size=values.shape)


# ------------------------------------------------------------------ methods


def gaussian_logpdf(train_y, y):
    mean = train_y.mean(0)
    cov = np.atleast_2d(np.cov(train_y.T, bias=True))
    sign, logdet = np.linalg.slogdet(cov)
    diff = y - mean
    maha = np.einsum("ni,ij,nj->n", diff, np.linalg.inv(cov), diff)
    return -0.5 * (maha + logdet + y.shape[1] * math.log(2 * math.pi))


def kde_fit(train_y, valid_y, grid=KDE_GRID):
    """The bandwidth factor with the best validation log-likelihood."""
    from scipy.stats import gaussian_kde

    best = (-np.inf, None)
    for bw in grid:
        kde = gaussian_kde(train_y.T, bw_method=float(bw))
        ll = float(np.mean(kde.logpdf(valid_y.T)))
        if ll > best[0]:
            best = (ll, float(bw))
    return gaussian_kde(train_y.T, bw_method=best[1]), best[1], best[0]


def flow_fit(kind, train_draw, valid_y, *, key, epochs, patience):
    """A flowjax flow trained on `train_draw(epoch) -> [n, D]` (a fresh
    dequantisation per epoch for images) with early stopping on `valid_y`."""
    import equinox as eqx
    import jax
    import jax.numpy as jnp
    import optax
    import paramax
    from flowjax.distributions import Normal
    from flowjax.flows import (
        block_neural_autoregressive_flow,
        masked_autoregressive_flow,
    )

    dim = valid_y.shape[1]
    k_init, k_train = jax.random.split(key)
    base = Normal(jnp.zeros(dim))
    make = {"maf": masked_autoregressive_flow,
            "bnaf": block_neural_autoregressive_flow}[kind]  # fmt: skip
    dist = make(k_init, base_dist=base)
    params, static = eqx.partition(
        dist, eqx.is_inexact_array,
        is_leaf=lambda leaf: isinstance(leaf, paramax.NonTrainable),
    )  # fmt: skip

    def nll(params, x):
        d = paramax.unwrap(eqx.combine(params, static))
        return -jnp.mean(d.log_prob(x))

    opt = optax.adam(FLOW_LR)
    state = opt.init(params)

    @eqx.filter_jit
    def step(params, state, x):
        loss, grads = eqx.filter_value_and_grad(nll)(params, x)
        updates, state = opt.update(grads, state, params)
        return eqx.apply_updates(params, updates), state, loss

    valid_nll = eqx.filter_jit(nll)
    valid_y = jnp.asarray(valid_y, jnp.float32)
    best, best_params, waited, ran = np.inf, params, 0, 0
    rng = np.random.default_rng(int(jax.random.randint(k_train, (), 0, 2**30)))
    for epoch in range(epochs):
        x = np.asarray(train_draw(epoch), np.float32)
        order = rng.permutation(len(x))
        for i in range(0, len(x) - FLOW_BATCH + 1, FLOW_BATCH):
            batch = jnp.asarray(x[order[i : i + FLOW_BATCH]])
            params, state, _ = step(params, state, batch)
        ran = epoch + 1
        v = float(valid_nll(params, valid_y))
        if v < best:
            best, best_params, waited = v, params, 0
        else:
            waited += 1
            if waited >= patience:
                break
    d = paramax.unwrap(eqx.combine(best_params, static))
    logpdf = eqx.filter_jit(lambda y: d.log_prob(jnp.asarray(y, jnp.float32)))
    return (lambda y: np.asarray(logpdf(y), np.float64)), ran, best


# ------------------------------------------------------------------ one dataset


def _line(name, method, seed, *, lp, dim, log_scale, levels, seconds, **extra):
    """A result line from per-row log-densities `lp` in the model's space (2-D:
    standardised, with `log_scale` to add; images: `v`'s density already)."""
    nll_std = float(-np.mean(lp))
    nll = nll_std + log_scale
    out = {"dataset": name, "method": method, "seed": seed, "nll": nll,
           "bits_per_dim": nll / (dim * LOG2)}  # fmt: skip
    if levels is None:
        out["nll_standardised"] = nll_std
        out["log_scale"] = log_scale
        out["units"] = "nats per sample, the data's original units"
    else:
        out["units"] = (f"bits/dim of dequantised images on [0, {levels})^{dim}, "
                        "grey-level units (nll: nats per image)")  # fmt: skip
    out["non_finite"] = int((~np.isfinite(lp)).sum())
    out["seconds"] = round(seconds, 2)
    out.update(extra)
    return out


def _train_seconds(out: Path) -> float | None:
    """The training time `history.csv` records at its last epoch (across resumes)."""
    import pandas as pd

    try:
        return round(float(pd.read_csv(out / "history.csv")["time"].iloc[-1]), 1)
    except (OSError, KeyError, IndexError, ValueError):
        return None


def run_dataset(name, methods, *, seed, quick, workdir, emit, resume=False):
    max_rows = QUICK_ROWS if quick else None
    prep, levels, alpha = load_splits(name, seed, max_rows)
    grid = QUICK_KDE_GRID if quick else KDE_GRID
    dim = prep.dim
    common = {"dim": dim, "levels": levels}
    if levels is None:
        log_scale = prep.standardiser.log_scale
        train_y, valid_y, test_y = prep.train_n, prep.valid_n, prep.test_n.x
        spaces = {"": None}
    else:
        log_scale = 0.0
        rng = np.random.default_rng(seed + 100)
        train_v = dequantised(prep.train.values, rng)
        valid_v = dequantised(prep.valid.values, rng)
        # the job's own test draw: every method scores the same points
        test_v = _points.dequantise(prep.test.values, seed=_ffjord.DEQUANTISE_SEED)
        spaces = {s: Space(train_v, levels=levels, logit=s == "logit", alpha=alpha)
                  for s in ("raw", "logit")}  # fmt: skip
    common["log_scale"] = log_scale
    sizes = prep.sizes
    results = []

    def view(space, v):
        """(y, logdet) of images `v` in `space`."""
        return spaces[space].to(v)

    def add(line):
        line["sizes"] = sizes
        results.append(line)
        emit(line)

    for method in methods:
        t0 = time.perf_counter()
        if method == "gaussian":
            if levels is None:
                lp = gaussian_logpdf(train_y, test_y)
                add(_line(name, "gaussian", seed, lp=lp,
                          seconds=time.perf_counter() - t0, **common))  # fmt: skip
            else:
                for space in ("raw", "logit"):
                    t0 = time.perf_counter()
                    (ty, _), (sy, sld) = view(space, train_v), view(space, test_v)
                    lp = gaussian_logpdf(ty, sy) + sld
                    label = "gaussian" if space == "raw" else "gaussian_logit"
                    add(_line(name, label, seed, lp=lp, space=space,
                              seconds=time.perf_counter() - t0, **common))  # fmt: skip
        elif method == "kde":
            if levels is None:
                kde, bw, vll = kde_fit(train_y, valid_y, grid)
                lp = kde.logpdf(test_y.T)
                add(_line(name, "kde", seed, lp=lp, bandwidth=bw, valid_ll=vll,
                          seconds=time.perf_counter() - t0, **common))  # fmt: skip
            else:
                best = None
                for space in ("raw", "logit"):
                    (ty, _), (vy, vld) = view(space, train_v), view(space, valid_v)
                    kde, bw, vll = kde_fit(ty, vy, grid)
                    vll += float(np.mean(vld))  # v's density: comparable across spaces
                    if best is None or vll > best[0]:
                        best = (vll, space, kde, bw)
                vll, space, kde, bw = best
                sy, sld = view(space, test_v)
                lp = kde.logpdf(sy.T) + sld
                add(_line(name, "kde", seed, lp=lp, bandwidth=bw, space=space,
                          valid_ll=vll, seconds=time.perf_counter() - t0,
                          **common))  # fmt: skip
        elif method in ("maf", "bnaf"):
            try:
                import flowjax  # noqa: F401
            except ImportError:
                emit({"dataset": name, "method": method, "skipped":
                      "flowjax is not installed (pip install flowjax)"})  # fmt: skip
                continue
            import jax

            epochs = QUICK_EPOCHS if quick else FLOW_EPOCHS
            key = jax.random.key(seed)
            if levels is None:
                fn, ran, vnll = flow_fit(
                    method, lambda e: train_y, valid_y, key=key, epochs=epochs,
                    patience=FLOW_PATIENCE,
                )  # fmt: skip
                lp = fn(test_y)
                extra = {}
            else:
                space = "logit"
                rng_f = np.random.default_rng(seed + 200)

                def draw(epoch, space=space, rng=rng_f):
                    return view(space, dequantised(prep.train.values, rng))[0]

                vy, _ = view(space, valid_v)
                fn, ran, vnll = flow_fit(method, draw, vy, key=key, epochs=epochs,
                                         patience=FLOW_PATIENCE)  # fmt: skip
                sy, sld = view(space, test_v)
                lp = fn(sy) + sld
                extra = {"space": space}
            add(_line(name, method, seed, lp=lp, epochs_run=ran,
                      seconds=time.perf_counter() - t0, **extra, **common))  # fmt: skip
        elif method == "ffjord":
            kw = {}
            if quick:
                kw = {"epochs": QUICK_EPOCHS, "max_series": QUICK_ROWS,
                      "batch_size": 64, **QUICK_FFJORD}  # fmt: skip
            out = Path(workdir) / name
            # --resume: a run of the same settings in --workdir is resumed (or, if
            # it finished, only scored), as `ctmodels fit` resumes one
            metrics = jobs.fit("ffjord", name, out, seed=seed, progress=False,
                               overwrite=not resume, **kw)  # fmt: skip
            test = metrics["test"]
            line = {"dataset": name, "method": "ffjord", "seed": seed,
                    "nll": test["nll"],
                    "bits_per_dim": test["bits_per_dim"]}  # fmt: skip
            if levels is None:
                line.update(
                    nll_standardised=test["nll_standardised"],
                    log_scale=test["log_scale"],
                    units="nats per sample, the data's original units",
                )
            else:
                line["units"] = (
                    f"bits/dim of dequantised images on [0, {levels})^"
                    f"{dim}, grey-level units (nll: nats per image)"
                )
            line.update(
                non_finite=test["non_finite"],
                seconds=metrics["total_seconds"],
                fit_seconds=metrics["fit_seconds"],
                # the training time over every session of the run (a resumed run's
                # fit_seconds is only the last session's)
                train_seconds=_train_seconds(out),
                epochs_run=metrics["epochs_run"],
                recipe=metrics["recipe"],
                hyperparameters={k: metrics["hyperparameters"][k] for k in
                                 ("width", "depth", "blocks", "trace", "rtol",
                                  "kinetic_weight", "levels", "logit_alpha")},
                sizes=metrics["series"],
                job_gaussian_nll=test["baselines"]["gaussian"]["nll"],
            )  # fmt: skip
            # the same split and test points as the baselines
            if metrics["series"] != sizes:
                line["warning"] = f"the job's split {metrics['series']} != {sizes}"
            results.append(line)
            emit(line)
        else:
            raise ValueError(f"unknown method {method!r}; choose from {METHODS}")
    ranked = sorted((r for r in results if np.isfinite(r["nll"])),
                    key=lambda r: r["nll"])  # fmt: skip
    summary = {"summary": True, "dataset": name, "seed": seed,
               "best": ranked[0]["method"] if ranked else None,
               "ranking": [r["method"] for r in ranked]}  # fmt: skip
    key = "bits_per_dim" if levels else "nll"
    summary[key] = {r["method"]: round(r[key], 4) for r in results}
    if any(r["method"] == "ffjord" for r in results):
        summary["ffjord_rank"] = summary["ranking"].index("ffjord") + 1
    emit(summary)
    return results


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--datasets", nargs="+", default=None, choices=DATASETS)
    parser.add_argument("--methods", nargs="+", default=METHODS, choices=METHODS)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true",
                        help=f"smoke run: {QUICK_ROWS} rows, {QUICK_EPOCHS} epoch(s), "
                        f"{', '.join(QUICK_DATASETS)}")  # fmt: skip
    parser.add_argument("--out", default=None, help="JSON lines appended here")
    parser.add_argument("--workdir", default=None,
                        help="where the FFJORD job writes its runs (default: a "
                        "temporary directory)")  # fmt: skip
    parser.add_argument(
        "--resume",
        action="store_true",
        help="resume (or only score) FFJORD runs of the same "
        "settings already in --workdir instead of starting afresh",
    )
    ns = parser.parse_args(argv)
    if ns.resume and not ns.workdir:
        parser.error("--resume needs --workdir (where the runs are)")
    datasets = ns.datasets or (QUICK_DATASETS if ns.quick else DATASETS)
    here = Path(__file__).resolve().parent
    out = (
        Path(ns.out)
        if ns.out
        else here
        / "results"
        / ("ffjord_density_quick.jsonl" if ns.quick else "ffjord_density.jsonl")
    )
    out.parent.mkdir(parents=True, exist_ok=True)

    def emit(line):
        text = json.dumps(line, default=float)
        print(text, flush=True)
        with open(out, "a") as f:
            f.write(text + "\n")

    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        workdir = ns.workdir or tmp
        for name in datasets:
            run_dataset(name, ns.methods, seed=ns.seed, quick=ns.quick,
                        workdir=workdir, emit=emit, resume=ns.resume)  # fmt: skip
    emit({"summary": True, "all": True, "seed": ns.seed, "quick": ns.quick,
          "datasets": datasets, "methods": ns.methods,
          "seconds": round(time.perf_counter() - t0, 1),
          "load_avg_1min": os.getloadavg()[0]})  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
