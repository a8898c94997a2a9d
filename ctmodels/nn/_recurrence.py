"""A recurrence run for a traced number of steps, with its own reverse-mode rule."""

from __future__ import annotations

from collections.abc import Callable

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, PyTree


def _stack(tree, n: int):
    return jax.tree.map(lambda a: jnp.zeros((n,) + a.shape, a.dtype), tree)


def _row(tree, i):
    return jax.tree.map(lambda a: a[i], tree)


def _put(tree, i, value):
    return jax.tree.map(lambda a, v: a.at[i].set(v), tree, value)


def _add(total, term):
    """`total + term` leafwise, `None` in `term` counting as zero."""
    return jax.tree.map(
        lambda a, b: a if b is None else a + b,
        total,
        term,
        is_leaf=lambda x: x is None,
    )


def _skipped(n, length: int, ndim: int) -> Array:
    """`[length, 1, ...]` mask of the steps at or after `n`."""
    return (jnp.arange(length) >= n).reshape((length,) + (1,) * ndim)


def _forward(diff, step, n, outputs: bool):
    params, carry, xs = diff
    length = jax.tree.leaves(xs)[0].shape[0]
    history = _stack(carry, length)  # the carry before each step
    outs = _stack(carry[0], length) if outputs else None

    def body(state):
        i, c, history, outs = state
        history = _put(history, i, c)
        c = step(params, c, _row(xs, i))
        if outputs:
            outs = outs.at[i].set(c[0])
        return i + 1, c, history, outs

    _, carry, history, outs = jax.lax.while_loop(
        lambda state: state[0] < n, body, (jnp.int32(0), carry, history, outs)
    )
    if outputs:
        outs = jnp.where(_skipped(n, length, carry[0].ndim), carry[0][None], outs)
    return carry, outs, history


@eqx.filter_custom_vjp
def recurrence(
    diff: tuple[PyTree, tuple, PyTree],
    step: Callable[[PyTree, tuple, PyTree], tuple],
    n: Array,
    outputs: bool,
) -> tuple[tuple, Array | None]:
    """`carry <- step(params, carry, xs[i])` for `i = 0, ..., n - 1`.

    `diff = (params, carry, xs)`: `params` a pytree (JAX arrays and static leaves),
    `carry` a tuple of floating-point JAX arrays whose first element is the state,
    `xs` a pytree of JAX arrays with the steps on their leading axis (length `N`). `n`
    is a traced integer `<= N`: the steps from `n` on are not run at all (a
    `while_loop`), which is the point: a batch whose rows need fewer steps than its
    padded length costs only the steps it needs. `step` must be a pure function of
    its arguments (it may not close over traced values: pass them in `params`).

    Returns `(carry, outs)`: the final carry and, with `outputs`, the state
    `carry[0]` after each step `[N, ...]` (the final state for the steps not run).

    Reverse mode has its own rule (`jax.lax.while_loop` has none): the forward pass
    keeps the carry before each step, and the backward pass runs the steps from `n - 1`
    down to 0, recomputing each step inside its VJP (as `jax.checkpoint` of the step
    would). Gradients flow to `params`, the initial carry and the floating-point
    leaves of `xs`. Forward-mode differentiation (`jax.jvp`, `jax.jacfwd`) and
    differentiating the gradient again are not supported.
    """
    carry, outs, _ = _forward(diff, step, n, outputs)
    return carry, outs


@recurrence.def_fwd
def _recurrence_fwd(perturbed, diff, step, n, outputs):
    carry, outs, history = _forward(diff, step, n, outputs)
    return (carry, outs), history


@recurrence.def_bwd
def _recurrence_bwd(history, grad, perturbed, diff, step, n, outputs):
    params, carry0, xs = diff
    g_carry, g_outs = grad
    g_carry = jax.tree.map(
        lambda g, c: jnp.zeros_like(c) if g is None else g,
        g_carry,
        carry0,
        is_leaf=lambda x: x is None,
    )
    length = jax.tree.leaves(xs)[0].shape[0]
    if not outputs or g_outs is None:
        g_outs = None
    else:  # the steps not run output the final state
        later = jnp.where(_skipped(n, length, g_outs.ndim - 1), g_outs, 0)
        g_carry = (g_carry[0] + jnp.sum(later, axis=0),) + tuple(g_carry[1:])
    xs_wanted = any(jax.tree.leaves(perturbed[2]))

    def zeros(tree):
        return jax.tree.map(
            lambda a: jnp.zeros_like(a) if eqx.is_inexact_array(a) else None, tree
        )

    def body(state):
        i, g_c, g_p, g_x = state
        # (under `vmap` with per-row bounds, a finished row keeps iterating with its
        # results discarded; the clamp keeps it on real steps rather than index -1,
        # so a check inside `step` cannot fire on the unwritten history)
        i = jnp.maximum(i - 1, 0)
        if g_outs is not None:
            g_c = (g_c[0] + g_outs[i],) + tuple(g_c[1:])
        _, vjp = eqx.filter_vjp(step, params, _row(history, i), _row(xs, i))
        d_p, g_c, d_x = vjp(g_c)
        if xs_wanted:  # (otherwise `d_x` is unused and compiled away)
            g_x = jax.tree.map(
                lambda a, b: a if b is None else a.at[i].set(b),
                g_x,
                d_x,
                is_leaf=lambda v: v is None,
            )
        return i, g_c, _add(g_p, d_p), g_x

    g_xs = zeros(xs) if xs_wanted else None
    _, g_carry0, g_params, g_xs = jax.lax.while_loop(
        lambda state: state[0] > 0,
        body,
        (jnp.asarray(n, jnp.int32), g_carry, zeros(params), g_xs),
    )
    if g_xs is None:
        g_xs = jax.tree.map(lambda _: None, xs)
    return g_params, g_carry0, g_xs
