"""FFJORD's gradients against central finite differences, in float64: the regularised
image loss (NLL + kinetic energy + Jacobian Frobenius norm; Hutchinson's trace with a
fixed probe; dequantised, logit-transformed data) through the checkpointed adjoint,
and (slow) the exact-trace loss through the continuous adjoint (backsolve). Every
parameter moves, the learnable end times included. And `CNFField.divergence` (the
Jacobian carried through the layers) against `jax.jacfwd`'s Jacobian, values and
gradients."""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ctmodels.models._ffjord import FFJORD
from ctmodels.nn import CNFField

X64 = True


@pytest.mark.parametrize(
    "kw",
    [
        dict(trace="hutchinson", noise="gaussian", kinetic_weight=0.3,
             jacobian_weight=0.2, levels=5, logit_alpha=0.05, adjoint="checkpoint"),
        pytest.param(
            dict(trace="exact", kinetic_weight=0.3, adjoint="backsolve"),
            marks=pytest.mark.slow,
        ),
    ],
    ids=["hutchinson-regularised-image-checkpoint", "exact-backsolve"],
)  # fmt: skip
def test_loss_gradient_matches_finite_differences(kw):
    model = FFJORD(
        2, width=4, depth=1, blocks=2, end_time=0.6, rtol=1e-10, atol=1e-10,
        key=jax.random.key(0), **kw,
    )  # fmt: skip
    batch = jnp.abs(jax.random.normal(jax.random.key(1), (6, 2))) * 2.0
    if "levels" in kw:  # grey levels 0..4
        batch = jnp.minimum(jnp.floor(batch), kw["levels"] - 1)
    key = jax.random.key(2)
    params, static = eqx.partition(model, eqx.is_inexact_array)
    direction = jax.tree.map(
        lambda p, k: jax.random.normal(k, p.shape, p.dtype),
        params,
        jax.tree.unflatten(
            jax.tree.structure(params),
            list(jax.random.split(jax.random.key(3), len(jax.tree.leaves(params)))),
        ),
    )
    h = 1e-5

    @jax.jit
    def run(params):
        def loss(p):
            return eqx.combine(p, static).loss(batch, key=key)[0]

        value, grad = jax.value_and_grad(loss)(params)
        shifted = [
            loss(jax.tree.map(lambda p, d, s=s: p + s * h * d, params, direction))
            for s in (1.0, -1.0)
        ]
        return value, grad, shifted

    value, grad, (up, down) = run(params)
    fd = (up - down) / (2 * h)
    ad = sum(
        jnp.sum(g * d)
        for g, d in zip(jax.tree.leaves(grad), jax.tree.leaves(direction), strict=True)
    )
    assert np.isfinite(value)
    np.testing.assert_allclose(ad, fd, rtol=1e-5)
    # the end time takes part
    assert float(jnp.max(jnp.abs(grad.sqrt_end_times))) > 0


@pytest.mark.parametrize(
    "activation,width,depth",
    [("tanh", 5, 3), ("softplus", 3, 1), ("elu", 4, 2), ("swish", 6, 2),
     ("tanh", 4, 0)],
)  # fmt: skip
def test_carried_jacobian_divergence_matches_jacfwd(activation, width, depth):
    field = CNFField(
        3, width=width, depth=depth, activation=activation, key=jax.random.key(4)
    )
    # two leading batch axes; rows straddling elu's kink at 0 are drawn wide
    x = 2.0 * jax.random.normal(jax.random.key(5), (2, 4, 3))
    t = jnp.asarray(0.3)
    weights = jax.random.normal(jax.random.key(6), (3,) + x.shape[:-1])
    probe_out = jax.random.normal(jax.random.key(7), x.shape)

    def oracle(field, t, x):  # per-row Jacobian by jacfwd
        jac = jax.vmap(jax.vmap(jax.jacfwd(lambda r: field(t, r))))(x)
        return (
            field(t, x),
            jnp.trace(jac, axis1=-2, axis2=-1),
            jnp.sum(jac**2, (-2, -1)),
        )

    def fast(field, t, x):
        return field.divergence(t, x)

    def scalar(fn):  # a scalar touching every output, for the gradients
        def f(field, t, x):
            fx, tr, fro = fn(field, t, x)
            return (jnp.sum(weights[0] * tr) + jnp.sum(weights[1] * fro)
                    + jnp.sum(probe_out * fx))  # fmt: skip

        return jax.jit(jax.grad(f, argnums=(0, 1, 2)))

    for got, want in zip(fast(field, t, x), oracle(field, t, x), strict=True):
        assert got.shape == want.shape
        np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)
    g_fast, g_oracle = scalar(fast)(field, t, x), scalar(oracle)(field, t, x)
    leaves_fast, leaves_oracle = jax.tree.leaves(g_fast), jax.tree.leaves(g_oracle)
    assert len(leaves_fast) == len(leaves_oracle) == 5 * (depth + 1) + 2
    for got, want in zip(leaves_fast, leaves_oracle, strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-12)
