"""Deep equilibrium layers: `DEQ` (a fixed point `z* = f(z*, x)`) and the solution
object shared with `SteadyState` (`_steady.py`).

The forward solve is [`ctmodels.fixed_point`][] (any registry fixed-point or root
solver); the backward pass is chosen per layer: the implicit function theorem through
the engine's implicit adjoint, backprop through the forward iterations, one step of
`f` at `z*` (Jacobian-free), or a few damped unrolled steps from `z*` (phantom).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal

import equinox as eqx
import jax
import jax.flatten_util
import jax.numpy as jnp
import optimistix as optx
from jaxtyping import Array, PRNGKeyArray, PyTree

from .. import _defaults, solvers
from .._errors import RESULTS, is_int
from .._fixed_point import fixed_point, resolve_nonlinear_adjoint
from .._references import cites
from ._cnf import probe

BACKWARDS = ("implicit", "unrolled", "jacobian_free", "phantom")
_NOISES = ("gaussian", "rademacher")


class EquilibriumSolution(eqx.Module):
    """The result of [`ctmodels.nn.DEQ.solve`][] and
    [`ctmodels.nn.SteadyState.solve`][].

    **Attributes:**

    - `value`: the equilibrium (`z* = f(z*, x)`, or `f(y*, x) = 0`), carrying the
        gradient of the layer's `backward` option.
    - `stats`: the forward solve's statistics, as [`ctmodels.FixedPointSolution`][]
        reports them (`num_steps`: iterations; `num_fn_evals`; `residual`: max-abs
        of `f(z*, x) - z*`, or of `f(y*, x)`; `relative_residual`, `stagnated`,
        `diverged`, `max_steps` where the solve reports them), plus
        `backward_steps`: the vector-Jacobian products of the cell that the
        backward pass takes: `1` for `"jacobian_free"`, `phantom_steps` for
        `"phantom"`, the forward's `num_steps` for `"unrolled"`, and `-1` for
        `"implicit"`, whose iterative linear solve runs later, under `jax.grad`
        (its iterations and residual are passed to the layer's `on_backward`, e.g. a
        [`ctmodels.solvers.BackwardMonitor`][]).
    - `result`: a [`ctmodels.RESULTS`][] code; `RESULTS.successful` when the solve
        converged. With `throw=False` a failed solve returns its last iterate and
        the code (check it: the value is then not an equilibrium).
    - `jac_loss`: with a `key`, Hutchinson's unbiased estimate of the squared
        Frobenius norm `‖∂f/∂z‖²_F` of the cell's Jacobian at `z*` (differentiable
        with respect to the cell's parameters and `x`; add a multiple of it to the
        loss); `None` without a key.
    """

    value: PyTree[Array]
    stats: dict[str, Any]
    result: RESULTS
    jac_loss: Array | None = None


def _apply(z, args):
    cell, x = args
    return cell(z, x)


def _stop(tree):
    return jax.tree.map(
        lambda a: jax.lax.stop_gradient(a) if eqx.is_array(a) else a, tree
    )


def _straight_through(value, carrier):
    """`value` forward, the gradient of `carrier` backward (they agree to the solve's
    tolerance, so the layer's output is the equilibrium whatever the backward)."""
    return jax.tree.map(lambda v, c: v + (c - jax.lax.stop_gradient(c)), value, carrier)


def initial_state(f: Callable, x, y0, who: str, name: str):
    """`y0` as a floating pytree; `None` means zeros shaped like `x` (checked against
    what `f` returns, so that a state shaped unlike `x` asks for `y0`)."""
    if y0 is not None:
        return jax.tree.map(lambda a: jnp.asarray(a, jnp.result_type(a, float)), y0)
    y0 = jax.tree.map(lambda a: jnp.zeros_like(a, jnp.result_type(a, float)), x)
    fix = f"pass the initial state: layer(x, {name})"
    try:
        out = jax.eval_shape(f, y0, x)
    except (TypeError, ValueError) as e:
        raise ValueError(
            f"ctmodels.nn.{who}: without {name} the state starts at zeros shaped like "
            f"x, which the cell cannot take ({type(e).__name__}: "
            f"{str(e).splitlines()[0]}); {fix}."
        ) from e
    if eqx.tree_equal(jax.eval_shape(lambda: y0), out) is not True:
        raise ValueError(
            f"ctmodels.nn.{who}: without {name} the state starts at zeros shaped like "
            f"x, but the cell maps that to {out}, a different structure, shape or "
            f"dtype; {fix}."
        )
    return y0


def implicit_adjoint(linear_solver, on_backward):
    """The engine's implicit adjoint with `linear_solver` (a registry name of kind
    `linear` or a Lineax solver) and `on_backward` (a callable receiving the backward
    solve's statistics)."""
    options = {} if on_backward is None else {"on_backward": on_backward}
    if isinstance(linear_solver, str):
        return solvers.get("implicit", linear_solver=linear_solver, **options)
    return solvers.ImplicitAdjoint(linear_solver, on_backward=on_backward)


def _positive_int(value, name: str, who: str, hint: str = "") -> None:
    if not is_int(value) or value < 1:
        raise ValueError(
            f"ctmodels.nn.{who}: {name} must be a positive int{hint}, got {value!r}."
        )


def check_options(who: str, *, backward: str, **options) -> None:
    """Trace-time checks of the options shared by the equilibrium layers."""
    _positive_int(options["max_steps"], "max_steps", who)
    if not isinstance(options["throw"], bool):
        raise ValueError(
            f"ctmodels.nn.{who}: throw must be True (raise on a failed solve) or "
            f"False (return the result code), got {options['throw']!r}."
        )
    on_backward = options["on_backward"]
    if on_backward is not None and not callable(on_backward):
        raise ValueError(
            f"ctmodels.nn.{who}: on_backward must be None or a callable receiving the "
            f"backward solve's statistics (e.g. ctmodels.solvers.BackwardMonitor()), "
            f"got {type(on_backward).__name__}."
        )
    if backward != "implicit" and (
        options["linear_solver"] is not None or on_backward is not None
    ):
        raise ValueError(
            f"ctmodels.nn.{who}: linear_solver and on_backward configure the implicit "
            f"backward pass, but backward={backward!r}; drop them or use "
            "backward='implicit'."
        )


def _jacobian_frobenius(cell, z, x, key, probes: int, noise: str) -> Array:
    """Hutchinson's estimate of `‖∂cell/∂z‖²_F` at `z` (held fixed): the mean over
    `probes` probes `ε` (`E[ε εᵀ] = I`) of `‖εᵀ ∂cell/∂z‖²`, one vector-Jacobian
    product each."""
    flat, unravel = jax.flatten_util.ravel_pytree(jax.lax.stop_gradient(z))

    def g(v):
        return jax.flatten_util.ravel_pytree(cell(unravel(v), x))[0]

    _, vjp = jax.vjp(g, flat)
    eps = probe(key, (probes, flat.size), noise, flat.dtype)
    (e_jac,) = jax.vmap(vjp)(eps)
    return jnp.mean(jnp.sum(jnp.square(e_jac), axis=-1))


@cites("bai2019deep", "fung2022jfb", "geng2021training", "bai2021stabilizing")
class DEQ(eqx.Module):
    """A deep equilibrium layer (Bai, Kolter & Koltun, 2019): the output is the fixed
    point `z* = cell(z*, x)` of a cell, found by a solver instead of by stacking
    layers, and differentiated without storing the iterations.

    ```python
    cell = CellModule(...)                       # cell(z, x) -> z, an eqx.Module
    deq = ctmodels.nn.DEQ(cell)                  # Anderson forward, implicit backward
    z_star = deq(x, z0)                          # one example; jax.vmap for a batch
    sol = deq.solve(x, z0, key=key)              # value, stats, result, jac_loss
    ```

    Called on one example (`jax.vmap` it for a batch); `jax.jit`, `jax.vmap` and
    `jax.grad` safe, in float32 and float64, with the tolerances of
    [`ctmodels.default_tolerances`][] for the state's dtype unless given. The
    cell's parameters (when it is an `eqx.Module`) and `x` receive gradients; the
    initial state `z0` does not.

    **Backward passes** (`backward=`):

    - `"implicit"` (default): the implicit function theorem at `z*`, one linear
        solve with `I - ∂f/∂z`. By default matrix-free, mirroring the forward solver
        (adjoint fixed-point iteration for `"iteration"` / `"damped"`,
        Anderson-accelerated otherwise; see [`ctmodels.fixed_point`][]); or any
        registry linear solver through `linear_solver=` (`"gmres"`, `"lu"`, ...).
        The exact gradient of the equilibrium; memory independent of the
        iterations.
    - `"unrolled"`: backprop through the forward solver's iterations (memory grows
        with them); for comparisons.
    - `"jacobian_free"`: the gradient of one application of the cell at `z*`,
        `∂f(z*, x)/∂θ`, as if `∂f/∂z` were zero (JFB; Fung et al., 2022): one
        vector-Jacobian product, no linear solve. A descent direction when the cell
        is contractive enough; inexact otherwise.
    - `"phantom"`: the gradient of `phantom_steps` damped steps
        `z <- (1 - λ) z + λ f(z, x)` (`λ = phantom_damping`) unrolled from `z*`
        (Geng et al., 2021). Tends to the implicit gradient as `phantom_steps`
        grows, at the cost of `phantom_steps` vector-Jacobian products.

    **Jacobian regularisation** (Bai, Koltun & Kolter, 2021): `solve(..., key=key)`
    also returns `jac_loss`, Hutchinson's estimate of `‖∂f/∂z‖²_F` at `z*`; adding a
    small multiple of it to the loss keeps the cell contractive, so the forward and
    backward solves stay cheap (divide by the state's size for the per-dimension
    form of the paper).

    **Failures**: with `throw=True` (default) a forward solve that does not converge
    raises a [`ctmodels.SolverError`][] (under `jit`, a runtime error that
    [`ctmodels.readable_errors`][] turns back into one) that names the solver, how it
    failed and what to try; with `throw=False` `solve` returns the last iterate and
    the result code.
    """

    cell: Callable[..., PyTree[Array]]
    solver: Any = eqx.field(static=True)
    backward: str = eqx.field(static=True)
    linear_solver: Any = eqx.field(static=True)
    phantom_steps: int = eqx.field(static=True)
    phantom_damping: float = eqx.field(static=True)
    jacobian_probes: int = eqx.field(static=True)
    jacobian_noise: str = eqx.field(static=True)
    rtol: float | None = eqx.field(static=True)
    atol: float | None = eqx.field(static=True)
    max_steps: int = eqx.field(static=True)
    throw: bool = eqx.field(static=True)
    on_backward: Callable[[dict[str, Any]], None] | None = eqx.field(static=True)

    def __init__(
        self,
        cell: Callable[..., PyTree[Array]],
        *,
        solver: str | optx.AbstractFixedPointSolver | optx.AbstractRootFinder = (
            "anderson"
        ),
        backward: Literal["implicit", "unrolled", "jacobian_free", "phantom"] = (
            "implicit"
        ),
        linear_solver: Any = None,
        phantom_steps: int = 5,
        phantom_damping: float = 0.5,
        jacobian_probes: int = 1,
        jacobian_noise: Literal["gaussian", "rademacher"] = "gaussian",
        rtol: float | None = None,
        atol: float | None = None,
        max_steps: int = 256,
        throw: bool = True,
        on_backward: Callable[[dict[str, Any]], None] | None = None,
    ):
        """**Arguments:**

        - `cell`: `cell(z, x) -> z`, an `eqx.Module` (its parameters are trained) or
            a function; it returns a pytree with the structure, shapes and dtypes of
            `z`.
        - `solver`: the forward solver, a registry name of kind `fixed_point`
            (`"anderson"` default, `"broyden"`, `"iteration"`, `"damped"`,
            `"newton"`, `"chord"`; `ctmodels.solvers.available("fixed_point")`) or
            an Optimistix fixed-point solver or root finder.
        - `backward`: `"implicit"` (default), `"unrolled"`, `"jacobian_free"` or
            `"phantom"` (above).
        - `linear_solver`: for `backward="implicit"`, the backward linear solver: a
            registry name of kind `linear` or a Lineax solver; `None` (default)
            mirrors the forward solver, matrix-free.
        - `phantom_steps`, `phantom_damping`: `k >= 1` and `λ` in `(0, 1]` of the
            phantom gradient (defaults 5 and 0.5; `λ = 1` is plain unrolling).
        - `jacobian_probes`: probes of the Hutchinson estimate `jac_loss` (each one
            vector-Jacobian product); `jacobian_noise`: `"gaussian"` (default, as
            Bai et al.) or `"rademacher"` (lower variance).
        - `rtol`, `atol`: the forward solve stops when
            `|f(z, x) - z| <= atol + rtol |z|`; `None` (default): the defaults for
            the state's dtype (`1e-5`, `1e-6` in float32; `1e-6`, `1e-8` in float64).
            For a solver given by name; a solver value carries its own.
        - `max_steps`: the most forward iterations (default 256).
        - `throw`: raise on a failed forward solve (default) or return its code.
        - `on_backward`: for `backward="implicit"`, a callable receiving the
            statistics (`residual`, `relative_residual`, `num_steps`) of each
            backward linear solve, e.g. a
            [`ctmodels.solvers.BackwardMonitor`][].
        """
        if not callable(cell):
            raise ValueError(
                "ctmodels.nn.DEQ: cell must be a callable cell(z, x) -> z (an "
                f"eqx.Module or a function), got {type(cell).__name__}."
            )
        if backward not in BACKWARDS:
            raise ValueError(
                f"ctmodels.nn.DEQ: backward must be one of "
                f"{', '.join(map(repr, BACKWARDS))}, got {backward!r}."
            )
        _positive_int(phantom_steps, "phantom_steps", "DEQ", " (Geng et al. use 5)")
        if not 0 < float(phantom_damping) <= 1:
            raise ValueError(
                "ctmodels.nn.DEQ: phantom_damping is the step λ of z <- (1 - λ) z + "
                f"λ f(z, x) and must be in (0, 1], got {phantom_damping!r}."
            )
        _positive_int(jacobian_probes, "jacobian_probes", "DEQ")
        if jacobian_noise not in _NOISES:
            raise ValueError(
                "ctmodels.nn.DEQ: jacobian_noise must be 'gaussian' or 'rademacher', "
                f"got {jacobian_noise!r}."
            )
        check_options(
            "DEQ",
            backward=backward,
            linear_solver=linear_solver,
            max_steps=max_steps,
            throw=throw,
            on_backward=on_backward,
        )
        self.cell = cell
        self.solver = solver
        self.backward = backward
        self.linear_solver = linear_solver
        self.phantom_steps = phantom_steps
        self.phantom_damping = float(phantom_damping)
        self.jacobian_probes = jacobian_probes
        self.jacobian_noise = jacobian_noise
        self.rtol = rtol
        self.atol = atol
        self.max_steps = max_steps
        self.throw = throw
        self.on_backward = on_backward

    def __call__(
        self,
        x: PyTree[Array],
        z0: PyTree[Array] | None = None,
        *,
        key: PRNGKeyArray | None = None,
    ) -> PyTree[Array]:
        """The equilibrium `z*` for the input `x` (one example).

        **Arguments:**

        - `x`: the input injected into every application of the cell.
        - `z0`: the initial state; `None` (default): zeros shaped like `x` (pass it
            when the state is shaped unlike `x`).
        - `key`: unused (the solve is deterministic); accepted so that the layer
            composes with `eqx.nn.Sequential` and other keyed layers.

        **Returns:** `z*` (for the statistics and `jac_loss`, use `solve`).
        """
        del key
        return self.solve(x, z0).value

    def _adjoint(self, z0):
        """The fixed-point adjoint of `backward="implicit"` (by name, or a value when
        a linear solver or a backward monitor is given)."""
        if self.linear_solver is not None:
            return implicit_adjoint(self.linear_solver, self.on_backward)
        if self.on_backward is None:
            return "implicit"
        # the engine's default matrix-free backward for this forward solver, with the
        # monitor attached
        dtype = _defaults.state_dtype(z0)
        rtol, atol = _defaults.tolerances("nonlinear", z0, self.rtol, self.atol)
        solver = self.solver
        if isinstance(solver, str):
            solver = solvers.get(solver, kind="fixed_point", rtol=rtol, atol=atol)
        return resolve_nonlinear_adjoint(
            "implicit", "fixed_point", solver, self.max_steps, dtype, self.on_backward
        )

    def solve(
        self,
        x: PyTree[Array],
        z0: PyTree[Array] | None = None,
        *,
        key: PRNGKeyArray | None = None,
    ) -> EquilibriumSolution:
        """Solve for the equilibrium and report how.

        **Arguments:** `x` and `z0` as for the call; `key`: a JAX PRNG key for the
        Jacobian regulariser (`None`, default: no `jac_loss`).

        **Returns:** an [`ctmodels.nn.EquilibriumSolution`][] (`value`, `stats`,
        `result`, `jac_loss`).
        """
        z0 = initial_state(self.cell, x, z0, "DEQ", "z0")
        args = (self.cell, x)
        options = dict(
            solver=self.solver,
            rtol=self.rtol,
            atol=self.atol,
            max_steps=self.max_steps,
            throw=self.throw,
        )
        if self.backward == "implicit":
            sol = fixed_point(_apply, z0, args, adjoint=self._adjoint(z0), **options)
            value, backward_steps = sol.value, jnp.array(-1)
        elif self.backward == "unrolled":
            sol = fixed_point(_apply, z0, args, adjoint="checkpoint", **options)
            value, backward_steps = sol.value, sol.stats["num_steps"]
        else:
            # forward without gradient; the gradient comes from a few cell steps at z*
            sol = fixed_point(_apply, _stop(z0), _stop(args), **options)
            z = jax.lax.stop_gradient(sol.value)
            if self.backward == "jacobian_free":
                carrier, backward_steps = self.cell(z, x), jnp.array(1)
            else:
                carrier = self._phantom(z, x)
                backward_steps = jnp.array(self.phantom_steps)
            value = _straight_through(z, carrier)
        stats = {**sol.stats, "backward_steps": backward_steps}
        jac_loss = None
        if key is not None:
            jac_loss = _jacobian_frobenius(
                self.cell, sol.value, x, key, self.jacobian_probes, self.jacobian_noise
            )
        return EquilibriumSolution(
            value=value, stats=stats, result=sol.result, jac_loss=jac_loss
        )

    def _phantom(self, z, x):
        lam = self.phantom_damping

        def step(z, _):
            fz = self.cell(z, x)
            return jax.tree.map(lambda a, b: (1 - lam) * a + lam * b, z, fz), None

        z, _ = jax.lax.scan(step, z, None, length=self.phantom_steps)
        return z
