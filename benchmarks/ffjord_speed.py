"""FFJORD training step: ctmodels.models.FFJORD vs the same CNF in torchdiffeq.

One run, interleaved repetitions, median wall time of one training step's gradient
(forward solve + backward pass of the mean NLL w.r.t. all parameters), CPU, one
thread each, float32, the same weights everywhere.

Problem (issue 18, Performance): 2-D points (a pinwheel, standardised), batch 1024;
the FFJORD paper's toy field, ConcatSquash layers 2 -> 64 -> 64 -> 64 -> 2 with tanh;
one block with end time T = 0.5; exact trace (D = 2); dopri5, rtol = atol = 1e-5; the
batch is ONE ODE state (x [B, 2], logdet [B]) in every implementation.

Gradient modes ("case"):
  checkpoint: ctmodels adjoint="checkpoint" (discretise-then-optimise);
              torchdiffeq.odeint with ordinary autograd.
  backsolve:  ctmodels adjoint="backsolve" (continuous adjoint);
              torchdiffeq.odeint_adjoint.

Implementations ("impl"):
  ctmodels     FFJORD.loss through eqx.filter_value_and_grad: the exact trace by
               CNFField.divergence (the per-row Jacobian carried through the layers
               next to the activations: plain matrix products, no nested AD).
  jvp          diagnostic, the previous ctmodels path: the same solve, the trace by
               D batched forward-mode products (ctmodels.nn.exact_divergence: jvp
               vmapped over the basis), whose reverse mode is AD of forward-mode AD.
  naive        diagnostic: the same solve, but the trace from a per-sample jax.jacfwd
               vmapped over the batch (the "naive Diffrax CNF" of the issue).
  torchdiffeq  torchdiffeq.odeint / odeint_adjoint, method="dopri5": the exact trace
               by D autograd.grad calls with create_graph=True (the FFJORD code's
               brute-force divergence).

Timing: JAX functions are AOT-compiled first (trace/lower and compile times are
reported as trace_lower_s and compile_s, never timed); one warm-up call each; then
--reps interleaved rounds; a sample repeats a call `inner` times (>= --sample-s) and
records time per call.
Ratios: torchdiffeq median / ctmodels median (> 1: ctmodels faster); `*_by_min` use
the fastest samples (more robust on a shared machine). NFE per solve: forward
vector-field evaluations (ctmodels: stats["num_fn_evals"]; torch: counted).

Sampling throughput: samples per second of FFJORD.sample (the reverse solve, jitted)
for 10^5 samples (10^4 with --quick).

`--device gpu` runs JAX and torch both on the first GPU instead (no thread limits;
everything else as above; `benchmarks/gpu_check.sh` runs it with `--quick --cases
checkpoint --no-naive --no-jvp`). `--cases` picks the gradient modes.

Usage:
  python benchmarks/ffjord_speed.py [--reps N] [--quick] [--no-torch] [--no-naive]
                                    [--no-jvp] [--device cpu|gpu]
                                    [--cases checkpoint,backsolve]
"""

from __future__ import annotations

import os
import sys

from _timing import (
    add_device_argument,
    check_device,
    device_from_argv,
    setup_device,
    timed,
)

DEVICE = device_from_argv(sys.argv[1:])
setup_device(DEVICE)  # before jax / torch are imported

import argparse  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402

import equinox as eqx  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import ctmodels  # noqa: E402
from ctmodels.models import FFJORD  # noqa: E402
from ctmodels.nn import exact_divergence  # noqa: E402

TOL = 1e-5
END_TIME = 0.5
LOG_2PI = math.log(2 * math.pi)


def parse():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--reps", type=int, default=7, help="timed repetitions")
    p.add_argument("--sample-s", type=float, default=0.5, help="seconds per sample")
    p.add_argument("--quick", action="store_true", help="batch 256, few reps")
    p.add_argument("--no-torch", action="store_true", help="skip torchdiffeq")
    p.add_argument("--no-naive", action="store_true", help="skip the naive diagnostic")
    p.add_argument("--no-jvp", action="store_true", help="skip the jvp diagnostic")
    add_device_argument(p)
    p.add_argument(
        "--cases",
        default="checkpoint,backsolve",
        help="gradient modes, comma-separated (checkpoint, backsolve)",
    )
    return p.parse_args()


def data(batch: int) -> np.ndarray:
    ds = ctmodels.datasets.load("pinwheel", n_samples=batch, seed=0)
    x = np.stack([ds["x"].values, ds["y"].values], axis=1)
    return ((x - x.mean(0)) / x.std(0)).astype(np.float32)


# --------------------------------------------------------------------------- JAX


def _naive_field(s, y, args):
    """The augmented field with a per-sample jacfwd trace (diagnostic)."""
    field, end = args
    x = y["x"]

    def one(r):
        return end * field(s * end, r)

    dx = end * field(s * end, x)
    jac = jax.vmap(jax.jacfwd(one))(x)
    return {"x": dx, "logdet": jnp.trace(jac, axis1=-2, axis2=-1)}


def _jvp_field(s, y, args):
    """The augmented field with the trace by D batched JVPs (the previous path)."""
    field, end = args
    dx, trace, _ = exact_divergence(lambda v: end * field(s * end, v), y["x"])
    return {"x": dx, "logdet": trace}


def naive_loss(model, x, vector_field=_naive_field):
    params, static = eqx.partition(model.field, eqx.is_array)
    field = eqx.combine(jax.tree.map(lambda p: p[0], params), static)
    end = model.end_times[0]
    sol = ctmodels.integrate(
        vector_field,
        {"x": x, "logdet": jnp.zeros(x.shape[0])},
        jnp.array([0.0, 1.0]),
        (field, end),
        **model._solve_opts(),  # FFJORD's own solver, adjoint and controller
    )
    z, logdet = sol.ys["x"][-1], sol.ys["logdet"][-1]
    logp = -0.5 * jnp.sum(z**2, -1) - LOG_2PI + logdet
    return -jnp.mean(logp), sol.stats["num_fn_evals"]


def jax_runner(model, x, kind):
    """AOT-compiled gradient of the NLL; returns (call, info)."""
    if kind == "ctmodels":

        def loss(m, x):
            value, metrics = m.loss(x, key=jax.random.key(0))
            return value, metrics["nfe"]
    elif kind == "jvp":

        def loss(m, x):
            return naive_loss(m, x, _jvp_field)
    else:
        loss = naive_loss
    f = eqx.filter_jit(eqx.filter_value_and_grad(loss, has_aux=True))
    t0 = time.perf_counter()
    lowered = f.lower(model, x)
    t1 = time.perf_counter()
    compiled = lowered.compile()
    t2 = time.perf_counter()

    def call():
        out = compiled(model, x)
        jax.block_until_ready(out)
        return out

    (value, nfe), _ = call()
    return call, {
        "loss": float(value),
        "nfe_fwd": int(nfe),
        "trace_lower_s": round(t1 - t0, 2),
        "compile_s": round(t2 - t1, 2),
    }


# ------------------------------------------------------------------------- torch


def torch_runner(model, x, case, device="cpu", sync=lambda: None):
    import torch
    import torchdiffeq

    params, _ = eqx.partition(model.field, eqx.is_array)
    layers = [
        {k: torch.tensor(np.asarray(getattr(layer, k))[0], device=device) for k in
         ("weight", "bias", "gate_weight", "gate_bias", "time_bias")}
        for layer in params.layers
    ]  # fmt: skip

    class CNF(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.p = torch.nn.ParameterList(
                [torch.nn.Parameter(v.clone()) for lay in layers for v in lay.values()]
            )
            self.nfe = 0

        def field(self, t, h):
            n = len(layers)
            for i in range(n):
                w, b, gw, gb, tb = self.p[5 * i : 5 * i + 5]
                h = (h @ w.T + b) * torch.sigmoid(gw * t + gb) + tb * t
                if i < n - 1:
                    h = torch.tanh(h)
            return h

        def forward(self, s, state):
            self.nfe += 1
            x, _ = state
            with torch.enable_grad():
                x = x.requires_grad_(True)
                dx = END_TIME * self.field(s * END_TIME, x)
                div = 0.0
                for i in range(x.shape[1]):
                    (g,) = torch.autograd.grad(dx[:, i].sum(), x, create_graph=True)
                    div = div + g[:, i]
            return dx, div

    cnf = CNF()
    xt = torch.tensor(np.asarray(x), device=device)
    ts = torch.tensor([0.0, 1.0], device=device)
    solve = torchdiffeq.odeint if case == "checkpoint" else torchdiffeq.odeint_adjoint
    kw = {} if case == "checkpoint" else {"adjoint_params": tuple(cnf.parameters())}

    def call():
        cnf.zero_grad()
        cnf.nfe = 0
        state = (xt, torch.zeros(xt.shape[0], device=device))
        zs, logdets = solve(cnf, state, ts, rtol=TOL, atol=TOL, method="dopri5", **kw)
        z, logdet = zs[-1], logdets[-1]
        logp = -0.5 * (z**2).sum(-1) - LOG_2PI + logdet
        loss = -logp.mean()
        nfe_fwd = cnf.nfe
        loss.backward()
        sync()  # the backward pass runs asynchronously on a GPU
        return float(loss.detach()), nfe_fwd, cnf.nfe

    value, nfe_fwd, nfe_all = call()
    return call, {"loss": value, "nfe_fwd": nfe_fwd, "nfe_fwd_bwd": nfe_all}


# ------------------------------------------------------------------------ timing


def main():
    args = parse()
    batch = 256 if args.quick else 1024
    reps = min(args.reps, 3) if args.quick else args.reps
    x = jnp.asarray(data(batch))
    summary = {"summary": True, "batch": batch, "dim": 2, "width": 64, "depth": 3,
               "rtol": TOL, "atol": TOL, "solver": "dopri5",
               "device": DEVICE, "jax_device": str(x.devices().pop())}  # fmt: skip
    if DEVICE == "cpu":
        summary["threads"] = 1
    torch_ok = not args.no_torch
    cases = [c.strip() for c in args.cases.split(",") if c.strip()]
    bad = sorted(set(cases) - {"checkpoint", "backsolve"})
    if bad or not cases:
        raise SystemExit(f"--cases: checkpoint and/or backsolve, got {args.cases!r}")
    if torch_ok:
        try:
            import torchdiffeq  # noqa: F401
        except ImportError:
            torch_ok = False
            summary["torch"] = (
                "torchdiffeq not installed: pip install torch torchdiffeq"
            )
    if torch_ok:
        torch_device, sync = check_device(DEVICE)
    elif DEVICE == "gpu" and jax.default_backend() != "gpu":
        raise SystemExit(f"--device gpu, but JAX runs on {jax.default_backend()!r}.")
    for case in cases:
        model = FFJORD(
            2, width=64, depth=3, end_time=END_TIME, trace="exact", solver="dopri5",
            rtol=TOL, atol=TOL, adjoint=case, key=jax.random.key(0),
        )  # fmt: skip
        runners, infos = {}, {}
        runners["ctmodels"], infos["ctmodels"] = jax_runner(model, x, "ctmodels")
        if not args.no_jvp:
            runners["jvp"], infos["jvp"] = jax_runner(model, x, "jvp")
        if not args.no_naive:
            runners["naive"], infos["naive"] = jax_runner(model, x, "naive")
        if torch_ok:
            runners["torchdiffeq"], infos["torchdiffeq"] = torch_runner(
                model, x, case, torch_device, sync
            )
        times = timed(runners, reps, args.sample_s)
        med = {k: statistics.median(v) for k, v in times.items()}
        best = {k: min(v) for k, v in times.items()}
        for k in runners:
            print(json.dumps({
                "case": case, "impl": k, "median_s": med[k], "min_s": best[k],
                **infos[k], "times_s": times[k],
            }))  # fmt: skip
        for other in runners:
            if other != "ctmodels":
                summary[f"{case}_{other}_over_ctmodels"] = med[other] / med["ctmodels"]
                summary[f"{case}_{other}_over_ctmodels_by_min"] = (
                    best[other] / best["ctmodels"]
                )
        summary[f"{case}_compile_s"] = infos["ctmodels"]["compile_s"]
        summary[f"{case}_trace_lower_s"] = infos["ctmodels"]["trace_lower_s"]
        summary[f"{case}_nfe_fwd"] = infos["ctmodels"]["nfe_fwd"]

    # sampling throughput
    n = 10_000 if args.quick else 100_000
    model = FFJORD(2, width=64, depth=3, end_time=END_TIME, rtol=TOL, atol=TOL,
                   key=jax.random.key(0))  # fmt: skip
    sample = eqx.filter_jit(lambda m, k: m.sample(n, key=k))
    jax.block_until_ready(sample(model, jax.random.key(1)))
    t0 = time.perf_counter()
    jax.block_until_ready(sample(model, jax.random.key(2)))
    summary["samples_per_s"] = n / (time.perf_counter() - t0)
    summary["n_samples"] = n
    summary["load_avg_1min"] = os.getloadavg()[0]
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
