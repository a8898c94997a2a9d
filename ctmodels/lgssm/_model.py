"""The linear-Gaussian state-space model as a pytree of arrays, its shape checks, and
the results of filtering and smoothing."""

from __future__ import annotations

import math

import equinox as eqx
import jax.numpy as jnp
from jaxtyping import Array, ArrayLike, Bool, Float


class LinearGaussianSSM(eqx.Module):
    """A linear-Gaussian state-space model over `T` steps, as arrays.

    ```
    x_0     ~ N(initial_mean, initial_cov)
    x_{t+1} = F_t x_t + w_t,    w_t ~ N(0, Q_t)     t = 0 .. T-2
    y_t     = H_t x_t + v_t,    v_t ~ N(0, R_t)     t = 0 .. T-1
    ```

    with latent size `D` and `C` observed channels. `F_t` maps the state at step
    `t` to step `t + 1`, so time-varying transitions have `T - 1` entries (for
    irregular times, one per interval: `ctmodels.lgssm.LinearSDE.ssm` builds them).
    Each of `transition`, `transition_cov`, `emission` and `emission_cov` is either
    one matrix shared by every step or a stack with a leading time axis; the number
    of steps `T` comes from the observations the model is used with.

    The class holds arrays only (no behaviour): the functions
    `ctmodels.lgssm.kalman_filter`, `ctmodels.lgssm.kalman_smoother` and
    `ctmodels.lgssm.posterior_sample` take it with the observations. Shapes are
    checked there, when they are traced.
    """

    initial_mean: Float[Array, " D"]
    initial_cov: Float[Array, "D D"]
    transition: Float[Array, "D D"] | Float[Array, "T-1 D D"]
    transition_cov: Float[Array, "D D"] | Float[Array, "T-1 D D"]
    emission: Float[Array, "C D"] | Float[Array, "T C D"]
    emission_cov: Float[Array, "C C"] | Float[Array, "T C C"]

    def __init__(
        self,
        initial_mean: Float[ArrayLike, " D"],
        initial_cov: Float[ArrayLike, "D D"],
        transition: Float[ArrayLike, "D D"] | Float[ArrayLike, "T-1 D D"],
        transition_cov: Float[ArrayLike, "D D"] | Float[ArrayLike, "T-1 D D"],
        emission: Float[ArrayLike, "C D"] | Float[ArrayLike, "T C D"],
        emission_cov: Float[ArrayLike, "C C"] | Float[ArrayLike, "T C C"],
    ):
        """**Arguments:**

        - `initial_mean`: mean of `x_0`, shape `[D]`.
        - `initial_cov`: covariance of `x_0`, `[D, D]` (positive definite).
        - `transition`: `F`, `[D, D]` or one per interval `[T-1, D, D]`.
        - `transition_cov`: `Q`, `[D, D]` or `[T-1, D, D]` (positive semi-definite;
          the smoother and the sampler need `F P F^T + Q` positive definite).
        - `emission`: `H`, `[C, D]` or one per step `[T, C, D]`.
        - `emission_cov`: `R`, `[C, C]` or `[T, C, C]` (positive definite on the
          observed channels; rows and columns of missing channels are ignored).
        """
        self.initial_mean = jnp.asarray(initial_mean)
        self.initial_cov = jnp.asarray(initial_cov)
        self.transition = jnp.asarray(transition)
        self.transition_cov = jnp.asarray(transition_cov)
        self.emission = jnp.asarray(emission)
        self.emission_cov = jnp.asarray(emission_cov)


class FilterResult(eqx.Module):
    """What `ctmodels.lgssm.kalman_filter` returns (one sequence of `T` steps).

    - `means`, `covs`: the filtered marginals `p(x_t | y_0..y_t)`, `[T, D]` and
      `[T, D, D]`.
    - `predicted_means`, `predicted_covs`: the one-step predictions
      `p(x_t | y_0..y_{t-1})` (at `t = 0` the initial distribution), same shapes.
    - `log_likelihood`: `log p(y_0..y_{T-1})` of the observed entries, a scalar.
    """

    means: Float[Array, "T D"]
    covs: Float[Array, "T D D"]
    predicted_means: Float[Array, "T D"]
    predicted_covs: Float[Array, "T D D"]
    log_likelihood: Float[Array, ""]


class SmootherResult(eqx.Module):
    """What `ctmodels.lgssm.kalman_smoother` returns (one sequence of `T` steps).

    - `means`, `covs`: the smoothed marginals `p(x_t | y_0..y_{T-1})`, `[T, D]` and
      `[T, D, D]`.
    - `cross_covs`: `Cov(x_t, x_{t+1} | y)`, `[T-1, D, D]` (with the marginals,
      the expected sufficient statistics `E[x_t x_{t+1}^T]` of the posterior).
    - `filtered`: the `ctmodels.lgssm.FilterResult` of the forward pass.
    - `log_likelihood`: `log p(y_0..y_{T-1})`, the filter's.
    """

    means: Float[Array, "T D"]
    covs: Float[Array, "T D D"]
    cross_covs: Float[Array, "T-1 D D"]
    filtered: FilterResult
    log_likelihood: Float[Array, ""]


def symmetrise(a: Float[Array, "... D D"]) -> Float[Array, "... D D"]:
    return 0.5 * (a + jnp.swapaxes(a, -1, -2))


def _stacked(name, a, shape, steps, what):
    """`a` of `shape` shared by every step, or a stack of `steps` of them."""
    if a.shape == shape:
        return jnp.broadcast_to(a, (steps, *shape))
    if a.shape == (steps, *shape):
        return a
    raise ValueError(
        f"ctmodels.lgssm: `{name}` has shape {a.shape}; expected {shape} (one "
        f"matrix for every step) or {(steps, *shape)} ({what})."
    )


def broadcast_mask(
    mask: ArrayLike | None, T: int, C: int, against: str
) -> Bool[Array, "T C"]:
    """A `[T, C]` (per entry) or `[T]` (per step) boolean mask as `[T, C]`; `None`:
    everything observed. A `ValueError` for another shape or a non-boolean dtype."""
    if mask is None:
        return jnp.ones((T, C), bool)
    mask = jnp.asarray(mask)
    if mask.shape == (T,):
        mask = jnp.broadcast_to(mask[:, None], (T, C))
    elif mask.shape != (T, C):
        raise ValueError(
            f"ctmodels.lgssm: `mask` has shape {mask.shape}; expected {(T, C)} "
            f"(per entry) or {(T,)} (per step) to match `{against}` of shape "
            f"{(T, C)}."
        )
    if mask.dtype != jnp.bool_:
        raise ValueError(
            f"ctmodels.lgssm: `mask` has dtype {mask.dtype}; expected bool (True "
            "where observed)."
        )
    return mask


class Prepared(eqx.Module):
    """The model's arrays broadcast over the steps, with missing channels folded in:
    a missing channel's row of `H` and row and column of `R` are zero, its diagonal
    entry of `R` is one and its observation zero, so it is independent of the state
    and of the other channels and drops out of every update (the log-likelihood
    adds back its `log N(0; 0, 1)`)."""

    m0: Array
    P0: Array
    F: Array  # [T-1, D, D]
    Q: Array  # [T-1, D, D]
    H: Array  # [T, C, D]
    R: Array  # [T, C, C]
    y: Array  # [T, C]
    missing: Array  # [T] number of missing channels


def prepare(
    ssm: LinearGaussianSSM,
    observations: Float[ArrayLike, "T C"],
    mask: Bool[ArrayLike, "T C"] | Bool[ArrayLike, " T"] | None,
) -> Prepared:
    """Check every shape against the others (a `ValueError` naming the argument and
    the shapes it could have) and broadcast."""
    if not isinstance(ssm, LinearGaussianSSM):
        raise TypeError(
            "ctmodels.lgssm: the first argument must be a "
            f"ctmodels.lgssm.LinearGaussianSSM, not {type(ssm).__name__}; build one "
            "with LinearGaussianSSM(initial_mean, initial_cov, transition, "
            "transition_cov, emission, emission_cov) or LinearSDE.ssm(times, ...)."
        )
    y = jnp.asarray(observations)
    if y.ndim != 2:
        raise ValueError(
            f"ctmodels.lgssm: `observations` has shape {y.shape}; expected [T, C] "
            "(steps, channels) for one sequence. For a batch of sequences, "
            "jax.vmap the function over the leading axis."
        )
    T, C = y.shape
    if T == 0:
        raise ValueError("ctmodels.lgssm: `observations` has no steps (T = 0).")
    m0 = jnp.asarray(ssm.initial_mean)
    if m0.ndim != 1:
        raise ValueError(
            f"ctmodels.lgssm: `initial_mean` has shape {m0.shape}; expected [D]."
        )
    (D,) = m0.shape
    if ssm.initial_cov.shape != (D, D):
        raise ValueError(
            f"ctmodels.lgssm: `initial_cov` has shape {ssm.initial_cov.shape}; "
            f"expected {(D, D)} to match `initial_mean` of shape {(D,)}."
        )
    F = _stacked("transition", ssm.transition, (D, D), T - 1, "one per interval "
                 "between the T observation steps")  # fmt: skip
    Q = _stacked("transition_cov", ssm.transition_cov, (D, D), T - 1,
                 "one per interval between the T observation steps")  # fmt: skip
    if ssm.emission.ndim not in (2, 3) or ssm.emission.shape[-2:] != (C, D):
        raise ValueError(
            f"ctmodels.lgssm: `emission` has shape {ssm.emission.shape}; expected "
            f"{(C, D)} or {(T, C, D)}: observations have C = {C} channels and the "
            f"state D = {D} dimensions (from `initial_mean`)."
        )
    H = _stacked("emission", ssm.emission, (C, D), T, "one per step")
    R = _stacked("emission_cov", ssm.emission_cov, (C, C), T, "one per step")
    mask = broadcast_mask(mask, T, C, "observations")
    y = jnp.where(mask, y, 0.0)  # masked entries may hold anything, NaN included
    H = jnp.where(mask[:, :, None], H, 0.0)
    both = mask[:, :, None] & mask[:, None, :]
    R = jnp.where(both, R, jnp.eye(C, dtype=R.dtype))
    missing = jnp.sum(~mask, axis=1)
    return Prepared(m0, ssm.initial_cov, F, Q, H, R, y, missing)


HALF_LOG_2PI = 0.5 * math.log(2 * math.pi)
