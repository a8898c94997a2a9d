"""`NeuralODE`: forecast each series from its first observation with a neural ODE."""

from __future__ import annotations

from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, ArrayLike, Float, PRNGKeyArray

from .._integrate import integrate
from .._references import cites
from ..data import Batch
from . import _common as C


class _Field(eqx.Module):
    mlp: eqx.nn.MLP

    def __call__(self, t, z, args):
        return self.mlp(z)


@cites("chen2018neural")
class NeuralODE(eqx.Module):
    """Encode the first observation, evolve it with a neural ODE, decode the channels.

    For each series, `z(t_1) = encoder([x_1 * m_1, m_1, s])` at its first observed
    time `t_1` (its values `x_1`, their mask `m_1`, static covariates `s`),
    `dz/dt = f_theta(z)` (a tanh MLP) solved with `ctmodels.integrate`, and
    `x_hat(t) = decoder(z(t))` (linear). The loss is the masked MSE of the scored
    values after the first observation (`batch.target_mask`); the first observed
    time of the context (`batch.mask`) is where the forecast starts.
    """

    encoder: eqx.nn.MLP
    field: _Field
    decoder: eqx.nn.Linear
    num_channels: int = eqx.field(static=True)
    num_static: int = eqx.field(static=True)
    solver: Any = eqx.field(static=True)
    adjoint: Any = eqx.field(static=True)
    rtol: float = eqx.field(static=True)
    atol: float = eqx.field(static=True)
    max_steps: int = eqx.field(static=True)
    hyperparameters: tuple = eqx.field(static=True)

    def __init__(
        self,
        num_channels: int,
        *,
        latent_size: int = 8,
        hidden_size: int = 32,
        solver: Any = "tsit5",
        rtol: float = 1e-3,
        atol: float = 1e-4,
        adjoint: Any = "checkpoint",
        max_steps: int = 4096,
        num_static: int = 0,
        key: PRNGKeyArray,
    ):
        """**Arguments:**

        - `num_channels`: `C`, the number of observed variables.
        - `latent_size`: size of the latent state `z`.
        - `hidden_size`: width of the encoder's and the vector field's MLPs.
        - `solver`, `rtol`, `atol`: the ODE solver (a registry name) and tolerances.
        - `adjoint`, `max_steps`: passed to `ctmodels.integrate`.
        - `num_static`: static covariates per series fed to the encoder.
        - `key`: a JAX PRNG key (initialisation).
        """
        C.check_sizes("NeuralODE", num_channels=(num_channels, 1),
                      latent_size=(latent_size, 1), hidden_size=(hidden_size, 1),
                      num_static=(num_static, 0))  # fmt: skip
        k1, k2, k3 = jax.random.split(key, 3)
        self.encoder = eqx.nn.MLP(
            2 * num_channels + num_static,
            latent_size,
            hidden_size,
            depth=1,
            activation=jnp.tanh,
            key=k1,
        )
        self.field = _Field(
            eqx.nn.MLP(
                latent_size,
                latent_size,
                hidden_size,
                depth=2,
                activation=jnp.tanh,
                key=k2,
            )
        )
        self.decoder = eqx.nn.Linear(latent_size, num_channels, key=k3)
        self.num_channels, self.num_static = num_channels, num_static
        self.solver, self.adjoint = solver, adjoint
        self.rtol, self.atol, self.max_steps = float(rtol), float(atol), max_steps
        self.hyperparameters = C.record(
            num_channels=num_channels, latent_size=latent_size,
            hidden_size=hidden_size, solver=solver, rtol=rtol, atol=atol,
            adjoint=adjoint, max_steps=max_steps, num_static=num_static,
        )  # fmt: skip

    def _first(self, batch: Batch):
        """Each row's first context position: (index [B], time [B], x [B, C],
        m [B, C])."""
        seen = batch.mask.any(axis=-1) & batch.time_mask
        i0 = jnp.argmax(seen, axis=1)
        rows = jnp.arange(batch.batch_size)
        m0 = batch.mask[rows, i0]
        x0 = jnp.where(m0, batch.values[rows, i0], 0.0)
        return i0, batch.times[rows, i0], x0, m0

    def _forecast(self, batch: Batch, times: Float[Array, "B Q"]):
        """Decoded states `[B, Q, C]` at `times` (each row forecast from its first
        context observation; times before it get the state there)."""
        _, t0, x0, m0 = self._first(batch)
        parts = [x0, m0.astype(x0.dtype)]
        if self.num_static > 0:
            parts.append(batch.static.astype(x0.dtype))
        z0 = jax.vmap(self.encoder)(jnp.concatenate(parts, axis=-1))

        def one(z0, t0, ts):
            grid, where = C.distinct_times(
                jnp.concatenate([t0[None], jnp.maximum(ts, t0)])
            )
            sol = integrate(self.field, z0, grid, solver=self.solver,
                            adjoint=self.adjoint, rtol=self.rtol, atol=self.atol,
                            max_steps=self.max_steps)  # fmt: skip
            return jax.vmap(self.decoder)(sol.ys[where[1:]])

        return jax.vmap(one)(z0, t0, times.astype(x0.dtype))

    def loss(
        self, batch: Batch, *, key: PRNGKeyArray
    ) -> tuple[Float[Array, ""], dict[str, Float[Array, ""]]]:
        """Masked MSE (per scored value) of the forecast at the scored values after
        each row's first context observation. **Returns:** `(loss, {"mse": loss})`."""
        del key
        C.check_batch("NeuralODE", self.num_channels, batch)
        pred = self._forecast(batch, batch.times)
        i0 = self._first(batch)[0]
        later = jnp.arange(batch.times.shape[1])[None, :] > i0[:, None]
        scored = batch.target_mask & later[..., None] & batch.time_mask[..., None]
        w = scored * batch.weight[:, None, None]
        err = jnp.where(scored, pred - batch.values, 0.0)
        mse = jnp.sum(w * err**2) / jnp.maximum(jnp.sum(w), 1.0)
        return mse, {"mse": mse}

    def predict(
        self,
        batch: Batch,
        *,
        key: PRNGKeyArray,
        n_samples: int = 1,
        times: Float[ArrayLike, " T2"] | Float[ArrayLike, "B T2"] | None = None,
    ) -> tuple[Float[Array, "B T C"], Float[Array, "B T C"]]:
        """The forecast from each row's first context observation at `batch.times`
        (or `times`: `[T2]` or `[B, T2]`, non-decreasing); the std is 0 (a point
        forecast: the jobs add a calibrated residual spread). `key`, `n_samples`:
        unused (deterministic). **Returns:** `(mean, std)`."""
        del key, n_samples
        C.check_batch("NeuralODE", self.num_channels, batch)
        query = (
            batch.times if times is None else C.query_times(batch, times, ordered=True)
        )
        mean = self._forecast(batch, query)
        return mean, jnp.zeros_like(mean)
