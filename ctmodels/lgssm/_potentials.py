"""Gaussian potentials per step (a recognition network's output) as pseudo-
observations of the state."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.scipy.linalg import cho_solve
from jaxtyping import Array, ArrayLike, Bool, Float

from ._model import broadcast_mask, symmetrise


def pseudo_observations(
    means: Float[ArrayLike, "T D"],
    precisions: Float[ArrayLike, "T D"] | Float[ArrayLike, "T D D"],
    mask: Bool[ArrayLike, "T D"] | Bool[ArrayLike, " T"] | None = None,
) -> tuple[Float[Array, "T D"], Float[Array, "T D D"], Bool[Array, "T D"]]:
    """Per-step Gaussian potentials on the state,
    `ψ_t(x_t) = N(means[t]; x_t, precisions[t]^{-1})` (information form
    `J_t = precisions[t]`, `h_t = J_t means[t]`; for potentials given as `(J_t, h_t)`
    the means are `J_t^{-1} h_t`), as pseudo-observations of the state with identity
    emission: build the model with `emission=jnp.eye(D)` and `emission_cov=` the
    covariances returned here, and pass the returned observations and mask to the
    filter, smoother or sampler. The smoother then gives the posterior of
    `p(x) Π_t ψ_t(x_t)` and `log_likelihood` its log normaliser
    `log ∫ p(x) Π_t ψ_t(x_t) dx` (each potential's Gaussian constant included), as a
    structured VAE's inference needs.

    Precisions are diagonal (`[T, D]`, one per entry) or full (`[T, D, D]`,
    symmetric positive definite where present; inverted by Cholesky). A diagonal
    entry is left out where `mask` is False or its precision is not positive; a
    full potential's left-out entries are marginalised out of it. Left-out values
    may be anything (NaN included) and get zero gradients; so do the precisions of a
    full potential's fully masked step.

    **Arguments:**

    - `means`: `[T, D]`.
    - `precisions`: `[T, D]` or `[T, D, D]`.
    - `mask`: `[T, D]` or `[T]` booleans, True where the potential is present;
      `None`: everywhere (diagonal: wherever the precision is positive).

    **Returns:**

    `(observations [T, D], emission_cov [T, D, D], mask [T, D])`.
    """
    means = jnp.asarray(means)
    precisions = jnp.asarray(precisions)
    if means.ndim != 2 or precisions.shape not in (
        means.shape,
        (*means.shape, means.shape[-1]),
    ):
        raise ValueError(
            f"ctmodels.lgssm.pseudo_observations: `means` has shape {means.shape} "
            f"and `precisions` {precisions.shape}; expected [T, D] and [T, D] "
            "(diagonal precisions) or [T, D, D] (full)."
        )
    T, D = means.shape
    keep = broadcast_mask(mask, T, D, "means")
    # double `where`s: no inf or NaN reaches the gradient of a left-out entry
    if precisions.ndim == 2:
        keep = keep & (precisions > 0)
        safe = jnp.where(keep, precisions, 1.0)
        covs = jax.vmap(jnp.diag)(jnp.where(keep, 1.0 / safe, 1.0))
    else:
        eye = jnp.eye(D, dtype=precisions.dtype)
        present = jnp.any(keep, axis=1)[:, None, None]
        safe = jnp.where(present, precisions, eye)
        chol = jnp.linalg.cholesky(symmetrise(safe))
        covs = symmetrise(jax.vmap(lambda c: cho_solve((c, True), eye))(chol))
    return jnp.where(keep, means, 0.0), covs, keep
