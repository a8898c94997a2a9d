"""The ODE-RNN of Rubanova, Chen & Duvenaud (2019) as a standalone model."""

from __future__ import annotations

from typing import Any

import equinox as eqx
import jax
from jaxtyping import Array, Float, PRNGKeyArray

from .._references import cites
from ..data import Batch
from ..nn import ODERNNEncoder, apply, mlp
from . import _common as C


@cites("rubanova2019latent")
class ODERNN(C.AbstractRecurrentModel):
    """ODE-RNN (Rubanova et al., 2019): a GRU whose hidden state follows an ODE
    between observations, run forward in time over each series' context
    (`batch.mask`, input `[x * mask, mask]`).

    The prediction at each time is decoded (linearly) from the hidden state just
    *before* the GRU update at that time, i.e. from the past observations and the ODE
    evolution since the last one: the model never sees the value it predicts, so the
    same loss serves reconstruction, interpolation (give it the context mask) and
    extrapolation (no updates after the context, the ODE carries the state on).

    Each series starts from a zero state at its own first valid time; between
    updates the state is evolved straight from the last update (see
    `ctmodels.nn.ODERNNEncoder`), so results do not depend on the batch layout.

    Likelihood: `x(t) ~ N(prediction, obs_std^2)` per channel (`obs_std` fixed, or
    learned per channel with `learn_std=True`).
    """

    rnn: ODERNNEncoder
    decoder: eqx.nn.MLP
    log_std: Array | None
    num_channels: int = eqx.field(static=True)
    obs_std: float = eqx.field(static=True)
    hyperparameters: tuple[tuple[str, Any], ...] = eqx.field(static=True)

    def __init__(
        self,
        num_channels: int,
        *,
        hidden_size: int = 20,
        units: int = 100,
        depth: int = 2,
        solver: Any = "euler",
        steps: int | None = 1,
        rtol: float = 1e-3,
        atol: float = 1e-4,
        adjoint: Any = "checkpoint",
        max_steps: int = 4096,
        obs_std: float = 0.01,
        learn_std: bool = False,
        key: PRNGKeyArray,
    ):
        """**Arguments:**

        - `num_channels`: `C`.
        - `hidden_size`: size of the hidden state.
        - `units`, `depth`: width (also of the GRU gates) and hidden layers of the
          ODE's MLP.
        - `solver`, `steps`: the ODE's solver (registry name or Diffrax solver) and
          its fixed number of steps between consecutive observations (None:
          adaptive with `rtol`/`atol`).
        - `adjoint`, `max_steps`: passed to `ctmodels.integrate`.
        - `obs_std`, `learn_std`: the observation noise (fixed, or learned per
          channel starting from `obs_std`).
        - `key`: a JAX PRNG key.
        """
        C.check_sizes(
            "ODERNN", num_channels=(num_channels, 1), hidden_size=(hidden_size, 1),
            units=(units, 0),
        )  # fmt: skip
        log_std = C.initial_log_std(obs_std, learn_std, num_channels)
        k1, k2 = jax.random.split(key)
        self.rnn = ODERNNEncoder(
            2 * num_channels,
            hidden_size,
            units=units,
            depth=depth,
            solver=solver,
            steps=steps,
            adjoint=adjoint,
            rtol=rtol,
            atol=atol,
            max_steps=max_steps,
            key=k1,
        )
        self.decoder = mlp(hidden_size, num_channels, units=0, depth=0, key=k2)
        self.log_std = log_std
        self.num_channels = num_channels
        self.obs_std = obs_std
        self.hyperparameters = C.record(
            num_channels=num_channels,
            hidden_size=hidden_size,
            units=units,
            depth=depth,
            solver=solver,
            steps=steps,
            rtol=rtol,
            atol=atol,
            adjoint=adjoint,
            max_steps=max_steps,
            obs_std=obs_std,
            learn_std=learn_std,
        )

    def _means(self, batch: Batch, queries=None) -> Float[Array, "B T C"]:
        times, inputs, observed, t_start, where = C.recurrent_inputs(
            "ODERNN", self.num_channels, batch, queries
        )
        _, h_before, _ = self.rnn(times, inputs, observed, t_start=t_start)
        if where is not None:
            h_before = C.gather_positions(h_before, where)
        return apply(self.decoder, h_before)
