"""ctmodels.lgssm against oracles, in float64: dense Gaussian conditioning of the joint
distribution of all states and observations (filter, smoother, log-likelihood),
the sequential scan against the associative one, scipy's `expm`, a quadrature of
the noise integral, scipy's Lyapunov solver, an Euler-Maruyama simulation's moments,
FFBS sample moments against the smoother, finite differences for gradients."""

from __future__ import annotations

import functools

import equinox as eqx
import jax
import jax.flatten_util
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.integrate
import scipy.linalg
import scipy.stats

import ctmodels
import ctmodels.lgssm as L

X64 = True

# every model of the tests below that runs through `run` has T = 6 steps, D = 2 state
# dimensions and C = 3 channels, with per-step matrices, so that each mode compiles
# once (the suite runs on 2 CPU cores)


@functools.partial(jax.jit, static_argnames="parallel")
def run(ssm, y, mask, key, parallel):
    """The smoother (with the filter's result inside) and an FFBS draw."""
    return (
        L.kalman_smoother(ssm, y, mask, parallel=parallel),
        L.posterior_sample(ssm, y, mask, key=key, parallel=parallel),
    )


KEY = jax.random.key(0)
N_BATCH = 4000  # the FFBS moments' sample size, and the jit/vmap test's batch
batched = jax.jit(
    jax.vmap(functools.partial(run, parallel=False), in_axes=(None, 0, 0, 0))
)


def _per_step(ssm, T):
    """The same model with every matrix stacked over the steps."""

    def stack(a, n):
        return jnp.broadcast_to(a, (n, *a.shape[-2:]))

    return L.LinearGaussianSSM(
        ssm.initial_mean, ssm.initial_cov, stack(ssm.transition, T - 1),
        stack(ssm.transition_cov, T - 1), stack(ssm.emission, T),
        stack(ssm.emission_cov, T),
    )  # fmt: skip


def _spd(rng, n, scale=1.0):
    a = rng.normal(size=(n, n))
    return scale * (a @ a.T / n + 0.5 * np.eye(n))


def _model(seed=0, T=6, D=2, C=3):
    """A time-varying model (every F, Q, H, R different) with a full R, a mask with a
    fully missing step, a partly missing one and NaN in the missing entries."""
    rng = np.random.default_rng(seed)
    arrays = dict(
        initial_mean=rng.normal(size=D),
        initial_cov=_spd(rng, D),
        transition=0.8 * rng.normal(size=(T - 1, D, D)) / np.sqrt(D),
        transition_cov=np.stack([_spd(rng, D, 0.3) for _ in range(T - 1)]),
        emission=rng.normal(size=(T, C, D)),
        emission_cov=np.stack([_spd(rng, C, 0.5) for _ in range(T)]),
    )
    y = rng.normal(size=(T, C))
    mask = rng.random((T, C)) > 0.3
    mask[1] = False
    mask[0] = True
    y = np.where(mask, y, np.nan)
    return arrays, y, mask


def _ssm(arrays):
    return L.LinearGaussianSSM(**{k: jnp.asarray(v) for k, v in arrays.items()})


def _dense(arrays, y, mask, upto=None):
    """Condition the joint Gaussian of (x_0..x_{T-1}, y_0..y_{T-1}) on the observed
    y of steps < upto: means [T, D], covs [T, D, D], the full state covariance, and
    log p(observed y)."""
    m0, P0 = arrays["initial_mean"], arrays["initial_cov"]
    F, Q = arrays["transition"], arrays["transition_cov"]
    H, R = arrays["emission"], arrays["emission_cov"]
    T, C = y.shape
    D = m0.size
    mx = [m0]
    for t in range(1, T):
        mx.append(F[t - 1] @ mx[-1])
    mx = np.concatenate(mx)
    S = np.zeros((T * D, T * D))
    blk = lambda t: slice(t * D, (t + 1) * D)  # noqa: E731
    S[blk(0), blk(0)] = P0
    for t in range(1, T):
        for s in range(t):
            S[blk(t), blk(s)] = F[t - 1] @ S[blk(t - 1), blk(s)]
            S[blk(s), blk(t)] = S[blk(t), blk(s)].T
        S[blk(t), blk(t)] = F[t - 1] @ S[blk(t - 1), blk(t - 1)] @ F[t - 1].T + Q[t - 1]
    Hb = scipy.linalg.block_diag(*H)
    Rb = scipy.linalg.block_diag(*R)
    obs = mask.copy()
    if upto is not None:
        obs[upto:] = False
    o = obs.reshape(-1)
    yo = y.reshape(-1)[o]
    my = (Hb @ mx)[o]
    Sxy = (S @ Hb.T)[:, o]
    Syy = (Hb @ S @ Hb.T + Rb)[np.ix_(o, o)]
    gain = np.linalg.solve(Syy, Sxy.T).T
    mean = mx + gain @ (yo - my)
    cov = S - gain @ Sxy.T
    ll = scipy.stats.multivariate_normal(my, Syy).logpdf(yo) if o.any() else 0.0
    means = mean.reshape(T, D)
    covs = np.stack([cov[blk(t), blk(t)] for t in range(T)])
    return means, covs, cov, ll


def _sde_arrays(prior, times, H, R):
    """The arrays of `prior.ssm(times, emission=H, emission_cov=R)`, per step, in
    numpy, for `_dense`."""
    F, Q = map(np.asarray, prior.discretise(np.diff(times)))
    T = len(times)
    return dict(
        initial_mean=np.zeros(F.shape[-1]),
        initial_cov=np.asarray(prior.stationary_cov()),
        transition=F,
        transition_cov=Q,
        emission=np.broadcast_to(H, (T, *np.shape(H))),
        emission_cov=np.broadcast_to(R, (T, *np.shape(R))),
    )


@pytest.mark.parametrize("parallel", [False, True])
def test_filter_and_smoother_match_dense_conditioning(parallel):
    arrays, y, mask = _model()
    smoothed, _ = run(_ssm(arrays), y, mask, KEY, parallel=parallel)
    filtered = smoothed.filtered
    T = y.shape[0]
    for t in range(T):
        means, covs, _, ll = _dense(arrays, y, mask, upto=t + 1)
        np.testing.assert_allclose(filtered.means[t], means[t], atol=1e-10)
        np.testing.assert_allclose(filtered.covs[t], covs[t], atol=1e-10)
        pmeans, pcovs, _, _ = _dense(arrays, y, mask, upto=t)
        np.testing.assert_allclose(filtered.predicted_means[t], pmeans[t], atol=1e-10)
        np.testing.assert_allclose(filtered.predicted_covs[t], pcovs[t], atol=1e-10)
    np.testing.assert_allclose(filtered.log_likelihood, ll, rtol=1e-10)
    assert np.isfinite(ll)
    means, covs, full, ll = _dense(arrays, y, mask)
    D = means.shape[1]
    np.testing.assert_allclose(smoothed.means, means, atol=1e-10)
    np.testing.assert_allclose(smoothed.covs, covs, atol=1e-10)
    cross = [full[t * D : (t + 1) * D, (t + 1) * D : (t + 2) * D] for t in range(T - 1)]
    np.testing.assert_allclose(smoothed.cross_covs, np.stack(cross), atol=1e-10)
    np.testing.assert_allclose(smoothed.log_likelihood, ll, rtol=1e-10)


def test_parallel_scan_equals_sequential():
    """A continuous-time model at irregular times, entries and whole steps missing
    (the first one included): filter, smoother, log-likelihood and FFBS sample
    (same key) of the associative scans against the sequential ones."""
    prior = L.LinearSDE(2, key=jax.random.key(0), scale=0.5)
    rng = np.random.default_rng(1)
    times = np.cumsum(rng.exponential(0.5, 6))
    H, R = rng.normal(size=(3, 2)), 0.2 * np.eye(3)
    ssm = _per_step(prior.ssm(times, emission=H, emission_cov=R), 6)
    y = rng.normal(size=(6, 3))
    steps = np.broadcast_to((np.arange(6) % 3 != 0)[:, None], (6, 3))  # 0, 3 missing
    for mask in [rng.random((6, 3)) > 0.4, steps]:
        seq = run(ssm, y, mask, KEY, parallel=False)
        par = run(ssm, y, mask, KEY, parallel=True)
        for a, b in zip(jax.tree.leaves(seq), jax.tree.leaves(par), strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-12)


def test_a_fully_masked_step_equals_skipping_it():
    """Observing at times t with step k fully masked is the model at the times
    without t_k (the prior over the gap is one transition over the longer interval)."""
    prior = L.LinearSDE(2, key=jax.random.key(1), scale=0.5)
    rng = np.random.default_rng(2)
    times = np.array([0.0, 0.4, 0.5, 1.3, 2.0, 2.2])
    k = 3
    H, R = rng.normal(size=(3, 2)), 0.3 * np.eye(3)
    y = rng.normal(size=(6, 3))
    mask = np.ones((6, 3), bool)
    mask[2, 1] = False
    mask[k] = False
    y[k] = np.nan  # ignored
    full, _ = run(
        _per_step(prior.ssm(times, emission=H, emission_cov=R), 6), y, mask, KEY,
        parallel=False,
    )  # fmt: skip
    keep = np.arange(6) != k
    skipped = _sde_arrays(prior, times[keep], H, R)
    means, covs, _, ll = _dense(skipped, y[keep], mask[keep])
    np.testing.assert_allclose(full.log_likelihood, ll, rtol=1e-10)
    np.testing.assert_allclose(full.means[keep], means, atol=1e-10)
    np.testing.assert_allclose(full.covs[keep], covs, atol=1e-10)
    for t in range(5):
        fmeans, _, _, _ = _dense(skipped, y[keep], mask[keep], upto=t + 1)
        np.testing.assert_allclose(full.filtered.means[keep][t], fmeans[t], atol=1e-10)
    # and the masked step itself is the filter's prediction there
    np.testing.assert_allclose(
        full.filtered.means[k], full.filtered.predicted_means[k], atol=1e-15
    )


@pytest.mark.parametrize(
    "parallel",
    [False, pytest.param(True, marks=pytest.mark.slow)],  # ~10 s of compilation
)
def test_pseudo_observations_and_gradients(parallel):
    """The smoother on pseudo-observations is the prior times the potentials in
    information form (precision and precision-weighted mean added), and its
    log-likelihood is log ∫ p(x) Π ψ_t(x_t) dx; zero-precision entries drop out.
    The gradient of that log-likelihood with respect to the continuous-time prior's
    parameters (through the discretisation) and the potentials matches central
    differences, and is zero (not NaN) for a left-out entry."""
    prior = L.LinearSDE(2, key=jax.random.key(2), scale=0.5)
    times = np.array([0.0, 0.5, 0.7, 1.5, 2.6])
    rng = np.random.default_rng(3)
    mu = rng.normal(size=(5, 2))
    lam = rng.uniform(0.5, 3.0, size=(5, 2))
    lam[1, 0] = 0.0
    mu[1, 0] = np.nan

    def loss(flat):  # one compilation: the smoother and its gradient
        prior, mu, lam = unravel(flat)
        y, R, mask = L.pseudo_observations(mu, lam)
        ssm = prior.ssm(times, emission=jnp.eye(2), emission_cov=R)
        out = L.kalman_smoother(ssm, y, mask, parallel=parallel)
        ll = L.log_marginal_likelihood(ssm, y, mask, parallel=parallel)
        return ll, out

    flat, unravel = jax.flatten_util.ravel_pytree(
        (prior, jnp.asarray(mu), jnp.asarray(lam))
    )
    value_and_grad = jax.jit(jax.value_and_grad(loss, has_aux=True))
    (_, out), grad = value_and_grad(flat)
    # dense information-form oracle
    arrays = _sde_arrays(prior, times, np.eye(2), np.eye(2))
    _, _, prior_cov, _ = _dense(arrays, mu, np.zeros((5, 2), bool))
    J = np.diag(lam.reshape(-1))
    h = np.nan_to_num(lam * mu).reshape(-1)
    post_cov = np.linalg.inv(np.linalg.inv(prior_cov) + J)
    post_mean = post_cov @ h
    np.testing.assert_allclose(out.means, post_mean.reshape(5, 2), atol=1e-10)
    for t in range(5):
        np.testing.assert_allclose(
            out.covs[t], post_cov[2 * t : 2 * t + 2, 2 * t : 2 * t + 2], atol=1e-10
        )
    o = lam.reshape(-1) > 0
    marg = prior_cov[np.ix_(o, o)] + np.diag(1 / lam.reshape(-1)[o])
    ll = scipy.stats.multivariate_normal(np.zeros(o.sum()), marg).logpdf(
        mu.reshape(-1)[o]
    )
    np.testing.assert_allclose(out.log_likelihood, ll, rtol=1e-10)
    np.testing.assert_allclose(value_and_grad(flat)[0][0], ll, rtol=1e-10)
    # gradients: the left-out entry's are zero, the others central differences
    _, g_mu, g_lam = unravel(grad)
    assert g_mu[1, 0] == 0 and g_lam[1, 0] == 0
    n = jax.flatten_util.ravel_pytree(prior)[0].size
    left_out = {n + 2, n + mu.size + 2}  # mu[1, 0] (NaN) and lam[1, 0] (zero)
    free = [i for i in range(flat.size) if i not in left_out]
    assert np.all(np.isfinite(grad))
    eps = 1e-6
    f = lambda v: value_and_grad(v)[0][0]  # noqa: E731
    fd = np.array(
        [(f(flat.at[i].add(eps)) - f(flat.at[i].add(-eps))) / (2 * eps) for i in free]
    )
    np.testing.assert_allclose(grad[np.array(free)], fd, rtol=1e-6, atol=1e-8)


def test_full_precision_potentials():
    """Full-precision potentials against the dense information-form posterior: the
    prior's precision plus the block-diagonal J_t, its mean from Σ_t J_t m_t; a step
    left out by the mask contributes nothing."""
    prior = L.LinearSDE(2, key=jax.random.key(2), scale=0.5)
    times = np.array([0.0, 0.5, 0.7, 1.5, 2.6])
    rng = np.random.default_rng(4)
    mu = rng.normal(size=(5, 2))
    J = np.stack([_spd(rng, 2, 2.0) for _ in range(5)])
    steps = np.array([True, True, False, True, True])
    J[2] = np.nan  # left out

    @jax.jit
    def posterior(mu, J, steps):
        y, R, mask = L.pseudo_observations(mu, J, steps)
        ssm = prior.ssm(times, emission=jnp.eye(2), emission_cov=R)
        return L.kalman_smoother(ssm, y, mask)

    out = posterior(mu, J, steps)
    arrays = _sde_arrays(prior, times, np.eye(2), np.eye(2))
    _, _, prior_cov, _ = _dense(arrays, mu, np.zeros((5, 2), bool))
    Jb = scipy.linalg.block_diag(
        *[J[t] if steps[t] else np.zeros((2, 2)) for t in range(5)]
    )
    h = Jb @ np.where(steps[:, None], mu, 0).reshape(-1)
    post_cov = np.linalg.inv(np.linalg.inv(prior_cov) + Jb)
    np.testing.assert_allclose(out.means, (post_cov @ h).reshape(5, 2), atol=1e-10)
    for t in range(5):
        np.testing.assert_allclose(
            out.covs[t], post_cov[2 * t : 2 * t + 2, 2 * t : 2 * t + 2], atol=1e-10
        )


def _integral_Q(A, Qc, dt):
    f = lambda s: (  # noqa: E731
        scipy.linalg.expm(A * s) @ Qc @ scipy.linalg.expm(A * s).T
    ).reshape(-1)
    return scipy.integrate.quad_vec(f, 0.0, dt, epsabs=1e-13, epsrel=1e-12)[0].reshape(
        A.shape
    )


def test_discretisation_against_expm_and_quadrature():
    rng = np.random.default_rng(4)
    A = rng.normal(size=(2, 2)) - 1.5 * np.eye(2)  # not of the parametrised form
    Lc = np.tril(rng.normal(size=(2, 2)))
    Qc = Lc @ Lc.T
    dts = np.array([0.0, 1e-3, 0.37, 2.0])
    F, Q = L.discretise(A, Qc, dts)
    for i, dt in enumerate(dts):
        np.testing.assert_allclose(
            F[i], scipy.linalg.expm(A * dt), rtol=1e-12, atol=1e-14
        )
        np.testing.assert_allclose(Q[i], _integral_Q(A, Qc, dt), rtol=1e-9, atol=1e-13)
    np.testing.assert_allclose(Q[0], 0, atol=0)
    np.testing.assert_allclose(F[0], np.eye(2), atol=0)


def test_doublings_skipped_in_one_call_equal_vmapped_and_their_gradients():
    """`discretise` skips the doublings past the longest interval's (a `cond` on the
    largest count); under `vmap` over intervals the skip is a select. Both give the
    same values and gradients, which match central finite differences; and
    `LinearSDE.transitions` on a batch of series equals one `ssm` per series."""
    rng = np.random.default_rng(21)
    A = rng.normal(size=(2, 2)) - 2.0 * np.eye(2)
    Lc = np.tril(rng.normal(size=(2, 2)))
    Qc = Lc @ Lc.T
    dts = np.array([0.0, 1e-2, 0.5, 40.0])  # 0, 0, a few and many doublings

    def total(A, dts, vmapped):
        if vmapped:
            F, Q = jax.vmap(lambda d: L.discretise(A, Qc, d[None]))(dts)
        else:
            F, Q = L.discretise(A, Qc, dts)
        return jnp.sum(jnp.sin(F)) + jnp.sum(jnp.cos(Q))

    one = jax.value_and_grad(total)(jnp.asarray(A), dts, False)
    each = jax.value_and_grad(total)(jnp.asarray(A), dts, True)
    np.testing.assert_allclose(one[0], each[0], rtol=1e-12)
    np.testing.assert_allclose(one[1], each[1], rtol=1e-10, atol=1e-12)
    fd = np.zeros((2, 2))
    for i in range(2):
        for j in range(2):
            e = np.zeros((2, 2))
            e[i, j] = 1e-6
            fd[i, j] = (total(A + e, dts, False) - total(A - e, dts, False)) / 2e-6
    np.testing.assert_allclose(one[1], fd, rtol=1e-6, atol=1e-8)

    prior = L.LinearSDE(2, key=jax.random.key(22), scale=0.5)
    times = np.sort(rng.uniform(0, 3, size=(3, 5)), axis=-1)
    F, Q = prior.transitions(times)
    assert F.shape == Q.shape == (3, 4, 2, 2)
    for b in range(3):
        ssm = prior.ssm(times[b], emission=np.eye(2), emission_cov=np.eye(2))
        np.testing.assert_allclose(F[b], ssm.transition, rtol=1e-12, atol=1e-14)
        np.testing.assert_allclose(Q[b], ssm.transition_cov, rtol=1e-12, atol=1e-14)


def test_stationary_cov_and_long_intervals():
    prior = L.LinearSDE(2, key=jax.random.key(5), scale=0.8)
    A, Qc = np.asarray(prior.drift()), np.asarray(prior.diffusion_cov())
    P = prior.stationary_cov()
    np.testing.assert_allclose(
        P, scipy.linalg.solve_continuous_lyapunov(A, -Qc), rtol=1e-10
    )
    # the noise over an interval long against the decay time tends to P
    decay = -np.max(np.linalg.eigvals(A).real)
    _, Q = prior.discretise(np.array([20.0 / decay]))
    np.testing.assert_allclose(Q[0], P, rtol=1e-6, atol=1e-8)


def test_parametrisation_is_stable():
    prior = L.LinearSDE(4, key=jax.random.key(6), scale=3.0, eps=1e-2)
    A = np.asarray(prior.drift())
    assert np.linalg.eigvalsh(A + A.T).max() <= -2e-2 + 1e-12
    assert np.linalg.eigvals(A).real.max() <= -1e-2 + 1e-12
    Lm = np.asarray(prior.diffusion())
    np.testing.assert_array_equal(Lm, np.tril(Lm))
    assert np.all(np.diag(Lm) > 0)
    # the default starts at A ≈ -I and a unit stationary covariance
    prior = L.LinearSDE(2, key=jax.random.key(0), scale=0.0, eps=1e-12)
    np.testing.assert_allclose(prior.drift(), -np.eye(2), atol=1e-10)
    np.testing.assert_allclose(prior.stationary_cov(), np.eye(2), atol=1e-10)


def test_hurwitz_drift_is_stable_and_reaches_non_normal_drifts():
    """`drift_form="hurwitz"`: `A = W M` stays stable for any parameters (M^{-1} a
    Lyapunov matrix), starts equal to the dissipative form, and reaches a stable
    drift the dissipative form cannot: a level driven by a velocity (Matérn-3/2's
    `[[0, 1], [-l^2, -2 l]]` with `l = 4`, whose symmetric part is indefinite)."""
    prior = L.LinearSDE(4, key=jax.random.key(6), scale=3.0, drift_form="hurwitz")
    prior = eqx.tree_at(
        lambda p: p.drift_metric, prior, jax.random.normal(jax.random.key(7), (4, 4))
    )
    A = np.asarray(prior.drift())
    assert np.linalg.eigvals(A).real.max() < 0
    M = np.asarray(prior.drift_metric @ prior.drift_metric.T) + prior.eps * np.eye(4)
    lyap = A @ np.linalg.inv(M) + np.linalg.inv(M) @ A.T
    assert np.linalg.eigvalsh(lyap).max() <= -2 * prior.eps + 1e-9
    same = [L.LinearSDE(3, key=jax.random.key(8), drift_form=f).drift()
            for f in ("dissipative", "hurwitz")]  # fmt: skip
    np.testing.assert_allclose(same[0], same[1], rtol=1e-12)
    # the target drift: W = A P for the Lyapunov solution P of A P + P A^T = -I,
    # then M = P^{-1}, S S^T = -(W + W^T)/2 - eps, K = upper triangle of the skew part
    target = np.array([[0.0, 1.0], [-16.0, -8.0]])
    assert np.linalg.eigvalsh(target + target.T).max() > 0  # not dissipative
    P = scipy.linalg.solve_continuous_lyapunov(target, -np.eye(2))
    W = target @ P
    eps = 1e-3
    S = np.linalg.cholesky(-(W + W.T) / 2 - eps * np.eye(2))
    N = np.linalg.cholesky(np.linalg.inv(P) - eps * np.eye(2))
    hz = L.LinearSDE(2, key=jax.random.key(9), eps=eps, drift_form="hurwitz")
    hz = eqx.tree_at(
        lambda p: (p.drift_factor, p.drift_skew, p.drift_metric),
        hz,
        (jnp.asarray(S), jnp.asarray(np.triu((W - W.T) / 2)), jnp.asarray(N)),
    )
    np.testing.assert_allclose(hz.drift(), target, rtol=1e-10, atol=1e-10)
    with pytest.raises(ValueError, match="drift_form='x'; expected"):
        L.LinearSDE(2, key=jax.random.key(0), drift_form="x")


def test_discretisation_against_euler_maruyama_moments():
    """4000 paths of a fine Euler-Maruyama simulation over dt = 0.6 from a fixed x0:
    their mean and covariance against F x0 and Q (bias O(h) and sampling error
    ~ 1/sqrt(paths))."""
    prior = L.LinearSDE(2, key=jax.random.key(7), scale=0.7)
    A, Lm = np.asarray(prior.drift()), np.asarray(prior.diffusion())
    x0 = np.array([1.0, -0.5])
    dt, steps, paths = 0.6, 600, 4000
    h = dt / steps
    rng = np.random.default_rng(8)
    x = np.broadcast_to(x0, (paths, 2)).copy()
    for _ in range(steps):
        x = x + h * x @ A.T + np.sqrt(h) * rng.normal(size=(paths, 2)) @ Lm.T
    F, Q = prior.discretise(np.array([dt]))
    F, Q = np.asarray(F[0]), np.asarray(Q[0])
    se_mean = np.sqrt(np.diag(Q) / paths)
    np.testing.assert_array_less(np.abs(x.mean(0) - F @ x0), 4 * se_mean + 2e-3)
    emp = np.cov(x.T)
    se_cov = np.sqrt((np.outer(np.diag(Q), np.diag(Q)) + Q**2) / paths)
    np.testing.assert_array_less(np.abs(emp - Q), 4 * se_cov + 5e-3)


def test_ffbs_sample_moments_match_the_smoother():
    arrays, y, mask = _model(seed=5)
    ssm = _ssm(arrays)
    post, _ = run(ssm, y, mask, KEY, parallel=False)
    T = y.shape[0]
    keys = jax.random.split(jax.random.key(9), N_BATCH)
    ys = np.broadcast_to(y, (N_BATCH, *y.shape))
    masks = np.broadcast_to(mask, (N_BATCH, *mask.shape))
    draws = np.asarray(batched(ssm, ys, masks, keys)[1])  # [N, T, D]
    n = draws.shape[0]
    sd = np.sqrt(np.diagonal(post.covs, axis1=1, axis2=2))
    np.testing.assert_array_less(
        np.abs(draws.mean(0) - post.means), 4.5 * sd / np.sqrt(n)
    )
    for t in range(T):
        emp = np.cov(draws[:, t].T)
        np.testing.assert_allclose(
            emp, post.covs[t], atol=0.1 * sd[t].max() ** 2 + 1e-12
        )
    # joint: lag-one cross-covariances
    for t in range(T - 1):
        c = draws[:, t] - draws[:, t].mean(0)
        d = draws[:, t + 1] - draws[:, t + 1].mean(0)
        emp = c.T @ d / (n - 1)
        scale = sd[t].max() * sd[t + 1].max()
        np.testing.assert_allclose(emp, post.cross_covs[t], atol=0.1 * scale)


def test_sample_gradients_are_the_posterior_means():
    """FFBS is reparametrised: with the key fixed, a draw is the posterior mean plus
    noise that does not depend on the observations, so its gradient with respect
    to them is the smoothed mean's (reverse mode, as a VAE's loss uses it)."""
    arrays, y, mask = _model(seed=6)
    ssm = _ssm(arrays)
    w = np.random.default_rng(7).normal(size=(6, 2))
    y = np.where(mask, y, 0.0)

    @jax.jit
    def grads(y):
        draw = lambda y: jnp.sum(w * L.posterior_sample(ssm, y, mask, key=KEY))
        mean = lambda y: jnp.sum(w * L.kalman_smoother(ssm, y, mask).means)
        return jax.grad(draw)(y), jax.grad(mean)(y)

    g_draw, g_mean = grads(y)
    np.testing.assert_allclose(g_draw, g_mean, rtol=1e-9, atol=1e-12)
    assert np.all(g_draw[~mask] == 0) and np.any(g_draw != 0)


def test_jit_and_vmap_over_a_batch_of_sequences():
    arrays, y, mask = _model(seed=12)
    ssm = _ssm(arrays)
    rng = np.random.default_rng(13)
    ys = rng.normal(size=(N_BATCH, *y.shape))
    masks = rng.random((N_BATCH, *y.shape)) > 0.4
    keys = jax.random.split(KEY, N_BATCH)
    smoothed, draws = batched(ssm, ys, masks, keys)
    assert smoothed.means.shape == (N_BATCH, 6, 2)
    assert smoothed.log_likelihood.shape == (N_BATCH,)
    for i in [0, 1, N_BATCH - 1]:
        one = run(ssm, ys[i], masks[i], keys[i], parallel=False)
        every = jax.tree.leaves((smoothed, draws))
        for u, v in zip(jax.tree.leaves(one), every, strict=True):
            np.testing.assert_allclose(v[i], u, rtol=1e-10, atol=1e-12)
        _, _, _, ll = _dense(arrays, ys[i], masks[i])
        np.testing.assert_allclose(smoothed.log_likelihood[i], ll, rtol=1e-10)


def test_a_per_step_mask_is_every_channel_of_the_step():
    from ctmodels.lgssm._model import prepare

    arrays, y, _ = _model()
    steps = np.array([True, False, True, True, False, True])
    prep = jax.jit(prepare)
    a = prep(_ssm(arrays), y, steps)
    b = prep(_ssm(arrays), y, np.repeat(steps[:, None], 3, axis=1))
    for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(u, v)
    assert list(a.missing) == [0, 3, 0, 0, 3, 0]
    assert np.all(a.H[1] == 0) and np.all(a.R[1] == np.eye(3))


def test_the_package_is_exported():
    assert ctmodels.lgssm is L


@pytest.mark.parametrize(
    "change,match",
    [
        (dict(transition=np.zeros((4, 2, 2))), "`transition` has shape"),
        (dict(transition_cov=np.zeros((2, 3))), "`transition_cov` has shape"),
        (dict(emission=np.zeros((3, 3))), "`emission` has shape"),
        (dict(emission_cov=np.zeros((6, 2, 2))), "`emission_cov` has shape"),
        (dict(initial_cov=np.eye(3)), "`initial_cov` has shape"),
    ],
)
def test_mismatched_shapes_are_refused_when_traced(change, match):
    arrays, y, mask = _model()
    with pytest.raises(ValueError, match=match):
        L.kalman_filter(_ssm(dict(arrays, **change)), y, mask)


def test_other_bad_inputs_are_refused():
    arrays, y, mask = _model()
    ssm = _ssm(arrays)
    with pytest.raises(ValueError, match="`mask` has shape"):
        L.kalman_filter(ssm, y, mask[:, :2])
    with pytest.raises(ValueError, match="`mask` has dtype"):
        L.kalman_filter(ssm, y, mask.astype(float))
    with pytest.raises(ValueError, match="jax.vmap"):
        L.kalman_filter(ssm, y[None], mask)
    with pytest.raises(TypeError, match="LinearGaussianSSM"):
        L.kalman_filter(arrays, y, mask)
    with pytest.raises(ValueError, match="`intervals` has shape"):
        L.discretise(np.eye(2), np.eye(2), 0.5)
    prior = L.LinearSDE(2, key=jax.random.key(0))
    with pytest.raises(eqx.EquinoxRuntimeError, match="non-decreasing"):
        prior.ssm(
            jnp.array([0.0, 1.0, 0.5]), emission=np.eye(2), emission_cov=np.eye(2)
        )
