"""Forward-filtering backward-sampling (Carter & Kohn 1994; Frühwirth-Schnatter
1994)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jaxtyping import Array, ArrayLike, Bool, Float, PRNGKeyArray

from .._references import cites
from ._filter import parallel_filter, sequential_filter
from ._model import LinearGaussianSSM, prepare
from ._parallel import parallel_affine_backward
from ._steps import backward_kernel, psd_sqrt


@cites("carter1994gibbs", "fruhwirth1994data", "sarkka2021temporal")
def posterior_sample(
    ssm: LinearGaussianSSM,
    observations: Float[ArrayLike, "T C"],
    mask: Bool[ArrayLike, "T C"] | Bool[ArrayLike, " T"] | None = None,
    *,
    key: PRNGKeyArray,
    parallel: bool = False,
) -> Float[Array, "T D"]:
    """One joint sample of the states from the posterior `p(x_0..x_{T-1} | y)`, by
    forward-filtering backward-sampling (Carter & Kohn, 1994; Frühwirth-Schnatter,
    1994): a Kalman filter, then `x_{T-1} ~ p(x_{T-1} | y)` and, backwards,
    `x_t ~ p(x_t | x_{t+1}, y_0..y_t) = N(G_t x_{t+1} + g_t, L_t)`.

    The noise enters through Cholesky factors of `L_t` with a jitter of ten machine
    epsilons of its scale, so singular conditionals (a component without process
    noise) sample without failing. The sample is differentiable in the model's
    parameters (reparametrised). With `parallel=True` the filter and the backward
    recursion are associative scans (Särkkä & García-Fernández, 2021). For many
    samples, vmap over keys only,
    `jax.vmap(lambda k: posterior_sample(ssm, y, mask, key=k))(keys)`: the filter
    does not depend on the key, so it runs once.

    **Arguments:**

    - `ssm`: the model, a `ctmodels.lgssm.LinearGaussianSSM`.
    - `observations`: `y`, `[T, C]`.
    - `mask`: `[T, C]` or `[T]` booleans, True where observed; `None` observes all.
    - `key`: a JAX PRNG key.
    - `parallel`: use associative scans instead of sequential ones.

    **Returns:**

    The sampled states, `[T, D]`.
    """
    p = prepare(ssm, observations, mask)
    filtered = parallel_filter(p) if parallel else sequential_filter(p)
    ms, Ps = filtered.means, filtered.covs
    T, D = ms.shape
    z = jax.random.normal(key, (T, D), ms.dtype)
    G, g, L = jax.vmap(backward_kernel)(ms[:-1], Ps[:-1], p.F, p.Q)
    # x_t = G_t x_{t+1} + c_t, with c_t = g_t + sqrt(L_t) z_t and, at the end,
    # G = 0 and c = m_{T-1} + sqrt(P_{T-1}) z_{T-1}
    E = jnp.concatenate([G, jnp.zeros((1, D, D), G.dtype)])
    B = jax.vmap(psd_sqrt)(jnp.concatenate([L, Ps[-1:]]))
    c = jnp.concatenate([g, ms[-1:]]) + jnp.einsum("tij,tj->ti", B, z)
    if parallel:
        return parallel_affine_backward(E, c)

    def step(x_next, xs):
        E_t, c_t = xs
        x = E_t @ x_next + c_t
        return x, x

    _, xs = jax.lax.scan(step, jnp.zeros(D, ms.dtype), (E, c), reverse=True)
    return xs
