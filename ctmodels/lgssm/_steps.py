"""The one-step kernels shared by the filters, the smoothers and the sampler."""

from __future__ import annotations

import jax.numpy as jnp
from jax.scipy.linalg import cho_solve, solve_triangular

from ._model import HALF_LOG_2PI, symmetrise


def update(m, P, H, R, y, missing):
    """Condition `N(m, P)` on `y = H x + N(0, R)`: the Joseph-form covariance
    `(I - K H) P (I - K H)^T + K R K^T` (positive semi-definite whatever the rounding
    of `K`), symmetrised, and the log-density of `y`."""
    S = symmetrise(H @ P @ H.T + R)
    chol = jnp.linalg.cholesky(S)
    K = cho_solve((chol, True), H @ P).T
    r = y - H @ m
    m = m + K @ r
    IKH = jnp.eye(P.shape[0], dtype=P.dtype) - K @ H
    P = symmetrise(IKH @ P @ IKH.T + K @ R @ K.T)
    z = solve_triangular(chol, r, lower=True)
    C = y.shape[0]
    ll = (
        -0.5 * jnp.sum(z**2)
        - jnp.sum(jnp.log(jnp.diagonal(chol)))
        - (C - missing) * HALF_LOG_2PI
    )
    return m, P, ll


def predict(m, P, F, Q):
    return F @ m, symmetrise(F @ P @ F.T + Q)


def backward_kernel(m, P, F, Q):
    """The backward conditional `p(x_t | x_{t+1}) = N(G x_{t+1} + g, L)` of a
    filtered `N(m, P)` pushed through `x_{t+1} = F x_t + N(0, Q)`: the gain
    `G = P F^T (F P F^T + Q)^{-1}` (a Cholesky solve; `F P F^T + Q` must be positive
    definite), `g = m - G F m` and, in Joseph-like form,
    `L = (I - G F) P (I - G F)^T + G Q G^T` (equal to `P - G F P`, but positive
    semi-definite under rounding), symmetrised."""
    Pp = symmetrise(F @ P @ F.T + Q)
    chol = jnp.linalg.cholesky(Pp)
    G = cho_solve((chol, True), F @ P).T
    IGF = jnp.eye(P.shape[0], dtype=P.dtype) - G @ F
    L = symmetrise(IGF @ P @ IGF.T + G @ Q @ G.T)
    return G, m - G @ (F @ m), L


def psd_sqrt(L):
    """A lower-triangular `B` with `B B^T ≈ L` for a symmetric positive
    semi-definite `L`: the Cholesky factor of `L + δ I`, with `δ` ten machine epsilons
    of `L`'s mean variance (plus the smallest normal number), so that it exists for
    singular `L` (a state component without process noise) and stays differentiable
    (an eigendecomposition would not be where eigenvalues repeat)."""
    D = L.shape[-1]
    finfo = jnp.finfo(L.dtype)
    delta = 10 * finfo.eps * jnp.abs(jnp.trace(L)) / D + finfo.tiny
    return jnp.linalg.cholesky(symmetrise(L) + delta * jnp.eye(D, dtype=L.dtype))
