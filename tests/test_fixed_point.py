"""`ctmodels.fixed_point` / `ctmodels.root_find` against independent oracles.

Every registry entry of kind `fixed_point`, `root` and `linear` is covered through the
registry (a newly registered solver is picked up automatically): values against long
plain iterations / SciPy, implicit gradients against central finite differences and
against the unrolled iteration, readable failures, and jit / vmap / grad safety.
"""

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.optimize

import ctmodels
from ctmodels import RESULTS, SolverError, solvers
from ctmodels._errors import discard_failed_callbacks

jax.config.update("jax_enable_x64", True)
X64 = True  # for the whole module (tests/conftest.py)

FP = solvers.names("fixed_point")
ROOT = solvers.names("root")
LINEAR = solvers.names("linear")

# One set of tolerances for (almost) every float64 solve, so that compiled solves are
# shared between tests (the tolerances are static in the compiled solve).
RTOL, ATOL = 1e-11, 1e-13
N = 4


def _ok(sol) -> bool:
    return bool(np.all(np.asarray(sol.result == RESULTS.successful)))


def _is(sol, code) -> bool:
    return bool(np.all(np.asarray(sol.result == code)))


# --------------------------------------------------------------------------------------
# Problems and oracles
# --------------------------------------------------------------------------------------


def _contraction(norm, seed=0, n=N):
    """W with spectral norm `norm` (so z -> tanh(Wz + b) contracts by `norm`)."""
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((n, n))
    w *= norm / np.linalg.norm(w, 2)
    b = rng.standard_normal(n)
    return w, b


def tanh_map(z, args):
    w, b = args
    return jnp.tanh(w @ z + b)


def _tanh_oracle(w, b, iters=2000):
    """A long plain iteration in NumPy float64."""
    z = np.zeros(len(b))
    for _ in range(iters):
        z = np.tanh(w @ z + b)
    assert np.max(np.abs(np.tanh(w @ z + b) - z)) < 1e-15
    return z


def _args(w, b, dtype=jnp.float64):
    return (jnp.asarray(w, dtype), jnp.asarray(b, dtype))


Z0 = jnp.zeros(N, jnp.float64)
W9, B9 = _contraction(0.9)
ARGS9 = _args(W9, B9)
ORACLE9 = _tanh_oracle(W9, B9)
LOSS_W = jnp.asarray(np.random.default_rng(1).standard_normal(N))


def _tol_bound(z):
    return ATOL + RTOL * float(jnp.max(jnp.abs(z)))


def cos_map(z, a):
    return jnp.cos(a * z)


def convex_field(y, args):
    """-grad of a strictly convex potential: unique root, Jacobian -(A + 0.3 diag y^2)
    with eigenvalues in about (-1.2, -0.3), so that y <- y + fn(y) also contracts."""
    a, c = args
    return c - a @ y - 0.1 * y**3


def _convex_args():
    rng = np.random.default_rng(2)
    q, _ = np.linalg.qr(rng.standard_normal((3, 3)))
    a = q @ np.diag([0.3, 0.55, 0.8]) @ q.T
    c = 0.3 * rng.standard_normal(3)  # root small enough for chord (rate ~0.6)
    return a, c


CONVEX_ARGS = tuple(jnp.asarray(x) for x in _convex_args())


def _loss(args, solver, adjoint):
    sol = ctmodels.fixed_point(
        tanh_map, Z0, args, solver=solver, adjoint=adjoint, rtol=RTOL, atol=ATOL
    )
    return jnp.dot(LOSS_W, sol.value)


def _directions(seed, k=3):
    rng = np.random.default_rng(seed)
    return [
        (jnp.asarray(rng.standard_normal((N, N))), jnp.asarray(rng.standard_normal(N)))
        for _ in range(k)
    ]


def _axpy(h, d, args):
    return jax.tree.map(lambda x, y: y + h * x, d, args)


def _dot(g, d):
    return sum(
        float(jnp.sum(x * y))
        for x, y in zip(jax.tree.leaves(g), jax.tree.leaves(d), strict=True)
    )


def _central_fd(f, args, d, h=1e-5):
    return (float(f(_axpy(h, d, args))) - float(f(_axpy(-h, d, args)))) / (2 * h)


# Gradients are taken inside one jit (a single compilation of forward + backward).
_value_and_grad = jax.jit(jax.value_and_grad(_loss), static_argnums=(1, 2))


def _implicit_fd_loss(args, solver):
    return _value_and_grad(args, solver, "implicit")[0]


def _cos_loss(a, solver):
    sol = ctmodels.fixed_point(
        cos_map, jnp.array(1.0), a, solver=solver, rtol=RTOL, atol=ATOL
    )
    return sol.value, (sol.result, sol.stats)


_cos_value_and_grad = jax.jit(
    jax.value_and_grad(_cos_loss, has_aux=True), static_argnums=1
)


# --------------------------------------------------------------------------------------
# 1. Values against oracles
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("solver", FP)
def test_tanh_contraction_matches_long_iteration(solver):
    for norm, seed in ((0.5, 3), (0.7, 4), (0.9, 0)):
        w, b = _contraction(norm, seed)
        oracle = _tanh_oracle(w, b)
        sol = ctmodels.fixed_point(
            tanh_map, Z0, _args(w, b), solver=solver, rtol=RTOL, atol=ATOL
        )
        assert _ok(sol), (norm, sol.result)
        assert sol.value.shape == (N,) and sol.value.dtype == jnp.float64
        # |z - z*| <= |f(z) - z| / (1 - norm)
        np.testing.assert_allclose(
            sol.value, oracle, rtol=0, atol=1e-9, err_msg=str(norm)
        )
        assert float(sol.stats["residual"]) <= 10 * _tol_bound(sol.value)
        assert float(sol.stats["relative_residual"]) <= 1e-9
        assert 0 < int(sol.stats["num_steps"]) < sol.stats["max_steps"]
        assert not bool(sol.stats["stagnated"]) and not bool(sol.stats["diverged"])
        # The reported residual is the residual of the returned value.
        np.testing.assert_allclose(
            sol.stats["residual"],
            np.max(
                np.abs(np.tanh(w @ np.asarray(sol.value) + b) - np.asarray(sol.value))
            ),
            rtol=1e-6,
            atol=1e-15,
        )


@pytest.mark.parametrize("solver", FP)
def test_cos_scalar_matches_scipy(solver):
    """Scalar z = cos(a z) (a = 1: the Dottie number), value against SciPy and
    dz*/da = -z* sin(a z*) / (1 + a sin(a z*)) against the closed form."""
    a = 1.0
    oracle = scipy.optimize.fixed_point(
        lambda x: np.cos(a * x), 1.0, xtol=1e-15, maxiter=5000
    )
    np.testing.assert_allclose(oracle, 0.7390851332151607, atol=1e-14)
    (value, (result, stats)), grad = _cos_value_and_grad(jnp.array(a), solver)
    assert bool(result == RESULTS.successful)
    assert value.shape == () and value.dtype == jnp.float64
    np.testing.assert_allclose(value, oracle, rtol=0, atol=1e-9)
    assert float(stats["residual"]) <= 10 * _tol_bound(value)
    z = oracle
    np.testing.assert_allclose(
        grad, -z * np.sin(a * z) / (1 + a * np.sin(a * z)), rtol=1e-8
    )


@functools.partial(jax.jit, static_argnums=1)
def _root_and_jacobian(args, solver):
    def root(c):
        sol = ctmodels.root_find(
            convex_field,
            jnp.zeros(3),
            (args[0], c),
            solver=solver,
            rtol=RTOL,
            atol=ATOL,
        )
        return sol.value, sol

    return jax.jacrev(root, has_aux=True)(args[1])


@pytest.mark.parametrize("solver", ROOT)
def test_root_find_matches_scipy(solver):
    a, c = _convex_args()
    oracle = scipy.optimize.root(
        lambda y: c - a @ y - 0.1 * y**3, np.zeros(3), method="hybr", tol=1e-14
    )
    assert oracle.success
    jac, sol = _root_and_jacobian(CONVEX_ARGS, solver)
    assert _ok(sol), sol.result
    np.testing.assert_allclose(sol.value, oracle.x, rtol=0, atol=1e-9)
    # stats["residual"] is |fn(y*)| for a root.
    y = np.asarray(sol.value)
    assert float(sol.stats["residual"]) <= 1e-9
    np.testing.assert_allclose(
        sol.stats["residual"],
        np.max(np.abs(c - a @ y - 0.1 * y**3)),
        rtol=1e-6,
        atol=1e-15,
    )
    # Implicit gradient of the root w.r.t. c: dy*/dc = (A + 0.3 diag(y*^2))^-1.
    y = oracle.x
    np.testing.assert_allclose(
        jac, np.linalg.inv(a + 0.3 * np.diag(y**2)), rtol=1e-7, atol=1e-9
    )


# --------------------------------------------------------------------------------------
# 2. Implicit gradients
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("solver", FP)
def test_implicit_gradient_matches_finite_differences(solver):
    _, grad = _value_and_grad(ARGS9, solver, "implicit")
    assert grad[0].shape == (N, N) and grad[1].shape == (N,)
    for d in _directions(5):
        fd = _central_fd(lambda p: _implicit_fd_loss(p, solver), ARGS9, d)
        assert abs(_dot(grad, d) - fd) <= 1e-6 * (1 + abs(fd)), (_dot(grad, d), fd)
    # And the closed form of the implicit function theorem at the oracle point.
    z = ORACLE9
    s = 1 - np.tanh(W9 @ z + B9) ** 2  # f'(.) at z*
    lam = np.linalg.solve((np.eye(N) - s[:, None] * W9).T, np.asarray(LOSS_W))
    np.testing.assert_allclose(grad[1], s * lam, rtol=1e-8, atol=1e-10)
    np.testing.assert_allclose(grad[0], np.outer(s * lam, z), rtol=1e-8, atol=1e-10)


@pytest.mark.slow
@pytest.mark.parametrize("solver", FP)
def test_implicit_gradient_matches_unrolled_iteration(solver):
    implicit = _value_and_grad(ARGS9, solver, "implicit")[1]
    unrolled = _value_and_grad(ARGS9, solver, "checkpoint")[1]
    for gi, gu in zip(implicit, unrolled, strict=True):
        assert np.all(np.isfinite(gu))
        np.testing.assert_allclose(gu, gi, rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("linear_solver", LINEAR)
def test_every_linear_solver_in_implicit_backward(linear_solver):
    monitor = solvers.BackwardMonitor()
    adjoint = solvers.get("implicit", linear_solver=linear_solver, on_backward=monitor)
    grad = _value_and_grad(ARGS9, "newton", adjoint)[1]
    reference = _value_and_grad(ARGS9, "newton", "implicit")[1]
    # Iterative linear solvers are built with rtol = atol = 1e-6 by default.
    for g, r in zip(grad, reference, strict=True):
        np.testing.assert_allclose(g, r, rtol=1e-5, atol=1e-6)
    d = _directions(6, k=1)[0]
    fd = _central_fd(lambda p: _implicit_fd_loss(p, "newton"), ARGS9, d)
    assert abs(_dot(grad, d) - fd) <= 1e-5 * (1 + abs(fd))
    # The backward linear solve was checked and reported.
    assert monitor.records
    assert monitor.last["relative_residual"] <= 1e-5


# --------------------------------------------------------------------------------------
# 4. Error paths
# --------------------------------------------------------------------------------------


def test_unknown_solver_name_suggests_close_match():
    with pytest.raises(ValueError, match="Did you mean 'anderson'"):
        ctmodels.fixed_point(tanh_map, Z0, ARGS9, solver="andersen")
    with pytest.raises(ValueError, match="Did you mean 'newton'"):
        ctmodels.root_find(convex_field, jnp.zeros(3), CONVEX_ARGS, solver="newtn")
    with pytest.raises(ValueError, match="'broyden'"):
        ctmodels.fixed_point(tanh_map, Z0, ARGS9, solver="Broydn")


@pytest.mark.parametrize("name", ["tsit5", "kvaerno5", "pid", "lu", "backsolve"])
def test_other_kind_name_rejected(name):
    with pytest.raises(ValueError, match="not a fixed_point solver"):
        ctmodels.fixed_point(tanh_map, Z0, ARGS9, solver=name)
    with pytest.raises(ValueError, match="not a root solver"):
        ctmodels.root_find(convex_field, jnp.zeros(3), CONVEX_ARGS, solver=name)


@pytest.mark.parametrize("name", sorted(set(FP) - set(ROOT)))
def test_fixed_point_only_entry_rejected_by_root_find(name):
    with pytest.raises(ValueError, match="not a root solver"):
        ctmodels.root_find(convex_field, jnp.zeros(3), CONVEX_ARGS, solver=name)


@pytest.mark.parametrize(
    "fn",
    [
        lambda z, args: z[:-1],  # shape
        lambda z, args: {"z": z},  # structure
        lambda z, args: (z, z),  # structure
        lambda z, args: z.astype(jnp.float32),  # dtype
        lambda z, args: jnp.sum(z),  # shape
    ],
    ids=["shape", "dict", "tuple", "dtype", "scalar"],
)
def test_output_structure_mismatch(fn):
    with pytest.raises(ValueError, match="same structure"):
        ctmodels.fixed_point(fn, Z0, None, solver=FP[0])
    with pytest.raises(ValueError, match="same structure"):
        ctmodels.root_find(fn, Z0, None, solver=ROOT[0])


def test_backsolve_adjoint_rejected():
    with pytest.raises(ValueError, match="implicit"):
        ctmodels.fixed_point(tanh_map, Z0, ARGS9, adjoint="backsolve")
    with pytest.raises(ValueError, match="not a adjoint solver|adjoint"):
        ctmodels.fixed_point(tanh_map, Z0, ARGS9, adjoint="tsit5")


def test_bad_arguments():
    with pytest.raises(ValueError, match="max_steps"):
        ctmodels.fixed_point(tanh_map, Z0, ARGS9, max_steps=0)
    with pytest.raises(ValueError, match="callable"):
        ctmodels.fixed_point("tanh", Z0, ARGS9)


@pytest.mark.parametrize("solver", FP)
def test_max_steps_reached(solver):
    max_steps = 2
    sol = ctmodels.fixed_point(
        tanh_map, Z0, ARGS9, solver=solver, rtol=RTOL, atol=ATOL, max_steps=max_steps,
        throw=False,
    )  # fmt: skip
    assert _is(sol, RESULTS.max_steps_reached), sol.result
    assert int(sol.stats["num_steps"]) == max_steps
    assert np.all(np.isfinite(sol.value))
    with pytest.raises(SolverError) as info:
        ctmodels.fixed_point(
            tanh_map,
            Z0,
            ARGS9,
            solver=solver,
            rtol=RTOL,
            atol=ATOL,
            max_steps=max_steps,
        )
    err = info.value
    msg = str(err)
    assert err.solver == solver and err.entry == "fixed_point"
    assert bool(err.result == RESULTS.max_steps_reached)
    assert f"solver {solver!r}" in msg
    assert f"after {max_steps} iterations" in msg
    assert "maximum number of steps" in msg
    assert f"max_steps (now {max_steps})" in msg
    # Suggests a different registry entry of the same kind.
    suggested = set(re.findall(r"'(\w+)'", msg)) - {solver}
    assert suggested & set(FP), msg


@pytest.mark.parametrize("solver", FP)
def test_divergent_map(solver):
    """z -> 2z + 1 has the (repelling) fixed point z* = -1. A solver either finds it
    (Newton-like and accelerated methods solve the affine problem) or reports
    divergence; the plain iterations must report divergence. Never a wrong value."""

    def expanding(z, args):
        return 2 * z + 1

    z0 = jnp.zeros(3)
    sol = ctmodels.fixed_point(expanding, z0, None, solver=solver, throw=False)
    if solver in ("iteration", "damped") or not _ok(sol):
        assert _is(sol, RESULTS.divergence), sol.result
        assert bool(sol.stats["diverged"])
        assert int(sol.stats["num_steps"]) < 100  # stopped early, not at max_steps
        with pytest.raises(SolverError, match="diverged") as info:
            ctmodels.fixed_point(expanding, z0, None, solver=solver)
        assert bool(info.value.result == RESULTS.divergence)
        assert f"solver {solver!r}" in str(info.value)
    else:
        np.testing.assert_allclose(sol.value, -1.0, atol=1e-6)
        assert not bool(sol.stats["diverged"])


@pytest.mark.parametrize("solver", ROOT)
def test_no_false_divergence_far_from_initial_scale(solver):
    """A converged solve must not be reported as diverged: z -> q z + c with
    q = 1 - 1e-7 has z* = c / (1 - q) = 1e7 c, which the root-finder-based solvers
    (Newton, chord, Anderson, Broyden) reach in a few steps from z0 = 0."""

    def slow_affine(z, c):
        return (1 - 1e-7) * z + c

    c = jnp.array([1.0, 2.0])
    sol = ctmodels.fixed_point(slow_affine, jnp.zeros(2), c, solver=solver, throw=False)
    # The default tolerances (rtol=1e-6, atol=1e-8) are met at |z*| = 2e7.
    assert float(sol.stats["residual"]) <= 1e-8 + 1e-6 * 2e7
    assert not bool(sol.stats["diverged"]), sol.result
    assert _ok(sol), sol.result
    np.testing.assert_allclose(sol.value, 1e7 * np.asarray(c), rtol=1e-6)


@pytest.mark.parametrize("solver", FP)
def test_no_false_divergence_transient_growth(solver):
    """z -> W z + b with W = [[0.95, 50], [0, 0.95]] is a convergent (spectral radius
    0.95) but non-normal map: the plain iteration's steps grow ~400x for ~20 steps
    before they decay. That transient is not divergence; every solver must reach
    z* = (I - W)^-1 b = (20000, 20) given enough steps."""

    def affine(z, args):
        w, b = args
        return w @ z + b

    w = jnp.array([[0.95, 50.0], [0.0, 0.95]])
    b = jnp.array([0.0, 1.0])
    sol = ctmodels.fixed_point(
        affine, jnp.zeros(2), (w, b), solver=solver, rtol=RTOL, atol=ATOL,
        max_steps=4000, throw=False,
    )  # fmt: skip
    assert not bool(sol.stats["diverged"]), (sol.result, sol.stats["num_steps"])
    assert _ok(sol), sol.result
    np.testing.assert_allclose(sol.value, [20000.0, 20.0], rtol=1e-6)


# -- Stagnation, in float32 (the arrays and fn stay float32 although x64 is enabled) --

W32, B32 = _contraction(0.9, seed=7, n=8)
ARGS32 = _args(W32, B32, jnp.float32)
Z32 = jnp.zeros(8, jnp.float32)


def tanh_map32(z, args):
    w, b = args
    out = jnp.tanh(w @ z + b)
    assert out.dtype == jnp.float32
    return out


@pytest.mark.parametrize("solver", FP)
def test_stagnation_float32(solver):
    max_steps = 200
    kw = dict(solver=solver, rtol=1e-12, atol=0.0, max_steps=max_steps)
    sol = ctmodels.fixed_point(tanh_map32, Z32, ARGS32, throw=False, **kw)
    assert sol.value.dtype == jnp.float32
    # Either it stopped at roundoff level and said so, or its own step became exactly
    # zero in float32 (a fixed point to the last ulp, which meets any tolerance);
    # never a silent run to max_steps.
    ulp = float(jnp.finfo(jnp.float32).eps) * float(jnp.max(jnp.abs(sol.value)))
    exact = _ok(sol) and float(sol.stats["residual"]) <= 2 * ulp
    assert exact or _is(sol, RESULTS.stagnation), sol.result
    assert exact or bool(sol.stats["stagnated"])
    assert int(sol.stats["num_steps"]) < max_steps // 4  # stopped early
    # It did reach float32 accuracy before stopping.
    np.testing.assert_allclose(sol.value, _tanh_oracle(W32, B32), atol=1e-5)
    if exact:
        return
    with pytest.raises(SolverError) as info:
        ctmodels.fixed_point(tanh_map32, Z32, ARGS32, throw=True, **kw)
    msg = str(info.value)
    assert bool(info.value.result == RESULTS.stagnation)
    assert "rtol" in msg and "atol" in msg and "loosen" in msg
    assert "float64" in msg and "float32" in msg
    assert f"solver {solver!r}" in msg


def test_throw_false_returns_code_without_raising():
    # Divergence, max_steps and stagnation are returned as codes with throw=False (the
    # per-solver tests above); here: the value is still returned, and is usable.
    sol = ctmodels.fixed_point(
        tanh_map,
        Z0,
        ARGS9,
        solver=FP[0],
        rtol=RTOL,
        atol=ATOL,
        max_steps=2,
        throw=False,
    )
    assert not _ok(sol)
    assert _is(sol, RESULTS.max_steps_reached)
    assert RESULTS[sol.result] == "the maximum number of steps was reached"
    assert sol.value.shape == (N,) and np.all(np.isfinite(sol.value))


def test_jit_throw_raises_explanation():
    solver = FP[0]

    @jax.jit
    def solve(args):
        return ctmodels.fixed_point(
            tanh_map, Z0, args, solver=solver, rtol=RTOL, atol=ATOL, max_steps=2
        ).value

    with pytest.raises(Exception, match="maximum number of steps") as info:
        jax.block_until_ready(solve(ARGS9))
    discard_failed_callbacks()  # handled here; a GPU would raise it again later
    msg = str(info.value)
    assert f"ctmodels.fixed_point with solver {solver!r}" in msg
    assert "max_steps (now 2)" in msg

    # root_find under jit, failing by divergence of Newton's iterates is hard to
    # provoke; max_steps is enough to exercise the traced path of root_find too.
    @jax.jit
    def solve_root(args):
        return ctmodels.root_find(
            convex_field, jnp.zeros(3), args, solver=ROOT[0], rtol=RTOL, atol=ATOL,
            max_steps=1,
        ).value  # fmt: skip

    with pytest.raises(Exception, match="maximum number of steps") as info:
        jax.block_until_ready(solve_root(CONVEX_ARGS))
    discard_failed_callbacks()
    assert f"ctmodels.root_find with solver {ROOT[0]!r}" in str(info.value)


# --------------------------------------------------------------------------------------
# 5. jit / vmap / grad safety; pytrees
# --------------------------------------------------------------------------------------


def _loss_aux(w, b, solver):
    sol = ctmodels.fixed_point(
        tanh_map, Z0, (w, b), solver=solver, rtol=RTOL, atol=ATOL
    )
    return jnp.dot(LOSS_W, sol.value), (sol.value, sol.result, sol.stats)


@functools.partial(jax.jit, static_argnums=2)
def _batched_value_and_grad(ws, bs, solver):
    value_and_grad = jax.value_and_grad(_loss_aux, argnums=(0, 1), has_aux=True)
    return jax.vmap(lambda w, b: value_and_grad(w, b, solver))(ws, bs)


@pytest.mark.parametrize("solver", FP)
def test_jit_vmap_grad_match_eager(solver):
    """jit(vmap(grad)) over a batch of three problems (contraction 0.5, 0.7, 0.9),
    against eager solves / gradients one at a time and the NumPy oracle."""
    rng = np.random.default_rng(8)
    bs = jnp.asarray(rng.standard_normal((3, N)))
    ws = jnp.stack(
        [
            jnp.asarray(_contraction(s, seed=10 + i)[0])
            for i, s in enumerate((0.5, 0.7, 0.9))
        ]
    )
    (loss, (value, result, stats)), (gw, gb) = _batched_value_and_grad(ws, bs, solver)
    assert value.shape == (3, N) and gw.shape == (3, N, N) and gb.shape == (3, N)
    assert bool(jnp.all(result == RESULTS.successful))
    assert stats["num_steps"].shape == (3,)
    for i in range(3):
        eager = ctmodels.fixed_point(
            tanh_map, Z0, (ws[i], bs[i]), solver=solver, rtol=RTOL, atol=ATOL
        )
        np.testing.assert_allclose(value[i], eager.value, rtol=0, atol=1e-12)
        np.testing.assert_allclose(
            value[i], _tanh_oracle(np.asarray(ws[i]), np.asarray(bs[i])), atol=1e-9
        )
        assert int(stats["num_steps"][i]) == int(eager.stats["num_steps"])
        eager_loss, (egw, egb) = _value_and_grad((ws[i], bs[i]), solver, "implicit")
        np.testing.assert_allclose(loss[i], eager_loss, rtol=1e-12)
        np.testing.assert_allclose(gw[i], egw, rtol=1e-9, atol=1e-12)
        np.testing.assert_allclose(gb[i], egb, rtol=1e-9, atol=1e-12)


def dict_map(z, args):
    w, b, v = args
    u, s = z["u"], z["s"]
    return {"u": jnp.tanh(w @ u + s * v + b), "s": 0.5 * jnp.cos(s) + 0.1 * jnp.mean(u)}


def _dict_oracle(w, b, v, iters=3000):
    u, s = np.zeros(len(b)), 0.0
    for _ in range(iters):
        u, s = np.tanh(w @ u + s * v + b), 0.5 * np.cos(s) + 0.1 * np.mean(u)
    return u, s


def _dict_loss(args, solver):
    z0 = {"u": jnp.zeros(N), "s": jnp.array(0.0)}
    sol = ctmodels.fixed_point(dict_map, z0, args, solver=solver, rtol=RTOL, atol=ATOL)
    z = sol.value
    return jnp.sum(z["u"] ** 2) + 3 * z["s"], (z, sol.result, sol.stats["residual"])


_dict_value_and_grad = jax.jit(
    jax.value_and_grad(_dict_loss, has_aux=True), static_argnums=1
)


@pytest.mark.parametrize("solver", FP)
def test_pytree_state(solver):
    """z = {"u": vector, "s": scalar}: value against a long NumPy iteration, gradient
    (under jit) against central finite differences."""
    w, b = _contraction(0.6, seed=11)
    v = 0.2 * np.ones(N)
    args = (jnp.asarray(w), jnp.asarray(b), jnp.asarray(v))
    (_, (z, result, residual)), grad = _dict_value_and_grad(args, solver)
    assert bool(result == RESULTS.successful)
    assert set(z) == {"u", "s"} and z["s"].shape == () and z["u"].shape == (N,)
    u, s = _dict_oracle(w, b, v)
    np.testing.assert_allclose(z["u"], u, atol=1e-9)
    np.testing.assert_allclose(z["s"], s, atol=1e-9)
    assert float(residual) <= 1e-9
    assert len(grad) == 3 and all(
        g.shape == x.shape for g, x in zip(grad, args, strict=True)
    )
    rng = np.random.default_rng(12)
    d = tuple(jnp.asarray(rng.standard_normal(x.shape)) for x in args)
    fd = _central_fd(lambda p: _dict_value_and_grad(p, solver)[0][0], args, d)
    assert abs(_dot(grad, d) - fd) <= 1e-6 * (1 + abs(fd)), (_dot(grad, d), fd)


def test_stagnation_is_detected_not_run_to_max_steps():
    # Newton's float32 iterates jitter at the last ulp without meeting rtol=1e-12: the
    # guard must say so early rather than run to max_steps.
    sol = ctmodels.fixed_point(
        tanh_map32, Z32, ARGS32, solver="newton", rtol=1e-12, atol=0.0,
        max_steps=200, throw=False,
    )  # fmt: skip
    assert _is(sol, RESULTS.stagnation), sol.result
    assert int(sol.stats["num_steps"]) < 50


# --------------------------------------------------------------------------------------
# The default matrix-free implicit backward: chosen to mirror the forward solver.
# --------------------------------------------------------------------------------------


def _backward_solver(solver, max_steps=256):
    from ctmodels._fixed_point import _resolve_solver, resolve_nonlinear_adjoint

    solver_v, _ = _resolve_solver(solver, "fixed_point", RTOL, ATOL)
    adjoint = resolve_nonlinear_adjoint("implicit", "fixed_point", solver_v, max_steps)
    return adjoint.linear_solver.inner  # inside the CheckedLinearSolver


@pytest.mark.parametrize("solver", FP)
def test_default_backward_mirrors_the_forward_solver(solver):
    from ctmodels.solvers._implicit import AndersonLinearSolver, NeumannLinearSolver

    lin = _backward_solver(solver, max_steps=2000)
    if solver in ("iteration", "damped"):
        assert isinstance(lin, NeumannLinearSolver)
        assert lin.damp == (0.5 if solver == "damped" else 0.0)
    else:
        assert isinstance(lin, AndersonLinearSolver)
    # the forward's iteration budget, and its (tighter) tolerance
    assert lin.max_steps == 2000 and lin.rtol == RTOL
    assert _backward_solver(solver, max_steps=10).max_steps == 500


@pytest.mark.parametrize("name", ["neumann", "anderson_linear"])
def test_matrix_free_backward_solve_reports_its_residual(name):
    """The solution comes back with the 2-norm of its own residual (so the checked
    adjoint applies the operator no extra time), and `A x = b` holds to rtol relative
    to max(|b|, |x|)."""
    import lineax as lx

    rng = np.random.default_rng(3)
    w = rng.standard_normal((6, 6))
    j = 0.8 * w / np.linalg.norm(w, 2)  # a contraction: A = J^T - I
    a = jnp.asarray(j.T - np.eye(6))
    b = jnp.asarray(rng.standard_normal(6))
    solver = solvers.get(name, kind="linear", rtol=1e-10)
    op = lx.MatrixLinearOperator(a)
    x, result, stats = solver.compute(solver.init(op, {}), b, {})
    assert result == lx.RESULTS.successful
    r = np.asarray(a @ x - b)
    scale = max(np.max(np.abs(b)), np.max(np.abs(np.asarray(x))))
    # the residual of this x, to rounding of terms of size `scale` (a GPU sums in
    # another order: 2e-16 apart on a 1.8e-10 residual; another iterate's residual
    # would differ by far more)
    np.testing.assert_allclose(
        stats["residual_norm"], np.linalg.norm(r), rtol=1e-12, atol=1e-14 * scale
    )
    assert np.max(np.abs(r)) <= 1e-10 * scale
    np.testing.assert_allclose(x, np.linalg.solve(np.asarray(a), b), rtol=1e-8)


@pytest.mark.parametrize("name", ["neumann", "anderson_linear"])
def test_matrix_free_backward_solve_stops_at_its_roundoff_floor(name):
    """A float32 tolerance below what float32 resolves is not chased to max_steps:
    the residual stops improving, the best iterate comes back (flagged as not
    converged; the implicit adjoint's backward_tol judges it)."""
    import lineax as lx

    rng = np.random.default_rng(4)
    q, _ = np.linalg.qr(rng.standard_normal((40, 40)))
    j = (q * np.linspace(0.0, 0.95, 40)) @ q.T  # slowly contracting
    a = jnp.asarray(j.T - np.eye(40), jnp.float32)
    b = jnp.asarray(rng.standard_normal(40), jnp.float32)
    solver = solvers.get(name, kind="linear", rtol=1e-12, max_steps=5000)
    op = lx.MatrixLinearOperator(a)
    x, result, stats = solver.compute(solver.init(op, {}), b, {})
    assert result != lx.RESULTS.successful
    assert int(stats["num_steps"]) < 2000
    exact = np.linalg.solve(np.asarray(a, np.float64), np.asarray(b, np.float64))
    assert np.linalg.norm(np.asarray(x) - exact) <= 1e-5 * np.linalg.norm(exact)


def test_damped_iteration_gradient_uses_damped_backward():
    """damped's backward is the damped adjoint iteration; a map whose Jacobian has an
    eigenvalue near -1.5 (plain iteration diverges, damped converges) still gets its
    implicit gradient right."""
    w = np.diag([-1.5, 0.3, 0.2, -0.4])
    b = np.array([0.1, -0.2, 0.3, 0.05])
    args = (jnp.asarray(w), jnp.asarray(b))

    def linear_map(z, args):
        w, b = args
        return w @ z + b

    def loss(args):
        sol = ctmodels.fixed_point(
            linear_map, Z0, args, solver="damped", rtol=RTOL, atol=ATOL,
            max_steps=2000,
        )  # fmt: skip
        return jnp.dot(LOSS_W, sol.value)

    g = jax.jit(jax.grad(loss))(args)
    # z* = (I - W)^-1 b; dL/db = (I - W)^-T w_L, dL/dW = outer(dL/db, z*)
    lam = np.linalg.solve((np.eye(N) - w).T, np.asarray(LOSS_W))
    z = np.linalg.solve(np.eye(N) - w, b)
    np.testing.assert_allclose(g[1], lam, rtol=1e-8, atol=1e-10)
    np.testing.assert_allclose(g[0], np.outer(lam, z), rtol=1e-8, atol=1e-10)


# -- one vocabulary ------------------------------------------------------------------


def test_y0_is_the_argument_and_z0_is_deprecated():
    kw = dict(solver="anderson", rtol=RTOL, atol=ATOL)
    sol = ctmodels.fixed_point(tanh_map, y0=Z0, args=ARGS9, **kw)
    with pytest.warns(DeprecationWarning, match="y0"):
        old = ctmodels.fixed_point(tanh_map, z0=Z0, args=ARGS9, **kw)
    np.testing.assert_array_equal(old.value, sol.value)
    np.testing.assert_allclose(sol.value, ORACLE9, rtol=0, atol=1e-9)
    with pytest.raises(ValueError, match="both y0 and z0"):
        ctmodels.fixed_point(tanh_map, Z0, ARGS9, z0=Z0, **kw)
    # the stats every solution has: steps, function evaluations, the budget
    assert {"num_steps", "num_fn_evals", "max_steps"} <= set(sol.stats)
    assert int(sol.stats["num_fn_evals"]) == int(sol.stats["num_steps"]) + 2
