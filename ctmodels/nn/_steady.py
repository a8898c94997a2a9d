"""`SteadyState`: the equilibrium of a neural ODE `dy/dt = f(y, x)` as a layer."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal

import equinox as eqx
import jax.numpy as jnp
from jaxtyping import Array, PRNGKeyArray, PyTree

from .._references import cites
from .._steady_state import steady_state
from ._deq import EquilibriumSolution, check_options, implicit_adjoint, initial_state

_METHODS = ("root", "integrate")
_BACKWARDS = ("implicit", "unrolled")


def _field(t, y, args):
    f, x = args
    return f(y, x)


@cites("bai2019deep", "chen2018neural")
class SteadyState(eqx.Module):
    """The equilibrium `y*` of a neural ODE `dy/dt = f(y, x)`, `f(y*, x) = 0`, as a
    layer: a head on top of another network, or a physical equilibrium model
    (kinetics, a circuit) fitted to measured steady states.

    ```python
    field = FieldModule(...)                        # field(y, x) -> dy/dt
    layer = ctmodels.nn.SteadyState(field)          # root finding, implicit backward
    y_star = layer(x, y0)                           # one example; jax.vmap a batch
    layer = ctmodels.nn.SteadyState(field, method="integrate")  # same value, gradient
    ```

    Solved by [`ctmodels.steady_state`][]: `method="root"` finds a root of `f`
    (fast; it may find another equilibrium than the one `y0` flows to),
    `method="integrate"` integrates the ODE from `y0` until it is steady (the
    attracting equilibrium of `y0`'s basin). Both give the same value and, with the
    default implicit backward, the same gradient (the implicit function theorem at
    `y*`: one linear solve with `∂f/∂y`), with respect to the field's parameters and
    `x`; `y0` receives none.

    Called on one example; `jax.jit`, `jax.vmap` and `jax.grad` safe, in float32
    and float64, with the tolerances of [`ctmodels.default_tolerances`][] for the
    state's dtype unless given. A failed solve raises a [`ctmodels.SolverError`][]
    (`throw=True`, default) or is returned flagged in `solve(...).result`
    (`throw=False`), as for [`ctmodels.nn.DEQ`][].
    """

    field: Callable[..., PyTree[Array]]
    method: str = eqx.field(static=True)
    solver: Any = eqx.field(static=True)
    backward: str = eqx.field(static=True)
    linear_solver: Any = eqx.field(static=True)
    rtol: float | None = eqx.field(static=True)
    atol: float | None = eqx.field(static=True)
    max_steps: int | None = eqx.field(static=True)
    throw: bool = eqx.field(static=True)
    on_backward: Callable[[dict[str, Any]], None] | None = eqx.field(static=True)

    def __init__(
        self,
        field: Callable[..., PyTree[Array]],
        *,
        method: Literal["root", "integrate"] = "root",
        solver: Any = None,
        backward: Literal["implicit", "unrolled"] = "implicit",
        linear_solver: Any = None,
        rtol: float | None = None,
        atol: float | None = None,
        max_steps: int | None = None,
        throw: bool = True,
        on_backward: Callable[[dict[str, Any]], None] | None = None,
    ):
        """**Arguments:**

        - `field`: `field(y, x) -> dy/dt`, an `eqx.Module` (its parameters are
            trained) or a function, returning a pytree shaped like `y`.
        - `method`: `"root"` (default) or `"integrate"`.
        - `solver`: for `"root"` a registry name of kind `root` (default
            `"newton"`; `"anderson"`, `"broyden"` for large states) or an
            Optimistix root finder; for `"integrate"` a name of kind `ode` (default
            `"tsit5"`; `"kvaerno5"` when stiff) or a Diffrax solver.
        - `backward`: `"implicit"` (default: the implicit function theorem) or
            `"unrolled"` (backprop through the iterations or integration steps).
        - `linear_solver`: for `backward="implicit"`, the backward linear solver (a
            registry name of kind `linear` or a Lineax solver); `None` (default):
            Lineax's dense automatic choice.
        - `rtol`, `atol`: the solve stops when `|f(y, x)| <= atol + rtol |y|`;
            `None` (default): the defaults for the state's dtype (`1e-5`, `1e-6` in
            float32; `1e-6`, `1e-8` in float64).
        - `max_steps`: iterations (`"root"`, default 256) or integration steps
            (`"integrate"`, default 16384).
        - `throw`: raise on a failed solve (default) or return its code.
        - `on_backward`: for `backward="implicit"`, a callable receiving the
            statistics of each backward linear solve (e.g. a
            [`ctmodels.solvers.BackwardMonitor`][]).
        """
        if not callable(field):
            raise ValueError(
                "ctmodels.nn.SteadyState: field must be a callable field(y, x) -> "
                f"dy/dt (an eqx.Module or a function), got {type(field).__name__}."
            )
        if method not in _METHODS:
            raise ValueError(
                "ctmodels.nn.SteadyState: method must be 'root' (find a root of the "
                "field) or 'integrate' (integrate to equilibrium), got "
                f"{method!r}."
            )
        if backward not in _BACKWARDS:
            raise ValueError(
                "ctmodels.nn.SteadyState: backward must be 'implicit' or 'unrolled', "
                f"got {backward!r}."
            )
        check_options(
            "SteadyState",
            backward=backward,
            linear_solver=linear_solver,
            max_steps=256 if max_steps is None else max_steps,
            throw=throw,
            on_backward=on_backward,
        )
        self.field = field
        self.method = method
        self.solver = solver
        self.backward = backward
        self.linear_solver = linear_solver
        self.rtol = rtol
        self.atol = atol
        self.max_steps = max_steps
        self.throw = throw
        self.on_backward = on_backward

    def __call__(
        self,
        x: PyTree[Array],
        y0: PyTree[Array] | None = None,
        *,
        key: PRNGKeyArray | None = None,
    ) -> PyTree[Array]:
        """The equilibrium `y*` for the input `x` (one example).

        **Arguments:**

        - `x`: the input (parameters of the ODE that the layer does not train).
        - `y0`: the initial state or guess; `None` (default): zeros shaped like `x`.
        - `key`: unused; accepted so that the layer composes with keyed layers.

        **Returns:** `y*` (for the statistics, use `solve`).
        """
        del key
        return self.solve(x, y0).value

    def solve(
        self,
        x: PyTree[Array],
        y0: PyTree[Array] | None = None,
        *,
        key: PRNGKeyArray | None = None,
    ) -> EquilibriumSolution:
        """Solve for the equilibrium and report how.

        **Arguments:** as for the call (`key` unused).

        **Returns:** an [`ctmodels.nn.EquilibriumSolution`][] (`jac_loss` is None).
        """
        del key
        y0 = initial_state(self.field, x, y0, "SteadyState", "y0")
        if self.backward == "unrolled":
            adjoint = "checkpoint"
        elif self.linear_solver is None and self.on_backward is None:
            adjoint = "implicit"
        else:
            adjoint = implicit_adjoint(self.linear_solver or "auto", self.on_backward)
        sol = steady_state(
            _field,
            y0,
            (self.field, x),
            method=self.method,
            solver=self.solver,
            adjoint=adjoint,
            rtol=self.rtol,
            atol=self.atol,
            max_steps=self.max_steps,
            throw=self.throw,
        )
        steps = sol.stats["num_steps"] if self.backward == "unrolled" else -1
        stats = {**sol.stats, "backward_steps": jnp.asarray(steps)}
        return EquilibriumSolution(value=sol.value, stats=stats, result=sol.result)
