"""The structured variational autoencoder (Johnson et al. 2016) with a continuous-time
linear-Gaussian prior: neural Gaussian potentials, Kalman smoothing, neural decoder."""

from __future__ import annotations

import math
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, ArrayLike, Bool, Float, PRNGKeyArray

from .. import lgssm as lg
from .._references import cites
from ..data import Batch
from ..nn import apply, mlp
from . import _common as C


class SVAEPosterior(eqx.Module):
    """What `SVAE.posterior` returns for a batch of `B` series on `T` positions.

    - `smoothed`: the `ctmodels.lgssm.SmootherResult` of each series (every field
      with a leading batch axis): `smoothed.means` `[B, T, D]` and `smoothed.covs`
      `[B, T, D, D]` are the marginals of `q(x)`, and `smoothed.log_likelihood`
      `[B]` is `log Z`, the log normaliser of `p(x) Π_t ψ_t(x_t)`.
    - `kl`: `KL(q(x) || p(x)) = E_q[Σ_t log ψ_t(x_t)] - log Z`, `[B]`.
    - `means`, `precisions`: the recognition potentials `ψ_t`, `[B, T, D]` each.
    - `present`: `[B, T, D]` booleans, where a potential is present.
    """

    smoothed: lg.SmootherResult
    kl: Float[Array, " B"]
    means: Float[Array, "B T D"]
    precisions: Float[Array, "B T D"]
    present: Bool[Array, "B T D"]


def _softplus_inverse(x: float) -> float:
    return float(math.log(math.expm1(x)))


def _marginal_draws(means, covs, key, n_samples):
    """`n_samples` reparametrised draws `[K, ..., D]` from each Gaussian marginal
    `N(means[...], covs[...])` (independent across the leading axes): Cholesky
    factors of the covariances plus a jitter of ten machine epsilons of their mean
    variance, so that a (numerically) singular one still factors."""
    D = means.shape[-1]
    finfo = jnp.finfo(covs.dtype)
    scale = jnp.trace(covs, axis1=-2, axis2=-1)[..., None, None] / D
    eye = jnp.eye(D, dtype=covs.dtype)
    chol = jnp.linalg.cholesky(
        covs + (10 * finfo.eps * jnp.abs(scale) + finfo.tiny) * eye
    )
    z = jax.random.normal(key, (n_samples, *means.shape), means.dtype)
    return means + jnp.einsum("...ij,k...j->k...i", chol, z)


class PriorStart(eqx.Module):
    """Where `SVAE`'s prior starts when `prior_start="origin"`: the latent process
    starts at time 0 (the origin of the model's time axis) from
    `N(initial_mean, L L^T)`, and its mean moves from `initial_mean` towards
    `long_run_mean` as `dm/dt = A (m - long_run_mean)` (the drift `dx = (A (x -
    long_run_mean)) dt + L dW`): a population trend over time since the origin,
    which a stationary zero-mean prior cannot express.

    **Fields:** `initial_mean` `[D]`, `initial_factor` `[D, D]` (`L`'s strict lower
    triangle and its diagonal before `softplus`), `long_run_mean` `[D]`.
    """

    initial_mean: Float[Array, " D"]
    initial_factor: Float[Array, "D D"]
    long_run_mean: Float[Array, " D"]

    def __init__(self, latent_size: int):
        """Starts as the stationary prior of `ctmodels.lgssm.LinearSDE`'s default
        initialisation: zero means and a unit initial covariance."""
        D = latent_size
        self.initial_mean = jnp.zeros(D)
        self.initial_factor = _softplus_inverse(1.0) * jnp.eye(D)
        self.long_run_mean = jnp.zeros(D)

    def initial_cov(self) -> Float[Array, "D D"]:
        raw = self.initial_factor
        L = jnp.tril(raw, -1) + jnp.diag(jax.nn.softplus(jnp.diagonal(raw)))
        return L @ L.T

    def mean_path(self, F: Float[Array, "*B T D D"]) -> Float[Array, "*B T+1 D"]:
        """The prior mean at the origin and after each transition `F_k`:
        `m_{k+1} = long_run_mean + F_k (m_k - long_run_mean)`."""
        D = F.shape[-1]
        m0 = jnp.broadcast_to(self.initial_mean, F.shape[:-3] + (D,)).astype(F.dtype)
        mu = self.long_run_mean.astype(F.dtype)

        def step(m, Fk):
            nxt = mu + jnp.einsum("...ij,...j->...i", Fk, m - mu)
            return nxt, nxt

        _, ms = jax.lax.scan(step, m0, jnp.moveaxis(F, -3, 0))
        return jnp.concatenate([m0[..., None, :], jnp.moveaxis(ms, 0, -2)], axis=-2)


def _from_origin(post: lg.SmootherResult, path) -> lg.SmootherResult:
    """A smoother result over `[origin, times...]` of the deviation from the mean
    path -> the result over `times` of the state itself."""

    def cut(x):
        return x[:, 1:]

    f = post.filtered
    filtered = lg.FilterResult(
        cut(f.means + path), cut(f.covs), cut(f.predicted_means + path),
        cut(f.predicted_covs), f.log_likelihood,
    )  # fmt: skip
    return lg.SmootherResult(
        cut(post.means + path), cut(post.covs), cut(post.cross_covs), filtered,
        post.log_likelihood,
    )  # fmt: skip


@cites("johnson2016composing", "vanloan1978computing")
class SVAE(C.AbstractGaussianSequenceModel):
    """Structured variational autoencoder (Johnson et al., 2016) for irregularly
    sampled time series, with a continuous-time linear-Gaussian prior.

    Generative model: a latent path `x(t) ∈ R^D` from the stationary
    Ornstein-Uhlenbeck prior `dx = A x dt + L dW` (`ctmodels.lgssm.LinearSDE`,
    discretised exactly at each series' own times, so irregular times need no grid;
    with `prior_start="origin"` the process instead starts at time 0 and its mean
    follows a learned trend, `PriorStart`);
    each channel's value at an observed time is `N(decoder(x(t))_c, σ_c^2)` (an MLP
    decoder; `σ` learned per channel by default).

    Recognition: a network applied to each observation on its own, to
    `[value * mask, mask]` (a missing channel is fed as 0 with its mask bit off),
    emits a Gaussian potential `ψ_t(x_t) = N(μ_t; x_t, diag(λ_t)^{-1})` (mean and
    diagonal precision `λ = softplus(·)`) at every time with at least one observed
    channel of the context (`batch.mask`); a time with nothing observed has no
    potential. Conjugate structured mean-field inference: `q(x) ∝ p(x) Π_t ψ_t(x_t)`
    is the exact posterior of the prior given the potentials as pseudo-observations,
    found by Kalman smoothing (`ctmodels.lgssm.kalman_smoother`), and its log
    normaliser `log Z` is the smoother's log-likelihood.

    The ELBO of a series, for the values scored (`batch.target_mask`), is
    `E_q[log p(y | x)] - KL(q(x) || p(x))` with, the potentials being Gaussian and
    conjugate to the prior, `KL = E_q[Σ_t log ψ_t(x_t)] - log Z` in closed form
    from the smoothed marginals. The likelihood factorises over times, so its
    expectation needs only `q`'s marginals: it is estimated with reparametrised
    draws of each time's state from its smoothed marginal, decoded: unbiased, as
    joint draws by forward-filtering backward-sampling
    (`ctmodels.lgssm.posterior_sample`) would be, without their covariances between
    times in the estimate's variance, and with no second filter (half the message
    passing to run and to compile). The ELBO is at most `log p(y)`, with equality
    when the decoder is linear and the potentials are the
    likelihood's own (`tests/test_svae_x64.py`).

    The prior's parameters (the drift and diffusion of the SDE) are trained by the
    same optimiser as the networks (Adam in `ctmodels.train.fit`), through the exact
    discretisation and the smoother. Johnson et al. update the parameters of a
    conjugate prior by natural gradients instead; here the prior is a continuous-time
    SDE whose discretisation at irregular times is not in the exponential family's
    natural parameters, so the natural gradient has no closed form, and the prior has
    few parameters next to the networks. Natural gradients for the prior are future
    work.

    Predictions at any times add them to the series as fully masked steps (no
    potential), which leaves the posterior elsewhere unchanged: inside the context
    they are the smoother's, beyond it the prior's dynamics carried on from the
    last observation. The predictive mean and std are those of decoded posterior
    draws plus the observation noise.

    **Attributes:** `recognition`, `decoder` (`eqx.nn.MLP`s), `prior`
    (`ctmodels.lgssm.LinearSDE`), `log_std` (learned noise, or None), and
    `hyperparameters` (the constructor's keyword arguments, for checkpoints).
    """

    recognition: eqx.nn.MLP
    decoder: eqx.nn.MLP
    prior: lg.LinearSDE
    log_std: Array | None
    start: PriorStart | None
    num_channels: int = eqx.field(static=True)
    latent_size: int = eqx.field(static=True)
    obs_std: float = eqx.field(static=True)
    precision_shift: float = eqx.field(static=True)
    parallel: bool = eqx.field(static=True)
    hyperparameters: tuple[tuple[str, Any], ...] = eqx.field(static=True)

    def __init__(
        self,
        num_channels: int,
        *,
        latent_size: int = 4,
        units: int = 64,
        recognition_depth: int = 1,
        decoder_depth: int = 1,
        prior_rate: float = 1.0,
        prior_drift: str = "dissipative",
        prior_start: str = "stationary",
        potential_std: float = 1.0,
        obs_std: float = 0.1,
        learn_std: bool = True,
        parallel: bool = False,
        key: PRNGKeyArray,
    ):
        """**Arguments:**

        - `num_channels`: `C`, the number of observed variables.
        - `latent_size`: `D`, the size of the latent state `x(t)`.
        - `units`: width of the hidden layers of both networks.
        - `recognition_depth`: hidden layers of the recognition network (0: linear).
        - `decoder_depth`: hidden layers of the decoder (0: linear).
        - `prior_rate`: the prior's initial decay rate per unit time (it starts
          near `A = -prior_rate I` with a unit stationary covariance; the jobs'
          times are scaled to the training span, so 1 decays over about a span).
        - `prior_drift`: the drift's parametrisation, `"dissipative"` or
          `"hurwitz"` (every stable drift, including paths that first grow and
          then decay; `ctmodels.lgssm.LinearSDE`).
        - `prior_start`: `"stationary"` (each series' first time sees the
          stationary zero-mean process) or `"origin"` (the process starts at time
          0 from a learned Gaussian and its mean moves towards a learned long-run
          mean: a trend over time since the origin; `PriorStart`).
        - `potential_std`: the spread `λ^{-1/2}` of each potential when training
          starts (the precision is `softplus(pre + c)`, `c` set so that `pre = 0`
          gives `1 / potential_std^2`).
        - `obs_std`: the observation noise std (fixed, or its initial value when
          `learn_std`).
        - `learn_std`: learn one noise std per channel.
        - `parallel`: run the message passing by associative scans
          (`ctmodels.lgssm`, `parallel=True`) instead of sequential ones.
        - `key`: a JAX PRNG key.
        """
        C.check_sizes(
            "SVAE", num_channels=(num_channels, 1), latent_size=(latent_size, 1),
            units=(units, 0), recognition_depth=(recognition_depth, 0),
            decoder_depth=(decoder_depth, 0),
        )  # fmt: skip
        if not prior_rate > 0:
            raise ValueError(f"SVAE: prior_rate must be positive, got {prior_rate}.")
        if not potential_std > 0:
            raise ValueError(
                f"SVAE: potential_std must be positive, got {potential_std}."
            )
        if prior_start not in ("stationary", "origin"):
            raise ValueError(
                f"SVAE: prior_start={prior_start!r}; expected 'stationary' or "
                "'origin'."
            )
        log_std = C.initial_log_std(obs_std, learn_std, num_channels)
        kr, kd, kp = jax.random.split(key, 3)
        self.recognition = mlp(
            2 * num_channels, 2 * latent_size, units=units, depth=recognition_depth,
            key=kr,
        )  # fmt: skip
        self.decoder = mlp(
            latent_size, num_channels, units=units, depth=decoder_depth, key=kd
        )
        self.prior = lg.LinearSDE(
            latent_size, rate=prior_rate, drift_form=prior_drift, key=kp
        )
        self.log_std = log_std
        self.start = PriorStart(latent_size) if prior_start == "origin" else None
        self.num_channels = num_channels
        self.latent_size = latent_size
        self.obs_std = obs_std
        self.precision_shift = _softplus_inverse(1.0 / potential_std**2)
        self.parallel = bool(parallel)
        self.hyperparameters = C.record(
            num_channels=num_channels,
            latent_size=latent_size,
            units=units,
            recognition_depth=recognition_depth,
            decoder_depth=decoder_depth,
            prior_rate=prior_rate,
            prior_drift=prior_drift,
            prior_start=prior_start,
            potential_std=potential_std,
            obs_std=obs_std,
            learn_std=learn_std,
            parallel=parallel,
        )

    # ------------------------------------------------------------------ pieces

    def potentials(
        self, batch: Batch
    ) -> tuple[Float[Array, "B T D"], Float[Array, "B T D"], Bool[Array, "B T"]]:
        """The recognition potentials of the context (`batch.mask`): means and
        diagonal precisions `[B, T, D]`, and `[B, T]` where one is present (a time
        with at least one observed channel)."""
        C.check_batch("SVAE", self.num_channels, batch)
        out = apply(self.recognition, C.encoder_inputs(batch))
        mean, pre = jnp.split(out, 2, axis=-1)
        precision = jax.nn.softplus(pre + self.precision_shift)
        return mean, precision, batch.mask.any(axis=-1)

    def _smooth(self, ssm, y, keep, precision):
        """`q(x)` (the smoother's result) and `KL(q || p)` of one series."""
        post = lg.kalman_smoother(ssm, y, keep, parallel=self.parallel)
        lam = jnp.where(keep, precision, 1.0)
        var = jnp.diagonal(post.covs, axis1=-2, axis2=-1)
        # E_q[log N(μ; x, λ^{-1})] per present entry, from the smoothed marginals
        e_log = 0.5 * (jnp.log(lam) - C.LOG_2PI - lam * ((y - post.means) ** 2 + var))
        kl = jnp.sum(jnp.where(keep, e_log, 0.0)) - post.log_likelihood
        return post, kl

    @staticmethod
    def _times(batch: Batch):
        """The batch's times and their `vmap` axis: in the union layout every row
        has the same grid, so the prior is discretised once for the batch (a time
        that is not a row's own is a step without potential, the same as none)."""
        if batch.layout == "union":
            return batch.times[0], None
        return batch.times, 0

    def _smoothed(self, times, axis, mean, precision, present):
        """Smooth every row: `times` `[T]` shared (`axis` None) or `[B, T]`."""
        D = self.latent_size
        if self.start is not None:
            # the process starts at time 0: prepend it as a step without potential
            # (or the series' first time, for a series that starts before it)
            origin = jnp.minimum(times[..., :1], 0.0)
            times = jnp.concatenate([origin, times], axis=-1)

            def pad(x, value):
                first = jnp.full_like(x[:, :1], value)
                return jnp.concatenate([first, x], axis=1)

            mean, precision = pad(mean, 0.0), pad(precision, 1.0)
            present = pad(present, False)
        # every interval of the batch discretised in one call, outside the vmap
        # over rows (under it, discretise's skip of unneeded doublings is lost)
        F, Q = self.prior.transitions(times)
        if self.start is None:
            P0 = self.prior.stationary_cov()
            path = jnp.zeros(F.shape[:-3] + (F.shape[-3] + 1, D), F.dtype)
        else:
            P0 = self.start.initial_cov().astype(F.dtype)
            path = self.start.mean_path(F)

        def row(F, Q, path, mean, precision, present):
            # the potentials observe the deviation z = x - path of a zero-mean
            # process: N(mean; x, Λ^{-1}) = N(mean - path; z, Λ^{-1})
            y, R, keep = lg.pseudo_observations(mean - path, precision, present)
            eye = jnp.eye(D, dtype=R.dtype)
            ssm = lg.LinearGaussianSSM(jnp.zeros(D, R.dtype), P0, F, Q, eye, R)
            post, kl = self._smooth(ssm, y, keep, precision)
            return post, kl, keep

        post, kl, keep = jax.vmap(row, in_axes=(axis, axis, axis, 0, 0, 0))(
            F, Q, path, mean, precision, present
        )
        if self.start is not None:
            path = path if axis == 0 else path[None]
            post, keep = _from_origin(post, path), keep[:, 1:]
        return post, kl, keep

    def posterior(self, batch: Batch) -> SVAEPosterior:
        """`q(x)` of every series of `batch` given its context (`batch.mask`), on
        `batch.times`, with `KL(q || p)`: see `SVAEPosterior`."""
        mean, precision, present = self.potentials(batch)
        times, axis = self._times(batch)
        post, kl, keep = self._smoothed(times, axis, mean, precision, present)
        return SVAEPosterior(post, kl, mean, precision, keep)

    def _bound(self, batch: Batch, key, n_samples, kl_weight):
        """Per series: `(bound [B], expected log-likelihood [B], kl [B], decoded
        draws [K, B, T, C])`."""
        n_samples = C.check_samples(n_samples)
        q = self.posterior(batch)
        xs = _marginal_draws(q.smoothed.means, q.smoothed.covs, key, n_samples)
        pred = apply(self.decoder, xs)  # [K, B, T, C]
        log_std = self._noise_log_std(pred.dtype)
        ll = C.gaussian_log_prob(batch.values, pred, log_std, batch.target_mask)
        ell = ll.mean(0)
        return ell - kl_weight * q.kl, ell, q.kl, pred

    # ------------------------------------------------------------------ public API

    def elbo(
        self, batch: Batch, *, key: PRNGKeyArray, n_samples: int = 1
    ) -> Float[Array, " B"]:
        """The ELBO of each series' target values (`batch.target_mask`) given its
        context, `E_q[log p(y | x)] - KL(q || p)`, the expectation estimated with
        `n_samples` draws from each time's posterior marginal (unbiased).
        **Returns:** `[B]`."""
        return self._bound(batch, key, n_samples, 1.0)[0]

    def loss(
        self,
        batch: Batch,
        *,
        key: PRNGKeyArray,
        n_samples: int = 1,
        kl_weight: float | Array = 1.0,
    ) -> tuple[Float[Array, ""], dict[str, Float[Array, ""]]]:
        """The negative ELBO per target value, and metrics.

        For each series `b`, `bound_b = (1/K) Σ_k log p(y_b | x_k) - β KL(q || p)`
        with `K = n_samples` reparametrised draws `x_k(t)` from each time's
        posterior marginal `q(x(t))` and the KL in closed form (see the class
        docstring), and `β = kl_weight` (KL annealing). The loss is
        `-Σ_b w_b bound_b / Σ_b w_b n_b` (`w` = `batch.weight`, `n_b` the number of
        target values of series `b`), as the latent ODE's.

        **Arguments:**

        - `batch`: a `ctmodels.data.Batch` (`"padded"` or `"union"`).
        - `key`: a JAX PRNG key (the posterior draws).
        - `n_samples`: `K`, the posterior draws per time.
        - `kl_weight`: `β`.

        **Returns:** `(loss, metrics)`: scalars `loss`, `bound` (per series), `nll`
        (Gaussian negative log-likelihood per target value, averaged over draws),
        `kl` (per series), `mse` (of the mean of the decoded draws on the target
        values).
        """
        bound, ell, kl, pred = self._bound(batch, key, n_samples, kl_weight)
        return C.bound_objective(batch, bound=bound, ll=ell, kl=kl, pred=pred)

    def predict(
        self,
        batch: Batch,
        *,
        key: PRNGKeyArray,
        n_samples: int = 10,
        times: Float[ArrayLike, " Q"] | Float[ArrayLike, "B Q"] | None = None,
    ) -> tuple[Float[Array, "B T C"], Float[Array, "B T C"]]:
        """Posterior predictive mean and std given the context `batch.mask`.

        The requested times join each series as steps without a potential (which
        changes nothing elsewhere); `n_samples` draws from the posterior marginal
        are decoded there: the mean is the average decoded value, the std
        `sqrt(Var_k[decoder(x_k(t))] + σ^2)` (the std of the predictive mixture).
        Inside the context this is smoothing, beyond it prediction.

        **Arguments:**

        - `batch`: the context.
        - `key`: a JAX PRNG key.
        - `n_samples`: posterior draws.
        - `times`: where to predict: None (`batch.times`), `[Q]` (the same times for
          every row) or `[B, Q]`; non-decreasing.

        **Returns:** `(mean, std)`, each `[B, T, C]` (`Q` with `times`).
        """
        n_samples = C.check_samples(n_samples)
        mean, precision, present = self.potentials(batch)
        t, axis = self._times(batch)
        where = None
        if times is not None:
            queries = C.query_times(batch, times, ordered=True)
            shared = batch.layout == "union" and jnp.ndim(times) == 1
            packed = jnp.concatenate([mean, precision], axis=-1)
            t, present, packed, where = C.merge_queries(
                batch.times, present, packed, queries
            )
            mean, precision = jnp.split(packed, 2, axis=-1)
            # with shared queries every row's merged grid is the same
            t, axis = (t[0], None) if shared else (t, 0)
        post, _, _ = self._smoothed(t, axis, mean, precision, present)
        m, P = post.means, post.covs
        if where is not None:
            m, P = C.gather_positions(m, where), C.gather_positions(P, where)
        xs = _marginal_draws(m, P, key, n_samples)
        pred = apply(self.decoder, xs)  # [K, B, T, C]
        noise = jnp.exp(2 * self._noise_log_std(pred.dtype))
        return pred.mean(0), jnp.sqrt(pred.var(0) + noise)

    def sample_prior(
        self, times: Float[ArrayLike, " T"], *, key: PRNGKeyArray, n_samples: int = 1
    ) -> Float[Array, "n T C"]:
        """Noise-free sample paths from the prior: `x` from the stationary SDE at
        `times` (non-decreasing), decoded. **Returns:** `[n_samples, T, C]`."""
        n_samples = C.check_samples(n_samples)
        C.check_query_times(times, ordered=True)
        times = jnp.asarray(times)
        if not jnp.issubdtype(times.dtype, jnp.floating):
            times = times.astype(jnp.result_type(float))
        D = self.latent_size
        eye = jnp.eye(D, dtype=times.dtype)
        if self.start is None:
            ssm = self.prior.ssm(times, emission=eye, emission_cov=eye)
            path = jnp.zeros((times.shape[0], D), times.dtype)
        else:  # from the origin (a step without observation), along the mean path
            times = jnp.concatenate([jnp.minimum(times[:1], 0.0), times])
            F, Q = self.prior.transitions(times)
            P0 = self.start.initial_cov().astype(F.dtype)
            ssm = lg.LinearGaussianSSM(jnp.zeros(D, F.dtype), P0, F, Q, eye, eye)
            path = self.start.mean_path(F)
        T = times.shape[0]
        y = jnp.zeros((T, D), times.dtype)
        none = jnp.zeros(T, bool)
        keys = jax.random.split(key, n_samples)
        zs = jax.vmap(lambda k: lg.posterior_sample(ssm, y, none, key=k))(keys)
        xs = zs + path
        if self.start is not None:
            xs = xs[:, 1:]
        return apply(self.decoder, xs)
