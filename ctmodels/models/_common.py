"""Shared pieces of the sequence models: their abstract bases (the observation noise,
the `hyperparameters` bookkeeping, the `loss` / `predict` of the recurrent
predictors, the `q(z0)` head and predictive moments of the latent models), batch
checks, masked likelihoods, and the reference time of a batch."""

from __future__ import annotations

import abc
import math
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, ArrayLike, Bool, Float, PRNGKeyArray

from .. import _errors
from ..data import Batch
from ..nn import apply

LOG_2PI = math.log(2.0 * math.pi)


def record(**kwargs: Any) -> tuple[tuple[str, Any], ...]:
    """Constructor keyword arguments -> the `hyperparameters` static field (lists
    become tuples so the field stays hashable)."""

    def freeze(v):
        if isinstance(v, list | tuple):
            return tuple(freeze(u) for u in v)
        return v

    return tuple((k, freeze(v)) for k, v in kwargs.items())


def check_batch(model_name: str, num_channels: int, batch: Batch) -> None:
    """Trace-time checks that a batch fits a model."""
    if not isinstance(batch, Batch):
        raise ValueError(
            f"{model_name} expects a ctmodels.data.Batch (from ctmodels.data.batches "
            f"or make_batch), got {type(batch).__name__}."
        )
    if batch.num_channels != num_channels:
        raise ValueError(
            f"{model_name} was built for {num_channels} channels but the batch has "
            f"{batch.num_channels}; build the model with "
            f"num_channels={batch.num_channels}."
        )
    if batch.layout not in ("padded", "union"):
        raise ValueError(f"Unknown batch layout {batch.layout!r}.")


def clean_values(batch: Batch, mask: Bool[Array, "B T C"]) -> Float[Array, "B T C"]:
    """The values where `mask`, 0 elsewhere (NaN-safe: junk never leaks through)."""
    return jnp.where(mask, batch.values, 0.0)


def encoder_inputs(batch: Batch) -> Float[Array, "B T 2C"]:
    """`[x * mask, mask]` of the context (`batch.mask`)."""
    x = clean_values(batch, batch.mask)
    return jnp.concatenate([x, batch.mask.astype(x.dtype)], axis=-1)


def reference_time(batch: Batch, t0: float | None) -> Float[Array, ""]:
    """The time of the initial latent state: `t0` if given, else the earliest valid
    time in the batch (the first time of the union grid, as in Rubanova et al.)."""
    dtype = batch.times.dtype
    if t0 is not None:
        early = jnp.any(batch.time_mask & (batch.times < t0))
        return _errors.error_if(
            jnp.asarray(t0, dtype),
            early,
            f"The batch has times before t0={t0}, the time of the initial latent "
            "state: every time must be >= t0 (or build the model with t0=None, the "
            "batch's earliest time).",
        )
    big = jnp.asarray(jnp.inf, dtype)
    t = jnp.min(jnp.where(batch.time_mask, batch.times, big))
    return jnp.where(jnp.isfinite(t), t, batch.times[0, 0])


def last_observed_time(
    times: Float[Array, "B T"], observed: Bool[Array, "B T"], default: Array
) -> Float[Array, " B"]:
    """Each row's latest time with an observation (`default` for rows with none)."""
    big = jnp.asarray(jnp.inf, times.dtype)
    t = jnp.max(jnp.where(observed, times, -big), axis=1)
    return jnp.where(jnp.isfinite(t), t, default)


def first_observed_time(
    times: Float[Array, "B T"], observed: Bool[Array, "B T"], default: Array
) -> Float[Array, " B"]:
    """Each row's earliest time with an observation (`default` for rows with none)."""
    return -last_observed_time(-times, observed, -default)


def first_valid_time(batch: Batch) -> Float[Array, " B"]:
    """Each row's first valid time (`batch.times[:, 0]` for rows with none)."""
    big = jnp.asarray(jnp.inf, batch.times.dtype)
    t = jnp.min(jnp.where(batch.time_mask, batch.times, big), axis=1)
    return jnp.where(jnp.isfinite(t), t, batch.times[:, 0])


def distinct_times(ts: Float[Array, " N"]) -> tuple[Float[Array, " N"], Array]:
    """A strictly increasing grid for `integrate` from a non-decreasing time vector
    `ts` [N] with repeats (padding repeats a row's last time; query times may
    repeat; a reference time repeats the first): `(grid, where)` with the distinct
    values of `ts` first, in order, then filler points just after the last one, and
    `where` [N] each entry's position in `grid` (`grid[where] == ts` exactly), so
    the states at `ts` are `ys[where]`. (Nudging the repeats apart instead overtook a
    following time closer than the nudges, and the solve failed.)"""
    n = ts.shape[0]
    new = jnp.concatenate([jnp.ones(1, bool), ts[1:] != ts[:-1]])
    where = jnp.cumsum(new) - 1
    k = jnp.arange(n)
    scale = jnp.maximum(jnp.max(jnp.abs(ts)), 1.0)
    delta = 16 * jnp.finfo(ts.dtype).eps * scale
    filler = ts[-1] + (k - where[-1]).astype(ts.dtype) * delta
    grid = jnp.zeros_like(ts).at[where].set(ts)  # repeats write the same value
    return jnp.where(k <= where[-1], grid, filler), where


def gaussian_log_prob(
    x: Float[Array, "... T C"],
    mean: Float[Array, "... T C"],
    log_std: Float[Array, " C"] | float,
    mask: Bool[Array, "... T C"],
) -> Float[Array, "..."]:
    """Sum over the `mask`ed entries of `log N(x; mean, exp(log_std)^2)`."""
    x = jnp.where(mask, x, 0.0)
    z = (x - mean) * jnp.exp(-log_std)
    lp = -0.5 * z**2 - log_std - 0.5 * LOG_2PI
    return jnp.sum(jnp.where(mask, lp, 0.0), axis=(-2, -1))


def kl_to_standard_normal(
    mean: Float[Array, "... L"], std: Float[Array, "... L"]
) -> Float[Array, "..."]:
    """`KL(N(mean, diag(std^2)) || N(0, I))` in closed form, summed over the last
    axis."""
    return jnp.sum(0.5 * (mean**2 + std**2 - 1.0) - jnp.log(std), axis=-1)


def weighted_total(x: Float[Array, " B"], weight: Float[Array, " B"]) -> Array:
    """`sum_b weight_b x_b`, with rows of weight 0 dropped (not multiplied, so a
    non-finite value there cannot leak in)."""
    return jnp.sum(jnp.where(weight > 0, weight * x, 0.0))


def gaussian_objective(
    batch: Batch,
    mean: Float[Array, "B T C"],
    log_std: Float[Array, " C"] | float,
) -> tuple[Array, dict[str, Array]]:
    """Masked Gaussian negative log-likelihood per target value (`target_mask`), and
    the metrics of a model with one prediction per position."""
    target = batch.target_mask
    w = batch.weight
    counts = jnp.sum(target, axis=(1, 2)).astype(mean.dtype)
    n = jnp.maximum(weighted_total(counts, w), 1.0)
    ll = gaussian_log_prob(batch.values, mean, log_std, target)
    x = clean_values(batch, target)
    se = jnp.sum(jnp.where(target, (mean - x) ** 2, 0.0), axis=(1, 2))
    nll = -weighted_total(ll, w) / n
    mse = weighted_total(se, w) / n
    return nll, {"loss": nll, "nll": nll, "mse": mse}


def check_sizes(model_name: str, **sizes: tuple[Any, int]) -> None:
    """Constructor sizes `name=(value, minimum)`: ints (not bools) >= the minimum,
    else a `ValueError` naming the argument (before any array is built)."""
    for name, (v, lo) in sizes.items():
        if not _errors.is_int(v):
            raise ValueError(f"{model_name}: {name} must be an int, got {v!r}.")
        if v < lo:
            raise ValueError(f"{model_name}: {name} must be >= {lo}, got {v}.")


def check_samples(n_samples, objective="iwae") -> int:
    """`n_samples` as a Python int (NumPy ints accepted: shapes need a static int),
    after checking it is an int >= 1; and the objective's name."""
    if not _errors.is_int(n_samples) or n_samples < 1:
        raise ValueError(f"n_samples must be a positive int, got {n_samples!r}.")
    if objective not in ("iwae", "elbo"):
        raise ValueError(f"objective must be 'iwae' or 'elbo', got {objective!r}.")
    return int(n_samples)


def variational_objective(
    batch: Batch,
    *,
    mean: Float[Array, "B L"],
    std: Float[Array, "B L"],
    eps: Float[Array, "K B L"],
    pred: Float[Array, "K B T C"],
    ll: Float[Array, "K B"],
    extra_ll: Float[Array, "K B"] | None,
    kl_weight,
    objective: str,
) -> tuple[Array, dict[str, Array]]:
    """The negative IWAE bound / ELBO per target value of a VAE with a diagonal
    Gaussian `q(z0)`, a `N(0, I)` prior and `K` samples `z0 = mean + std * eps`
    (see `LatentODE.loss`), and its metrics."""
    K = eps.shape[0]
    z0 = mean + std * eps
    rec = ll if extra_ll is None else ll + extra_ll
    log_q = jnp.sum(-0.5 * eps**2 - jnp.log(std) - 0.5 * LOG_2PI, axis=-1)
    log_p = jnp.sum(-0.5 * z0**2 - 0.5 * LOG_2PI, axis=-1)
    kl = kl_to_standard_normal(mean, std)  # [B]
    if objective == "iwae":
        log_w = rec + kl_weight * (log_p - log_q)
        bound = jax.nn.logsumexp(log_w, axis=0) - math.log(K)
    else:
        bound = rec.mean(0) - kl_weight * kl
    return bound_objective(batch, bound=bound, ll=ll.mean(0), kl=kl, pred=pred)


def bound_objective(
    batch: Batch,
    *,
    bound: Float[Array, " B"],
    ll: Float[Array, " B"],
    kl: Float[Array, " B"],
    pred: Float[Array, "K B T C"],
) -> tuple[Array, dict[str, Array]]:
    """The loss of a variational model from each series' bound `bound`, expected
    log-likelihood `ll` and KL `kl`: `-Σ_b w_b bound_b / Σ_b w_b n_b` (`w` =
    `batch.weight`, `n_b` the series' target values), and the metrics `loss`,
    `bound` and `kl` (per series), `nll` and `mse` (of the mean of the `K` decoded
    draws `pred`) per target value."""
    w = batch.weight
    wsum = jnp.maximum(jnp.sum(w), 1e-12)
    target = batch.target_mask
    counts = jnp.sum(target, axis=(1, 2)).astype(pred.dtype)
    n = jnp.maximum(weighted_total(counts, w), 1.0)
    loss = -weighted_total(bound, w) / n
    x = clean_values(batch, target)
    se = jnp.sum(jnp.where(target, (pred.mean(0) - x) ** 2, 0.0), axis=(1, 2))
    metrics = {
        "loss": loss,
        "bound": weighted_total(bound, w) / wsum,
        "nll": -weighted_total(ll, w) / n,
        "kl": weighted_total(kl, w) / wsum,
        "mse": weighted_total(se, w) / n,
    }
    return loss, metrics


def noise_log_std(log_std: Array | None, obs_std: float, num_channels: int, dtype):
    """The observation noise's log std per channel (learned or fixed)."""
    if log_std is not None:
        return log_std
    return jnp.full((num_channels,), math.log(obs_std), dtype)


def initial_log_std(
    obs_std: float, learn_std: bool, num_channels: int
) -> Float[Array, " C"] | None:
    """The `log_std` field of a Gaussian sequence model's constructor: `log(obs_std)`
    per channel when the noise is learned (`learn_std`), else None (fixed at
    `obs_std`); a `ValueError` unless `obs_std > 0`."""
    if not obs_std > 0:
        raise ValueError(f"obs_std must be positive, got {obs_std}.")
    return jnp.full((num_channels,), math.log(obs_std)) if learn_std else None


def check_query_times(times, *, ordered: bool) -> None:
    """Check `times` given to a model's `predict` where they are concrete (traced
    times pass unchecked): not empty, finite, and (`ordered`) non-decreasing along
    the last axis. Raises a `ValueError` that quotes the caller's values (instead of
    a solver failure or an error about internal, padded times later)."""
    if isinstance(times, jax.core.Tracer):
        return
    t = np.asarray(times)
    if t.size == 0:
        raise ValueError("times is empty: give at least one time to predict at.")
    if not (np.issubdtype(t.dtype, np.integer) or np.issubdtype(t.dtype, np.floating)):
        raise ValueError(f"times must be real numbers, got dtype {t.dtype}.")
    bad = ~np.isfinite(t)
    if bad.any():
        at = tuple(int(i) for i in np.argwhere(bad)[0])
        raise ValueError(
            f"times must be finite: {int(bad.sum())} of them are NaN or infinite "
            f"(the first at index {at if t.ndim > 1 else at[0]}: {t[at]})."
        )
    if ordered and t.shape[-1] > 1:
        down = np.diff(t, axis=-1) < 0
        if down.any():
            at = tuple(int(i) for i in np.argwhere(down)[0])
            row, j = at[:-1], at[-1]
            raise ValueError(
                f"times must be non-decreasing{' in every row' if row else ''}: "
                f"{t[row + (j + 1,)]} follows {t[row + (j,)]} at index "
                f"{row + (j + 1,) if row else j + 1}. Sort them (np.sort) first."
            )


def query_times(batch: Batch, times, *, ordered: bool = False) -> Float[Array, "B Q"]:
    """`times` given to `predict` (`[Q]` for every row, or `[B, Q]`) as `[B, Q]`,
    checked by `check_query_times`."""
    check_query_times(times, ordered=ordered)
    times = jnp.asarray(times, batch.times.dtype)
    if times.ndim == 1:
        return jnp.broadcast_to(times, (batch.batch_size, times.shape[0]))
    if times.ndim == 2 and times.shape[0] == batch.batch_size:
        return times
    raise ValueError(
        f"times must be [Q] or [{batch.batch_size}, Q], got shape {times.shape}."
    )


def merge_queries(
    times: Float[Array, "B T"],
    observed: Bool[Array, "B T"],
    inputs: Float[Array, "B T D"],
    queries: Float[Array, "B Q"],
):
    """Insert query times (unobserved) among a batch's positions, in time order; at
    a tie the query comes first (so it is predicted from the updates before that
    time). **Returns:** `(times, observed, inputs, where)` of the merged sequences
    (`[B, Q + T]`) and each query's position in them (`[B, Q]`)."""
    Q = queries.shape[-1]
    B = times.shape[0]
    all_t = jnp.concatenate([queries, times], axis=-1)
    all_o = jnp.concatenate([jnp.zeros((B, Q), bool), observed], axis=-1)
    all_x = jnp.concatenate(
        [jnp.zeros((B, Q, inputs.shape[-1]), inputs.dtype), inputs], axis=-2
    )
    order = jnp.argsort(all_t, axis=-1, stable=True)
    where = jnp.argsort(order, axis=-1)[:, :Q]
    take = lambda a: jnp.take_along_axis(a, order, axis=-1)
    x = jnp.take_along_axis(all_x, order[..., None], axis=-2)
    return take(all_t), take(all_o), x, where


def gather_positions(a: Array, where: Array) -> Array:
    """`a[b, where[b, q]]` for `a` `[B, N, ...]` and `where` `[B, Q]`."""
    idx = where.reshape(where.shape + (1,) * (a.ndim - 2))
    return jnp.take_along_axis(a, idx, axis=1)


def recurrent_inputs(model_name: str, num_channels: int, batch: Batch, queries=None):
    """What a forward-running recurrent model (ODE-RNN, GRU-Δt) reads from a batch:
    `(times, inputs, observed, t_start, where)`. With `queries` (`[B, Q]`) the query
    times are merged in as unobserved positions and `where` gives their positions
    (else None); in the union layout without queries `times` is the shared grid."""
    check_batch(model_name, num_channels, batch)
    inputs = encoder_inputs(batch)
    observed = batch.mask.any(axis=-1)
    t_start = first_valid_time(batch)
    times = batch.times
    where = None
    if queries is not None:
        times, observed, inputs, where = merge_queries(times, observed, inputs, queries)
        t_start = jnp.minimum(t_start, queries.min(axis=-1))
    elif batch.layout == "union":
        times = times[0]
    return times, inputs, observed, t_start, where


def posterior_shift(posterior_std: float) -> float:
    """The offset that makes `softplus(pre + shift)` equal `posterior_std` at `pre = 0`:
    the spread of `q(z0)` when training starts (an untrained head gives `pre ~ 0`)."""
    if not posterior_std > 0:
        raise ValueError(f"posterior_std must be positive, got {posterior_std}.")
    return float(math.log(math.expm1(posterior_std)))


# ------------------------------------------------------------------ abstract bases


class AbstractGaussianSequenceModel(eqx.Module):
    """A sequence model whose observations are Gaussian: each channel's value at a
    time is `N(prediction, σ_c^2)`, with `σ` fixed at `obs_std` (`log_std` None) or
    learned per channel (`log_std`, starting at `log(obs_std)`).

    Concrete subclasses are final; they declare the fields in `_REQUIRED` (checked
    when the class is defined), build `log_std` with `initial_log_std`, and record
    their constructor's keyword arguments in `hyperparameters` (with `record`), so
    that a checkpoint rebuilds the model as `MODELS[name](**dict(hyperparameters),
    key=...)`.

    **Attributes:** `log_std` (learned noise, or None), `num_channels`, `obs_std`,
    `hyperparameters`.

    (The fields are not declared here as `eqx.AbstractVar`s on purpose: a field
    declared in a base class comes first in every subclass's field order, which is
    the order of the pytree leaves, so of checkpoints and optimiser states; each
    subclass keeps its own order.)
    """

    _REQUIRED = ("log_std", "num_channels", "obs_std", "hyperparameters")

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if cls.__name__.startswith("Abstract"):
            return
        declared = set()
        for c in cls.__mro__:
            declared.update(getattr(c, "__annotations__", {}))
        missing = [f for f in cls._REQUIRED if f not in declared]
        if missing:
            raise TypeError(
                f"{cls.__name__} subclasses {AbstractGaussianSequenceModel.__name__} "
                f"but does not declare the fields {missing}: declare them (with "
                "their types) in the class body."
            )

    @abc.abstractmethod
    def loss(
        self, batch: Batch, *, key: PRNGKeyArray | None = None, **kwargs
    ) -> tuple[Float[Array, ""], dict[str, Float[Array, ""]]]:
        """The training loss of `batch` (a scalar) and a dict of scalar metrics."""

    @abc.abstractmethod
    def predict(
        self,
        batch: Batch,
        *,
        key: PRNGKeyArray | None = None,
        n_samples: int | None = None,
        times: Float[ArrayLike, " Q"] | Float[ArrayLike, "B Q"] | None = None,
    ) -> tuple[Float[Array, "B T C"], Float[Array, "B T C"]]:
        """The predictive mean and std given the context `batch.mask`."""

    def _noise_log_std(self, dtype) -> Float[Array, " C"]:
        """The observation noise's log std per channel."""
        return noise_log_std(self.log_std, self.obs_std, self.num_channels, dtype)


class AbstractRecurrentModel(AbstractGaussianSequenceModel):
    """A deterministic forward-running predictor (ODE-RNN, GRU-Δt): subclasses
    define `_means`, the prediction at each position (or query time) from the
    observations strictly before it; the loss is the Gaussian negative
    log-likelihood of the target values and `predict` returns the means with the
    observation noise's std."""

    @abc.abstractmethod
    def _means(self, batch: Batch, queries=None) -> Float[Array, "B T C"]:
        """The predicted means at `batch.times` (`queries` None) or at the query
        times `queries` `[B, Q]`."""

    def loss(
        self,
        batch: Batch,
        *,
        key: PRNGKeyArray | None = None,
        n_samples: int | None = None,
        kl_weight: float | None = None,
    ) -> tuple[Float[Array, ""], dict[str, Float[Array, ""]]]:
        """Gaussian negative log-likelihood per target value (`batch.target_mask`;
        rows of weight 0 excluded), and metrics `loss`, `nll`, `mse`.

        `key`, `n_samples` and `kl_weight` are accepted for a uniform interface with
        the latent models and ignored (the model is deterministic).
        """
        mean = self._means(batch)
        return gaussian_objective(batch, mean, self._noise_log_std(mean.dtype))

    def predict(
        self,
        batch: Batch,
        *,
        key: PRNGKeyArray | None = None,
        n_samples: int | None = None,
        times: Float[ArrayLike, " Q"] | Float[ArrayLike, "B Q"] | None = None,
    ) -> tuple[Float[Array, "B T C"], Float[Array, "B T C"]]:
        """Predictions given the context `batch.mask`: the mean at each time (from
        the observations before it) and the std of the observation noise
        (`obs_std`, or the learned one), broadcast.

        **Arguments:** `batch`; `times`: None (`batch.times`), `[Q]` or `[B, Q]`
        times to predict at; `key`, `n_samples`: ignored.

        **Returns:** `(mean, std)`, each `[B, T, C]` (`Q` with `times`).
        """
        queries = None if times is None else query_times(batch, times)
        mean = self._means(batch, queries)
        std = jnp.broadcast_to(jnp.exp(self._noise_log_std(mean.dtype)), mean.shape)
        return mean, std


class AbstractLatentModel(AbstractGaussianSequenceModel):
    """A VAE over sequences (latent ODE, RNN-VAE): a latent state `z0` with a
    `N(0, I)` prior and a diagonal Gaussian posterior `q(z0 | context)` whose head
    `to_z0` maps an encoder's state to `(μ, pre)`, `σ = softplus(pre + std_shift)`;
    decoded samples of `z0` give the predictive mixture.

    **Attributes** (besides the base's): `to_z0`, `latent_size`, `std_shift` (see
    `posterior_shift`), `t0` (the fixed time of `z0`, or None).
    """

    _REQUIRED = AbstractGaussianSequenceModel._REQUIRED + (
        "to_z0",
        "latent_size",
        "std_shift",
        "t0",
    )

    def _posterior_head(
        self, h: Float[Array, "B H"]
    ) -> tuple[Float[Array, "B L"], Float[Array, "B L"]]:
        """The mean and std of `q(z0)` from the encoder's final state (with any
        static covariates appended)."""
        mean, pre = jnp.split(apply(self.to_z0, h), 2, axis=-1)
        return mean, jax.nn.softplus(pre + self.std_shift) + 1e-5

    def _predictive(
        self, pred: Float[Array, "K B T C"]
    ) -> tuple[Float[Array, "B T C"], Float[Array, "B T C"]]:
        """The mean and std of the predictive mixture of `K` decoded samples with the
        observation noise: `(mean_k pred, sqrt(Var_k pred + σ^2))`."""
        noise = jnp.exp(2 * self._noise_log_std(pred.dtype))
        return pred.mean(0), jnp.sqrt(pred.var(0) + noise)
