"""`ctmodels.fixed_point` and `ctmodels.root_find`: nonlinear solves through the
registry, implicit gradients, and stagnation detection."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import diffrax
import equinox as eqx
import jax
import jax.flatten_util
import jax.numpy as jnp
import optimistix as optx
from jaxtyping import Array, Bool, Int, PyTree

from . import _defaults, _errors
from ._errors import RESULTS, SolverError
from .solvers import _registry
from .solvers._implicit import ImplicitAdjoint

# A solve whose steps are at roundoff level (within `_ULPS` ulps of the iterate's size)
# and have not set a new smallest step for `_PATIENCE` iterations, without meeting the
# tolerance, has stagnated. (A slowly converging solve sets a new smallest step every
# iteration, however small its steps, so it is never flagged.)
_ULPS = 64.0
_PATIENCE = 10
# Steps that grow for `_GROWING` consecutive iterations to `_BLOWUP` times the smallest
# step seen mean the iteration has diverged. (A single huge step is not divergence: an
# accelerated solver may jump straight to a fixed point far from z0; and a convergent
# non-normal map can grow its steps a few hundred times before they decay.)
_GROWING = 8
_BLOWUP = 1e6
# A solve that met its tolerance where `fn` is (nearly) flat has not found a solution:
# on `fn(y) = exp(y)` a root finder walks towards -inf until `exp(y) <= atol`. Checked
# at the end with one Jacobian-vector product: the Newton distance to the solution,
# `|r|^2 / |J r|` along the residual `r`, must be within `_FLAT` tolerances
# `atol + rtol |y|` (with `rtol` at least 16 ulps). (At a true solution it is about
# `|r| / (1 - contraction)`: the tolerance divided by the gap between the Jacobian's
# spectrum and 0, or 1.)
_FLAT = 1e3


class FixedPointSolution(eqx.Module):
    """The result of [`ctmodels.fixed_point`][] / [`ctmodels.root_find`][].

    **Attributes:**

    - `value`: the fixed point `z* = fn(z*)` (or root `fn(y*) = 0`).
    - `stats`: `num_steps` (iterations), `num_fn_evals` (evaluations of `fn`: one
        per iteration, plus two for the final checks; the Jacobians that `"newton"`
        and `"chord"` form, one Jacobian-vector product per state dimension, are not
        counted), `residual` (max-abs of `fn(z*) - z*`, or of `fn(y*)` for a root),
        `relative_residual` (its 2-norm over that of `z*`), `stagnated` and
        `diverged` (bools) and `max_steps`. The backward pass runs later, under
        `jax.grad`: its linear solve's residual and iterations are reported to a
        [`ctmodels.solvers.BackwardMonitor`][] (`on_backward`).
    - `result`: a [`ctmodels.RESULTS`][] code.
    - `result`: a [`ctmodels.RESULTS`][] code.
    """

    value: PyTree[Array]
    stats: dict[str, Any]
    result: RESULTS


class _GuardState(eqx.Module):
    inner: Any
    stalled: Int[Array, ""]
    stagnated: Bool[Array, ""]
    prev_change: Array
    min_change: Array
    growing: Int[Array, ""]
    diverged: Bool[Array, ""]


def _guard_init(self, fn, y, args, options, f_struct, aux_struct, tags):
    inner = self.solver.init(fn, y, args, options, f_struct, aux_struct, tags)
    if isinstance(self.solver, optx.FixedPointIteration):
        # optimistix 0.1.0 initialises this state as a float64 `inf` under x64 while
        # its step produces the iterate's dtype, so float32 solves fail to trace.
        dtype = jnp.result_type(*jax.tree_util.tree_leaves(y))
        inner = jax.tree.map(lambda x: x.astype(dtype), inner)
    false, zero = jnp.array(False), jnp.array(0)
    inf = jnp.array(jnp.inf, jnp.result_type(*jax.tree_util.tree_leaves(y)))
    return _GuardState(inner, zero, false, inf, inf, zero, false)


def _max_abs(tree) -> Array:
    leaves = [jnp.max(jnp.abs(x)) for x in jax.tree_util.tree_leaves(tree) if x.size]
    return jnp.max(jnp.stack(leaves)) if leaves else jnp.array(0.0)


def _guard_step(self, fn, y, args, options, state, tags):
    new_y, inner, aux = self.solver.step(fn, y, args, options, state.inner, tags)
    change = _max_abs(jax.tree.map(lambda a, b: a - b, new_y, y))
    size = _max_abs(new_y)
    eps = jnp.finfo(jnp.result_type(*jax.tree_util.tree_leaves(new_y))).eps
    tiny = jnp.finfo(jnp.result_type(*jax.tree_util.tree_leaves(new_y))).tiny
    small = change <= _ULPS * eps * size + tiny
    improved = change < state.min_change
    stalled = jnp.where(small & ~improved, state.stalled + 1, 0)
    stagnated = state.stagnated | (stalled >= _PATIENCE)
    growing = jnp.where(change > state.prev_change, state.growing + 1, 0)
    min_change = jnp.minimum(state.min_change, change)
    diverged = state.diverged | (
        (growing >= _GROWING) & (change > _BLOWUP * min_change)
    )
    new_state = _GuardState(
        inner, stalled, stagnated, change, min_change, growing, diverged
    )
    return new_y, new_state, aux


def _guard_terminate(self, fn, y, args, options, state, tags):
    done, result = self.solver.terminate(fn, y, args, options, state.inner, tags)
    return done | state.stagnated | state.diverged, result


class _GuardedRootFinder(optx.AbstractRootFinder):
    """Wraps any root finder; stops and flags a solve stuck at roundoff level."""

    solver: optx.AbstractRootFinder

    @property
    def rtol(self):
        return self.solver.rtol

    @property
    def atol(self):
        return self.solver.atol

    @property
    def norm(self):
        return self.solver.norm

    init = _guard_init
    step = _guard_step
    terminate = _guard_terminate

    def postprocess(self, fn, y, aux, args, options, state, tags, result):
        return self.solver.postprocess(
            fn, y, aux, args, options, state.inner, tags, result
        )


class _GuardedFixedPoint(optx.AbstractFixedPointSolver):
    """Wraps any fixed-point solver; stops and flags a solve stuck at roundoff."""

    solver: optx.AbstractFixedPointSolver

    @property
    def rtol(self):
        return self.solver.rtol

    @property
    def atol(self):
        return self.solver.atol

    @property
    def norm(self):
        return self.solver.norm

    init = _guard_init
    step = _guard_step
    terminate = _guard_terminate

    def postprocess(self, fn, y, aux, args, options, state, tags, result):
        return self.solver.postprocess(
            fn, y, aux, args, options, state.inner, tags, result
        )


_Guarded = (_GuardedRootFinder, _GuardedFixedPoint)


def _stop_gradient(tree):
    return jax.tree.map(
        lambda x: jax.lax.stop_gradient(x) if eqx.is_array(x) else x, tree
    )


def _resolve_solver(solver, kind, rtol, atol):
    value, name = _registry.resolve(solver, kind, rtol=rtol, atol=atol)
    allowed = (optx.AbstractRootFinder,)
    if kind == "fixed_point":
        allowed = (optx.AbstractFixedPointSolver, optx.AbstractRootFinder)
    if not isinstance(value, allowed):
        raise ValueError(
            f"solver must be a registry name of kind {kind!r} or an Optimistix "
            f"{'fixed-point solver or ' if kind == 'fixed_point' else ''}root finder, "
            f"got {type(value).__name__}."
        )
    if isinstance(value, optx.AbstractRootFinder):
        return _GuardedRootFinder(value), name
    return _GuardedFixedPoint(value), name


# The least iteration budget of the default (matrix-free) implicit backward solve of a
# fixed point. Its loosest relative tolerance is the forward's default for the dtype
# ("nonlinear" in `_defaults`: 1e-6 in float64, 1e-5 in float32).
_BACKWARD_MIN_STEPS = 500


def _default_backward(solver, max_steps: int, dtype=None) -> dict[str, Any]:
    """The linear solver of `adjoint="implicit"` for a fixed point: matrix-free (the
    DEQ setting, where forming the Jacobian costs one JVP per state dimension), and
    mirroring the forward solver. Plain / damped iteration gets the plain (damped)
    adjoint iteration ("neumann"), which converges whenever the forward one does, at
    the same rate, and costs one VJP per step and nothing else; the accelerated
    solvers get Anderson-accelerated adjoint iteration ("anderson_linear"). The
    adjoint iteration contracts as fast as the forward one, so it gets the forward's
    iteration budget (at least `_BACKWARD_MIN_STEPS`), and the forward's relative
    tolerance where that is tighter than the default one of `dtype` (a gradient as
    accurate as the fixed point it differentiates; in float32 not below what float32
    resolves, where the backward iteration would only stagnate)."""
    inner = solver.solver if isinstance(solver, _Guarded) else solver
    loosest, _ = _defaults.default_tolerances("nonlinear", dtype)
    opts = {"max_steps": max(_BACKWARD_MIN_STEPS, max_steps), "rtol": loosest}
    try:
        rtol = float(inner.rtol)
    except (AttributeError, TypeError):  # no (concrete) relative tolerance
        rtol = 0.0
    if 0 < rtol < loosest:
        opts["rtol"] = rtol
    if isinstance(inner, optx.FixedPointIteration):
        return {"linear_solver": "neumann", "damp": inner.damp, **opts}
    return {"linear_solver": "anderson_linear", **opts}


def resolve_nonlinear_adjoint(
    adjoint,
    kind: str = "root",
    solver=None,
    max_steps: int = 0,
    dtype=None,
    on_backward=None,
):
    """Registry name / value -> an Optimistix adjoint. For fixed points the name
    "implicit" means a matrix-free backward solve chosen to match `solver` and its
    `max_steps` (see `_default_backward`), reporting its statistics to
    `on_backward` when given."""
    if isinstance(adjoint, str):
        options = {}
        if kind == "fixed_point" and adjoint.strip().lower() == "implicit":
            options = _default_backward(solver, max_steps, dtype)
            if on_backward is not None:
                options["on_backward"] = on_backward
        adjoint, _ = _registry.resolve(adjoint, "adjoint", **options)
    if isinstance(adjoint, ImplicitAdjoint):
        return adjoint.to_optimistix()
    if isinstance(adjoint, diffrax.RecursiveCheckpointAdjoint):
        return optx.RecursiveCheckpointAdjoint(checkpoints=adjoint.checkpoints)
    if isinstance(adjoint, optx.AbstractAdjoint):
        return adjoint
    raise ValueError(
        "A fixed-point or root solve is differentiated with adjoint='implicit' "
        "(implicit function theorem, default) or adjoint='checkpoint' (backprop "
        f"through the unrolled iterations), not {type(adjoint).__name__}."
    )


def _flat(fn, z, args, kind, rtol, atol):
    """(the residual at `z`, whether the Newton distance `|r|^2 / |J r|` along the
    residual exceeds `_FLAT` tolerances: `fn` is flat there and `z` is no solution).
    One evaluation of `fn` and one Jacobian-vector product; no gradient."""
    z, args = jax.lax.stop_gradient(z), _stop_gradient(args)

    def g(y):
        out = fn(y, args)
        if kind == "fixed_point":
            out = jax.tree.map(lambda a, b: a - b, out, y)
        return out

    resid, lin = jax.linearize(g, z)
    jr = lin(resid)
    r_flat, _ = jax.flatten_util.ravel_pytree(resid)
    jr_flat, _ = jax.flatten_util.ravel_pytree(jr)
    r2 = jnp.sqrt(jnp.sum(jnp.abs(r_flat) ** 2))
    jr2 = jnp.sqrt(jnp.sum(jnp.abs(jr_flat) ** 2))
    # a tolerance below roundoff (rtol=1e-12 in float32) is judged at roundoff
    eps = jnp.finfo(r_flat.dtype).eps
    tol = atol + jnp.maximum(rtol, 16 * eps) * _max_abs(z)
    flat = _max_abs(resid) * r2 > _FLAT * tol * jr2
    return resid, flat


def _solve(entry, fn, y0, args, solver, kind, adjoint, rtol, atol, max_steps, throw):
    if not callable(fn):
        raise ValueError(f"fn must be a callable fn(z, args), got {type(fn).__name__}.")
    if not isinstance(max_steps, int) or max_steps < 1:
        raise ValueError(f"max_steps must be a positive int, got {max_steps!r}.")
    _errors.check_tolerances(rtol, atol, entry)
    y0 = jax.tree.map(lambda x: jnp.asarray(x, jnp.result_type(x, float)), y0)
    rtol, atol = _defaults.tolerances("nonlinear", y0, rtol, atol)
    if not jax.tree_util.tree_leaves(y0):
        raise ValueError(f"The initial guess of {entry} has no arrays.")
    out_struct = jax.eval_shape(lambda: fn(y0, args))
    in_struct = jax.eval_shape(lambda: y0)
    if eqx.tree_equal(in_struct, out_struct) is not True:
        raise ValueError(
            f"fn must return a pytree with the same structure, shapes and dtypes as "
            f"its input z; got input {in_struct} and output {out_struct}."
        )
    solver_v, name = _resolve_solver(solver, kind, rtol, atol)
    adjoint_v = resolve_nonlinear_adjoint(
        adjoint, kind, solver_v, max_steps, _defaults.state_dtype(y0)
    )
    call = optx.fixed_point if kind == "fixed_point" else optx.root_find
    sol = call(
        fn, solver_v, y0, args, max_steps=max_steps, adjoint=adjoint_v, throw=False
    )
    value = sol.value
    stagnated = sol.state.stagnated
    result = _errors.from_optimistix(sol.result)
    ok = result == RESULTS.successful
    result = RESULTS.where(ok & sol.state.diverged, RESULTS.divergence, result)
    result = RESULTS.where(ok & stagnated, RESULTS.stagnation, result)
    z = jax.lax.stop_gradient(value)
    resid, flat = _flat(fn, z, args, kind, solver_v.rtol, solver_v.atol)
    ok = result == RESULTS.successful
    result = RESULTS.where(ok & flat, RESULTS.no_solution, result)
    num = jnp.sqrt(
        sum(jnp.sum(jnp.abs(r) ** 2) for r in jax.tree_util.tree_leaves(resid))
    )
    den = jnp.sqrt(sum(jnp.sum(jnp.abs(r) ** 2) for r in jax.tree_util.tree_leaves(z)))
    stats = {
        "num_steps": sol.stats["num_steps"],
        "num_fn_evals": sol.stats["num_steps"] + 2,
        "residual": _max_abs(resid),
        "relative_residual": num / (den + jnp.finfo(den.dtype).tiny),
        "stagnated": stagnated,
        "diverged": sol.state.diverged,
        "max_steps": max_steps,
    }
    if throw:
        dtype, eps = _errors.dtype_eps(y0)
        ctx = dict(max_steps=max_steps, rtol=rtol, atol=atol, dtype=dtype, eps=eps)
        if not isinstance(solver, str):
            ctx.update(rtol=solver_v.rtol, atol=solver_v.atol)
        if _errors.is_traced(value, result):
            value = _errors.raise_if_failed_traced(result, value, entry, name, **ctx)
        elif not bool(result == RESULTS.successful):
            code = _errors.result_name(result)
            where = (
                f"after {int(stats['num_steps'])} iterations (residual "
                f"{float(stats['residual']):.3g}, relative "
                f"{float(stats['relative_residual']):.3g})"
            )
            raise SolverError(
                _errors.explain(entry, name, code, where, **ctx),
                result=result,
                solver=name,
                entry=entry,
            )
    return FixedPointSolution(value=value, stats=stats, result=result)


def fixed_point(
    fn: Callable[[PyTree[Array], Any], PyTree[Array]],
    y0: PyTree[Array] = None,
    args: PyTree[Any] = None,
    *,
    solver: str | optx.AbstractFixedPointSolver | optx.AbstractRootFinder = "anderson",
    adjoint: str | optx.AbstractAdjoint | ImplicitAdjoint = "implicit",
    rtol: float | None = None,
    atol: float | None = None,
    max_steps: int = 256,
    throw: bool = True,
    z0: PyTree[Array] = None,
) -> FixedPointSolution:
    """Find `z*` with `fn(z*, args) = z*`, starting from `y0`.

    jit-, vmap- and grad-safe; with `adjoint="implicit"` the gradient with respect to
    `args` comes from the implicit function theorem (one linear solve, no storage of
    the iterations).

    **Arguments:**

    - `fn`: `fn(z, args) -> z`, returning a pytree with the structure of `z`. (A
        map of the state, hence `fn`; the ODE entry points take a `vector_field`
        `f(t, y, args)`, a time derivative, in Diffrax's convention.)
    - `y0`: the initial guess (the state is `y` in every entry point; `z0=` is the
        old, deprecated name of this argument).
    - `args`: parameters of `fn`; differentiate with respect to them.
    - `solver`: a registry name of kind `fixed_point` (`"anderson"` default,
        `"broyden"`, `"iteration"`, `"damped"`, `"newton"`, `"chord"`) or an
        Optimistix fixed-point solver or root finder.
    - `adjoint`: `"implicit"` (default) or `"checkpoint"` (differentiate the unrolled
        iterations), or an adjoint value. By name, `"implicit"` solves the backward
        linear system matrix-free, mirroring `solver`: plain (damped) adjoint
        iteration for `"iteration"` / `"damped"`, Anderson-accelerated adjoint
        iteration otherwise; to the default relative tolerance of the dtype (1e-6
        in float64, 1e-5 in float32; or `rtol`, if tighter and positive) within
        `max(max_steps, 500)` iterations. Pass
        `ctmodels.solvers.get("implicit", linear_solver=...)` to choose another.
    - `rtol`, `atol`: tolerances of a solver given by name. The solve stops when
        `|fn(z) - z| <= atol + rtol * |z|` elementwise. `None` (default) means the
        default for the dtype of `y0` (docs/precision.md): `1e-6`, `1e-8` in float64
        and `1e-5`, `1e-6` in float32.
    - `max_steps`: the most iterations.
    - `throw`: raise a [`ctmodels.SolverError`][] on failure, or return the code.

    **Returns:** a [`ctmodels.FixedPointSolution`][].

    A tolerance tighter than the dtype can reach is detected: the solve stops once the
    iterates stop moving (at roundoff level) and reports `RESULTS.stagnation`.
    Success is not reported where there is no fixed point: iterates that grow without
    bound are `RESULTS.divergence`, and a tolerance met only because `fn(z) - z` is
    (nearly) constant there is `RESULTS.no_solution` (checked with one
    Jacobian-vector product at the end).

    Reference: Bai, Kolter & Koltun, "Deep Equilibrium Models", NeurIPS 2019.
    """
    if z0 is not None:
        if y0 is not None:
            raise ValueError(
                "fixed_point got both y0 and z0 (its old name); pass only y0."
            )
        warnings.warn(
            "fixed_point(..., z0=...) is deprecated: the initial guess is y0 in every "
            "entry point; pass it as fixed_point(fn, y0, args) or y0=...",
            DeprecationWarning,
            stacklevel=2,
        )
        y0 = z0
    if y0 is None:
        raise ValueError(
            "fixed_point needs an initial guess: fixed_point(fn, y0, args)."
        )
    return _solve(
        "fixed_point", fn, y0, args, solver, "fixed_point", adjoint, rtol, atol,
        max_steps, throw,
    )  # fmt: skip


def root_find(
    fn: Callable[[PyTree[Array], Any], PyTree[Array]],
    y0: PyTree[Array],
    args: PyTree[Any] = None,
    *,
    solver: str | optx.AbstractRootFinder = "newton",
    adjoint: str | optx.AbstractAdjoint | ImplicitAdjoint = "implicit",
    rtol: float | None = None,
    atol: float | None = None,
    max_steps: int = 256,
    throw: bool = True,
) -> FixedPointSolution:
    """Find `y*` with `fn(y*, args) = 0`, starting from `y0`.

    Same contract as [`ctmodels.fixed_point`][]; `solver` is a registry name of kind
    `root` (`"newton"` default, `"chord"`, `"anderson"`, `"broyden"`) or an Optimistix
    root finder. Anderson iterates `y <- y + beta * fn(y)`, so it suits `fn` whose
    Jacobian has eigenvalues with negative real part (e.g. a stable vector field).
    """
    return _solve(
        "root_find", fn, y0, args, solver, "root", adjoint, rtol, atol, max_steps,
        throw,
    )  # fmt: skip
