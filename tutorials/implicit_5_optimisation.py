"""Deep Implicit Layers, chapter 5: differentiable optimisation (an argmin layer).

Run: python tutorials/implicit_5_optimisation.py [--out DIR]
(set CTMODELS_TUTORIAL_SMALL=1 for the few-second version the tests run)

After chapter 5 of the NeurIPS 2020 tutorial "Deep Implicit Layers" (Duvenaud, Kolter &
Johnson), written with ctmodels. What you learn:

1. A layer can be the solution of an optimisation problem,
   y*(x) = argmin_y g(y, x) subject to constraints. Its output is characterised by the
   optimality (KKT) conditions F(y*, lambda*; x) = 0, a system of equations, so it is an
   implicit layer like the fixed points of chapters 1-2: solve F = 0 with a root
   finder, differentiate with the implicit function theorem. No backprop through the
   optimiser's iterations, and any optimiser may produce y*.
2. The recipe with `ctmodels.root_find(F, guess, args)`: write the optimality
   conditions, pick a parametrisation that keeps the solution interior (here log y for
   y > 0), and `jax.jacrev` / `jax.jacfwd` / `jax.grad` give derivatives of y* with
   respect to every argument (Newton forward, implicit backward by default).
3. The example: the entropy-regularised linear program on the probability simplex,
   y*(x, tau) = argmin_{y >= 0, sum y = 1} -x.y + tau sum_i y_i log y_i,
   whose KKT conditions with u = log y and the multiplier nu of sum y = 1 are
   -x + tau (u + 1) + nu = 0 and sum_i exp(u_i) = 1. Its solution is known in closed
   form, softmax(x / tau): the oracle for the values and the derivatives (the
   smooth "soft argmax" layer of many networks is this argmin).

Checks: y* against softmax(x / tau); dy*/dx and dy*/dtau (through the root finder's
implicit gradient) against the derivatives of the closed form. Figure: y* as a
function of the temperature tau (argmin layer as dots, closed form as lines), and the
implicit dy*/dtau against the closed form's.
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


def kkt(state, args):
    """The optimality conditions of min -x.y + tau sum y log y on the simplex, in
    u = log y (so y > 0 always) and the multiplier nu of sum y = 1."""
    u, nu = state
    x, tau = args
    stationarity = -x + tau * (u + 1.0) + nu  # d/dy of the Lagrangian, in u = log y
    feasibility = jnp.sum(jnp.exp(u)) - 1.0
    return stationarity, feasibility


def argmin_layer(x, tau):
    """y*(x, tau) by Newton on the KKT conditions, differentiable by the IFT."""
    guess = (jnp.full_like(x, -jnp.log(x.size)), jnp.zeros(()))
    sol = ctmodels.root_find(kkt, guess, (x, tau), solver="newton", rtol=1e-12,
                             atol=1e-12)  # fmt: skip
    u, _ = sol.value
    return jnp.exp(u)


def closed_form(x, tau):
    return jax.nn.softmax(x / tau)


def main(out: Path):
    n = 4 if SMALL else 6
    x = jnp.asarray(np.random.default_rng(0).standard_normal(n))
    taus = jnp.geomspace(0.1, 10.0, 12 if SMALL else 40)

    # value, d/dx and d/dtau at every tau, in one compiled function
    def with_derivatives(layer):
        def at(tau):
            value = layer(x, tau)
            d_dx, d_dtau = jax.jacfwd(layer, argnums=(0, 1))(x, tau)
            return value, d_dx, d_dtau

        return jax.jit(jax.vmap(at))

    y, dy_dx, dy_dtau = with_derivatives(argmin_layer)(taus)
    y_ref, dy_dx_ref, dy_dtau_ref = with_derivatives(closed_form)(taus)
    # reverse mode too (what a network's training uses): the gradient of one output
    g = jax.jit(jax.grad(lambda x: argmin_layer(x, 0.5)[0]))(x)
    g_ref = jax.grad(lambda x: closed_form(x, 0.5)[0])(x)

    for name, a, b in [
        ("y*", y, y_ref), ("dy*/dx (forward mode)", dy_dx, dy_dx_ref),
        ("dy*/dtau (forward mode)", dy_dtau, dy_dtau_ref),
        ("d y*_0 / dx (reverse mode)", g, g_ref),
    ]:  # fmt: skip
        err = float(jnp.max(jnp.abs(a - b)))
        print(f"{name:>27} vs softmax(x / tau): max difference {err:.1e}")
        assert err < 1e-9, (name, err)

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(9, 3.5))
    for i in range(n):
        ax1.plot(taus, y_ref[:, i], color=f"C{i}")
        ax1.plot(taus, y[:, i], "o", color=f"C{i}", ms=3)
        ax2.plot(taus, dy_dtau_ref[:, i], color=f"C{i}")
        ax2.plot(taus, dy_dtau[:, i], "o", color=f"C{i}", ms=3)
    for ax in (ax1, ax2):
        ax.set_xscale("log")
        ax.set_xlabel(r"temperature $\tau$")
    ax1.set_ylabel(r"$y^*_i$")
    ax1.set_title("argmin layer (dots) = softmax(x/τ) (lines)")
    ax2.set_ylabel(r"$\partial y^*_i / \partial \tau$")
    ax2.set_title("implicit derivative (dots), closed form (lines)")
    fig.tight_layout()
    out.mkdir(parents=True, exist_ok=True)
    path = out / "implicit_5_optimisation.png"
    fig.savefig(path, dpi=120)
    print("figure:", path)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=None, help="directory for the PNG figure")
    args = parser.parse_args()
    main(Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="implicit-5-")))
