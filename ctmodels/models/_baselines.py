"""Baselines for honest comparison with the continuous-time models: GRU-Δt, the
RNN-VAE of Rubanova et al. (2019), linear interpolation and last observation carried
forward."""

from __future__ import annotations

import abc
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, ArrayLike, Bool, Float, PRNGKeyArray

from .._references import cites
from ..data import Batch
from ..nn import GRUUpdate, ODERNNEncoder, apply, mlp
from . import _common as C

# ------------------------------------------------------------------------ GRU-Δt


@cites("rubanova2019latent")
class GRUDelta(C.AbstractRecurrentModel):
    """GRU with a time-gap input ("GRU-Δt" in Rubanova et al., 2019).

    Runs forward over each series' context (`batch.mask`): at each observed time the
    GRU takes `[x * mask, mask, Δt]`, `Δt` being the time since its previous update;
    the state is constant in between. The prediction at any time `t` is an MLP of
    `[h, t - t_last]`, the state after the last update strictly before `t` and the
    time since it (so the model never sees the value it predicts). Each series
    starts from a zero state at its first valid time. Gaussian likelihood as
    `ODERNN`.
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
        obs_std: float = 0.01,
        learn_std: bool = False,
        key: PRNGKeyArray,
    ):
        """**Arguments:**

        - `num_channels`: `C`.
        - `hidden_size`: size of the GRU state.
        - `units`: hidden units of the GRU gates and of the one-hidden-layer output
          MLP.
        - `obs_std`, `learn_std`: the observation noise (fixed, or learned per
          channel starting from `obs_std`).
        - `key`: a JAX PRNG key.
        """
        C.check_sizes(
            "GRUDelta", num_channels=(num_channels, 1), hidden_size=(hidden_size, 1),
            units=(units, 0),
        )  # fmt: skip
        log_std = C.initial_log_std(obs_std, learn_std, num_channels)
        k1, k2 = jax.random.split(key)
        self.rnn = ODERNNEncoder(
            2 * num_channels, hidden_size, units=units, ode=False, key=k1
        )
        self.decoder = mlp(hidden_size + 1, num_channels, units=units, depth=1, key=k2)
        self.log_std = log_std
        self.num_channels = num_channels
        self.obs_std = obs_std
        self.hyperparameters = C.record(
            num_channels=num_channels,
            hidden_size=hidden_size,
            units=units,
            obs_std=obs_std,
            learn_std=learn_std,
        )

    def _means(self, batch: Batch, queries=None) -> Float[Array, "B T C"]:
        times, inputs, observed, t_start, where = C.recurrent_inputs(
            "GRUDelta", self.num_channels, batch, queries
        )
        _, h, gaps = self.rnn(times, inputs, observed, t_start=t_start)
        if where is not None:
            h = C.gather_positions(h, where)
            gaps = C.gather_positions(gaps, where)
        return apply(self.decoder, jnp.concatenate([h, gaps[..., None]], axis=-1))


# ------------------------------------------------------------------------ RNN-VAE


@cites("rubanova2019latent")
class RNNVAE(C.AbstractLatentModel):
    """The RNN-VAE baseline of Rubanova et al. (2019): a latent-variable model like
    `LatentODE` whose latent dynamics are a GRU instead of an ODE.

    Recognition: a GRU with a time-gap input runs backwards over the context
    (`batch.mask`) and an MLP gives `q(z0) = N(μ, diag(σ^2))` (as
    `LatentODE(encoder="rnn")`). Generation: the decoder GRU starts from `h = z0` at
    the reference time and at each of the series' times takes the time gap since
    its previous time as input, `h ← GRU(h, [Δt])`; the value is a linear map of `h`
    (Gaussian likelihood with `obs_std`). Positions of the union grid that are not
    the series' own times are predicted without moving its state, so both layouts
    give the same result. Loss: the negative IWAE bound / ELBO per target value, as
    `LatentODE.loss`.
    """

    encoder: ODERNNEncoder
    to_z0: eqx.nn.MLP
    decoder_gru: GRUUpdate
    readout: eqx.nn.MLP
    log_std: Array | None
    num_channels: int = eqx.field(static=True)
    latent_size: int = eqx.field(static=True)
    obs_std: float = eqx.field(static=True)
    std_shift: float = eqx.field(static=True)
    t0: float | None = eqx.field(static=True)
    hyperparameters: tuple[tuple[str, Any], ...] = eqx.field(static=True)

    def __init__(
        self,
        num_channels: int,
        *,
        latent_size: int = 6,
        encoder_size: int = 20,
        units: int = 100,
        obs_std: float = 0.01,
        learn_std: bool = False,
        posterior_std: float = 0.02,
        t0: float | None = None,
        key: PRNGKeyArray,
    ):
        """**Arguments:**

        - `num_channels`: `C`.
        - `latent_size`: size of `z0` (and of the decoder GRU's state).
        - `encoder_size`: size of the encoder GRU's state.
        - `units`: hidden units of the GRU gates and of the `q(z0)` MLP.
        - `obs_std`, `learn_std`: the observation noise.
        - `posterior_std`: the spread of `q(z0)` when training starts (see
          `LatentODE`).
        - `t0`: fixed reference time of `z0` (None: the batch's earliest time).
        - `key`: a JAX PRNG key.
        """
        C.check_sizes(
            "RNNVAE", num_channels=(num_channels, 1), latent_size=(latent_size, 1),
            encoder_size=(encoder_size, 1), units=(units, 0),
        )  # fmt: skip
        log_std = C.initial_log_std(obs_std, learn_std, num_channels)
        ks = jax.random.split(key, 4)
        self.encoder = ODERNNEncoder(
            2 * num_channels, encoder_size, units=units, ode=False, key=ks[0]
        )
        self.to_z0 = mlp(encoder_size, 2 * latent_size, units=units, depth=1, key=ks[1])
        self.decoder_gru = GRUUpdate(1, latent_size, units=units, key=ks[2])
        self.readout = mlp(latent_size, num_channels, units=0, depth=0, key=ks[3])
        self.log_std = log_std
        self.num_channels = num_channels
        self.latent_size = latent_size
        self.obs_std = obs_std
        self.std_shift = C.posterior_shift(posterior_std)
        self.t0 = t0
        self.hyperparameters = C.record(
            num_channels=num_channels,
            latent_size=latent_size,
            encoder_size=encoder_size,
            units=units,
            obs_std=obs_std,
            learn_std=learn_std,
            posterior_std=posterior_std,
            t0=t0,
        )

    def posterior(
        self, batch: Batch, t_ref: ArrayLike | None = None
    ) -> tuple[Float[Array, "B L"], Float[Array, "B L"]]:
        """Mean and std of `q(z0 | context)` per row."""
        C.check_batch("RNNVAE", self.num_channels, batch)
        if t_ref is None:
            t_ref = C.reference_time(batch, self.t0)
        inputs = C.encoder_inputs(batch)
        observed = batch.mask.any(axis=-1)
        t_start = C.last_observed_time(batch.times, observed, t_ref)
        times = batch.times[0] if batch.layout == "union" else batch.times
        h, _, _ = self.encoder(
            times, inputs, observed, t_start=t_start, reverse=True, outputs=False
        )
        return self._posterior_head(h)

    def _decode(
        self,
        z0: Float[Array, "K B L"],
        t_ref: Array,
        times: Float[Array, "B T"],
        valid: Bool[Array, "B T"],
    ) -> Float[Array, "K B T C"]:
        K, B, _ = z0.shape
        gru = jax.vmap(jax.vmap(self.decoder_gru))

        def step(carry, xs):
            h, t_last = carry
            t, ok = xs
            gap = jnp.broadcast_to((t - t_last)[None, :, None], (K, B, 1))
            h_new = gru(h, gap)
            h = jnp.where(ok[None, :, None], h_new, h)
            return (h, jnp.where(ok, t, t_last)), h_new

        t0 = jnp.broadcast_to(t_ref, (B,)).astype(z0.dtype)
        _, hs = jax.lax.scan(step, (z0, t0), (times.T, valid.T))  # [T, K, B, L]
        return apply(self.readout, jnp.moveaxis(hs, 0, 2))

    def loss(
        self,
        batch: Batch,
        *,
        key: PRNGKeyArray,
        n_samples: int = 3,
        kl_weight: float | Array = 1.0,
        objective: str = "iwae",
    ) -> tuple[Float[Array, ""], dict[str, Float[Array, ""]]]:
        """Negative IWAE bound (or ELBO) per target value and metrics `loss`,
        `bound`, `nll`, `kl`, `mse`; see `LatentODE.loss`."""
        n_samples = C.check_samples(n_samples, objective)
        t_ref = C.reference_time(batch, self.t0)
        mean, std = self.posterior(batch, t_ref)
        eps = jax.random.normal(key, (n_samples,) + mean.shape, mean.dtype)
        pred = self._decode(mean + std * eps, t_ref, batch.times, batch.time_mask)
        ll = C.gaussian_log_prob(
            batch.values, pred, self._noise_log_std(mean.dtype), batch.target_mask
        )
        return C.variational_objective(
            batch,
            mean=mean,
            std=std,
            eps=eps,
            pred=pred,
            ll=ll,
            extra_ll=None,
            kl_weight=kl_weight,
            objective=objective,
        )

    def predict(
        self,
        batch: Batch,
        *,
        key: PRNGKeyArray,
        n_samples: int = 10,
        times: Float[ArrayLike, " Q"] | Float[ArrayLike, "B Q"] | None = None,
    ) -> tuple[Float[Array, "B T C"], Float[Array, "B T C"]]:
        """Posterior predictive mean and std (spread over `n_samples` samples of
        `z0` combined with the observation noise), as `LatentODE.predict`. `times`
        (`[Q]` or `[B, Q]`, non-decreasing per row) are decoded as the series'
        times."""
        n_samples = C.check_samples(n_samples)
        t_ref = C.reference_time(batch, self.t0)
        if times is None:
            times, valid = batch.times, batch.time_mask
        else:
            times = C.query_times(batch, times, ordered=True)
            valid = jnp.ones(times.shape, bool)
            if self.t0 is None:
                t_ref = jnp.minimum(t_ref, jnp.min(times))
        mean, std = self.posterior(batch, t_ref)
        eps = jax.random.normal(key, (n_samples,) + mean.shape, mean.dtype)
        pred = self._decode(mean + std * eps, t_ref, times, valid)
        return self._predictive(pred)


# ------------------------------------------------------------- no-parameter baselines


def _context_indices(batch: Batch, queries):
    """For each query time and channel: the index of the last context observation
    at or before it and of the first one after it (-1 / T where there is none)."""
    times = batch.times  # [B, T]
    B, T = times.shape
    mask = batch.mask  # [B, T, C]
    idx = jnp.arange(T)[None, :, None]
    last = jax.lax.cummax(jnp.where(mask, idx, -1), axis=1)  # [B, T, C]
    nxt = jax.lax.cummin(jnp.where(mask, idx, T), axis=1, reverse=True)
    # p: the last position with time <= query (positions are sorted per row)
    p = jax.vmap(lambda t, q: jnp.searchsorted(t, q, side="right"))(times, queries) - 1
    p_c = jnp.clip(p, 0, T - 1)[..., None]
    prev = jnp.where(p[..., None] >= 0, jnp.take_along_axis(last, p_c, axis=1), -1)
    q_c = jnp.clip(p + 1, 0, T - 1)[..., None]
    after = jnp.where(p[..., None] + 1 < T, jnp.take_along_axis(nxt, q_c, axis=1), T)
    return prev, after  # [B, Q, C]


def _gather(a: Float[Array, "B T C"], i: Array) -> Float[Array, "B Q C"]:
    T = a.shape[1]
    return jnp.take_along_axis(a, jnp.clip(i, 0, T - 1), axis=1)


class AbstractInterpolator(eqx.Module):
    """Parameter-free baselines that predict each channel from the context points
    (`batch.mask`) of its own series; subclasses define `_interpolate`."""

    num_channels: int | None = eqx.field(static=True)
    hyperparameters: tuple[tuple[str, Any], ...] = eqx.field(static=True)

    def __init__(self, num_channels: int | None = None, *, key: Any = None):
        """**Arguments:** `num_channels` (optional; checked against batches when
        given); `key` is accepted and ignored (there are no parameters)."""
        self.num_channels = num_channels
        self.hyperparameters = C.record(num_channels=num_channels)

    @abc.abstractmethod
    def _interpolate(
        self, batch: Batch, queries: Float[Array, "B Q"]
    ) -> Float[Array, "B Q C"]:
        """The predictions at `queries` from the context of `batch`."""

    def predict(
        self,
        batch: Batch,
        *,
        key: PRNGKeyArray | None = None,
        n_samples: int | None = None,
        times: Float[ArrayLike, " Q"] | Float[ArrayLike, "B Q"] | None = None,
    ) -> tuple[Float[Array, "B T C"], Float[Array, "B T C"]]:
        """Predictions from the context points (`batch.mask`) at `batch.times` (or
        `times`, `[Q]` or `[B, Q]`); the std is 0 (no uncertainty). `key` and
        `n_samples` are ignored."""
        name = type(self).__name__
        C.check_batch(name, self.num_channels or batch.num_channels, batch)
        queries = batch.times if times is None else C.query_times(batch, times)
        mean = self._interpolate(batch, queries)
        return mean, jnp.zeros_like(mean)

    def loss(
        self,
        batch: Batch,
        *,
        key: PRNGKeyArray | None = None,
        n_samples: int | None = None,
        kl_weight: float | None = None,
    ) -> tuple[Float[Array, ""], dict[str, Float[Array, ""]]]:
        """The mean squared error on the target values (`batch.target_mask`, rows
        of weight 0 excluded), as `loss` and `mse`, so that these baselines can be
        evaluated with the same code (there is nothing to train)."""
        mean, _ = self.predict(batch)
        _, metrics = C.gaussian_objective(batch, mean, 0.0)
        mse = metrics["mse"]
        return mse, {"loss": mse, "mse": mse}


@cites("rubanova2019latent")
class LinearInterpolation(AbstractInterpolator):
    """Per channel, linear interpolation between the context observations
    (`batch.mask`) of each series (`numpy.interp`): flat extrapolation before the
    first and after the last one; a channel with no context observation in a series
    is predicted as 0 (the mean of normalised data). No parameters.
    """

    def _interpolate(self, batch, queries):
        prev, after = _context_indices(batch, queries)
        x = C.clean_values(batch, batch.mask)
        T = batch.num_times
        t = jnp.broadcast_to(batch.times[..., None], x.shape)
        xp, xn = _gather(x, prev), _gather(x, after)
        tp, tn = _gather(t, prev), _gather(t, after)
        has_p, has_n = prev >= 0, after < T
        q = queries[..., None]
        span = jnp.where(has_p & has_n & (tn > tp), tn - tp, 1.0)
        lam = jnp.where(has_p & has_n & (tn > tp), (q - tp) / span, 0.0)
        both = xp + lam * (xn - xp)
        return jnp.where(
            has_p & has_n, both, jnp.where(has_p, xp, jnp.where(has_n, xn, 0.0))
        )


@cites("rubanova2019latent")
class LOCF(AbstractInterpolator):
    """Last observation carried forward, per channel, from the context
    observations (`batch.mask`) of each series; before the first observation the
    first one is carried backwards (flat extrapolation); a channel with no context
    observation in a series is predicted as 0 (the mean of normalised data). No
    parameters.
    """

    def _interpolate(self, batch, queries):
        prev, after = _context_indices(batch, queries)
        x = C.clean_values(batch, batch.mask)
        T = batch.num_times
        xp, xn = _gather(x, prev), _gather(x, after)
        return jnp.where(prev >= 0, xp, jnp.where(after < T, xn, 0.0))
