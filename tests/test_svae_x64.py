"""The SVAE's bound in float64 on a linear-Gaussian model (a linear decoder, linear
recognition) against the exact log marginal likelihood of `ctmodels.lgssm`: the
ELBO is below it for any recognition network and equal to it (to rounding) when the
potentials are the likelihood's own; its Monte Carlo estimate is unbiased; a fully
masked step changes nothing."""

from __future__ import annotations

import math

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.linalg

import ctmodels.data as cd
import ctmodels.lgssm as lg
from ctmodels.models import SVAE

X64 = True

D = 2
H = np.array([1.5, -0.7])  # diagonal emission: the likelihood is a diagonal potential
SIGMA = np.array([0.3, 0.5])
LOG_2PI = math.log(2 * math.pi)


def _series(missing_step: bool = True) -> cd.TimeSeries:
    """Two series at irregular times; whole steps missing (the optimal diagonal
    potential exists only where every channel of a step is observed)."""
    rng = np.random.default_rng(0)
    times = np.sort(rng.uniform(0.0, 3.0, (2, 7)), axis=1)
    values = rng.normal(size=(2, 7, D))
    if missing_step:
        values[0, 2] = np.nan
        values[1, 5] = np.nan
    times[1, -1] = np.nan  # the second series is shorter (padding)
    values[1, -1] = np.nan
    return cd.TimeSeries.from_arrays(times, values)


def _model(recognition_key: int):
    """The SVAE whose prior, decoder and noise are the generative model's."""
    model = SVAE(
        D, latent_size=D, recognition_depth=0, decoder_depth=0, obs_std=1.0,
        key=jax.random.key(recognition_key),
    )  # fmt: skip
    prior = lg.LinearSDE(D, rate=1.5, scale=0.5, key=jax.random.key(42))
    dec = model.decoder.layers[0]
    return eqx.tree_at(
        lambda m: (m.prior, m.decoder.layers[0].weight, m.decoder.layers[0].bias,
                   m.log_std),
        model,
        (prior, jnp.diag(jnp.asarray(H)), jnp.zeros_like(dec.bias),
         jnp.log(jnp.asarray(SIGMA))),
    )  # fmt: skip


def _optimal(model):
    """Recognition = the likelihood's potential: mean `y / h`, precision
    `h^2 / σ^2`, whatever the mask (every present step is fully observed here)."""
    lin = model.recognition.layers[0]
    W = np.zeros((2 * D, 2 * D))
    W[np.arange(D), np.arange(D)] = 1.0 / H
    lam = H**2 / SIGMA**2
    pre = np.log(np.expm1(lam)) - model.precision_shift
    b = np.concatenate([np.zeros(D), pre])
    return eqx.tree_at(
        lambda m: (m.recognition.layers[0].weight, m.recognition.layers[0].bias),
        model,
        (jnp.asarray(W, lin.weight.dtype), jnp.asarray(b, lin.bias.dtype)),
    )


def _exact_log_lik(model, batch):
    """`log p(y)` per series under the generative model (exact, `ctmodels.lgssm`)."""

    def one(times, y, mask):
        ssm = model.prior.ssm(
            times, emission=jnp.diag(jnp.asarray(H)),
            emission_cov=jnp.diag(jnp.asarray(SIGMA**2)),
        )  # fmt: skip
        return lg.log_marginal_likelihood(ssm, y, mask)

    return jax.vmap(one)(batch.times, batch.values, batch.target_mask)


def _exact_elbo(model, batch):
    """The ELBO with `E_q[log p(y | x)]` in closed form (linear decoder) from the
    model's posterior marginals, and the model's own KL and posterior."""
    q = model.posterior(batch)
    m, P = q.smoothed.means, q.smoothed.covs
    var = jnp.diagonal(P, axis1=-2, axis2=-1)
    h, s2 = jnp.asarray(H), jnp.asarray(SIGMA**2)
    y = jnp.where(batch.target_mask, batch.values, 0.0)
    e = -0.5 * LOG_2PI - 0.5 * jnp.log(s2) - 0.5 * ((y - h * m) ** 2 + h**2 * var) / s2
    ell = jnp.sum(jnp.where(batch.target_mask, e, 0.0), axis=(1, 2))
    return ell - q.kl, q


@pytest.fixture(scope="module")
def batch():
    return cd.make_batch(_series(), layout="padded")


@eqx.filter_jit
def _compare(model, batch):
    return _exact_elbo(model, batch), _exact_log_lik(model, batch)


def test_elbo_is_below_the_log_marginal_likelihood(batch):
    for k in range(3):
        (elbo, q), exact = _compare(_model(k), batch)
        assert (q.kl > 0).all()
        # a random recognition network is far from the posterior: a clear gap
        assert (elbo < exact - 1e-3).all(), (elbo, exact)


def test_elbo_equals_the_log_marginal_likelihood_at_the_optimal_potentials(batch):
    (elbo, q), exact = _compare(_optimal(_model(0)), batch)
    np.testing.assert_allclose(elbo, exact, rtol=1e-10, atol=1e-10)
    assert (q.kl > 0).all()  # the posterior is not the prior: the bound is tight anyway


@eqx.filter_jit
def _estimates(model, batch, keys):
    return jax.vmap(lambda k: model.elbo(batch, key=k, n_samples=16))(keys)


@pytest.mark.parametrize("optimal", [False, True])
def test_the_sampled_elbo_is_unbiased(batch, optimal):
    """The model's ELBO (FFBS draws decoded) averages to the closed form."""
    model = _model(1)
    if optimal:
        model = _optimal(model)
    (exact, _), _ = _compare(model, batch)
    est = _estimates(model, batch, jax.random.split(jax.random.key(0), 64))  # [64, B]
    se = est.std(0) / math.sqrt(est.shape[0])
    assert (se > 0).all()
    np.testing.assert_array_less(np.abs(est.mean(0) - exact), 4 * se + 1e-9)


def test_a_fully_masked_step_contributes_nothing():
    """The same series with and without an extra time where nothing is observed:
    the same KL, the same posterior marginals at the other times, the same bound."""
    ts = _series(missing_step=False)
    t, v = np.asarray(ts.times)[:, :6], np.asarray(ts.values)[:, :6]
    gap = 0.5 * (t[:, 2] + t[:, 3])
    extra = np.insert(t, 3, gap, axis=1)
    with_gap = np.insert(v, 3, np.nan, axis=1)
    # both batches [2, 8] (the first padded with a masked time): one compilation
    b1 = cd.make_batch(cd.TimeSeries.from_arrays(t, v), layout="padded")
    b2 = cd.make_batch(cd.TimeSeries.from_arrays(extra, with_gap), layout="padded")
    assert b1.values.shape == b2.values.shape == (2, 8, D)
    model = _model(3)
    (e1, q1), x1 = _compare(model, b1)
    (e2, q2), x2 = _compare(model, b2)
    np.testing.assert_allclose(q2.kl, q1.kl, rtol=1e-10)
    np.testing.assert_allclose(e2, e1, rtol=1e-10)
    np.testing.assert_allclose(x2, x1, rtol=1e-10)  # the oracle agrees
    keep = np.arange(7) != 3
    np.testing.assert_allclose(
        q2.smoothed.means[:, :7][:, keep],
        q1.smoothed.means[:, :6],
        rtol=1e-9,
        atol=1e-12,
    )
    np.testing.assert_allclose(
        q2.smoothed.covs[:, :7][:, keep], q1.smoothed.covs[:, :6], rtol=1e-9, atol=1e-12
    )
    present = np.asarray(q2.present)[:, :7]
    assert not present[:, 3].any() and present[:, keep].all()


def test_prior_samples_have_the_stationary_moments():
    """`sample_prior` through a linear decoder: the covariance of the decoded
    values at a time is `H P H^T` (`P` the stationary covariance) and across an
    interval `dt` it is `H expm(A dt) P H^T`, within sampling error."""
    model = _model(0)
    times = np.array([0.3, 0.8])
    n = 4000
    ys = np.asarray(model.sample_prior(times, key=jax.random.key(5), n_samples=n))
    A = np.asarray(model.prior.drift())
    P = np.asarray(model.prior.stationary_cov())
    F = scipy.linalg.expm(A * 0.5)
    h = np.diag(H)
    want_same, want_cross = h @ P @ h.T, h @ F @ P @ h.T
    got = np.cov(ys.reshape(n, -1).T)  # [y0a, y0b, y1a, y1b]
    for got_block, want in ((got[:2, :2], want_same), (got[2:, 2:], want_same),
                            (got[2:, :2], want_cross)):  # fmt: skip
        # a covariance estimate's std is about sqrt((s_ii s_jj + s_ij^2) / n)
        d = np.sqrt(np.diag(want_same))
        se = np.sqrt((np.outer(d, d) ** 2 + want**2) / n)
        np.testing.assert_array_less(np.abs(got_block - want), 5 * se)
    assert np.abs(ys.mean(axis=0)).max() < 5 * d.max() / np.sqrt(n)


def test_the_union_layout_gives_the_padded_layouts_bound(batch):
    """In the union layout each row holds the other series' times too, as steps
    without potential (and the prior is discretised once for the batch): the same
    KL and bound as each series on its own times."""
    union = cd.make_batch(_series(), layout="union")
    assert union.values.shape[1] > batch.values.shape[1]
    model = _model(2)
    (e_pad, q_pad), x_pad = _compare(model, batch)
    (e_uni, q_uni), x_uni = _compare(model, union)
    np.testing.assert_allclose(q_uni.kl, q_pad.kl, rtol=1e-9)
    np.testing.assert_allclose(e_uni, e_pad, rtol=1e-9)
    np.testing.assert_allclose(x_uni, x_pad, rtol=1e-9)


@eqx.filter_jit
def _predict(model, batch, key):
    return model.predict(batch, key=key, n_samples=1000)


@pytest.mark.parametrize("task", ["interpolation", "extrapolation"])
def test_predictive_intervals_cover_data_drawn_from_the_model(task):
    """On series drawn from the generative model (the prior's paths at shared
    irregular times, decoded, plus the observation noise), with the likelihood's
    own potentials, `predict`'s 90% intervals (mean ± 1.645 std) cover the hidden
    values 90% of the time and their z-scores have unit variance: interpolation
    hides a random half of the steps, extrapolation every step after the middle."""
    model = _optimal(_model(0))
    rng = np.random.default_rng(1)
    n, T = 300, 10
    times = np.sort(rng.uniform(0.0, 4.0, T))
    paths = np.asarray(model.sample_prior(times, key=jax.random.key(3), n_samples=n))
    values = paths + SIGMA * rng.normal(size=paths.shape)
    b = cd.make_batch(
        cd.TimeSeries.from_arrays(np.broadcast_to(times, (n, T)), values),
        layout="padded",
    )
    if task == "interpolation":  # whole steps (the optimal potentials need them)
        seen = rng.random((n, T)) < 0.5
    else:
        seen = np.broadcast_to(np.arange(T) < T // 2, (n, T))
    seen = np.pad(seen, ((0, 0), (0, b.times.shape[1] - T)))[..., None] & b.mask
    b = eqx.tree_at(lambda x: x.mask, b, jnp.asarray(seen))
    mean, std = _predict(model, b, jax.random.key(4))
    hidden = np.asarray(b.target_mask & ~seen)
    z = ((np.asarray(b.values) - np.asarray(mean)) / np.asarray(std))[hidden]
    m = z.size  # about 1500 (interpolation) or 3000 values
    cover = np.mean(np.abs(z) < 1.645)
    # values of one series are correlated: a loose binomial band (4 se at m / 4)
    assert abs(cover - 0.9) < 4 * math.sqrt(0.09 / (m / 4)), (cover, m)
    assert abs(z.mean()) < 0.1 and abs(z.var() - 1.0) < 0.1, (z.mean(), z.var())


def _dense_log_lik_from_origin(model, times, y, mask):
    """`log p(y)` of one series when the prior starts at time 0 (`prior_start=
    "origin"`), by dense Gaussian conditioning of the joint of the states at the
    series' times: means `m∞ + e^{At}(m0 - m∞)`, covariances from `e^{At}`,
    `scipy.linalg.solve_continuous_lyapunov` and the initial covariance."""
    A = np.asarray(model.prior.drift())
    Qc = np.asarray(model.prior.diffusion_cov())
    st = model.start
    m0, minf = np.asarray(st.initial_mean), np.asarray(st.long_run_mean)
    P0 = np.asarray(st.initial_cov())
    Pinf = scipy.linalg.solve_continuous_lyapunov(A, -Qc)
    keep = np.isfinite(times)
    t = np.asarray(times)[keep]
    E = [scipy.linalg.expm(A * tk) for tk in t]
    means = np.concatenate([minf + E[k] @ (m0 - minf) for k in range(len(t))])
    marg = [E[k] @ P0 @ E[k].T + Pinf - E[k] @ Pinf @ E[k].T for k in range(len(t))]
    n = len(t)
    cov = np.zeros((n * D, n * D))
    for i in range(n):
        for j in range(i, n):
            block = scipy.linalg.expm(A * (t[j] - t[i])) @ marg[i]
            cov[j * D : (j + 1) * D, i * D : (i + 1) * D] = block
            cov[i * D : (i + 1) * D, j * D : (j + 1) * D] = block.T
    Hb = np.kron(np.eye(n), np.diag(H))
    obs = np.asarray(mask)[keep].reshape(-1)
    mu_y = (Hb @ means)[obs]
    S = (Hb @ cov @ Hb.T + np.kron(np.eye(n), np.diag(SIGMA**2)))[np.ix_(obs, obs)]
    return scipy.stats.multivariate_normal(mu_y, S).logpdf(
        np.asarray(y)[keep].reshape(-1)[obs]
    )


def test_origin_start_elbo_equals_the_dense_log_marginal_at_optimal_potentials(batch):
    """`prior_start="origin"`: the process starts at time 0 from a learned Gaussian
    and its mean moves to a learned long-run mean. With the likelihood's own
    potentials the ELBO is the exact log marginal likelihood of that nonstationary
    model (dense conditioning, an independent oracle); with a random recognition
    network it is below it; prior samples have the model's moments."""
    import scipy.stats  # noqa: F401  (used by the oracle)

    rng = np.random.default_rng(3)
    model = _model(0)
    origin = SVAE(
        D, latent_size=D, recognition_depth=0, decoder_depth=0, obs_std=1.0,
        prior_start="origin", key=jax.random.key(0),
    )  # fmt: skip
    start = eqx.tree_at(
        lambda s: (s.initial_mean, s.initial_factor, s.long_run_mean),
        origin.start,
        tuple(jnp.asarray(a) for a in (rng.normal(size=D),
              np.tril(rng.normal(size=(D, D))), 2.0 * rng.normal(size=D))),
    )  # fmt: skip
    model = eqx.tree_at(lambda m: m.start, model, start, is_leaf=lambda x: x is None)
    oracle = [
        _dense_log_lik_from_origin(model, batch.times[b], batch.values[b],
                                   batch.target_mask[b])
        for b in range(batch.times.shape[0])
    ]  # fmt: skip
    (elbo, _), _ = _compare(_optimal(model), batch)
    np.testing.assert_allclose(elbo, oracle, rtol=1e-9, atol=1e-9)
    (elbo, q), _ = _compare(model, batch)
    assert (elbo < np.asarray(oracle) - 1e-3).all()
    # prior samples at two times: the nonstationary mean and marginal variance
    t = jnp.array([0.4, 2.5])
    xs = model.sample_prior(t, key=jax.random.key(5), n_samples=20000)  # decoded
    A = np.asarray(model.prior.drift())
    Pinf = scipy.linalg.solve_continuous_lyapunov(
        A, -np.asarray(model.prior.diffusion_cov())
    )
    for k, tk in enumerate(np.asarray(t)):
        E = scipy.linalg.expm(A * tk)
        m = np.asarray(start.long_run_mean) + E @ np.asarray(
            start.initial_mean - start.long_run_mean
        )
        P = E @ np.asarray(start.initial_cov()) @ E.T + Pinf - E @ Pinf @ E.T
        np.testing.assert_allclose(xs[:, k].mean(0), H * m, atol=0.05)
        np.testing.assert_allclose(xs[:, k].var(0), H**2 * np.diag(P), rtol=0.05)
