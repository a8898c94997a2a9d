"""DEQ training step: ctmodels.nn.DEQ against torchdeq on the same tanh cell.

One run, interleaved repetitions, CPU, one thread each, float32, the same weights
everywhere (issue 19, Performance).

Problem: the cell z = tanh(W z + U x + b), state and input 256-d, batch 64 solved as ONE
fixed-point state [64, 256] in both libraries (torchdeq's layout); W scaled to spectral
norm 0.8 so the map is contractive; loss = mean((z* - target)^2).

Cases (like with like, both with the implicit-function-theorem backward):
  ctmodels   DEQ(cell, solver="anderson", backward="implicit") under
             eqx.filter_jit(eqx.filter_value_and_grad(loss)): forward Anderson to the
             float32 default tolerance (rtol 1e-5, atol 1e-6, max-abs), backward by
             the engine's mirrored Anderson solve of the adjoint equation.
  torchdeq   get_deq(f_solver="anderson", b_solver="anderson", ift=True,
             f_tol=1e-5, b_tol=1e-6, stop_mode "rel"): torchdeq's IFT backward (its
             default backward is the one-step phantom gradient, not the IFT; that
             case is run too, as "torchdeq_1step", against ctmodels'
             backward="jacobian_free", the same one-step gradient).
Reported per case: median and min seconds per training step (forward + backward),
forward iterations, the final relative residual, and ctmodels' trace/compile times
(never timed in the step). Ratios: torchdeq / ctmodels (> 1: ctmodels faster).

`--device gpu` runs JAX and torch both on the first GPU instead (no thread limits;
everything else as above; `benchmarks/gpu_check.sh` runs it with `--quick`).

Usage:  python benchmarks/deq_torchdeq.py [--reps N] [--quick] [--device cpu|gpu]
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
import statistics  # noqa: E402
import time  # noqa: E402

import equinox as eqx  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import ctmodels  # noqa: E402

DIM, BATCH, RHO = 256, 64, 0.8


def weights(seed=0):
    rng = np.random.default_rng(seed)
    W = rng.normal(size=(DIM, DIM)) / np.sqrt(DIM)
    W *= RHO / np.linalg.norm(W, 2)
    U = rng.normal(size=(DIM, DIM)) / np.sqrt(DIM)
    b = 0.1 * rng.normal(size=DIM)
    x = rng.normal(size=(BATCH, DIM))
    target = 0.5 * rng.normal(size=(BATCH, DIM))
    return [a.astype(np.float32) for a in (W, U, b, x, target)]


class Cell(eqx.Module):
    W: jax.Array
    U: jax.Array
    b: jax.Array

    def __call__(self, z, x):
        return jnp.tanh(z @ self.W.T + x @ self.U.T + self.b)


def jax_runner(backward, W, U, b, x, target):
    cell = Cell(jnp.asarray(W), jnp.asarray(U), jnp.asarray(b))
    deq = ctmodels.nn.DEQ(cell, solver="anderson", backward=backward)

    def loss(deq, x, target):
        sol = deq.solve(x, jnp.zeros_like(x))
        return jnp.mean((sol.value - target) ** 2), (
            sol.stats["num_steps"],
            sol.stats["relative_residual"],
        )

    f = eqx.filter_jit(eqx.filter_value_and_grad(loss, has_aux=True))
    args = (deq, jnp.asarray(x), jnp.asarray(target))
    t0 = time.perf_counter()
    lowered = f.lower(*args)
    t1 = time.perf_counter()
    compiled = lowered.compile()
    t2 = time.perf_counter()

    def call():
        out = compiled(*args)
        jax.block_until_ready(out)
        return out

    (value, (steps, resid)), _ = call()
    return call, {
        "loss": float(value),
        "forward_iterations": int(steps),
        "relative_residual": float(resid),
        "trace_lower_s": round(t1 - t0, 2),
        "compile_s": round(t2 - t1, 2),
    }


def torch_runner(ift, W, U, b, x, target, device="cpu", sync=lambda: None):
    import torch
    from torchdeq import get_deq

    Wt, Ut, bt = (torch.tensor(a, requires_grad=True, device=device)
                  for a in (W, U, b))  # fmt: skip
    xt, tt = torch.tensor(x, device=device), torch.tensor(target, device=device)
    kw = dict(f_solver="anderson", f_tol=1e-5, f_max_iter=256, f_stop_mode="rel")
    if ift:
        kw.update(ift=True, b_solver="anderson", b_tol=1e-6, b_max_iter=256,
                  b_stop_mode="rel")  # fmt: skip
    deq = get_deq(**kw)
    deq.train()
    info_box = {}

    def call():
        for p in (Wt, Ut, bt):
            p.grad = None
        f = lambda z: torch.tanh(z @ Wt.T + xt @ Ut.T + bt)  # noqa: E731
        z_out, info = deq(f, torch.zeros_like(xt))
        loss = torch.mean((z_out[-1] - tt) ** 2)
        loss.backward()
        sync()  # the backward pass runs asynchronously on a GPU
        info_box.update(loss=float(loss.detach()), info=info)
        return loss

    call()
    info = info_box["info"]
    return call, {
        "loss": info_box["loss"],
        "forward_iterations": int(info["nstep"].max()),
        "relative_residual": float(info["rel_lowest"].max()),
    }


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--reps", type=int, default=7)
    p.add_argument("--sample-s", type=float, default=0.5)
    p.add_argument("--quick", action="store_true", help="3 reps, short samples")
    add_device_argument(p)
    args = p.parse_args()
    torch_device, sync = check_device(DEVICE)
    reps, sample_s = (3, 0.2) if args.quick else (args.reps, args.sample_s)
    W, U, b, x, target = weights()
    summary = {"summary": True, "dim": DIM, "batch": BATCH, "spectral_norm": RHO,
               "device": DEVICE,
               "jax_device": str(jax.devices()[0])}  # fmt: skip
    if DEVICE == "cpu":
        summary["threads"] = 1
    for case, jax_backward, ift in (
        ("implicit", "implicit", True),
        ("one_step", "jacobian_free", False),
    ):
        runners, infos = {}, {}
        runners["ctmodels"], infos["ctmodels"] = jax_runner(
            jax_backward, W, U, b, x, target
        )
        runners["torchdeq"], infos["torchdeq"] = torch_runner(
            ift, W, U, b, x, target, torch_device, sync
        )
        times = timed(runners, reps, sample_s)
        for impl, ts in times.items():
            print(json.dumps({
                "case": case, "impl": impl, "median_s": statistics.median(ts),
                "min_s": min(ts), **infos[impl], "times_s": ts,
            }))  # fmt: skip
        med = {k: statistics.median(v) for k, v in times.items()}
        summary[f"{case}_torchdeq_over_ctmodels"] = med["torchdeq"] / med["ctmodels"]
        summary[f"{case}_torchdeq_over_ctmodels_by_min"] = min(times["torchdeq"]) / min(
            times["ctmodels"]
        )
        summary[f"{case}_compile_s"] = infos["ctmodels"]["compile_s"]
    summary["load_avg_1min"] = os.getloadavg()[0]
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
