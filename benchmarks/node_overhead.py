"""Neural-ODE forward+backward: ctmodels.integrate vs raw Diffrax vs torchdiffeq.

One run, interleaved repetitions, median wall time of one gradient evaluation
(forward solve + backward pass, gradient of the loss w.r.t. the MLP parameters).

Model: dy/dt = MLP(y), MLP 32 -> 64 -> 64 -> 32 with tanh between layers, batch 256
(the batch is integrated as ONE [256, 32] state by every implementation, so all three
share one adaptive step size), dopri5, rtol 1e-4, atol 1e-6, t in [0, 1],
loss = mean(y(1) ** 2). float32, one thread each, the same weights everywhere.

Gradient modes ("case"):
  checkpoint: ctmodels adjoint="checkpoint" == diffrax.RecursiveCheckpointAdjoint;
              torchdiffeq.odeint with ordinary autograd backprop.
  backsolve:  ctmodels adjoint="backsolve" == diffrax.BacksolveAdjoint;
              torchdiffeq.odeint_adjoint (continuous adjoint).

Implementations ("impl"):
  ctmodels             ctmodels.integrate(..., ts=[0, 1]) and ys[-1]
  diffrax              diffrax.diffeqsolve(..., saveat=SaveAt(t1=True)) (the natural
                       raw-Diffrax way to get the final state)
  diffrax_saveat_ts    diagnostic: raw Diffrax with SaveAt(ts=[0, 1]) and throw=False,
                       i.e. what ctmodels.integrate passes to Diffrax; isolates the
                       cost of ctmodels' choices from the cost of its wrapper code
  diffrax_dt0          diagnostic: raw Diffrax (SaveAt(t1=True)) given the starting
                       step that ctmodels.integrate picks by default (Hairer's
                       algorithm, see below), i.e. the same step sequence as ctmodels:
                       the pure wrapper overhead
  torchdiffeq          torchdiffeq.odeint / odeint_adjoint, method="dopri5"

Timing: every JAX function is jitted and AOT-compiled first (trace/lower and compile
times are reported separately, never timed); one warm-up call per runner; then --reps
interleaved rounds over all (case, impl). A timed sample repeats the call `inner`
times (calibrated so a sample takes >= --sample-s) and records time per call.
median_s / min_s are over the samples.

Output: one JSON line per (case, impl), then one summary line. Ratios on a line are
"this impl's median / the other impl's median" (> 1 means this impl is slower); the
summary names its ratios explicitly (`*_by_min` use the fastest sample, which is more
robust when the machine is shared).

Starting step: with dt0=None, ctmodels.integrate picks the first step by the
algorithm of Hairer, Norsett & Wanner (two vector-field evaluations), the same rule
torchdiffeq uses and that diffrax.PIDController intends to apply -- but in Diffrax
0.7.2 that code path is never reached (diffeqsolve wraps the terms before the
controller checks `isinstance(terms, ODETerm)`), so raw Diffrax with dt0=None
always starts from dt = 0.01. On this problem that costs raw Diffrax one extra step
(4 instead of 3). The `diffrax` runner keeps raw Diffrax's own default; compare
`diffrax_dt0` to see ctmodels against Diffrax on the same steps.

Step / evaluation counts: `steps`, `accepted`, `rejected` are Diffrax's forward stats
(torchdiffeq: (nfe_fwd - 2) / 6 attempted steps); `nfe_fwd` is forward vector-field
evaluations (JAX: 6 per attempted step + 1, FSAL, + 2 for the starting step where
one is computed; ctmodels: its stats["num_fn_evals"]; torchdiffeq: counted);
`vf_calls_fwd_bwd` is vector-field calls executed by one forward+backward (torch:
counted; JAX: counted by a host callback in an untimed instrumented build, which
includes checkpoint recomputation and the primal evaluations inside VJPs, so it is
not comparable 1:1 with torch's backprop count). torchdiffeq's dopri5 uses the same
rms error norm with atol + rtol * max(|y0|, |y1|) forward, but on the adjoint pass its
default norm is max(rms(y), rms(a_y), rms(a_theta) per parameter) whereas Diffrax's
BacksolveAdjoint uses one rms over the whole augmented state; steps can differ.

Usage:
  python benchmarks/node_overhead.py [--reps N] [--quick] [--no-torch]
"""

from __future__ import annotations

import os

# One thread everywhere; must be set before jax / torch are imported.
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "")
    + " --xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
for _v in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
    os.environ.setdefault(_v, "1")

import argparse  # noqa: E402
import json  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402

RTOL = 1e-4
ATOL = 1e-6
MAX_STEPS = 4096


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--reps", type=int, default=9, help="timed repetitions (>= 5)")
    p.add_argument(
        "--sample-s",
        type=float,
        default=None,
        help="minimum wall time of one timed sample; a sample repeats the "
        "call `inner` times and reports time/inner (default 0.2 s, "
        "0.02 s with --quick)",
    )
    p.add_argument(
        "--t1",
        type=float,
        default=1.0,
        help="end time of the integration (default 1.0)",
    )
    p.add_argument("--quick", action="store_true", help="small sizes, smoke run")
    p.add_argument("--no-torch", action="store_true", help="skip torchdiffeq")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def emit(obj):
    print(json.dumps(obj), flush=True)


def main(argv=None):
    args = parse_args(argv)
    if args.quick:
        batch, dim, width = 16, 8, 16
        reps = max(args.reps if args.reps != 9 else 3, 1)
    else:
        batch, dim, width = 256, 32, 64
        reps = args.reps
        if reps < 5:
            print(f"warning: --reps {reps} < 5", file=sys.stderr)

    torch = torchdiffeq = None
    if not args.no_torch:
        try:
            import torch
            import torchdiffeq

            torch.set_num_threads(1)
            try:
                torch.set_num_interop_threads(1)
            except RuntimeError:
                pass
        except ImportError:
            print(
                "torch/torchdiffeq not installed; running with --no-torch",
                file=sys.stderr,
            )
            torch = None

    import diffrax
    import equinox as eqx
    import jax
    import jax.numpy as jnp

    try:
        import ctmodels
    except ImportError:  # running from a source checkout without `pip install -e .`
        sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        import ctmodels

    jax.config.update("jax_enable_x64", False)

    # ---------------------------------------------------------------- model & data
    key = jax.random.PRNGKey(args.seed)
    kmlp, ky = jax.random.split(key)
    mlp = eqx.nn.MLP(dim, dim, width, depth=2, activation=jnp.tanh, key=kmlp)
    params = {
        "W": [jnp.asarray(layer.weight, jnp.float32) for layer in mlp.layers],
        "b": [jnp.asarray(layer.bias, jnp.float32) for layer in mlp.layers],
    }
    y0 = jax.random.normal(ky, (batch, dim), jnp.float32)

    def mlp_apply(p, y):
        h = y
        n = len(p["W"])
        for i, (w, b) in enumerate(zip(p["W"], p["b"], strict=True)):
            h = h @ w.T + b
            if i < n - 1:
                h = jnp.tanh(h)
        return h

    def vf(t, y, p):
        return mlp_apply(p, y)

    t1 = float(args.t1)
    ts = jnp.array([0.0, t1], jnp.float32)
    sample_s = (
        args.sample_s if args.sample_s is not None else (0.02 if args.quick else 0.2)
    )

    def ctm_loss(p, y0, adjoint):
        sol = ctmodels.integrate(
            vf,
            y0,
            ts,
            p,
            solver="dopri5",
            adjoint=adjoint,
            rtol=RTOL,
            atol=ATOL,
            max_steps=MAX_STEPS,
        )
        yT = sol.ys[-1]
        return jnp.mean(yT**2), sol.stats

    def hairer_dt0(p, y0):
        # the starting step ctmodels.integrate computes when dt0 is None
        from ctmodels._integrate import _initial_step

        ctrl = diffrax.PIDController(rtol=RTOL, atol=ATOL)
        return _initial_step(
            diffrax.ODETerm(vf), diffrax.Dopri5(), ctrl, 0.0, t1, y0, p
        )

    def dfx_loss(p, y0, adjoint, saveat_ts=False, field=vf, same_dt0=False):
        adj = (
            diffrax.RecursiveCheckpointAdjoint()
            if adjoint == "checkpoint"
            else diffrax.BacksolveAdjoint()
        )
        saveat = diffrax.SaveAt(ts=ts) if saveat_ts else diffrax.SaveAt(t1=True)
        sol = diffrax.diffeqsolve(
            diffrax.ODETerm(field),
            diffrax.Dopri5(),
            t0=0.0,
            t1=t1,
            dt0=hairer_dt0(p, y0) if same_dt0 else None,
            y0=y0,
            args=p,
            saveat=saveat,
            stepsize_controller=diffrax.PIDController(rtol=RTOL, atol=ATOL),
            adjoint=adj,
            max_steps=MAX_STEPS,
            throw=not saveat_ts,
        )
        return jnp.mean(sol.ys[-1] ** 2), sol.stats

    def stats_of(s):
        out = {
            "steps": int(s["num_steps"]),
            "accepted": int(s["num_accepted_steps"]),
            "rejected": int(s["num_rejected_steps"]),
        }
        if "num_fn_evals" in s:
            out["nfe_fwd"] = int(s["num_fn_evals"])
        return out

    # ---------------------------------------------------------------- JAX impls
    def build_jax(loss_fn, **kw):
        f = jax.jit(jax.value_and_grad(lambda p, y: loss_fn(p, y, **kw), has_aux=True))
        t0 = time.perf_counter()
        lowered = f.lower(params, y0)
        t1 = time.perf_counter()
        compiled = lowered.compile()
        t2 = time.perf_counter()

        def call():
            out = compiled(params, y0)
            jax.block_until_ready(out)
            return out

        (loss, st), grads = call()  # warm-up (first execution)
        info = {
            "trace_lower_s": t1 - t0,
            "compile_s": t2 - t1,
            "loss": float(loss),
            **stats_of(st),
        }
        return call, info, grads

    # NFE counting: an instrumented (untimed) build with a host callback in the
    # vector field; counts forward evaluations and forward+backward evaluations.
    counter = {"n": 0}

    def _bump():
        counter["n"] += 1

    def vf_counted(t, y, p):
        jax.debug.callback(_bump)
        return vf(t, y, p)

    def count_jax_nfe(which, adjoint):
        if which == "ctmodels":

            def lf(p, y):
                sol = ctmodels.integrate(
                    vf_counted,
                    y,
                    ts,
                    p,
                    solver="dopri5",
                    adjoint=adjoint,
                    rtol=RTOL,
                    atol=ATOL,
                    max_steps=MAX_STEPS,
                )
                return jnp.mean(sol.ys[-1] ** 2)
        else:

            def lf(p, y):
                return dfx_loss(
                    p,
                    y,
                    adjoint,
                    saveat_ts=(which == "diffrax_saveat_ts"),
                    field=vf_counted,
                    same_dt0=(which == "diffrax_dt0"),
                )[0]

        try:
            counter["n"] = 0
            jax.block_until_ready(jax.jit(jax.grad(lf))(params, y0))
            return counter["n"]
        except Exception as e:  # pragma: no cover - diagnostic only
            print(f"NFE counting failed for {which}/{adjoint}: {e!r}", file=sys.stderr)
            return None

    # ---------------------------------------------------------------- torch impl
    def build_torch(adjoint):
        nn = torch.nn

        class Field(nn.Module):
            def __init__(self):
                super().__init__()
                layers = []
                for i, (w, b) in enumerate(zip(params["W"], params["b"], strict=True)):
                    lin = nn.Linear(w.shape[1], w.shape[0])
                    with torch.no_grad():
                        lin.weight.copy_(torch.from_numpy(np.array(w)))
                        lin.bias.copy_(torch.from_numpy(np.array(b)))
                    layers.append(lin)
                    if i < len(params["W"]) - 1:
                        layers.append(nn.Tanh())
                self.net = nn.Sequential(*layers)
                self.nfe = 0

            def forward(self, t, y):
                self.nfe += 1
                return self.net(y)

        field = Field().float()
        ty0 = torch.from_numpy(np.array(y0)).float()
        tts = torch.tensor([0.0, t1], dtype=torch.float32)
        solve = (
            torchdiffeq.odeint
            if adjoint == "checkpoint"
            else torchdiffeq.odeint_adjoint
        )
        last = {}

        def call():
            field.zero_grad(set_to_none=True)
            field.nfe = 0
            ys = solve(field, ty0, tts, rtol=RTOL, atol=ATOL, method="dopri5")
            last["nfe_fwd"] = field.nfe
            loss = (ys[-1] ** 2).mean()
            loss.backward()
            last["nfe_total"] = field.nfe
            last["loss"] = float(loss.detach())
            return loss

        call()  # warm-up
        grads = [p.grad.detach().numpy().copy() for p in field.parameters()]
        steps = (last["nfe_fwd"] - 2) / 6  # 2 evals for the initial step, 6 per step
        info = {
            "trace_lower_s": 0.0,
            "compile_s": 0.0,
            "loss": last["loss"],
            "steps": steps,
            "accepted": None,
            "rejected": None,
            "nfe_fwd": last["nfe_fwd"],
            "vf_calls_fwd_bwd": last["nfe_total"],
        }
        return call, info, grads

    def flat_grads_jax(g):
        return np.concatenate(
            [
                np.ravel(np.asarray(x))
                for pair in zip(g["W"], g["b"], strict=True)
                for x in pair
            ]
        )

    # ---------------------------------------------------------------- build all
    cases = ("checkpoint", "backsolve")
    impls = ["ctmodels", "diffrax", "diffrax_dt0", "diffrax_saveat_ts"]
    if torch is not None:
        impls.append("torchdiffeq")

    runners, infos, grads = {}, {}, {}
    for case in cases:
        for impl in impls:
            if impl == "ctmodels":
                call, info, g = build_jax(ctm_loss, adjoint=case)
            elif impl == "diffrax":
                call, info, g = build_jax(dfx_loss, adjoint=case)
            elif impl == "diffrax_saveat_ts":
                call, info, g = build_jax(dfx_loss, adjoint=case, saveat_ts=True)
            elif impl == "diffrax_dt0":
                call, info, g = build_jax(dfx_loss, adjoint=case, same_dt0=True)
            else:
                call, info, g = build_torch(case)
            if impl != "torchdiffeq":
                g = flat_grads_jax(g)
                # FSAL dopri5: 6 per step + 1 (+ 2 for a computed starting step)
                extra = 2 if impl == "diffrax_dt0" else 0
                info.setdefault("nfe_fwd", 6 * info["steps"] + 1 + extra)
                info["vf_calls_fwd_bwd"] = (
                    count_jax_nfe(impl, case) if impl != "diffrax_saveat_ts" else None
                )
            else:
                g = np.concatenate([x.ravel() for x in g])
            runners[case, impl], infos[case, impl], grads[case, impl] = call, info, g

    # ------------------------------------------------------------ time (interleaved)
    # Calibrate: each timed sample repeats a call `inner` times (>= sample_s of work)
    # and records the time per call, so that short calls are not dominated by timer
    # and scheduler noise. Repetitions are interleaved across all (case, impl).
    inner = {}
    for k, call in runners.items():
        t0 = time.perf_counter()
        call()
        dt = time.perf_counter() - t0
        inner[k] = max(1, int(np.ceil(sample_s / max(dt, 1e-6))))
    times = {k: [] for k in runners}
    for _ in range(reps):
        for k, call in runners.items():
            n = inner[k]
            t0 = time.perf_counter()
            for _ in range(n):
                call()
            times[k].append((time.perf_counter() - t0) / n)

    med = {k: statistics.median(v) for k, v in times.items()}
    summary = {
        "summary": True,
        "batch": batch,
        "dim": dim,
        "width": width,
        "rtol": RTOL,
        "atol": ATOL,
        "t1": t1,
        "reps": reps,
        "quick": args.quick,
        "load_avg_1min": os.getloadavg()[0],
        "jax": jax.__version__,
        "diffrax": diffrax.__version__,
        "torch": None if torch is None else torch.__version__,
    }
    for case in cases:
        ref = grads[case, "diffrax"]
        for impl in impls:
            info = infos[case, impl]
            line = {
                "case": case,
                "impl": impl,
                "median_s": med[case, impl],
                "min_s": min(times[case, impl]),
                "reps": reps,
                "inner": inner[case, impl],
                "times_s": [round(x, 6) for x in times[case, impl]],
                **info,
            }
            g = grads[case, impl]
            line["grad_rel_diff_vs_diffrax"] = float(
                np.linalg.norm(g - ref) / np.linalg.norm(ref)
            )
            for other in ("diffrax", "torchdiffeq"):
                if other != impl and (case, other) in med:
                    line[f"ratio_vs_{other}"] = med[case, impl] / med[case, other]
            emit(line)
        mn = {k: min(v) for k, v in times.items()}
        summary[f"{case}_ctmodels_over_diffrax"] = (
            med[case, "ctmodels"] / med[case, "diffrax"]
        )
        summary[f"{case}_ctmodels_over_diffrax_by_min"] = (
            mn[case, "ctmodels"] / mn[case, "diffrax"]
        )
        summary[f"{case}_ctmodels_over_diffrax_saveat_ts"] = (
            med[case, "ctmodels"] / med[case, "diffrax_saveat_ts"]
        )
        summary[f"{case}_ctmodels_over_diffrax_dt0"] = (
            med[case, "ctmodels"] / med[case, "diffrax_dt0"]
        )
        summary[f"{case}_ctmodels_over_diffrax_dt0_by_min"] = (
            mn[case, "ctmodels"] / mn[case, "diffrax_dt0"]
        )
        summary[f"{case}_steps"] = {impl: infos[case, impl]["steps"] for impl in impls}
        if torch is not None:
            summary[f"{case}_torchdiffeq_over_ctmodels"] = (
                med[case, "torchdiffeq"] / med[case, "ctmodels"]
            )
            summary[f"{case}_torchdiffeq_over_ctmodels_by_min"] = (
                mn[case, "torchdiffeq"] / mn[case, "ctmodels"]
            )
            summary[f"{case}_torchdiffeq_over_diffrax"] = (
                med[case, "torchdiffeq"] / med[case, "diffrax"]
            )
    emit(summary)


if __name__ == "__main__":
    main()
