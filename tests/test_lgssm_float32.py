"""ctmodels.lgssm in float32 (JAX's default, what users run): a 200-step sequence at
irregular times, with tiny and very long intervals and missing values, filters and
smooths without NaN, with symmetric positive semi-definite covariances, and the
discretisation of long intervals reaches the stationary covariance."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ctmodels.lgssm as L


def _psd(covs, rel=1e-5):
    covs = np.asarray(covs)
    np.testing.assert_array_equal(covs, np.swapaxes(covs, -1, -2))
    scale = np.max(np.abs(covs), axis=(-1, -2))
    assert np.all(np.linalg.eigvalsh(covs).min(axis=-1) >= -rel * scale)


@pytest.mark.parametrize(
    "parallel", [False, pytest.param(True, marks=pytest.mark.slow)]
)  # the parallel scan over 200 steps takes ~10 s to compile
def test_filter_and_smoother_are_stable_in_float32(parallel):
    prior = L.LinearSDE(3, key=jax.random.key(0), scale=0.5)
    rng = np.random.default_rng(0)
    T = 200
    gaps = rng.exponential(0.5, T - 1)
    gaps[::17] = 1e-4  # nearly repeated times
    gaps[50] = 200.0  # a gap far longer than the decay time
    times = np.concatenate([[0.0], np.cumsum(gaps)]).astype(np.float32)
    H = rng.normal(size=(2, 3)).astype(np.float32)
    # precise observations make the updates ill-conditioned
    R = np.diag([1e-4, 1e-2]).astype(np.float32)
    x = rng.normal(size=(T, 3))
    y = (x @ H.T + rng.normal(size=(T, 2)) * [1e-2, 1e-1]).astype(np.float32)
    mask = rng.random((T, 2)) > 0.3
    mask[100:120] = False

    @jax.jit
    def run(times, y, mask):
        ssm = prior.ssm(times, emission=H, emission_cov=R)
        return L.kalman_smoother(ssm, y, mask, parallel=parallel), ssm.transition_cov

    out, Q = run(times, y, mask)
    assert out.means.dtype == jnp.float32
    for a in [
        out.means,
        out.covs,
        out.filtered.covs,
        out.cross_covs,
        out.log_likelihood,
    ]:
        assert np.all(np.isfinite(a))
    _psd(out.covs)
    _psd(out.filtered.covs)
    _psd(out.filtered.predicted_covs)
    _psd(Q)
    np.testing.assert_allclose(Q[50], prior.stationary_cov(), rtol=1e-4, atol=1e-5)
