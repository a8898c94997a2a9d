"""Deep Implicit Layers, chapter 4: a deep equilibrium model on digits.

Run: python tutorials/implicit_4_deq.py [--out DIR]
(set CTMODELS_TUTORIAL_SMALL=1 for the few-second version the tests run)

After chapter 4 of the NeurIPS 2020 tutorial "Deep Implicit Layers" (Duvenaud, Kolter &
Johnson), written with ctmodels. What you learn:

1. A deep equilibrium model (DEQ; Bai, Kolter & Koltun 2019) replaces a stack of
   weight-tied layers z_{k+1} = f(z_k, x) by its limit, the fixed point
   z* = f(z*, x): "infinite depth" with the parameters of one layer, and memory that
   does not grow with the depth, because the gradient comes from the implicit function
   theorem (chapter 2), not from storing the iterations.
2. How to build one with `ctmodels.nn.DEQ(cell)` inside your own Equinox model and your
   own Optax loop: Anderson acceleration forward, implicit backward, `jax.vmap` over a
   batch.
3. Why and how to regularise: a cell that stops being contractive during training needs
   more and more iterations and eventually has no reachable fixed point.
   `deq.solve(x, z0, key=key).jac_loss` is Hutchinson's estimate of
   |df/dz|_F^2 at z*; a multiple of it in the loss keeps the forward solves short
   (Bai, Koltun & Kolter 2021). Watch `sol.stats["num_steps"]`.

Data: `ctmodels.datasets.load("digits")`, 1797 8x8 images (pixels 0..16, scaled to
[0, 1]), a seeded 80/20 split. Checks: the returned z* satisfies z* = f(z*, x) when
the cell is re-applied in float64 numpy (the oracle); the test accuracy beats chance
(and, in the full run, 90%). Figure: the training loss and the forward iterations per
step, and test accuracy.
"""

import argparse
import os
import tempfile
from pathlib import Path

import equinox as eqx
import jax
import jax.numpy as jnp
import matplotlib
import optax

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

import ctmodels  # noqa: E402

SMALL = os.environ.get("CTMODELS_TUTORIAL_SMALL") == "1"


class Cell(eqx.Module):
    """f(z, x) = tanh(W z + U x + b): one weight-tied layer."""

    W: jax.Array
    U: jax.Array
    b: jax.Array

    def __init__(self, hidden, *, key):
        kw, ku = jax.random.split(key)
        W = jax.random.normal(kw, (hidden, hidden))
        self.W = 0.5 * W / jnp.linalg.norm(W, 2)  # start contractive
        self.U = jax.random.normal(ku, (hidden, 64)) / 8.0
        self.b = jnp.zeros(hidden)

    def __call__(self, z, x):
        return jnp.tanh(self.W @ z + self.U @ x + self.b)


class Classifier(eqx.Module):
    deq: ctmodels.nn.DEQ
    readout: eqx.nn.Linear
    hidden: int = eqx.field(static=True)

    def __init__(self, hidden, *, solver, key):
        kc, kr = jax.random.split(key)
        # implicit backward (the default); `solver` any registry fixed-point name
        self.deq = ctmodels.nn.DEQ(Cell(hidden, key=kc), solver=solver)
        self.readout = eqx.nn.Linear(hidden, 10, key=kr)
        self.hidden = hidden

    def __call__(self, x, *, key=None):
        sol = self.deq.solve(x, jnp.zeros(self.hidden), key=key)
        return self.readout(sol.value), sol


def main(out: Path):
    hidden, steps, batch = (16, 60, 64) if SMALL else (64, 600, 128)
    # Anderson acceleration; the small run (the test-suite's) takes plain iteration,
    # which compiles faster and, with the Jacobian penalty, needs few iterations too
    solver = "iteration" if SMALL else "anderson"
    ds = ctmodels.datasets.load("digits")
    x = ds["image"].values.reshape(-1, 64).astype(np.float32) / 16.0
    y = ds["label"].values.astype(np.int32)
    perm = np.random.default_rng(0).permutation(len(y))
    n_train = int(0.8 * len(y))
    train, test = perm[:n_train], perm[n_train:]

    model = Classifier(hidden, solver=solver, key=jax.random.PRNGKey(0))
    optim = optax.adam(1e-2 if SMALL else 3e-3)
    opt_state = optim.init(eqx.filter(model, eqx.is_inexact_array))

    @eqx.filter_jit
    def step(model, opt_state, xb, yb, key):
        def loss(model):
            keys = jax.random.split(key, len(xb))
            logits, sol = jax.vmap(lambda xi, ki: model(xi, key=ki))(xb, keys)
            ce = optax.softmax_cross_entropy_with_integer_labels(logits, yb).mean()
            return ce + 1.0 * sol.jac_loss.mean(), (ce, sol.stats["num_steps"])

        (_, (ce, iters)), grads = eqx.filter_value_and_grad(loss, has_aux=True)(model)
        updates, opt_state = optim.update(grads, opt_state, model)
        return eqx.apply_updates(model, updates), opt_state, ce, iters.max()

    rng = np.random.default_rng(1)
    key = jax.random.PRNGKey(2)
    losses, iterations = [], []
    with ctmodels.readable_errors():
        for i in range(steps):
            idx = rng.choice(train, batch, replace=False)
            key, sub = jax.random.split(key)
            model, opt_state, ce, iters = step(model, opt_state, x[idx], y[idx], sub)
            losses.append(float(ce))
            iterations.append(int(iters))
            if i % 100 == 0 or i == steps - 1:
                print(f"step {i:4d}: cross-entropy {losses[-1]:.3f}, forward "
                      f"iterations (max over the batch) {iterations[-1]}")  # fmt: skip

    # evaluate on the test images (the same compiled step is not needed: a forward)
    logits, sol = eqx.filter_jit(lambda m, xs: jax.vmap(lambda xi: m(xi))(xs))(
        model, x[test]
    )
    accuracy = float(np.mean(np.argmax(np.asarray(logits), -1) == y[test]))
    print(f"test accuracy {accuracy:.3f} ({len(test)} images); forward iterations "
          f"mean {float(sol.stats['num_steps'].mean()):.1f}")  # fmt: skip
    # the oracle: re-apply the cell in float64 numpy; z* must be its fixed point
    cell = model.deq.cell
    W, U, b = (np.asarray(a, np.float64) for a in (cell.W, cell.U, cell.b))
    z = np.asarray(sol.value, np.float64)
    residual = np.max(np.abs(np.tanh(z @ W.T + x[test] @ U.T + b) - z))
    print(f"max |f(z*, x) - z*| over the test set, float64: {residual:.1e}")
    assert residual < 1e-4
    assert bool(jnp.all(sol.result == ctmodels.RESULTS.successful))
    assert accuracy > (0.5 if SMALL else 0.9), accuracy

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(9, 3.5))
    ax1.plot(losses)
    ax1.set_xlabel("Adam step")
    ax1.set_ylabel("training cross-entropy")
    ax1.set_title(f"DEQ on 8x8 digits: test accuracy {accuracy:.1%}")
    ax2.plot(iterations)
    ax2.set_xlabel("Adam step")
    ax2.set_ylabel(f"forward iterations ({solver}, batch max)")
    ax2.set_title("forward cost, with the Jacobian penalty")
    fig.tight_layout()
    out.mkdir(parents=True, exist_ok=True)
    path = out / "implicit_4_deq.png"
    fig.savefig(path, dpi=120)
    print("figure:", path)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=None, help="directory for the PNG figure")
    args = parser.parse_args()
    main(Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="implicit-4-")))
