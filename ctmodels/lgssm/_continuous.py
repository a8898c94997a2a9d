"""The continuous-time linear-Gaussian prior dx = A x dt + L dW, discretised exactly
over arbitrary intervals (matrix exponential; Van Loan 1978 for the noise)."""

from __future__ import annotations

import math

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, ArrayLike, Float, PRNGKeyArray

from .._references import cites
from ._model import LinearGaussianSSM, symmetrise

# 32 doublings cover |block|_1 dt <= 2^30, far beyond any interval a float32 model
# resolves; iterations past the largest interval's count are skipped, so the cap
# costs nothing (it did when every interval ran all of them, masked: an SVAE step
# on pbcseq took 86 ms with 32 against 44 ms with 6).
_MAX_DOUBLINGS = 32
_TAYLOR_DEGREE = 12


def _check_square(name, a, D=None):
    if a.ndim != 2 or a.shape[0] != a.shape[1] or (D is not None and a.shape[0] != D):
        want = "a square matrix [D, D]" if D is None else f"shape {(D, D)}"
        raise ValueError(
            f"ctmodels.lgssm: `{name}` has shape {a.shape}; expected {want}."
        )


@cites("vanloan1978computing")
def discretise(
    drift: Float[ArrayLike, "D D"],
    diffusion_cov: Float[ArrayLike, "D D"],
    intervals: Float[ArrayLike, " N"],
) -> tuple[Float[Array, "N D D"], Float[Array, "N D D"]]:
    """The exact discretisation of `dx = A x dt + L dW` over each interval `Δt`:
    `x(t + Δt) = F x(t) + N(0, Q)` with `F = expm(A Δt)` and
    `Q = ∫_0^Δt expm(A s) L L^T expm(A s)^T ds`, from the matrix exponential of the
    block matrix `[[A, L L^T], [0, -A^T]] h` (Van Loan, 1978), whose top-left block
    is `F_h` and top-right block `Q_h F_h^{-T}`; with `h` small (below), that
    exponential is a Taylor polynomial of degree 12, exact to rounding.

    The block's lower-right `expm(-A^T h)` grows where the process decays, so over an
    interval long against the decay time `Q_h F_h^{-T}` is huge, `F_h` tiny, and
    their product has lost every digit: Van Loan's method over the whole interval
    breaks down (float64: `Q` of order `1e8` instead of `1` at 20 decay times). So
    the block exponential is taken over `h = Δt / 2^s`, with `s` the smallest integer
    making the block's 1-norm times `h` at most `1/4`, and `s` exact doublings
    `F_{2h} = F_h F_h`, `Q_{2h} = F_h Q_h F_h^T + Q_h` (sums of positive
    semi-definite terms) bring it to `Δt`, at most 32 of them (enough for
    `‖block‖_1 Δt` up to `2^30`). A differentiable loop has a fixed length, so the
    loop runs 32 iterations, each masked past an interval's own `s`, and each
    skipped (a `lax.cond`) past the largest `s` of all the intervals: the cost is
    the longest interval's doublings, not the cap's. Discretise many intervals in
    one call rather than under `jax.vmap`, which turns the skip into a select. `Q`
    is symmetrised at every step. Exact for any `Δt >= 0` up to that bound (no time
    grid; `Δt = 0` gives `F = I`, `Q = 0`) and differentiable.

    **Arguments:**

    - `drift`: `A`, `[D, D]`.
    - `diffusion_cov`: `L L^T`, `[D, D]` (symmetric positive semi-definite).
    - `intervals`: the `Δt`, `[N]`.

    **Returns:**

    `(F, Q)`, each `[N, D, D]`.
    """
    A = jnp.asarray(drift)
    Qc = jnp.asarray(diffusion_cov)
    dts = jnp.asarray(intervals)
    _check_square("drift", A)
    D = A.shape[0]
    _check_square("diffusion_cov", Qc, D)
    if dts.ndim != 1:
        raise ValueError(
            f"ctmodels.lgssm: `intervals` has shape {dts.shape}; expected a vector "
            "[N] of time steps (for one interval, pass jnp.array([dt]))."
        )
    return _van_loan_doubling(A, Qc, dts)


def _expm_taylor(M):
    """`expm(M)` for `|M|_1 <= 1/4`: the Taylor polynomial of degree 12 by Horner's
    rule (remainder below `0.25^13 / 13! ≈ 2e-18`, under float64 rounding)."""
    eye = jnp.eye(M.shape[0], dtype=M.dtype)
    E = eye
    for k in range(_TAYLOR_DEGREE, 0, -1):
        E = eye + (M @ E) / k
    return E


@jax.jit
def _van_loan_doubling(A, Qc, dts):
    D = A.shape[0]
    dtype = jnp.result_type(A, Qc, dts, jnp.float32)
    A, Qc, dts = A.astype(dtype), Qc.astype(dtype), dts.astype(dtype)
    block = jnp.block([[A, Qc], [jnp.zeros_like(A), -A.T]])
    norm = jnp.max(jnp.sum(jnp.abs(block), axis=0))  # its 1-norm
    # Van Loan on h = dt / 2^s with |block h|_1 <= 1/4, then s doublings
    s = jnp.ceil(jnp.log2(jnp.maximum(4 * norm * dts, 1.0)))
    s = jnp.minimum(s, _MAX_DOUBLINGS)
    E = jax.vmap(lambda h: _expm_taylor(block * h))(dts / 2.0**s)
    F = E[:, :D, :D]
    Q = symmetrise(E[:, :D, D:] @ jnp.swapaxes(F, -1, -2))
    # every interval runs the same iterations (masked past its own `s`), but only
    # as many as the longest needs: the loop has a fixed length (differentiable),
    # and an iteration beyond every interval's `s` is skipped by a `cond` on the
    # largest `s` (a scalar, unless `discretise` itself is vmapped, where the
    # `cond` becomes a select and every iteration runs: discretise a batch's
    # intervals in one call instead, as `LinearSDE.transitions` does)
    most = jnp.max(s, initial=0.0)

    def double(carry, i):
        def run(carry):
            F, Q = carry
            Ft = jnp.swapaxes(F, -1, -2)
            F2, Q2 = F @ F, symmetrise(F @ Q @ Ft + Q)
            take = (i < s)[:, None, None]
            return jnp.where(take, F2, F), jnp.where(take, Q2, Q)

        return jax.lax.cond(i < most, run, lambda c: c, carry), None

    (F, Q), _ = jax.lax.scan(double, (F, Q), jnp.arange(_MAX_DOUBLINGS))
    return F, Q


def stationary_cov(
    drift: Float[ArrayLike, "D D"], diffusion_cov: Float[ArrayLike, "D D"]
) -> Float[Array, "D D"]:
    """The stationary covariance `P` of `dx = A x dt + L dW`: the solution of the
    Lyapunov equation `A P + P A^T + L L^T = 0`, by one dense solve of size `D^2`
    (`A` must be stable, all eigenvalues with negative real part, as
    `ctmodels.lgssm.LinearSDE`'s parametrisation ensures). Symmetrised.

    **Arguments:**

    - `drift`: `A`, `[D, D]`.
    - `diffusion_cov`: `L L^T`, `[D, D]`.

    **Returns:**

    `P`, `[D, D]`.
    """
    A = jnp.asarray(drift)
    Qc = jnp.asarray(diffusion_cov)
    _check_square("drift", A)
    D = A.shape[0]
    _check_square("diffusion_cov", Qc, D)
    return _lyapunov(A, Qc)


@jax.jit
def _lyapunov(A, Qc):
    D = A.shape[0]
    eye = jnp.eye(D, dtype=A.dtype)
    op = jnp.kron(A, eye) + jnp.kron(eye, A)
    P = jnp.linalg.solve(op, -Qc.reshape(-1)).reshape(D, D)
    return symmetrise(P)


def _softplus_inverse(x: float) -> float:
    return math.log(math.expm1(x))


@cites("vanloan1978computing")
class LinearSDE(eqx.Module):
    """A continuous-time linear-Gaussian prior `dx = A x dt + L dW` (a
    multivariate Ornstein-Uhlenbeck process), stable by construction, discretised
    exactly at arbitrary times (`ctmodels.lgssm.discretise`; Van Loan, 1978).

    Parametrisation (every parameter value gives a valid model, so an optimiser can
    move freely):

    - drift, `drift_form="dissipative"` (default): `A = W = -(S S^T + eps I) +
      (K - K^T)`. Its symmetric part is negative definite, so every solution
      decays in the Euclidean norm (all eigenvalues of `A` have real part at most
      `-eps`), the stationary covariance exists, and the skew part lets it
      oscillate. This excludes stable dynamics whose solutions first grow
      (non-normal `A`: a level with a velocity, a Matérn-3/2-like smooth path with
      most time scales);
    - drift, `drift_form="hurwitz"`: `A = W M` with `M = N N^T + eps I` positive
      definite. Still stable (`A M^{-1} + M^{-1} A^T = W + W^T` is negative
      definite, so `M^{-1}` is a Lyapunov matrix), and every stable matrix has
      this form (take `M` the inverse of a Lyapunov solution): the whole set of
      stable drifts, decaying in the norm `M^{-1}` rather than the Euclidean one;
      `N` starts at the identity, so at initialisation it equals the dissipative
      form;
    - diffusion `L` lower triangular with a positive diagonal (`softplus` of the
      raw diagonal), so `L L^T` is positive definite.

    **Fields:** `drift_factor` (`S`), `drift_skew` (`K`), `diffusion_raw` (the
    strict lower triangle of `L` and its diagonal before `softplus`), all
    `[D, D]`; `drift_metric` (`N`, `[D, D]`, or None for the dissipative form);
    `eps` (static).
    """

    drift_factor: Float[Array, "D D"]
    drift_skew: Float[Array, "D D"]
    diffusion_raw: Float[Array, "D D"]
    drift_metric: Float[Array, "D D"] | None
    eps: float = eqx.field(static=True)

    def __init__(
        self,
        latent_size: int,
        *,
        rate: float = 1.0,
        eps: float = 1e-3,
        scale: float = 0.1,
        drift_form: str = "dissipative",
        key: PRNGKeyArray,
    ):
        """**Arguments:**

        - `latent_size`: `D`.
        - `rate`: the initial decay rate; the model starts near `A = -rate I` and
          `L L^T = 2 rate I`, i.e. a unit stationary covariance.
        - `eps`: the smallest decay rate the parametrisation allows (static).
        - `scale`: the size of the random perturbation of `S` and `K` at
          initialisation (breaks the symmetry between latent dimensions).
        - `drift_form`: `"dissipative"` (default) or `"hurwitz"` (every stable
          drift; see above).
        - `key`: a JAX PRNG key.
        """
        if drift_form not in ("dissipative", "hurwitz"):
            raise ValueError(
                f"ctmodels.lgssm.LinearSDE: drift_form={drift_form!r}; expected "
                "'dissipative' or 'hurwitz'."
            )
        if latent_size < 1:
            raise ValueError(
                f"ctmodels.lgssm.LinearSDE: latent_size={latent_size}; expected a "
                "positive integer."
            )
        if not rate > 0 or not eps > 0:
            raise ValueError(
                f"ctmodels.lgssm.LinearSDE: rate={rate}, eps={eps}; both must be "
                "positive."
            )
        D = latent_size
        ks, kk = jax.random.split(key)
        noise = scale / math.sqrt(D)
        eye = jnp.eye(D)
        self.drift_factor = math.sqrt(rate) * eye + noise * jax.random.normal(
            ks, (D, D)
        )
        self.drift_skew = noise * jax.random.normal(kk, (D, D))
        self.diffusion_raw = _softplus_inverse(math.sqrt(2 * rate)) * eye
        self.drift_metric = (
            math.sqrt(max(1.0 - eps, 0.0)) * eye if drift_form == "hurwitz" else None
        )
        self.eps = float(eps)

    @property
    def drift_form(self) -> str:
        return "dissipative" if self.drift_metric is None else "hurwitz"

    @property
    def latent_size(self) -> int:
        return self.drift_factor.shape[0]

    def drift(self) -> Float[Array, "D D"]:
        """`A = -(S S^T + eps I) + (K - K^T)`, times `N N^T + eps I` in the
        Hurwitz form, `[D, D]`."""
        S, K = self.drift_factor, self.drift_skew
        eye = jnp.eye(S.shape[0], dtype=S.dtype)
        W = -(S @ S.T + self.eps * eye) + (K - K.T)
        if self.drift_metric is None:
            return W
        N = self.drift_metric
        return W @ (N @ N.T + self.eps * eye)

    def diffusion(self) -> Float[Array, "D D"]:
        """`L`, lower triangular with a positive diagonal, `[D, D]`."""
        raw = self.diffusion_raw
        return jnp.tril(raw, -1) + jnp.diag(jax.nn.softplus(jnp.diagonal(raw)))

    def diffusion_cov(self) -> Float[Array, "D D"]:
        """`L L^T`, `[D, D]`."""
        L = self.diffusion()
        return L @ L.T

    def stationary_cov(self) -> Float[Array, "D D"]:
        """The stationary covariance (`ctmodels.lgssm.stationary_cov`), `[D, D]`."""
        return stationary_cov(self.drift(), self.diffusion_cov())

    def discretise(
        self, intervals: Float[ArrayLike, " N"]
    ) -> tuple[Float[Array, "N D D"], Float[Array, "N D D"]]:
        """`(F, Q)` over each interval (`ctmodels.lgssm.discretise`), each
        `[N, D, D]`."""
        return discretise(self.drift(), self.diffusion_cov(), intervals)

    def transitions(
        self, times: Float[ArrayLike, "*B T"]
    ) -> tuple[Float[Array, "*B T-1 D D"], Float[Array, "*B T-1 D D"]]:
        """`(F, Q)` over each interval between consecutive `times`, for one series
        `[T]` or a batch `[..., T]` at once (one `discretise` call for every
        interval of the batch, which is cheaper than `jax.vmap` over series: see
        `ctmodels.lgssm.discretise`).

        **Arguments:**

        - `times`: `[..., T]`, non-decreasing along the last axis (repeated times
          give `F = I`, `Q = 0`).

        **Returns:** `(F, Q)`, each `[..., T-1, D, D]`.
        """
        times = jnp.asarray(times)
        if times.ndim < 1 or times.shape[-1] < 1:
            raise ValueError(
                f"ctmodels.lgssm.LinearSDE.transitions: `times` has shape "
                f"{times.shape}; expected [..., T] with T >= 1."
            )
        intervals = jnp.diff(times, axis=-1)
        intervals = eqx.error_if(
            intervals,
            intervals < 0,
            "ctmodels.lgssm.LinearSDE: `times` decrease; they must be "
            "non-decreasing (for padded series repeat the last time and mask it).",
        )
        F, Q = self.discretise(intervals.reshape(-1))
        D = self.latent_size
        shape = intervals.shape + (D, D)
        return F.reshape(shape), Q.reshape(shape)

    def ssm(
        self,
        times: Float[ArrayLike, " T"],
        *,
        emission: Float[ArrayLike, "C D"] | Float[ArrayLike, "T C D"],
        emission_cov: Float[ArrayLike, "C C"] | Float[ArrayLike, "T C C"],
        initial_mean: Float[ArrayLike, " D"] | None = None,
        initial_cov: Float[ArrayLike, "D D"] | None = None,
    ) -> LinearGaussianSSM:
        """The state-space model of this prior observed at `times`, one step per
        time, one transition per interval (irregular times need no grid).

        **Arguments:**

        - `times`: `[T]`, non-decreasing (repeated times are allowed: a zero
          interval is the identity). For padded series, repeat the last time over
          the padding and mask it.
        - `emission`, `emission_cov`: `H` and `R` (see
          `ctmodels.lgssm.LinearGaussianSSM`).
        - `initial_mean`: the mean of `x` at `times[0]`; default zero.
        - `initial_cov`: its covariance; default the stationary covariance, i.e.
          the process started long before `times[0]`.

        **Returns:**

        A `ctmodels.lgssm.LinearGaussianSSM`.
        """
        times = jnp.asarray(times)
        if times.ndim != 1 or times.shape[0] < 1:
            raise ValueError(
                f"ctmodels.lgssm.LinearSDE.ssm: `times` has shape {times.shape}; "
                "expected a non-empty vector [T]. For a batch of series, jax.vmap "
                "(or `transitions` for all of the batch's intervals at once)."
            )
        F, Q = self.transitions(times)
        D = self.latent_size
        dtype = F.dtype
        m0 = jnp.zeros(D, dtype) if initial_mean is None else initial_mean
        P0 = self.stationary_cov() if initial_cov is None else initial_cov
        return LinearGaussianSSM(m0, P0, F, Q, emission, emission_cov)
