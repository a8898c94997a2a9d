"""Tests of the Anderson and Broyden root finders against oracles: plain iteration,
SciPy, finite differences and gradients of the unrolled iteration."""

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.tree_util as jtu
import numpy as np
import optimistix as optx
import pytest
import scipy.optimize

from ctmodels.solvers._anderson import Anderson
from ctmodels.solvers._broyden import Broyden


@pytest.fixture(autouse=True, scope="module")
def _float64():
    """Run this module in float64, and restore the previous setting afterwards."""
    previous = jax.config.jax_enable_x64
    jax.config.update("jax_enable_x64", True)
    yield
    jax.config.update("jax_enable_x64", previous)


TOL = 1e-10
N = 64
MAX_STEPS = 5000  # one value throughout, so that compiled solves are reused

SOLVERS = {
    "anderson": Anderson(rtol=TOL, atol=TOL),
    "broyden": Broyden(rtol=TOL, atol=TOL),
}
ITERATION = optx.FixedPointIteration(rtol=TOL, atol=TOL)
solver_params = pytest.mark.parametrize("name", list(SOLVERS))


def _tanh_map(z, args):
    W, c = args
    return jnp.tanh(W @ z + c)


@eqx.filter_jit
def _solve_tanh(solver, z0, W, c, max_steps):
    sol = optx.fixed_point(
        _tanh_map, solver, z0, (W, c), max_steps=max_steps, throw=False
    )
    return sol.value, sol.stats["num_steps"], sol.result


@jax.jit
def _plain_iterations(z0, W, c):
    """Oracle: 1000 steps of plain fixed-point iteration."""
    return jax.lax.fori_loop(0, 1000, lambda _, z: _tanh_map(z, (W, c)), z0)


def _easy_problem():
    rng = np.random.default_rng(0)
    A = rng.standard_normal((N, N))
    W = A / np.linalg.norm(A, 2) * 0.9
    U = rng.standard_normal((N, N)) / np.sqrt(N)
    c = U @ rng.standard_normal(N) + rng.standard_normal(N)
    return jnp.asarray(W), jnp.asarray(c)


def _hard_problem():
    rng = np.random.default_rng(1)
    A = rng.standard_normal((N, N))
    A = (A + A.T) / 2
    W = A / np.max(np.abs(np.linalg.eigvalsh(A))) * 0.99
    U = rng.standard_normal((N, N)) / np.sqrt(N)
    c = 0.01 * (U @ rng.standard_normal(N) + rng.standard_normal(N))
    return jnp.asarray(W), jnp.asarray(c)


def _residual(z, W, c):
    return float(jnp.max(jnp.abs(_tanh_map(z, (W, c)) - z)))


def _all_finite(tree):
    leaves = [x for x in jtu.tree_leaves(tree) if eqx.is_inexact_array(x)]
    return all(bool(jnp.all(jnp.isfinite(x))) for x in leaves)


# (a) z = tanh(W z + U x + b), |W|_2 = 0.9.
@solver_params
def test_easy_deq_matches_iteration(name):
    W, c = _easy_problem()
    z0 = jnp.zeros(N)
    z_ref = _plain_iterations(z0, W, c)
    assert _residual(z_ref, W, c) < 1e-14
    _, steps_iter, res_iter = _solve_tanh(ITERATION, z0, W, c, MAX_STEPS)
    assert res_iter == optx.RESULTS.successful
    z, steps, result = _solve_tanh(SOLVERS[name], z0, W, c, MAX_STEPS)
    assert result == optx.RESULTS.successful
    assert _residual(z, W, c) < 10 * TOL
    np.testing.assert_allclose(z, z_ref, rtol=0, atol=1e-8)
    assert int(steps) <= int(steps_iter)


# (b) symmetric W with spectral radius 0.99 and small inputs: nearly linear and slow.
@solver_params
def test_hard_deq_needs_third_of_iterations(name):
    W, c = _hard_problem()
    z0 = jnp.zeros(N)
    z_iter, steps_iter, res_iter = _solve_tanh(ITERATION, z0, W, c, MAX_STEPS)
    assert res_iter == optx.RESULTS.successful
    z, steps, result = _solve_tanh(SOLVERS[name], z0, W, c, MAX_STEPS)
    assert result == optx.RESULTS.successful
    assert _residual(z, W, c) < 10 * TOL
    assert 3 * int(steps) <= int(steps_iter), (int(steps), int(steps_iter))
    # Both within a few tolerances of the fixed point; the error is amplified by
    # 1/(1-0.99) for this problem.
    np.testing.assert_allclose(z, z_iter, rtol=0, atol=1e-7)


# (c) root finding of a nonlinear system with a known root, against SciPy.
def _root_problem():
    rng = np.random.default_rng(2)
    n = 6
    S = rng.standard_normal((n, n))
    S = (S + S.T) / 2
    M = np.eye(n) + 0.3 * S / np.max(np.abs(np.linalg.eigvalsh(S)))
    y_star = rng.standard_normal(n)
    b = M @ y_star + 0.1 * y_star**3
    return jnp.asarray(M), jnp.asarray(b), y_star


def _root_fn(y, args):
    # Strictly monotone (Jacobian -(M + 0.3 diag(y^2)), M > 0): a unique root.
    M, b = args
    return b - M @ y - 0.1 * y**3


@pytest.mark.parametrize(
    "solver",
    [
        Anderson(rtol=TOL, atol=TOL, beta=0.5),
        Broyden(rtol=TOL, atol=TOL),
        Broyden(rtol=TOL, atol=TOL, max_step=0.5),
    ],
    ids=["anderson", "broyden", "broyden-max_step"],
)
def test_root_find_against_scipy(solver):
    M, b, y_star = _root_problem()
    y0 = jnp.zeros(6)
    sol = optx.root_find(_root_fn, solver, y0, (M, b), max_steps=200)
    M_np, b_np = np.asarray(M), np.asarray(b)
    ref = scipy.optimize.root(
        lambda y: b_np - M_np @ y - 0.1 * y**3,
        np.zeros(6),
        jac=lambda y: -M_np - np.diag(0.3 * y**2),
        tol=1e-13,
    )
    assert ref.success
    np.testing.assert_allclose(ref.x, y_star, atol=1e-9)
    np.testing.assert_allclose(sol.value, ref.x, rtol=0, atol=1e-8)
    assert float(jnp.max(jnp.abs(_root_fn(sol.value, (M, b))))) < 1e-8


# (d) degenerate cases.
@solver_params
def test_start_at_fixed_point(name):
    W, c = _easy_problem()
    z_star, _, _ = _solve_tanh(SOLVERS[name], jnp.zeros(N), W, c, MAX_STEPS)
    z, steps, result = _solve_tanh(SOLVERS[name], z_star, W, c, MAX_STEPS)
    assert result == optx.RESULTS.successful
    assert int(steps) == 1
    assert _all_finite(z)
    np.testing.assert_allclose(z, z_star, rtol=0, atol=1e-10)


@pytest.mark.parametrize(
    "solver",
    [Anderson(rtol=TOL, atol=TOL, beta=0.5, memory=1), SOLVERS["broyden"]],
    ids=["anderson-damped-m1", "broyden"],
)
def test_constant_and_trivial_maps(solver):
    c = jnp.arange(5.0) - 2.0

    @jax.jit
    def run(c):
        out = []
        for fn, y0 in [
            (lambda y, c: c, jnp.zeros(5)),  # constant map
            (lambda y, c: c, c),  # constant map, started at its fixed point
            (lambda y, c: 2 * c - y, jnp.zeros(5)),  # plain iteration oscillates
        ]:
            sol = optx.fixed_point(fn, solver, y0, c, max_steps=20, throw=False)
            out.append((sol.value, sol.stats["num_steps"], sol.result))
        return out

    (v1, n1, r1), (v2, n2, r2), (v3, n3, r3) = run(c)
    for r in (r1, r2, r3):
        assert r == optx.RESULTS.successful
    np.testing.assert_allclose(v1, c, atol=1e-12)
    np.testing.assert_allclose(v2, c, atol=0)
    np.testing.assert_allclose(v3, c, atol=1e-12)
    assert int(n1) <= 4 and int(n2) == 1 and int(n3) <= 4


@solver_params
def test_repeated_history_no_nan(name):
    """Drive `step` by hand with degenerate histories: the same iterate over and over,
    two iterates alternating (identical, rank-deficient differences), and a zero
    residual. Outputs, state and gradients must stay finite."""
    solver = SOLVERS[name]

    def fn(y, a):
        return jnp.tanh(a * y) - y + a, None

    def run(a, ys):
        f_struct = jax.eval_shape(lambda: fn(ys[0], a)[0])
        state = solver.init(fn, ys[0], a, {}, f_struct, None, frozenset())

        def body(state, y):
            new_y, state, _ = solver.step(fn, y, a, {}, state, frozenset())
            return state, new_y

        state, outs = jax.lax.scan(body, state, ys)
        return jnp.sum(outs**2), (outs, state)

    check = jax.jit(jax.value_and_grad(run, has_aux=True))
    y1 = jnp.linspace(-1.0, 1.0, 4)
    y2 = y1 + 0.5
    cases = [
        (0.3, jnp.stack([y1] * 12)),  # the same iterate over and over
        (0.3, jnp.stack([y1, y2] * 6)),  # two iterates alternating
        (0.0, jnp.zeros((12, 4))),  # zero residual: zero history and Gram matrix
    ]
    for a, ys in cases:
        (_, (outs, state)), grad = check(jnp.array(a), ys)
        assert _all_finite(outs) and _all_finite(state)
        assert bool(jnp.isfinite(grad))
    np.testing.assert_array_equal(outs, 0)


@solver_params
def test_nonfinite_function_reports_divergence(name):
    W, c = _easy_problem()
    z0 = jnp.ones(N)
    z, steps, result = _solve_tanh(SOLVERS[name], z0, W, c * jnp.nan, MAX_STEPS)
    assert result == optx.RESULTS.nonlinear_divergence
    assert int(steps) == 1
    np.testing.assert_array_equal(z, z0)  # the last finite iterate


def test_errors_and_final():
    with pytest.raises(ValueError, match="as many elements"):
        optx.root_find(lambda y, _: y[:2], SOLVERS["anderson"], jnp.zeros(3))
    with pytest.raises(ValueError, match="as many elements"):
        optx.root_find(lambda y, _: y[:2], SOLVERS["broyden"], jnp.zeros(3))
    with pytest.raises(ValueError, match="memory"):
        Anderson(rtol=TOL, atol=TOL, memory=0)
    with pytest.raises(TypeError):

        class _A(Anderson):  # pyright: ignore
            pass

    with pytest.raises(TypeError):

        class _B(Broyden):  # pyright: ignore
            pass


# (e) pytree-valued y.
def _tree_map(y, args):
    A, B, c = args
    a, b = y["a"], y["b"]
    return {
        "a": jnp.tanh(A @ a + 0.3 * jnp.sum(b) + c),
        "b": 0.5 * jnp.cos(B @ b + a[:2, None]),
    }


@solver_params
def test_pytree(name):
    rng = np.random.default_rng(3)
    A = jnp.asarray(rng.standard_normal((3, 3)) * 0.3)
    B = jnp.asarray(rng.standard_normal((2, 2)) * 0.3)
    c = jnp.asarray(rng.standard_normal(3))
    y0 = {"a": jnp.zeros(3), "b": jnp.zeros((2, 2))}
    sol = optx.fixed_point(_tree_map, SOLVERS[name], y0, (A, B, c), max_steps=200)
    ref = jax.jit(
        lambda y: jax.lax.fori_loop(0, 300, lambda _, y: _tree_map(y, (A, B, c)), y)
    )(y0)
    assert _all_finite(ref)
    assert jtu.tree_structure(sol.value) == jtu.tree_structure(y0)
    for key in ("a", "b"):
        assert sol.value[key].shape == y0[key].shape
        np.testing.assert_allclose(sol.value[key], ref[key], rtol=0, atol=1e-9)


# (f) implicit gradients vs central finite differences vs the unrolled iteration.
@solver_params
def test_gradients(name):
    solver = type(SOLVERS[name])(rtol=1e-13, atol=1e-13)
    rng = np.random.default_rng(4)
    n = 8
    A = rng.standard_normal((n, n))
    W = jnp.asarray(A / np.linalg.norm(A, 2) * 0.9)
    u = jnp.asarray(rng.standard_normal(n))
    b = jnp.asarray(0.1 * rng.standard_normal(n))
    dW = jnp.asarray(rng.standard_normal((n, n)))
    max_steps = 100

    def fn(z, params):
        W, theta = params
        return jnp.tanh(W @ z + theta * u + b)

    def loss(params, adjoint):
        sol = optx.fixed_point(
            fn, solver, jnp.zeros(n), params, max_steps=max_steps, adjoint=adjoint
        )
        return jnp.sum(sol.value**2) + jnp.sum(jnp.sin(sol.value))

    params = (W, jnp.array(0.7))
    value_and_implicit = jax.jit(
        jax.value_and_grad(lambda p: loss(p, optx.ImplicitAdjoint()))
    )
    _, implicit = value_and_implicit(params)
    unrolled_adjoint = optx.RecursiveCheckpointAdjoint(checkpoints=max_steps)
    unrolled = jax.jit(jax.grad(lambda p: loss(p, unrolled_adjoint)))(params)
    assert _all_finite((implicit, unrolled))

    # Central differences along the direction (dW, 1).
    h = 1e-5
    plus, _ = value_and_implicit((W + h * dW, params[1] + h))
    minus, _ = value_and_implicit((W - h * dW, params[1] - h))
    fd = (plus - minus) / (2 * h)
    directional = jnp.sum(implicit[0] * dW) + implicit[1]
    np.testing.assert_allclose(directional, fd, rtol=1e-6)

    for g_imp, g_unr in zip(
        jtu.tree_leaves(implicit), jtu.tree_leaves(unrolled), strict=True
    ):
        np.testing.assert_allclose(g_imp, g_unr, rtol=1e-7, atol=1e-9)


# (g) jit and vmap.
@solver_params
def test_jit_vmap(name):
    W, c = _easy_problem()
    rng = np.random.default_rng(5)
    cs = c + jnp.asarray(0.5 * rng.standard_normal((3, N)))
    solver = SOLVERS[name]
    batched = jax.jit(
        jax.vmap(lambda c: _solve_tanh(solver, jnp.zeros(N), W, c, MAX_STEPS))
    )
    zs, steps, results = batched(cs)
    assert zs.shape == (3, N)
    assert bool(jnp.all(results == optx.RESULTS.successful))
    for i in range(3):
        z_i, _, _ = _solve_tanh(solver, jnp.zeros(N), W, cs[i], MAX_STEPS)
        np.testing.assert_allclose(zs[i], z_i, rtol=0, atol=1e-9)
        assert _residual(zs[i], W, cs[i]) < 10 * TOL
