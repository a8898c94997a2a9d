"""Profile of one evaluation of FFJORD's exact-trace vector field: the forward pass and
the vector-Jacobian product (what a training step repeats ~40 times), per way of
computing the divergence, jitted, one thread, interleaved, block_until_ready.

Field: the FFJORD paper's 2-D toy field (ConcatSquash 2 -> 64 -> 64 -> 64 -> 2, tanh),
a batch of `--batch` rows (default 1024, the issue's). Ways ("impl"):

  field         f(t, x) alone (no divergence): the floor.
  jvp           ctmodels.nn.exact_divergence: D forward-mode products, vmapped over
                the basis (FFJORD's exact trace before CNFField.divergence).
  jvp_unrolled  the same D JVPs, one after another (no vmap).
  jacfwd        per-row jax.jacfwd vmapped over the batch (the "naive" CNF).
  carried       CNFField.divergence: the Jacobian carried through the layers next to
                the activations (closed-form activation derivatives; plain matrix
                products in reverse mode, no nested AD).

Every way returns (f, trace); the VJP pulls back random cotangents of both to the
parameters and x. Prints one JSON line per impl and phase (median and min ms).

Usage: python benchmarks/cnf_divergence_profile.py [--batch B] [--reps N] [--quick]
"""

from __future__ import annotations

from _timing import single_thread

single_thread()  # before jax is imported

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from ctmodels.nn import CNFField, exact_divergence  # noqa: E402


def impls(d):
    def field(f, t, x):
        return f(t, x), jnp.zeros(x.shape[:-1], x.dtype)

    def jvp(f, t, x):
        fx, tr, _ = exact_divergence(lambda v: f(t, v), x)
        return fx, tr

    def jvp_unrolled(f, t, x):
        tr = 0.0
        for k in range(d):
            fx, col = jax.jvp(
                lambda v: f(t, v), (x,), (jnp.zeros_like(x).at[:, k].set(1),)
            )
            tr = tr + col[:, k]
        return fx, tr

    def jacfwd(f, t, x):
        jac = jax.vmap(jax.jacfwd(lambda r: f(t, r)))(x)
        return f(t, x), jnp.trace(jac, axis1=-2, axis2=-1)

    def carried(f, t, x):
        fx, tr, _ = f.divergence(t, x)
        return fx, tr

    return dict(field=field, jvp=jvp, jvp_unrolled=jvp_unrolled, jacfwd=jacfwd,
                carried=carried)  # fmt: skip


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--batch", type=int, default=1024)
    p.add_argument("--reps", type=int, default=9, help="interleaved rounds")
    p.add_argument("--inner", type=int, default=20, help="calls per sample")
    p.add_argument("--quick", action="store_true", help="batch 256, 3 rounds")
    p.add_argument("--no-torch", action="store_true", help="(no torch side here)")
    args = p.parse_args()
    if args.quick:
        args.batch, args.reps = 256, min(args.reps, 3)
    d = 2
    f = CNFField(d, width=64, depth=3, key=jax.random.key(0))
    x = jax.random.normal(jax.random.key(1), (args.batch, d))
    t = jnp.asarray(0.3)
    cts = (jax.random.normal(jax.random.key(2), x.shape),
           jax.random.normal(jax.random.key(3), x.shape[:1]))  # fmt: skip
    calls, ref = {}, None
    for name, fn in impls(d).items():
        fwd = jax.jit(lambda f, x, fn=fn: fn(f, t, x))
        vjp = jax.jit(
            lambda f, x, fn=fn: jax.vjp(lambda f, x: fn(f, t, x), f, x)[1](cts)
        )
        out = fwd(f, x)
        if name == "jvp":
            ref = out[1]
        elif name != "field":
            err = float(jnp.max(jnp.abs(out[1] - ref)))
            print(json.dumps({"impl": name, "max_abs_trace_diff_vs_jvp": err}))
        for phase, g in (("forward", fwd), ("vjp", vjp)):
            jax.block_until_ready(g(f, x))
            calls[(name, phase)] = g
    times = {k: [] for k in calls}
    for _ in range(args.reps):
        for k, g in calls.items():
            t0 = time.perf_counter()
            for _ in range(args.inner):
                jax.block_until_ready(g(f, x))
            times[k].append((time.perf_counter() - t0) / args.inner * 1e3)
    for (name, phase), v in times.items():
        print(json.dumps({"impl": name, "phase": phase, "batch": args.batch,
                          "median_ms": round(statistics.median(v), 3),
                          "min_ms": round(min(v), 3)}))  # fmt: skip
    med = {k: statistics.median(v) for k, v in times.items()}
    best = {k: min(v) for k, v in times.items()}
    print(json.dumps({
        "summary": True, "batch": args.batch, "threads": 1,
        "vjp_jvp_over_carried": med[("jvp", "vjp")] / med[("carried", "vjp")],
        "vjp_jvp_over_carried_by_min": best[("jvp", "vjp")] / best[("carried", "vjp")],
        "load_avg_1min": os.getloadavg()[0],
    }))  # fmt: skip


if __name__ == "__main__":
    main()
