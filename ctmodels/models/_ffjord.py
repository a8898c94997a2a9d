"""FFJORD continuous normalizing flows (Grathwohl et al., 2019) with the RNODE
regularisers (Finlay et al., 2020)."""

from __future__ import annotations

import math
from typing import Any, Literal

import diffrax
import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, PRNGKeyArray

from .. import _devices, _errors
from .._integrate import _evals_per_step, integrate
from .._references import cites
from ..nn import CNFField
from ..nn._cnf import ACTIVATIONS, hutchinson_divergence, probe
from ..nn._odernn import check_ode_solver
from ..solvers import _registry
from . import _common as C

#: `trace="auto"` trains with the exact trace up to this many dimensions.
EXACT_TRACE_MAX_DIM = 16

_LOG_2PI = math.log(2.0 * math.pi)
_UNIT = np.array([0.0, 1.0])
_UNIT_BACK = np.array([1.0, 0.0])


class _Dynamics(eqx.Module):
    """The augmented CNF dynamics in the rescaled time `s ∈ [0, 1]` of one block with
    end time `T`: `dx/ds = T f(sT, x)`, `d logdet/ds = tr(T ∂f/∂x)` and, where asked,
    the RNODE rates `dE/ds = T ‖f‖²` (kinetic energy) and `dJ/ds = T ‖∂f/∂x‖²_F`
    (Jacobian Frobenius norm), so `E = ∫₀ᵀ ‖f‖² dt` and `J = ∫₀ᵀ ‖∂f/∂x‖²_F dt`."""

    field: CNFField
    trace: str = eqx.field(static=True)  # "exact" | "hutchinson"
    kinetic: bool = eqx.field(static=True)
    jacobian: bool = eqx.field(static=True)


def _augmented_field(s, y, args):
    """Module level, so that repeated solves share Diffrax's compilation cache; the
    parameters come in `args`, so every adjoint differentiates them."""
    dyn, end, eps = args
    x = y["x"]

    def fn(v):
        return end * dyn.field(s * end, v)

    if dyn.trace == "exact":
        # the Jacobian carried through the layers, no nested AD (CNFField.divergence)
        dx, trace, frob = dyn.field.divergence(s * end, x)
        dx, trace, frob = end * dx, end * trace, jnp.square(end) * frob
    else:
        dx, trace, frob = hutchinson_divergence(fn, x, eps)
    out = {"x": dx, "logdet": trace}
    if dyn.kinetic:
        out["kinetic"] = jnp.sum(jnp.square(dx), axis=-1) / end
    if dyn.jacobian:
        out["jacobian"] = frob / end
    return out


def _plain_field(s, x, args):
    """`dx/ds = T f(sT, x)` alone (sampling: no log-density, no regularisers)."""
    field, end = args
    return end * field(s * end, x)


@cites("grathwohl2019ffjord", "finlay2020train", "kidger2021hey", "chen2018neural")
class FFJORD(eqx.Module):
    """A continuous normalizing flow, FFJORD (Grathwohl et al., 2019), with the RNODE
    regularisers of Finlay et al. (2020).

    The flow maps a data point `x` to a base point `z ~ N(0, I)` through `blocks`
    stacked CNF blocks; block `k` solves `dx/dt = f_k(t, x)` on `[0, T_k]` (`f_k` a
    [`ctmodels.nn.CNFField`][] of ConcatSquash layers, `T_k` a learnable end time) and
    the change of variables gives

    `log p(x) = log N(z; 0, I) + Σ_k ∫₀^{T_k} tr(∂f_k/∂x) dt`.

    Every solve integrates the whole batch as one state `(x [B, D], logdet [B],
    regularisers [B])`, in the rescaled time `s = t / T_k ∈ [0, 1]` (so `T_k` is an
    ordinary parameter for every adjoint), through [`ctmodels.integrate`][] (any
    registered ODE solver and adjoint, by name or value). The divergence is the exact
    trace (the Jacobian carried through the layers: `CNFField.divergence`) or
    Hutchinson's estimate `εᵀ(∂f/∂x)ε` (one vector-Jacobian product per evaluation;
    the probe `ε`, Gaussian or Rademacher, is drawn once per solve and fixed over
    it). The RNODE terms, the
    kinetic energy `∫‖f‖² dt` and the Jacobian Frobenius norm `∫‖∂f/∂x‖²_F dt`
    (exact with the exact trace, else Hutchinson's `‖εᵀ ∂f/∂x‖²` from the same
    product), are integrated in the same solve, only when their weight is > 0.

    Images (`levels` given): the data are grey levels in `{0, …, levels − 1}`; the
    loss dequantises them with uniform noise, `v = x + u`, `u ~ U[0, 1)^D`, and the
    flow models the logit `s = logit(α + (1 − 2α) v / levels)`; the log-determinants
    of both maps are counted, so `log_prob` is the density of `v` on `[0, levels)^D`
    and the NLL is the usual dequantised bound, in nats per sample and bits per
    dimension.

    **Attributes:** `field` (the blocks' [`ctmodels.nn.CNFField`][]s stacked: every
    array has a leading block axis, and the blocks are solved in a `lax.scan`, so one
    compiled solve serves any number of blocks),
    `sqrt_end_times` (`T_k = sqrt_end_times[k]²`), `inference` (set by
    `equinox.nn.inference_mode`: the loss then uses the exact trace and no
    regularisers, as for validation), and `hyperparameters` (the constructor's
    keyword arguments, for checkpoints).
    """

    field: CNFField
    sqrt_end_times: Float[Array, " blocks"]
    inference: bool
    dim: int = eqx.field(static=True)
    trace: str = eqx.field(static=True)
    noise: str = eqx.field(static=True)
    learn_end_time: bool = eqx.field(static=True)
    kinetic_weight: float = eqx.field(static=True)
    jacobian_weight: float = eqx.field(static=True)
    solver: Any = eqx.field(static=True)
    rtol: float = eqx.field(static=True)
    atol: float = eqx.field(static=True)
    adjoint: Any = eqx.field(static=True)
    max_steps: int = eqx.field(static=True)
    levels: int | None = eqx.field(static=True)
    logit_alpha: float = eqx.field(static=True)
    hyperparameters: tuple[tuple[str, Any], ...] = eqx.field(static=True)

    def __init__(
        self,
        dim: int,
        *,
        width: int = 64,
        depth: int = 3,
        blocks: int = 1,
        activation: Literal["tanh", "softplus", "elu", "swish"] = "tanh",
        trace: Literal["auto", "exact", "hutchinson"] = "auto",
        noise: Literal["rademacher", "gaussian"] = "rademacher",
        end_time: float = 0.5,
        learn_end_time: bool = True,
        kinetic_weight: float = 0.0,
        jacobian_weight: float = 0.0,
        solver: Any = "dopri5",
        rtol: float = 1e-5,
        atol: float = 1e-5,
        adjoint: Any = "checkpoint",
        max_steps: int = 4096,
        levels: int | None = None,
        logit_alpha: float = 1e-6,
        key: PRNGKeyArray,
    ):
        """**Arguments:**

        - `dim`: `D`, the data dimension (images: flattened, e.g. 64 for 8×8).
        - `width`, `depth`: hidden units and hidden layers of each block's field
          (the paper's 2-D models: 64 units, 3 layers).
        - `blocks`: number of stacked CNF blocks.
        - `activation`: the fields' activation (`"tanh"`, `"softplus"`, `"elu"`,
          `"swish"`).
        - `trace`: the divergence used in training: `"exact"`, `"hutchinson"`, or
          `"auto"` (exact up to 16 dimensions). `log_prob` and validation use the
          exact trace.
        - `noise`: Hutchinson's probe, `"rademacher"` (default; lower variance) or
          `"gaussian"`.
        - `end_time`: each block's initial end time `T` (the paper's 0.5).
        - `learn_end_time`: learn `T` (default) or keep it fixed.
        - `kinetic_weight`, `jacobian_weight`: weights of the RNODE kinetic-energy
          and Jacobian-Frobenius terms in the loss (0: not computed).
        - `solver`, `rtol`, `atol`: an adaptive ODE solver (registry name or Diffrax
          value) and its tolerances (the paper's dopri5, 1e-5).
        - `adjoint`, `max_steps`: passed to `ctmodels.integrate` (`"checkpoint"`,
          `"backsolve"`, `"direct"` or a Diffrax adjoint). `"backsolve"` by name
          controls the adjoint solve's steps by the state and its adjoint only
          (`diffrax.adjoint_rms_seminorm`; the parameters' adjoints are integrals
          that need no error control), which saves steps.
        - `levels`: None for continuous data; for images, the number of grey levels
          (256 for 8-bit images, 17 for the 0..16 digits): turns on uniform
          dequantisation and the logit transform (see above).
        - `logit_alpha`: `α` of the logit transform (images only).
        - `key`: a JAX PRNG key.
        """
        C.check_sizes(
            "FFJORD", dim=(dim, 1), width=(width, 1), depth=(depth, 0),
            blocks=(blocks, 1), max_steps=(max_steps, 1),
        )  # fmt: skip
        if trace not in ("auto", "exact", "hutchinson"):
            raise ValueError(
                f"FFJORD: trace must be 'auto', 'exact' or 'hutchinson', got {trace!r}."
            )
        if noise not in ("rademacher", "gaussian"):
            raise ValueError(
                f"FFJORD: noise must be 'rademacher' or 'gaussian', got {noise!r}."
            )
        if activation not in ACTIVATIONS:
            raise ValueError(
                f"FFJORD: activation must be one of {', '.join(map(repr, ACTIVATIONS))}"
                f", got {activation!r}."
            )
        for name, v in (("end_time", end_time), ("rtol", rtol), ("atol", atol)):
            if not (isinstance(v, int | float) and math.isfinite(v) and v > 0):
                raise ValueError(f"FFJORD: {name} must be a number > 0, got {v!r}.")
        for name, v in (
            ("kinetic_weight", kinetic_weight),
            ("jacobian_weight", jacobian_weight),
        ):
            if not (isinstance(v, int | float) and math.isfinite(v) and v >= 0):
                raise ValueError(f"FFJORD: {name} must be a number >= 0, got {v!r}.")
        if levels is not None:
            C.check_sizes("FFJORD", levels=(levels, 2))
            if not 0 < logit_alpha < 0.5:
                raise ValueError(
                    f"FFJORD: logit_alpha must be in (0, 0.5), got {logit_alpha!r}."
                )
        check_ode_solver(solver, None, "FFJORD's solver", steps_arg=None)

        keys = jax.random.split(key, blocks)
        self.field = eqx.filter_vmap(
            lambda k: CNFField(
                dim, width=width, depth=depth, activation=activation, key=k
            )
        )(keys)
        self.sqrt_end_times = jnp.full((blocks,), math.sqrt(end_time))
        self.inference = False
        self.dim = dim
        self.trace = (
            ("exact" if dim <= EXACT_TRACE_MAX_DIM else "hutchinson")
            if trace == "auto"
            else trace
        )
        self.noise = noise
        self.learn_end_time = learn_end_time
        self.kinetic_weight = float(kinetic_weight)
        self.jacobian_weight = float(jacobian_weight)
        self.solver = solver
        self.rtol = rtol
        self.atol = atol
        self.adjoint = adjoint
        self.max_steps = max_steps
        self.levels = levels
        self.logit_alpha = float(logit_alpha)
        self.hyperparameters = C.record(
            dim=dim,
            width=width,
            depth=depth,
            blocks=blocks,
            activation=activation,
            trace=trace,
            noise=noise,
            end_time=end_time,
            learn_end_time=learn_end_time,
            kinetic_weight=kinetic_weight,
            jacobian_weight=jacobian_weight,
            solver=solver,
            rtol=rtol,
            atol=atol,
            adjoint=adjoint,
            max_steps=max_steps,
            levels=levels,
            logit_alpha=logit_alpha,
        )

    # ------------------------------------------------------------------ pieces

    @property
    def blocks(self) -> int:
        """The number of stacked CNF blocks."""
        return self.sqrt_end_times.shape[0]

    @property
    def end_times(self) -> Float[Array, " blocks"]:
        """Each block's end time `T_k = sqrt_end_times[k]²`."""
        s = self.sqrt_end_times
        if not self.learn_end_time:
            s = jax.lax.stop_gradient(s)
        return jnp.square(s)

    def _check(self, x, what: str = "x") -> Array:
        x = jnp.asarray(x)
        if not jnp.issubdtype(x.dtype, jnp.floating):
            x = x.astype(jnp.result_type(float))
        if x.ndim < 1 or x.shape[-1] != self.dim:
            raise ValueError(
                f"FFJORD was built for dim={self.dim} but {what} has shape {x.shape}; "
                f"pass points as an array [..., {self.dim}] (flatten images first)."
            )
        return x

    def _solve_opts(self):
        adjoint = self.adjoint
        if isinstance(adjoint, str) and adjoint == "backsolve":
            # the adjoint ODE's step sizes from the state and its adjoint alone: the
            # parameters' adjoints are integrals, not part of the dynamics, so they
            # need no error control (Kidger, Chen & Lyons, 2021)
            controller = diffrax.PIDController(
                rtol=self.rtol, atol=self.atol, norm=diffrax.adjoint_rms_seminorm
            )
            adjoint = diffrax.BacksolveAdjoint(stepsize_controller=controller)
        return dict(
            solver=self.solver,
            adjoint=adjoint,
            rtol=self.rtol,
            atol=self.atol,
            max_steps=self.max_steps,
        )

    def _backward_evals_per_step(self) -> tuple[int, int] | None:
        """`(per attempted step, at the start)`: the vector-field VJPs of a solve's
        backward pass, where the gradient engine fixes them by the forward solve: the
        discretise-then-optimise adjoints (`"checkpoint"`, `"direct"`) differentiate
        every stage of every attempted step once, and the first-same-as-last stage
        of the start (Hairer's starting-step evaluations are not differentiated).
        None for the continuous adjoint (`"backsolve"`: Diffrax's backward solve
        does not report its steps) and for implicit steppers (Newton iterations)."""
        adjoint, _ = _registry.resolve(self.adjoint, "adjoint")
        discrete = diffrax.RecursiveCheckpointAdjoint | diffrax.DirectAdjoint
        if not isinstance(adjoint, discrete):
            return None
        solver, _ = _registry.resolve(self.solver, "ode")
        return _evals_per_step(solver)

    def _preprocess(self, v):
        """Image data `v ∈ [0, levels)`: the logit `s` and `log|ds/dv|` per row;
        identity (log-determinant 0) for continuous data."""
        if self.levels is None:
            return v, jnp.zeros(v.shape[:-1], v.dtype)
        a = self.logit_alpha
        p = a + (1 - 2 * a) * v / self.levels
        s = jnp.log(p) - jnp.log1p(-p)
        per_dim = math.log((1 - 2 * a) / self.levels) - jnp.log(p) - jnp.log1p(-p)
        return s, jnp.sum(per_dim, axis=-1)

    def _postprocess(self, s):
        """Inverse of `_preprocess`: logit space -> data space."""
        if self.levels is None:
            return s
        a = self.logit_alpha
        v = (jax.nn.sigmoid(s) - a) / (1 - 2 * a) * self.levels
        # logits beyond logit(α) or logit(1 - α) map outside the data range
        return jnp.clip(v, 0.0, self.levels)

    def to_base(
        self,
        x: Float[Array, "... D"],
        *,
        trace: Literal["exact", "hutchinson"] = "exact",
        key: PRNGKeyArray | None = None,
        regularise: bool = False,
    ) -> tuple[Array, Array, dict[str, Array]]:
        """Push points of the flow's own space (for images: logits) through every
        block to the base space.

        **Arguments:**

        - `x`: points `[..., D]`.
        - `trace`: `"exact"` or `"hutchinson"` (then `key` draws the probe, one per
          block, fixed over its solve).
        - `key`: a JAX PRNG key (Hutchinson only).
        - `regularise`: also integrate the RNODE terms whose weight is > 0.

        **Returns:** `(z, logdet, extra)`: the base points, `Σ_k ∫ tr(∂f_k/∂x) dt`
        per point (so `log p(x) = log N(z) + logdet`), and a dict with
        `num_fn_evals` (forward evaluations of all solves), `num_backward_evals`
        (the vector-field VJPs a reverse-mode gradient of these solves takes, where
        the adjoint fixes them: `"checkpoint"` and `"direct"`; recomputed forward
        steps not counted; -1 where unknown, as for `"backsolve"`) and, where
        computed, the per-point `kinetic` and `jacobian` integrals.
        """
        x = self._check(x)
        if trace not in ("exact", "hutchinson"):
            raise ValueError(f"trace must be 'exact' or 'hutchinson', got {trace!r}.")
        if trace == "hutchinson" and key is None:
            raise ValueError(
                "trace='hutchinson' draws its probes from key=...; pass one."
            )
        kinetic = regularise and self.kinetic_weight > 0
        jacobian = regularise and self.jacobian_weight > 0
        lead = x.shape[:-1]
        zeros = jnp.zeros(lead, x.dtype)
        state = {"x": x, "logdet": zeros}
        if kinetic:
            state["kinetic"] = zeros
        if jacobian:
            state["jacobian"] = zeros
        ends = self.end_times.astype(x.dtype)
        keys = jax.random.split(jax.random.key(0) if key is None else key, self.blocks)
        params, static = eqx.partition(self.field, eqx.is_array)
        opts = self._solve_opts()
        per_step = self._backward_evals_per_step()

        def block(carry, inputs):
            state, nfe, nfe_bwd = carry
            p, end, k = inputs
            dyn = _Dynamics(eqx.combine(p, static), trace, kinetic, jacobian)
            eps = None if trace == "exact" else probe(k, x.shape, self.noise, x.dtype)
            sol = integrate(
                _augmented_field, state, jnp.asarray(_UNIT, x.dtype), (dyn, end, eps),
                **opts,
            )  # fmt: skip
            state = jax.tree.map(lambda y: y[-1], sol.ys)
            evals = jnp.asarray(sol.stats["num_fn_evals"]).astype(jnp.int32)
            if per_step is None:
                back = jnp.asarray(-1, jnp.int32)
            else:
                steps = jnp.asarray(sol.stats["num_steps"]).astype(jnp.int32)
                back = nfe_bwd + steps * per_step[0] + per_step[1]
            return (state, nfe + evals, back), None

        nfe0 = jnp.zeros((), jnp.int32)
        (state, nfe, nfe_bwd), _ = jax.lax.scan(
            block, (state, nfe0, nfe0), (params, ends, keys)
        )
        extra = {k: v for k, v in state.items() if k in ("kinetic", "jacobian")}
        extra["num_fn_evals"] = nfe
        extra["num_backward_evals"] = nfe_bwd
        return state["x"], state["logdet"], extra

    def from_base(self, z: Float[Array, "... D"]) -> Float[Array, "... D"]:
        """Solve every block backwards from base points `z` to the flow's own space
        (for images: logits; see `sample` for the data space)."""
        x = self._check(z, "z")
        ends = self.end_times.astype(x.dtype)
        params, static = eqx.partition(self.field, eqx.is_array)
        opts = self._solve_opts()

        def block(x, inputs):
            p, end = inputs
            args = (eqx.combine(p, static), end)
            back = jnp.asarray(_UNIT_BACK, x.dtype)
            return integrate(_plain_field, x, back, args, **opts).ys[-1], None

        x, _ = jax.lax.scan(block, x, (params, ends), reverse=True)
        return x

    @staticmethod
    def _base_log_prob(z):
        return -0.5 * jnp.sum(jnp.square(z), axis=-1) - 0.5 * z.shape[-1] * _LOG_2PI

    # ------------------------------------------------------------------ public

    def log_prob(
        self,
        x: Float[Array, "... D"],
        *,
        trace: Literal["exact", "hutchinson"] = "exact",
        key: PRNGKeyArray | None = None,
        devices: Any = None,
    ) -> Float[Array, "..."]:
        """The log-density of points `x` (nats), by the change of variables through
        every block (one batched solve per block).

        **Arguments:**

        - `x`: points `[..., D]` in data space (images: dequantised grey levels in
          `[0, levels)`, flattened).
        - `trace`: `"exact"` (default) or `"hutchinson"` (an unbiased estimate;
          needs `key`).
        - `key`: a JAX PRNG key for Hutchinson's probes.
        - `devices`: None or 1 (one device), an int `N` (the first `N` of
          `jax.local_devices()`) or a sequence of devices, as for
          `ctmodels.train.fit`: the points are split over the devices and the model
          replicated; one solve per block still, its step-size control shared by all
          the points. Called outside `jax.jit`. A point count that does not divide
          over the devices is padded with copies of the last point (cut from the
          result): then the padding takes part in the step-size control, and the
          log-densities agree with `devices=None`'s to the solver's tolerance
          instead of to the order of floating-point sums. The result is returned on
          the default device.

        **Returns:** `log p(x)`, shape `x.shape[:-1]`.
        """
        x = self._check(x)
        place = _devices.resolve(devices, "FFJORD.log_prob")
        if place is not None and x.size:
            flat = x.reshape(-1, self.dim)
            out = _devices.map_rows(
                _log_prob_rows, self, flat, place, trace, key, entry="FFJORD.log_prob"
            )
            return out.reshape(x.shape[:-1])
        s, pre = self._preprocess(x)
        z, logdet, _ = self.to_base(s, trace=trace, key=key)
        return self._base_log_prob(z) + logdet + pre

    def sample(
        self, n: int, *, key: PRNGKeyArray, devices: Any = None
    ) -> Float[Array, "n D"]:
        """`n` samples by the reverse solve from `z = jax.random.normal(key, (n, D))`
        (images: continuous grey levels, clipped to `[0, levels]`; floor them for
        integer levels).

        `devices` (None, an int or a sequence of devices, as for `log_prob`): the
        base points are drawn first, exactly as on one device, and then split over
        the devices for the reverse solve, so the same `key` gives the same samples
        (to the order of floating-point sums; when `n` does not divide over the
        devices, the padding copies of the last point join the shared step-size
        control and the samples agree to the solver's tolerance). Called outside
        `jax.jit`; the samples are returned on the default device.
        """
        if not _errors.is_int(n) or n < 1:
            raise ValueError(f"n must be a positive int, got {n!r}.")
        place = _devices.resolve(devices, "FFJORD.sample")
        dtype = self.sqrt_end_times.dtype
        z = jax.random.normal(key, (int(n), self.dim), dtype)
        if place is not None:
            return _devices.map_rows(_sample_rows, self, z, place,
                                     entry="FFJORD.sample")  # fmt: skip
        return self._postprocess(self.from_base(z))

    def loss(
        self, batch: Float[Array, "B D"], *, key: PRNGKeyArray
    ) -> tuple[Array, dict[str, Array]]:
        """Mean negative log-likelihood of a batch of points, plus the weighted RNODE
        terms; for `ctmodels.train.fit` on arrays of points.

        In training the divergence is the model's `trace` (Hutchinson's probes and
        the images' dequantisation noise drawn from `key`) and the regularisers with
        weight > 0 are added; in inference mode (`equinox.nn.inference_mode`, as
        `fit` scores validation batches) the trace is exact and the loss is the NLL
        alone.

        **Arguments:**

        - `batch`: points `[B, D]` (images: integer grey levels, flattened).
        - `key`: a JAX PRNG key.

        **Returns:** `(loss, metrics)`: `nll` (nats per sample), `bits_per_dim`,
        `nfe` (forward vector-field evaluations of the batch's solves), `end_time`
        (the blocks' total), and in training `nfe_backward` (the vector-field
        vector-Jacobian products of the gradient, with the `"checkpoint"` or
        `"direct"` adjoint and an explicit solver; not with `"backsolve"`, whose
        backward solve Diffrax does not report) and, where weighted, `kinetic` and
        `jacobian` (means per sample).
        """
        x = self._check(batch, "batch")
        k_deq, k_probe = jax.random.split(key)
        if self.levels is not None:
            x = x + jax.random.uniform(k_deq, x.shape, x.dtype)
        s, pre = self._preprocess(x)
        trace = "exact" if self.inference else self.trace
        z, logdet, extra = self.to_base(
            s, trace=trace, key=k_probe, regularise=not self.inference
        )
        nll = -jnp.mean(self._base_log_prob(z) + logdet + pre)
        loss = nll
        metrics = {
            "nll": nll,
            "bits_per_dim": nll / (self.dim * math.log(2.0)),
            "nfe": extra["num_fn_evals"].astype(jnp.float32),
            "end_time": jnp.sum(self.end_times),
        }
        if not self.inference and self._backward_evals_per_step() is not None:
            metrics["nfe_backward"] = extra["num_backward_evals"].astype(jnp.float32)
        if "kinetic" in extra:
            metrics["kinetic"] = jnp.mean(extra["kinetic"])
            loss = loss + self.kinetic_weight * metrics["kinetic"]
        if "jacobian" in extra:
            metrics["jacobian"] = jnp.mean(extra["jacobian"])
            loss = loss + self.jacobian_weight * metrics["jacobian"]
        metrics["loss"] = loss
        return loss, metrics


@eqx.filter_jit
def _log_prob_rows(model, x, trace, key):
    """`log_prob` of points already placed on a mesh (`log_prob(devices=...)`):
    module level, so every call with the same shapes and placement reuses it."""
    return model.log_prob(x, trace=trace, key=key)


@eqx.filter_jit
def _sample_rows(model, z):
    """The reverse solve of base points placed on a mesh (`sample(devices=...)`)."""
    return model._postprocess(model.from_base(z))
