"""`ctmodels.integrate`: solve an ODE through the registry, with readable failures."""

from __future__ import annotations

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
    """The result of [`ctmodels.integrate`][].

    **Attributes:**

    - `ts`: the requested times.
    - `ys`: the state at each of `ts` (a pytree like `y0` with a leading time axis).
    - `stats`: `num_steps` (attempted), `num_accepted_steps`, `num_rejected_steps`,
        `num_fn_evals` (vector-field evaluations of the forward solve, counted from the
        stepper's stages; `-1` where the count is not known in advance, e.g. implicit
        steppers whose Newton iterations vary) and `max_steps`.
    - `result`: a [`ctmodels.RESULTS`][] code; `RESULTS.successful` on success.
    - `value`: the same as `ys` (every solution of the engine, this one and
        [`ctmodels.FixedPointSolution`][], has `value`, `stats` and `result`).
    """

    ts: Array
    ys: PyTree[Array]
    stats: dict[str, Any]
    result: RESULTS

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
        if entry == "integrate":
            raise ValueError(
                "adjoint='implicit' differentiates a fixed point or steady state, not "
                "a trajectory. For ctmodels.integrate use 'checkpoint' (default), "
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
        dtype of `y0` (`ctmodels._defaults`, docs/precision.md): `1e-6`, `1e-8` in
        float64 and `1e-3`, `1e-6` in float32, the tightest at which every
        registry stepper (the stiff ones included) works in float32.
    - `dt0`: the initial (or, with a constant controller, the fixed) step size. If
        `None` with an adaptive controller, the starting step is chosen by Hairer's
        algorithm (two extra vector-field evaluations, counted in
        `stats["num_fn_evals"]`; the choice is not differentiated).
    - `max_steps`: the most steps the solver may take.
    - `throw`: raise a [`ctmodels.SolverError`][] on failure (default); if `False`,
        return with `result` set and the unreached `ys` filled with `inf`.

    **Returns:** a [`ctmodels.Solution`][] with `ts`, `ys`, `stats`, `result`.

    Reference: Kidger, "On Neural Differential Equations", PhD thesis, 2021
    (Diffrax); Chen, Rubanova, Bettencourt & Duvenaud, "Neural Ordinary Differential
    Equations", NeurIPS 2018.
    """
    ts = check_times(ts)
    rtol, atol = _defaults.tolerances("ode", y0, rtol, atol)
    terms, solver_v, controller_v, name = resolve_ode(
        solver, vector_field, controller, rtol, atol, dt0
    )
    adjoint_v, _ = resolve_adjoint(adjoint, "integrate")
    if not isinstance(max_steps, int) or max_steps < 1:
        raise ValueError(f"max_steps must be a positive int, got {max_steps!r}.")
    if dt0 is not None:  # the sign of the step follows the direction of ts
        dt0 = jnp.abs(dt0) * jnp.sign(ts[-1] - ts[0])
        start_evals = 0
    else:
        dt0 = _initial_step(terms, solver_v, controller_v, ts[0], ts[-1], y0, args)
        start_evals = 0 if dt0 is None else 2

    # Two output times (start and end, the common training case) save with t0/t1
    # rather than Diffrax's per-step interpolating save loop: a few percent faster.
    endpoints = ts.shape[0] == 2
    saveat = diffrax.SaveAt(t0=True, t1=True) if endpoints else diffrax.SaveAt(ts=ts)
    sol = diffrax.diffeqsolve(
        terms,
        solver_v,
        t0=ts[0],
        t1=ts[-1],
        dt0=dt0,
        y0=y0,
        args=args,
        saveat=saveat,
        stepsize_controller=controller_v,
        adjoint=adjoint_v,
        max_steps=max_steps,
        throw=False,
    )
    result = _errors.from_diffrax(sol.result)
    sol_ts, ys = sol.ts, sol.ys
    if endpoints:
        # t1=True saves the state where a failed solve stopped; report it as unreached
        # (inf), as the ts-save does, so both layouts mean the same.
        done = sol.result == diffrax.RESULTS.successful
        sol_ts = jnp.where(done, sol_ts, jnp.stack([sol_ts[0], jnp.inf]))
        ys = jax.tree.map(lambda y: y.at[1].set(jnp.where(done, y[1], jnp.inf)), ys)
    # A constant-step solve cannot reject a step, so Diffrax reports success even when
    # the vector field returned NaN: flag non-finite states at the reached times.
    reached = jnp.isfinite(sol_ts)
    finite = jnp.all(
        jnp.stack(
            [
                jnp.all(jnp.isfinite(y.reshape(y.shape[0], -1)) | ~reached[:, None])
                for y in jax.tree_util.tree_leaves(ys)
            ]
        )
    )
    result = RESULTS.where(
        (result == RESULTS.successful) & ~finite, RESULTS.nonfinite, result
    )
    per_step = _evals_per_step(solver_v)
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
    if throw:
        if _errors.is_traced(ys, result):
            ys = _errors.raise_if_failed_traced(
                result, ys, "integrate", name, max_steps=max_steps
            )
        else:
            stop = sol.ts[1] if endpoints else None  # t1=True saved where it stopped
            _raise_eager(result, sol_ts, ys, ts, name, max_steps, stop)
    return Solution(ts=ts, ys=ys, stats=stats, result=result)


def _raise_eager(result, saved_ts, ys, ts, name, max_steps, stop=None):
    if bool(result == RESULTS.successful):
        return
    code = _errors.result_name(result)
    ok = np.isfinite(np.asarray(saved_ts))
    for y in jax.tree_util.tree_leaves(ys):
        y = np.asarray(y)
        ok &= np.all(np.isfinite(y.reshape(y.shape[0], -1)), axis=1)
    # the times reached with a finite state: a prefix of ts
    finite = np.flatnonzero(np.cumprod(ok))
    req = np.asarray(ts)
    stop = None if stop is None else float(np.asarray(stop))
    if stop is not None and np.isfinite(stop) and finite.size and finite[-1] == 0:
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
        _errors.explain("integrate", name, code, where, max_steps=max_steps),
        result=result,
        solver=name,
        entry="integrate",
    )
