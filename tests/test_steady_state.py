"""`ctmodels.steady_state` against closed forms: method="root" (every registry entry of
kind `root`) and method="integrate" agree on the equilibrium and on its implicit
gradient; every linear solver in the implicit backward; a stiff equilibrium with
kvaerno5; readable failures; jit / vmap."""

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ctmodels
from ctmodels import RESULTS, SolverError, solvers
from ctmodels._errors import discard_failed_callbacks

jax.config.update("jax_enable_x64", True)
X64 = True  # for the whole module (tests/conftest.py)

ROOT = solvers.names("root")
LINEAR = solvers.names("linear")
ODE = solvers.names("ode")

RTOL, ATOL = 1e-10, 1e-12


def _ok(sol) -> bool:
    return bool(np.all(np.asarray(sol.result == RESULTS.successful)))


# -- dy/dt = a - y^3: y* = a^(1/3), dy*/da = 1 / (3 a^(2/3)) (elementwise) -------------
# The Jacobian at y* is -3 a^(2/3) in (-1.7, -1), so Anderson's y <- y + f(y) contracts
# and chord from y0 = 0.7 converges.


def cubic(t, y, a):
    return a - y**3


A = jnp.array([0.2, 0.3, 0.4])
Y0 = jnp.full(3, 0.7)
EXACT = np.asarray(A) ** (1 / 3)
DEXACT = 1 / (3 * np.asarray(A) ** (2 / 3))


def _cubic_loss(a, method, solver, adjoint):
    sol = ctmodels.steady_state(
        cubic,
        Y0,
        a,
        method=method,
        solver=solver,
        adjoint=adjoint,
        rtol=RTOL,
        atol=ATOL,
    )
    return jnp.sum(sol.value), (sol.value, sol.result, sol.stats)


# value and gradient in one compilation; the solution rides along as aux
_cubic_vg = jax.jit(
    jax.value_and_grad(_cubic_loss, has_aux=True), static_argnums=(1, 2, 3)
)


def test_default_root_method_eager():
    sol = ctmodels.steady_state(cubic, Y0, A, rtol=RTOL, atol=ATOL)
    assert _ok(sol)
    np.testing.assert_allclose(sol.value, EXACT, rtol=0, atol=1e-10)
    assert float(sol.stats["residual"]) <= 1e-10
    assert 0 < int(sol.stats["num_steps"]) < 256


@pytest.mark.parametrize("solver", ROOT)
def test_root_method_matches_closed_form(solver):
    _, (value, result, stats), grad = _flatten(_cubic_vg(A, "root", solver, "implicit"))
    assert bool(result == RESULTS.successful)
    np.testing.assert_allclose(value, EXACT, rtol=0, atol=1e-10)
    np.testing.assert_allclose(grad, DEXACT, rtol=1e-8)
    assert float(stats["residual"]) <= 1e-10


def _flatten(out):
    (loss, aux), grad = out
    return loss, aux, grad


def test_integrate_method_matches_closed_form():
    _, (value, result, stats), grad = _flatten(
        _cubic_vg(A, "integrate", None, "implicit")
    )
    assert bool(result == RESULTS.successful)
    # stopped at |f(y)| <= atol + rtol |y|; |y - y*| <= that / min|f'(y*)| ~ 1e-10
    np.testing.assert_allclose(value, EXACT, rtol=0, atol=2e-10)
    np.testing.assert_allclose(grad, DEXACT, rtol=1e-8)
    assert float(stats["residual"]) <= ATOL + RTOL * float(jnp.max(value))
    t_final = float(stats["t_final"])
    # From 0.7 the slowest component (rate 1.03) needs t ~ log(0.1 / 1e-10) ~ 20.
    assert 5 < t_final < 100 and np.isfinite(t_final)


def test_root_and_integrate_agree():
    lr, (vr, _, _), gr = _flatten(_cubic_vg(A, "root", "newton", "implicit"))
    li, (vi, _, _), gi = _flatten(_cubic_vg(A, "integrate", None, "implicit"))
    np.testing.assert_allclose(vi, vr, rtol=0, atol=2e-10)
    np.testing.assert_allclose(gi, gr, rtol=1e-8)
    np.testing.assert_allclose(li, lr, rtol=0, atol=6e-10)


@pytest.mark.slow
@pytest.mark.parametrize("method, solver", [("root", "newton"), ("integrate", "tsit5")])
def test_checkpoint_adjoint_roughly_agrees(method, solver):
    """Backprop through the iterations / integration steps: the derivative of the
    final state tends to the implicit one as the solve converges."""
    _, (value, result, _), grad = _flatten(_cubic_vg(A, method, solver, "checkpoint"))
    assert bool(result == RESULTS.successful)
    np.testing.assert_allclose(value, EXACT, rtol=0, atol=2e-10)
    np.testing.assert_allclose(grad, DEXACT, rtol=1e-6)


# -- dy/dt = M y + b (M stable): y* = -M^-1 b; for L = w.y*: dL/db = lam = -M^-T w,
#    dL/dM = lam y*^T ------------------------------------------------------------------


def linear_field(t, y, args):
    m, b = args
    return m @ y + b


def _linear_problem():
    rng = np.random.default_rng(3)
    q, _ = np.linalg.qr(rng.standard_normal((3, 3)))
    sym = q @ np.diag([0.4, 0.6, 0.9]) @ q.T
    skew = rng.standard_normal((3, 3))
    skew = 0.15 * (skew - skew.T)
    m = -(sym + skew)  # eigenvalues: real parts in [-0.9, -0.4]
    b = rng.standard_normal(3)
    w = rng.standard_normal(3)
    return m, b, w


M, B, W = _linear_problem()
LIN_ARGS = (jnp.asarray(M), jnp.asarray(B))
Y_LIN = -np.linalg.solve(M, B)
LAM = -np.linalg.solve(M.T, W)


def _linear_loss(args, method, solver, adjoint):
    sol = ctmodels.steady_state(
        linear_field, jnp.zeros(3), args, method=method, solver=solver, adjoint=adjoint,
        rtol=RTOL, atol=ATOL,
    )  # fmt: skip
    return jnp.dot(jnp.asarray(W), sol.value), (sol.value, sol.result, sol.stats)


_linear_vg = jax.jit(
    jax.value_and_grad(_linear_loss, has_aux=True), static_argnums=(1, 2, 3)
)


@pytest.mark.parametrize(
    "method, linear_solver",
    [("root", "auto")] + [("integrate", name) for name in LINEAR],
)
def test_linear_system_every_linear_solver(method, linear_solver):
    adjoint = solvers.get("implicit", linear_solver=linear_solver)
    _, (value, result, _), (gm, gb) = _flatten(
        _linear_vg(LIN_ARGS, method, None, adjoint)
    )
    assert bool(result == RESULTS.successful)
    scale = np.max(np.abs(Y_LIN))
    np.testing.assert_allclose(value, Y_LIN, rtol=0, atol=1e-9 * scale)
    # Iterative linear solvers are built with rtol = atol = 1e-6 by default.
    np.testing.assert_allclose(gb, LAM, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(gm, np.outer(LAM, Y_LIN), rtol=1e-5, atol=1e-6)


# -- stiff: dy1/dt = -1e4 (y1 - sin y2), dy2/dt = a - y2: y* = (sin a, a) -------------


def stiff_field(t, y, a):
    return jnp.stack([-1e4 * (y[0] - jnp.sin(y[1])), a - y[1]])


def _stiff_loss(a, method, solver):
    sol = ctmodels.steady_state(
        stiff_field,
        jnp.zeros(2),
        a,
        method=method,
        solver=solver,
        rtol=1e-8,
        atol=1e-10,
    )
    return jnp.sum(sol.value), (sol.value, sol.result, sol.stats)


_stiff_vg = jax.jit(
    jax.value_and_grad(_stiff_loss, has_aux=True), static_argnums=(1, 2)
)


@pytest.mark.slow
def test_stiff_steady_state_kvaerno5():
    a = 0.7
    exact = np.array([np.sin(a), a])
    _, (value, result, stats), grad = _flatten(
        _stiff_vg(jnp.array(a), "integrate", "kvaerno5")
    )
    assert bool(result == RESULTS.successful)
    # |y - y*| <= (atol + rtol |y|) / |slowest eigenvalue| ~ 1e-8
    np.testing.assert_allclose(value, exact, rtol=0, atol=1e-7)
    np.testing.assert_allclose(grad, np.cos(a) + 1, rtol=1e-6)
    assert int(stats["num_steps"]) < 16384
    # and the root method agrees
    _, (value_r, _, _), grad_r = _flatten(_stiff_vg(jnp.array(a), "root", "newton"))
    np.testing.assert_allclose(value_r, exact, rtol=0, atol=1e-12)
    np.testing.assert_allclose(grad_r, np.cos(a) + 1, rtol=1e-10)


# -- errors ---------------------------------------------------------------------------


def test_bogus_method():
    with pytest.raises(ValueError, match="method must be 'root' or 'integrate'"):
        ctmodels.steady_state(cubic, Y0, A, method="bogus")


def test_unknown_and_wrong_kind_solver_names():
    with pytest.raises(ValueError, match="Did you mean 'tsit5'"):
        ctmodels.steady_state(cubic, Y0, A, method="integrate", solver="tsit")
    with pytest.raises(ValueError, match="Did you mean 'kvaerno5'"):
        ctmodels.steady_state(cubic, Y0, A, method="integrate", solver="kvearno5")
    with pytest.raises(ValueError, match="Did you mean 'anderson'"):
        ctmodels.steady_state(cubic, Y0, A, method="root", solver="andersen")
    with pytest.raises(ValueError, match="not an ode solver"):
        ctmodels.steady_state(cubic, Y0, A, method="integrate", solver="newton")
    with pytest.raises(ValueError, match="not a root solver"):
        ctmodels.steady_state(cubic, Y0, A, method="root", solver="tsit5")
    with pytest.raises(ValueError, match="same structure"):
        ctmodels.steady_state(lambda t, y, a: y[:2], Y0, A, method="root")


def _suggested_solvers(msg):
    return re.findall(r"solver='(\w+)'", msg)


def test_integrate_max_steps_error_suggests_ode_solvers():
    kw = dict(method="integrate", solver="tsit5", rtol=RTOL, atol=ATOL, max_steps=5)
    sol = ctmodels.steady_state(cubic, Y0, A, throw=False, **kw)
    assert bool(sol.result == RESULTS.max_steps_reached)
    assert int(sol.stats["num_steps"]) == 5
    with pytest.raises(SolverError) as info:
        ctmodels.steady_state(cubic, Y0, A, **kw)
    err, msg = info.value, str(info.value)
    assert err.solver == "tsit5" and err.entry == "steady_state"
    assert bool(err.result == RESULTS.max_steps_reached)
    assert "ctmodels.steady_state with solver 'tsit5'" in msg
    assert "maximum number of steps" in msg and "max_steps (now 5)" in msg
    # The hint must be usable with method="integrate": every suggested solver=... is
    # an ODE solver (a root finder such as 'anderson' would be rejected).
    suggested = _suggested_solvers(msg)
    assert suggested, msg
    assert all(name in ODE for name in suggested), msg


def test_root_max_steps_error():
    kw = dict(method="root", solver="chord", rtol=RTOL, atol=ATOL, max_steps=3)
    sol = ctmodels.steady_state(cubic, Y0, A, throw=False, **kw)
    assert bool(sol.result == RESULTS.max_steps_reached)
    with pytest.raises(SolverError) as info:
        ctmodels.steady_state(cubic, Y0, A, **kw)
    msg = str(info.value)
    assert "solver 'chord'" in msg and "after 3 iterations" in msg
    assert "max_steps (now 3)" in msg
    suggested = set(_suggested_solvers(msg)) - {"chord"}
    assert suggested and suggested <= set(ROOT), msg


def test_jit_throw_raises_explanation():
    @jax.jit
    def solve(a):
        return ctmodels.steady_state(
            cubic, Y0, a, method="integrate", solver="tsit5", rtol=RTOL, atol=ATOL,
            max_steps=5,
        ).value  # fmt: skip

    with pytest.raises(Exception, match="maximum number of steps") as info:
        jax.block_until_ready(solve(A))
    discard_failed_callbacks()  # handled here; a GPU would raise it again later
    msg = str(info.value)
    assert (
        "ctmodels.steady_state with solver 'tsit5'" in msg
        and "max_steps (now 5)" in msg
    )
    assert all(name in ODE for name in _suggested_solvers(msg)), msg


# -- jit / vmap / grad -----------------------------------------------------------------


@functools.partial(jax.jit, static_argnums=1)
def _batched_cubic(a_batch, method):
    vg = jax.value_and_grad(_cubic_loss, has_aux=True)
    solver = "newton" if method == "root" else None
    return jax.vmap(lambda a: vg(a, method, solver, "implicit"))(a_batch)


@pytest.mark.parametrize("method", ["root", "integrate"])
def test_jit_vmap_grad(method):
    a_batch = jnp.array([[0.2, 0.3, 0.4], [0.5, 1.0, 2.0]])
    (loss, (value, result, stats)), grad = _batched_cubic(a_batch, method)
    assert value.shape == (2, 3) and grad.shape == (2, 3)
    assert bool(jnp.all(result == RESULTS.successful))
    a_np = np.asarray(a_batch)
    np.testing.assert_allclose(value, a_np ** (1 / 3), rtol=0, atol=1e-9)
    np.testing.assert_allclose(grad, 1 / (3 * a_np ** (2 / 3)), rtol=1e-8)
    # The first row is the unbatched problem.
    solver = "newton" if method == "root" else None
    _, (v0, _, _), g0 = _flatten(_cubic_vg(A, method, solver, "implicit"))
    np.testing.assert_allclose(value[0], v0, rtol=0, atol=1e-12)
    np.testing.assert_allclose(grad[0], g0, rtol=1e-10)


# -- no false success ---------------------------------------------------------------


def _drift(t, y, args):
    return jnp.ones_like(y)


def test_no_equilibrium_is_never_a_success():
    """dy/dt = 1 has no equilibrium. Integrating it used to stop with success where
    |f| = 1 <= atol + rtol |y| (|y| ~ 1e6); now that is RESULTS.no_solution. (Every
    root and ode solver on it, in float32: tests/test_float32.py.)"""
    kw = dict(method="integrate")
    sol = ctmodels.steady_state(_drift, jnp.zeros(2), None, throw=False, **kw)
    assert bool(sol.result == RESULTS.no_solution), (sol.value, sol.result)
    assert {"num_steps", "num_fn_evals", "max_steps"} <= set(sol.stats)
    with pytest.raises(SolverError, match="flat"):
        ctmodels.steady_state(_drift, jnp.zeros(2), None, **kw)
