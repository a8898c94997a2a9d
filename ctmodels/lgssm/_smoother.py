"""The Rauch-Tung-Striebel smoother (Rauch, Tung & Striebel 1965), sequential or by
associative scan."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jaxtyping import ArrayLike, Bool, Float

from .._references import cites
from ._filter import parallel_filter, sequential_filter
from ._model import LinearGaussianSSM, Prepared, SmootherResult, prepare, symmetrise
from ._parallel import parallel_smoother
from ._steps import backward_kernel


def sequential_smoother(filtered, p: Prepared):
    def step(carry, xs):
        ms, Ps = carry
        m, P, F, Q = xs
        G, g, L = backward_kernel(m, P, F, Q)
        ms = G @ ms + g
        Ps = symmetrise(G @ Ps @ G.T + L)
        return (ms, Ps), (ms, Ps, G)

    last = (filtered.means[-1], filtered.covs[-1])
    xs = (filtered.means[:-1], filtered.covs[:-1], p.F, p.Q)
    _, (ms, Ps, G) = jax.lax.scan(step, last, xs, reverse=True)
    means = jnp.concatenate([ms, last[0][None]])
    covs = jnp.concatenate([Ps, last[1][None]])
    return means, covs, G


@cites("rauch1965maximum", "sarkka2021temporal")
def kalman_smoother(
    ssm: LinearGaussianSSM,
    observations: Float[ArrayLike, "T C"],
    mask: Bool[ArrayLike, "T C"] | Bool[ArrayLike, " T"] | None = None,
    *,
    parallel: bool = False,
) -> SmootherResult:
    """The Rauch-Tung-Striebel smoother (Rauch, Tung & Striebel, 1965): the
    posterior marginals `p(x_t | y_0..y_{T-1})`, the lag-one cross-covariances and
    the log marginal likelihood, for one sequence (`jax.vmap` it over a batch).

    A Kalman filter (`ctmodels.lgssm.kalman_filter`, same masking rules) and a
    backward pass `x_t | x_{t+1}, y_{0..t} ~ N(G_t x_{t+1} + g_t, L_t)` with the
    gain `G_t = P_t F_t^T (F_t P_t F_t^T + Q_t)^{-1}` (a Cholesky solve: the
    predicted covariance must be positive definite) and `L_t` in the Joseph-like form
    `(I - G F) P (I - G F)^T + G Q G^T`; covariances symmetrised at every step (not
    square-root form). With `parallel=True` both passes are associative scans
    (Särkkä & García-Fernández, 2021).

    **Arguments:**

    - `ssm`: the model, a `ctmodels.lgssm.LinearGaussianSSM`.
    - `observations`: `y`, `[T, C]`.
    - `mask`: `[T, C]` or `[T]` booleans, True where observed; `None` observes all.
    - `parallel`: use associative scans instead of sequential ones.

    **Returns:**

    A `ctmodels.lgssm.SmootherResult`: `means [T, D]`, `covs [T, D, D]`,
    `cross_covs [T-1, D, D]` (`Cov(x_t, x_{t+1} | y)`), `filtered` (the
    `FilterResult`) and `log_likelihood`.
    """
    p = prepare(ssm, observations, mask)
    if parallel:
        filtered = parallel_filter(p)
        means, covs, G = parallel_smoother(filtered, p)
    else:
        filtered = sequential_filter(p)
        means, covs, G = sequential_smoother(filtered, p)
    cross = G @ covs[1:]
    return SmootherResult(
        means=means,
        covs=covs,
        cross_covs=cross,
        filtered=filtered,
        log_likelihood=filtered.log_likelihood,
    )
