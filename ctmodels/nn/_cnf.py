"""Continuous normalizing flow blocks: time-conditioned ConcatSquash layers, the CNF
vector field, and the divergence of a batched field (exact, or Hutchinson's estimate).

Every piece works on a whole batch at once (`x` of shape `[..., D]`, rows
independent), so that a flow integrates the batch as one ODE state: one adaptive solve
and one batched matrix product per layer per evaluation, instead of a vmapped solve.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Literal

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, ArrayLike, Float, PRNGKeyArray

from .._references import cites

ACTIVATIONS: dict[str, Callable[[Array], Array]] = {
    "tanh": jnp.tanh,
    "softplus": jax.nn.softplus,
    "elu": jax.nn.elu,
    "swish": jax.nn.swish,
}


def _swish_derivative(h, a):
    sig = jax.nn.sigmoid(h)
    return sig + a * (1 - sig)


#: Each activation's derivative in closed form, from the pre-activation `h` and the
#: activation `a = σ(h)` (for the Jacobian that `CNFField.divergence` carries).
DERIVATIVES: dict[str, Callable[[Array, Array], Array]] = {
    "tanh": lambda h, a: 1 - a * a,
    "softplus": lambda h, a: jax.nn.sigmoid(h),
    "elu": lambda h, a: jnp.where(h > 0, 1, a + 1),
    "swish": _swish_derivative,
}


@cites("grathwohl2019ffjord")
class ConcatSquashLinear(eqx.Module):
    """A linear layer conditioned on time `t` (Grathwohl et al., 2019):
    `y = (W x + b) * sigmoid(g t + c) + h t`, gated and shifted per output unit.

    Called on any number of leading (batch) axes: `x [..., in] -> [..., out]` with
    one scalar `t` for the whole batch.
    """

    weight: Float[Array, "out in"]
    bias: Float[Array, " out"]
    gate_weight: Float[Array, " out"]
    gate_bias: Float[Array, " out"]
    time_bias: Float[Array, " out"]

    def __init__(self, in_size: int, out_size: int, *, key: PRNGKeyArray):
        """**Arguments:**

        - `in_size`, `out_size`: input and output sizes.
        - `key`: a JAX PRNG key.

        The weight and bias are initialised as `equinox.nn.Linear`'s (uniform on
        `±1/sqrt(in_size)`), the time gate and shift as a `Linear(1, out_size)`.
        """
        kw, kb, kg, kc, kh = jax.random.split(key, 5)
        lim = 1.0 / math.sqrt(in_size)
        self.weight = jax.random.uniform(
            kw, (out_size, in_size), minval=-lim, maxval=lim
        )
        self.bias = jax.random.uniform(kb, (out_size,), minval=-lim, maxval=lim)
        self.gate_weight = jax.random.uniform(kg, (out_size,), minval=-1.0, maxval=1.0)
        self.gate_bias = jax.random.uniform(kc, (out_size,), minval=-1.0, maxval=1.0)
        self.time_bias = jax.random.uniform(kh, (out_size,), minval=-1.0, maxval=1.0)

    def __call__(
        self, t: ArrayLike, x: Float[Array, "... in"]
    ) -> Float[Array, "... out"]:
        gate = self._gate(t)
        return (x @ self.weight.T + self.bias) * gate + self.time_bias * t

    def _gate(self, t: ArrayLike) -> Array:
        return jax.nn.sigmoid(self.gate_weight * t + self.gate_bias)


class CNFField(eqx.Module):
    """The time-dependent vector field `dx/dt = f(t, x)` of a continuous normalizing
    flow: `depth` hidden [`ConcatSquashLinear`][] layers of `width` units with an
    activation between them, then a ConcatSquash output layer (`depth=0`: one
    ConcatSquash layer, `dim -> dim`).

    Called on a batch `x [..., dim]` with one scalar `t`: rows never interact, so the
    Jacobian of the batched call is block diagonal (what [`exact_divergence`][] and
    [`hutchinson_divergence`][] rely on).
    """

    layers: tuple[ConcatSquashLinear, ...]
    activation: str = eqx.field(static=True)

    def __init__(
        self,
        dim: int,
        *,
        width: int = 64,
        depth: int = 3,
        activation: Literal["tanh", "softplus", "elu", "swish"] = "tanh",
        key: PRNGKeyArray,
    ):
        """**Arguments:**

        - `dim`: the data dimension.
        - `width`: units of each hidden layer.
        - `depth`: number of hidden layers (0: one layer `dim -> dim`).
        - `activation`: `"tanh"` (default), `"softplus"`, `"elu"` or `"swish"`; the
          field must be smooth for adaptive solvers, so no ReLU.
        - `key`: a JAX PRNG key.
        """
        if activation not in ACTIVATIONS:
            raise ValueError(
                f"activation must be one of {', '.join(map(repr, ACTIVATIONS))}, got "
                f"{activation!r} (the field must be smooth: no ReLU)."
            )
        sizes = [dim] + [width] * depth + [dim]
        keys = jax.random.split(key, len(sizes) - 1)
        self.layers = tuple(
            ConcatSquashLinear(a, b, key=k)
            for a, b, k in zip(sizes[:-1], sizes[1:], keys, strict=True)
        )
        self.activation = activation

    def __call__(
        self, t: ArrayLike, x: Float[Array, "... dim"]
    ) -> Float[Array, "... dim"]:
        act = ACTIVATIONS[self.activation]
        for layer in self.layers[:-1]:
            x = act(layer(t, x))
        return self.layers[-1](t, x)

    def divergence(
        self, t: ArrayLike, x: Float[Array, "... dim"]
    ) -> tuple[Array, Array, Array]:
        """`f(t, x)`, its exact divergence `tr(∂f/∂x)` per row and the squared
        Frobenius norm `‖∂f/∂x‖²_F` per row, as [`exact_divergence`][] gives them
        for this field, but cheaper: the per-row Jacobian `J [rows, dim, width]`
        is carried forward through the layers alongside the activations,
        `J ← σ'(h_l) ⊙ (J (gate_l ⊙ W_l)ᵀ)` (the activation's derivative in closed
        form), so each layer costs one more matrix product of the rows' `dim`
        tangents and the reverse-mode derivative is plain matrix products, with no
        nested automatic differentiation. `f(t, x)` is computed exactly as by
        `__call__`.

        **Returns:** `(f(t, x) [..., dim], trace [...], frobenius [...])`.
        """
        lead, d = x.shape[:-1], x.shape[-1]
        act = ACTIVATIONS[self.activation]
        dact = DERIVATIVES[self.activation]
        x = x.reshape(-1, d)
        n = x.shape[0]

        def folded(layer):  # gate_l ⊙ W_l: the layer's Jacobian, the same per row
            return layer.weight * layer._gate(t)[:, None]

        first, last = self.layers[0], self.layers[-1]
        if len(self.layers) == 1:
            fx = first(t, x)
            jac = folded(first)
            trace = jnp.broadcast_to(jnp.trace(jac), (n,))
            frob = jnp.broadcast_to(jnp.sum(jnp.square(jac)), (n,))
        else:
            h = first(t, x)
            a = act(h)
            # jac[r, i, k] = ∂a_k/∂x_i of row r; rows stacked as (n dim) for the GEMMs
            jac = dact(h, a)[:, None, :] * folded(first).T[None]
            for layer in self.layers[1:-1]:
                h = layer(t, a)
                a = act(h)
                jac = jac.reshape(n * d, -1) @ folded(layer).T
                jac = jac.reshape(n, d, -1) * dact(h, a)[:, None, :]
            fx = last(t, a)
            jac = (jac.reshape(n * d, -1) @ folded(last).T).reshape(n, d, d)
            trace = jnp.trace(jac, axis1=1, axis2=2)
            frob = jnp.sum(jnp.square(jac), axis=(1, 2))
        return fx.reshape(lead + (d,)), trace.reshape(lead), frob.reshape(lead)


def exact_divergence(
    fn: Callable[[Array], Array], x: Float[Array, "... D"]
) -> tuple[Array, Array, Array]:
    """`fn(x)`, its exact divergence `tr(∂fn/∂x)` per row and squared Frobenius norm
    `‖∂fn/∂x‖²_F` per row, for a batched `fn` whose rows are independent.

    `D` forward-mode products (one per input dimension, each for the whole batch,
    vmapped so that `fn` itself runs once): cheap for small `D`. For a
    [`CNFField`][], `CNFField.divergence` gives the same values with a much cheaper
    reverse-mode derivative (no AD of forward-mode AD: at batch 1024 in 2-D its
    vector-Jacobian product is 3 to 5 times cheaper;
    `benchmarks/cnf_divergence_profile.py`).

    **Returns:** `(fn(x) [..., D], trace [...], frobenius [...])`.
    """
    d = x.shape[-1]
    basis = jnp.broadcast_to(
        jnp.eye(d, dtype=x.dtype).reshape((d,) + (1,) * (x.ndim - 1) + (d,)),
        (d,) + x.shape,
    )
    fx, cols = jax.vmap(lambda v: jax.jvp(fn, (x,), (v,)), out_axes=(None, 0))(basis)
    # cols[i, ..., j] = ∂fn_j/∂x_i of each row
    trace = jnp.sum(jnp.diagonal(cols, axis1=0, axis2=-1), axis=-1)
    frob = jnp.sum(jnp.square(cols), axis=(0, -1))
    return fx, trace, frob


@cites("hutchinson1989stochastic")
def hutchinson_divergence(
    fn: Callable[[Array], Array], x: Float[Array, "... D"], eps: Float[Array, "... D"]
) -> tuple[Array, Array, Array]:
    """`fn(x)` and Hutchinson's unbiased estimates, from one vector-Jacobian product,
    of the divergence `εᵀ (∂fn/∂x) ε` and the squared Frobenius norm `‖εᵀ ∂fn/∂x‖²`
    per row (unbiased when `E[ε εᵀ] = I`, e.g. Gaussian or Rademacher `ε`).

    **Returns:** `(fn(x) [..., D], trace estimate [...], frobenius estimate [...])`.
    """
    fx, vjp = jax.vjp(fn, x)
    (e_jac,) = vjp(eps.astype(fx.dtype))
    return fx, jnp.sum(e_jac * eps, axis=-1), jnp.sum(jnp.square(e_jac), axis=-1)


def probe(key: PRNGKeyArray, shape: tuple[int, ...], noise: str, dtype=None) -> Array:
    """A Hutchinson probe of `shape`: standard normal (`noise="gaussian"`) or
    Rademacher ±1 (`noise="rademacher"`)."""
    dtype = jnp.result_type(float) if dtype is None else dtype
    if noise == "gaussian":
        return jax.random.normal(key, shape, dtype)
    if noise == "rademacher":
        return jax.random.rademacher(key, shape, dtype)
    raise ValueError(f"noise must be 'gaussian' or 'rademacher', got {noise!r}.")
