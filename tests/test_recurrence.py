"""The encoder's recurrence (`ctmodels.nn._recurrence.recurrence`): a while loop over a
traced number of steps with its own reverse-mode rule, against `jax.lax.scan` over the
same steps differentiated by JAX, and the ODE-RNN encoder's two paths against each
other (reverse mode through the recurrence, forward mode through a scan)."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ctmodels.nn import ODERNNEncoder
from ctmodels.nn._recurrence import recurrence

N, H, D = 7, 3, 2


def _problem():
    k1, k2, k3, k4 = jax.random.split(jax.random.key(0), 4)
    params = {
        "W": jax.random.normal(k1, (H, H)) / 2,
        "U": jax.random.normal(k2, (H, D)),
        "name": "not an array",  # a static leaf passes through
    }
    h0 = jax.random.normal(k3, (H,))
    xs = (
        jax.random.normal(k4, (N, D)),
        jnp.arange(N) % 3 == 0,  # a boolean input (no gradient)
    )
    return params, (h0, jnp.asarray(0.5, h0.dtype)), xs


def _step(p, carry, x):
    h, s = carry
    u, flag = x
    h = jnp.tanh(p["W"] @ h + p["U"] @ u * s) + jnp.where(flag, 0.1, 0.0)
    return h, s * 1.1 + jnp.sum(u) * 0.01


def _scan_oracle(params, carry, xs, n, outputs):
    """The first `n` steps by `lax.scan` (a Python-static n), outputs padded with the
    final state."""
    head = jax.tree.map(lambda a: a[:n], xs)

    def body(c, x):
        c = _step(params, c, x)
        return c, c[0]

    carry, outs = jax.lax.scan(body, carry, head)
    if not outputs:
        return carry, None
    pad = jnp.broadcast_to(carry[0], (N - n,) + carry[0].shape)
    return carry, jnp.concatenate([outs, pad])


def _objective(run, outputs):
    weights = jnp.linspace(-1.0, 2.0, N * H).reshape(N, H)

    def f(diff):
        (h, s), outs = run(diff)
        r = jnp.sum(jnp.sin(h)) + 0.3 * s
        if outputs:
            r = r + jnp.sum(weights * jnp.cos(outs))
        return r

    return f


@pytest.mark.parametrize("outputs", [False, True])
def test_recurrence_against_scan(outputs):
    params, carry, xs = _problem()
    # one compilation for every n (a traced bound)
    run = eqx.filter_jit(
        lambda diff, n: eqx.filter_value_and_grad(
            _objective(lambda d: recurrence(d, _step, n, outputs), outputs)
        )(diff)
    )
    for n in (0, 1, 4, N):
        value, grad = run((params, carry, xs), jnp.int32(n))
        want_v, want_g = eqx.filter_value_and_grad(
            _objective(lambda d, n=n: _scan_oracle(*d, n, outputs), outputs)
        )((params, carry, xs))
        np.testing.assert_allclose(value, want_v, rtol=1e-6, atol=1e-6)
        for g, w in zip(jax.tree.leaves(grad), jax.tree.leaves(want_g), strict=True):
            np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-6)
        # the forward values themselves
        (h, s), outs = recurrence((params, carry, xs), _step, jnp.int32(n), outputs)
        (wh, ws), wouts = _scan_oracle(params, carry, xs, n, outputs)
        np.testing.assert_allclose(h, wh, rtol=1e-6)
        if outputs:
            np.testing.assert_allclose(outs, wouts, rtol=1e-6)


def test_recurrence_gradient_of_params_only_and_under_vmap():
    params, carry, xs = _problem()

    def loss(p, n):
        (h, _), _ = recurrence((p, carry, xs), _step, n, False)
        return jnp.sum(h**2)

    def oracle(p, n):
        (h, _), _ = _scan_oracle(p, carry, xs, n, False)
        return jnp.sum(h**2)

    ns = jnp.array([2, 0, 7, 5], jnp.int32)  # a batched bound: rows stop apart
    grads = jax.vmap(eqx.filter_grad(loss), in_axes=(None, 0))(params, ns)
    for row, n in enumerate(ns.tolist()):
        want = eqx.filter_grad(oracle)(params, n)
        np.testing.assert_allclose(grads["W"][row], want["W"], rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(grads["U"][row], want["U"], rtol=1e-5, atol=1e-7)


def test_recurrence_backward_under_vmap_steps_only_on_real_history():
    """Under `vmap` with per-row bounds a finished row keeps iterating (its results
    discarded): it must not step from the unwritten history, where a check inside the
    step would fire although no real step violates it."""
    xs = jnp.arange(1.0, 5.0)

    def step(p, c, x):
        h, s = c
        s = eqx.error_if(s, s <= 0, "scale must be positive")  # never, in real steps
        return h * p + x / s, s * 2

    def loss(p, n):
        one = jnp.ones((), xs.dtype)
        (h, _), _ = recurrence((p, (one, one), xs), step, n, False)
        return h

    p = jnp.asarray(0.5, xs.dtype)
    ns = jnp.array([1, 4], jnp.int32)
    got = jax.vmap(jax.grad(loss), in_axes=(None, 0))(p, ns)
    want = [jax.grad(loss)(p, n) for n in ns]
    np.testing.assert_allclose(got, want, rtol=1e-6)


def test_recurrence_gradient_against_finite_differences():
    with jax.enable_x64(True):
        params, carry, xs = jax.tree.map(
            lambda a: a.astype(jnp.float64) if eqx.is_inexact_array(a) else a,
            _problem(),
        )

        def f(W):
            (h, _), outs = recurrence(
                ({**params, "W": W}, carry, xs), _step, jnp.int32(5), True
            )
            return jnp.sum(jnp.sin(h)) + jnp.sum(outs[3] * outs[6])

        g = jax.grad(f)(params["W"])
        eps = 1e-6
        fd = np.zeros((H, H))
        for i in range(H):
            for j in range(H):
                e = jnp.zeros((H, H)).at[i, j].set(eps)
                fd[i, j] = (f(params["W"] + e) - f(params["W"] - e)) / (2 * eps)
        np.testing.assert_allclose(g, fd, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("outputs", [False, True])
def test_encoder_reverse_mode_matches_its_forward_mode_path(outputs):
    """The default encoder (the recurrence, reverse mode) and the same weights with a
    forward-mode adjoint (a scan through every position, `jax.jvp`) give the same
    values, and the gradient's projection on a random direction of the weights and
    inputs equals the forward-mode directional derivative."""
    rng = np.random.default_rng(0)
    B, T = 3, 6
    times = jnp.asarray(np.sort(rng.uniform(0, 1, (B, T)), axis=1), float)
    x = jnp.asarray(rng.normal(size=(B, T, 2)), float)
    observed = jnp.asarray(rng.uniform(size=(B, T)) < 0.6).at[1].set(False)
    enc = ODERNNEncoder(2, 4, units=5, steps=1, key=jax.random.key(1))
    fwd = eqx.tree_at(
        lambda e: (e.gru, e.vector_field),
        ODERNNEncoder(2, 4, units=5, steps=1, adjoint="forward", key=jax.random.key(2)),
        (enc.gru, enc.vector_field),
    )
    assert fwd._forward_mode() and not enc._forward_mode()
    w = jnp.asarray(rng.normal(size=(B, T, 4)), float)

    def f(e, x):
        h, before, _ = e(
            times,
            x,
            observed,
            t_start=times[:, -1],
            t_final=0.0,
            reverse=True,
            outputs=outputs,
        )
        r = jnp.sum(jnp.sin(h))
        return r + jnp.sum(w * jnp.cos(before)) if outputs else r

    params, static = eqx.partition(enc, eqx.is_inexact_array)
    leaves, tree = jax.tree.flatten((params, x))
    keys = jax.random.split(jax.random.key(3), len(leaves))
    tangent = jax.tree.unflatten(
        tree,
        [
            jax.random.normal(k, a.shape, a.dtype)
            for k, a in zip(keys, leaves, strict=True)
        ],
    )
    value, grad = jax.value_and_grad(lambda px: f(eqx.combine(px[0], static), px[1]))(
        (params, x)
    )
    # the same weights in the forward-mode encoder's structure (its static adjoint
    # differs), with the same tangent
    fwd_params, fwd_static = eqx.partition(fwd, eqx.is_inexact_array)
    fwd_tree = jax.tree.structure((fwd_params, x))
    fwd_primal = jax.tree.unflatten(fwd_tree, leaves)
    fwd_tangent = jax.tree.unflatten(fwd_tree, jax.tree.leaves(tangent))
    fwd_value, directional = jax.jvp(
        lambda px: f(eqx.combine(px[0], fwd_static), px[1]),
        (fwd_primal,),
        (fwd_tangent,),
    )
    projected = sum(
        jnp.sum(g * t)
        for g, t in zip(jax.tree.leaves(grad), jax.tree.leaves(tangent), strict=True)
    )
    np.testing.assert_allclose(value, fwd_value, rtol=1e-6)
    np.testing.assert_allclose(projected, directional, rtol=1e-4)
