"""The Kalman filter (Kalman 1960), sequential by `lax.scan`, in covariance form with
Joseph-form updates and symmetrised covariances."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jaxtyping import Array, ArrayLike, Bool, Float

from .._references import cites
from ._model import FilterResult, LinearGaussianSSM, Prepared, prepare
from ._parallel import parallel_filter
from ._steps import predict, update


def sequential_filter(p: Prepared) -> FilterResult:
    m, P, ll0 = update(p.m0, p.P0, p.H[0], p.R[0], p.y[0], p.missing[0])

    def step(carry, xs):
        m, P = carry
        F, Q, H, R, y, missing = xs
        mp, Pp = predict(m, P, F, Q)
        m, P, ll = update(mp, Pp, H, R, y, missing)
        return (m, P), (m, P, mp, Pp, ll)

    xs = (p.F, p.Q, p.H[1:], p.R[1:], p.y[1:], p.missing[1:])
    _, (ms, Ps, mps, Pps, lls) = jax.lax.scan(step, (m, P), xs)
    return FilterResult(
        means=jnp.concatenate([m[None], ms]),
        covs=jnp.concatenate([P[None], Ps]),
        predicted_means=jnp.concatenate([p.m0[None], mps]),
        predicted_covs=jnp.concatenate([p.P0[None], Pps]),
        log_likelihood=ll0 + jnp.sum(lls),
    )


@cites("kalman1960new", "sarkka2021temporal")
def kalman_filter(
    ssm: LinearGaussianSSM,
    observations: Float[ArrayLike, "T C"],
    mask: Bool[ArrayLike, "T C"] | Bool[ArrayLike, " T"] | None = None,
    *,
    parallel: bool = False,
) -> FilterResult:
    """The Kalman filter (Kalman, 1960): the filtered marginals `p(x_t | y_0..y_t)`
    of a `ctmodels.lgssm.LinearGaussianSSM` and the log marginal likelihood
    `log p(y)`, for one sequence (`jax.vmap` it over a batch).

    Missing values: `mask[t, c]` False leaves channel `c` of step `t` out (its
    value is ignored and may be NaN); a step with every channel masked is a pure
    prediction step, exactly as if it had no observation. The log-likelihood is that
    of the observed entries only.

    Numerics: covariance form with the Joseph-form update
    `P' = (I - K H) P (I - K H)^T + K R K^T`, the innovation covariance factored by
    Cholesky, and every covariance symmetrised after each step (not square-root
    form). With `parallel=True` the same quantities come from an associative scan
    over the steps (Särkkä & García-Fernández, 2021), `O(log T)` depth instead of
    `O(T)` and about twice the arithmetic, for long sequences on parallel hardware;
    it takes longer to compile, and which one runs faster depends on the sizes and
    the machine (measure). Both are differentiable (reverse mode through the scan).

    **Arguments:**

    - `ssm`: the model (`initial_mean [D]`, `initial_cov [D, D]`, `transition`
      and `transition_cov` `[D, D]` or `[T-1, D, D]`, `emission` `[C, D]` or
      `[T, C, D]`, `emission_cov` `[C, C]` or `[T, C, C]`).
    - `observations`: `y`, `[T, C]`.
    - `mask`: `[T, C]` (per channel) or `[T]` (per step) booleans, True where
      observed; `None` (default) observes everything.
    - `parallel`: use the associative scan instead of the sequential one.

    **Returns:**

    A `ctmodels.lgssm.FilterResult` (`means [T, D]`, `covs [T, D, D]`,
    `predicted_means`, `predicted_covs`, `log_likelihood`).

    Shapes that disagree raise a `ValueError` when the call is traced.
    """
    p = prepare(ssm, observations, mask)
    if parallel:
        return parallel_filter(p)
    return sequential_filter(p)


def log_marginal_likelihood(
    ssm: LinearGaussianSSM,
    observations: Float[ArrayLike, "T C"],
    mask: Bool[ArrayLike, "T C"] | Bool[ArrayLike, " T"] | None = None,
    *,
    parallel: bool = False,
) -> Float[Array, ""]:
    """`log p(y)` of the observed entries: `kalman_filter(...).log_likelihood`
    (same arguments; see `ctmodels.lgssm.kalman_filter`)."""
    return kalman_filter(ssm, observations, mask, parallel=parallel).log_likelihood
