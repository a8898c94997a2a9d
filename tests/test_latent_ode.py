"""`ctmodels.models.LatentODE` against oracles: the closed-form KL, the masked
likelihood and the IWAE/ELBO bounds recomputed in NumPy, finite differences in
float64, and invariances (layout, padding rows, masked-out values, jit cache).

The module runs in float64 (restored afterwards). Compiling a latent ODE takes
seconds, so the tests share a handful of compiled functions: one tiny model, one
jitted loss, one jitted gradient, two batch shapes.
"""

from __future__ import annotations

import json
import math

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from ctmodels.data import (
    TimeSeries,
    batches,
    extrapolation_task,
    interpolation_task,
    make_batch,
)
from ctmodels.models import MODELS, LatentODE, _common as common
from ctmodels.nn import apply


@pytest.fixture(autouse=True, scope="module")
def _float64():
    """float64 for this module; and the "rbg" PRNG, whose kernels compile in a
    fraction of threefry's time (the tests do not depend on particular draws).
    Both settings are restored afterwards."""
    previous = jax.config.jax_enable_x64, jax.config.jax_default_prng_impl
    jax.config.update("jax_enable_x64", True)
    jax.config.update("jax_default_prng_impl", "rbg")
    yield
    jax.config.update("jax_enable_x64", previous[0])
    jax.config.update("jax_default_prng_impl", previous[1])


TINY = dict(latent_size=3, encoder_size=4, units=8, rtol=1e-9, atol=1e-9)
TRACES = []


@eqx.filter_jit
def _loss(model, batch, key, n_samples=3, objective="iwae"):
    TRACES.append(batch.layout)
    return model.loss(batch, key=key, n_samples=n_samples, objective=objective)


@eqx.filter_jit
def _paths(model, batch, eps):
    """Posterior mean/std and decoded predictions `[K, B, T, C]` for given noise."""
    t_ref = common.reference_time(batch, model.t0)
    mean, std = model.posterior(batch, t_ref)
    zs, _ = model._decode(mean + std * eps, t_ref, batch.times, batch.layout == "union")
    return mean, std, apply(model.decoder, zs)


@eqx.filter_jit
def _value_and_grad(params, static, batch, key):
    f = lambda p: eqx.combine(p, static).loss(batch, key=key)[0]
    return jax.value_and_grad(f)(params)


def _series(seed=0, S=7, T=7, C=2, shared=False, static=False, labels=False):
    """Noisy sines; rows have different times (unless `shared`) and lengths."""
    rng = np.random.default_rng(seed)
    if shared:
        times = np.broadcast_to(np.sort(rng.uniform(0, 1, T)), (S, T)).copy()
    else:
        times = np.sort(rng.uniform(0, 1, (S, T)), axis=1)
    times[:, 0] = 0.0
    times[1, -2:] = np.nan  # a shorter series
    values = np.sin(5 * np.nan_to_num(times))[..., None] * np.arange(1, C + 1)
    values = values + rng.normal(0, 0.1, (S, T, C))
    mask = rng.uniform(size=(S, T, C)) < 0.7
    mask[:, 0] = True
    mask &= ~np.isnan(times)[..., None]
    values = np.where(mask, values, np.nan)
    kw = {}
    if static:
        kw["static"] = rng.normal(size=(S, 2))
    if labels:
        kw["labels"] = np.arange(S) % 3
    return TimeSeries.from_arrays(times, values, **kw)


@pytest.fixture(scope="module")
def data():
    """Two batches of 4 rows (the second: 3 series and a padding row of weight 0) in
    each layout; the two union batches share one bucketed shape."""
    ts = _series()
    union = list(batches(ts, 4, layout="union", time_bucket=32))
    padded = list(batches(ts, 4, layout="padded"))
    assert union[0].times.shape == union[1].times.shape
    assert float(union[1].weight[-1]) == 0.0
    return {"ts": ts, "union": union[1], "union_other": union[0], "padded": padded[1]}


@pytest.fixture(scope="module")
def model():
    return LatentODE(2, **TINY, key=jax.random.key(0))


# ------------------------------------------------------------------ KL, likelihood


def test_kl_closed_form():
    rng = np.random.default_rng(1)
    mean = rng.normal(size=(5, 3))
    std = rng.uniform(0.2, 2.0, size=(5, 3))
    expected = 0.5 * np.sum(mean**2 + std**2 - 1.0 - np.log(std**2), axis=-1)
    got = common.kl_to_standard_normal(jnp.asarray(mean), jnp.asarray(std))
    np.testing.assert_allclose(got, expected, rtol=1e-12)
    # Monte Carlo: E_q[log q - log p]
    z = mean + std * rng.normal(size=(200_000, 5, 3))
    log_q = np.sum(-0.5 * ((z - mean) / std) ** 2 - np.log(std), axis=-1)
    log_p = np.sum(-0.5 * z**2, axis=-1)
    np.testing.assert_allclose((log_q - log_p).mean(0), expected, atol=0.03)


def test_gaussian_log_prob_against_loop():
    rng = np.random.default_rng(2)
    x = rng.normal(size=(3, 4, 2))
    mu = rng.normal(size=(2, 3, 4, 2))
    log_std = np.log([0.3, 2.0])
    mask = rng.uniform(size=(3, 4, 2)) < 0.5
    x_junk = np.where(mask, x, np.nan)  # masked-out values must not leak
    got = common.gaussian_log_prob(jnp.asarray(x_junk), mu, log_std, mask)
    expected = np.zeros((2, 3))
    for k in range(2):
        for b in range(3):
            for t in range(4):
                for c in range(2):
                    if mask[b, t, c]:
                        s = math.exp(log_std[c])
                        z = (x[b, t, c] - mu[k, b, t, c]) / s
                        expected[k, b] += (
                            -0.5 * z * z - math.log(s) - 0.5 * math.log(2 * math.pi)
                        )
    np.testing.assert_allclose(got, expected, rtol=1e-12)


def _objective_inputs(seed, K, B=3, L=2, T=4, C=2):
    """Random inputs of `common.variational_objective` and a batch to go with them."""
    rng = np.random.default_rng(seed)
    ts = TimeSeries.from_arrays(
        np.sort(rng.uniform(0, 1, (B, T)), 1), rng.normal(size=(B, T, C))
    )
    batch = make_batch(ts, layout="padded", batch_size=B + 1, time_bucket=None)
    target = np.asarray(batch.mask) & (rng.uniform(size=batch.mask.shape) < 0.5)
    batch = eqx.tree_at(lambda b: b.target_mask, batch, jnp.asarray(target))
    mean = jnp.asarray(rng.normal(size=(B + 1, L)))
    std = jnp.asarray(rng.uniform(0.3, 1.5, size=(B + 1, L)))
    eps = jnp.asarray(rng.normal(size=(K, B + 1, L)))
    pred = jnp.asarray(rng.normal(size=(K, B + 1, T, C)))
    ll = jnp.asarray(rng.normal(size=(K, B + 1)) * 10)
    return batch, dict(mean=mean, std=std, eps=eps, pred=pred, ll=ll, extra_ll=None)


_objective = jax.jit(common.variational_objective, static_argnames=("objective",))


def test_iwae_with_one_sample_is_the_elbo():
    """K = 1: the IWAE bound is the one-sample ELBO `log p(x|z) + log p(z) - log q(z)`
    at the sample; the `"elbo"` objective uses the closed-form KL instead, and the
    two agree in expectation."""
    batch, kw = _objective_inputs(0, K=1)
    iwae, m_iwae = _objective(batch, **kw, kl_weight=1.0, objective="iwae")
    elbo, m_elbo = _objective(batch, **kw, kl_weight=1.0, objective="elbo")
    mean, std, eps = (np.asarray(kw[k]) for k in ("mean", "std", "eps"))
    z = mean + std * eps[0]
    log_q = np.sum(-0.5 * eps[0] ** 2 - np.log(std) - 0.5 * np.log(2 * np.pi), -1)
    log_p = np.sum(-0.5 * z**2 - 0.5 * np.log(2 * np.pi), -1)
    w = np.asarray(batch.weight)
    n = np.sum(w * np.asarray(batch.target_mask).sum((1, 2)))
    one_sample_elbo = np.asarray(kw["ll"])[0] + log_p - log_q
    np.testing.assert_allclose(iwae, -np.sum(w * one_sample_elbo) / n, rtol=1e-12)
    kl = 0.5 * np.sum(mean**2 + std**2 - 1 - np.log(std**2), -1)
    analytic = np.asarray(kw["ll"])[0] - kl
    np.testing.assert_allclose(elbo, -np.sum(w * analytic) / n, rtol=1e-12)
    np.testing.assert_allclose(m_iwae["kl"], m_elbo["kl"])
    # averaging the IWAE(K=1) estimate over many samples gives the ELBO (same ll)
    rng = np.random.default_rng(1)
    eps_many = rng.normal(size=(20_000,) + mean.shape)
    z = mean + std * eps_many
    gap = np.sum(-0.5 * z**2 + 0.5 * eps_many**2 + np.log(std), -1).mean(0) + kl
    np.testing.assert_allclose(gap, 0.0, atol=0.05)


def test_iwae_against_logsumexp_and_kl_weight():
    batch, kw = _objective_inputs(1, K=4)
    mean, std, eps = (np.asarray(kw[k]) for k in ("mean", "std", "eps"))
    z = mean + std * eps
    log_q = np.sum(-0.5 * eps**2 - np.log(std) - 0.5 * np.log(2 * np.pi), -1)
    log_p = np.sum(-0.5 * z**2 - 0.5 * np.log(2 * np.pi), -1)
    w = np.asarray(batch.weight)
    n = np.sum(w * np.asarray(batch.target_mask).sum((1, 2)))
    for beta in (1.0, 0.3):
        lw = np.asarray(kw["ll"]) + beta * (log_p - log_q)
        bound = np.log(np.mean(np.exp(lw - lw.max(0)), 0)) + lw.max(0)
        loss, metrics = _objective(batch, **kw, kl_weight=beta, objective="iwae")
        np.testing.assert_allclose(loss, -np.sum(w * bound) / n, rtol=1e-12)
        np.testing.assert_allclose(metrics["bound"], np.sum(w * bound) / w.sum())


def _numpy_objective(model, batch, key, K, eps=None):
    """The IWAE loss and metrics recomputed in NumPy from the model's posterior and
    decoded paths (noise drawn from `key` as `loss` does, or given)."""
    if eps is None:
        eps = jax.random.normal(key, (K, batch.batch_size, model.latent_size))
    mean, std, pred = (np.asarray(a) for a in _paths(model, batch, eps))
    eps = np.asarray(eps)
    z0 = mean + std * eps
    x = np.asarray(batch.values)
    tm = np.asarray(batch.target_mask)
    s = model.obs_std
    r = (np.where(tm, x, 0) - pred) / s
    lp = -0.5 * r**2 - np.log(s) - 0.5 * np.log(2 * np.pi)
    ll = np.where(tm, lp, 0.0).sum((2, 3))  # [K, B]
    kl = 0.5 * np.sum(mean**2 + std**2 - 1 - np.log(std**2), -1)
    log_q = np.sum(-0.5 * eps**2 - np.log(std) - 0.5 * np.log(2 * np.pi), -1)
    log_p = np.sum(-0.5 * z0**2 - 0.5 * np.log(2 * np.pi), -1)
    lw = ll + log_p - log_q
    bound = lw.max(0) + np.log(np.exp(lw - lw.max(0)).mean(0))
    w = np.asarray(batch.weight)
    n = np.sum(w * tm.sum((1, 2)))
    err = (pred.mean(0) - np.where(tm, x, 0)) ** 2
    return {
        "loss": -np.sum(w * bound) / n,
        "bound": np.sum(w * bound) / w.sum(),
        "kl": np.sum(w * kl) / w.sum(),
        "nll": -np.sum(w * ll.mean(0)) / n,
        "mse": np.sum(w[:, None, None] * tm * err) / n,
    }


def test_model_loss_against_numpy(model, data):
    """The whole pipeline: masks, weights (a padding row), normalisation, metrics."""
    batch = data["union"]
    key = jax.random.key(4)
    loss, metrics = _loss(model, batch, key)
    expected = _numpy_objective(model, batch, key, 3)
    np.testing.assert_allclose(loss, expected["loss"], rtol=1e-10)
    for name in ("bound", "kl", "nll", "mse"):
        np.testing.assert_allclose(metrics[name], expected[name], rtol=1e-10)


# ------------------------------------------------------------------ invariances


def test_union_and_padded_give_the_same_loss(model, data):
    key = jax.random.key(7)
    lu, mu = _loss(model, data["union"], key)
    lp, mp = _loss(model, data["padded"], key)
    np.testing.assert_allclose(lp, lu, rtol=1e-7)
    for name in mu:
        np.testing.assert_allclose(mp[name], mu[name], rtol=1e-7, atol=1e-10)


@pytest.mark.parametrize("layout", ["union", "padded"])
def test_masked_out_values_and_padding_rows_do_not_matter(model, data, layout):
    batch = data[layout]
    key = jax.random.key(12)
    ref = _loss(model, batch, key)[0]
    # junk (NaN, huge) wherever a value is neither context nor target
    seen = batch.mask | batch.target_mask
    junk = jnp.where(jnp.arange(batch.num_times)[None, :, None] % 2 == 0, jnp.nan, 1e6)
    bad = eqx.tree_at(lambda b: b.values, batch, jnp.where(seen, batch.values, junk))
    np.testing.assert_array_equal(_loss(model, bad, key)[0], ref)
    # the weight-0 row holds data (copied from row 0): it must not count
    row = lambda a: a.at[-1].set(a[0])
    filled = eqx.tree_at(
        lambda b: (b.values, b.mask, b.target_mask, b.time_mask, b.times),
        batch,
        tuple(
            row(a)
            for a in (
                batch.values,
                batch.mask,
                batch.target_mask,
                batch.time_mask,
                batch.times,
            )
        ),
    )
    assert float(filled.weight[-1]) == 0.0
    # padded rows are solved separately: identical; the union layout solves all rows
    # in one adaptive solve, so the other rows move by solver-tolerance amounts
    rtol = 1e-12 if layout == "padded" else 1e-6
    np.testing.assert_allclose(_loss(model, filled, key)[0], ref, rtol=rtol)


def test_encoder_ignores_values_outside_the_context(model, data):
    batch = interpolation_task(data["union"], key=jax.random.key(14), fraction=0.5)
    hidden = batch.target_mask & ~batch.mask
    assert bool(hidden.any())
    moved = eqx.tree_at(
        lambda b: b.values, batch, jnp.where(batch.mask, batch.values, 123.0)
    )
    eps = jnp.zeros((3, batch.batch_size, model.latent_size))
    m1, s1, _ = _paths(model, batch, eps)
    m2, s2, _ = _paths(model, moved, eps)
    np.testing.assert_array_equal(m1, m2)
    np.testing.assert_array_equal(s1, s2)
    # ...while the context does matter
    poked = eqx.tree_at(
        lambda b: b.values, batch, jnp.where(batch.mask, batch.values + 1.0, 0.0)
    )
    assert not np.allclose(_paths(model, poked, eps)[0], m1)


def test_jit_compiles_once_per_bucket(model, data):
    key = jax.random.key(16)
    before = len(TRACES)
    a = _loss(model, data["union"], key)[0]
    b = _loss(model, data["union_other"], key)[0]
    assert len(TRACES) - before <= 1  # at most the first call of this shape traces
    assert a != b


# ------------------------------------------------------------------ gradients


def test_time_padding_changes_neither_loss_nor_gradient(model, data):
    """Batches padded to a longer time length (`min_times`, as `fit`'s
    `time_bucket="auto"` does) give the same loss and gradient."""
    params, static = eqx.partition(model, eqx.is_inexact_array)
    key = jax.random.key(21)
    ts = data["ts"]
    for layout, ref in (("union", data["union"]), ("padded", data["padded"])):
        idx = np.asarray(ref.index)
        idx = idx[idx >= 0]
        longer = make_batch(
            ts[idx], index=idx, layout=layout, batch_size=ref.batch_size,
            min_times=ref.num_times + 1,
        )  # fmt: skip
        assert longer.num_times == 2 * ref.num_times
        if layout == "padded":  # the loss (the gradient's compile is the costly one)
            l0, m0 = _loss(model, ref, key)
            l1, m1 = _loss(model, longer, key)
            np.testing.assert_allclose(l1, l0, rtol=1e-10)
            for k in m0:
                np.testing.assert_allclose(m1[k], m0[k], rtol=1e-10, atol=1e-12)
            continue
        l0, g0 = _value_and_grad(params, static, ref, key)
        l1, g1 = _value_and_grad(params, static, longer, key)
        np.testing.assert_allclose(l1, l0, rtol=1e-10)
        for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g0), strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-8, atol=1e-12)


def test_gradient_matches_finite_differences(model, data):
    params, static = eqx.partition(model, eqx.is_inexact_array)
    batch = data["union"]
    key = jax.random.key(18)
    _, g = _value_and_grad(params, static, batch, key)
    g = [np.asarray(x) for x in jax.tree.leaves(g)]
    assert all(np.all(np.isfinite(x)) for x in g)
    leaves, tree = jax.tree.flatten(params)
    rng = np.random.default_rng(19)
    d = [rng.normal(size=x.shape) for x in leaves]
    h = 1e-5
    shift = lambda s: jax.tree.unflatten(
        tree, [np.asarray(x) + s * v for x, v in zip(leaves, d, strict=True)]
    )
    f = lambda p: float(_value_and_grad(p, static, batch, key)[0])
    fd = (f(shift(h)) - f(shift(-h))) / (2 * h)
    an = sum(np.vdot(a, b) for a, b in zip(g, d, strict=True))
    np.testing.assert_allclose(an, fd, rtol=1e-4)


def test_adam_steps_reduce_the_loss(model, data):
    params, static = eqx.partition(model, eqx.is_inexact_array)
    batch = data["union"]
    opt = optax.adam(3e-2)

    @jax.jit
    def update(g, state, params):
        updates, state = opt.update(g, state, params)
        return optax.apply_updates(params, updates), state

    def score(params):  # the same five latent draws before and after: less noise
        return np.mean(
            [
                float(_value_and_grad(params, static, batch, jax.random.key(k))[0])
                for k in range(5)
            ]
        )

    state = jax.jit(opt.init)(params)
    before = score(params)
    for i in range(60):
        _, g = _value_and_grad(params, static, batch, jax.random.key(100 + i))
        params, state = update(g, state, params)
    assert score(params) < 0.85 * before  # 0.72 here; the same draws: deterministic


# ------------------------------------------------------------------ predict & API


@eqx.filter_jit
def _predict(model, batch, key, times=None):
    return model.predict(batch, key=key, n_samples=4, times=times)


@pytest.mark.slow
def test_predict(model, data):
    batch = data["union"]
    mean, std = _predict(model, batch, jax.random.key(21))
    assert mean.shape == batch.values.shape == std.shape
    assert bool(jnp.all(std >= model.obs_std * (1 - 1e-12)))
    assert bool(jnp.all(std[batch.weight > 0] > model.obs_std))  # posterior spread


@pytest.mark.slow
def test_predict_at_given_times(model, data):
    batch = data["union"]
    key = jax.random.key(21)
    mean, _ = _predict(model, batch, key)
    # predictions at the batch's own times == predict(times=grid)
    m0, _ = _predict(model, batch, key, batch.times[0])
    np.testing.assert_allclose(m0, mean, rtol=1e-6, atol=1e-8)
    # shared query times [Q] (one solve) == the same times per row [B, Q]
    q = jnp.linspace(0.0, 1.2, 5)
    m1, s1 = _predict(model, batch, key, q)
    m2, s2 = _predict(model, batch, key, jnp.broadcast_to(q, (batch.batch_size, 5)))
    assert m1.shape == (batch.batch_size, 5, 2)
    np.testing.assert_allclose(m1, m2, rtol=1e-6, atol=1e-8)
    np.testing.assert_allclose(s1, s2, rtol=1e-6, atol=1e-8)
    paths = model.sample_prior(jnp.linspace(0, 1, 6), key=key, n_samples=3)
    assert paths.shape == (3, 6, 2)


@pytest.mark.slow
def test_union_and_padded_with_every_option():
    ts = _series(seed=8, static=True, labels=True)
    m = LatentODE(
        2,
        **TINY,
        poisson=True,
        num_classes=3,
        num_static=2,
        learn_std=True,
        encoder_steps=2,
        key=jax.random.key(8),
    )
    key = jax.random.key(9)
    lu, mu = _loss(m, make_batch(ts, layout="union"), key)
    lp, mp = _loss(m, make_batch(ts, layout="padded"), key)
    assert set(mu) == {
        "loss",
        "bound",
        "nll",
        "kl",
        "mse",
        "poisson_ll",
        "ce",
        "accuracy",
    }
    np.testing.assert_allclose(lp, lu, rtol=1e-7)
    for name in mu:
        np.testing.assert_allclose(mp[name], mu[name], rtol=1e-7, atol=1e-10)


@pytest.mark.slow
def test_shared_times_default_tolerances_agree():
    """All series on the same times, default tolerances: both layouts agree."""
    ts = _series(seed=10, shared=True)
    m = LatentODE(2, latent_size=3, encoder_size=4, units=8, key=jax.random.key(10))
    key = jax.random.key(11)
    lu, _ = _loss(m, make_batch(ts, layout="union"), key)
    lp, _ = _loss(m, make_batch(ts, layout="padded"), key)
    np.testing.assert_allclose(lp, lu, rtol=1e-4)


def test_hyperparameters_rebuild_the_model():
    m = LatentODE(2, **TINY, poisson=True, num_classes=2, key=jax.random.key(22))
    hp = dict(m.hyperparameters)
    json.dumps(hp)
    assert "key" not in hp and hp["poisson"] is True
    m2 = MODELS["LatentODE"](**hp, key=jax.random.key(23))
    arrays = lambda t: jax.tree.leaves(eqx.filter(t, eqx.is_array))
    assert jax.tree.structure(m) == jax.tree.structure(m2)
    assert [x.shape for x in arrays(m)] == [x.shape for x in arrays(m2)]


@pytest.mark.parametrize("cls", ["LatentODE", "RNNVAE"])
def test_posterior_starts_with_the_requested_spread(data, cls):
    """With the q(z0) head's last layer at zero (pre = 0), the posterior std is
    exactly `posterior_std` (+ the 1e-5 floor); the default starts narrow."""
    kw = TINY if cls == "LatentODE" else {"latent_size": 3, "encoder_size": 4}
    for want in (0.02, 0.5):
        m = MODELS[cls](2, **kw, posterior_std=want, key=jax.random.key(3))
        last = m.to_z0.layers[-1]
        m = eqx.tree_at(
            lambda m: (m.to_z0.layers[-1].weight, m.to_z0.layers[-1].bias),
            m,
            (jnp.zeros_like(last.weight), jnp.zeros_like(last.bias)),
        )
        _, std = m.posterior(data["union"])
        np.testing.assert_allclose(np.asarray(std), want + 1e-5, rtol=1e-5)
    assert (
        dict(MODELS[cls](2, **kw, key=jax.random.key(3)).hyperparameters)[
            "posterior_std"
        ]
        == 0.02
    )
    with pytest.raises(ValueError, match="posterior_std"):
        MODELS[cls](2, **kw, posterior_std=0.0, key=jax.random.key(3))


def test_errors(model, data):
    key = jax.random.key(0)
    with pytest.raises(ValueError, match="encoder"):
        LatentODE(2, encoder="lstm", key=key)
    with pytest.raises(ValueError, match="fixed steps"):
        LatentODE(2, solver="euler", key=key)
    with pytest.raises(ValueError, match="Unknown"):
        LatentODE(2, solver="dopri", key=key)
    abstract = lambda *a, **k: eqx.filter_eval_shape(LatentODE, *a, **k, key=key)
    with pytest.raises(ValueError, match="channels"):
        abstract(3, **TINY).loss(data["union"], key=key)
    with pytest.raises(ValueError, match="labels"):
        abstract(2, **TINY, num_classes=2).loss(data["union"], key=key)
    with pytest.raises(ValueError, match="n_samples"):
        model.loss(data["union"], key=key, n_samples=0)


def test_bad_sizes_samples_and_query_times_are_clear_errors(model, data):
    """Each is refused up front with the argument named, not left to a shape error
    deep inside JAX, an all-NaN prediction, or a solver failure blamed on `ts`."""
    key = jax.random.key(0)
    for bad in ({"latent_size": 0}, {"encoder_size": -1}, {"latent_size": 2.0}):
        with pytest.raises(ValueError, match=f"LatentODE: {next(iter(bad))}"):
            LatentODE(2, **{**TINY, **bad}, key=key)
    batch = data["union"]
    for n in (0, -1, 2.5):
        with pytest.raises(ValueError, match="n_samples must be a positive int"):
            model.predict(batch, key=key, n_samples=n)
    with pytest.raises(ValueError, match="n_samples"):
        model.sample_prior(jnp.linspace(0, 1, 3), key=key, n_samples=0)
    with pytest.raises(ValueError, match=r"finite: 1 of them .* index 1: nan"):
        model.predict(batch, key=key, times=[0.0, np.nan, 1.0])
    with pytest.raises(ValueError, match=r"non-decreasing: 0.5 follows 1.0 at index 1"):
        model.predict(batch, key=key, times=[1.0, 0.5, 2.0])
    rows = np.tile([0.0, 0.5, 1.0], (batch.batch_size, 1))
    rows[2, 2] = 0.1
    with pytest.raises(ValueError, match=r"in every row: 0.1 follows 0.5 .*\(2, 2\)"):
        model.predict(batch, key=key, times=rows)
    with pytest.raises(ValueError, match="empty"):
        model.predict(batch, key=key, times=[])
    with pytest.raises(ValueError, match="non-decreasing"):
        model.sample_prior([1.0, 0.0], key=key)
    # concrete checks only: under jit the times are traced and pass unchecked
    ok = jnp.asarray([0.0, 0.5, 1.0])
    mean = jax.jit(lambda t: model.predict(batch, key=key, n_samples=2, times=t)[0])(ok)
    assert bool(jnp.isfinite(mean).all())


# ------------------------------------------------------------------ anchor="last"


@pytest.fixture(scope="module")
def anchored():
    return LatentODE(2, **TINY, anchor="last", poisson=True, key=jax.random.key(30))


@eqx.filter_jit
def _anchored_paths(model, batch, eps):
    """z at each row's anchor, the anchored latent paths `[K, B, T, L]` and `Λ`."""
    t_a = model.anchor_times(batch)
    mean, std = model.posterior(batch)
    z = mean + std * eps
    zs, Lam = model._decode_anchored(z, t_a, batch.times, poisson=True)
    return t_a, z, zs, Lam


def _direct_solver(model):
    """`(y0, t0, t1) -> z(t1)`, vmapped: Diffrax integrating the model's latent ODE
    straight from `t0` to `t1` (backwards when `t1 < t0`)."""
    import diffrax

    field = diffrax.ODETerm(lambda t, y, args: apply(model.dynamics, y))

    @jax.jit
    @jax.vmap
    def direct(y0, t0, t1):
        sol = diffrax.diffeqsolve(
            field, diffrax.Dopri5(), t0, t1 + 1e-14 * (t1 == t0), None, y0,
            stepsize_controller=diffrax.PIDController(rtol=1e-11, atol=1e-11),
            max_steps=10_000,
        )  # fmt: skip
        return sol.ys[-1]

    return direct


def test_anchor_last_paths_against_direct_solves(anchored, data):
    """Each row's path through `anchor="last"`'s forward and sign-flipped backward
    solves equals Diffrax integrating `dz/dt = f(z)` straight from the anchor to
    each time (backwards when earlier); and `Λ(t) - Λ(t_first)` equals the paper
    model's forward solve from the state at the row's first time."""
    batch = data["padded"]
    eps = jax.random.normal(jax.random.key(31), (1, batch.batch_size, 3))
    t_a, z, zs, Lam = _anchored_paths(anchored, batch, eps)
    direct = _direct_solver(anchored)
    times, valid = np.asarray(batch.times), np.asarray(batch.time_mask)
    rows, cols = np.nonzero(valid & (np.asarray(batch.weight)[:, None] > 0))
    want = direct(z[0, rows], t_a[rows], times[rows, cols])
    np.testing.assert_allclose(zs[0, rows, cols], want, rtol=1e-6, atol=1e-8)
    before = times[rows, cols] < np.asarray(t_a)[rows]
    assert before.any() and (~before).any()  # both directions are exercised

    for b in np.unique(rows):
        row = times[b, valid[b]]
        first = jnp.argmax(jnp.asarray(valid[b]))
        forward, lam = anchored._solve(zs[:, b, first], row[0], jnp.asarray(row), True)
        n = len(row)
        np.testing.assert_allclose(forward[:, 0], zs[0, b, :n], rtol=1e-6, atol=1e-8)
        np.testing.assert_allclose(
            lam[:, 0], Lam[0, b, :n] - Lam[0, b, first], rtol=1e-6, atol=1e-8
        )


def test_anchor_last_encoder_reads_the_context_forwards(anchored, data):
    """The anchor is each row's last context observation; `q`'s state there is the
    ODE-RNN stepped forwards through the context (a Python loop over `evolve` and
    the GRU, one row at a time), and a row's result does not depend on its batch
    or layout."""
    batch = data["padded"]
    t_a = np.asarray(anchored.anchor_times(batch))
    mean, std = anchored.posterior(batch)
    enc = anchored.encoder
    inputs = np.asarray(common.encoder_inputs(batch))
    observed = np.asarray(batch.mask.any(-1))
    times = np.asarray(batch.times)
    for b in range(batch.batch_size):
        if float(batch.weight[b]) == 0:
            continue
        h, t_prev = jnp.zeros(enc.hidden_size), None
        for j in np.nonzero(observed[b])[0]:
            if t_prev is not None:
                h = enc.evolve(h, t_prev, times[b, j])
            h, t_prev = enc.gru(h, jnp.asarray(inputs[b, j])), times[b, j]
        assert t_a[b] == t_prev
        want_mean, _ = jnp.split(apply(anchored.to_z0, h), 2)
        np.testing.assert_allclose(mean[b], want_mean, rtol=1e-10, atol=1e-12)
    union = data["union"]  # the same three series, on the union grid
    mean_u, std_u = anchored.posterior(union)
    np.testing.assert_allclose(mean_u[:3], mean[:3], rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(std_u[:3], std[:3], rtol=1e-9, atol=1e-12)
    alone = make_batch(data["ts"][int(batch.index[1])], layout="union")
    np.testing.assert_allclose(anchored.posterior(alone)[0][0], mean[1], rtol=1e-9)
    key = jax.random.key(32)
    lu, _ = _loss(anchored, union, key)
    lp, _ = _loss(anchored, batch, key)
    np.testing.assert_allclose(lp, lu, rtol=1e-7)


def test_anchor_errors(anchored, data):
    key = jax.random.key(0)
    with pytest.raises(ValueError, match="anchor must be 'first' or 'last'"):
        LatentODE(2, anchor="end", key=key)
    with pytest.raises(ValueError, match="Pass t0=None"):
        LatentODE(2, anchor="last", t0=0.0, key=key)
    with pytest.raises(ValueError, match="t_ref"):
        anchored.posterior(data["padded"], t_ref=0.0)
    assert dict(anchored.hyperparameters)["anchor"] == "last"


def test_anchor_last_many_times_before_a_close_one(anchored):
    """Regression: with 60 grid times before the anchor and one 1e-13 after it, the
    forward solve's grid must still be strictly increasing (nudging 60 repeated
    zeros apart overtook that time and failed the solve)."""
    times = jnp.concatenate([jnp.linspace(0.0, 0.5, 61), jnp.asarray([0.5 + 1e-13])])
    z0 = jnp.ones((1, 1, 3))
    zs, _ = anchored._decode_anchored(z0, jnp.asarray([0.5]), times)
    np.testing.assert_allclose(zs[0, 0, -2:], np.ones((2, 3)), atol=1e-11)
    assert bool(jnp.isfinite(zs).all())


def test_anchor_last_predict_at_query_times_against_direct_solves(anchored, data):
    """`predict(times=...)` of an `anchor="last"` model on an extrapolation task (one
    row's context emptied): the mean decoded from Diffrax solves straight from each
    row's anchor, at query times before the first time, at and around the anchors,
    repeated, and one 1e-13 after a repeat; the empty row is anchored at its own
    first time."""
    batch = extrapolation_task(data["union"], split=0.5)
    empty = 2
    batch = eqx.tree_at(lambda b: b.mask, batch, batch.mask.at[empty].set(False))
    t_a = np.asarray(anchored.anchor_times(batch))
    times = np.asarray(batch.times)[empty][np.asarray(batch.time_mask)[empty]]
    assert t_a[empty] == times[0]
    q = [-0.2, 0.3, 0.9, 1.4, *t_a[:3], *[0.6] * 60, 0.6 + 1e-13]
    q = np.sort(np.asarray(q))
    key, K = jax.random.key(7), 3
    mu, _ = anchored.predict(batch, key=key, n_samples=K, times=q)
    mean, std = anchored.posterior(batch)
    z = mean + std * jax.random.normal(key, (K,) + mean.shape, mean.dtype)
    B, Q = mean.shape[0], q.shape[0]
    grid = np.meshgrid(*map(np.arange, (K, B, Q)), indexing="ij")
    k, b, i = (x.ravel() for x in grid)
    paths = _direct_solver(anchored)(z[k, b], jnp.asarray(t_a)[b], jnp.asarray(q)[i])
    want = apply(anchored.decoder, paths.reshape(K, B, Q, -1)).mean(0)
    np.testing.assert_allclose(mu, want, rtol=1e-6, atol=1e-8)


def test_repeated_query_times_then_a_close_one(model, data):
    """Regression (both anchors' `_solve`): 60 repeats of a query time and one 1e-13
    later used to fail the solve (the repeats were nudged apart past it); each
    repeat gets the prediction at that time (to rounding: the solve's end differs)."""
    batch, key = data["union"], jax.random.key(5)
    q = np.asarray([0.0, *[0.7] * 60, 0.7 + 1e-13, 0.9])
    mu, sd = model.predict(batch, key=key, n_samples=2, times=q)
    distinct, where = np.unique(q, return_inverse=True)
    mu_d, sd_d = model.predict(batch, key=key, n_samples=2, times=distinct)
    np.testing.assert_allclose(mu, mu_d[:, where], rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(sd, sd_d[:, where], rtol=1e-12, atol=1e-14)
