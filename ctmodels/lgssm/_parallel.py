"""Filtering, smoothing and sampling by associative scan (Särkkä & García-Fernández
2021): each step is an element of an associative operation, and `lax.associative_scan`
combines them in `O(log T)` depth."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.scipy.linalg import cho_solve, lu_factor, lu_solve

from ._model import FilterResult, Prepared, symmetrise
from ._steps import backward_kernel, predict, update


def _first_element(p: Prepared):
    m, P, _ = update(p.m0, p.P0, p.H[0], p.R[0], p.y[0], p.missing[0])
    D = m.shape[0]
    zeros = jnp.zeros((D, D), m.dtype)
    return zeros, m, P, jnp.zeros_like(m), zeros


def _element(F, Q, H, R, y):
    """The filtering element `(A, b, C, eta, J)` of a step with transition `F, Q`
    and observation `H, R, y`: `p(x_t | x_{t-1}, y_t) = N(A x_{t-1} + b, C)` and the
    likelihood of `y_t` as a function of `x_{t-1}`, `∝ exp(-x^T J x / 2 + eta^T x)`.
    The covariance `C` in Joseph form."""
    D = F.shape[0]
    S = symmetrise(H @ Q @ H.T + R)
    chol = jnp.linalg.cholesky(S)
    K = cho_solve((chol, True), H @ Q).T
    IKH = jnp.eye(D, dtype=F.dtype) - K @ H
    A = IKH @ F
    b = K @ y
    C = symmetrise(IKH @ Q @ IKH.T + K @ R @ K.T)
    HF = H @ F
    Sinv_HF = cho_solve((chol, True), HF)
    eta = HF.T @ cho_solve((chol, True), y)
    J = symmetrise(HF.T @ Sinv_HF)
    return A, b, C, eta, J


def _combine(earlier, later):
    Ai, bi, Ci, etai, Ji = earlier
    Aj, bj, Cj, etaj, Jj = later
    eye = jnp.eye(Ai.shape[0], dtype=Ai.dtype)
    # M = A_j (I + C_i J_j)^{-1},  N = A_i^T (I + J_j C_i)^{-1}: one LU of
    # I + C_i J_j serves both (I + J_j C_i is its transpose)
    lu = lu_factor(eye + Ci @ Jj)
    M = lu_solve(lu, Aj.T, trans=1).T
    N = lu_solve(lu, Ai).T
    A = M @ Ai
    b = M @ (bi + Ci @ etaj) + bj
    C = symmetrise(M @ Ci @ Aj.T + Cj)
    eta = N @ (etaj - Jj @ bi) + etai
    J = symmetrise(N @ Jj @ Ai + Ji)
    return A, b, C, eta, J


def parallel_filter(p: Prepared) -> FilterResult:
    first = _first_element(p)
    rest = jax.vmap(_element)(p.F, p.Q, p.H[1:], p.R[1:], p.y[1:])
    elems = jax.tree.map(lambda f, r: jnp.concatenate([f[None], r]), first, rest)
    _, ms, Ps, _, _ = jax.lax.associative_scan(jax.vmap(_combine), elems)
    mps, Pps = jax.vmap(predict)(ms[:-1], Ps[:-1], p.F, p.Q)
    mps = jnp.concatenate([p.m0[None], mps])
    Pps = jnp.concatenate([p.P0[None], Pps])
    _, _, lls = jax.vmap(update)(mps, Pps, p.H, p.R, p.y, p.missing)
    return FilterResult(
        means=ms,
        covs=Ps,
        predicted_means=mps,
        predicted_covs=Pps,
        log_likelihood=jnp.sum(lls),
    )


def _combine_backward(later, earlier):
    """`(E, g, L)` of `p(x_t | x_{t+2}...)`: compose `x_t = E_t x_{t+1} + g_t + N(0,
    L_t)` with the later map (`lax.associative_scan` with `reverse=True` passes the
    later element first)."""
    Ej, gj, Lj = later
    Ei, gi, Li = earlier
    return Ei @ Ej, Ei @ gj + gi, symmetrise(Ei @ Lj @ Ei.T + Li)


def parallel_smoother(filtered: FilterResult, p: Prepared):
    """Smoothed means and covariances and the backward gains `[T-1, D, D]`."""
    ms, Ps = filtered.means, filtered.covs
    G, g, L = jax.vmap(backward_kernel)(ms[:-1], Ps[:-1], p.F, p.Q)
    D = ms.shape[1]
    E = jnp.concatenate([G, jnp.zeros((1, D, D), G.dtype)])
    g = jnp.concatenate([g, ms[-1:]])
    L = jnp.concatenate([L, Ps[-1:]])
    _, means, covs = jax.lax.associative_scan(
        jax.vmap(_combine_backward), (E, g, L), reverse=True
    )
    return means, covs, G


def _combine_affine(later, earlier):
    Ej, cj = later
    Ei, ci = earlier
    return Ei @ Ej, Ei @ cj + ci


def parallel_affine_backward(E, c):
    """`x_t = E_t x_{t+1} + c_t` (with `E_{T-1} = 0`) for every `t`, by associative
    scan: the backward pass of the sampler."""
    _, xs = jax.lax.associative_scan(jax.vmap(_combine_affine), (E, c), reverse=True)
    return xs
