"""Anderson acceleration as an Optimistix root finder."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, final

import equinox as eqx
import jax
import jax.lax as lax
import jax.numpy as jnp
import optimistix as optx
from jaxtyping import Array, Bool, Float, Int, PyTree, Scalar

from ._misc import check_memory, evaluate, flat_problem, resolved, terminate


class _AndersonState(eqx.Module):
    dx_hist: Float[Array, "m n"]  # dY + beta dR, the columns of the update
    dr_hist: Float[Array, "m n"]
    gram: Float[Array, "m m"]  # dR^T dR, kept up to date one row at a time
    valid: Bool[Array, " m"]
    index: Int[Array, ""]
    y_prev: Float[Array, " n"]
    r_prev: Float[Array, " n"]
    has_prev: Bool[Array, ""]
    error: Scalar
    converged: Bool[Array, ""]
    diverged: Bool[Array, ""]
    num_fallback: Int[Array, ""]


@final
class Anderson(optx.AbstractRootFinder):
    r"""Anderson acceleration for the root-finding problem `g(y) = 0`.

    This accelerates the (mixed) fixed-point iteration `y <- y + beta * g(y)`. Writing
    `r_k = g(y_k)` and stacking the last `m` differences
    `dY = [y_{i+1} - y_i]`, `dR = [r_{i+1} - r_i]` as columns, each step solves the
    small regularised least-squares problem

    `gamma = argmin_gamma |r_k - dR gamma|^2 + lambda |gamma|^2`

    and takes `y_{k+1} = y_k + beta r_k - (dY + beta dR) gamma`. This is the
    "type II" / difference form of Walker & Ni (2011).

    When used through `optimistix.fixed_point(f, Anderson(...), y0)` the fixed-point
    problem is converted to the root of `g(y) = f(y) - y`, so that this is exactly
    classical Anderson acceleration of `f` with mixing parameter `beta`. As a root
    finder for a general `g` it is an accelerated damped iteration `y <- y + beta g(y)`,
    which suits `g` whose Jacobian has eigenvalues with negative real part (for
    example a stable vector field), scaled such that `|1 + beta * eig| < 1`. The output
    of `g` must have the same total number of elements as `y` (any pytree
    structure).

    **Implementation notes:**

    - The iterate is flattened (so `y` may be any pytree of arrays) and the history is
        kept in fixed-size ring buffers of shape `[memory, n]`: this works under `jit`,
        `vmap` and `grad`. When the buffer is full the oldest difference is
        overwritten.
    - Each stored difference is normalised so that `|dR_i| = 1` (with `dY_i` scaled by
        the same factor). This changes nothing mathematically, but it makes the
        coefficient problem scale-invariant. The `memory x memory` normal equations
        `(dR^T dR + lambda I) gamma = dR^T r_k` are then solved with
        `lambda = max(regularization, 100 * eps) * trace(dR^T dR) / (number of stored
        differences)`, i.e. a Tikhonov term *relative* to the size of the (normalised)
        residual history, which bounds the condition number of the small system by
        `1 + memory / max(regularization, 100 * eps)` at every scale -- so it does not
        degrade the acceleration close to convergence. (`eps` is the machine epsilon of
        the dtype; the floor only matters in low precision.)
    - Cost per step: one evaluation of `g`, two masked writes and three products
        with the `[m, n]` buffers: `dR^T dR` is updated one row and column at a
        time, and the buffers hold `dR` and `dY + beta dR` (the update's columns).
    - Safeguards: differences `dR` at roundoff level (zero, e.g. a repeated iterate, or
        within a few ulps of the residuals and iterates they come from: a residual
        that does not change, as for a map without a fixed point) are not stored;
        unused slots of the buffer are masked out (their coefficient is exactly zero);
        with no usable history, or if the small solve is not finite, the step falls
        back to the plain mixed step `y_k + beta r_k`. The safe branches are selected
        with the "double `where`" trick, so gradients through the unrolled iteration
        (`optimistix.RecursiveCheckpointAdjoint`) contain no spurious NaNs.
    - Termination: the solve stops once an iterate satisfies
        `norm(|g(y_k)| / (atol + rtol * |y_k|)) < 1` (the rule of
        `optimistix.FixedPointIteration`, applied to the residual `g`), and -- like the
        Optimistix solvers -- returns the step computed from it, `y_{k+1}`. (This
        also gives the unrolled derivative one more iteration.) If `g(y_k)` is not
        finite, the solve stops with `RESULTS.nonlinear_divergence` and returns the
        last (finite) iterate `y_k`.
    - The number of times the safeguard fell back to the plain step is reported in
        `sol.stats["num_fallback"]`.

    ??? cite "Reference"

        ```bibtex
        @article{walker2011anderson,
            author={Walker, Homer F. and Ni, Peng},
            title={Anderson Acceleration for Fixed-Point Iterations},
            journal={SIAM Journal on Numerical Analysis},
            volume={49},
            number={4},
            pages={1715--1735},
            year={2011},
            doi={10.1137/10079074X}
        }
        ```
    """

    rtol: float
    atol: float
    norm: Callable[[PyTree], Scalar] = optx.max_norm
    memory: int = eqx.field(static=True, default=5)
    beta: float = 1.0
    regularization: float = 1e-8

    def __check_init__(self):
        check_memory(self.memory)

    def init(
        self,
        fn,
        y: PyTree[Array],
        args: PyTree,
        options: dict[str, Any],
        f_struct: PyTree[jax.ShapeDtypeStruct],
        aux_struct: PyTree[jax.ShapeDtypeStruct],
        tags: frozenset[object],
    ) -> _AndersonState:
        del fn, args, options, aux_struct, tags
        n, dtype = flat_problem(
            "Anderson", y, f_struct, " (it iterates `y + beta * fn(y, args)`)"
        )
        m = self.memory
        zeros_hist = jnp.zeros((m, n), dtype)
        return _AndersonState(
            dx_hist=zeros_hist,
            dr_hist=zeros_hist,
            gram=jnp.zeros((m, m), dtype),
            valid=jnp.zeros((m,), bool),
            index=jnp.array(0),
            y_prev=jnp.zeros((n,), dtype),
            r_prev=jnp.zeros((n,), dtype),
            has_prev=jnp.array(False),
            error=jnp.array(jnp.inf, dtype),
            converged=jnp.array(False),
            diverged=jnp.array(False),
            num_fallback=jnp.array(0),
        )

    def step(
        self,
        fn,
        y: PyTree[Array],
        args: PyTree,
        options: dict[str, Any],
        state: _AndersonState,
        tags: frozenset[object],
    ) -> tuple[PyTree[Array], _AndersonState, Any]:
        del options, tags
        # The residual at the current iterate, and the termination test there.
        ev = evaluate(self, fn, y, args)
        y_flat, unravel, r_flat, aux = ev.y, ev.unravel, ev.r, ev.aux
        error, converged, diverged = ev.error, ev.converged, ev.diverged
        dtype = y_flat.dtype
        m = self.memory

        # Push the newest difference pair into the ring buffer (normalised, |dR| = 1).
        # The buffers are written with a masked select rather than an indexed update:
        # under `vmap` (a per-sample slot) an indexed update becomes a scatter plus a
        # copy of the whole buffer, while the select fuses into one pass.
        beta = jnp.asarray(self.beta, dtype)
        dy = y_flat - state.y_prev
        dr = r_flat - state.r_prev
        sq = jnp.sum(dr * dr)
        # A difference at roundoff level is noise: normalised to |dR| = 1 it would
        # send the extrapolation anywhere (see `resolved`).
        usable = state.has_prev & (sq > 0) & jnp.isfinite(sq)
        usable = usable & resolved(dr, r_flat, state.r_prev, y_flat, state.y_prev)
        inv = jnp.where(usable, lax.rsqrt(jnp.where(usable, sq, 1)), 0)
        slot = state.index
        at_slot = jnp.arange(m) == slot
        write = at_slot & usable
        dr_new = dr * inv
        dr_hist = jnp.where(write[:, None], dr_new, state.dr_hist)
        dx_hist = jnp.where(write[:, None], (dy + beta * dr) * inv, state.dx_hist)
        valid = state.valid | write
        index = jnp.where(usable, (slot + 1) % m, slot)
        # The Gram matrix dR^T dR changes in one row and column: m x n work, not
        # m x m x n.
        row = dr_hist @ dr_new
        gram = jnp.where(
            write[:, None],
            row[None, :],
            jnp.where(write[None, :], row[:, None], state.gram),
        )

        # Regularised normal equations for the mixing coefficients.
        maskf = valid.astype(dtype)
        gram_v = gram * maskf[:, None] * maskf[None, :]
        rhs = (dr_hist @ r_flat) * maskf
        num_valid = jnp.sum(maskf)
        trace = jnp.trace(gram_v)
        eps = jnp.finfo(dtype).eps
        reg = jnp.maximum(jnp.asarray(self.regularization, dtype), 100 * eps)
        lam = reg * trace / jnp.maximum(num_valid, 1)
        good = (
            (num_valid > 0)
            & jnp.isfinite(trace)
            & (lam > 0)
            & jnp.all(jnp.isfinite(rhs))
        )
        eye = jnp.eye(m, dtype=dtype)
        system = gram_v + jnp.diag(jnp.where(valid, lam, 1))
        system = jnp.where(good, system, eye)
        rhs = jnp.where(good, rhs, 0)
        gamma = jnp.linalg.solve(system, rhs)
        ok = good & jnp.all(jnp.isfinite(gamma))
        gamma = jnp.where(ok, gamma * maskf, 0)

        # y + beta r - (dY + beta dR) gamma, as `gamma @ hist` (no transpose of the
        # buffer is materialised).
        new_y = y_flat + beta * r_flat - gamma @ dx_hist
        new_y = jnp.where(converged | diverged, y_flat, new_y)
        num_fallback = state.num_fallback + jnp.where(
            state.has_prev & jnp.invert(ok), 1, 0
        )

        new_state = _AndersonState(
            dx_hist=dx_hist,
            dr_hist=dr_hist,
            gram=gram,
            valid=valid,
            index=index,
            y_prev=y_flat,
            r_prev=r_flat,
            has_prev=jnp.array(True),
            error=error,
            converged=converged,
            diverged=diverged,
            num_fallback=num_fallback,
        )
        return unravel(new_y), new_state, aux

    def terminate(
        self,
        fn,
        y: PyTree[Array],
        args: PyTree,
        options: dict[str, Any],
        state: _AndersonState,
        tags: frozenset[object],
    ) -> tuple[Bool[Array, ""], optx.RESULTS]:
        del fn, y, args, options, tags
        return terminate(state)

    def postprocess(
        self,
        fn,
        y: PyTree[Array],
        aux: Any,
        args: PyTree,
        options: dict[str, Any],
        state: _AndersonState,
        tags: frozenset[object],
        result: optx.RESULTS,
    ) -> tuple[PyTree[Array], Any, dict[str, Any]]:
        del fn, args, options, tags, result
        return y, aux, {"num_fallback": state.num_fallback}

    def __init_subclass__(cls, **kwargs):
        raise TypeError("`Anderson` is final and may not be subclassed.")


Anderson.__init__.__doc__ = """**Arguments:**

- `rtol`: Relative tolerance for terminating the solve.
- `atol`: Absolute tolerance for terminating the solve. The solve stops once
    `norm(|g(y)| / (atol + rtol * |y|)) < 1`.
- `norm`: The norm used in the termination criterion. Should be any function
    `PyTree -> Scalar`, e.g. [`optimistix.max_norm`][] (the default),
    [`optimistix.rms_norm`][] or [`optimistix.two_norm`][].
- `memory`: The number `m` of past differences used to extrapolate (static).
- `beta`: The mixing (damping) parameter of the underlying iteration
    `y <- y + beta * g(y)`. `beta = 1` is undamped.
- `regularization`: The Tikhonov parameter of the coefficient problem, relative to
    the mean squared norm of the stored (normalised) residual differences.
"""
