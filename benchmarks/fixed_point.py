"""DEQ fixed points: ctmodels.fixed_point (anderson / broyden / iteration) vs torchdeq.

Problem: z = tanh(W z + U x + b), z in R^256, x in R^64, batch 64, float32, one thread.

Cases:
  easy  W random Gaussian scaled to spectral norm 0.9, U ~ N(0, 1/64), b ~ N(0, 0.01),
        x ~ N(0, 1): pre-activations O(1), plain iteration converges in ~15 steps.
  hard  W = Q diag(linspace(0, 0.99, 256)) Q^T (symmetric, spectral radius 0.99,
        eigenvalues in [0, 0.99]), U ~ N(0, 1e-4 / 64), b = 0: z* ~ 0.1, tanh in its
        linear range, so plain iteration contracts at ~0.99 per step and needs
        hundreds of steps. (A symmetric W with eigenvalues down to -0.99 makes the
        target unreachable for *any* float32 plain iteration: the oscillating modes
        amplify the rounding noise of f to a relative-residual floor of ~2e-6.)

Solvers (ctmodels registry name -> torchdeq counterpart):
  iteration -> fixed_point_iter, anderson -> anderson, broyden -> broyden.

Stopping rule (the same for every implementation): every sample's relative residual
|f(z) - z|_2 / |z|_2 <= --tol (1e-6). torchdeq: f_stop_mode='rel' (its denominator is
|f(z)|_2, the same thing at convergence), stopping when the worst sample passes.
ctmodels has no relative 2-norm stopping rule (its tests are elementwise,
|r_i| <= atol + rtol |z_i|, which for the small components of z is far stricter and in
float32 unreachable at rtol 1e-6), so the registry solver is built as
`ctmodels.solvers.get(name, rtol=0, atol=1, norm=lambda r: |r_i|_2 / (tol |z*_i|_2))`
with |z*_i| the norm of each sample's solution from a float64 reference solve (per
sample under vmap, the max over samples for the joint layout): a relative 2-norm test
scaled by the true solution instead of the current iterate.

ctmodels layouts:
  ctmodels_vmap   jax.vmap over the batch of per-sample solves (256-dim each, each
                  with its own Anderson/Broyden history and its own stop; the vmapped
                  loop runs until the last sample stops). This is what torchdeq does
                  too: its solvers keep per-sample histories / mixing coefficients
                  and stop on the worst sample. Backward: adjoint="implicit" as is.
  ctmodels_joint  the [64, 256] batch solved as ONE 16384-dim fixed point (one shared
                  history and mixing). Backward: adjoint="implicit" as is (the
                  matrix-free default; a dense solver would materialise the
                  16384 x 16384 Jacobian).
  The default implicit backward of ctmodels.fixed_point is matrix-free and mirrors
  the forward solver, as torchdeq's b_solver does here: plain adjoint iteration
  ("neumann", one VJP per iteration) for `iteration`, Anderson-accelerated adjoint
  iteration ("anderson_linear") for `anderson` and `broyden`; both stop at
  |A x - b| <= 1e-6 max(|b|, |x|) (max-norms), i.e. relative to the size of the
  solution as torchdeq's b_stop_mode='rel' is, with the forward's max_steps (>= 500).

Phases: solve (forward only) and train_step (loss = mean_i 0.5 |z*_i|^2, value and
gradient w.r.t. W, U, b with the implicit-function-theorem backward; torchdeq:
get_deq(ift=True) with b_solver = the same solver, b_tol = tol, b_stop_mode='rel').

Output: one JSON line per (case, solver, impl, phase) and a summary line with the
targets. `iterations` = forward evaluations of f by the solver (ctmodels: num_steps,
max over the batch, = trips of the vmapped loop; torchdeq: counted calls),
`rel_residual_max` = max over samples of |f(z)-z|/|z| for the returned z, evaluated
in float64, `grad_rel_err` = |g - g_ref| / |g_ref| against a float64 Newton + exact
implicit-gradient reference. `result` lists the ctmodels result codes in the batch.

Usage:
  python benchmarks/fixed_point.py [--reps N] [--quick] [--no-torch] [--tol 1e-6]
"""

from __future__ import annotations

import os

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

SOLVERS = {
    "iteration": "fixed_point_iter",
    "anderson": "anderson",
    "broyden": "broyden",
}
MAX_STEPS = {"easy": 200, "hard": 2000}


class _Diverged(Exception):
    pass


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--reps", type=int, default=5, help="timed repetitions (>= 5)")
    p.add_argument("--quick", action="store_true", help="small sizes, smoke run")
    p.add_argument("--no-torch", action="store_true", help="skip torchdeq")
    p.add_argument("--tol", type=float, default=1e-6, help="relative residual target")
    p.add_argument(
        "--sample-s",
        type=float,
        default=None,
        help="minimum wall time of one timed sample (default 0.1 s, "
        "0.01 s with --quick)",
    )
    p.add_argument("--cases", default="easy,hard")
    p.add_argument("--solvers", default="iteration,anderson,broyden")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def emit(obj):
    print(json.dumps(obj), flush=True)


# ------------------------------------------------------------------ problems (numpy)
def make_problem(case, n, d, batch, seed):
    rng = np.random.default_rng(seed + (0 if case == "easy" else 1))
    if case == "easy":
        g = rng.standard_normal((n, n))
        W = 0.9 * g / np.linalg.norm(g, 2)
        U = rng.standard_normal((n, d)) / np.sqrt(d)
        b = 0.1 * rng.standard_normal(n)
    else:
        q, _ = np.linalg.qr(rng.standard_normal((n, n)))
        W = (q * np.linspace(0.0, 0.99, n)) @ q.T
        W = 0.5 * (W + W.T)
        U = 1e-2 * rng.standard_normal((n, d)) / np.sqrt(d)
        b = np.zeros(n)
    x = rng.standard_normal((batch, d))
    f32 = lambda a: np.asarray(a, np.float32)  # noqa: E731
    return f32(W), f32(U), f32(b), f32(x)


def reference(W, U, b, x):
    """float64 Newton solve of every sample, and the exact implicit gradient of
    loss = mean_i 0.5 |z_i|^2 w.r.t. (W, U, b)."""
    W, U, b, x = (np.asarray(a, np.float64) for a in (W, U, b, x))
    batch, n = x.shape[0], W.shape[0]
    inj = x @ U.T + b
    z = np.zeros((batch, n))
    eye = np.eye(n)
    for _ in range(100):
        a = z @ W.T + inj
        F = np.tanh(a) - z
        if np.max(np.abs(F)) < 1e-15:
            break
        s = 1 - np.tanh(a) ** 2
        for i in range(batch):
            z[i] -= np.linalg.solve(s[i][:, None] * W - eye, F[i])
    a = z @ W.T + inj
    s = 1 - np.tanh(a) ** 2
    g = z / batch
    mu = np.empty_like(z)
    for i in range(batch):
        lam = np.linalg.solve(eye - W.T * s[i][None, :], g[i])
        mu[i] = s[i] * lam
    grads = (mu.T @ z, mu.T @ x, mu.sum(0))
    return z, grads


def true_rel_residual(z, W, U, b, x):
    z = np.asarray(z, np.float64)
    W, U, b, x = (np.asarray(a, np.float64) for a in (W, U, b, x))
    r = np.tanh(z @ W.T + x @ U.T + b) - z
    return float(np.max(np.linalg.norm(r, axis=1) / np.linalg.norm(z, axis=1)))


def grad_rel_err(g, gref):
    g = np.concatenate([np.ravel(np.asarray(a, np.float64)) for a in g])
    gr = np.concatenate([np.ravel(a) for a in gref])
    return float(np.linalg.norm(g - gr) / np.linalg.norm(gr))


def main(argv=None):
    args = parse_args(argv)
    if args.quick:
        n, d, batch = 64, 16, 8
        reps = args.reps if args.reps != 5 else 3
    else:
        n, d, batch = 256, 64, 64
        reps = args.reps
        if reps < 5:
            print(f"warning: --reps {reps} < 5", file=sys.stderr)
    sample_s = (
        args.sample_s if args.sample_s is not None else (0.01 if args.quick else 0.1)
    )
    cases = [c for c in args.cases.split(",") if c]
    solvers = [s for s in args.solvers.split(",") if s]
    tol = args.tol

    torch = None
    if not args.no_torch:
        try:
            import torch
            import torchdeq

            torch.set_num_threads(1)
            try:
                torch.set_num_interop_threads(1)
            except RuntimeError:
                pass
        except ImportError:
            print(
                "torch/torchdeq not installed; running with --no-torch", file=sys.stderr
            )
            torch = None

    import jax
    import jax.numpy as jnp

    try:
        import ctmodels
    except ImportError:  # running from a source checkout without `pip install -e .`
        sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        import ctmodels

    # -------------------------------------------------------------- JAX builders
    def f_single(z, a):
        W, inj = a
        return jnp.tanh(W @ z + inj)

    def f_joint(z, a):
        W, inj = a
        return jnp.tanh(z @ W.T + inj)

    def scaled_2norm(v, scale):
        # |v|_2 / scale for one sample (vmap layout).
        return jnp.sqrt(jnp.sum(v**2)) / scale

    def per_sample_max_scaled_2norm(v, scales):
        # Anderson/Broyden hand the norm a flat vector, plain iteration the [B, n]
        # array; both reshape to one row per sample: max_i |v_i|_2 / scale_i.
        rows = jnp.reshape(v, (scales.shape[0], -1))
        return jnp.max(jnp.sqrt(jnp.sum(rows**2, axis=1)) / scales)

    result_names = {
        int(np.asarray(getattr(ctmodels.RESULTS, name)._value)): name
        for name in ctmodels.RESULTS._name_to_item  # pyright: ignore
    }

    def build_jax(layout, solver_name, phase, data, scales, max_steps, cot_rms):
        W, U, b, x = (jnp.asarray(a) for a in data)
        scales = jnp.asarray(scales, jnp.float32)  # tol * |z*_i|, per sample
        if layout == "vmap":
            adjoint = "implicit"

            def solve(params, x):
                W, U, b = params
                inj = x @ U.T + b

                def one(inj_i, scale_i):
                    solver_v = ctmodels.solvers.get(
                        solver_name,
                        kind="fixed_point",
                        rtol=0.0,
                        atol=1.0,
                        norm=jax.tree_util.Partial(scaled_2norm, scale=scale_i),
                    )
                    sol = ctmodels.fixed_point(
                        f_single,
                        jnp.zeros(n, jnp.float32),
                        (W, inj_i),
                        solver=solver_v,
                        adjoint=adjoint,
                        max_steps=max_steps,
                        throw=False,
                    )
                    return (
                        sol.value,
                        sol.stats["num_steps"],
                        sol.result._value,
                        sol.stats["stagnated"],
                    )

                return jax.vmap(one)(inj, scales)
        else:
            norm = jax.tree_util.Partial(per_sample_max_scaled_2norm, scales=scales)
            solver_v = ctmodels.solvers.get(
                solver_name, kind="fixed_point", rtol=0.0, atol=1.0, norm=norm
            )
            # the default implicit backward: matrix-free iteration on the adjoint
            # fixed point, one VJP per iteration (see the module docstring)
            gmres_adjoint = "implicit"

            def solve(params, x):
                W, U, b = params
                inj = x @ U.T + b
                sol = ctmodels.fixed_point(
                    f_joint,
                    jnp.zeros((batch, n), jnp.float32),
                    (W, inj),
                    solver=solver_v,
                    adjoint=gmres_adjoint,
                    max_steps=max_steps,
                    throw=False,
                )
                return (
                    sol.value,
                    sol.stats["num_steps"],
                    sol.result._value,
                    sol.stats["stagnated"],
                )

        if phase == "solve":
            fn = jax.jit(solve)
        else:

            def loss(params, x):
                z, steps, res, stag = solve(params, x)
                val = 0.5 * jnp.sum(z**2) / batch
                return val, (jax.lax.stop_gradient(z), steps, res, stag)

            fn = jax.jit(jax.value_and_grad(loss, has_aux=True))
        params = (W, U, b)
        t0 = time.perf_counter()
        lowered = fn.lower(params, x)
        t1 = time.perf_counter()
        compiled = lowered.compile()
        t2 = time.perf_counter()

        def call():
            out = compiled(params, x)
            jax.block_until_ready(out)
            return out

        out = call()
        if phase == "solve":
            z, steps, res, stag = out
            grads = None
        else:
            (_, (z, steps, res, stag)), grads = out
        steps = np.atleast_1d(np.asarray(steps))
        res = np.atleast_1d(np.asarray(res))
        info = {
            "trace_lower_s": t1 - t0,
            "compile_s": t2 - t1,
            "iterations": int(steps.max()),
            "iterations_mean": float(steps.mean()),
            "result": sorted({result_names[int(c)] for c in res}),
            "num_failed": int(np.sum(res != 0)),
            "num_stagnated": int(np.sum(np.asarray(stag))),
            "bwd_linear_solver": None
            if phase == "solve"
            else ("neumann" if solver_name == "iteration" else "anderson_linear")
            + " (ctmodels default: matrix-free, rtol 1e-6)",
        }
        return call, info, np.asarray(z), grads

    # -------------------------------------------------------------- torch builder
    def build_torch(solver_name, phase, data, max_steps):
        tW, tU, tb, tx = (torch.from_numpy(np.array(a)) for a in data)
        params = [torch.nn.Parameter(a.clone()) for a in (tW, tU, tb)]
        deq = torchdeq.get_deq(
            f_solver=SOLVERS[solver_name],
            b_solver=SOLVERS[solver_name],
            f_max_iter=max_steps,
            b_max_iter=max_steps,
            f_tol=tol,
            b_tol=tol,
            f_stop_mode="rel",
            b_stop_mode="rel",
            ift=True,
        )
        last = {}

        def writer(info):
            last["bwd_nstep"] = int(info["nstep"].max())

        def call():
            W, U, b = params
            count = [0]
            inj = tx @ U.T + b

            def f(z):
                count[0] += 1
                if not bool(torch.isfinite(z).all()):
                    # torchdeq has no divergence exit and would keep iterating on
                    # NaN up to max_iter (its full-memory Broyden then costs O(k^2)).
                    raise _Diverged(count[0])
                return torch.tanh(z @ W.T + inj)

            z0 = torch.zeros(batch, n)
            if phase == "solve":
                deq.eval()
                with torch.no_grad():
                    z_out, info = deq(f, z0)
                z = z_out[-1]
                last["fevals"] = count[0]
            else:
                deq.train()
                for p in params:
                    p.grad = None
                z_out, info = deq(f, z0, backward_writer=writer)
                z = z_out[-1]
                last["fevals"] = count[0] - 1  # minus the IFT graph-building call
                loss = 0.5 * (z**2).sum() / batch
                loss.backward()
            last["z"] = z.detach()
            last["nstep"] = info["nstep"]
            return z

        t0 = time.perf_counter()
        try:
            call()
        except _Diverged as e:
            return (
                None,
                {
                    "trace_lower_s": 0.0,
                    "compile_s": 0.0,
                    "diverged": True,
                    "iterations": e.args[0],
                    "time_to_divergence_s": time.perf_counter() - t0,
                    "note": "non-finite iterate at this f-evaluation; aborted "
                    "(torchdeq "
                    "would iterate on NaN to max_iter); not timed",
                },
                None,
                None,
            )
        info = {
            "trace_lower_s": 0.0,
            "compile_s": 0.0,
            "iterations": last["fevals"],
            "iterations_mean": float(last["nstep"].float().mean()),
            "result": None,
            "num_failed": None,
            "num_stagnated": None,
        }
        if phase != "solve":
            info["bwd_iterations"] = last.get("bwd_nstep")
        grads = None if phase == "solve" else [p.grad.numpy().copy() for p in params]
        return call, info, last["z"].numpy(), grads

    # -------------------------------------------------------------- build all
    impls = ["ctmodels_vmap", "ctmodels_joint"] + (["torchdeq"] if torch else [])
    phases = ("solve", "train_step")
    runners, infos = {}, {}
    problems = {}
    for case in cases:
        data = make_problem(case, n, d, batch, args.seed)
        zref, gref = reference(*data)
        znorms = np.linalg.norm(zref, axis=1)
        scales = tol * znorms
        cot_rms = float(np.sqrt(np.mean(zref**2))) / batch  # rms of dL/dz = z / B
        problems[case] = {
            "zref_norm_min": float(znorms.min()),
            "zref_norm_max": float(znorms.max()),
            "zref_rms": float(np.sqrt(np.mean(zref**2))),
        }
        for solver_name in solvers:
            for phase in phases:
                for impl in impls:
                    key = (case, solver_name, impl, phase)
                    t_build = time.perf_counter()
                    try:
                        if impl == "torchdeq":
                            call, info, z, g = build_torch(
                                solver_name, phase, data, MAX_STEPS[case]
                            )
                        else:
                            call, info, z, g = build_jax(
                                impl.split("_")[1],
                                solver_name,
                                phase,
                                data,
                                scales,
                                MAX_STEPS[case],
                                cot_rms,
                            )
                    except Exception as e:  # report, keep going
                        emit(
                            {
                                "case": case,
                                "solver": solver_name,
                                "impl": impl,
                                "phase": phase,
                                "error": repr(e)[:500],
                            }
                        )
                        continue
                    if call is None:  # diverged; reported, not timed
                        emit(
                            {
                                "case": case,
                                "solver": solver_name,
                                "impl": impl,
                                "phase": phase,
                                **info,
                            }
                        )
                        infos[key] = info
                        continue
                    info["rel_residual_max"] = true_rel_residual(z, *data)
                    info["reached_tol"] = info["rel_residual_max"] <= tol
                    if g is not None:
                        info["grad_rel_err"] = grad_rel_err(g, gref)
                    runners[key], infos[key] = call, info
                    print(
                        f"built {key} in {time.perf_counter() - t_build:.1f} s "
                        f"(compile {info['compile_s']:.1f} s)",
                        file=sys.stderr,
                        flush=True,
                    )

    # -------------------------------------------------------------- time (interleaved)
    inner = {}
    for k, call in runners.items():
        t0 = time.perf_counter()
        call()
        dt = time.perf_counter() - t0
        inner[k] = max(1, int(np.ceil(sample_s / max(dt, 1e-6))))
        print(f"one call of {k}: {dt:.4f} s", file=sys.stderr, flush=True)
    times = {k: [] for k in runners}
    for rep in range(reps):
        print(f"round {rep + 1}/{reps}", file=sys.stderr, flush=True)
        for k, call in runners.items():
            m = inner[k]
            t0 = time.perf_counter()
            for _ in range(m):
                call()
            times[k].append((time.perf_counter() - t0) / m)
    med = {k: statistics.median(v) for k, v in times.items()}

    for k in runners:
        case, solver_name, impl, phase = k
        line = {
            "case": case,
            "solver": solver_name,
            "impl": impl,
            "phase": phase,
            "median_s": med[k],
            "min_s": min(times[k]),
            "reps": reps,
            "inner": inner[k],
            "times_s": [round(t, 6) for t in times[k]],
            **infos[k],
        }
        tk = (case, solver_name, "torchdeq", phase)
        if impl != "torchdeq" and tk in med:
            line["torchdeq_over_this"] = med[tk] / med[k]
        emit(line)

    # -------------------------------------------------------------- summary / targets
    summary = {
        "summary": True,
        "n": n,
        "d": d,
        "batch": batch,
        "tol": tol,
        "reps": reps,
        "quick": args.quick,
        "max_steps": MAX_STEPS,
        "load_avg_1min": os.getloadavg()[0],
        "problems": problems,
        "jax": jax.__version__,
        "torch": None if torch is None else torch.__version__,
    }
    targets = {}
    for impl in impls:
        for case in cases:
            it = {
                s: infos.get((case, s, impl, "solve"), {}).get("iterations")
                for s in solvers
            }
            ok = {
                s: infos.get((case, s, impl, "solve"), {}).get("reached_tol")
                for s in solvers
            }
            for s in ("anderson", "broyden"):
                if it.get(s) is None or it.get("iteration") is None:
                    continue
                ratio = it[s] / it["iteration"]
                entry = {
                    "iterations": it[s],
                    "plain_iterations": it["iteration"],
                    "ratio": ratio,
                    "reached_tol": ok[s],
                    "plain_reached_tol": ok["iteration"],
                }
                if case == "hard":
                    entry["target"] = "ratio <= 1/3"
                    entry["met"] = bool(ratio <= 1 / 3 and ok[s])
                else:
                    entry["target"] = "ratio <= 1"
                    entry["met"] = bool(ratio <= 1 and ok[s])
                targets[f"{impl}/{case}/{s}/iterations"] = entry
    if torch is not None:
        for impl in ("ctmodels_vmap", "ctmodels_joint"):
            for k in runners:
                case, s, i, phase = k
                tk = (case, s, "torchdeq", phase)
                if i != impl:
                    continue
                if infos.get(tk, {}).get("diverged"):
                    targets[f"{impl}/{case}/{s}/{phase}/speedup_vs_torchdeq"] = {
                        "speedup": None,
                        "target": ">= 2",
                        "met": None,
                        "note": "torchdeq diverged; no comparison",
                    }
                    continue
                if tk not in med:
                    continue
                speedup = med[tk] / med[k]
                targets[f"{impl}/{case}/{s}/{phase}/speedup_vs_torchdeq"] = {
                    "speedup": speedup,
                    "target": ">= 2",
                    "met": bool(speedup >= 2),
                }
    summary["targets"] = targets
    summary["targets_met"] = sum(v["met"] is True for v in targets.values())
    summary["targets_missed"] = sorted(
        k for k, v in targets.items() if v["met"] is False
    )
    summary["targets_total"] = sum(v["met"] is not None for v in targets.values())
    emit(summary)


if __name__ == "__main__":
    main()
