"""Helpers shared by the flattened quasi-Newton solvers (`Anderson`, `Broyden`)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax.flatten_util as jfu
import jax.lax as lax
import jax.numpy as jnp
import jax.tree_util as jtu
import optimistix as optx
from jaxtyping import Array, Bool, Scalar

# A difference of two residuals smaller than `_ROUNDOFF_ULPS` ulps of the numbers it
# was computed from is roundoff, not information about the Jacobian.
_ROUNDOFF_ULPS = 16.0


def flat_size(tree) -> int:
    """The total number of elements of a pytree of arrays (or of shape structs)."""
    return sum(int(x.size) for x in jtu.tree_leaves(tree))


def ravel_as(tree, dtype) -> Array:
    """Flatten a pytree of arrays into one vector of `dtype`."""
    leaves = [jnp.ravel(x).astype(dtype) for x in jtu.tree_leaves(tree)]
    if not leaves:
        return jnp.zeros((0,), dtype)
    return jnp.concatenate(leaves)


def scaled_residual(norm, rtol, atol, residual, y) -> Scalar:
    """`norm(|residual| / (atol + rtol * |y|))`, with `0/0 = 0`; no gradient."""
    residual = lax.stop_gradient(residual)
    y = lax.stop_gradient(y)
    scale = atol + rtol * jnp.abs(y)
    zero = residual == 0
    ratio = jnp.where(zero, 0, jnp.abs(residual) / jnp.where(zero, 1, scale))
    return norm(ratio)


def safe_norm(x: Array) -> Scalar:
    """Euclidean norm with a finite gradient at zero."""
    sq = jnp.sum(x * x)
    nonzero = sq > 0
    return jnp.where(nonzero, jnp.sqrt(jnp.where(nonzero, sq, 1)), 0)


def resolved(diff: Array, *scales: Array) -> Bool[Array, ""]:
    """Whether the difference `diff` of two residuals carries information: its norm
    is finite and above the roundoff (`_ROUNDOFF_ULPS` ulps) of the vectors it was
    computed from (`scales`: the residuals and iterates, whose roundoff is what a
    residual `g(y)` resolves).

    A secant method that divides by an unresolved difference extrapolates from noise:
    on `z -> z + 1` (no fixed point; the residual is constant) float32 roundoff makes
    `g(y_1) - g(y_0)` about `1e-7`, and the secant step jumps to `|z| ~ 1e7`, where
    `z + 1 == z` in float32 and the test `|g(z)| <= rtol |z|` is met: a false success.
    """
    diff = lax.stop_gradient(diff)
    size = safe_norm(diff)
    eps = jnp.finfo(diff.dtype).eps
    floor = sum(safe_norm(lax.stop_gradient(s)) for s in scales)
    return jnp.isfinite(size) & (size > _ROUNDOFF_ULPS * eps * floor)


def check_memory(memory) -> None:
    """The history length of a limited-memory solver: a positive int (static)."""
    if not isinstance(memory, int) or memory < 1:
        raise ValueError(f"`memory` must be a positive int, got {memory!r}.")


def flat_problem(name: str, y, f_struct, why: str = "") -> tuple[int, Any]:
    """`(n, dtype)` of the flattened iterate; raises unless `fn` returns as many
    elements as `y` has (any pytree structure)."""
    y_flat, _ = jfu.ravel_pytree(y)
    n = y_flat.size
    if flat_size(f_struct) != n:
        raise ValueError(
            f"{name} needs `fn(y, args)` to have as many elements as `y`{why}; got "
            f"{flat_size(f_struct)} and {n}."
        )
    return n, y_flat.dtype


class Evaluation(NamedTuple):
    """One evaluation of the residual at the current iterate, flattened, with the
    termination test of both solvers."""

    y: Array  # the flattened iterate
    unravel: Callable
    r: Array  # the flattened residual g(y)
    aux: Any
    error: Scalar  # norm(|g(y)| / (atol + rtol |y|)); < 1 is converged
    converged: Bool[Array, ""]
    diverged: Bool[Array, ""]  # g(y) is not finite


def evaluate(solver, fn, y, args) -> Evaluation:
    """Evaluate `g = fn` at `y` and apply the termination test
    `norm(|g(y)| / (atol + rtol |y|)) < 1` of `solver` (its `norm`, `rtol`, `atol`)."""
    r_tree, aux = fn(y, args)
    y_flat, unravel = jfu.ravel_pytree(y)
    dtype = y_flat.dtype
    r_flat = ravel_as(r_tree, dtype)
    error = scaled_residual(solver.norm, solver.rtol, solver.atol, r_flat, y_flat)
    error = jnp.asarray(error, dtype)
    diverged = jnp.invert(jnp.all(jnp.isfinite(lax.stop_gradient(r_flat))))
    return Evaluation(y_flat, unravel, r_flat, aux, error, error < 1, diverged)


def terminate(state) -> tuple[Bool[Array, ""], optx.RESULTS]:
    """Stop once the state says converged or diverged (a non-finite residual)."""
    result = optx.RESULTS.where(
        state.diverged, optx.RESULTS.nonlinear_divergence, optx.RESULTS.successful
    )
    return state.converged | state.diverged, result
