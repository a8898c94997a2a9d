"""Deep Implicit Layers, chapter 1: a layer defined by a condition.

Run: python tutorials/implicit_1_introduction.py [--out DIR]
(set CTMODELS_TUTORIAL_SMALL=1 for the few-second version the tests run)

After the NeurIPS 2020 tutorial "Deep Implicit Layers" (Duvenaud, Kolter & Johnson),
chapter 1, written with ctmodels. What you learn:

1. An implicit layer does not say how to compute its output; it states a condition the
   output satisfies. Here: the tanh fixed-point layer z = tanh(W z + x).
2. Two ways to find z. Fixed-point iteration z <- tanh(W z + x) converges linearly, at
   the rate of the contraction (about the spectral norm of W), and diverges or
   oscillates when W is not contractive. Newton's method on g(z) = z - tanh(W z + x)
   converges quadratically, at the price of a Jacobian solve per step.
3. In ctmodels both are registry names of the same entry point:
   `ctmodels.fixed_point(f, z0, x, solver="iteration" | "newton")` (or `"anderson"`,
   `"broyden"`: see `ctmodels.solvers.available("fixed_point")`), which returns the
   value with its statistics (iterations, residual, result code).

Checks: every solver's z agrees with a float64 reference (Newton to machine
precision); Newton takes far fewer iterations than plain iteration. Figure: the
residual |f(z) - z| per iteration of both methods (log scale).
"""

import argparse
import os
import tempfile
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


def layer(z, args):
    """The cell f(z, x) = tanh(W z + x); its fixed point is the layer's output."""
    W, x = args
    return jnp.tanh(W @ z + x)


def iterate(W, x, steps):
    """Plain fixed-point iteration by hand, recording |f(z) - z|_inf."""
    z, residuals = np.zeros(len(x)), []
    for _ in range(steps):
        fz = np.tanh(W @ z + x)
        residuals.append(np.max(np.abs(fz - z)))
        z = fz
        if residuals[-1] < 1e-14:  # float64 round-off: nothing more to gain
            break
    return z, residuals


def newton(W, x, steps):
    """Newton's method on g(z) = z - tanh(W z + x) by hand: dg/dz = I - diag(1 -
    tanh^2) W; one linear solve per step."""
    z, residuals = np.zeros(len(x)), []
    for _ in range(steps):
        fz = np.tanh(W @ z + x)
        residuals.append(np.max(np.abs(fz - z)))
        jac = np.eye(len(x)) - (1 - fz**2)[:, None] * W
        z = z - np.linalg.solve(jac, z - fz)
    return z, residuals


def main(out: Path):
    n = 10 if SMALL else 50
    rng = np.random.default_rng(0)
    # a symmetric weight matrix with spectral norm 0.9: contractive, but slowly
    A = rng.standard_normal((n, n))
    W = 0.9 * (A + A.T) / np.linalg.norm(A + A.T, 2)
    x = 0.5 * rng.standard_normal(n)

    # the float64 reference: Newton to machine precision
    z_ref, res_newton = newton(W, x, 12)
    assert res_newton[-1] < 1e-13, res_newton
    z_iter, res_iter = iterate(W, x, 300)

    # the same solves through ctmodels, by registry name
    args = (jnp.asarray(W), jnp.asarray(x))
    stats = {}
    for solver in ("iteration", "newton"):  # or "anderson", "broyden", ...
        sol = ctmodels.fixed_point(
            layer, jnp.zeros(n), args, solver=solver, rtol=1e-10, atol=1e-12,
            max_steps=2000,
        )  # fmt: skip
        stats[solver] = int(sol.stats["num_steps"])
        err = float(jnp.max(jnp.abs(sol.value - z_ref)))
        print(f"{solver:>9}: {stats[solver]:4d} iterations, |z - z_ref| = {err:.1e}, "
              f"result {sol.result == ctmodels.RESULTS.successful}")  # fmt: skip
        assert sol.result == ctmodels.RESULTS.successful
        assert err < 1e-9, (solver, err)
    assert stats["newton"] * 4 < stats["iteration"], stats

    # figure: residual per iteration
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.semilogy(res_iter, label="fixed-point iteration")
    ax.semilogy(res_newton, "o-", label="Newton")
    ax.set_xlabel("iteration")
    ax.set_ylabel(r"$\|\tanh(Wz + x) - z\|_\infty$")
    ax.set_title(f"tanh fixed-point layer, n = {n}, $\\|W\\|_2$ = 0.9")
    ax.legend()
    fig.tight_layout()
    out.mkdir(parents=True, exist_ok=True)
    path = out / "implicit_1_introduction.png"
    fig.savefig(path, dpi=120)
    print("figure:", path)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=None, help="directory for the PNG figure")
    args = parser.parse_args()
    main(Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="implicit-1-")))
