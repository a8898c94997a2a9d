"""Every registry entry by name, with its default tolerances, in float32 (JAX's
default: this module does not switch x64 on), each on a tiny problem of its kind
against a closed form:

- `ode`: y' = -y (non-stiff entries), y' = -1000 (y - cos t) (stiff entries, in few
  steps, as `diffrax.Kvaerno5()` with `PIDController(1e-3, 1e-6)` does);
- `controller`, `adjoint`: y' = -a y, its value and d y(1) / d a;
- `fixed_point`: z = tanh(W z + x) (a DEQ cell), `root`: a - y^3 = 0;
- `linear`: the implicit backward solve of that fixed point, against the closed-form
  gradient.

Plus the issue's cases (stiff by name, Newton on cube roots, a float32 DEQ with a
0.9-contraction) and no false success on problems without a solution, per solver.
A registered entry is covered automatically.

The same checks in float64 (the float64 defaults by name) are in
`test_float64_entries.py`, which imports the problems and the `check_*` functions
from here and runs them with `X64 = True` for its whole module: JAX's caches do not
survive switching x64 inside one module (a KenCarp5 / Sil3 interpolation traced in
one precision then fails to lower in the other), so each module keeps one precision.
"""

import diffrax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ctmodels
from ctmodels import RESULTS, solvers

ODE = solvers.names("ode")
STIFF = [n for n in ODE if solvers.entry(n).tags.get("stiff")]
NONSTIFF = [n for n in ODE if n not in STIFF]
FIXED = [n for n in ODE if not solvers.entry(n).tags.get("adaptive", True)]
FP = solvers.names("fixed_point")
ROOT = solvers.names("root")
LINEAR = solvers.names("linear")
ADJOINT = [n for n in solvers.names("adjoint") if n != "implicit"]
NO_EQUILIBRIUM = [("integrate", "tsit5"), ("integrate", "kvaerno5")] + [
    ("root", n) for n in ROOT
]


@pytest.fixture(autouse=True, scope="module")
def _fresh_caches():
    """JAX's caches keep functions traced under the other x64 setting (Diffrax's
    KenCarp interpolation, traced in float64 by an earlier module, then fails to
    lower in float32): start this module, and leave it, with empty caches (the
    float64 module does the same)."""
    jax.clear_caches()
    yield
    jax.clear_caches()


def _ok(sol) -> bool:
    return bool(np.all(np.asarray(sol.result == RESULTS.successful)))


def _decay(t, y, a):
    return -a * y


def _stiff(t, y, args):
    return -1000.0 * (y - jnp.cos(t))


def _stiff_exact(t):
    # y(0) = 0: y = (k^2 cos t + k sin t - k^2 e^{-k t}) / (k^2 + 1), k = 1000
    k = 1000.0
    return (k**2 * np.cos(t) + k * np.sin(t) - k**2 * np.exp(-k * t)) / (k**2 + 1)


def stiff_step_bound(name, rtol):
    """Steps a stiff solve of `_stiff` at local tolerance `rtol` may take: an order-p
    stepper's local error is ~ h^(p+1), so its steps (in the transient and on the
    slow cos t alike) grow like rtol^(-1/(p+1)). Measured steps / rtol^(-1/(p+1))
    on this problem is 4.4-6.6 in float32 at rtol 1e-3 and 5.0-10.9 in float64 at
    1e-6 over every stiff entry (e.g. kvaerno5: 14 and 88 steps, sil3 (p = 2): 66
    and 509); 20 leaves about a factor 2."""
    order = solvers.entry(name).tags["order"]
    return 20 * rtol ** (-1 / (order + 1))


# An explicit stepper needs ~2000 steps on `_stiff` (stability, h < 2.8e-3 on [0, 5])
# at any tolerance: "few steps" is well below that.
EXPLICIT_STEPS = 2000


# -- ode ------------------------------------------------------------------------------


def check_ode_entry(name, dtype):
    rtol, atol = ctmodels.default_tolerances("ode", dtype)
    ts = jnp.array([0.0, 1.0, 2.0])
    y0 = jnp.array([1.0, 2.0])
    dt0 = 0.01 if name in FIXED else None
    sol = ctmodels.integrate(_decay, y0, ts, 1.0, solver=name, dt0=dt0)
    assert sol.value.dtype == jnp.dtype(dtype)
    exact = np.exp(-np.asarray(ts))[:, None] * np.array([1.0, 2.0])
    # fixed steps of 0.01: first order (euler) errs by ~t h / 2 e^{-t}; an
    # adaptive first-order stepper's global error is ~30x its local tolerance
    first_order = solvers.entry(name).tags.get("order") == 1
    tol = 5e-3 if name in FIXED else min(30 * rtol * (30 if first_order else 1), 0.05)
    np.testing.assert_allclose(sol.value, exact, rtol=0, atol=tol)
    assert sol.value is sol.ys
    assert int(sol.stats["num_steps"]) > 0 and sol.stats["max_steps"] == 4096


@pytest.mark.parametrize("name", NONSTIFF)
def test_ode_entry_by_name_with_defaults(name):
    check_ode_entry(name, "float32")


def solve_stiff(name, dtype, **given):
    """y' = -1000 (y - cos t), y(0) = 0 on [0, 5] by name, with the defaults unless
    `given` (rtol, atol); returns the times, the solve and the exact values."""
    ts = jnp.linspace(0.0, 5.0, 6)
    sol = ctmodels.integrate(_stiff, jnp.array(0.0), ts, solver=name, **given)
    assert sol.value.dtype == jnp.dtype(dtype)
    return ts, sol, _stiff_exact(np.asarray(ts))


@pytest.mark.parametrize("name", STIFF)
def test_stiff_entry_by_name_in_few_steps(name):
    """The issue's case: y' = -1000 (y - cos t) on [0, 5] by name with defaults. In
    float32 `solver="kvaerno5"` used to fail with max_steps while `diffrax.Kvaerno5()`
    with `PIDController(1e-3, 1e-6)` took 14 steps."""
    rtol, _ = ctmodels.default_tolerances("implicit_ode", "float32")
    _, sol, exact = solve_stiff(name, "float32")
    # the global error of a solve at local tolerance rtol (kvaerno4 in float32:
    # 0.055 at rtol 1e-3 in 19 steps)
    np.testing.assert_allclose(sol.value, exact, rtol=0, atol=100 * rtol)
    steps = int(sol.stats["num_steps"])
    assert steps < min(400, stiff_step_bound(name, rtol)), sol.stats


def test_stiff_name_and_value_agree_float32():
    ts = jnp.linspace(0.0, 5.0, 6)
    by_name = ctmodels.integrate(_stiff, jnp.array(0.0), ts, solver="kvaerno5")
    by_value = ctmodels.integrate(
        _stiff, jnp.array(0.0), ts, solver=diffrax.Kvaerno5(),
        controller=diffrax.PIDController(rtol=1e-3, atol=1e-6),
    )  # fmt: skip
    # the name's stepper solves its stages with the registry's Newton, the value's
    # with Diffrax's default chord method: the two agree to the solve's tolerance, not
    # to roundoff (0.0066 apart at t = 4 when XLA compiles without LLVM's
    # optimisations, 1e-3 with them), and both are as close to the exact solution
    rtol, _ = ctmodels.default_tolerances("implicit_ode", "float32")
    exact = _stiff_exact(np.asarray(ts))
    for sol in (by_name, by_value):
        np.testing.assert_allclose(sol.value, exact, rtol=0, atol=100 * rtol)
    np.testing.assert_allclose(by_name.value, by_value.value, rtol=0, atol=10 * rtol)
    n_name, n_value = int(by_name.stats["num_steps"]), int(by_value.stats["num_steps"])
    assert n_name <= 2 * n_value and n_value <= 30, (n_name, n_value)


# -- controller, adjoint --------------------------------------------------------------
# In float32 these run with `-m slow`: they reuse the steppers and fixed-point solvers
# checked here, and each costs a gradient compile.


def check_controller_entry(name, dtype):
    rtol, _ = ctmodels.default_tolerances("ode", dtype)
    dt0 = 0.05 if name == "constant" else None
    ts = jnp.array([0.0, 1.0])
    sol = ctmodels.integrate(_decay, jnp.array(1.0), ts, 1.0, controller=name, dt0=dt0)
    assert sol.value.dtype == jnp.dtype(dtype)
    np.testing.assert_allclose(sol.value[-1], np.exp(-1.0), atol=30 * rtol)


@pytest.mark.slow
@pytest.mark.parametrize("name", solvers.names("controller"))
def test_controller_entry_by_name(name):
    check_controller_entry(name, "float32")


def check_adjoint_entry(name, dtype):
    rtol, _ = ctmodels.default_tolerances("ode", dtype)
    ts = jnp.array([0.0, 1.0])

    def y1(a):
        sol = ctmodels.integrate(_decay, jnp.array(1.0), ts, a, adjoint=name)
        return sol.ys[-1]

    a = jnp.array(0.5)
    diff = jax.jacfwd if name == "forward" else jax.grad
    grad = diff(y1)(a)
    assert grad.dtype == jnp.dtype(dtype)
    np.testing.assert_allclose(grad, -np.exp(-0.5), atol=30 * rtol)


@pytest.mark.slow
@pytest.mark.parametrize("name", ADJOINT)
def test_adjoint_entry_by_name(name):
    check_adjoint_entry(name, "float32")


def check_implicit_adjoint(dtype):
    rtol, _ = ctmodels.default_tolerances("nonlinear", dtype)

    def ystar(a):
        sol = ctmodels.steady_state(_cubic, jnp.ones(2), a, adjoint="implicit")
        return jnp.sum(sol.value)

    a = jnp.array([2.0, 3.0])
    grad = jax.grad(ystar)(a)
    assert grad.dtype == jnp.dtype(dtype)
    np.testing.assert_allclose(grad, 1 / (3 * np.array([2.0, 3.0]) ** (2 / 3)),
                               rtol=100 * rtol)  # fmt: skip


@pytest.mark.slow
def test_implicit_adjoint_by_name():
    check_implicit_adjoint("float32")


# -- fixed_point, root, linear --------------------------------------------------------


def _deq(z, args):
    w, x = args
    return jnp.tanh(w @ z + x)


def _deq_args(norm, n=8, seed=0):
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((n, n))
    w *= norm / np.linalg.norm(w, 2)
    return w, rng.standard_normal(n)


def _deq_oracle(w, x):
    z = np.zeros(len(x))
    for _ in range(2000):
        z = np.tanh(w @ z + x)
    return z


W5, X5 = _deq_args(0.5)
Z5 = _deq_oracle(W5, X5)


def check_fixed_point_entry(name, dtype):
    rtol, _ = ctmodels.default_tolerances("nonlinear", dtype)
    args = (jnp.asarray(W5), jnp.asarray(X5))
    sol = ctmodels.fixed_point(_deq, jnp.zeros(8), args, solver=name)
    assert sol.value.dtype == jnp.dtype(dtype)
    np.testing.assert_allclose(sol.value, Z5, rtol=0, atol=20 * rtol)
    assert int(sol.stats["num_fn_evals"]) == int(sol.stats["num_steps"]) + 2


@pytest.mark.parametrize("name", FP)
def test_fixed_point_entry_by_name_with_defaults(name):
    check_fixed_point_entry(name, "float32")


def _cubic(t, y, a):
    return a - y**3


def _cube(y, a):
    return a - y**3


def check_root_entry(name, dtype):
    # -3 a^(2/3) in (-1.7, -1): Anderson's y <- y + g(y) contracts, chord converges
    rtol, _ = ctmodels.default_tolerances("nonlinear", dtype)
    a = np.array([0.2, 0.3])
    sol = ctmodels.root_find(_cube, jnp.full(2, 0.7), jnp.asarray(a), solver=name)
    assert sol.value.dtype == jnp.dtype(dtype)
    np.testing.assert_allclose(sol.value, a ** (1 / 3), rtol=20 * rtol)


@pytest.mark.parametrize("name", ROOT)
def test_root_entry_by_name_with_defaults(name):
    check_root_entry(name, "float32")


def check_newton_cube_roots(dtype):
    """The issue's case: Newton stopped at float32 precision ("stagnation") on
    a - y^3, a = [2, 3], from ones, through root_find and steady_state."""
    rtol, _ = ctmodels.default_tolerances("nonlinear", dtype)
    exact = np.array([2.0, 3.0]) ** (1 / 3)
    a = jnp.array([2.0, 3.0])
    sol = ctmodels.root_find(_cube, jnp.ones(2), a)
    assert sol.value.dtype == jnp.dtype(dtype)
    np.testing.assert_allclose(sol.value, exact, rtol=10 * rtol)
    sol = ctmodels.steady_state(_cubic, jnp.ones(2), a)
    np.testing.assert_allclose(sol.value, exact, rtol=10 * rtol)


def test_newton_cube_roots():
    check_newton_cube_roots("float32")


def test_deq_float32_with_a_09_contraction():
    """The issue's case: a DEQ cell with a 0.9-contraction, defaults, float32, 32
    units; value and the implicit gradient against the closed forms."""
    w, x = _deq_args(0.9, n=32, seed=3)
    z = _deq_oracle(w, x)

    def loss(x):
        sol = ctmodels.fixed_point(_deq, jnp.zeros(32), (jnp.asarray(w), x))
        return jnp.sum(sol.value), sol

    (_, sol), grad = jax.value_and_grad(loss, has_aux=True)(jnp.asarray(x))
    assert _ok(sol) and sol.value.dtype == jnp.float32
    assert int(sol.stats["num_steps"]) < 64
    np.testing.assert_allclose(sol.value, z, atol=2e-4)
    # d sum(z*) / dx = D (I - W^T D)^-1 1, D = diag(1 - z*^2)
    d = 1 - z**2
    exact = d * np.linalg.solve(np.eye(32) - w.T * d[None, :], np.ones(32))
    np.testing.assert_allclose(grad, exact, rtol=0, atol=2e-3 * np.max(np.abs(exact)))


def check_linear_entry_in_implicit_backward(name, dtype):
    w, x = W5, X5
    d = 1 - Z5**2
    exact = d * np.linalg.solve(np.eye(8) - w.T * d[None, :], np.ones(8))
    adjoint = solvers.get("implicit", linear_solver=name)

    def loss(x):
        args = (jnp.asarray(w), x)
        return jnp.sum(ctmodels.fixed_point(_deq, jnp.zeros(8), args,
                                            adjoint=adjoint).value)  # fmt: skip

    grad = jax.grad(loss)(jnp.asarray(x))
    assert grad.dtype == jnp.dtype(dtype)
    # |exact| ~ 1: the forward solve's error (20 rtol, above) through (I - W^T D)^-1
    # (norm <= 2 for a 0.5-contraction) and the linear solve's own tolerance
    rtol, _ = ctmodels.default_tolerances("nonlinear", dtype)
    np.testing.assert_allclose(grad, exact, rtol=0, atol=100 * rtol)


@pytest.mark.slow
@pytest.mark.parametrize("name", LINEAR)
def test_linear_entry_in_implicit_backward(name):
    check_linear_entry_in_implicit_backward(name, "float32")


# -- no false success ----------------------------------------------------------------


def _shift(z, args):
    return z + 1.0


def check_no_fixed_point(name, dtype):
    """z -> z + 1 has no fixed point. In float32 Anderson used to report success
    after 3 steps at z ~ -8e6 (where z + 1 == z to roundoff)."""
    z0 = jax.random.normal(jax.random.PRNGKey(0), (4,))
    sol = ctmodels.fixed_point(_shift, z0, None, solver=name, throw=False)
    assert sol.value.dtype == jnp.dtype(dtype)
    assert not _ok(sol), (sol.value, sol.stats["num_steps"])


@pytest.mark.parametrize("name", FP)
def test_no_fixed_point_is_never_a_success(name):
    check_no_fixed_point(name, "float32")


def _exp(y, args):
    return jnp.exp(y)


def check_no_root(name, dtype):
    """exp(y) = 0 has no root; exp(y) <= atol at y ~ -18 is not one."""
    sol = ctmodels.root_find(_exp, jnp.zeros(2), None, solver=name, throw=False)
    assert sol.value.dtype == jnp.dtype(dtype)
    assert not _ok(sol), (sol.value, sol.stats["num_steps"])


@pytest.mark.parametrize("name", ROOT)
def test_no_root_is_never_a_success(name):
    check_no_root(name, "float32")


def _constant_field(t, y, args):
    return jnp.ones_like(y)


def check_no_equilibrium(method, name, dtype):
    """dy/dt = 1 has no equilibrium; integrating it used to stop at |y| ~ 1e6 with
    success (|f| = 1 <= rtol |y|)."""
    sol = ctmodels.steady_state(
        _constant_field, jnp.zeros(1), None, method=method, solver=name,
        throw=False,
    )  # fmt: skip
    assert sol.value.dtype == jnp.dtype(dtype)
    assert not _ok(sol), (sol.value, sol.stats["num_steps"])


@pytest.mark.parametrize("method, name", NO_EQUILIBRIUM)
def test_no_equilibrium_is_never_a_success(method, name):
    check_no_equilibrium(method, name, "float32")
