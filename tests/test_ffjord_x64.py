"""FFJORD's gradients against central finite differences, in float64: the regularised
image loss (NLL + kinetic energy + Jacobian Frobenius norm; Hutchinson's trace with a
fixed probe; dequantised, logit-transformed data) through the checkpointed adjoint,
and (slow) the exact-trace loss through the continuous adjoint (backsolve). Every
parameter moves, the learnable end times included."""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ctmodels.models._ffjord import FFJORD

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
