"""Gaussian potentials per step (a recognition network's output) as pseudo-
observations of the state."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jaxtyping import Array, ArrayLike, Bool, Float

from ._model import broadcast_mask


def pseudo_observations(
    means: Float[ArrayLike, "T D"],
    precisions: Float[ArrayLike, "T D"],
    mask: Bool[ArrayLike, "T D"] | Bool[ArrayLike, " T"] | None = None,
) -> tuple[Float[Array, "T D"], Float[Array, "T D D"], Bool[Array, "T D"]]:
    """Per-step Gaussian potentials with diagonal precision,
    `ψ_t(x_t) = Π_d N(means[t, d]; x_t[d], 1 / precisions[t, d])` (in information
    form `J_t = diag(precisions[t])`, `h_t = precisions[t] * means[t]`), as
    pseudo-observations of the state with identity emission: build the model with
    `emission=jnp.eye(D)` and `emission_cov=` the covariances returned here, and pass
    the returned observations and mask to the filter, smoother or sampler. The
    smoother then gives the posterior of `p(x) Π_t ψ_t(x_t)` and `log_likelihood` its
    log normaliser `log ∫ p(x) Π_t ψ_t(x_t) dx` (each potential's Gaussian constant
    included), as a structured VAE's inference needs.

    An entry is left out (masked) where `mask` is False or its precision is not
    positive; its mean and precision may then be anything (NaN included), and the
    gradients with respect to them are zero.

    **Arguments:**

    - `means`: `[T, D]`.
    - `precisions`: `[T, D]`, positive where observed.
    - `mask`: `[T, D]` or `[T]` booleans, True where the potential is present;
      `None`: wherever the precision is positive.

    **Returns:**

    `(observations [T, D], emission_cov [T, D, D], mask [T, D])`.
    """
    means = jnp.asarray(means)
    precisions = jnp.asarray(precisions)
    if means.ndim != 2 or precisions.shape != means.shape:
        raise ValueError(
            f"ctmodels.lgssm.pseudo_observations: `means` has shape {means.shape} "
            f"and `precisions` {precisions.shape}; expected both [T, D], the same."
        )
    T, D = means.shape
    keep = (precisions > 0) & broadcast_mask(mask, T, D, "means")
    # double `where`: no inf or NaN reaches the gradient of a left-out entry
    safe = jnp.where(keep, precisions, 1.0)
    variances = jnp.where(keep, 1.0 / safe, 1.0)
    observations = jnp.where(keep, means, 0.0)
    return observations, jax.vmap(jnp.diag)(variances), keep
