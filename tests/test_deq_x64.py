"""`ctmodels.nn.DEQ` in float64: the fixed point against a high-precision reference,
and the implicit gradient against unrolled differentiation and central finite
differences (the float32 tests are in test_deq.py)."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from ctmodels import RESULTS
from ctmodels.nn import DEQ

X64 = True  # for the whole module (tests/conftest.py)

N = 5
RTOL, ATOL = 1e-11, 1e-13


class Tanh(eqx.Module):
    W: jax.Array
    U: jax.Array
    b: jax.Array

    def __call__(self, z, x):
        return jnp.tanh(self.W @ z + self.U @ x + self.b)


def _problem():
    rng = np.random.default_rng(0)
    w = rng.standard_normal((N, N))
    w = 0.8 * w / np.linalg.norm(w, 2)  # contraction 0.8: a non-trivial backward
    u = rng.standard_normal((N, 3))
    b = 0.3 * rng.standard_normal(N)
    x = rng.standard_normal(3)
    loss_w = rng.standard_normal(N)
    return w, u, b, x, loss_w


W, U, B, X, LOSS_W = _problem()


def _reference(w, u, b, x, iters=400):
    """Plain iteration in NumPy float64: the error contracts by 0.8 per step."""
    z = np.zeros(len(b))
    for _ in range(iters):
        z = np.tanh(w @ z + u @ x + b)
    return z


def _loss(params):
    cell, x = params
    sol = DEQ(cell, rtol=RTOL, atol=ATOL).solve(x, jnp.zeros(N))
    return LOSS_W @ sol.value, sol


# the default DEQ's loss and implicit gradient; its value also serves the finite
# differences (one compilation)
_value_and_grad = eqx.filter_jit(eqx.filter_value_and_grad(_loss, has_aux=True))


@eqx.filter_jit
@eqx.filter_grad
def _unrolled_grad(params, steps=160):
    """Backprop through `steps` plain iterations z <- f(z, x) from 0, written out
    here (the error contracts by 0.8 per step: 0.8^160 ~ 3e-16)."""
    cell, x = params
    z, _ = jax.lax.scan(lambda z, _: (cell(z, x), None), jnp.zeros(N), length=steps)
    return LOSS_W @ z


def _axpy(h, d, p):
    return jax.tree.map(lambda a, b: a + h * b, p, d)


def test_value_and_gradient_against_reference_unrolled_and_fd():
    params = (Tanh(jnp.asarray(W), jnp.asarray(U), jnp.asarray(B)), jnp.asarray(X))
    (loss, sol), grads = _value_and_grad(params)
    assert sol.value.dtype == jnp.float64
    assert bool(sol.result == RESULTS.successful)
    z_ref = _reference(W, U, B, X)
    # |z - z*| <= |f(z) - z| / (1 - 0.8)
    np.testing.assert_allclose(sol.value, z_ref, rtol=0, atol=5 * (ATOL + RTOL))

    # the implicit gradient equals that of the unrolled iterations
    for g, gu in zip(
        jax.tree.leaves(grads), jax.tree.leaves(_unrolled_grad(params)), strict=True
    ):
        np.testing.assert_allclose(g, gu, rtol=1e-8, atol=1e-10)

    # and central finite differences along random directions in (parameters, x)
    def value(p):
        return _value_and_grad(p)[0][0]

    rng = np.random.default_rng(1)
    h = 1e-5
    for _ in range(3):
        d = jax.tree.map(lambda a: jnp.asarray(rng.standard_normal(a.shape)), params)
        fd = (value(_axpy(h, d, params)) - value(_axpy(-h, d, params))) / (2 * h)
        directional = sum(
            jnp.sum(g * v)
            for g, v in zip(jax.tree.leaves(grads), jax.tree.leaves(d), strict=True)
        )
        np.testing.assert_allclose(directional, fd, rtol=1e-6, atol=1e-8)
