"""Deep Implicit Layers, chapter 2: implicit functions and automatic differentiation.

Run: python tutorials/implicit_2_autodiff.py [--out DIR]
(set CTMODELS_TUTORIAL_SMALL=1 for the few-second version the tests run)

After chapter 2 of the NeurIPS 2020 tutorial "Deep Implicit Layers" (Duvenaud, Kolter &
Johnson), written with ctmodels. What you learn:

1. The implicit function theorem (IFT). If z* = f(z*, x) and I - df/dz is invertible at
   z*, then z* is a differentiable function of x with dz*/dx = (I - df/dz)^-1 df/dx.
   The gradient of a loss l(z*) needs one *linear* solve, (I - df/dz)^T u = dl/dz, and
   then dl/dx = (df/dx)^T u: vector-Jacobian products only, at the solution, whatever
   solver found it and however many iterations it took.
2. Unrolled differentiation (backprop through k solver iterations) gives the gradient
   of the k-th iterate, not of z*. It approaches the IFT gradient as k grows, at the
   rate of the forward iteration, and it stores all k iterations.
3. In ctmodels the IFT is the default: `jax.grad` through
   `ctmodels.fixed_point(..., adjoint="implicit")` (or `ctmodels.nn.DEQ`) solves the
   adjoint system for you; `adjoint="checkpoint"` backpropagates through the
   iterations instead.

Checks: the IFT gradient (through ctmodels) against the dense linear algebra written
out by hand and against central finite differences of a float64 reference solve;
unrolled gradients converge to it. Figure: relative error of the unrolled gradient
against the number of unrolled iterations, with the IFT gradient's error.
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


def cell(z, args):
    W, x = args
    return jnp.tanh(W @ z + x)


def reference_solve(W, x):
    """z* by Newton in float64 numpy (the oracle)."""
    z = np.zeros(len(x))
    for _ in range(50):
        fz = np.tanh(W @ z + x)
        z = z - np.linalg.solve(np.eye(len(x)) - (1 - fz**2)[:, None] * W, z - fz)
    return z


def main(out: Path):
    n = 8 if SMALL else 40
    K = 150
    rng = np.random.default_rng(1)
    A = rng.standard_normal((n, n))
    W = 0.9 * (A + A.T) / np.linalg.norm(A + A.T, 2)  # symmetric, contraction ~0.9
    x = 0.5 * rng.standard_normal(n)
    target = rng.standard_normal(n)

    def loss_of(z):
        return 0.5 * jnp.sum((z - target) ** 2)

    # 1. the IFT by hand, dense: (I - J)^T u = dl/dz; dl/dx = D u, D = diag(1 - z*^2)
    z_star = reference_solve(W, x)
    d = 1 - z_star**2
    J = d[:, None] * W  # df/dz at z*
    u = np.linalg.solve((np.eye(n) - J).T, z_star - target)
    grad_by_hand = d * u  # (df/dx)^T u, df/dx = diag(d)

    # 2. the IFT through ctmodels: jax.grad of a fixed-point solve
    def loss(x, adjoint):
        sol = ctmodels.fixed_point(
            cell, jnp.zeros(n), (jnp.asarray(W), x), solver="newton",
            adjoint=adjoint, rtol=1e-11, atol=1e-12, max_steps=500,
        )  # fmt: skip
        return loss_of(sol.value)

    grad_ift = np.asarray(jax.grad(loss)(jnp.asarray(x), "implicit"))
    # oracle: central differences of the float64 reference solve
    eps = 1e-6
    grad_fd = np.array([
        (float(loss_of(reference_solve(W, x + eps * e)))
         - float(loss_of(reference_solve(W, x - eps * e)))) / (2 * eps)
        for e in np.eye(n)
    ])  # fmt: skip

    def rel(g, ref=grad_by_hand):
        return float(np.linalg.norm(g - ref) / np.linalg.norm(ref))

    print(f"IFT through ctmodels vs by hand:       {rel(grad_ift):.1e}")
    print(f"IFT by hand vs finite differences:     {rel(grad_fd):.1e}")
    assert rel(grad_ift) < 1e-9
    assert rel(grad_fd) < 1e-7

    # 3. unrolled differentiation: the gradient of the k-th iterate, for k = 1..K, in
    # one reverse pass (jacrev of the vector of losses after each iteration)
    def losses_by_depth(x):
        def step(z, _):
            z = cell(z, (jnp.asarray(W), x))
            return z, loss_of(z)

        _, losses = jax.lax.scan(step, jnp.zeros(n), None, length=K)
        return losses

    grads_unrolled = np.asarray(jax.jacrev(losses_by_depth)(jnp.asarray(x)))  # [K, n]
    errors = [rel(g) for g in grads_unrolled]
    for k in (1, 10, 50, K):
        print(f"unrolled, {k:2d} iterations vs IFT:     {errors[k - 1]:.1e}")
    assert errors[-1] < 1e-6 and errors[0] > 1e-2
    assert errors[-1] < errors[49] < errors[9]
    # (through ctmodels, `loss(x, "checkpoint")` backpropagates through the Newton
    # iterations instead: the same limit, with memory that grows with the iterations)

    fig, ax = plt.subplots(figsize=(5, 3.5))
    ks = np.arange(1, K + 1)
    ax.semilogy(ks, errors, label="unrolled (backprop through k steps)")
    ax.axhline(max(rel(grad_ift), 1e-16), color="C1", ls="--", label="implicit (IFT)")
    ax.set_xlabel("unrolled iterations k")
    ax.set_ylabel("relative gradient error")
    ax.set_title(f"d loss / dx through z* = tanh(Wz* + x), n = {n}")
    ax.legend()
    fig.tight_layout()
    out.mkdir(parents=True, exist_ok=True)
    path = out / "implicit_2_autodiff.png"
    fig.savefig(path, dpi=120)
    print("figure:", path)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=None, help="directory for the PNG figure")
    args = parser.parse_args()
    main(Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="implicit-2-")))
