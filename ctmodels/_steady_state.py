"""`ctmodels.steady_state`: equilibria of an ODE by root-finding or by integration."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal

import diffrax
import jax
import jax.numpy as jnp
import numpy as np
import optimistix as optx
from jaxtyping import Array, PyTree

from . import _defaults, _errors
from ._errors import RESULTS, SolverError
from ._fixed_point import FixedPointSolution, _flat, _max_abs, _solve, _stop_gradient
from ._integrate import _evals_per_step, check_field, resolve_adjoint, resolve_ode
from .solvers import _registry
from .solvers._implicit import ImplicitAdjoint


def steady_state(
    vector_field: Callable[..., PyTree[Array]],
    y0: PyTree[Array],
    args: PyTree[Any] = None,
    *,
    method: Literal["root", "integrate"] = "root",
    solver: Any = None,
    adjoint: Any = "implicit",
    rtol: float | None = None,
    atol: float | None = None,
    max_steps: int | None = None,
    throw: bool = True,
) -> FixedPointSolution:
    """The equilibrium `y*` with `vector_field(t, y*, args) = 0` reached from `y0`.

    Both methods return the same value and, with `adjoint="implicit"` (default), the
    same gradient with respect to `args` (the implicit function theorem at `y*`).

    **Arguments:**

    - `vector_field`: `f(t, y, args)`, autonomous (it is evaluated at `t = 0` by the
        root method): the same `vector_field` as [`ctmodels.integrate`][] takes (a
        time derivative, Diffrax's convention), where `fixed_point` and `root_find`
        take a map `fn(y, args)`.
    - `y0`: the initial state (for `"integrate"`) or initial guess (for `"root"`).
    - `args`: parameters; differentiate with respect to them.
    - `method`: `"root"` solves `f(y) = 0` (default solver `"newton"`, any registry
        entry of kind `root`); `"integrate"` integrates from `y0` until
        `|f(y)| <= atol + rtol * |y|` (default solver `"tsit5"`, any entry of kind
        `ode`; use `"kvaerno5"` for stiff systems), stepping at tolerances ten times
        tighter than that rule. Root-finding is faster but may
        find another equilibrium than the one `y0` flows to; integration finds the
        attracting equilibrium of `y0`'s basin.
    - `adjoint`: `"implicit"` (default) or `"checkpoint"` (backprop through the
        iterations / integration steps).
    - `rtol`, `atol`: tolerances of the solve and of the stopping rule. `None`
        (default) means the default for the dtype of `y0` (docs/precision.md):
        `1e-6`, `1e-8` in float64 and `1e-5`, `1e-6` in float32.

    Success is never reported away from an equilibrium: the rule
    `|f(y)| <= atol + rtol |y|` is also met by a state that grows without bound
    (dy/dt = 1 at |y| = 1e6) or moves slowly; so the state where it stops is checked
    with one Jacobian-vector product, and a Newton distance to the equilibrium
    (`|f|^2 / |J f|` along `f`) of more than 1000 tolerances is reported as
    `RESULTS.no_solution`.
    - `max_steps`: iterations (root, default 256) or integration steps (default 16384).
    - `throw`: raise a [`ctmodels.SolverError`][] on failure, or return the code.

    **Returns:** a [`ctmodels.FixedPointSolution`][] with `value`, `stats` (for
    `"integrate"` also `t_final`, the time at which the state was steady) and `result`.
    """
    _errors.check_tolerances(rtol, atol, "steady_state")
    y0 = jax.tree.map(lambda x: jnp.asarray(x, jnp.result_type(x, float)), y0)
    rtol, atol = _defaults.tolerances("nonlinear", y0, rtol, atol)
    if method == "root":
        fn = _Autonomous(vector_field)
        return _solve(
            "steady_state", fn, y0, args, solver or "newton", "root", adjoint, rtol,
            atol, max_steps or 256, throw,
        )  # fmt: skip
    if method != "integrate":
        raise ValueError(f"method must be 'root' or 'integrate', got {method!r}.")
    max_steps = max_steps or 16384
    # Integrate 10x tighter than the stopping rule: otherwise an explicit stepper held
    # at its stability limit by a stiff equilibrium jitters by about the controller's
    # tolerance and never meets |f(y)| <= atol + rtol |y|.
    terms, solver_v, controller, name = resolve_ode(
        solver or "tsit5", vector_field, None, rtol / 10, atol / 10, None
    )
    if isinstance(adjoint, str):
        adjoint, _ = _registry.resolve(adjoint, "adjoint")
    if isinstance(adjoint, diffrax.ImplicitAdjoint):
        adjoint = ImplicitAdjoint(adjoint.linear_solver)
    implicit = isinstance(adjoint, ImplicitAdjoint)
    if implicit:
        # Integrate without tracking gradients, then attach the implicit-function-
        # theorem gradient at the equilibrium with the same code as method="root", so
        # both routes give the same gradient (and every linear solver works).
        adjoint_v = diffrax.RecursiveCheckpointAdjoint()
        solve_args = _stop_gradient(args)
    else:
        adjoint_v, _ = resolve_adjoint(adjoint, "steady_state")
        solve_args = args
    y0 = jax.tree.map(lambda x: jnp.asarray(x, jnp.result_type(x, float)), y0)
    check_field((vector_field,), 0.0, y0, args, "steady_state", "vector_field")
    event = diffrax.Event(diffrax.steady_state_event(rtol=rtol, atol=atol))
    sol = diffrax.diffeqsolve(
        terms,
        solver_v,
        t0=0.0,
        t1=jnp.inf,
        dt0=None,
        y0=y0 if not implicit else jax.lax.stop_gradient(y0),
        args=solve_args,
        saveat=diffrax.SaveAt(t1=True),
        stepsize_controller=controller,
        event=event,
        adjoint=adjoint_v,
        max_steps=max_steps,
        throw=False,
    )
    value = jax.tree.map(lambda y: y[0], sol.ys)
    if implicit:
        value = optx.root_find(
            _Autonomous(vector_field),
            _AlreadySolved(rtol=rtol, atol=atol),
            value,
            args,
            adjoint=adjoint.to_optimistix(),
            max_steps=1,
            throw=False,
        ).value
    result = _errors.from_diffrax(sol.result)
    resid, flat = _flat(_Autonomous(vector_field), value, args, "root", rtol, atol)
    ok = result == RESULTS.successful
    result = RESULTS.where(ok & flat, RESULTS.no_solution, result)
    per_step = _evals_per_step(solver_v)
    num_steps = sol.stats["num_steps"]
    # the stepper's evaluations, the event's one per step, and the final check's two
    evals = -1 if per_step is None else num_steps * (per_step[0] + 1) + per_step[1] + 2
    stats = {
        "num_steps": num_steps,
        "num_fn_evals": evals,
        "residual": _max_abs(resid),
        "t_final": sol.ts[0],
        "max_steps": max_steps,
    }
    if throw:
        if _errors.is_traced(value, result):
            value = _errors.raise_if_failed_traced(
                result, value, "steady_state", name, hints="integrate",
                max_steps=max_steps,
            )  # fmt: skip
        elif not bool(result == RESULTS.successful):
            code = _errors.result_name(result)
            where = (
                f"by t={float(np.asarray(sol.ts[0])):g} without reaching a steady state"
            )
            raise SolverError(
                _errors.explain(
                    "steady_state",
                    name,
                    code,
                    where,
                    hints="integrate",
                    max_steps=max_steps,
                ),  # fmt: skip
                result=result,
                solver=name,
                entry="steady_state",
            )
    return FixedPointSolution(value=value, stats=stats, result=result)


class _AlreadySolved(optx.AbstractRootFinder):
    """A root finder that accepts its initial guess as the root: used to attach the
    implicit gradient to an equilibrium found by integration."""

    rtol: float
    atol: float
    norm: Callable = optx.max_norm

    def init(self, fn, y, args, options, f_struct, aux_struct, tags):
        return None

    def step(self, fn, y, args, options, state, tags):
        return y, state, None

    def terminate(self, fn, y, args, options, state, tags):
        return jnp.array(True), optx.RESULTS.successful

    def postprocess(self, fn, y, aux, args, options, state, tags, result):
        return y, aux, {}


class _Autonomous:
    """`f(t, y, args)` as `g(y, args) = f(0, y, args)`; hashable by the wrapped field so
    that repeated calls with the same vector field reuse the compiled solve."""

    def __init__(self, f):
        self.f = f

    def __call__(self, y, args):
        return self.f(0.0, y, args)

    def __hash__(self):
        return hash(self.f)

    def __eq__(self, other):
        return isinstance(other, _Autonomous) and other.f == self.f
