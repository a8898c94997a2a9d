"""The masked GRU update of ODE-RNNs (Rubanova, Chen & Duvenaud 2019)."""

from __future__ import annotations

import math

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, ArrayLike, Bool, Float, PRNGKeyArray

from .._references import cites
from ._mlp import mlp


@cites("rubanova2019latent")
class GRUUpdate(eqx.Module):
    """A GRU cell that updates its state only where there is an observation.

    `h' = (1 - u) * c + u * h` with update gate `u = sigmoid(U([h, x]))`, reset gate
    `r = sigmoid(R([h, x]))` and candidate `c = tanh(N([r * h, x]))`, where `U`, `R`
    and `N` are one-hidden-layer tanh MLPs of `units` units, as in the ODE-RNN of
    Rubanova et al. (2019) (`units=0`: linear maps, i.e. a standard GRU cell). Where
    `observed` is False the state is returned unchanged. (The paper's cell also
    carries a std alongside the state; here the state is a plain vector and the
    models map their final state to a mean and a std.)

    The two gate MLPs are stored stacked, so that each of their layers is one matrix
    product: `gate_hidden` holds both first layers (`[h, x] -> 2 units`), and
    `gate_weight[0]`, `gate_weight[1]` (with `gate_bias`) the output layers of `U`
    and `R` (without `gate_hidden`, i.e. `units=0`, they act on `[h, x]` directly).

    For irregular data the input is usually `[x * mask, mask]` (values and their
    observation mask, zero where missing), optionally with a time gap appended.
    """

    gate_hidden: eqx.nn.Linear | None
    gate_weight: Float[Array, "2 H U"]
    gate_bias: Float[Array, "2 H"]
    candidate: eqx.nn.MLP
    input_size: int = eqx.field(static=True)
    hidden_size: int = eqx.field(static=True)

    def __init__(
        self, input_size: int, hidden_size: int, *, units: int = 100, key: PRNGKeyArray
    ):
        """**Arguments:**

        - `input_size`: size of the input vector `x`.
        - `hidden_size`: size of the state `h`.
        - `units`: hidden units of the gate MLPs (0: linear gates).
        - `key`: a JAX PRNG key.
        """
        kh, kw, kb, kc = jax.random.split(key, 4)
        n = input_size + hidden_size
        depth = 1 if units > 0 else 0
        # The update and reset gates are two separate MLPs (or linear maps), stored
        # stacked so that each layer of both is one matrix product.
        if units > 0:
            self.gate_hidden = eqx.nn.Linear(n, 2 * units, key=kh)
            fan_in = units
        else:
            self.gate_hidden = None
            fan_in = n
        lim = 1.0 / math.sqrt(fan_in)
        self.gate_weight = jax.random.uniform(
            kw, (2, hidden_size, fan_in), minval=-lim, maxval=lim
        )
        self.gate_bias = jax.random.uniform(
            kb, (2, hidden_size), minval=-lim, maxval=lim
        )
        self.candidate = mlp(n, hidden_size, units=units, depth=depth, key=kc)
        self.input_size = input_size
        self.hidden_size = hidden_size

    def __call__(
        self,
        h: Float[Array, " H"],
        x: Float[Array, " D"],
        observed: Bool[ArrayLike, ""] = True,
    ) -> Float[Array, " H"]:
        """**Arguments:**

        - `h`: the state `[H]`.
        - `x`: the input `[D]`.
        - `observed`: whether to update (a scalar bool).

        **Returns:** the new state `[H]` (`h` itself where not `observed`).
        """
        hx = jnp.concatenate([h, x])
        if self.gate_hidden is None:
            a = jnp.broadcast_to(hx, (2,) + hx.shape)
        else:
            a = jnp.tanh(self.gate_hidden(hx)).reshape(2, -1)
        gates = jnp.einsum("gou,gu->go", self.gate_weight, a) + self.gate_bias
        u, r = jax.nn.sigmoid(gates)
        c = jnp.tanh(self.candidate(jnp.concatenate([r * h, x])))
        new = (1.0 - u) * c + u * h
        return jnp.where(observed, new, h)
