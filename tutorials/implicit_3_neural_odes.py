"""Deep Implicit Layers, chapter 3: neural ODEs, their adjoints and what they cost.

Run: python tutorials/implicit_3_neural_odes.py [--out DIR]
(set CTMODELS_TUTORIAL_SMALL=1 for the few-second version the tests run)

After chapter 3 of the NeurIPS 2020 tutorial "Deep Implicit Layers" (Duvenaud, Kolter &
Johnson), written with ctmodels. What you learn:

1. An ODE solve is an implicit layer too: y(T) is defined by dy/dt = f(y, theta),
   y(0) = y0, and a solver finds it.
2. Three ways to get dL/dtheta, by registry name of `ctmodels.integrate(...,
   adjoint=...)`:
   - `"direct"`: backprop through the solver's loop as written (Diffrax's bounded
     while loop): the gradient of the discretised forward pass, exactly;
   - `"checkpoint"`: the same discrete gradient, storing checkpoints and recomputing
     between them on the way back (Diffrax's recursive checkpointing: memory grows
     slowly with the number of steps, time up to ~2x);
   - `"backsolve"`: the continuous adjoint of Chen et al. (2018): solve the adjoint
     ODE backwards in time together with y (memory independent of the number of
     steps; the gradient is that of the exact ODE up to the backward solve's error,
     not exactly that of the discretised forward pass).
3. How to measure their cost rather than assume it: XLA's memory analysis of the
   compiled gradient (`jax.jit(f).lower(...).compile().memory_analysis()
   .temp_size_in_bytes`, the scratch memory the gradient reserves) and wall time per
   gradient. (Here: direct takes the most memory, checkpoint less but growing with
   the steps and the most time, backsolve a flat minimum and the least time.)

Checks: each adjoint's gradient for a linear ODE dy/dt = A y against the closed form
d/dA |expm(T A) y0|^2 (differentiated by JAX through `jax.scipy.linalg.expm`).
Figure: scratch memory and time per gradient of the three adjoints against the number
of solver steps.
"""

import argparse
import os
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

import ctmodels  # noqa: E402

jax.config.update("jax_enable_x64", True)
SMALL = os.environ.get("CTMODELS_TUTORIAL_SMALL") == "1"
ADJOINTS = ("direct", "checkpoint", "backsolve")


def main(out: Path):
    n, T = (4, 1.0) if SMALL else (16, 2.0)
    step_counts = (20,) if SMALL else (25, 100, 400)
    rng = np.random.default_rng(0)
    A = jnp.asarray(rng.standard_normal((n, n)) / np.sqrt(n) - 0.5 * np.eye(n))
    y0 = jnp.asarray(rng.standard_normal(n))
    ts = jnp.array([0.0, T])

    # the oracle: the closed-form solution y(T) = expm(T A) y0, differentiated by JAX
    def closed_form(A):
        return jnp.sum((jax.scipy.linalg.expm(T * A) @ y0) ** 2)

    exact = np.asarray(jax.jit(jax.grad(closed_form))(A))

    memory = {a: [] for a in ADJOINTS}
    seconds = {a: [] for a in ADJOINTS}  # filled for the adjoints run below
    # (the small run, the test-suite's, compiles only the two adjoints that matter
    # most: each compilation takes seconds)
    adjoints = ADJOINTS[1:] if SMALL else ADJOINTS
    for steps in step_counts:
        for adjoint in adjoints:

            def loss(A, adjoint=adjoint, steps=steps):
                sol = ctmodels.integrate(
                    lambda t, y, A: A @ y, y0, ts, A, solver="tsit5",
                    adjoint=adjoint, controller="constant", dt0=T / steps,
                    max_steps=steps,
                )  # fmt: skip
                return jnp.sum(sol.ys[-1] ** 2)

            grad = jax.jit(jax.grad(loss)).lower(A).compile()
            memory[adjoint].append(grad.memory_analysis().temp_size_in_bytes / 2**10)
            g = np.asarray(grad(A))  # warm-up, and the check
            err = float(np.linalg.norm(g - exact) / np.linalg.norm(exact))
            # tsit5 is 5th order: at these step sizes all three are ~1e-7 or better
            assert err < 1e-5, (adjoint, steps, err)
            times = []
            for _ in range(3 if SMALL else 10):
                start = time.perf_counter()
                jax.block_until_ready(grad(A))
                times.append(time.perf_counter() - start)
            seconds[adjoint].append(min(times))
            print(f"{steps:4d} steps, {adjoint:>10}: gradient error {err:.1e}, "
                  f"scratch memory {memory[adjoint][-1]:8.1f} KiB, "
                  f"{1e3 * seconds[adjoint][-1]:.2f} ms")  # fmt: skip

    # what the adjoints promise: the discrete adjoints store steps, backsolve none
    assert memory["checkpoint"][-1] > memory["backsolve"][-1]
    if not SMALL:
        assert memory["direct"][-1] > memory["checkpoint"][-1]
        assert memory["checkpoint"][-1] > memory["checkpoint"][0]  # grows with steps
        assert memory["backsolve"][-1] <= 1.1 * memory["backsolve"][0]  # flat

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(9, 3.5))
    for adjoint in adjoints:
        ax1.plot(step_counts, memory[adjoint], "o-", label=adjoint)
        ax2.plot(step_counts, 1e3 * np.asarray(seconds[adjoint]), "o-", label=adjoint)
    for ax in (ax1, ax2):
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("solver steps")
    ax1.set_ylabel("scratch memory of the gradient (KiB)")
    ax2.set_ylabel("time per gradient (ms)")
    ax1.legend()
    fig.suptitle(f"dy/dt = A y, n = {n}: the cost of {len(adjoints)} adjoints")
    fig.tight_layout()
    out.mkdir(parents=True, exist_ok=True)
    path = out / "implicit_3_neural_odes.png"
    fig.savefig(path, dpi=120)
    print("figure:", path)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=None, help="directory for the PNG figure")
    args = parser.parse_args()
    main(Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="implicit-3-")))
