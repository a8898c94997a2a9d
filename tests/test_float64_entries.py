"""Every registry entry by name, with its default tolerances, in float64: the checks of
`test_float32.py` (its problems, closed forms and `check_*` functions) run with x64
on for this whole module (`X64 = True`, see `conftest.py`), so that no module switches
x64 inside itself (JAX's caches do not survive that: a KenCarp5 / Sil3 interpolation
traced in one precision then fails to lower in the other).

Every entry is also covered in float64, at tight tolerances, by the float64 modules
(test_integrate, test_fixed_point, test_steady_state); here float64 checks the float64
defaults by name, so the module runs with `-m slow`.
"""

import jax
import numpy as np
import pytest
from test_float32 import (
    ADJOINT,
    EXPLICIT_STEPS,
    FP,
    LINEAR,
    NO_EQUILIBRIUM,
    NONSTIFF,
    ROOT,
    STIFF,
    check_adjoint_entry,
    check_controller_entry,
    check_fixed_point_entry,
    check_implicit_adjoint,
    check_linear_entry_in_implicit_backward,
    check_newton_cube_roots,
    check_no_equilibrium,
    check_no_fixed_point,
    check_no_root,
    check_ode_entry,
    check_root_entry,
    solve_stiff,
    stiff_step_bound,
)

import ctmodels
from ctmodels import solvers

X64 = True
pytestmark = pytest.mark.slow
F64 = "float64"


@pytest.fixture(autouse=True, scope="module")
def _fresh_caches():
    """Start and leave this module with empty JAX caches, so that nothing traced in
    float64 here is reused by a float32 module (or the other way round)."""
    jax.clear_caches()
    yield
    jax.clear_caches()


def test_runs_in_float64():
    assert jax.config.jax_enable_x64
    assert ctmodels.default_tolerances("implicit_ode") == (1e-6, 1e-8)


# -- ode ------------------------------------------------------------------------------


@pytest.mark.parametrize("name", NONSTIFF)
def test_ode_entry_by_name_with_defaults(name):
    check_ode_entry(name, F64)


@pytest.mark.parametrize("name", STIFF)
def test_stiff_entry_by_name_in_few_steps(name):
    """y' = -1000 (y - cos t), y(0) = 0 on [0, 5] by name with the float64 defaults
    (rtol 1e-6, atol 1e-8)."""
    rtol, _ = ctmodels.default_tolerances("implicit_ode", F64)
    given = {}
    if solvers.entry(name).tags["order"] == 1:
        # implicit_euler: a first-order stepper's steps grow like rtol^(-1/2), so at
        # 1e-6 it needs ~1e4 steps (measured: max_steps 4096) here, as any
        # first-order method would; few steps and a first-order method exclude each
        # other at 1e-6, so it runs at 1e-4 (616 steps, error 2.7e-5)
        rtol = 1e-4
        given = {"rtol": rtol, "atol": 1e-6}
    ts, sol, exact = solve_stiff(name, F64, **given)
    err = np.abs(np.asarray(sol.value) - exact)
    # t = 5 ends the last step (no interpolation): the global error of a stiff solve
    # at local tolerance rtol is about rtol, since the stiff decay (e^{-1000 h} per
    # step) damps earlier steps' errors instead of adding them up (measured <= 0.3
    # rtol over the entries; <= 4.7 rtol at every t with the ts as step ends)
    assert err[-1] <= 10 * rtol, err
    # between step ends the values come from each stepper's dense output. The
    # Kvaerno steppers' is Diffrax's third-order Hermite interpolant, whose end
    # slopes are f(y) = -1000 (y - cos t): an error e ~ rtol in y becomes 1000 e in
    # the slope, and across a step of h ~ 0.5 the interpolant errs by up to
    # ~ 1000 e h / 4 ~ 125 rtol (kvaerno4: 1.07e-4 at rtol 1e-6 by name, 1.09e-4 as
    # diffrax.Kvaerno4() with PIDController(1e-6, 1e-8); kvaerno5 17 rtol; the
    # KenCarp, Sil3 and implicit Euler interpolants <= 5.1 rtol)
    np.testing.assert_allclose(sol.value, exact, rtol=0, atol=300 * rtol)
    # few steps: as the order and the tolerance predict, and at most half of what an
    # explicit stepper needs for stability (sil3, order 2: 509 steps)
    steps = int(sol.stats["num_steps"])
    assert steps < min(EXPLICIT_STEPS / 2, stiff_step_bound(name, rtol)), sol.stats


# -- controller, adjoint --------------------------------------------------------------


@pytest.mark.parametrize("name", solvers.names("controller"))
def test_controller_entry_by_name(name):
    check_controller_entry(name, F64)


@pytest.mark.parametrize("name", ADJOINT)
def test_adjoint_entry_by_name(name):
    check_adjoint_entry(name, F64)


def test_implicit_adjoint_by_name():
    check_implicit_adjoint(F64)


# -- fixed_point, root, linear --------------------------------------------------------


@pytest.mark.parametrize("name", FP)
def test_fixed_point_entry_by_name_with_defaults(name):
    check_fixed_point_entry(name, F64)


@pytest.mark.parametrize("name", ROOT)
def test_root_entry_by_name_with_defaults(name):
    check_root_entry(name, F64)


def test_newton_cube_roots():
    check_newton_cube_roots(F64)


@pytest.mark.parametrize("name", LINEAR)
def test_linear_entry_in_implicit_backward(name):
    check_linear_entry_in_implicit_backward(name, F64)


# -- no false success ----------------------------------------------------------------


@pytest.mark.parametrize("name", FP)
def test_no_fixed_point_is_never_a_success(name):
    check_no_fixed_point(name, F64)


@pytest.mark.parametrize("name", ROOT)
def test_no_root_is_never_a_success(name):
    check_no_root(name, F64)


@pytest.mark.parametrize("method, name", NO_EQUILIBRIUM)
def test_no_equilibrium_is_never_a_success(method, name):
    check_no_equilibrium(method, name, F64)
