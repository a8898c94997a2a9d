"""`ctmodels.lgssm`: message passing for linear-Gaussian state-space models, in pure
JAX on arrays (Kalman filter, RTS smoother, forward-filtering backward-sampling,
sequential or by associative scan, with masks), and the continuous-time
linear-Gaussian prior `dx = A x dt + L dW` discretised exactly at arbitrary times."""

from ._continuous import (
    LinearSDE as LinearSDE,
    discretise as discretise,
    stationary_cov as stationary_cov,
)
from ._filter import (
    kalman_filter as kalman_filter,
    log_marginal_likelihood as log_marginal_likelihood,
)
from ._model import (
    FilterResult as FilterResult,
    LinearGaussianSSM as LinearGaussianSSM,
    SmootherResult as SmootherResult,
)
from ._potentials import pseudo_observations as pseudo_observations
from ._sample import posterior_sample as posterior_sample
from ._smoother import kalman_smoother as kalman_smoother
