"""The implicit adjoint shared by every entry point, with a checked backward solve."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import diffrax
import equinox as eqx
import jax
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
