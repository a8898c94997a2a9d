"""The implicit adjoint shared by every entry point, with a checked backward solve."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import diffrax
import equinox as eqx
import jax
import jax.flatten_util
import jax.numpy as jnp
import lineax as lx
import optimistix as optx

from .. import _errors

# The stats key under which a linear solver of ours reports the 2-norm residual
# `|A x - b|` of the solution it returns, so that `CheckedLinearSolver` can trust it.
_RESIDUAL = "residual_norm"


def _norm(tree) -> jax.Array:
    leaves = jax.tree_util.tree_leaves(tree)
    return jnp.sqrt(sum(jnp.sum(jnp.abs(x) ** 2) for x in leaves))


def _max_abs(tree) -> jax.Array:
    leaves = [jnp.max(jnp.abs(x)) for x in jax.tree_util.tree_leaves(tree) if x.size]
    return jnp.max(jnp.stack(leaves)) if leaves else jnp.array(0.0)


class CheckedLinearSolver(lx.AbstractLinearSolver):
    """Wraps a Lineax solver: after each solve it measures the relative residual
    `|A x - b| / |b|`, reports it to `on_solve` (if given) and raises a readable error
    when it exceeds `tol` or is not finite — so a failed implicit backward pass never
    returns a silent NaN gradient."""

    inner: lx.AbstractLinearSolver
    tol: float = 1e-2
    on_solve: Callable[[dict[str, Any]], None] | None = eqx.field(
        static=True, default=None
    )

    def init(self, operator, options):
        return operator, self.inner.init(operator, options)

    def compute(self, state, vector, options):
        operator, inner_state = state
        x, result, stats = self.inner.compute(inner_state, vector, options)
        if _RESIDUAL in stats:
            # The inner solver measured `|A x - b|` of the `x` it returns (an
            # iterative solver computes that residual anyway to decide when to stop):
            # no need for another application of the operator.
            res = stats[_RESIDUAL]
        else:
            res = _norm(jax.tree.map(lambda a, b: a - b, operator.mv(x), vector))
        b = _norm(vector)
        rel = res / jnp.where(b > 0, b, 1.0)
        if self.on_solve is not None:
            # the iterations of an iterative backward solve, where it reports them
            # (-1 for a direct solve)
            steps = stats.get("num_steps", -1)
            jax.debug.callback(
                lambda res_, rel_, steps_: self.on_solve(
                    {
                        "residual": float(res_),
                        "relative_residual": float(rel_),
                        "num_steps": int(steps_),
                    }
                ),
                res,
                rel,
                steps,
            )
        bad = ~jnp.isfinite(rel) | (rel > self.tol)
        # Our residual check is the arbiter: an inner solver that flags a tolerance
        # quirk (e.g. lineax GMRES "stagnation" at a residual we accept) should not
        # turn a usable solve into an opaque error, and a bad one raises ours below.
        result = lx.RESULTS.where(bad, result, lx.RESULTS.successful)
        x = _errors.error_if(
            x,
            bad,
            "ctmodels: the implicit backward pass's linear solve failed (its relative "
            "residual |A x - b| / |b| is above the tolerance or not finite): the "
            "Jacobian (I - df/dz at the fixed point, or df/dy at the steady state) is "
            "singular or ill-conditioned there, or the forward solve did not "
            "converge. Try: a tighter forward tolerance, linear_solver='qr' or "
            "'gmres' in ctmodels.solvers.get('implicit', linear_solver=...), or "
            "adjoint='checkpoint'.",
        )
        return x, result, stats

    def transpose(self, state, options):
        operator, inner_state = state
        inner_t, options_t = self.inner.transpose(inner_state, options)
        return (operator.T, inner_t), options_t

    def conj(self, state, options):
        operator, inner_state = state
        inner_c, options_c = self.inner.conj(inner_state, options)
        return (lx.conj(operator), inner_c), options_c

    def assume_full_rank(self):
        return self.inner.assume_full_rank()


def _iterate_linear(operator, b, x0, step, step_state, rtol, max_steps, patience):
    """The loop shared by the matrix-free iterative solvers below.

    Iterates `x <- step(x, A x - b)` from `x0` and stops at the first iterate with
    `max|A x - b| <= rtol * max(max|b|, max|x|)` (a residual relative to the size of
    the solution, as the forward test `|f(z) - z| <= rtol |z|` is), on a non-finite
    residual, after `max_steps` operator applications, or once the residual has not
    reached a new minimum for `patience` iterations (a tolerance finer than the dtype
    resolves: the residual then wanders at its roundoff floor). Returns the iterate
    with the smallest residual, whether it met the tolerance, the number of operator
    applications, and the 2-norm of its residual (so that the caller needs no extra
    application to check it).
    """
    b_scale = _max_abs(b)
    tiny = jnp.finfo(b_scale.dtype).tiny

    def residual(x):
        r = jax.tree.map(lambda a, c: a - c, operator.mv(x), b)
        tol = rtol * jnp.maximum(b_scale, _max_abs(x)) + tiny
        return r, _max_abs(r) / tol  # <= 1: converged

    r0, e0 = residual(x0)

    def cond(carry):
        k, _, _, err, _, _, _, best_err, since = carry
        return (k < max_steps) & (best_err > 1) & jnp.isfinite(err) & (since < patience)

    def body(carry):
        k, x, r, _, state, best_x, best_r, best_err, since = carry
        x, state = step(x, r, state)
        r, err = residual(x)
        better = err < best_err
        pick = lambda new, old: jax.tree.map(  # noqa: E731
            lambda p, q: jnp.where(better, p, q), new, old
        )
        best_x, best_r = pick(x, best_x), pick(r, best_r)
        best_err = jnp.where(better, err, best_err)
        since = jnp.where(better, 0, since + 1)
        return k + 1, x, r, err, state, best_x, best_r, best_err, since

    init = (jnp.array(1), x0, r0, e0, step_state, x0, r0, e0, jnp.array(0))
    out = jax.lax.while_loop(cond, body, init)
    k, x, r, best_err = out[0], out[5], out[6], out[7]
    ok = best_err <= 1
    result = lx.RESULTS.where(ok, lx.RESULTS.successful, lx.RESULTS.max_steps_reached)
    return x, result, {"num_steps": k, _RESIDUAL: _norm(r)}


class AndersonLinearSolver(lx.AbstractLinearSolver):
    """Matrix-free solve of `A x = b` by Anderson-accelerated iteration
    `x <- x + (A x - b)`: one operator application (a JVP or VJP) per iteration, no
    Jacobian is ever formed.

    In the implicit backward pass of a fixed point `z* = f(z*)` the operator is
    `A = df/dz - I`, so this iterates the adjoint fixed point `x <- J^T x - b` as
    torchdeq and the DEQ papers do, accelerated; it converges when `J` is a
    contraction (spectral radius below 1), i.e. for any DEQ whose forward map
    contracts. For stiff steady states (eigenvalues of `df/dy` far left of -2) use a
    direct solver (`"auto"`, `"lu"`) or `"gmres"`.

    Stops at the first iterate with `max|A x - b| <= rtol * max(max|b|, max|x|)` (a
    residual relative to the size of the solution, like the forward test) and
    returns it with its residual reported, so the checked implicit adjoint needs no
    extra operator application. A tolerance below what the dtype resolves is not
    chased to `max_steps`: after `patience` iterations without a new smallest
    residual the best iterate is returned (and judged by the adjoint's
    `backward_tol`).

    **Arguments:** `rtol`, `max_steps`, `memory` (Anderson history), `patience`.
    """

    rtol: float = 1e-6
    max_steps: int = eqx.field(static=True, default=500)
    memory: int = eqx.field(static=True, default=5)
    patience: int = eqx.field(static=True, default=30)

    def init(self, operator, options):
        # Linearise once (jax.linearize): every iteration then costs one application
        # of the stored linear map instead of re-tracing the function's JVP/VJP.
        return lx.linearise(operator)

    def compute(self, state, vector, options):
        from ._anderson import Anderson

        operator = state
        # The driver decides convergence; with zero tolerances Anderson never stops
        # (nor freezes its iterate) by itself.
        solver = Anderson(rtol=0.0, atol=0.0, memory=self.memory)
        x0 = jax.tree.map(jnp.negative, vector)
        struct = jax.eval_shape(lambda: vector)
        anderson_state = solver.init(None, x0, None, {}, struct, None, frozenset())

        def step(x, r, anderson_state):
            # Anderson evaluates the residual through `fn`; hand it the one the
            # driver has already computed at `x`.
            x, anderson_state, _ = solver.step(
                lambda y, args: (r, None), x, None, {}, anderson_state, frozenset()
            )
            return x, anderson_state

        return _iterate_linear(
            operator, vector, x0, step, anderson_state, self.rtol, self.max_steps,
            self.patience,
        )  # fmt: skip

    def transpose(self, state, options):
        return state.T, options

    def conj(self, state, options):
        return lx.conj(state), options

    def assume_full_rank(self):
        return True


class NeumannLinearSolver(lx.AbstractLinearSolver):
    """Matrix-free solve of `A x = b` by the plain (optionally damped) iteration
    `x <- x + w (A x - b)`, `w = 1 - damp`: one operator application (a JVP or VJP)
    per iteration and nothing else, no history, no Jacobian.

    In the implicit backward pass of a fixed point `z* = f(z*)` the operator is
    `A = J - I` (`J = df/dz`, transposed for reverse mode), so this iterates the
    adjoint fixed point `x <- J^T x - b`, whose iterates from `x = 0` are the partial
    sums of the Neumann series `-(I + J^T + J^T^2 + ...) b`. It converges exactly
    when the forward plain iteration `z <- f(z)` does near `z*` (spectral radius of
    `J` below 1; with damping, of `(1 - w) I + w J`), at the same rate, which makes
    it the natural backward of `fixed_point(..., solver="iteration" | "damped")`:
    the backward mirrors the forward, as in the DEQ papers and torchdeq.

    Stopping rule, returned iterate and stagnation exit as for
    [`ctmodels.solvers.AndersonLinearSolver`][]: the first iterate with
    `max|A x - b| <= rtol * max(max|b|, max|x|)`, its residual reported.

    **Arguments:** `rtol`, `max_steps`, `damp` (in `[0, 1)`; `0` is undamped),
    `patience`.

    Reference: Bai, Kolter & Koltun, "Deep Equilibrium Models", NeurIPS 2019;
    Geng et al., "On training implicit models", NeurIPS 2021.
    """

    rtol: float = 1e-6
    max_steps: int = eqx.field(static=True, default=500)
    damp: float = 0.0
    patience: int = eqx.field(static=True, default=30)

    def __check_init__(self):
        if isinstance(self.damp, int | float) and not 0 <= self.damp < 1:
            raise ValueError(f"damp must be in [0, 1), got {self.damp!r}.")

    def init(self, operator, options):
        # Linearise once: every iteration then applies the stored linear map.
        return lx.linearise(operator)

    def compute(self, state, vector, options):
        dtype = jnp.result_type(*jax.tree_util.tree_leaves(vector))
        w = 1 - jnp.asarray(self.damp, dtype)

        def step(x, r, _):
            return jax.tree.map(lambda a, c: a + w * c, x, r), None

        # x_0 = 0 would give x_1 = -w b with no operator application: start there.
        x0 = jax.tree.map(lambda c: -w * c, vector)
        return _iterate_linear(
            state, vector, x0, step, None, self.rtol, self.max_steps, self.patience
        )

    def transpose(self, state, options):
        return state.T, options

    def conj(self, state, options):
        return lx.conj(state), options

    def assume_full_rank(self):
        return True


class BackwardMonitor:
    """Collects the statistics of implicit backward passes (one dict per linear
    solve: `residual`, `relative_residual`, and `num_steps`, the iterations of an
    iterative solver, each one Jacobian-vector product; -1 for a direct solve) for
    inspection:

    ```python
    monitor = ctmodels.solvers.BackwardMonitor()
    adjoint = ctmodels.solvers.get("implicit", on_backward=monitor)
    jax.grad(loss)(params)  # loss calls ctmodels.fixed_point(..., adjoint=adjoint)
    monitor.last["relative_residual"]
    ```
    """

    def __init__(self):
        self.records: list[dict[str, float]] = []

    def __call__(self, stats: dict[str, float]) -> None:
        self.records.append(stats)

    @property
    def last(self) -> dict[str, float]:
        if not self.records:
            raise ValueError("No implicit backward pass has run yet.")
        return self.records[-1]


class ImplicitAdjoint(eqx.Module):
    """Differentiate a solve through the implicit function theorem.

    One value for every entry point: [`ctmodels.steady_state`][] turns it into
    `diffrax.ImplicitAdjoint`, [`ctmodels.fixed_point`][] and [`ctmodels.root_find`][]
    into `optimistix.ImplicitAdjoint`. The backward pass solves one linear system
    with `linear_solver`; its relative residual is checked against `backward_tol`
    (a failure raises a readable error rather than returning NaN gradients) and
    reported to `on_backward` (e.g. a [`ctmodels.solvers.BackwardMonitor`][]).

    **Arguments:**

    - `linear_solver`: a Lineax solver (default: `lineax.AutoLinearSolver`).
    - `backward_tol`: the largest acceptable relative residual of the backward solve.
    - `on_backward`: `None` or a callable receiving `{"residual",
        "relative_residual"}` after each backward linear solve.

    Reference: Bai, Kolter & Koltun, "Deep Equilibrium Models", NeurIPS 2019;
    Blondel et al., "Efficient and modular implicit differentiation", NeurIPS 2022.
    """

    linear_solver: lx.AbstractLinearSolver = lx.AutoLinearSolver(well_posed=None)
    backward_tol: float = 1e-2
    on_backward: Callable[[dict[str, Any]], None] | None = eqx.field(
        static=True, default=None
    )

    def _checked(self) -> CheckedLinearSolver:
        return CheckedLinearSolver(
            self.linear_solver, self.backward_tol, self.on_backward
        )

    def to_diffrax(self) -> diffrax.ImplicitAdjoint:
        return diffrax.ImplicitAdjoint(linear_solver=self._checked())

    def to_optimistix(self) -> optx.ImplicitAdjoint:
        return optx.ImplicitAdjoint(linear_solver=self._checked())
