"""`ctmodels.integrate_sde` (issue 17, item 6), in float32.

Oracles: the closed-form mean and variance of the Ornstein-Uhlenbeck process
dX = -theta X dt + sigma dW (Monte Carlo over keys), its pathwise derivatives (the
solution is linear in x0 and sigma), and one adjoint against another.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ctmodels
from ctmodels import solvers

THETA, SIGMA, X0 = 1.0, 0.5, 1.0
PARAMS = jnp.array([THETA, SIGMA])


def drift(t, y, p):
    return -p[0] * y


def diffusion(t, y, p):
    return p[1] * jnp.ones_like(y)


def ou_mean(t, x0=X0):
    return x0 * np.exp(-THETA * t)


def ou_var(t):
    return SIGMA**2 / (2 * THETA) * (1 - np.exp(-2 * THETA * t))


def final_states(solver, n, T, dt0, seed=0):
    keys = jax.random.split(jax.random.key(seed), n)
    ts = jnp.array([0.0, T])

    def one(key):
        sol = ctmodels.integrate_sde(
            drift, diffusion, jnp.array([X0]), ts, PARAMS, key=key, dt0=dt0,
            solver=solver,
        )  # fmt: skip
        return sol.ys[-1, 0]

    return np.asarray(jax.jit(jax.vmap(one))(keys), dtype=np.float64)


@pytest.mark.parametrize("solver", ["euler", "reversible_heun"])
def test_ornstein_uhlenbeck_moments(solver):
    """Euler-Maruyama (Ito) and reversible Heun (Stratonovich; the same SDE for
    additive noise), 2000 paths: mean and variance within 4 standard errors (plus
    the O(dt) bias of the scheme, about 3% of the variance at dt=0.05)."""
    n, T = 2000, 1.0
    x = final_states(solver, n, T, 0.05)
    mean, var = ou_mean(T), ou_var(T)
    assert abs(x.mean() - mean) < 4 * np.sqrt(var / n)
    assert abs(x.var() - var) < 4 * var * np.sqrt(2 / n) + 0.03 * var


@pytest.mark.slow  # about 10 s a stepper (compilation); the fast tests use two
@pytest.mark.parametrize("name", solvers.names("sde"))
def test_every_sde_entry_on_ornstein_uhlenbeck(name):
    """Each registry entry of kind "sde" by name (OU has additive noise, which every
    stepper supports; Ito and Stratonovich agree), 400 paths of 5 steps."""
    n, T = 400, 0.5
    x = final_states(name, n, T, 0.1, seed=1)
    mean, var = ou_mean(T), ou_var(T)
    assert abs(x.mean() - mean) < 5 * np.sqrt(var / n), name
    assert abs(x.var() - var) < 5 * var * np.sqrt(2 / n) + 0.1 * var, name


def test_same_key_same_path_and_a_different_key_another():
    ts = jnp.linspace(0.0, 1.0, 6)
    run = jax.jit(
        lambda key: (
            ctmodels.integrate_sde(
                drift, diffusion, jnp.array([X0, 2.0]), ts, PARAMS, key=key, dt0=0.01
            ).ys
        )
    )
    a, b = run(jax.random.key(3)), run(jax.random.key(3))
    c = run(jax.random.key(4))
    np.testing.assert_array_equal(a, b)
    assert not np.allclose(a, c)
    assert a.shape == (6, 2) and np.all(np.isfinite(a))


def _mean_final(params, x0, adjoint):
    keys = jax.random.split(jax.random.key(7), 4)

    def one(key):
        sol = ctmodels.integrate_sde(
            drift, diffusion, x0, jnp.array([0.0, 1.0]), params, key=key, dt0=0.05,
            solver="reversible_heun", adjoint=adjoint,
        )  # fmt: skip
        return sol.ys[-1, 0]

    return jnp.mean(jax.vmap(one)(keys))


def test_backsolve_gradient_matches_checkpoint_and_the_pathwise_derivatives():
    """reversible_heun, 4 paths of 20 steps: the continuous adjoint (backsolve)
    against backprop through the steps (checkpoint), and both against the pathwise
    derivatives of the linear OU solution."""
    x0 = jnp.array([X0])
    grad = jax.jit(jax.value_and_grad(_mean_final, argnums=(0, 1)), static_argnums=2)
    _, (gp_bs, gx_bs) = grad(PARAMS, x0, "backsolve")
    m, (gp_ck, gx_ck) = grad(PARAMS, x0, "checkpoint")
    np.testing.assert_allclose(gx_bs, gx_ck, rtol=5e-3)
    np.testing.assert_allclose(gp_bs, gp_ck, rtol=3e-2, atol=3e-3)
    # pathwise: X_T = a x0 + sigma * b(W), so dX_T/dx0 = a ~ exp(-theta T) and
    # dX_T/dsigma = (X_T - a x0) / sigma
    np.testing.assert_allclose(gx_ck[0], np.exp(-THETA), rtol=5e-3)
    np.testing.assert_allclose(
        gp_ck[1], (m - gx_ck[0] * X0) / SIGMA, rtol=1e-4, atol=1e-5
    )
    assert gp_ck[0] < 0  # a stronger pull to 0 lowers the mean of X_T (x0 > 0)


def test_general_noise_shape():
    """noise=(2,): a 1-D state driven by two independent Brownian motions with
    weights (s1, s2) has the variance of one with weight sqrt(s1^2 + s2^2)."""
    s = jnp.array([0.3, 0.4])  # sqrt(0.09 + 0.16) = 0.5 = SIGMA
    keys = jax.random.split(jax.random.key(11), 2000)

    def one(key):
        sol = ctmodels.integrate_sde(
            drift, lambda t, y, p: jnp.broadcast_to(s, y.shape + (2,)),
            jnp.array([X0]), jnp.array([0.0, 1.0]), PARAMS, key=key, dt0=0.05,
            noise=(2,),
        )  # fmt: skip
        return sol.ys[-1, 0]

    x = np.asarray(jax.jit(jax.vmap(one))(keys), dtype=np.float64)
    var = ou_var(1.0)
    assert abs(x.var() - var) < 4 * var * np.sqrt(2 / 2000) + 0.03 * var


BAD = {
    "ito+backsolve": (
        dict(solver="euler", adjoint="backsolve"),
        r"adjoint='backsolve' is correct only for stratonovich SDE solvers",
    ),
    "srk+backsolve": (dict(solver="sea", adjoint="backsolve"), r"takes several"),
    "no dt0": (dict(dt0=None), r"SDE steppers take fixed steps; pass dt0"),
    "dt0=0": (dict(dt0=0.0), r"dt0 must be a finite, non-zero"),
    "too few steps": (dict(dt0=1e-4), r"need 10000 steps"),
    "bad noise": (dict(noise="full"), r"noise must be 'diagonal' or the shape"),
    "ode solver": (dict(solver="tsit5"), r"'tsit5' is a ode entry, not a sde solver"),
    "implicit adjoint": (dict(adjoint="implicit"), r"differentiates a fixed point"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_combinations_are_refused_up_front(case):
    kwargs, match = BAD[case]
    kwargs = {"dt0": 0.1, **kwargs}
    with pytest.raises(ValueError, match=match):
        ctmodels.integrate_sde(
            drift, diffusion, jnp.ones(2), jnp.array([0.0, 1.0]), PARAMS,
            key=jax.random.key(0), **kwargs,
        )  # fmt: skip


def test_diffusion_shape_is_checked():
    with pytest.raises(ValueError, match=r"diffusion\(t, y, args\) must return .*"):
        ctmodels.integrate_sde(
            drift, lambda t, y, p: jnp.ones(3), jnp.ones(2), jnp.array([0.0, 1.0]),
            PARAMS, key=jax.random.key(0), dt0=0.1,
        )  # fmt: skip
    with pytest.raises(ValueError, match=r"diagonal noise needs a 1-D state"):
        ctmodels.integrate_sde(
            drift, diffusion, jnp.ones((2, 2)), jnp.array([0.0, 1.0]), PARAMS,
            key=jax.random.key(0), dt0=0.1,
        )  # fmt: skip
