"""Speed of ctmodels.lgssm's message passing on long sequences (sequential scan vs
associative scan, against dynamax), and of an SVAE training step against the latent
ODE's on pbcseq. CPU, one thread, float32.

Part 1, `lgssm`: one sequence of `--length` steps (default 10,000) from a
time-invariant linear-Gaussian model (latent 4, 2 channels, every value observed,
the same `F, Q, H, R` arrays given to both packages; dynamax has no masks). Cases,
each a `jax.jit` of a function returning only what both packages compute (filter:
filtered means, covariances and `log p(y)`; smoother: smoothed means and
covariances), so XLA drops anything else:

- `ctmodels seq` / `ctmodels par`: `ctmodels.lgssm.kalman_filter` /
  `kalman_smoother` with `parallel=False` / `parallel=True` (associative scan);
- `dynamax seq` / `dynamax par`: `dynamax.linear_gaussian_ssm.lgssm_filter` /
  `lgssm_smoother` and `dynamax.linear_gaussian_ssm.parallel_inference`'s.

Reported: `compile_s` (trace, lower and XLA compile, one ahead-of-time
compilation), `median_s` / `min_s` of the run time over `--reps` interleaved rounds
(`benchmarks/_timing.py`'s `timed`: every case once per round, each sample a
repeated call filling ~0.2 s), and memory from XLA's own analysis of the compiled
program (`compiled.memory_analysis()`): `temp_bytes` (scratch buffers) and
`out_bytes` (the outputs), not the process's RSS. Checks: every case's
log-likelihood and smoothed means against `ctmodels seq`'s (`loglik_rel_diff`,
`max_abs_mean_diff`; float32 roundoff, the parallel scans' larger).

Part 2, `svae_step`: one training step (loss with the job's training task
`ctmodels.jobs.mixed_task` applied inside, `jax.value_and_grad`, optax Adam 1e-3),
jitted, of the two job models on pbcseq, prepared as `ctmodels fit` prepares it
(`datasets.load("pbcseq")`, split 80/10/10 by seed 0, normalised on the training
split with log channels, times scaled by the span; batches of 32, each padded to
the longest batch's power-of-two length, so one compilation per model):
`LatentODE(7, latent_size=8, encoder_size=24, units=64)` (dopri5, 3 samples; the
job's union layout) and `SVAE(7, latent_size=8, units=64)` (1 sample; the job's
padded layout, `ctmodels/jobs/_svae.py`). The step is compiled ahead of time
(`compile_s`: trace, lower, compile); one epoch of training batches in a fixed
order (the same series for both) is run once untimed (`first_epoch_s`); then
`--reps` interleaved rounds of one epoch each; the sample is the mean time per
step of a round; median and min over rounds. The latent ODE's cost grows as its
dynamics stiffen with training; both start from their initialisation, and each
round continues training.

Output: JSON lines in `benchmarks/results/lgssm_speed.jsonl` (and stdout), then
Markdown tables.

Usage (dynamax in its own environment, not a ctmodels dependency):
  python benchmarks/lgssm_speed.py [--length 10000] [--reps 7] [--parts lgssm svae_step]
  python benchmarks/lgssm_speed.py --quick   # smoke run
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _timing import (  # noqa: E402
    emit,
    package_version,
    read_jsonl,
    single_thread,
    timed,
)

single_thread()
# compile the training steps as `ctmodels fit` does: runtime checks in NaN mode
os.environ.setdefault("EQX_ON_ERROR", "nan")

import argparse  # noqa: E402
import json  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
D, C = 4, 2
CASES = ("ctmodels seq", "ctmodels par", "dynamax seq", "dynamax par")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--length", type=int, default=10_000)
    p.add_argument("--reps", type=int, default=7, help="interleaved rounds")
    p.add_argument("--sample-s", type=float, default=0.2)
    p.add_argument("--parts", nargs="+", default=["lgssm", "svae_step"],
                   choices=["lgssm", "svae_step"])  # fmt: skip
    p.add_argument(
        "--skip",
        nargs="*",
        default=[],
        metavar="OP/CASE",
        help="leave out these lgssm cases, e.g. 'smoother/dynamax par'",
    )
    p.add_argument("--skip-why", default="--skip", help="recorded with skipped cases")
    p.add_argument(
        "--ops",
        nargs="+",
        default=["filter", "smoother"],
        choices=["filter", "smoother"],
    )
    p.add_argument("--quick", action="store_true", help="small sizes, smoke run")
    p.add_argument("--out", default=os.path.join(RESULTS, "lgssm_speed.jsonl"))
    args = p.parse_args(argv)
    if args.quick:
        args.length = min(args.length, 200)
        args.reps = min(args.reps, 2)
        args.sample_s = 0.02
        args.out = args.out.replace(".jsonl", "_quick.jsonl")
    return args


def log(msg):
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def model_arrays(rng):
    """A stable damped rotation pair plus two decaying modes, exactly discretised at
    step 0.1 (any stable F would do: the speed does not depend on the values)."""
    import scipy.linalg

    A = np.array([[-0.1, -2.0, 0, 0], [2.0, -0.1, 0, 0], [0.3, 0, -0.5, 0],
                  [0, 0, 0.2, -1.0]])  # fmt: skip
    Qc = 0.2 * np.eye(D)
    dt = 0.1
    M = np.block([[-A, Qc], [np.zeros_like(A), A.T]]) * dt
    E = scipy.linalg.expm(M)
    F = E[D:, D:].T
    Q = F @ E[:D, D:]
    Q = 0.5 * (Q + Q.T)
    H = rng.normal(size=(C, D))
    R = 0.1 * np.eye(C)
    P0 = scipy.linalg.solve_continuous_lyapunov(A, -Qc)
    return [np.asarray(a, np.float32) for a in (np.zeros(D), P0, F, Q, H, R)]


def simulate(rng, arrays, T):
    m0, P0, F, Q, H, R = (a.astype(np.float64) for a in arrays)
    x = rng.multivariate_normal(m0, P0)
    wq = rng.multivariate_normal(np.zeros(D), Q, size=T)
    vr = rng.multivariate_normal(np.zeros(C), R, size=T)
    ys = np.empty((T, C))
    for t in range(T):
        if t:
            x = F @ x + wq[t]
        ys[t] = H @ x + vr[t]
    return ys.astype(np.float32)


# ------------------------------------------------------------------ part 1


def run_lgssm(args, fh):
    try:
        import dynamax.linear_gaussian_ssm.inference as dyn_seq
        import dynamax.linear_gaussian_ssm.parallel_inference as dyn_par
    except ImportError as e:
        raise SystemExit(
            "benchmarks/lgssm_speed.py compares against dynamax, which is not "
            f"installed ({e}). It is not a ctmodels dependency: install it in a "
            "separate environment (pip install dynamax) next to ctmodels and run "
            "this script there, or pass --parts svae_step."
        ) from None
    import jax
    import jax.numpy as jnp

    import ctmodels.lgssm as lg

    rng = np.random.default_rng(0)
    arrays = model_arrays(rng)
    y = jnp.asarray(simulate(rng, arrays, args.length))
    m0, P0, F, Q, H, R = (jnp.asarray(a) for a in arrays)
    ssm = lg.LinearGaussianSSM(m0, P0, F, Q, H, R)
    dparams = dyn_seq.make_lgssm_params(m0, P0, F, Q, H, R)

    def ct(kind, parallel):
        if kind == "filter":

            def f(ssm, y):
                r = lg.kalman_filter(ssm, y, parallel=parallel)
                return r.means, r.covs, r.log_likelihood
        else:

            def f(ssm, y):
                r = lg.kalman_smoother(ssm, y, parallel=parallel)
                return r.means, r.covs, r.log_likelihood

        return f, (ssm, y)

    def dy(kind, mod):
        if kind == "filter":

            def f(p, y):
                r = mod.lgssm_filter(p, y)
                return r.filtered_means, r.filtered_covariances, r.marginal_loglik
        else:

            def f(p, y):
                r = mod.lgssm_smoother(p, y)
                return r.smoothed_means, r.smoothed_covariances, r.marginal_loglik

        return f, (dparams, y)

    for kind in args.ops:
        fns = {
            "ctmodels seq": ct(kind, False),
            "ctmodels par": ct(kind, True),
            "dynamax seq": dy(kind, dyn_seq),
            "dynamax par": dy(kind, dyn_par),
        }
        for name in [c for c in CASES if f"{kind}/{c}" in args.skip]:
            del fns[name]
            emit({"part": "lgssm", "op": kind, "case": name, "skipped": True,
                  "why": args.skip_why}, fh)  # fmt: skip
        compiled, info = {}, {}
        for name, (f, fargs) in fns.items():
            log(f"lgssm {kind}: compiling {name}")
            t0 = time.perf_counter()
            c = jax.jit(f).lower(*fargs).compile()
            t_compile = time.perf_counter() - t0
            mem = c.memory_analysis()
            out = jax.block_until_ready(c(*fargs))
            compiled[name] = (c, fargs)
            info[name] = {
                "compile_s": round(t_compile, 3),
                "temp_bytes": int(mem.temp_size_in_bytes) if mem else None,
                "out_bytes": int(mem.output_size_in_bytes) if mem else None,
                "out": out,
            }
        ref = info["ctmodels seq"]["out"]
        log(f"lgssm {kind}: timing")
        runners = {
            name: (lambda c=c, a=a: jax.block_until_ready(c(*a)))
            for name, (c, a) in compiled.items()
        }
        times = timed(runners, args.reps, args.sample_s)
        for name in fns:
            out = info[name].pop("out")
            ll_ref = float(ref[2])
            emit({
                "part": "lgssm", "op": kind, "case": name, "length": args.length,
                "latent": D, "channels": C,
                "median_s": statistics.median(times[name]),
                "min_s": min(times[name]),
                "times_s": [round(t, 6) for t in times[name]],
                **info[name],
                "loglik": float(out[2]),
                "loglik_rel_diff": abs(float(out[2]) - ll_ref) / abs(ll_ref),
                "max_abs_mean_diff": float(jnp.max(jnp.abs(out[0] - ref[0]))),
                "dtype": "float32", "quick": args.quick,
                "load_avg_1min": os.getloadavg()[0],
            }, fh)  # fmt: skip


# ------------------------------------------------------------------ part 2


def run_svae_step(args, fh):
    import equinox as eqx
    import jax
    import optax

    import ctmodels.data as cdata
    import ctmodels.datasets as datasets
    from ctmodels.jobs import mixed_task
    from ctmodels.jobs._series import log_channels
    from ctmodels.models import SVAE, LatentODE
    from ctmodels.train._fit import gc_paused

    ds = datasets.load("pbcseq")
    ts = cdata.from_xarray(ds, static=[])
    train_s, _, _ = cdata.split_series(ts, (0.8, 0.1, 0.1), seed=0)
    norm = cdata.Normalizer.fit(
        train_s, log=log_channels(ds, ts.channels), time_scale="span"
    )
    train_n = norm.transform(train_s)
    if args.quick:
        train_n = train_n[np.arange(64)]
    C_ = train_n.num_channels
    key = jax.random.key(0)
    models = {
        "LatentODE": (LatentODE(C_, latent_size=8, encoder="odernn", encoder_size=24,
                                units=64, solver="dopri5", key=key),
                      "union", 3),
        "SVAE": (SVAE(C_, latent_size=8, units=64, key=key), "padded", 1),
    }  # fmt: skip
    order = jax.random.key(1)
    opt = optax.adam(1e-3)
    state, batches, first, compile_s = {}, {}, {}, {}
    for name, (model, layout, n_samples) in models.items():
        # one shape per model: every batch padded to the longest batch's
        # power-of-two bucket (fit's "auto" pads to the bucket of 90% of them)
        pow2 = list(cdata.batches(train_n, 32, key=order, layout=layout,
                                  time_bucket="pow2", prefetch=0))  # fmt: skip
        longest = max(b.values.shape[1] for b in pow2)
        batches[name] = list(
            cdata.batches(train_n, 32, key=order, layout=layout,
                          time_bucket="pow2", min_times=longest, prefetch=0)
        )  # fmt: skip
        params, static = eqx.partition(model, eqx.is_inexact_array)

        def step(params, opt_state, batch, key, static=static, n=n_samples):
            k_task, k_loss = jax.random.split(key)
            batch = mixed_task(batch, key=k_task)

            def f(p):
                return eqx.combine(p, static).loss(batch, key=k_loss, n_samples=n)

            (loss, _), g = jax.value_and_grad(f, has_aux=True)(params)
            upd, opt_state = opt.update(g, opt_state, params)
            return optax.apply_updates(params, upd), opt_state, loss

        st = [params, opt.init(params), None]
        keys = [jax.random.key(100 + i) for i in range(len(batches[name]))]
        log(f"svae_step: compiling {name}")
        t0 = time.perf_counter()
        with gc_paused():
            jstep = jax.jit(step).lower(st[0], st[1], batches[name][0], keys[0])
            jstep = jstep.compile()
        compile_s[name] = time.perf_counter() - t0
        t0 = time.perf_counter()
        for b, k in zip(batches[name], keys, strict=True):
            st[0], st[1], st[2] = jstep(st[0], st[1], b, k)
        jax.block_until_ready(st[2])
        first[name] = time.perf_counter() - t0
        state[name] = (jstep, st, keys)

    def epoch(name):
        jstep, st, keys = state[name]
        for b, k in zip(batches[name], keys, strict=True):
            st[0], st[1], st[2] = jstep(st[0], st[1], b, k)
        jax.block_until_ready(st[2])

    samples = {name: [] for name in models}
    for _ in range(args.reps):
        for name in models:
            t0 = time.perf_counter()
            epoch(name)
            samples[name].append((time.perf_counter() - t0) / len(batches[name]))
    for name, (_, layout, n_samples) in models.items():
        shapes = sorted({tuple(b.values.shape) for b in batches[name]})
        emit({
            "part": "svae_step", "model": name, "layout": layout,
            "n_samples": n_samples, "steps_per_epoch": len(batches[name]),
            "batch_shapes": shapes,
            "median_s": statistics.median(samples[name]),
            "min_s": min(samples[name]),
            "times_s": [round(t, 5) for t in samples[name]],
            "compile_s": round(compile_s[name], 2),
            "first_epoch_s": round(first[name], 2),
            "last_loss": float(state[name][1][2]),
            "quick": args.quick, "load_avg_1min": os.getloadavg()[0],
        }, fh)  # fmt: skip


def main(argv=None):
    args = parse_args(argv)
    import jax

    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    rows = []

    class Tee:
        def __init__(self, fh):
            self.fh = fh

        def write(self, s):
            self.fh.write(s)
            if s.strip():
                rows.append(json.loads(s))

        def flush(self):
            self.fh.flush()

    with open(args.out, "w") as fh:
        tee = Tee(fh)
        emit({"setup": True, "jax": jax.__version__,
              "dynamax": package_version("dynamax"),
              "device": jax.devices()[0].device_kind, "threads": 1,
              "quick": args.quick}, tee)  # fmt: skip
        if "lgssm" in args.parts:
            run_lgssm(args, tee)
        if "svae_step" in args.parts:
            run_svae_step(args, tee)

    print_tables(rows)


def print_tables(rows):
    lg_rows = [r for r in rows if r.get("part") == "lgssm" and "skipped" not in r]
    if lg_rows:
        print(
            f"\nT = {lg_rows[0]['length']}, latent {D}, {C} channels, float32, "
            "CPU 1 thread\n"
        )
        print("| op | case | run ms (median) | compile s | XLA temp MiB | "
              "log-lik rel. diff |")  # fmt: skip
        print("| --- | --- | --- | --- | --- | --- |")
        for r in lg_rows:
            print(f"| {r['op']} | {r['case']} | {1e3 * r['median_s']:.2f} | "
                  f"{r['compile_s']:.2f} | {r['temp_bytes'] / 2**20:.2f} | "
                  f"{r['loglik_rel_diff']:.1e} |")  # fmt: skip
    st_rows = [r for r in rows if r.get("part") == "svae_step"]
    if st_rows:
        print("\npbcseq training step, batch 32, CPU 1 thread\n")
        print("| model | layout | samples | step ms (median) | min ms | compile s |")
        print("| --- | --- | --- | --- | --- | --- |")
        for r in st_rows:
            print(f"| {r['model']} | {r['layout']} | {r['n_samples']} | "
                  f"{1e3 * r['median_s']:.1f} | {1e3 * r['min_s']:.1f} | "
                  f"{r['compile_s']:.1f} |")  # fmt: skip


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "--summarise":
        # the tables of recorded runs: --summarise FILE.jsonl [FILE.jsonl ...]
        recorded = read_jsonl(sys.argv[2:])
        print_tables(recorded)
    else:
        main()
