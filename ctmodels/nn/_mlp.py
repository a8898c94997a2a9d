"""MLP helpers: build the tanh MLPs of Rubanova et al. (2019) and apply one-example
modules over any number of leading (batch) axes."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, PRNGKeyArray


def mlp(
    in_size: int,
    out_size: int,
    *,
    units: int,
    depth: int,
    activation: Callable[[Array], Array] = jnp.tanh,
    final_activation: Callable[[Array], Array] = lambda x: x,
    key: PRNGKeyArray,
) -> eqx.nn.MLP:
    """An `eqx.nn.MLP` with `depth` hidden layers of `units` units (`depth=0` or
    `units=0`: one linear layer).

    **Arguments:**

    - `in_size`, `out_size`: input and output sizes.
    - `units`: width of the hidden layers.
    - `depth`: number of hidden layers.
    - `activation`, `final_activation`: between layers (default `tanh`) and on the
      output (default identity).
    - `key`: a JAX PRNG key.

    **Returns:** the `eqx.nn.MLP` (called on one example; see `apply`).
    """
    if depth < 0 or units < 0:
        raise ValueError(f"depth and units must be >= 0, got {depth} and {units}.")
    if units == 0:
        depth = 0
    return eqx.nn.MLP(
        in_size,
        out_size,
        width_size=max(units, 1),
        depth=depth,
        activation=activation,
        final_activation=final_activation,
        key=key,
    )


def apply(module: Callable[[Array], Any], x: Float[Array, "... n"]) -> Array:
    """Apply a one-example module (vector in, vector out) over all leading axes of
    `x`: `[..., n] -> [..., m]` (one batched matrix product per layer)."""
    lead = x.shape[:-1]
    if not lead:
        return module(x)
    y = jax.vmap(module)(x.reshape(-1, x.shape[-1]))
    return y.reshape(*lead, y.shape[-1])


def autonomous_field(t, y: Array, mlp: Callable[[Array], Array]) -> Array:
    """The vector field `dy/dt = mlp(y)` in Diffrax's `f(t, y, args)` convention, with
    the MLP passed as `args` (so that every adjoint differentiates its parameters) and
    applied over any leading axes of `y`. Module level, so that repeated solves share
    Diffrax's compilation cache."""
    return apply(mlp, y)
