"""The latent ODE of Rubanova, Chen & Duvenaud (2019)."""

from __future__ import annotations

from typing import Any, Literal

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, ArrayLike, Float, PRNGKeyArray

from .._errors import error_if
from .._integrate import integrate
from .._references import cites
from ..data import Batch
from ..nn import ODERNNEncoder, apply, mlp
from ..nn._odernn import check_ode_solver
from . import _common as C


def _latent_field(t, y, args):
    """dz/dt = f(z); with a Poisson process also dΛ/dt = λ(z) = exp(g(z)). With a
    `sign` of -1 (None: +1) both are negated: the same ODE solved backwards in
    time, in the reversed time `s = t_anchor - t`."""
    dynamics, intensity, sign = args
    flip = (lambda v: v) if sign is None else (lambda v: sign * v)
    if intensity is None:
        return flip(apply(dynamics, y))
    z, _ = y
    return flip(apply(dynamics, z)), flip(jnp.exp(apply(intensity, z)))


def _at_start(times, t_ref, y, y0):
    """Replace the states at positions whose time is exactly `t_ref` by `y0` (the
    solve's output there is `y0` up to its interpolation's rounding)."""
    hit = (times == t_ref).reshape((-1,) + (1,) * (y.ndim - 1))
    return jnp.where(hit, y0[None], y)


@cites("rubanova2019latent", "burda2016importance")
class LatentODE(C.AbstractLatentModel):
    """Latent ODE for irregularly sampled time series (Rubanova et al., 2019).

    Generative model: `z0 ~ N(0, I)` at the reference time `t_ref`; `dz/dt = f(z)`
    (a tanh MLP, `depth` hidden layers of `units` units) solved through
    `ctmodels.integrate`; `x(t) ~ N(D z(t), obs_std^2)` per channel (`D` linear).
    Optionally each channel's observation times are a Poisson process with intensity
    `λ(z(t)) = exp(g(z(t)))` (`poisson=True`; `∫λ` is integrated alongside `z`), and
    a label `y ~ Categorical(softmax(h(z0)))` (`num_classes > 0`).

    Recognition model `q(z0 | x) = N(μ, diag(σ^2))`: an ODE-RNN (`encoder="odernn"`)
    or a GRU with a time-gap input (`encoder="rnn"`) runs *backwards in time* over
    each series' context (`batch.mask`, input `[x * mask, mask]`), from its last
    observation down to `t_ref`; an MLP maps the final state (with the static
    covariates, if any) to `(μ, σ)`. See `ctmodels.nn.ODERNNEncoder`.

    The reference time `t_ref` is `t0` if given, else the batch's earliest valid time
    (the first time of the union grid, as in the paper's code). With `t0=None` a
    series' result therefore depends on the earliest time in its batch; when all
    series start at the same time (or with a fixed `t0`) it does not.

    `anchor="last"` (not in the paper) places the latent state that the prior and
    `q` describe at each series' *last context observation* `t_a` instead: the
    encoder runs *forwards* in time over the context and stops there, and the latent
    ODE is solved from `z(t_a)` forwards to later times and backwards to earlier
    ones (the same ODE, `dz/dt = f(z)`, in both directions). A prediction after the
    context then starts from a state inferred at its end rather than carried through
    the whole context from its start. Each series has its own `t_a`, so the solve is
    vmapped over rows (two solves each) in every layout, and a series' result never
    depends on its batch. `t0` does not apply; `poisson` works in both.

    Layouts: in the `"union"` layout ONE ODE solve serves the whole batch (the state
    is `[n_samples, B, latent]`, integrated over the shared grid, so the adaptive
    steps are shared, as in the paper's code); in the `"padded"` layout the solve is
    vmapped over rows. Both give the same loss to within the solver's tolerance
    (exactly the same computation when all rows have the same times). With
    `anchor="last"` the solves are per row in both layouts (see above).

    **Attributes:** the submodules `encoder`, `to_z0`, `dynamics`, `decoder`,
    `intensity` (or None), `classifier` (or None), `log_std` (learned noise, or None),
    and `hyperparameters` (the constructor's keyword arguments, for checkpoints).
    """

    encoder: ODERNNEncoder
    to_z0: eqx.nn.MLP
    dynamics: eqx.nn.MLP
    decoder: eqx.nn.MLP
    intensity: eqx.nn.MLP | None
    classifier: eqx.nn.MLP | None
    log_std: Array | None
    num_channels: int = eqx.field(static=True)
    latent_size: int = eqx.field(static=True)
    num_static: int = eqx.field(static=True)
    num_classes: int = eqx.field(static=True)
    solver: Any = eqx.field(static=True)
    adjoint: Any = eqx.field(static=True)
    rtol: float = eqx.field(static=True)
    atol: float = eqx.field(static=True)
    max_steps: int = eqx.field(static=True)
    obs_std: float = eqx.field(static=True)
    std_shift: float = eqx.field(static=True)
    t0: float | None = eqx.field(static=True)
    anchor: str = eqx.field(static=True)
    ce_weight: float = eqx.field(static=True)
    hyperparameters: tuple[tuple[str, Any], ...] = eqx.field(static=True)

    def __init__(
        self,
        num_channels: int,
        *,
        latent_size: int = 6,
        encoder: Literal["odernn", "rnn"] = "odernn",
        encoder_size: int = 20,
        units: int = 100,
        depth: int = 2,
        solver: Any = "dopri5",
        rtol: float = 1e-3,
        atol: float = 1e-4,
        adjoint: Any = "checkpoint",
        max_steps: int = 4096,
        encoder_solver: Any = "euler",
        encoder_steps: int | None = 1,
        obs_std: float = 0.01,
        learn_std: bool = False,
        posterior_std: float = 0.02,
        num_static: int = 0,
        num_classes: int = 0,
        ce_weight: float = 100.0,
        poisson: bool = False,
        t0: float | None = None,
        anchor: Literal["first", "last"] = "first",
        key: PRNGKeyArray,
    ):
        """**Arguments:**

        - `num_channels`: `C`, the number of observed variables.
        - `latent_size`: size of `z` (the paper's default 6).
        - `encoder`: `"odernn"` (ODE-RNN) or `"rnn"` (GRU with a time-gap input).
        - `encoder_size`: size of the encoder's state (the paper's `rec_dims`, 20).
        - `units`: width of every MLP (ODE fields, GRU gates, `q(z0)` head, Poisson
          intensity, classifier); the paper's 100.
        - `depth`: hidden layers of the two ODE vector fields (paper: 2).
        - `solver`, `rtol`, `atol`: the latent ODE's solver (a registry name or a
          Diffrax solver; must be adaptive) and tolerances.
        - `adjoint`, `max_steps`: passed to `ctmodels.integrate` (both ODEs).
        - `encoder_solver`, `encoder_steps`: the ODE-RNN's solver and its fixed number
          of steps between consecutive observations (None: adaptive with
          `rtol`/`atol`). The paper takes Euler steps.
        - `obs_std`: the observation noise std (fixed, or the initial value when
          `learn_std`).
        - `learn_std`: learn one noise std per channel.
        - `posterior_std`: the spread of `q(z0)` when training starts (the `q(z0)`
          head's std is `softplus(pre + c)`, with `c` chosen so that `pre = 0` gives
          this). A wide initial posterior (`softplus(0) = 0.69`) against a small
          `obs_std` makes the sampled trajectories so noisy that the model learns to
          ignore `z0` and predicts the mean (on the periodic toy data it never
          recovered); the paper's code also starts with a small spread.
        - `num_static`: number of static covariates (`batch.static`) fed to the
          `q(z0)` head; 0 ignores `batch.static`.
        - `num_classes`: > 0 adds a classifier of `batch.labels` from `z0`;
          `ce_weight` weights its cross-entropy in the loss (paper: 100).
        - `poisson`: model the observation times as a Poisson process.
        - `t0`: a fixed reference time for `z0` (all times must be `>= t0`); None:
          each batch's earliest time.
        - `anchor`: `"first"` (the paper's model: `z0` at the reference time, the
          encoder run backwards) or `"last"` (the latent state at each series' last
          context observation, the encoder run forwards; see above).
        - `key`: a JAX PRNG key.
        """
        if encoder not in ("odernn", "rnn"):
            raise ValueError(f"encoder must be 'odernn' or 'rnn', got {encoder!r}.")
        if anchor not in ("first", "last"):
            raise ValueError(f"anchor must be 'first' or 'last', got {anchor!r}.")
        if anchor == "last" and t0 is not None:
            raise ValueError(
                f"t0={t0} fixes the time of z0 for anchor='first'; with anchor='last' "
                "the latent state is anchored at each series' last context "
                "observation. Pass t0=None."
            )
        check_ode_solver(solver, None, "LatentODE's solver", steps_arg=None)
        C.check_sizes(
            "LatentODE", num_channels=(num_channels, 1), latent_size=(latent_size, 1),
            encoder_size=(encoder_size, 1), units=(units, 0), depth=(depth, 0),
            num_static=(num_static, 0), num_classes=(num_classes, 0),
        )  # fmt: skip
        log_std = C.initial_log_std(obs_std, learn_std, num_channels)
        ks = jax.random.split(key, 6)
        self.encoder = ODERNNEncoder(
            2 * num_channels,
            encoder_size,
            units=units,
            depth=depth,
            ode=encoder == "odernn",
            solver=encoder_solver,
            steps=encoder_steps,
            adjoint=adjoint,
            rtol=rtol,
            atol=atol,
            max_steps=max_steps,
            key=ks[0],
        )
        self.to_z0 = mlp(
            encoder_size + num_static, 2 * latent_size, units=units, depth=1, key=ks[1]
        )
        self.dynamics = mlp(
            latent_size, latent_size, units=units, depth=depth, key=ks[2]
        )
        self.decoder = mlp(latent_size, num_channels, units=0, depth=0, key=ks[3])
        self.intensity = (
            mlp(latent_size, num_channels, units=units, depth=1, key=ks[4])
            if poisson
            else None
        )
        self.classifier = (
            mlp(latent_size, num_classes, units=units, depth=1, key=ks[5])
            if num_classes > 0
            else None
        )
        self.log_std = log_std
        self.num_channels = num_channels
        self.latent_size = latent_size
        self.num_static = num_static
        self.num_classes = num_classes
        self.solver = solver
        self.adjoint = adjoint
        self.rtol = rtol
        self.atol = atol
        self.max_steps = max_steps
        self.obs_std = obs_std
        self.std_shift = C.posterior_shift(posterior_std)
        self.t0 = t0
        self.anchor = anchor
        self.ce_weight = ce_weight
        self.hyperparameters = C.record(
            num_channels=num_channels,
            latent_size=latent_size,
            encoder=encoder,
            encoder_size=encoder_size,
            units=units,
            depth=depth,
            solver=solver,
            rtol=rtol,
            atol=atol,
            adjoint=adjoint,
            max_steps=max_steps,
            encoder_solver=encoder_solver,
            encoder_steps=encoder_steps,
            obs_std=obs_std,
            posterior_std=posterior_std,
            learn_std=learn_std,
            num_static=num_static,
            num_classes=num_classes,
            ce_weight=ce_weight,
            poisson=poisson,
            t0=t0,
            anchor=anchor,
        )

    # ------------------------------------------------------------------ pieces

    def _check(self, batch: Batch) -> None:
        C.check_batch("LatentODE", self.num_channels, batch)
        if self.num_static > 0:
            if batch.static is None or batch.static.shape[-1] != self.num_static:
                got = None if batch.static is None else batch.static.shape[-1]
                raise ValueError(
                    f"LatentODE was built with num_static={self.num_static} but the "
                    f"batch has {got} static covariates."
                )

    def anchor_times(self, batch: Batch) -> Float[Array, " B"]:
        """The time of the latent state that `posterior` describes, per row: the
        reference time (`anchor="first"`, the same for every row) or each row's last
        context observation (`anchor="last"`; its first valid time if it has none)."""
        if self.anchor == "first":
            t_ref = C.reference_time(batch, self.t0)
            return jnp.broadcast_to(t_ref, (batch.batch_size,))
        observed = batch.mask.any(axis=-1)
        return C.last_observed_time(batch.times, observed, C.first_valid_time(batch))

    def posterior(
        self, batch: Batch, t_ref: ArrayLike | None = None
    ) -> tuple[Float[Array, "B L"], Float[Array, "B L"]]:
        """The mean and std of `q(z0 | context)` for every row of `batch`, `z0` being
        the latent state at `t_ref` (default: the batch's reference time). With
        `anchor="last"` it is the state at each row's last context observation
        (`anchor_times`) and `t_ref` must be None."""
        self._check(batch)
        inputs = C.encoder_inputs(batch)
        observed = batch.mask.any(axis=-1)
        times = batch.times[0] if batch.layout == "union" else batch.times
        if self.anchor == "last":
            if t_ref is not None:
                raise ValueError(
                    "t_ref sets the time of z0 for anchor='first'; with "
                    "anchor='last' it is each row's last context observation."
                )
            first = C.first_observed_time(
                batch.times, observed, C.first_valid_time(batch)
            )
            # forwards in time; the final state is the one at the last update
            h, _, _ = self.encoder(
                times, inputs, observed, t_start=first, reverse=False, outputs=False
            )
        else:
            if t_ref is None:
                t_ref = C.reference_time(batch, self.t0)
            t_start = C.last_observed_time(batch.times, observed, t_ref)
            h, _, _ = self.encoder(
                times,
                inputs,
                observed,
                t_start=t_start,
                t_final=t_ref,
                reverse=True,
                outputs=False,
            )
        if self.num_static > 0:
            h = jnp.concatenate([h, batch.static.astype(h.dtype)], axis=-1)
        return self._posterior_head(h)

    def _posterior_at(self, batch: Batch, start: Array):
        """`posterior` for the latent state at `start` (`anchor_times`, or for
        `anchor="first"` an earlier reference time)."""
        return self.posterior(batch, None if self.anchor == "last" else start[0])

    def _solve(self, z0, t_ref, times, poisson: bool, sign=None):
        """States at `times` [T] (>= t_ref) from `z0` [..., L] at `t_ref`: pytree
        leaves [T, ..., X]. `sign=-1` solves the ODE backwards (`times` are then
        the reversed times `t_anchor - t`)."""
        t_ref = jnp.asarray(t_ref, times.dtype)
        grid, where = C.distinct_times(jnp.concatenate([t_ref[None], times]))
        if poisson:
            y0 = (z0, jnp.zeros(z0.shape[:-1] + (self.num_channels,), z0.dtype))
            args = (self.dynamics, self.intensity, sign)
        else:
            y0, args = z0, (self.dynamics, None, sign)
        sol = integrate(
            _latent_field,
            y0,
            grid,
            args,
            solver=self.solver,
            adjoint=self.adjoint,
            rtol=self.rtol,
            atol=self.atol,
            max_steps=self.max_steps,
        )
        return jax.tree.map(
            lambda y, y0: _at_start(times, t_ref, y[where[1:]], y0), sol.ys, y0
        )

    def _decode(self, z0, t_ref, times, shared: bool, poisson: bool = False):
        """Latent paths `[K, B, T, L]` (and `∫λ` `[K, B, T, C]`) from `z0` `[K, B, L]`.
        `shared`: one solve on `times` ([T], or the first row of [B, T]) for the whole
        batch; else one solve per row of `times` [B, T]."""
        if shared:
            grid = times if times.ndim == 1 else times[0]
            ys = self._solve(z0, t_ref, grid, poisson)
            ys = jax.tree.map(lambda y: jnp.moveaxis(y, 0, 2), ys)
        else:
            solve = lambda z, t: self._solve(z, t_ref, t, poisson)
            ys = jax.vmap(solve, in_axes=(1, 0))(z0, times)  # [B, T, K, X]
            ys = jax.tree.map(lambda y: jnp.moveaxis(y, 2, 0), ys)
        return ys if poisson else (ys, None)

    def _decode_anchored(self, z0, t_a, times, poisson: bool = False):
        """`anchor="last"`: latent paths `[K, B, T, L]` (and `Λ(t) - Λ(t_a)`
        `[K, B, T, C]`) from `z0` `[K, B, L]` at each row's `t_a` [B], at `times`
        ([T] or [B, T]): per row one solve forwards over the times after `t_a` and
        one backwards over those before it, all `2B` solves vmapped together."""
        B = t_a.shape[0]
        tb = jnp.broadcast_to(times, (B, times.shape[-1]))
        ahead = jnp.maximum(tb - t_a[:, None], 0.0)
        behind = jnp.maximum(t_a[:, None] - tb, 0.0)[:, ::-1]
        grids = jnp.concatenate([ahead, behind])  # [2B, T], each non-decreasing
        signs = jnp.concatenate([jnp.ones(B, tb.dtype), -jnp.ones(B, tb.dtype)])
        solve = lambda z, u, sign: self._solve(z, 0.0, u, poisson, sign)
        ys = jax.vmap(solve, in_axes=(1, 0, 0))(
            jnp.concatenate([z0, z0], axis=1), grids, signs
        )  # [2B, T, K, X]
        after = (tb >= t_a[:, None])[:, :, None, None]
        ys = jax.tree.map(
            lambda y: jnp.moveaxis(jnp.where(after, y[:B], y[B:, ::-1]), 2, 0), ys
        )
        return ys if poisson else (ys, None)

    def _paths(self, z0, start, times, shared: bool, poisson: bool = False):
        """Latent paths from `z0` at `start` (`anchor_times`) at `times`."""
        if self.anchor == "last":
            return self._decode_anchored(z0, start, times, poisson)
        return self._decode(z0, start[0], times, shared, poisson)

    # ------------------------------------------------------------------ public API

    def loss(
        self,
        batch: Batch,
        *,
        key: PRNGKeyArray,
        n_samples: int = 3,
        kl_weight: float | Array = 1.0,
        objective: Literal["iwae", "elbo"] = "iwae",
    ) -> tuple[Float[Array, ""], dict[str, Float[Array, ""]]]:
        """Negative IWAE bound (or ELBO) per target value, and metrics.

        For each series `b` with `K = n_samples` samples `z0_k ~ q(z0 | context)`:

        - `"iwae"` (default): `bound_b = log (1/K) Σ_k exp(log p(x_b | z0_k) +
          β (log p(z0_k) - log q(z0_k)))`, the importance-weighted bound of Burda et
          al. (a proper lower bound on `log p(x_b)` for `β = 1`; with `K = 1` it is
          the one-sample ELBO estimate).
        - `"elbo"`: `bound_b = (1/K) Σ_k log p(x_b | z0_k) - β KL(q || N(0, I))`
          with the KL in closed form.

        `log p(x_b | z)` is the Gaussian log-likelihood of the values at
        `batch.target_mask` (plus, with `poisson=True`, the Poisson-process
        log-likelihood of the target observation times of each channel over the
        series' time window: `Σ log λ(t_i) - ∫ λ dt`). `β = kl_weight` (KL
        annealing).

        The returned loss is `-Σ_b w_b bound_b / Σ_b w_b n_b` (`w` = `batch.weight`,
        `n_b` = the number of target values of series `b`): the negative bound per
        target value, so rows of weight 0 do not contribute and the scale does not
        depend on the batch size. With a classifier, `ce_weight` times the mean
        cross-entropy per series (averaged over the `z0` samples) is added.

        **Arguments:**

        - `batch`: a `ctmodels.data.Batch` (`"padded"` or `"union"`).
        - `key`: a JAX PRNG key (the `z0` samples).
        - `n_samples`: `K`.
        - `kl_weight`: `β`.
        - `objective`: `"iwae"` or `"elbo"`.

        **Returns:** `(loss, metrics)`: scalars `loss`, `bound` (per series), `nll`
        (Gaussian negative log-likelihood per target value, averaged over samples),
        `kl` (closed-form KL per series), `mse` (of the posterior mean prediction on
        the target values), and `poisson_ll`, `ce`, `accuracy` where enabled.
        """
        n_samples = C.check_samples(n_samples, objective)
        if self.classifier is not None and batch.labels is None:
            raise ValueError(
                f"LatentODE has a classifier (num_classes={self.num_classes}) but the "
                "batch has no labels."
            )
        start = self.anchor_times(batch)
        mean, std = self._posterior_at(batch, start)
        dtype = mean.dtype
        eps = jax.random.normal(key, (n_samples,) + mean.shape, dtype)
        z0 = mean + std * eps
        poisson = self.intensity is not None
        zs, Lam = self._paths(z0, start, batch.times, batch.layout == "union", poisson)
        pred = apply(self.decoder, zs)  # [K, B, T, C]
        target = batch.target_mask
        ll = C.gaussian_log_prob(batch.values, pred, self._noise_log_std(dtype), target)
        w = batch.weight
        wsum = jnp.maximum(jnp.sum(w), 1e-12)
        pois = None
        if poisson:
            log_lam = apply(self.intensity, zs)  # [K, B, T, C]
            events = jnp.sum(jnp.where(target, log_lam, 0.0), axis=(2, 3))
            T = batch.num_times
            first = jnp.argmax(batch.time_mask, axis=1)
            last = T - 1 - jnp.argmax(batch.time_mask[:, ::-1], axis=1)
            take = lambda i: jnp.take_along_axis(Lam, i[None, :, None, None], axis=2)
            integral = jnp.sum(take(last) - take(first), axis=(2, 3))  # [K, B]
            pois = events - integral
        loss, metrics = C.variational_objective(
            batch,
            mean=mean,
            std=std,
            eps=eps,
            pred=pred,
            ll=ll,
            extra_ll=pois,
            kl_weight=kl_weight,
            objective=objective,
        )
        if poisson:
            metrics["poisson_ll"] = C.weighted_total(pois.mean(0), w) / wsum
        if self.classifier is not None:
            logits = apply(self.classifier, z0)  # [K, B, classes]
            logp = jax.nn.log_softmax(logits, axis=-1)
            labels = batch.labels.astype(jnp.int32)
            picked = jnp.take_along_axis(logp, labels[None, :, None], axis=-1)[..., 0]
            ce = -picked.mean(0)  # [B]
            prob = jnp.exp(logp).mean(0)
            correct = (jnp.argmax(prob, axis=-1) == labels).astype(dtype)
            metrics["ce"] = C.weighted_total(ce, w) / wsum
            metrics["accuracy"] = C.weighted_total(correct, w) / wsum
            loss = loss + self.ce_weight * metrics["ce"]
        metrics["loss"] = loss
        return loss, metrics

    def predict(
        self,
        batch: Batch,
        *,
        key: PRNGKeyArray,
        n_samples: int = 10,
        times: Float[ArrayLike, " T2"] | Float[ArrayLike, "B T2"] | None = None,
    ) -> tuple[Float[Array, "B T C"], Float[Array, "B T C"]]:
        """Posterior predictive mean and std given the context `batch.mask`.

        Draws `n_samples` samples of `z0 ~ q(z0 | context)`, solves the latent ODE
        and decodes: the mean is the average decoded value; the std combines the
        spread over samples with the observation noise,
        `sqrt(Var_k[D z_k(t)] + obs_std^2)` (the std of the predictive mixture).

        **Arguments:**

        - `batch`: the context.
        - `key`: a JAX PRNG key.
        - `n_samples`: posterior samples.
        - `times`: where to predict: None (`batch.times`), `[T2]` (the same times
          for every row, one shared solve with `anchor="first"`) or `[B, T2]`;
          non-decreasing (repeats allowed). Without a fixed `t0`, times before the
          batch's first time move the reference time back to them
          (`anchor="first"`).

        **Returns:** `(mean, std)`, each `[B, T, C]` (`T2` with `times`).
        """
        n_samples = C.check_samples(n_samples)
        start = self.anchor_times(batch)
        if times is None:
            times, shared = batch.times, batch.layout == "union"
        else:
            C.check_query_times(times, ordered=True)
            times = jnp.asarray(times, batch.times.dtype)
            if times.ndim not in (1, 2) or (
                times.ndim == 2 and times.shape[0] != batch.batch_size
            ):
                raise ValueError(
                    f"times must be [T] or [{batch.batch_size}, T], got shape "
                    f"{times.shape}."
                )
            shared = times.ndim == 1
            if self.t0 is None and self.anchor == "first":
                start = jnp.minimum(start, jnp.min(times))
            elif self.t0 is not None:
                start = error_if(
                    start,
                    jnp.any(times < self.t0),
                    f"A requested time is before t0={self.t0}, the time of the "
                    "initial latent state: predict at times >= t0 (or build the "
                    "model with t0=None).",
                )
        mean, std = self._posterior_at(batch, start)
        eps = jax.random.normal(key, (n_samples,) + mean.shape, mean.dtype)
        zs, _ = self._paths(mean + std * eps, start, times, shared)
        return self._predictive(apply(self.decoder, zs))

    def sample_prior(
        self, times: Float[ArrayLike, " T"], *, key: PRNGKeyArray, n_samples: int = 1
    ) -> Float[Array, "n T C"]:
        """Noise-free sample paths from the prior: `z0 ~ N(0, I)` at `times[0]`,
        decoded at `times` (non-decreasing); with `anchor="last"` too (a series
        without context is anchored at its first time). **Returns:**
        `[n_samples, T, C]`."""
        n_samples = C.check_samples(n_samples)
        C.check_query_times(times, ordered=True)
        times = jnp.asarray(times)
        if not jnp.issubdtype(times.dtype, jnp.floating):
            times = times.astype(jnp.result_type(float))
        z0 = jax.random.normal(key, (n_samples, self.latent_size), times.dtype)
        zs = self._solve(z0, times[0], times, False)  # [T, n, L]
        return jnp.moveaxis(apply(self.decoder, zs), 0, 1)
