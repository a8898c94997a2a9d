"""Limited-memory "good" Broyden as an Optimistix root finder."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, final

import equinox as eqx
import jax
import jax.lax as lax
import jax.numpy as jnp
import optimistix as optx
from jaxtyping import Array, Bool, Float, Int, PyTree, Scalar

from ._misc import (
    check_memory,
    evaluate,
    flat_problem,
    resolved,
    safe_norm,
    terminate,
)


class _BroydenState(eqx.Module):
    us: Float[Array, "m n"]
    vs: Float[Array, "m n"]
    index: Int[Array, ""]
    y_prev: Float[Array, " n"]
    g_prev: Float[Array, " n"]
    bg_prev: Float[Array, " n"]
    has_prev: Bool[Array, ""]
    error: Scalar
    converged: Bool[Array, ""]
    diverged: Bool[Array, ""]
    num_skipped: Int[Array, ""]
    num_fallback: Int[Array, ""]


@final
class Broyden(optx.AbstractRootFinder):
    r"""Limited-memory "good" Broyden method for the root-finding problem `g(y) = 0`.

    A quasi-Newton method which never forms a Jacobian: it maintains an approximation
    of the *inverse* Jacobian as a low-rank correction of `-I`,

    `B = -I + sum_i u_i v_i^T`,

    with the `u_i`, `v_i` stored as the rows of two fixed-size `[memory, n]` buffers
    (`y` may be any pytree of arrays: it is flattened; the solver works under `jit`
    and `vmap`). Each step is `y_{k+1} = y_k - B g(y_k)`. After each step, with
    `s = y_{k+1} - y_k` and `d = g(y_{k+1}) - g(y_k)`, Broyden's "good" update of the
    Jacobian, written for the inverse through the Sherman--Morrison formula, is the
    rank-one correction

    `B <- B + (s - B d) (B^T s)^T / (s^T B d)`,

    i.e. `u = (s - B d) / (s^T B d)`, `v = B^T s`. This is the formulation used by Deep
    Equilibrium Models. For `optimistix.fixed_point(f, Broyden(...), y0)` the root of
    `g(y) = f(y) - y` is found, for which `-I` is the natural initial inverse Jacobian
    (exact when `f` is constant), and the first step is the plain iteration
    `y_1 = f(y_0)`. The output of `g` must have the same total number of elements as
    `y` (any pytree structure).

    **Implementation notes:**

    - Memory policy: *restart*. Once all `memory` slots are in use, the next update
        first clears the history (back to `B = -I`) and then starts filling it again.
        (Dropping only the oldest rank-one term instead, as some DEQ implementations
        do, breaks the recursive structure of the update -- each `u_i`, `v_i` was
        computed from the `B` that contained all older terms -- and in our tests
        made the method diverge on slowly-contracting problems; restarting is the
        classical limited-memory Broyden.)
    - Safeguards: an update whose denominator is negligible,
        `|s^T B d| <= sqrt(eps) * |s| * |B d|` (including `s = 0`, e.g. a repeated
        iterate), or not finite, or whose `d` is at roundoff level (within a few ulps
        of the residuals and iterates it comes from: a residual that does not change,
        as for a map without a fixed point), is skipped (counted in
        `sol.stats["num_skipped"]`). If the quasi-Newton step is not finite, the
        history is cleared and the plain step `y + g(y)` is taken instead (counted
        in `sol.stats["num_fallback"]`).
        Safe branches are selected with the "double `where`" trick, so gradients
        through the unrolled iteration (`optimistix.RecursiveCheckpointAdjoint`)
        contain no spurious NaNs.
    - Cost per step: one evaluation of `g` and four products with the `[m, n]`
        buffers (`B g` and `B^T s`; `B d = B g - B g_prev` reuses the previous step's
        product, and the new step `-(B + u v^T) g = -B g - u (v . g)` needs no further
        pass). The buffers are updated by a masked select rather than an indexed
        write, which under `vmap` (a per-sample slot) would be a scatter and a copy.
    - `max_step`, if given, caps the Euclidean length of each step at
        `max_step * (1 + |y_k|)` (a simple trust-region style safeguard against the
        wild first steps of a poor Jacobian approximation); by default steps are
        not limited.
    - Termination: the solve stops once an iterate satisfies
        `norm(|g(y_k)| / (atol + rtol * |y_k|)) < 1` (the rule of
        `optimistix.FixedPointIteration`, applied to the residual `g`), and -- like the
        Optimistix solvers -- returns the step computed from it, `y_{k+1}`. If `g(y_k)`
        is not finite, the solve stops with `RESULTS.nonlinear_divergence` and returns
        the last (finite) iterate `y_k`.

    ??? cite "References"

        ```bibtex
        @article{broyden1965class,
            author={Broyden, C. G.},
            title={A Class of Methods for Solving Nonlinear Simultaneous Equations},
            journal={Mathematics of Computation},
            volume={19},
            number={92},
            pages={577--593},
            year={1965},
            doi={10.1090/S0025-5718-1965-0198670-6}
        }

        @inproceedings{bai2019deep,
            author={Bai, Shaojie and Kolter, J. Zico and Koltun, Vladlen},
            title={Deep Equilibrium Models},
            booktitle={Advances in Neural Information Processing Systems},
            volume={32},
            year={2019}
        }
        ```
    """

    rtol: float
    atol: float
    norm: Callable[[PyTree], Scalar] = optx.max_norm
    memory: int = eqx.field(static=True, default=20)
    max_step: float | None = None

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
    ) -> _BroydenState:
        del fn, args, options, aux_struct, tags
        n, dtype = flat_problem("Broyden", y, f_struct, "")
        zeros_hist = jnp.zeros((self.memory, n), dtype)
        return _BroydenState(
            us=zeros_hist,
            vs=zeros_hist,
            index=jnp.array(0),
            y_prev=jnp.zeros((n,), dtype),
            g_prev=jnp.zeros((n,), dtype),
            bg_prev=jnp.zeros((n,), dtype),
            has_prev=jnp.array(False),
            error=jnp.array(jnp.inf, dtype),
            converged=jnp.array(False),
            diverged=jnp.array(False),
            num_skipped=jnp.array(0),
            num_fallback=jnp.array(0),
        )

    def step(
        self,
        fn,
        y: PyTree[Array],
        args: PyTree,
        options: dict[str, Any],
        state: _BroydenState,
        tags: frozenset[object],
    ) -> tuple[PyTree[Array], _BroydenState, Any]:
        del options, tags
        # The residual at the current iterate, and the termination test there.
        ev = evaluate(self, fn, y, args)
        y_flat, unravel, g_flat, aux = ev.y, ev.unravel, ev.r, ev.aux
        error, converged, diverged = ev.error, ev.converged, ev.diverged
        dtype = y_flat.dtype
        m = self.memory
        eps = jnp.finfo(dtype).eps

        # Limited memory: once all slots are used, restart from B = -I. Slots at or
        # beyond the live count are masked out of every product rather than zeroed,
        # so a restart costs nothing (no pass over the [m, n] buffers).
        full = state.index >= m
        slot = jnp.where(full, 0, state.index)
        us, vs = state.us, state.vs
        live = jnp.arange(m) < slot

        def b_times(x):
            # B x = -x + sum_{live i} u_i (v_i . x). Written as `coef @ us` (not
            # `us.T @ coef`): XLA then reads the buffer in place instead of
            # materialising its [n, m] transpose every step.
            return -x + jnp.where(live, vs @ x, 0) @ us

        # Four products with the [m, n] buffers per step: B g and B^T s. The others
        # follow from them:
        # - B d = B g - B g_prev, where B g_prev (same B, unless the memory just
        #   restarted to -I) was computed at the previous step;
        # - after the rank-one update B' = B + u v^T the step is
        #   -B' g = -(B g) - u (v . g): no further pass over the buffers.
        s = y_flat - state.y_prev
        bg = b_times(g_flat)
        bts = -s + jnp.where(live, us @ s, 0) @ vs  # B^T s
        bg_prev = jnp.where(full, -state.g_prev, state.bg_prev)
        bd = bg - bg_prev

        # Rank-one "good" Broyden update of the inverse Jacobian B = -I + U^T V.
        denom = jnp.dot(s, bd)
        threshold = jnp.sqrt(eps) * safe_norm(s) * safe_norm(bd)
        # A change of the residual at roundoff level says nothing about the Jacobian
        # (see `resolved`): no update from it.
        d = g_flat - state.g_prev
        update = (
            state.has_prev
            & resolved(d, g_flat, state.g_prev, y_flat, state.y_prev)
            & jnp.isfinite(denom)
            & jnp.isfinite(threshold)
            & (jnp.abs(denom) > threshold)
        )
        u = (s - bd) / jnp.where(update, denom, 1)
        update = update & jnp.all(jnp.isfinite(u)) & jnp.all(jnp.isfinite(bts))
        write = (jnp.arange(m) == slot)[:, None] & update
        us = jnp.where(write, u, us)
        vs = jnp.where(write, bts, vs)
        index = jnp.where(update, slot + 1, slot)
        num_skipped = state.num_skipped + jnp.where(
            state.has_prev & jnp.invert(update), 1, 0
        )

        # Quasi-Newton step p = -B' g, with the plain step (and a restart) as fallback.
        vg = jnp.where(update, jnp.dot(jnp.where(update, bts, 0), g_flat), 0)
        new_bg = bg + jnp.where(update, u, 0) * vg
        p = -new_bg
        ok = jnp.all(jnp.isfinite(p))
        p = jnp.where(ok, p, g_flat)
        new_bg = jnp.where(ok, new_bg, -g_flat)
        index = jnp.where(ok, index, 0)
        num_fallback = state.num_fallback + jnp.where(ok, 0, 1)
        if self.max_step is not None:
            limit = self.max_step * (1 + safe_norm(lax.stop_gradient(y_flat)))
            length = safe_norm(p)
            too_long = length > limit
            p = p * jnp.where(too_long, limit / jnp.where(too_long, length, 1), 1)

        new_y = jnp.where(converged | diverged, y_flat, y_flat + p)
        new_state = _BroydenState(
            us=us,
            vs=vs,
            index=index,
            y_prev=y_flat,
            g_prev=g_flat,
            bg_prev=new_bg,
            has_prev=jnp.array(True),
            error=error,
            converged=converged,
            diverged=diverged,
            num_skipped=num_skipped,
            num_fallback=num_fallback,
        )
        return unravel(new_y), new_state, aux

    def terminate(
        self,
        fn,
        y: PyTree[Array],
        args: PyTree,
        options: dict[str, Any],
        state: _BroydenState,
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
        state: _BroydenState,
        tags: frozenset[object],
        result: optx.RESULTS,
    ) -> tuple[PyTree[Array], Any, dict[str, Any]]:
        del fn, args, options, tags, result
        stats = {"num_skipped": state.num_skipped, "num_fallback": state.num_fallback}
        return y, aux, stats

    def __init_subclass__(cls, **kwargs):
        raise TypeError("`Broyden` is final and may not be subclassed.")


Broyden.__init__.__doc__ = """**Arguments:**

- `rtol`: Relative tolerance for terminating the solve.
- `atol`: Absolute tolerance for terminating the solve. The solve stops once
    `norm(|g(y)| / (atol + rtol * |y|)) < 1`.
- `norm`: The norm used in the termination criterion. Should be any function
    `PyTree -> Scalar`, e.g. [`optimistix.max_norm`][] (the default),
    [`optimistix.rms_norm`][] or [`optimistix.two_norm`][].
- `memory`: The number of rank-one terms kept in the inverse-Jacobian approximation
    (static). When full, the approximation restarts from `-I`.
- `max_step`: Optional cap on the step length, relative to `1 + |y|` (Euclidean). `None`
    (the default) takes full quasi-Newton steps.
"""
