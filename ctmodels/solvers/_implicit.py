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


def _norm(tree) -> jax.Array:
    leaves = jax.tree_util.tree_leaves(tree)
    return jnp.sqrt(sum(jnp.sum(jnp.abs(x) ** 2) for x in leaves))


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
        r = jax.tree.map(lambda a, b: a - b, operator.mv(x), vector)
        b = _norm(vector)
        rel = _norm(r) / jnp.where(b > 0, b, 1.0)
        if self.on_solve is not None:
            jax.debug.callback(
                lambda res, rel_: self.on_solve(
                    {"residual": float(res), "relative_residual": float(rel_)}
                ),
                _norm(r),
                rel,
            )
        bad = ~jnp.isfinite(rel) | (rel > self.tol)
        # Our residual check is the arbiter: an inner solver that flags a tolerance
        # quirk (e.g. lineax GMRES "stagnation" at a residual we accept) should not
        # turn a usable solve into an opaque error, and a bad one raises ours below.
        result = lx.RESULTS.where(bad, result, lx.RESULTS.successful)
        x = eqx.error_if(
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

    **Arguments:** `rtol` (relative residual target `|A x - b| <= rtol |b|`),
    `max_steps`, `memory` (Anderson history).
    """

    rtol: float = 1e-6
    max_steps: int = eqx.field(static=True, default=500)
    memory: int = eqx.field(static=True, default=5)

    def init(self, operator, options):
        # Linearise once (jax.linearize): every iteration then costs one application
        # of the stored linear map instead of re-tracing the function's JVP/VJP.
        return lx.linearise(operator)

    def compute(self, state, vector, options):
        from ._anderson import Anderson

        operator = state
        flat_b, _ = jax.flatten_util.ravel_pytree(vector)
        scale = jnp.max(jnp.abs(flat_b))
        # elementwise |g| <= atol with atol = rtol * max|b| (a max-norm relative test)
        atol = self.rtol * jnp.where(scale > 0, scale, 1.0)
        solver = Anderson(rtol=0.0, atol=atol, memory=self.memory)

        def residual(x, args):
            op, b = args
            return jax.tree.map(lambda a, c: a - c, op.mv(x), b)

        sol = optx.root_find(
            residual,
            solver,
            jax.tree.map(jnp.negative, vector),
            (operator, vector),
            max_steps=self.max_steps,
            adjoint=optx.RecursiveCheckpointAdjoint(),
            throw=False,
        )
        ok = sol.result == optx.RESULTS.successful
        result = lx.RESULTS.where(
            ok, lx.RESULTS.successful, lx.RESULTS.max_steps_reached
        )
        return sol.value, result, {"num_steps": sol.stats["num_steps"]}

    def transpose(self, state, options):
        return state.T, options

    def conj(self, state, options):
        return lx.conj(state), options

    def assume_full_rank(self):
        return True


class BackwardMonitor:
    """Collects the statistics of implicit backward passes (one dict per linear
    solve: `residual`, `relative_residual`) for inspection:

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
