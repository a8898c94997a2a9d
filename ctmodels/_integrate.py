"""`ctmodels.integrate`: solve an ODE through the registry, with readable failures."""

from __future__ import annotations

import typing
from collections.abc import Callable
from typing import Any

import diffrax
import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optimistix as optx
from jaxtyping import Array, ArrayLike, PyTree

from . import _defaults, _errors
from ._errors import RESULTS, SolverError
from .solvers import _registry
from .solvers._implicit import ImplicitAdjoint


class Solution(eqx.Module):
    """The result of [`ctmodels.integrate`][] and [`ctmodels.integrate_sde`][].

    **Attributes:**

    - `ts`: the times of `ys`: the requested times (default), or those of the chosen
        `saveat` (`"t1"`: the last time; `"steps"`: every step, padded with `inf` to
        `max_steps`).
    - `ys`: the state at each of `ts` (a pytree like `y0` with a leading time axis);
        `inf` at times the solve did not reach (after a failure, or after an event).
    - `stats`: `num_steps` (attempted), `num_accepted_steps`, `num_rejected_steps`,
        `num_fn_evals` (vector-field evaluations of the forward solve, counted from the
        stepper's stages; `-1` where the count is not known in advance, e.g. implicit
        steppers whose Newton iterations vary) and `max_steps`.
    - `result`: a [`ctmodels.RESULTS`][] code; `RESULTS.successful` on success (an
        event that stopped the solve is a success).
    - `interpolation`: with `dense=True`, Diffrax's dense interpolation of the whole
        solve (use `evaluate`); otherwise None.
    - `event_time`: with an `event`, the time the solve stopped (the event time if
        it fired, else `ts[-1]`); differentiable with respect to `args` and `y0`
        when the event function is real-valued. Otherwise None.
    - `event_occurred`: with an `event`, whether it fired (a bool); otherwise None.
    - `value`: the same as `ys` (every solution of the engine, this one and
        [`ctmodels.FixedPointSolution`][], has `value`, `stats` and `result`).
    """

    ts: Array
    ys: PyTree[Array]
    stats: dict[str, Any]
    result: RESULTS
    interpolation: Any = None
    event_time: Array | None = None
    event_occurred: Array | None = None

    def _dense(self):
        if self.interpolation is None:
            raise ValueError(
                "This solution has no dense output; call ctmodels.integrate(..., "
                "dense=True) to evaluate it at any time."
            )
        return self.interpolation

    def evaluate(self, t0: ArrayLike, t1: ArrayLike | None = None, left: bool = True):
        """The state at time `t0` (within the solved interval), from the dense output;
        with `t1`, the increment `y(t1) - y(t0)`. Needs `dense=True`. Vectorise over
        several times with `jax.vmap(sol.evaluate)(times)`."""
        return self._dense().evaluate(t0, t1, left)

    def derivative(self, t: ArrayLike, left: bool = True):
        """The time derivative of the dense output at `t` (needs `dense=True`)."""
        return self._dense().derivative(t, left)

    @property
    def value(self) -> PyTree[Array]:
        """The solution at `ts`: the same as `ys`."""
        return self.ys


def _evals_per_step(solver) -> tuple[int, int] | None:
    """(vector-field evaluations per attempted step, evaluations at the start) of an
    explicit stepper; None where the count varies (implicit steppers)."""
    if isinstance(solver, diffrax.AbstractImplicitSolver):
        return None
    if isinstance(solver, diffrax.Euler | diffrax.LeapfrogMidpoint):
        return 1, 0
    if isinstance(solver, diffrax.ReversibleHeun):
        return 1, 1
    tableau = getattr(solver, "tableau", None)
    if isinstance(tableau, diffrax.ButcherTableau):
        stages = len(tableau.c) + 1
        return (stages - 1, 1) if tableau.fsal else (stages, 0)
    return None


def _zero_field(t, y, args):
    """The explicit part of an IMEX solve given one (implicit) vector field; module
    level so repeated calls hit Diffrax's compilation cache."""
    return jax.tree.map(jnp.zeros_like, y)


def _fill_root_finder_tols(solver, rtol, atol):
    """Give an implicit stepper's root finder our tolerances where it defers to the
    (absent) adaptive controller, so implicit steppers also work with fixed steps."""
    if not isinstance(solver, diffrax.AbstractImplicitSolver):
        return solver
    from diffrax._root_finder import use_stepsize_tol

    rf = solver.root_finder
    vals = {"rtol": rtol, "atol": atol, "norm": optx.rms_norm}
    missing = [a for a in vals if getattr(rf, a, None) is use_stepsize_tol]
    if not missing:
        return solver
    return eqx.tree_at(
        lambda s: tuple(getattr(s.root_finder, a) for a in missing),
        solver,
        tuple(vals[a] for a in missing),
    )


def _initial_step(terms, solver, controller, t0, t1, y0, args):
    """The starting step of an adaptive solve given `dt0=None` (see
    `_hairer_initial_step`). Returns `None` (leave it to Diffrax) where the algorithm
    does not apply: several terms (IMEX), a controller other than
    `diffrax.PIDController`, or a solver without an error order."""
    if not isinstance(terms, diffrax.ODETerm):
        return None
    if not isinstance(controller, diffrax.PIDController):
        return None
    error_order = controller.error_order
    if error_order is None:
        error_order = solver.error_order(terms)
    if error_order is None:
        return None
    y0, args = jax.tree.map(
        lambda x: jax.lax.stop_gradient(x) if eqx.is_array(x) else x, (y0, args)
    )
    y0 = jax.tree.map(lambda x: jnp.asarray(x, jnp.result_type(x, float)), y0)
    # jitted: an eager `integrate` then traces the vector field here only once
    return _hairer_initial_step(terms, controller, error_order, t0, t1, y0, args)


@eqx.filter_jit
def _hairer_initial_step(terms, controller, error_order, t0, t1, y0, args):
    """The starting step size of an adaptive solve, by the algorithm of Hairer,
    Norsett & Wanner (Solving ODEs I, II.4): a first guess `h0 = 0.01 |y0| / |f0|`
    (in the controller's weighted norm), one explicit Euler step of that size to
    estimate the second derivative, and `h1 = (0.01 / max(|f0|, |f'|)) ** (1 /
    error_order)`; the smaller of `100 h0` and `h1`. Two vector-field evaluations.

    This is what `diffrax.PIDController` means to do when `dt0=None`, but in Diffrax
    0.7.2 its check `isinstance(terms, ODETerm)` never holds (`diffeqsolve` has
    already wrapped the terms in a `WrapTerm`), so every adaptive Diffrax solve starts
    from a fixed `dt0 = 0.01` whatever the problem's scale.

    Like Diffrax (and torchdiffeq) the choice is not differentiated.
    """
    rtol, atol, norm = controller.rtol, controller.atol, controller.norm
    direction = jnp.sign(t1 - t0)

    def scaled(tree):
        return jax.tree.map(lambda x, y: x / (atol + rtol * jnp.abs(y)), tree, y0)

    f0 = terms.vf(t0, y0, args)
    d0 = norm(scaled(y0))
    d1 = norm(scaled(f0))
    tiny = (d0 < 1e-5) | (d1 < 1e-5)
    h0 = jnp.where(tiny, 1e-6, 0.01 * d0 / jnp.where(tiny, 1, d1))
    y1 = jax.tree.map(lambda y, f: y + direction * h0 * f, y0, f0)
    f1 = terms.vf(t0 + direction * h0, y1, args)
    d2 = norm(scaled(jax.tree.map(lambda a, b: a - b, f1, f0))) / h0
    dmax = jnp.maximum(d1, d2)
    flat = dmax <= 1e-15
    h1 = jnp.where(
        flat,
        jnp.maximum(1e-6, h0 * 1e-3),
        (0.01 / jnp.where(flat, 1, dmax)) ** (1 / error_order),
    )
    h = jnp.minimum(100 * h0, h1)
    if controller.dtmax is not None:
        h = jnp.minimum(h, controller.dtmax)
    if controller.dtmin is not None:
        h = jnp.maximum(h, controller.dtmin)
    return jax.lax.stop_gradient(direction * h)


def resolve_adjoint(adjoint, entry: str):
    """Registry name / value -> a Diffrax adjoint."""
    adj, name = _registry.resolve(adjoint, "adjoint")
    if isinstance(adj, ImplicitAdjoint):
        if entry in ("integrate", "integrate_sde"):
            raise ValueError(
                f"ctmodels.{entry}: adjoint='implicit' differentiates a fixed point or "
                "steady state, not "
                "a trajectory. For a trajectory use 'checkpoint' (default), "
                "'backsolve', 'direct' or 'forward'; for equilibria use "
                "ctmodels.steady_state."
            )
        adj = adj.to_diffrax()
    if not isinstance(adj, diffrax.AbstractAdjoint):
        raise ValueError(
            f"adjoint must be a registry name of kind 'adjoint' or a "
            f"diffrax.AbstractAdjoint, got {type(adj).__name__}."
        )
    return adj, name


def _tolerance_kind(solver) -> str:
    """The row of the defaults table for `solver` (a name or a value): implicit
    steppers get `"implicit_ode"` (looser in float32), the others `"ode"`."""
    try:
        value, _ = _registry.resolve(solver, "ode")
    except ValueError:
        return "ode"  # resolve_ode reports the bad solver
    return (
        "implicit_ode" if isinstance(value, diffrax.AbstractImplicitSolver) else "ode"
    )


def resolve_ode(solver, vector_field, controller, rtol, atol, dt0):
    """Registry names / values -> (terms, solver, controller, name)."""
    solver, name = _registry.resolve(solver, "ode")
    if not isinstance(solver, diffrax.AbstractSolver):
        raise ValueError(
            "solver must be a registry name of kind 'ode' or a "
            f"diffrax.AbstractSolver, got {type(solver).__name__}."
        )
    imex = isinstance(solver, diffrax.KenCarp3 | diffrax.KenCarp4 | diffrax.KenCarp5)
    imex = imex or isinstance(solver, diffrax.Sil3)
    if isinstance(vector_field, tuple | list):
        if not imex or len(vector_field) != 2:
            raise ValueError(
                "A pair of vector fields (explicit, implicit) needs an IMEX solver "
                "('kencarp3', 'kencarp4', 'kencarp5', 'sil3'); pass one callable "
                f"for solver {name!r}."
            )
        terms = diffrax.MultiTerm(*(diffrax.ODETerm(f) for f in vector_field))
    elif callable(vector_field):
        term = diffrax.ODETerm(vector_field)
        if imex:
            zero = diffrax.ODETerm(_zero_field)
            terms = diffrax.MultiTerm(zero, term)
        else:
            terms = term
    else:
        raise ValueError(
            f"vector_field must be a callable f(t, y, args), got "
            f"{type(vector_field).__name__}."
        )

    adaptive_solver = isinstance(solver, diffrax.AbstractAdaptiveSolver)
    if controller is None:
        controller = "pid" if (adaptive_solver and dt0 is None) else "constant"
    if isinstance(controller, str):
        ctrl_entry = _registry.entry(controller, "controller")
        opts = {"rtol": rtol, "atol": atol} if ctrl_entry.tags.get("adaptive") else {}
        controller = _registry.get(ctrl_entry.name, **opts)
    if not isinstance(controller, diffrax.AbstractStepSizeController):
        raise ValueError(
            "controller must be 'constant', 'pid' or a "
            f"diffrax.AbstractStepSizeController, got {type(controller).__name__}."
        )
    if isinstance(controller, diffrax.AbstractAdaptiveStepSizeController):
        if not adaptive_solver:
            raise ValueError(
                f"Solver {name!r} has no error estimate, so it cannot take adaptive "
                "steps: pass dt0=... (fixed steps) or choose an adaptive solver such "
                "as 'tsit5'."
            )
    else:
        if dt0 is None:
            raise ValueError(
                f"Solver {name!r} with a constant step size needs dt0 (the step "
                "size); pass dt0=..., or use an adaptive solver with controller='pid'."
            )
        solver = _fill_root_finder_tols(solver, rtol, atol)
    return terms, solver, controller, name


def check_times(ts, where: str = "ts"):
    """Validate a 1-D, finite, strictly monotonic array of times. Eager: ValueError;
    traced: a runtime error with the same message."""
    ts = jnp.asarray(ts)
    if ts.ndim != 1:
        raise ValueError(f"{where} must be a 1-D array of times, got shape {ts.shape}.")
    if ts.shape[0] < 2:
        raise ValueError(
            f"{where} needs at least two times (the start and an output time), got "
            f"{ts.shape[0]}."
        )
    if not jnp.issubdtype(ts.dtype, jnp.floating):
        ts = ts.astype(jnp.result_type(float))
    msg = (
        f"{where} must be finite and strictly monotonic (increasing, or decreasing to "
        "integrate backwards in time), without duplicates; sort the times and drop "
        "repeats (np.unique) first."
    )
    if not _errors.is_traced(ts):
        arr = np.asarray(ts)
        d = np.diff(arr)
        if not np.all(np.isfinite(arr)):
            bad = int(np.flatnonzero(~np.isfinite(arr))[0])
            raise ValueError(f"{where}[{bad}] is {arr[bad]}. " + msg)
        if not (np.all(d > 0) or np.all(d < 0)):
            raise ValueError(msg + f" Got {where}={arr!r}.")
        return ts
    d = jnp.diff(ts)
    ok = jnp.all(jnp.isfinite(ts)) & (jnp.all(d > 0) | jnp.all(d < 0))
    return _errors.error_if(ts, ~ok, msg)


def integrate(
    vector_field: Callable[..., PyTree[Array]] | tuple[Callable, Callable],
    y0: PyTree[ArrayLike],
    ts: ArrayLike,
    args: PyTree[Any] = None,
    *,
    solver: str | diffrax.AbstractSolver = "tsit5",
    adjoint: str | diffrax.AbstractAdjoint = "checkpoint",
    controller: str | diffrax.AbstractStepSizeController | None = None,
    rtol: float | None = None,
    atol: float | None = None,
    dt0: float | None = None,
    max_steps: int = 4096,
    throw: bool = True,
    saveat: str | diffrax.SaveAt | None = None,
    dense: bool = False,
    event: Callable[..., Any] | diffrax.Event | None = None,
) -> Solution:
    """Solve `dy/dt = vector_field(t, y, args)` from `y(ts[0]) = y0`; return y at `ts`.

    jit-, vmap- and grad-safe. Gradients follow `adjoint`.

    **Arguments:**

    - `vector_field`: `f(t, y, args) -> dy/dt` (Diffrax's convention), returning a
        pytree like `y`. For the IMEX solvers (`kencarp*`, `sil3`) a pair
        `(explicit, implicit)` is also accepted.
    - `y0`: the initial state at `ts[0]`, any pytree of arrays.
    - `ts`: 1-D, strictly increasing (or strictly decreasing to go back in time).
    - `args`: passed to `vector_field`; differentiate with respect to it.
    - `solver`: a registry name of kind `ode` (see `ctmodels solvers --kind ode`) or a
        `diffrax.AbstractSolver`. Default `"tsit5"`; use `"kvaerno5"` for stiff ODEs.
    - `adjoint`: `"checkpoint"` (default), `"backsolve"`, `"direct"`, `"forward"`, or a
        `diffrax.AbstractAdjoint`.
    - `controller`: `"pid"` (default for adaptive steppers when `dt0` is None),
        `"constant"` (default when `dt0` is given or the stepper has no error
        estimate), or a `diffrax.AbstractStepSizeController`.
    - `rtol`, `atol`: tolerances of a controller given by name (and of an implicit
        stepper's Newton iteration). `None` (default) means the default for the
        dtype of `y0` and the stepper (`ctmodels.default_tolerances`,
        docs/precision.md): `1e-6`, `1e-8` in float64; in float32 `1e-5`, `1e-6`
        for explicit steppers and `1e-3`, `1e-6` for implicit ones (the tightest at
        which every implicit registry stepper works on stiff problems in float32).
    - `dt0`: the initial (or, with a constant controller, the fixed) step size. If
        `None` with an adaptive controller, the starting step is chosen by Hairer's
        algorithm (two extra vector-field evaluations, counted in
        `stats["num_fn_evals"]`; the choice is not differentiated).
    - `max_steps`: the most steps the solver may take.
    - `throw`: raise a [`ctmodels.SolverError`][] on failure (default); if `False`,
        return with `result` set and the unreached `ys` filled with `inf`.
    - `saveat`: which states to return: `None`/`"ts"` (at `ts`, default), `"t1"`
        (the final state only), `"steps"` (after every step, padded with `inf` to
        `max_steps`), or a `diffrax.SaveAt` (one `SubSaveAt`; its `ts`, `t0`, `t1`,
        `steps` and `fn`). The solve always runs from `ts[0]` to `ts[-1]`.
    - `dense`: also keep the dense interpolation of the solve, so that
        `sol.evaluate(t)` gives the state at any `t` in `[ts[0], ts[-1]]`
        (differentiable; not with `adjoint="backsolve"`).
    - `event`: stop the solve when `event(t, y, args)` crosses zero (a real-valued
        function; the time is located by a root finder and is differentiable) or
        becomes `True` (a bool-valued one; checked at steps, not differentiable), or a
        `diffrax.Event`. The time is `sol.event_time`; `ys` after it are `inf`.

    **Returns:** a [`ctmodels.Solution`][] with `ts`, `ys`, `stats`, `result` (and
    `interpolation`, `event_time`, `event_occurred` where asked for).

    See `docs/ode.md` for dense output, `saveat`, events and SDEs.

    Reference: Kidger, "On Neural Differential Equations", PhD thesis, 2021
    (Diffrax); Chen, Rubanova, Bettencourt & Duvenaud, "Neural Ordinary Differential
    Equations", NeurIPS 2018.
    """
    ts = check_times(ts)
    _errors.check_tolerances(rtol, atol, "integrate")
    if dt0 is not None:
        _errors.check_step(dt0, "integrate")
    y0 = as_state(y0, "integrate")
    rtol, atol = _defaults.tolerances(_tolerance_kind(solver), y0, rtol, atol)
    terms, solver_v, controller_v, name = resolve_ode(
        solver, vector_field, controller, rtol, atol, dt0
    )
    adjoint_v, adjoint_name = resolve_adjoint(adjoint, "integrate")
    if not isinstance(max_steps, int) or max_steps < 1:
        raise ValueError(f"max_steps must be a positive int, got {max_steps!r}.")
    fields = (
        tuple(vector_field)
        if isinstance(vector_field, tuple | list)
        else (vector_field,)
    )
    check_field(fields, ts[0], y0, args, "integrate", "vector_field")
    event_v = make_event(event, ts)
    saveat_v, layout, extra_t1 = make_saveat(saveat, dense, ts, event_v is not None)
    check_compatible(
        solver_v, name, adjoint_v, adjoint_name, saveat_v, event_v, "integrate"
    )
    if not isinstance(controller_v, diffrax.AbstractAdaptiveStepSizeController):
        _errors.check_fixed_steps(ts, dt0, max_steps, "integrate")
    if dt0 is not None:  # the sign of the step follows the direction of ts
        dt0 = jnp.abs(dt0) * jnp.sign(ts[-1] - ts[0])
        start_evals = 0
    else:
        dt0 = _initial_step(terms, solver_v, controller_v, ts[0], ts[-1], y0, args)
        start_evals = 0 if dt0 is None else 2

    sol = diffrax.diffeqsolve(
        terms,
        solver_v,
        t0=ts[0],
        t1=ts[-1],
        dt0=dt0,
        y0=y0,
        args=args,
        saveat=saveat_v,
        stepsize_controller=controller_v,
        adjoint=adjoint_v,
        event=event_v,
        max_steps=max_steps,
        throw=False,
    )
    per_step = _evals_per_step(solver_v)
    return finish(
        sol, ts, layout, extra_t1, per_step, start_evals, max_steps, name, throw,
        "integrate",
    )  # fmt: skip


def finish(sol, ts, layout, extra_t1, per_step, start_evals, max_steps, name, throw,
           entry):  # fmt: skip
    """A Diffrax solution -> ours: the saved layout, unreached states as `inf`,
    non-finite states flagged, stats, and the failure raised with `throw`."""
    result = _errors.from_diffrax(sol.result)
    done = result == RESULTS.successful
    sol_ts, ys = sol.ts, sol.ys
    stop = None
    if extra_t1:  # a second SubSaveAt(t1=True) says where an event stopped it
        (sol_ts, stop_ts), (ys, _) = sol_ts, ys
        stop = stop_ts[0]
    if layout == "endpoints":
        stop = sol_ts[1]
        # t1=True saves the state where a failed solve stopped; report it as unreached
        # (inf), as the ts-save does, so both layouts mean the same.
        sol_ts = jnp.where(done, sol_ts, jnp.stack([sol_ts[0], jnp.inf]))
        ys = jax.tree.map(lambda y: y.at[1].set(jnp.where(done, y[1], jnp.inf)), ys)
    elif layout == "steps":  # the saved steps are a prefix, padded with inf
        last = jnp.sum(jnp.isfinite(sol_ts)) - 1
        stop = sol_ts[jnp.maximum(last, 0)]
    elif layout == "t1":
        stop = sol_ts[-1]
        sol_ts = jnp.where(done, sol_ts, jnp.inf)
        ys = jax.tree.map(lambda y: jnp.where(done, y, jnp.inf), ys)
    # A constant-step solve cannot reject a step, so Diffrax reports success even when
    # the vector field returned NaN: flag non-finite states at the reached times.
    reached = jnp.isfinite(sol_ts)
    finite = jnp.all(
        jnp.stack(
            [
                jnp.all(
                    jnp.isfinite(y.reshape(y.shape[0], -1))
                    | ~reached.reshape(reached.shape[0], -1)[:, :1]
                )
                for y in jax.tree_util.tree_leaves(ys)
                if y.ndim and y.shape[0] == reached.shape[0]
            ]
            or [jnp.array(True)]
        )
    )
    result = RESULTS.where(
        (result == RESULTS.successful) & ~finite, RESULTS.nonfinite, result
    )
    num_steps = sol.stats["num_steps"]
    evals = (
        -1 if per_step is None else num_steps * per_step[0] + per_step[1] + start_evals
    )
    stats = {
        "num_steps": num_steps,
        "num_accepted_steps": sol.stats["num_accepted_steps"],
        "num_rejected_steps": sol.stats["num_rejected_steps"],
        "num_fn_evals": evals,
        "max_steps": max_steps,
    }
    event_time = event_occurred = None
    if sol.event_mask is not None:
        event_occurred = jnp.any(
            jnp.stack([jnp.any(m) for m in jax.tree_util.tree_leaves(sol.event_mask)])
        )
        event_time = stop
    if throw:
        if _errors.is_traced(ys, result):
            ys = _errors.raise_if_failed_traced(
                result, ys, entry, name, hints="integrate", max_steps=max_steps
            )
        elif layout in ("ts", "endpoints"):
            _raise_eager(result, sol_ts, ys, ts, name, max_steps, stop, entry)
        else:
            _raise_eager(result, ts[:1], None, ts, name, max_steps, stop, entry)
    return Solution(
        ts=sol_ts,
        ys=ys,
        stats=stats,
        result=result,
        interpolation=sol.interpolation,
        event_time=event_time,
        event_occurred=event_occurred,
    )


def as_state(y0, entry: str):
    """The initial state as a pytree of inexact arrays (ints and bools become the
    default float); anything else raises a `ValueError` saying what was given."""

    def convert(x):
        try:
            if isinstance(x, str | bytes):
                raise TypeError
            arr = jnp.asarray(x)
        except TypeError:
            raise ValueError(
                f"ctmodels.{entry}: y0 must be a pytree of numeric arrays, got a leaf "
                f"{x!r} of type {type(x).__name__}."
            ) from None
        if not jnp.issubdtype(arr.dtype, jnp.number) and arr.dtype != jnp.bool_:
            raise ValueError(
                f"ctmodels.{entry}: y0 must be a pytree of numeric arrays, got dtype "
                f"{arr.dtype}."
            )
        if jnp.issubdtype(arr.dtype, jnp.inexact):
            return x if eqx.is_array(x) else arr
        return arr.astype(jnp.result_type(float))

    leaves = jax.tree_util.tree_leaves(y0)
    if not leaves:
        raise ValueError(f"ctmodels.{entry}: y0 has no arrays (got {y0!r}).")
    return jax.tree.map(convert, y0)


def _struct_str(tree) -> str:
    def one(x):
        return f"{x.dtype}{list(x.shape)}"

    leaves, treedef = jax.tree_util.tree_flatten(tree)
    if treedef == jax.tree_util.tree_structure(0):
        return one(leaves[0])
    return str(jax.tree_util.tree_unflatten(treedef, [one(x) for x in leaves]))


def check_field(fields, t0, y0, args, entry: str, what: str, out_like=None):
    """Each of `fields`, called as `f(t0, y0, args)` (traced abstractly), must
    return a pytree with the structure, shapes and dtypes of `out_like` (default
    `y0`): a `ValueError` saying which differs, not Diffrax's broadcasting error.

    Checked inside a cached `filter_jit` trace, so repeated eager calls with the same
    fields and shapes do not trace the fields again."""
    _check_field_cached(tuple(fields), t0, y0, args, entry, what, out_like)


@eqx.filter_jit
def _check_field_cached(fields, t0, y0, args, entry, what, out_like):
    _check_field_now(fields, t0, y0, args, entry, what, out_like)


def _check_field_now(fields, t0, y0, args, entry, what, out_like):
    want = jax.eval_shape(lambda: y0) if out_like is None else out_like
    for i, f in enumerate(fields):
        got = jax.eval_shape(lambda f=f: f(t0, y0, args))
        label = what if len(fields) == 1 else f"{what}[{i}]"
        want_leaves, want_def = jax.tree_util.tree_flatten(want)
        got_leaves, got_def = jax.tree_util.tree_flatten(got)
        same = want_def == got_def and all(
            a.shape == b.shape and a.dtype == b.dtype
            for a, b in zip(want_leaves, got_leaves, strict=True)
        )
        if not same:
            like = "y0" if out_like is None else "expected"
            raise ValueError(
                f"ctmodels.{entry}: {label}(t, y, args) must return "
                f"{'a pytree' if len(want_leaves) > 1 else 'an array'} like {like} "
                f"({_struct_str(want)}), got {_struct_str(got)}. Return dy/dt with "
                "the state's structure, shape and dtype (cast with "
                ".astype(y.dtype) if needed)."
            )


class _EventFn(eqx.Module):
    """`cond_fn(t, y, args)` as Diffrax's `cond_fn(t, y, args, **kwargs)`."""

    fn: Callable = eqx.field(static=True)

    def __call__(self, t, y, args, **kwargs):
        return self.fn(t, y, args)


def make_event(event, ts):
    """A callable or a `diffrax.Event` -> a `diffrax.Event` (or None). A real-valued
    condition gets a Newton root finder at a tolerance the time's dtype resolves, so
    the event time is accurate and differentiable."""
    if event is None or isinstance(event, diffrax.Event):
        return event
    if not callable(event):
        raise ValueError(
            "ctmodels: event must be a callable event(t, y, args) -> scalar (the "
            "solve stops where it crosses zero) or a diffrax.Event, got "
            f"{type(event).__name__}."
        )
    eps = float(jnp.finfo(jnp.result_type(ts.dtype, float)).eps)
    tol = max(100 * eps, 1e-12)
    return diffrax.Event(_EventFn(event), root_finder=optx.Newton(rtol=tol, atol=tol))


SAVEAT_NAMES = ("ts", "t1", "steps")
_SAVE_Y = diffrax.SubSaveAt(t1=True).fn  # the default: save the state


def make_saveat(saveat, dense, ts, has_event, entry="integrate"):
    """Our `saveat` spelling or a `diffrax.SaveAt` -> (a `diffrax.SaveAt`, its layout,
    whether a separate `t1` save was added to learn where an event stopped it)."""
    if not isinstance(dense, bool):
        raise ValueError(
            f"ctmodels.{entry}: dense must be True or False, got {dense!r}."
        )
    names = ", ".join(map(repr, SAVEAT_NAMES))
    if saveat is None or saveat == "ts":
        # Two output times (start and end, the common training case) save with t0/t1
        # rather than Diffrax's per-step interpolating save loop: a few percent faster.
        if ts.shape[0] == 2 and not has_event:
            return diffrax.SaveAt(t0=True, t1=True, dense=dense), "endpoints", False
        sub, layout = diffrax.SubSaveAt(ts=ts), "ts"
    elif saveat == "t1":
        return diffrax.SaveAt(t1=True, dense=dense), "t1", False
    elif saveat == "steps":  # the last step ends where the solve stopped
        return diffrax.SaveAt(steps=True, dense=dense), "steps", False
    elif isinstance(saveat, str):
        raise ValueError(
            f"ctmodels.{entry}: saveat must be one of {names} or a diffrax.SaveAt, "
            f"got {saveat!r}.{_errors.suggest(saveat, SAVEAT_NAMES)}"
        )
    elif not isinstance(saveat, diffrax.SaveAt):
        raise ValueError(
            f"ctmodels.{entry}: saveat must be one of {names} or a diffrax.SaveAt, "
            f"got {type(saveat).__name__}."
        )
    elif not isinstance(saveat.subs, diffrax.SubSaveAt):
        raise ValueError(
            f"ctmodels.{entry}: a diffrax.SaveAt with several SubSaveAts (subs=...) "
            "is not supported; pass one, or call diffrax.diffeqsolve directly."
        )
    else:
        dense = dense or saveat.dense
        sub = saveat.subs
        layout = "steps" if sub.steps else "custom"
        if sub.steps or not has_event:  # (the last step ends where it stopped)
            return diffrax.SaveAt(subs=sub, dense=dense), layout, False
    if not has_event:
        return diffrax.SaveAt(subs=sub, dense=dense), layout, False
    # Diffrax saves t1 among the ts; a second SubSaveAt keeps it apart.
    both = (sub, diffrax.SubSaveAt(t1=True))
    return diffrax.SaveAt(subs=both, dense=dense), layout, True


def _tags(value, name: str, kind: str) -> dict:
    """Capability tags of a solver or adjoint: the registry's for a registry name,
    else inferred from the value (see `solver_tags` / `adjoint_tags`)."""
    try:
        entry = _registry.entry(name, kind)
    except ValueError:
        entry = None
    if entry is not None:
        return entry.tags
    return (solver_tags if kind in ("ode", "sde") else adjoint_tags)(value)


def solver_tags(solver) -> dict:
    """The compatibility tags of a Diffrax stepper value: `single_term` (it takes one
    term, as `adjoint="backsolve"` needs) and, for SDE steppers, `sde_type`."""
    structure = solver.term_structure
    origin = typing.get_origin(structure) or structure
    multi = isinstance(origin, type) and issubclass(origin, diffrax.MultiTerm)
    tags = {"single_term": not multi}
    if isinstance(solver, diffrax.AbstractItoSolver):
        tags["sde_type"] = "ito"
    elif isinstance(solver, diffrax.AbstractStratonovichSolver):
        tags["sde_type"] = "stratonovich"
    return tags


BACKSOLVE_TAGS = {
    "single_term_only": True,
    "events": False,
    "saves": ("ts", "t0", "t1"),
    "sde_types": ("stratonovich",),
}


def adjoint_tags(adjoint) -> dict:
    """The compatibility tags of a Diffrax adjoint value (see `BACKSOLVE_TAGS`)."""
    if isinstance(adjoint, diffrax.BacksolveAdjoint):
        return BACKSOLVE_TAGS
    return {}


def check_compatible(
    solver, solver_name, adjoint, adjoint_name, saveat, event, entry, sde=False
):
    """Refuse a solver / adjoint / saving / event combination that Diffrax would
    reject only when differentiated (or silently mis-solve), from capability tags."""
    s = _tags(solver, solver_name, "sde" if sde else "ode")
    a = _tags(adjoint, adjoint_name, "adjoint")
    alt = "use adjoint='checkpoint' (the default) or 'direct'"
    if a.get("single_term_only") and not s.get("single_term", True):
        parts = (
            "drift and diffusion separately"
            if sde
            else "an explicit and an implicit part"
        )
        raise ValueError(
            f"ctmodels.{entry}: adjoint={adjoint_name!r} re-solves the problem "
            f"backwards with the same stepper, which works only for steppers that "
            f"take one vector field; {solver_name!r} takes several "
            f"({parts}). "
            f"{alt.capitalize()}, or a one-term solver such as "
            f"{'reversible_heun' if sde else 'kvaerno5'!r} with backsolve."
        )
    if event is not None and a.get("events", True) is False:
        raise ValueError(
            f"ctmodels.{entry}: adjoint={adjoint_name!r} cannot differentiate a solve "
            f"stopped by an event; {alt}."
        )
    saves = a.get("saves")
    if saves is not None:
        subs = jax.tree_util.tree_leaves(
            saveat.subs, is_leaf=lambda x: isinstance(x, diffrax.SubSaveAt)
        )
        bad = [
            what
            for what, on in (
                ("dense=True", saveat.dense),
                ("saveat='steps'", any(sub.steps for sub in subs)),
                ("a SaveAt(fn=...)", any(sub.fn is not _SAVE_Y for sub in subs)),
            )
            if on
        ]
        if bad:
            raise ValueError(
                f"ctmodels.{entry}: adjoint={adjoint_name!r} only saves at given "
                f"times (ts, t0, t1), not {' or '.join(bad)}; {alt}."
            )
    sde_type = s.get("sde_type")
    allowed = a.get("sde_types")
    if sde and allowed is not None and sde_type not in allowed:
        raise ValueError(
            f"ctmodels.{entry}: adjoint={adjoint_name!r} is correct only for "
            f"{' or '.join(allowed)} SDE solvers, and {solver_name!r} solves the "
            f"{sde_type} SDE. Use the Stratonovich solver "
            f"'reversible_heun' with it, or {alt[4:]}."
        )


def _raise_eager(
    result, saved_ts, ys, ts, name, max_steps, stop=None, entry="integrate"
):
    if bool(result == RESULTS.successful):
        return
    code = _errors.result_name(result)
    req = np.asarray(ts)
    stop = None if stop is None else float(np.asarray(stop))
    ok = np.isfinite(np.asarray(saved_ts))
    for y in jax.tree_util.tree_leaves(ys):
        y = np.asarray(y)
        ok &= np.all(np.isfinite(y.reshape(y.shape[0], -1)), axis=1)
    # the times reached with a finite state: a prefix of ts
    finite = np.flatnonzero(np.cumprod(ok))
    if ys is None:  # not saved at ts: only where it stopped is known
        where = f"before reaching t={req[-1]:g}"
        if stop is not None and np.isfinite(stop):
            where = f"at t={stop:g}, " + where
    elif stop is not None and np.isfinite(stop) and finite.size and finite[-1] == 0:
        where = (
            f"at t={stop:g}, between t={req[0]:g} (last time reached) and t={req[1]:g}"
        )
    elif finite.size == 0:
        where = f"before reaching t={req[0]:g}"
    elif finite[-1] + 1 < req.size:
        k = finite[-1]
        where = f"between t={req[k]:g} (last time reached) and t={req[k + 1]:g}"
    else:
        where = f"near t={req[-1]:g}"
    raise SolverError(
        _errors.explain(entry, name, code, where, hints="integrate",
                        max_steps=max_steps),
        result=result,
        solver=name,
        entry=entry,
    )  # fmt: skip
