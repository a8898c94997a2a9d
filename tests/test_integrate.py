"""`ctmodels.integrate` against independent oracles.

Every ODE test is parametrised over the solver registry, so a newly registered
stepper is covered automatically (its `order`, `adaptive`, `stiff`, `imex` tags decide
which checks apply):

- linear ODEs y' = A y against `scipy.linalg.expm` (convergence order with fixed
  steps, tolerance with adaptive steps, backward time, pytree state, IMEX pairs);
- stiff problems (Robertson, Van der Pol mu=1000) against scipy's Radau at tight
  tolerances;
- gradients under every adjoint against central finite differences and each other;
- every error path, eagerly and under `jax.jit`;
- `stats["num_fn_evals"]` against vector-field evaluations counted at run time with
  `jax.debug.callback`.

Compilations are shared: each solver's fixed-step program is jitted once (the step
size is a traced argument), and eager calls repeat the same static configuration so
Diffrax's own `filter_jit` cache is hit.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.integrate
import scipy.linalg

import ctmodels
from ctmodels import solvers
from ctmodels._errors import discard_failed_callbacks

jax.config.update("jax_enable_x64", True)
X64 = True  # for the whole module (tests/conftest.py)

RESULTS = ctmodels.RESULTS

ODE = solvers.names("ode")


def _tags(name):
    return solvers.entry(name, "ode").tags


ADAPTIVE = [n for n in ODE if _tags(n).get("adaptive")]
STIFF = [n for n in ODE if _tags(n).get("stiff")]
IMEX = [n for n in ODE if _tags(n).get("imex")]
NONSTIFF = [n for n in ODE if not _tags(n).get("stiff")]
ADJOINTS = solvers.names("adjoint")


# --------------------------------------------------------------------------------------
# The linear test problem y' = A y, exact solution expm(A (t - t0)) y0.
# --------------------------------------------------------------------------------------

A3 = np.array([[-0.4, 1.0, 0.2], [-1.0, -0.3, 0.5], [0.1, -0.6, -0.8]])
Y0 = np.array([1.0, 0.5, -0.3])
TS = np.linspace(0.0, 2.0, 5)


def expm_solution(A, y0, ts):
    ts = np.asarray(ts)
    return np.stack([scipy.linalg.expm(np.asarray(A) * (t - ts[0])) @ y0 for t in ts])


EXACT = expm_solution(A3, Y0, TS)

# Run-time counters. `_EVALS` counts vector-field evaluations actually executed (a
# `jax.debug.callback` inside the field runs once per evaluation, also inside jit and
# while loops); `_TRACES` counts Python traces of the field (a retrace = a recompile).
_EVALS = [0]
_TRACES = [0]


def _bump_evals():
    _EVALS[0] += 1


def linear(t, y, A):
    return A @ y


def linear_instrumented(t, y, A):
    _TRACES[0] += 1
    jax.debug.callback(_bump_evals)
    return A @ y


def count_evals(fn, *args, **kwargs):
    """Run fn and return (its output, the vector-field evaluations it executed)."""
    jax.effects_barrier()
    _EVALS[0] = 0
    out = fn(*args, **kwargs)
    jax.block_until_ready(out)
    jax.effects_barrier()
    return out, _EVALS[0]


def max_abs(x):
    return float(np.max(np.abs(np.asarray(x))))


def _step_sizes(order):
    """Three fixed step sizes (halving) that keep the error of an order-`order`
    stepper on the linear problem well above float64 roundoff and inside the
    asymptotic regime: small steps for low order, big ones for dopri8."""
    dt = min(1.0, 2.0 ** (-3 + (order - 1) // 2))
    return [dt, dt / 2, dt / 4]


def observed_order(dts, errs):
    return np.polyfit(np.log(dts), np.log(errs), 1)[0]


@functools.cache
def fixed_step_program(name):
    """One jit compilation per stepper; dt0 is traced, so all step sizes reuse it."""

    @jax.jit
    def run(y0, A, dt0):
        sol = ctmodels.integrate(
            linear_instrumented,
            y0,
            TS,
            A,
            solver=name,
            dt0=dt0,
            controller="constant",
            rtol=1e-12,  # only the implicit steppers' Newton tolerance here
            atol=1e-12,
        )
        return sol.ys, sol.stats["num_fn_evals"], sol.stats["num_steps"]

    return run


_ADAPTIVE_CALLED: set[str] = set()


def adaptive_eager(name, y0=Y0):
    """The eager adaptive call shared by several tests (same static configuration, so
    one compilation per stepper): default tolerances rtol=1e-6, atol=1e-8."""
    _ADAPTIVE_CALLED.add(name)
    return ctmodels.integrate(linear_instrumented, y0, TS, A3, solver=name)


@functools.cache
def jitted_linear():
    """`integrate` under jax.jit with the adaptive defaults; y0, ts and A traced."""
    return jax.jit(
        lambda y0, ts, A: ctmodels.integrate(linear_instrumented, y0, ts, A).ys
    )


# --------------------------------------------------------------------------------------
# 1. Convergence order and adaptive tolerance against expm.
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ODE)
def test_fixed_step_convergence_order_against_expm(name):
    order = _tags(name)["order"]
    run = fixed_step_program(name)
    dts = _step_sizes(order)
    errs = []
    for dt in dts:
        ys, _, steps = run(Y0, A3, dt)
        assert int(steps) == round((TS[-1] - TS[0]) / dt)
        errs.append(max_abs(ys - EXACT))
    assert all(e > 1e-13 for e in errs), f"errors {errs} reach roundoff: bad test"
    p = observed_order(dts, errs)
    assert p >= order - 0.3, (
        f"{name}: observed order {p:.2f} < tagged order {order} (errors {errs} at "
        f"dt0={dts})"
    )


@pytest.mark.parametrize("name", ADAPTIVE)
def test_adaptive_steps_meet_tolerance_against_expm(name):
    rtol, atol = 1e-6, 1e-8  # integrate's defaults
    sol = adaptive_eager(name)
    assert bool(sol.result == RESULTS.successful)
    assert sol.ys.shape == (TS.size, Y0.size)
    err = max_abs(sol.ys - EXACT)
    tol = rtol * max_abs(EXACT) + atol
    accepted = int(sol.stats["num_accepted_steps"])
    # The controller keeps each accepted step's local error (estimate) below ~tol;
    # on this contractive problem the global error is at most their sum. Factor 20
    # for the estimate's own inexactness (kencarp5's embedded pair underestimates by
    # ~10x on linear problems).
    assert err <= 20 * accepted * tol, (name, err, accepted, tol)
    # an absolute sanity bound as well (the bound above grows with the step count)
    assert err < 1e-2, (name, err)


@pytest.mark.parametrize("name", ADAPTIVE)
def test_repeated_eager_calls_reuse_the_compilation(name):
    """A second eager call with a new y0 (same shapes, same options) must not retrace
    the vector field, i.e. must hit the jit cache instead of recompiling."""
    if name not in _ADAPTIVE_CALLED:  # run alone: compile first
        adaptive_eager(name)
    before = _TRACES[0]
    sol = adaptive_eager(name, y0=0.5 * Y0)
    assert _TRACES[0] == before, (
        f"{name}: the second eager call retraced the vector field "
        f"({_TRACES[0] - before} traces), i.e. recompiled"
    )
    assert bool(sol.result == RESULTS.successful)
    assert max_abs(sol.ys - 0.5 * EXACT) < 1e-2


# --------------------------------------------------------------------------------------
# 1b. num_fn_evals against evaluations counted at run time.
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", NONSTIFF)
def test_num_fn_evals_counts_vector_field_evaluations_fixed_steps(name):
    run = fixed_step_program(name)  # compiled by the convergence test
    (_, evals, steps), counted = count_evals(run, Y0, A3, 0.125)
    assert int(steps) == 16
    assert counted > 0
    assert int(evals) == counted, (
        f"{name}: stats['num_fn_evals']={int(evals)} but the vector field ran "
        f"{counted} times in {int(steps)} constant steps"
    )


@pytest.mark.parametrize("name", [n for n in NONSTIFF if n in ADAPTIVE])
def test_num_fn_evals_counts_vector_field_evaluations_adaptive(name):
    sol, counted = count_evals(adaptive_eager, name)  # cached compilation
    assert int(sol.stats["num_rejected_steps"]) >= 0
    assert int(sol.stats["num_fn_evals"]) == counted, (
        f"{name}: stats['num_fn_evals']={int(sol.stats['num_fn_evals'])} but the "
        f"vector field ran {counted} times in {int(sol.stats['num_steps'])} steps"
    )


@pytest.mark.parametrize("name", STIFF)
def test_num_fn_evals_of_implicit_steppers_is_marked_unknown(name):
    """Newton iterations vary, so the documented value is -1."""
    run = fixed_step_program(name)  # compiled by the convergence test
    (_, evals, steps), counted = count_evals(run, Y0, A3, 0.125)
    assert int(steps) == 16
    assert counted > 0
    assert int(evals) == -1


# --------------------------------------------------------------------------------------
# 2. Stiff problems against scipy's Radau.
# --------------------------------------------------------------------------------------

ROBERTSON_K = np.array([0.04, 3e7, 1e4])
ROBERTSON_Y0 = np.array([1.0, 0.0, 0.0])
ROBERTSON_TS = np.array([0.0, 1e-3, 1e-1, 1.0, 10.0, 100.0])
VDP_MU = 1000.0
VDP_Y0 = np.array([2.0, 0.0])
# the slow phase, then the relaxation jump near t = (3 - 2 ln 2) mu ~ 807
VDP_TS = np.array([0.0, 100.0, 500.0, 800.0, 1000.0])


def robertson(t, y, k):
    k1, k2, k3 = k[0], k[1], k[2]
    y1, y2, y3 = y[0], y[1], y[2]
    return jnp.stack(
        [-k1 * y1 + k3 * y2 * y3, k1 * y1 - k3 * y2 * y3 - k2 * y2**2, k2 * y2**2]
    )


def van_der_pol(t, y, mu):
    return jnp.stack([y[1], mu * (1 - y[0] ** 2) * y[1] - y[0]])


STIFF_PROBLEMS = {
    "robertson": (robertson, ROBERTSON_Y0, ROBERTSON_TS, ROBERTSON_K),
    "van_der_pol": (van_der_pol, VDP_Y0, VDP_TS, np.asarray(VDP_MU)),
}


@functools.cache
def radau_reference(problem):
    f, y0, ts, args = STIFF_PROBLEMS[problem]
    out = scipy.integrate.solve_ivp(
        lambda t, y: np.asarray(f(t, y, args)),
        (ts[0], ts[-1]),
        y0,
        method="Radau",
        t_eval=ts,
        rtol=1e-10,
        atol=1e-12,
    )
    assert out.success
    return out.y.T


def stiff_error(ys, ref):
    """Per-component relative error, with a floor of 1e-3 of the component's range
    (Van der Pol's y' crosses zero; Robertson's y2 is ~1e-5)."""
    floor = 1e-3 * np.max(np.abs(ref), axis=0)
    return float(np.max(np.abs(np.asarray(ys) - ref) / (np.abs(ref) + floor)))


def _stiff_cases():
    """Robertson for every stiff stepper; Van der Pol (one more compilation each) for
    the default stiff solver, and for the others under -m slow."""
    cases = []
    for name in STIFF:
        cases.append(pytest.param(name, "robertson", id=f"{name}-robertson"))
        marks = () if name == "kvaerno5" else (pytest.mark.slow,)
        cases.append(
            pytest.param(name, "van_der_pol", marks=marks, id=f"{name}-van_der_pol")
        )
    return cases


@pytest.mark.parametrize("name,problem", _stiff_cases())
def test_stiff_problem_against_radau(name, problem):
    f, y0, ts, args = STIFF_PROBLEMS[problem]
    sol = ctmodels.integrate(
        f, y0, ts, args, solver=name, rtol=1e-7, atol=1e-10, max_steps=100_000
    )
    assert bool(sol.result == RESULTS.successful)
    ref = radau_reference(problem)
    # an order-1 stepper accumulates ~ (steps x tolerance); the others are well within
    tol = 3e-2 if _tags(name)["order"] <= 1 else 2e-3
    err = stiff_error(sol.ys, ref)
    assert err <= tol, f"{name} on {problem}: relative error {err:.2e} > {tol:g}"
    if problem == "robertson":  # mass conservation y1 + y2 + y3 = 1
        np.testing.assert_allclose(np.asarray(sol.ys).sum(axis=1), 1.0, atol=1e-5)


def test_explicit_solver_on_stiff_problem_suggests_implicit():
    f, y0, ts, args = STIFF_PROBLEMS["robertson"]
    with pytest.raises(ctmodels.SolverError) as info:
        ctmodels.integrate(
            f, y0, ts, args, solver="tsit5", rtol=1e-7, atol=1e-10, max_steps=1000
        )
    msg = str(info.value)
    assert "'tsit5'" in msg
    assert "stiff" in msg and "kvaerno5" in msg
    assert "max_steps (now 1000)" in msg
    assert info.value.solver == "tsit5"
    assert info.value.entry == "integrate"


# --------------------------------------------------------------------------------------
# 3. Gradients under every adjoint.
# --------------------------------------------------------------------------------------

GRAD_TS = np.linspace(0.0, 2.0, 5)
GRAD_P = np.array([2.0, 0.3, 0.5])
GRAD_Y0 = np.array([0.8, -0.2])
GRAD_W = np.arange(1.0, 11.0).reshape(5, 2)


def forced_pendulum(t, y, p):
    return jnp.stack([y[1], -p[0] * jnp.sin(y[0]) - p[1] * y[1] + p[2] * jnp.cos(t)])


def make_loss(adjoint):
    def loss(p, y0):
        sol = ctmodels.integrate(
            forced_pendulum,
            y0,
            GRAD_TS,
            p,
            solver="tsit5",
            dt0=0.05,
            controller="constant",
            adjoint=adjoint,
        )
        return jnp.sum(GRAD_W * jnp.sin(sol.ys))

    return loss


@functools.cache
def finite_difference_gradients():
    loss = jax.jit(make_loss("checkpoint"))
    eps = 1e-5

    def central(f, x):
        return np.array(
            [(f(x + eps * e) - f(x - eps * e)) / (2 * eps) for e in np.eye(x.size)]
        )

    gp = central(lambda p: float(loss(p, GRAD_Y0)), GRAD_P)
    gy = central(lambda y: float(loss(GRAD_P, y)), GRAD_Y0)
    return gp, gy


def _grad_modes():
    out = []
    for a in ADJOINTS:
        if a == "implicit":
            continue  # steady states only; see the ValueError test below
        if a == "forward":
            out.append((a, "jacfwd"))
        else:
            out.append((a, "grad"))
            if a == "direct":
                out.append((a, "jacfwd"))
    return out


GRAD_MODES = _grad_modes()


@functools.cache
def adjoint_gradients(adjoint, mode):
    loss = make_loss(adjoint)
    d = jax.grad if mode == "grad" else jax.jacfwd
    gp, gy = jax.jit(d(loss, argnums=(0, 1)))(GRAD_P, GRAD_Y0)
    return np.asarray(gp), np.asarray(gy)


def assert_close_rel(x, ref, rtol):
    scale = np.max(np.abs(ref))
    assert np.max(np.abs(x - ref)) <= rtol * scale, (x, ref)


@pytest.mark.parametrize("adjoint,mode", GRAD_MODES)
def test_gradient_matches_finite_differences(adjoint, mode):
    gp, gy = adjoint_gradients(adjoint, mode)
    fd_p, fd_y = finite_difference_gradients()
    # central differences with eps=1e-5 in float64 are accurate to ~1e-10 here
    assert_close_rel(gp, fd_p, 1e-7)
    assert_close_rel(gy, fd_y, 1e-7)


@pytest.mark.parametrize("adjoint,mode", GRAD_MODES)
def test_gradients_agree_across_adjoints(adjoint, mode):
    ref_p, ref_y = adjoint_gradients("checkpoint", "grad")
    gp, gy = adjoint_gradients(adjoint, mode)
    # discretise-then-optimise adjoints differentiate the same computation; backsolve
    # solves the continuous adjoint ODE, equal up to the O(dt^5) discretisation error
    tol = 1e-7 if adjoint == "backsolve" else 1e-11
    assert_close_rel(gp, ref_p, tol)
    assert_close_rel(gy, ref_y, tol)


def test_implicit_adjoint_is_rejected_for_integrate():
    with pytest.raises(ValueError, match="steady state") as info:
        ctmodels.integrate(linear, Y0, TS, A3, adjoint="implicit")
    msg = str(info.value)
    assert "'checkpoint'" in msg and "ctmodels.steady_state" in msg


# --------------------------------------------------------------------------------------
# 4. Error paths.
# --------------------------------------------------------------------------------------


def test_unknown_solver_suggests_close_match():
    with pytest.raises(ValueError, match="Unknown ode solver 'tsit6'") as info:
        ctmodels.integrate(linear, Y0, TS, A3, solver="tsit6")
    assert "Did you mean 'tsit5'" in str(info.value)


def test_unknown_adjoint_suggests_close_match():
    with pytest.raises(ValueError, match="Did you mean 'checkpoint'"):
        ctmodels.integrate(linear, Y0, TS, A3, adjoint="chekpoint")


def test_non_ode_registry_name_as_solver():
    with pytest.raises(ValueError) as info:
        ctmodels.integrate(linear, Y0, TS, A3, solver="pid")
    msg = str(info.value)
    assert "'pid' is a controller entry, not an ode solver" in msg
    assert "tsit5" in msg  # lists the ode solvers to choose from


def test_solver_value_of_wrong_type():
    with pytest.raises(ValueError, match="diffrax.AbstractSolver"):
        ctmodels.integrate(linear, Y0, TS, A3, solver=object())


def test_adjoint_and_controller_values_of_wrong_type():
    with pytest.raises(ValueError, match="adjoint must be a registry name"):
        ctmodels.integrate(linear, Y0, TS, A3, adjoint=object())
    with pytest.raises(ValueError, match="controller must be 'constant', 'pid'"):
        ctmodels.integrate(linear, Y0, TS, A3, controller=object())


BAD_TIMES = {  # same length as TS, to share the jitted program of the jit test
    "unsorted": np.array([0.0, 0.5, 2.0, 1.0, 1.5]),
    "duplicate": np.array([0.0, 0.5, 1.0, 1.0, 2.0]),
    "nan": np.array([0.0, 0.5, np.nan, 1.5, 2.0]),
    "mixed_direction": np.array([0.0, 0.5, 1.0, 0.7, 0.2]),
}
TIMES_MSG = "must be finite and strictly monotonic"


@pytest.mark.parametrize("kind", sorted(BAD_TIMES))
def test_bad_times_raise_eagerly(kind):
    with pytest.raises(ValueError, match=TIMES_MSG):
        ctmodels.integrate(linear, Y0, BAD_TIMES[kind], A3)


@pytest.mark.parametrize("kind", sorted(BAD_TIMES))
def test_bad_times_raise_at_runtime_under_jit(kind):
    run = jitted_linear()
    good = run(Y0, TS, A3)  # the same compilation accepts valid times
    np.testing.assert_allclose(np.asarray(good), EXACT, atol=1e-5)
    with pytest.raises(Exception, match=TIMES_MSG):
        jax.block_until_ready(run(Y0, jnp.asarray(BAD_TIMES[kind]), A3))
    discard_failed_callbacks()  # handled here; a GPU would raise it again later


def test_two_dimensional_times():
    with pytest.raises(ValueError, match=r"1-D array of times, got shape \(2, 2\)"):
        ctmodels.integrate(linear, Y0, np.array([[0.0, 1.0], [2.0, 3.0]]), A3)


def test_single_time():
    with pytest.raises(ValueError, match="at least two times"):
        ctmodels.integrate(linear, Y0, np.array([0.0]), A3)


def test_fixed_step_solver_without_dt0():
    with pytest.raises(ValueError, match="dt0") as info:
        ctmodels.integrate(linear, Y0, TS, A3, solver="euler")
    assert "'euler'" in str(info.value)


def test_fixed_step_solver_with_adaptive_controller():
    with pytest.raises(ValueError, match="no error estimate") as info:
        ctmodels.integrate(linear, Y0, TS, A3, solver="euler", controller="pid")
    assert "dt0" in str(info.value)


@pytest.mark.parametrize("max_steps", [0, -3, 2.5])
def test_bad_max_steps(max_steps):
    with pytest.raises(ValueError, match="max_steps must be a positive int"):
        ctmodels.integrate(linear, Y0, TS, A3, max_steps=max_steps)


def test_vector_field_not_callable():
    with pytest.raises(ValueError, match="vector_field must be a callable"):
        ctmodels.integrate("not a function", Y0, TS, A3)


def test_pair_of_vector_fields_needs_imex_solver():
    with pytest.raises(ValueError, match="needs an IMEX solver") as info:
        ctmodels.integrate((linear, linear), Y0, TS, A3, solver="tsit5")
    assert "kencarp4" in str(info.value)


# max_steps reached: tsit5 with the default tolerances needs ~50 steps for t in [0, 10].
MS_TS = np.linspace(0.0, 10.0, 11)
MS_MAX = 15


def max_steps_call(throw):
    return ctmodels.integrate(
        linear, Y0, MS_TS, A3, solver="tsit5", max_steps=MS_MAX, throw=throw
    )


def test_max_steps_throw_false_returns_result_code():
    sol = max_steps_call(throw=False)
    assert bool(sol.result == RESULTS.max_steps_reached)
    assert int(sol.stats["num_steps"]) == MS_MAX
    ys = np.asarray(sol.ys)
    reached = np.all(np.isfinite(ys), axis=1)
    k = int(np.flatnonzero(reached)[-1])
    assert 0 < k < MS_TS.size - 1  # stopped in the middle
    # what was reached is right; what was not is inf
    np.testing.assert_allclose(
        ys[: k + 1], expm_solution(A3, Y0, MS_TS)[: k + 1], atol=1e-5
    )
    assert np.all(np.isinf(ys[k + 1 :]))


def test_max_steps_error_explains_where_why_and_what_to_try():
    ys = np.asarray(max_steps_call(throw=False).ys)
    k = int(np.flatnonzero(np.all(np.isfinite(ys), axis=1))[-1])
    with pytest.raises(ctmodels.SolverError) as info:
        max_steps_call(throw=True)
    err = info.value
    msg = str(err)
    assert "ctmodels.integrate with solver 'tsit5' failed" in msg  # who
    assert f"between t={MS_TS[k]:g} (last time reached) and t={MS_TS[k + 1]:g}" in msg
    assert "the maximum number of steps was reached" in msg  # why
    assert f"raise max_steps (now {MS_MAX})" in msg  # what to try
    assert "kvaerno5" in msg
    assert "throw=False" in msg
    assert err.solver == "tsit5" and err.entry == "integrate"
    assert bool(err.result == RESULTS.max_steps_reached)


def test_max_steps_under_jit():
    with pytest.raises(ctmodels.SolverError) as info:
        max_steps_call(throw=True)
    eager_msg = str(info.value)
    explanation = eager_msg.split(": ", 1)[1]  # why + what to try, without "where"

    @jax.jit
    def failing(y0):
        return ctmodels.integrate(
            linear, y0, MS_TS, A3, solver="tsit5", max_steps=MS_MAX
        ).ys

    with pytest.raises(Exception) as info:
        jax.block_until_ready(failing(jnp.asarray(Y0)))
    discard_failed_callbacks()
    msg = str(info.value)
    assert "ctmodels.integrate with solver 'tsit5' failed" in msg
    assert explanation in msg


def nan_after(t, y, A):
    """Fine until t = 0.7, then NaN (a stand-in for log of a negative, 0/0, ...)."""
    return jnp.where(t > 0.7, jnp.nan, 1.0) * (A @ y)


NAN_TS = np.linspace(0.0, 2.0, 5)


def test_nan_in_vector_field_adaptive_gives_readable_error():
    with pytest.raises(ctmodels.SolverError) as info:
        ctmodels.integrate(nan_after, Y0, NAN_TS, A3, solver="tsit5")
    msg = str(info.value)
    assert msg.startswith("ctmodels.integrate with solver 'tsit5' failed between t=0.5")
    assert "and t=1" in msg
    assert "Try:" in msg
    sol = ctmodels.integrate(nan_after, Y0, NAN_TS, A3, solver="tsit5", throw=False)
    assert not bool(sol.result == RESULTS.successful)


def test_nan_in_vector_field_fixed_steps_is_reported():
    """With constant steps Diffrax has no step to reject: the NaN must still surface
    as a failure, not as `successful` with NaN in `ys`."""
    kwargs = dict(solver="tsit5", dt0=0.05, controller="constant")
    sol = ctmodels.integrate(nan_after, Y0, NAN_TS, A3, throw=False, **kwargs)
    ys = np.asarray(sol.ys)
    assert np.all(np.isfinite(ys[:2])) and not np.all(np.isfinite(ys[2:]))
    assert not bool(sol.result == RESULTS.successful), (
        "integrate returned RESULTS.successful although ys contains NaN"
    )
    with pytest.raises(ctmodels.SolverError) as info:
        ctmodels.integrate(nan_after, Y0, NAN_TS, A3, **kwargs)
    msg = str(info.value)
    assert "'tsit5'" in msg and "NaN" in msg
    assert "between t=0.5 (last time reached) and t=1" in msg  # where it went bad


# --------------------------------------------------------------------------------------
# 5. jit / vmap / grad safety, backward time, pytree state, IMEX pairs.
# --------------------------------------------------------------------------------------


def eager_default(y0=Y0, A=A3):
    """integrate's defaults (tsit5, pid); the same compilation as adaptive_eager."""
    return ctmodels.integrate(linear_instrumented, y0, TS, A)


def test_jit_agrees_with_eager():
    eager = np.asarray(eager_default().ys)
    np.testing.assert_allclose(eager, EXACT, atol=1e-5)
    jitted = np.asarray(jitted_linear()(Y0, TS, A3))
    np.testing.assert_allclose(jitted, eager, rtol=1e-12, atol=1e-14)


def test_vmap_over_y0_and_over_args_agree_with_eager():
    y0s = np.stack([Y0, -Y0, np.array([0.2, -1.0, 0.4])])
    batched = jax.vmap(lambda y0: eager_default(y0=y0).ys)(y0s)
    for y0, ys in zip(y0s, np.asarray(batched), strict=True):
        single = np.asarray(eager_default(y0=y0).ys)
        # vmap steps all batch members together, so agreement is to tolerance
        np.testing.assert_allclose(ys, single, atol=1e-6)
        np.testing.assert_allclose(ys, expm_solution(A3, y0, TS), atol=1e-5)

    As = np.stack([A3, 0.5 * A3, A3 - 0.2 * np.eye(3)])
    batched = jax.vmap(lambda A: eager_default(A=A).ys)(As)
    for A, ys in zip(As, np.asarray(batched), strict=True):
        single = np.asarray(eager_default(A=A).ys)
        np.testing.assert_allclose(ys, single, atol=1e-6)
        np.testing.assert_allclose(ys, expm_solution(A, Y0, TS), atol=1e-5)


def test_grad_of_integrate_against_expm():
    """Eager (un-jitted) jax.grad through adaptive steps: d/dA of sum(y(T)) against
    the Frechet derivative of expm (scipy)."""

    def loss(A):
        return jnp.sum(
            ctmodels.integrate(linear, Y0, TS, A, rtol=1e-10, atol=1e-12).ys[-1]
        )

    g = np.asarray(jax.grad(loss)(A3))
    T = TS[-1] - TS[0]
    ref = np.empty((3, 3))
    for i in range(3):
        for j in range(3):
            E = np.zeros((3, 3))
            E[i, j] = 1.0
            _, dexp = scipy.linalg.expm_frechet(A3 * T, E * T)
            ref[i, j] = np.sum(dexp @ Y0)
    np.testing.assert_allclose(g, ref, rtol=1e-6, atol=1e-8)


BACKWARD_TS = np.array([2.0, 1.5, 0.5, 0.0])


@pytest.mark.parametrize(
    "name,kwargs",
    [
        ("tsit5", {}),
        ("dopri5", {"dt0": 0.1, "controller": "constant"}),  # dt0 > 0, going back
        pytest.param("kvaerno5", {}, marks=pytest.mark.slow),
    ],
)
def test_backward_in_time_against_expm(name, kwargs):
    sol = ctmodels.integrate(linear, Y0, BACKWARD_TS, A3, solver=name, **kwargs)
    exact = expm_solution(A3, Y0, BACKWARD_TS)  # expm(A (t - 2)) y0, t < 2
    np.testing.assert_allclose(np.asarray(sol.ts), BACKWARD_TS)
    np.testing.assert_allclose(np.asarray(sol.ys), exact, rtol=1e-4, atol=1e-5)


def split_field(t, y, A):
    """y = {"pos": (2,), "vel": ()} -- the linear problem on a dict state."""
    z = jnp.concatenate([y["pos"], y["vel"][None]])
    dz = A @ z
    return {"pos": dz[:2], "vel": dz[2]}


@pytest.mark.parametrize(
    "name", ["tsit5", pytest.param("kvaerno5", marks=pytest.mark.slow)]
)
def test_pytree_state(name):
    y0 = {"pos": jnp.asarray(Y0[:2]), "vel": jnp.asarray(Y0[2])}
    sol = ctmodels.integrate(split_field, y0, TS, A3, solver=name)
    assert set(sol.ys) == {"pos", "vel"}
    assert sol.ys["pos"].shape == (TS.size, 2) and sol.ys["vel"].shape == (TS.size,)
    got = np.concatenate(
        [np.asarray(sol.ys["pos"]), np.asarray(sol.ys["vel"])[:, None]], 1
    )
    np.testing.assert_allclose(got, EXACT, rtol=1e-4, atol=1e-5)


A_EXPLICIT = A3 - np.diag(np.diag(A3))  # the coupling, treated explicitly
A_IMPLICIT = np.diag(np.diag(A3))  # the decay, treated implicitly


def explicit_part(t, y, As):
    return As[0] @ y


def implicit_part(t, y, As):
    return As[1] @ y


@pytest.mark.parametrize("name", IMEX)
def test_imex_pair_convergence_against_expm(name):
    order = _tags(name)["order"]

    @jax.jit
    def run(dt0):
        return ctmodels.integrate(
            (explicit_part, implicit_part),
            Y0,
            TS,
            (A_EXPLICIT, A_IMPLICIT),
            solver=name,
            dt0=dt0,
            controller="constant",
            rtol=1e-12,
            atol=1e-12,
        ).ys

    dts = _step_sizes(order)
    errs = [max_abs(run(dt) - EXACT) for dt in dts]
    assert all(e > 1e-13 for e in errs)
    p = observed_order(dts, errs)
    assert p >= order - 0.3, f"{name} (IMEX pair): order {p:.2f}, errors {errs}"


# --------------------------------------------------------------------------------------
# 7. The starting step (Hairer's algorithm) and the unrolled explicit RK steppers.
# --------------------------------------------------------------------------------------


def _hairer_numpy(f, t0, y0, rtol, atol, order, direction=1.0):
    """Hairer, Norsett & Wanner, Solving ODEs I, II.4, in NumPy (rms norms)."""

    def rms(x):
        return float(np.sqrt(np.mean(np.square(x))))

    scale = atol + rtol * np.abs(y0)
    f0 = f(t0, y0)
    d0, d1 = rms(y0 / scale), rms(f0 / scale)
    h0 = 1e-6 if (d0 < 1e-5 or d1 < 1e-5) else 0.01 * d0 / d1
    f1 = f(t0 + direction * h0, y0 + direction * h0 * f0)
    d2 = rms((f1 - f0) / scale) / h0
    dmax = max(d1, d2)
    h1 = max(1e-6, h0 * 1e-3) if dmax <= 1e-15 else (0.01 / dmax) ** (1 / order)
    return direction * min(100 * h0, h1)


@pytest.mark.parametrize("backward", [False, True])
def test_default_starting_step_is_hairers(backward):
    """With dt0=None an adaptive solve starts with Hairer's step (Diffrax 0.7.2 would
    start from 0.01: its own selection never sees an unwrapped ODETerm), and the
    solve is the one Diffrax makes when given that dt0."""
    import diffrax

    from ctmodels._integrate import _initial_step

    ts = TS[::-1] if backward else TS
    direction = -1.0 if backward else 1.0
    rtol, atol = 1e-6, 1e-8
    ctrl = diffrax.PIDController(rtol=rtol, atol=atol)
    h = _initial_step(
        diffrax.ODETerm(linear), diffrax.Tsit5(), ctrl, ts[0], ts[-1], Y0, A3
    )
    expected = _hairer_numpy(
        lambda t, y: A3 @ y, ts[0], Y0, rtol, atol, order=5, direction=direction
    )
    np.testing.assert_allclose(float(h), expected, rtol=1e-12)
    assert abs(expected - direction * 0.01) > 1e-3  # not Diffrax's fallback

    sol = ctmodels.integrate(linear, Y0, ts, A3, solver="tsit5", rtol=rtol, atol=atol)
    ref = diffrax.diffeqsolve(
        diffrax.ODETerm(linear),
        diffrax.Tsit5(),
        ts[0],
        ts[-1],
        expected,
        jnp.asarray(Y0),
        A3,
        saveat=diffrax.SaveAt(ts=ts),
        stepsize_controller=ctrl,
    )
    assert int(sol.stats["num_steps"]) == int(ref.stats["num_steps"])
    np.testing.assert_allclose(sol.ys, ref.ys, rtol=1e-10, atol=1e-12)


def test_starting_step_is_not_differentiated():
    """The step-size choice carries no gradient (as in Diffrax and torchdiffeq): the
    gradient is that of the solve with that dt0 held fixed."""
    import diffrax

    def loss(a, dt0=None, controller=None):
        sol = ctmodels.integrate(
            linear, Y0, TS, a, solver="dopri5", dt0=dt0, controller=controller
        )
        return jnp.sum(sol.ys[-1] ** 2)

    from ctmodels._integrate import _initial_step

    ctrl = diffrax.PIDController(rtol=1e-6, atol=1e-8)
    h = float(
        _initial_step(
            diffrax.ODETerm(linear), diffrax.Dopri5(), ctrl, TS[0], TS[-1], Y0, A3
        )
    )
    g = jax.grad(loss)(jnp.asarray(A3))
    g_fixed = jax.grad(lambda a: loss(a, h, "pid"))(jnp.asarray(A3))
    np.testing.assert_allclose(g, g_fixed, rtol=1e-12, atol=1e-14)


ERK = [n for n in NONSTIFF if n in ADAPTIVE and n != "reversible_heun"]


# A whole-solve comparison compiles four programs per stepper (about 15 s each):
# the default suite runs it for dopri5 (the latent ODE's and FFJORD's default; the
# step-size controller it exercises is shared by every stepper) and compares every
# stepper's single step; the other whole solves, tsit5's included, run with -m slow.
_WHOLE_SOLVE_FAST = ("dopri5",)


@pytest.mark.parametrize("name", ERK)
def test_unrolled_stepper_one_step_matches_diffrax_stepper(name):
    """The registry's explicit RK steppers run their stages unrolled. One step gives
    Diffrax's own stepper's solution, error estimate and dense output (to roundoff)."""
    import diffrax

    from ctmodels.solvers._unrolled import UnrolledERK

    unrolled = solvers.get(name)
    plain = solvers.get(name, unroll=False)
    assert isinstance(unrolled, UnrolledERK)
    assert type(plain) is type(unrolled.solver)
    term = diffrax.ODETerm(linear)
    y0 = jnp.asarray(Y0)
    steps = []
    for solver in (unrolled, plain):
        state = solver.init(term, 0.0, 0.5, y0, A3)
        y1, err, dense, _, _ = solver.step(term, 0.0, 0.5, y0, A3, state, False)
        mid = solver.interpolation_cls(t0=0.0, t1=0.5, **dense).evaluate(0.2)
        steps.append((y1, err, mid))
    (y1_u, err_u, mid_u), (y1_p, err_p, mid_p) = steps
    np.testing.assert_allclose(y1_u, y1_p, rtol=1e-14, atol=1e-15)
    np.testing.assert_allclose(mid_u, mid_p, rtol=1e-14, atol=1e-15)
    np.testing.assert_allclose(err_u, err_p, rtol=1e-6, atol=1e-15)


@pytest.mark.parametrize(
    "name",
    [n if n in _WHOLE_SOLVE_FAST else pytest.param(n, marks=pytest.mark.slow)
     for n in ERK],
)  # fmt: skip
def test_unrolled_stepper_matches_diffrax_stepper(name):
    """Whole adaptive solves (dense output, forward and backward in time) with the
    unrolled and Diffrax's own stepper, and their gradients, agree to the
    roundoff-level differences in the chosen step sizes (the error estimate of
    high-order pairs is a sum with heavy cancellation, so its last digits depend on
    the order of summation)."""
    unrolled = solvers.get(name)
    plain = solvers.get(name, unroll=False)
    ts_dense = np.linspace(0.0, 2.0, 13)

    @functools.partial(jax.jit, static_argnums=(0, 2))
    def run(solver, a, backward):
        ts = ts_dense[::-1] if backward else ts_dense

        def loss(a):
            sol = ctmodels.integrate(linear, Y0, ts, a, solver=solver)
            return jnp.sum(sol.ys**2), sol

        (_, sol), g = jax.value_and_grad(loss, has_aux=True)(a)
        return sol.ys, sol.stats["num_steps"], g

    for backward in (False, True):
        ys_u, steps_u, g_u = run(unrolled, jnp.asarray(A3), backward)
        ys_p, steps_p, g_p = run(plain, jnp.asarray(A3), backward)
        assert int(steps_u) == int(steps_p)
        # one step agrees to 1e-14 (above) and the step counts are equal; over an
        # adaptive solve the controller carries rounding differences on: 1.8e-7 for
        # dopri8 on an H200 GPU (its fused multiply-adds), so there compare at the
        # solve's own tolerance (default rtol 1e-6)
        gpu = jax.default_backend() == "gpu"
        tol = dict(rtol=1e-6, atol=1e-8) if gpu else dict(rtol=1e-7, atol=1e-9)
        np.testing.assert_allclose(ys_u, ys_p, **tol)
        np.testing.assert_allclose(g_u, g_p, rtol=1e-6, atol=1e-8)


def test_unrolled_stepper_after_a_jump_and_under_vmap():
    """A step-size controller with jump times makes `made_jump` a traced value: the
    first-same-as-last stage is then re-evaluated after each jump, under vmap too."""
    import diffrax

    ctrl = diffrax.ClipStepSizeController(
        diffrax.PIDController(rtol=1e-8, atol=1e-10), jump_ts=jnp.array([0.3, 1.1])
    )

    def jumpy(t, y, a):
        return jnp.where(t < 1.1, 1.0, -2.0) * (a @ y)

    def run(solver, y0):
        return ctmodels.integrate(jumpy, y0, TS, A3, solver=solver, controller=ctrl).ys

    y0s = jnp.stack([jnp.asarray(Y0), 0.5 * jnp.asarray(Y0)])
    for name in ("dopri5", "tsit5"):
        su, sp = solvers.get(name), solvers.get(name, unroll=False)
        u = jax.jit(jax.vmap(lambda y, s=su: run(s, y)))(y0s)
        p = jax.jit(jax.vmap(lambda y, s=sp: run(s, y)))(y0s)
        np.testing.assert_allclose(u, p, rtol=1e-11, atol=1e-12)
        # and the jump is real: the exact solution switches field at t = 1.1
        y11 = scipy.linalg.expm(A3 * 1.1) @ Y0
        exact_end = scipy.linalg.expm(-2.0 * A3 * 0.9) @ y11
        np.testing.assert_allclose(u[0, -1], exact_end, rtol=1e-6, atol=1e-8)
