"""`ctmodels.nn.DEQ` and `ctmodels.nn.SteadyState` in float32 (JAX's default), with
their default settings, against closed forms: a linear cell's fixed point and its
gradients; the backward options against the implicit gradient; Hutchinson's Jacobian
regulariser against the exact Frobenius norm; every registry fixed-point solver;
batches; failures; a short Optax training run. The float64 checks against finite
differences and unrolled differentiation are in test_deq_x64.py.

Each test compiles one function (several layers traced together where they are
compared), so that the module stays within its time budget.
"""

import functools

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import ctmodels
from ctmodels import RESULTS, SolverError, solvers
from ctmodels._errors import discard_failed_callbacks
from ctmodels.nn import DEQ, SteadyState

N = 4


class Linear(eqx.Module):
    """z -> A z + B x: the fixed point (I - A)^-1 B x in closed form."""

    A: jax.Array
    B: jax.Array

    def __call__(self, z, x):
        return self.A @ z + self.B @ x


class Tanh(eqx.Module):
    """z -> tanh(W z + U x + b), contractive for ||W|| < 1."""

    W: jax.Array
    U: jax.Array
    b: jax.Array

    def __call__(self, z, x):
        return jnp.tanh(self.W @ z + self.U @ x + self.b)


def _matrix(seed, norm, n=N):
    """A random n x n matrix of spectral norm `norm`."""
    m = np.random.default_rng(seed).standard_normal((n, n))
    return jnp.asarray(norm * m / np.linalg.norm(m, 2), jnp.float32)


def _vector(seed, n=N):
    return jnp.asarray(np.random.default_rng(seed).standard_normal(n), jnp.float32)


LIN = Linear(_matrix(0, 0.6), _matrix(1, 1.5))
X = _vector(2)
W_LOSS = _vector(3)
TANH = Tanh(_matrix(4, 0.2), _matrix(5, 1.0), 0.1 * _vector(6))


def _lin_oracle(cell, x, w):
    """z*, dL/dx, dL/dA, dL/dB of L = w . z* for the linear cell (float64 NumPy)."""
    a, b = np.asarray(cell.A, float), np.asarray(cell.B, float)
    x, w = np.asarray(x, float), np.asarray(w, float)
    i_a = np.eye(len(x)) - a
    z = np.linalg.solve(i_a, b @ x)
    lam = np.linalg.solve(i_a.T, w)  # the adjoint
    return z, b.T @ lam, np.outer(lam, z), np.outer(lam, x)


def _rel(a, b):
    a, b = np.ravel(a), np.ravel(b)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def _value_and_grad(loss):
    """`loss(cell, x) -> (value, aux)`: value, aux and the gradient with respect to
    both `(cell, x)` (their array leaves)."""
    vg = eqx.filter_value_and_grad(lambda cx: loss(*cx), has_aux=True)
    return lambda cell, x: vg((cell, x))


def _flat_grads(g):
    cell, x = g
    return np.concatenate([np.ravel(leaf) for leaf in jax.tree.leaves((cell, x))])


# -- the defaults: value and gradients of a linear cell in closed form ----------------


SOLVERS = sorted(set(solvers.names("fixed_point")) | set(solvers.names("root")))
XS = jnp.stack([X, -0.5 * X, _vector(7)])


@functools.cache
def _linear_results():
    """For the batch XS: L = sum_b w . z*(x_b) with the default DEQ (Anderson,
    implicit backward), vmapped over the batch, and its gradient with respect to the
    cell and the inputs; and each example solved in turn (`lax.map`, a loop) by
    every registry solver. One compilation for the tests below."""

    @eqx.filter_jit
    def run(cell, xs, w):
        def loss(cell, xs):
            sols = jax.vmap(DEQ(cell).solve)(xs)
            return jnp.sum(sols.value @ w), sols

        (_, sols), grads = _value_and_grad(loss)(cell, xs)
        looped = jax.lax.map(
            lambda x: {s: DEQ(cell, solver=s).solve(x) for s in SOLVERS}, xs
        )
        return sols, grads, looped

    return run(LIN, XS, W_LOSS)


def _fixed_point_tolerance(z):
    """|z - z*| allowed by the stopping rule |f(z) - z| <= atol + rtol |z| (float32
    defaults) with |(I - A)^-1| <= 1 / (1 - 0.6) = 2.5."""
    rtol, atol = ctmodels.default_tolerances("nonlinear", jnp.float32)
    return 2.5 * (atol + rtol * np.max(np.abs(z)))


def test_linear_cell_matches_closed_form_batched():
    sols, (g_cell, g_xs), looped = _linear_results()
    assert sols.value.dtype == jnp.float32
    assert bool(jnp.all(sols.result == RESULTS.successful))
    assert sols.stats["num_steps"].shape == (3,)
    assert np.all(np.asarray(sols.stats["num_steps"]) >= 1)
    assert np.all(np.asarray(sols.stats["backward_steps"]) == -1)  # implicit
    rtol, atol = ctmodels.default_tolerances("nonlinear", jnp.float32)
    gx, ga, gb = [], 0.0, 0.0
    for i in range(3):
        z, dx, da, db = _lin_oracle(LIN, XS[i], W_LOSS)
        gx.append(dx)
        ga, gb = ga + da, gb + db
        err = np.max(np.abs(np.asarray(sols.value[i]) - z))
        assert err <= _fixed_point_tolerance(z)
        assert float(sols.stats["residual"][i]) <= atol + rtol * np.max(np.abs(z))
    # the gradient is as accurate as the fixed point it differentiates
    assert _rel(g_xs, np.stack(gx)) < 1e-4
    assert _rel(g_cell.A, ga) < 1e-4
    assert _rel(g_cell.B, gb) < 1e-4
    # vmap equals a loop over the examples
    np.testing.assert_allclose(looped["anderson"].value, sols.value, rtol=0, atol=1e-6)


def test_every_registry_solver_inside_deq():
    """Every registry fixed-point (and root) solver, by name with its float32
    defaults, finds the linear cell's fixed point (the names are read when the test
    runs: a registered entry is tested too)."""
    _, _, looped = _linear_results()
    assert set(looped) == set(SOLVERS)
    for i in range(3):
        z, *_ = _lin_oracle(LIN, XS[i], W_LOSS)
        for solver, sol in looped.items():
            assert np.asarray(sol.result == RESULTS.successful)[i], solver
            err = np.max(np.abs(np.asarray(sol.value[i]) - z))
            assert err <= _fixed_point_tolerance(z), (solver, err)
            assert int(sol.stats["num_steps"][i]) >= 1, solver


# -- the backward options on a strongly contractive cell ------------------------------

PHANTOM_KS = (1, 8, 64)
MONITOR = solvers.BackwardMonitor()


@eqx.filter_jit
def _all_backwards(cell, x, w):
    """Gradients of L = w . z* with respect to (cell, x) for each backward option,
    traced together (one compilation)."""
    layers = {
        "implicit": DEQ(cell, solver="iteration", on_backward=MONITOR),
        "unrolled": DEQ(cell, solver="iteration", backward="unrolled"),
        "jacobian_free": DEQ(cell, solver="iteration", backward="jacobian_free"),
        **{
            f"phantom{k}": DEQ(
                cell, solver="iteration", backward="phantom", phantom_steps=k
            )
            for k in PHANTOM_KS
        },
    }
    out = {}
    for name, layer in layers.items():

        def loss(cell, x, layer=layer):
            sol = eqx.tree_at(lambda d: d.cell, layer, cell).solve(x)
            return w @ sol.value, sol

        (_, sol), grads = _value_and_grad(loss)(cell, x)
        out[name] = (sol, grads)
    return out


def test_backward_options_against_implicit():
    out = jax.tree.map(np.asarray, _all_backwards(TANH, X, W_LOSS))
    implicit = _flat_grads(out["implicit"][1])
    assert np.all(np.isfinite(implicit)) and np.linalg.norm(implicit) > 0.1
    for name, (sol, grads) in out.items():
        assert bool(sol.result == RESULTS.successful), name
        # the layer's value is z* whatever the backward pass
        np.testing.assert_array_equal(sol.value, out["implicit"][0].value)
        assert np.all(np.isfinite(_flat_grads(grads))), name
    # the backward linear solve reported its statistics
    assert MONITOR.records and MONITOR.last["relative_residual"] <= 1e-4
    assert MONITOR.last["num_steps"] >= 1
    # the implicit gradient equals that through the unrolled iterations
    assert _rel(_flat_grads(out["unrolled"][1]), implicit) < 1e-4
    # Jacobian-free: off by about ||df/dz|| <= 0.2, and a descent direction
    jfb = _flat_grads(out["jacobian_free"][1])
    assert 1e-3 < _rel(jfb, implicit) < 0.3
    assert jfb @ implicit > 0.9 * np.linalg.norm(jfb) * np.linalg.norm(implicit)
    assert int(out["jacobian_free"][0].stats["backward_steps"]) == 1
    # phantom gradients approach the implicit one as k grows: the error contracts by
    # about (1 - λ) + λ ||df/dz|| <= 0.6 per step
    errors = [_rel(_flat_grads(out[f"phantom{k}"][1]), implicit) for k in PHANTOM_KS]
    assert all(b < a for a, b in zip(errors, errors[1:], strict=False)), errors
    assert errors[0] < 0.7 and errors[-1] < 1e-4, errors
    for k in PHANTOM_KS:
        assert int(out[f"phantom{k}"][0].stats["backward_steps"]) == k
    assert int(out["unrolled"][0].stats["backward_steps"]) == int(
        out["unrolled"][0].stats["num_steps"]
    )


# -- Jacobian regularisation ----------------------------------------------------------

PROBES = 4000


def _exact_frobenius(cell, z, x):
    return jnp.sum(jnp.square(jax.jacfwd(lambda z: cell(z, x))(z)))


@eqx.filter_jit
def _hutchinson(cell, x, keys):
    """Per-key `jac_loss` (one probe each) and its gradient with respect to the
    cell, vmapped over the keys, for each noise; and the oracle: the exact squared
    Frobenius norm at z* and its gradient (z* held fixed, as the regulariser holds
    it)."""
    out = {}
    for noise in ("gaussian", "rademacher"):
        deq = DEQ(cell, solver="iteration", jacobian_noise=noise)

        def jac_loss(cell, key, deq=deq):
            return eqx.tree_at(lambda d: d.cell, deq, cell).solve(x, key=key).jac_loss

        if noise == "gaussian":  # the gradient for one noise is enough
            jac_loss = eqx.filter_value_and_grad(jac_loss)
        out[noise] = jax.vmap(jac_loss, in_axes=(None, 0))(cell, keys)
    z = DEQ(cell, solver="iteration")(x)
    exact, exact_grad = eqx.filter_value_and_grad(_exact_frobenius)(cell, z, x)
    return out, exact, exact_grad


def test_jacobian_regulariser_is_unbiased():
    cell = Tanh(_matrix(8, 0.8), _matrix(5, 1.0), 0.1 * _vector(6))
    keys = jax.random.split(jax.random.PRNGKey(0), PROBES)
    out, exact, exact_grad = _hutchinson(cell, X, keys)
    for noise, est in out.items():
        if noise == "gaussian":
            est, grads = est
            # the mean gradient matches the exact one (the regulariser trains the
            # cell's parameters)
            g = np.asarray(grads.W, float)
            g_se = g.std(axis=0) / np.sqrt(PROBES)
            g_err = np.abs(g.mean(axis=0) - np.asarray(exact_grad.W))
            assert np.all(g_err < 5 * g_se + 1e-5), noise
        est = np.asarray(est, float)
        assert est.shape == (PROBES,) and np.all(est >= 0), noise
        # the mean over many probes is within 4 standard errors of the exact norm
        se = est.std() / np.sqrt(PROBES)
        err = abs(est.mean() - float(exact))
        assert err < 4 * se and err < 0.05 * float(exact), (noise, err, se)
    # no key, no estimate
    assert DEQ(cell, solver="iteration").solve(X).jac_loss is None


# -- failures -------------------------------------------------------------------------


def shift(z, x):
    """z -> z + 1: no fixed point."""
    return z + 1.0


def test_nonconvergence_raises_or_is_flagged():
    deq = DEQ(shift, solver="iteration", max_steps=16)
    with pytest.raises(SolverError) as info:
        deq(X)
    first = str(info.value).splitlines()[0]
    assert first.startswith("ctmodels.fixed_point with solver 'iteration' failed")
    assert "maximum number of steps" in first and "max_steps (now 16)" in first
    assert bool(info.value.result == RESULTS.max_steps_reached)

    # under jit: a runtime error that readable_errors turns back into ours
    with pytest.raises(SolverError) as info, ctmodels.readable_errors():
        jax.block_until_ready(jax.jit(deq)(X))
    discard_failed_callbacks()
    assert str(info.value).startswith("ctmodels.fixed_point with solver 'iteration'")

    # throw=False: the last iterate and the code, never a silent success
    flagged = DEQ(shift, solver="iteration", max_steps=16, throw=False).solve(X)
    assert bool(flagged.result == RESULTS.max_steps_reached)
    assert int(flagged.stats["num_steps"]) == 16
    np.testing.assert_allclose(flagged.value, 16.0)


def test_bad_options_say_what_to_do():
    with pytest.raises(ValueError, match="backward must be one of"):
        DEQ(shift, backward="ift")
    with pytest.raises(ValueError, match="phantom_damping"):
        DEQ(shift, backward="phantom", phantom_damping=0.0)
    with pytest.raises(ValueError, match="phantom_steps must be a positive int"):
        DEQ(shift, backward="phantom", phantom_steps=0)
    with pytest.raises(ValueError, match="configure the implicit backward"):
        DEQ(shift, backward="phantom", linear_solver="lu")
    with pytest.raises(ValueError, match="cell must be a callable"):
        DEQ(np.zeros(3))
    with pytest.raises(ValueError, match="jacobian_noise"):
        DEQ(shift, jacobian_noise="uniform")
    with pytest.raises(ValueError, match="pass the initial state"):
        DEQ(lambda z, x: z[:2])(jnp.zeros(3))
    with pytest.raises(ValueError, match="cannot take.*pass the initial state"):
        DEQ(lambda z, x: jnp.ones((3, 2)) @ z)(jnp.zeros(3))
    with pytest.raises(ValueError, match="method must be 'root'"):
        SteadyState(shift, method="newton")
    with pytest.raises(ValueError, match="backward must be 'implicit' or 'unrolled'"):
        SteadyState(shift, backward="phantom")


# -- SteadyState: root finding and integration agree with the closed form -------------


class LinearField(eqx.Module):
    """dy/dt = M y + x, M stable: y* = -M^-1 x; for L = w . y*, dL/dx = -M^-T w and
    dL/dM = (dL/dx) y*^T."""

    M: jax.Array

    def __call__(self, y, x):
        return self.M @ y + x


def _stable(seed, n=N):
    rng = np.random.default_rng(seed)
    q, _ = np.linalg.qr(rng.standard_normal((n, n)))
    skew = rng.standard_normal((n, n))
    m = -(q @ np.diag(np.linspace(0.5, 1.0, n)) @ q.T) + 0.1 * (skew - skew.T)
    return jnp.asarray(m, jnp.float32)


@eqx.filter_jit
def _steady_routes(field, x, w):
    out = {}
    # the integrate route's backward linear solve named explicitly (a dense LU, what
    # the default picks for this small system)
    for method, options in (("root", {}), ("integrate", {"linear_solver": "lu"})):

        def loss(field, x, method=method, options=options):
            sol = SteadyState(field, method=method, **options).solve(x)
            return w @ sol.value, sol

        (_, sol), grads = _value_and_grad(loss)(field, x)
        out[method] = (sol, grads)
    return out


def test_steady_state_root_and_integrate_agree_with_closed_form():
    field = LinearField(_stable(9))
    out = _steady_routes(field, X, W_LOSS)
    m = np.asarray(field.M, float)
    y = -np.linalg.solve(m, np.asarray(X, float))
    dx = -np.linalg.solve(m.T, np.asarray(W_LOSS, float))
    dm = np.outer(dx, y)
    for method, (sol, (g_field, g_x)) in out.items():
        assert bool(sol.result == RESULTS.successful), method
        assert sol.value.dtype == jnp.float32
        assert _rel(sol.value, y) < 1e-4, method
        assert _rel(g_x, dx) < 1e-4, method
        assert _rel(g_field.M, dm) < 1e-4, method
    (root, g_root), (integ, g_int) = out["root"], out["integrate"]
    assert _rel(integ.value, root.value) < 1e-4
    assert _rel(_flat_grads(g_int), _flat_grads(g_root)) < 1e-4
    assert float(integ.stats["t_final"]) > 0
    assert int(root.stats["backward_steps"]) == -1


# -- training in float32 with the defaults --------------------------------------------


class BatchTanh(eqx.Module):
    """`Tanh` on a batch of states `[B, width]` and inputs `[B, 2]`."""

    W: jax.Array
    U: jax.Array
    b: jax.Array

    def __call__(self, z, x):
        return jnp.tanh(z @ self.W.T + x @ self.U.T + self.b)


class Regressor(eqx.Module):
    """x -> DEQ(tanh cell) -> linear readout on a whole batch: the cell maps the
    batch's states `[B, width]` at once, so one solve serves the batch (as torchdeq
    solves it; `jax.vmap` over a one-example layer is tested above)."""

    deq: DEQ
    readout: eqx.nn.Linear

    def __init__(self, width, key):
        k1, k2 = jax.random.split(key)
        cell = BatchTanh(
            _matrix(11, 0.5, width),
            jax.random.normal(k1, (width, 2)) / np.sqrt(2),
            jnp.zeros(width),
        )
        self.deq = DEQ(cell)
        self.readout = eqx.nn.Linear(width, 1, key=k2)


def test_training_in_float32_reduces_the_loss():
    """Fit y = sin(2 x0) x1 with Adam: the DEQ layer with its default settings trains
    in float32 (forward, implicit backward, no NaNs), with the Jacobian regulariser
    in the loss (without it this cell's weight passes spectral norm 1 after about
    20 steps and the forward iterations grow)."""
    xs = jax.random.uniform(jax.random.PRNGKey(1), (32, 2), minval=-1, maxval=1)
    ys = jnp.sin(2 * xs[:, 0]) * xs[:, 1]
    model = Regressor(8, jax.random.PRNGKey(2))
    optim = optax.adam(1e-2)
    opt_state = optim.init(eqx.filter(model, eqx.is_inexact_array))

    @eqx.filter_jit
    def step(model, opt_state, key):
        def loss(model):
            sol = model.deq.solve(xs, jnp.zeros((32, 8)), key=key)
            mse = jnp.mean((jax.vmap(model.readout)(sol.value)[:, 0] - ys) ** 2)
            return mse + 0.1 * sol.jac_loss / len(xs), (mse, sol.stats["num_steps"])

        (_, aux), grads = eqx.filter_value_and_grad(loss, has_aux=True)(model)
        updates, opt_state = optim.update(grads, opt_state, model)
        return eqx.apply_updates(model, updates), opt_state, aux

    mses, iterations = [], []
    for key in jax.random.split(jax.random.PRNGKey(3), 40):
        model, opt_state, (mse, num_steps) = step(model, opt_state, key)
        mses.append(float(mse)), iterations.append(int(num_steps))
    assert np.all(np.isfinite(mses))
    assert mses[-1] < 0.3 * mses[0], mses[::5]
    # the regulariser keeps the cell contractive: the forward solve stays cheap
    assert np.linalg.norm(np.asarray(model.deq.cell.W), 2) < 1
    assert max(iterations) < 30, iterations
