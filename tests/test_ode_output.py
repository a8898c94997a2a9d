"""Dense output, `saveat` choices and events of `ctmodels.integrate` (issue 17,
item 6), in float32, against closed forms and finite differences."""

from __future__ import annotations

import diffrax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ctmodels

TOL = dict(rtol=1e-5, atol=1e-7)
TS = jnp.array([0.0, 2.0])
Y0 = jnp.array([1.0, -0.5])


def decay(t, y, k):
    return -k * y


K = jnp.asarray(0.7)  # an array, not a Python float: Diffrax would compile per value


def exact(t, k=0.7):
    return np.exp(-k * np.asarray(t))[..., None] * np.asarray(Y0)


def test_dense_output_matches_the_closed_form_and_its_gradient():
    sol = ctmodels.integrate(decay, Y0, TS, K, dense=True, **TOL)
    times = jnp.linspace(0.0, 2.0, 13)
    np.testing.assert_allclose(jax.vmap(sol.evaluate)(times), exact(times), atol=2e-5)
    # the derivative of the interpolant is the vector field
    np.testing.assert_allclose(
        sol.derivative(1.3), -0.7 * exact(1.3), rtol=2e-3, atol=1e-5
    )
    # an increment y(t1) - y(t0)
    np.testing.assert_allclose(
        sol.evaluate(0.5, 1.5), exact(1.5) - exact(0.5), atol=2e-5
    )

    def at(k, t):
        return ctmodels.integrate(decay, Y0, TS, k, dense=True, **TOL).evaluate(t)[0]

    g = jax.grad(at)(K, 1.1)  # d/dk exp(-k t) = -t exp(-k t)
    np.testing.assert_allclose(g, -1.1 * np.exp(-0.7 * 1.1), rtol=1e-3)


def test_no_dense_output_says_how_to_get_it():
    sol = ctmodels.integrate(decay, Y0, TS, K)
    assert sol.interpolation is None
    with pytest.raises(ValueError, match=r"dense=True"):
        sol.evaluate(1.0)


def test_saveat_t1_steps_and_a_diffrax_saveat():
    many = jnp.linspace(0.0, 2.0, 5)
    t1 = ctmodels.integrate(decay, Y0, many, K, saveat="t1", **TOL)
    assert t1.ys.shape == (1, 2) and float(t1.ts[0]) == 2.0
    np.testing.assert_allclose(t1.ys[0], exact(2.0), rtol=1e-4)

    steps = ctmodels.integrate(decay, Y0, TS, K, saveat="steps", max_steps=64, **TOL)
    assert steps.ys.shape == (64, 2)
    n = int(steps.stats["num_accepted_steps"])
    done = np.isfinite(np.asarray(steps.ts))
    assert done.sum() == n and np.all(done[:n])  # the steps, then inf padding
    assert np.all(np.diff(np.asarray(steps.ts[:n])) > 0)
    assert float(steps.ts[n - 1]) == 2.0
    np.testing.assert_allclose(steps.ys[:n], exact(steps.ts[:n]), rtol=1e-4)

    custom = ctmodels.integrate(
        decay, Y0, TS, K, saveat=diffrax.SaveAt(t0=True, ts=many[1:4]), **TOL
    )
    np.testing.assert_allclose(custom.ts, np.concatenate([[0.0], many[1:4]]))
    np.testing.assert_allclose(custom.ys, exact(custom.ts), rtol=1e-4)


def test_saveat_t1_failure_reports_where_it_stopped():
    with pytest.raises(ctmodels.SolverError, match=r"failed at t=[0-9.]+, before"):
        ctmodels.integrate(lambda t, y, a: y**2, 1.0, TS, saveat="t1", max_steps=4)
    sol = ctmodels.integrate(
        lambda t, y, a: y**2, 1.0, TS, saveat="t1", max_steps=4, throw=False
    )
    assert np.isinf(np.asarray(sol.ys[0]))


# A ball dropped from height h under gravity g lands at t* = sqrt(2 h / g).
H = 1.0


def fall(t, y, g):
    return jnp.stack([y[1], -g])


def ground(t, y, g):
    return y[0]


@jax.jit
def land(g):
    sol = ctmodels.integrate(
        fall, jnp.array([H, 0.0]), jnp.array([0.0, 5.0]), g, event=ground, **TOL
    )
    return sol.event_time


def test_event_time_and_its_derivative():
    g = jnp.asarray(9.81)
    t_star = np.sqrt(2 * H / g)
    sol = ctmodels.integrate(
        fall, jnp.array([H, 0.0]), jnp.linspace(0.0, 1.0, 11), g, event=ground, **TOL
    )
    assert bool(sol.event_occurred)
    np.testing.assert_allclose(sol.event_time, t_star, rtol=1e-5)
    # at the requested times before the event, the closed form; after it, inf
    before = np.asarray(sol.ts) < t_star
    np.testing.assert_allclose(
        sol.ys[before, 0], H - 0.5 * g * np.asarray(sol.ts)[before] ** 2, atol=1e-5
    )
    assert np.all(np.isinf(np.asarray(sol.ys[~before])))
    assert bool(sol.result == ctmodels.RESULTS.successful)

    grad = jax.grad(land)(g)
    closed = -0.5 * t_star / float(g)  # d/dg sqrt(2 h / g)
    dg = 0.25
    fd = (land(g + dg) - land(g - dg)) / (2 * dg)
    np.testing.assert_allclose(grad, closed, rtol=1e-3)
    np.testing.assert_allclose(grad, fd, rtol=2e-3)


def test_event_that_does_not_fire_and_a_bool_event():
    sol = ctmodels.integrate(decay, Y0, TS, K, event=lambda t, y, k: y[0] + 1.0)
    assert not bool(sol.event_occurred) and float(sol.event_time) == 2.0
    np.testing.assert_allclose(sol.ys[-1], exact(2.0), rtol=1e-4)
    # a bool condition stops at the first step where it holds (not located exactly)
    sol = ctmodels.integrate(decay, Y0, TS, K, event=lambda t, y, k: y[0] < 0.5, **TOL)
    assert bool(sol.event_occurred)
    crossing = np.log(2.0) / 0.7
    assert crossing <= float(sol.event_time) < 2.0


def test_event_under_jit_and_vmap():
    run = jax.vmap(land)
    gs = jnp.array([4.0, 9.81])
    np.testing.assert_allclose(run(gs), np.sqrt(2 * H / np.asarray(gs)), rtol=1e-5)
