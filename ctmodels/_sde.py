"""`ctmodels.integrate_sde`: stochastic differential equations through the registry
(kind `"sde"`), with the Brownian motion drawn from a key."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import diffrax
import equinox as eqx
import jax
import jax.numpy as jnp
import lineax as lx
from jaxtyping import Array, ArrayLike, PyTree

from . import _errors
from ._integrate import (
    Solution,
    as_state,
    check_compatible,
    check_field,
    check_times,
    finish,
    make_event,
    make_saveat,
    resolve_adjoint,
)
from .solvers import _registry


class _Diagonal(eqx.Module):
    """`g(t, y, args)` (like y) as the diagonal matrix Diffrax multiplies dW by."""

    fn: Callable = eqx.field(static=True)

    def __call__(self, t, y, args):
        return lx.DiagonalLinearOperator(self.fn(t, y, args))


_LEVY = (
    diffrax.BrownianIncrement,
    diffrax.SpaceTimeLevyArea,
    diffrax.SpaceTimeTimeLevyArea,
)


def _levy_area(solver):
    """The cheapest Levy area the stepper needs (space-time for the SRK steppers)."""
    need = getattr(solver, "minimal_levy_area", diffrax.AbstractBrownianIncrement)
    return next(c for c in _LEVY if issubclass(c, need))


def integrate_sde(
    drift: Callable[..., PyTree[Array]],
    diffusion: Callable[..., Array],
    y0: ArrayLike,
    ts: ArrayLike,
    args: PyTree[Any] = None,
    *,
    key: Array,
    dt0: float,
    solver: str | diffrax.AbstractSolver = "euler",
    adjoint: str | diffrax.AbstractAdjoint = "checkpoint",
    noise: str | tuple[int, ...] = "diagonal",
    max_steps: int = 4096,
    throw: bool = True,
    saveat: str | diffrax.SaveAt | None = None,
    dense: bool = False,
    event: Callable[..., Any] | diffrax.Event | None = None,
) -> Solution:
    """Solve `dy = drift(t, y, args) dt + diffusion(t, y, args) dW` from `y(ts[0]) =
    y0` with fixed steps `dt0`; return one sample path at `ts`.

    The Brownian motion `W` is a `diffrax.VirtualBrownianTree` drawn from `key`: the
    same key gives the same path, at any step size and in the backward pass, so every
    adjoint works. jit-, vmap- and grad-safe; vmap over keys for Monte Carlo.

    **Arguments:**

    - `drift`: `f(t, y, args) -> dy/dt`, an array like `y`.
    - `diffusion`: `g(t, y, args)`: with `noise="diagonal"` an array like `y` (each
        component of `y` gets its own independent noise, `g * dW` elementwise); with
        `noise=(m,)` (a Brownian motion of `m` components, or any shape) an array of
        shape `y.shape + (m,)` contracted with `dW`.
    - `y0`: the initial state, one array (1-D for diagonal noise).
    - `ts`: 1-D, strictly increasing (or decreasing) times.
    - `args`: passed to `drift` and `diffusion`; differentiate with respect to it.
    - `key`: a `jax.random` key for the Brownian motion (keyword-only).
    - `dt0`: the step size (SDE steppers take fixed steps).
    - `solver`: a registry name of kind `sde` (`ctmodels solvers --kind sde`: the
        tags say whether it solves the Ito or the Stratonovich SDE, which noise it
        needs and its strong order) or a Diffrax SDE stepper. Default `"euler"`
        (Euler-Maruyama, Ito). The two SDEs agree for additive noise.
    - `adjoint`: `"checkpoint"` (default), `"direct"`, or `"backsolve"` (continuous
        adjoint, O(1) memory; Stratonovich one-term steppers only:
        `"reversible_heun"`), or a `diffrax.AbstractAdjoint`.
    - `noise`: `"diagonal"` (default) or the shape of the Brownian motion.
    - `max_steps`: the most steps; at least `|ts[-1] - ts[0]| / dt0`.
    - `throw`, `saveat`, `dense`, `event`: as for [`ctmodels.integrate`][].

    **Returns:** a [`ctmodels.Solution`][] (`stats["num_fn_evals"]` is `-1`).

    References: Kidger, Foster, Li & Lyons, "Efficient and Accurate Gradients for
    Neural SDEs", NeurIPS 2021 (virtual Brownian tree, reversible Heun); Li, Wong,
    Chen & Duvenaud, "Scalable Gradients for Stochastic Differential Equations",
    AISTATS 2020 (latent SDEs, stochastic adjoint).
    """
    entry = "integrate_sde"
    ts = check_times(ts)
    if dt0 is None:
        raise ValueError(
            f"ctmodels.{entry}: SDE steppers take fixed steps; pass dt0=... (e.g. "
            "a hundredth of the time span)."
        )
    _errors.check_step(dt0, entry)
    if not isinstance(max_steps, int) or max_steps < 1:
        raise ValueError(f"max_steps must be a positive int, got {max_steps!r}.")
    _errors.check_fixed_steps(ts, dt0, max_steps, entry)
    for what, f in (("drift", drift), ("diffusion", diffusion)):
        if not callable(f):
            raise ValueError(
                f"ctmodels.{entry}: {what} must be a callable f(t, y, args), got "
                f"{type(f).__name__}."
            )
    y0 = as_state(y0, entry)
    if not eqx.is_array(y0):
        raise ValueError(
            f"ctmodels.{entry}: y0 must be one array (got a {type(y0).__name__}); "
            "concatenate a structured state, or call diffrax.diffeqsolve with your "
            "own ControlTerm."
        )
    if noise == "diagonal":
        if y0.ndim != 1:
            raise ValueError(
                f"ctmodels.{entry}: diagonal noise needs a 1-D state, got y0 of shape "
                f"{y0.shape}; reshape it, or pass noise=(m,) with a diffusion of "
                "shape y.shape + (m,)."
            )
        bm_shape = y0.shape
        g_like = jax.ShapeDtypeStruct(y0.shape, y0.dtype)
        vf = _Diagonal(diffusion)
    elif isinstance(noise, tuple) and all(_errors.is_int(n) and n > 0 for n in noise):
        bm_shape = noise
        g_like = jax.ShapeDtypeStruct(y0.shape + tuple(noise), y0.dtype)
        vf = diffusion
    else:
        raise ValueError(
            f"ctmodels.{entry}: noise must be 'diagonal' or the shape of the Brownian "
            f"motion as a tuple of positive ints (e.g. (3,)), got {noise!r}."
        )
    check_field((drift,), ts[0], y0, args, entry, "drift")
    check_field((diffusion,), ts[0], y0, args, entry, "diffusion", out_like=g_like)

    solver_v, name = _registry.resolve(solver, "sde")
    if not isinstance(solver_v, diffrax.AbstractSolver):
        raise ValueError(
            f"ctmodels.{entry}: solver must be a registry name of kind 'sde' or a "
            f"diffrax.AbstractSolver, got {type(solver_v).__name__}."
        )
    adjoint_v, adjoint_name = resolve_adjoint(adjoint, entry)
    event_v = make_event(event, ts)
    saveat_v, layout, extra_t1 = make_saveat(
        saveat, dense, ts, event_v is not None, entry
    )
    check_compatible(
        solver_v, name, adjoint_v, adjoint_name, saveat_v, event_v, entry, sde=True
    )

    t_lo, t_hi = jnp.minimum(ts[0], ts[-1]), jnp.maximum(ts[0], ts[-1])
    step = jnp.abs(jnp.asarray(dt0, ts.dtype))
    brownian = diffrax.VirtualBrownianTree(
        t_lo,
        t_hi,
        tol=step / 8,
        shape=jax.ShapeDtypeStruct(bm_shape, y0.dtype),
        key=key,
        levy_area=_levy_area(solver_v),
    )
    terms = diffrax.MultiTerm(diffrax.ODETerm(drift), diffrax.ControlTerm(vf, brownian))
    sol = diffrax.diffeqsolve(
        terms,
        solver_v,
        t0=ts[0],
        t1=ts[-1],
        dt0=step * jnp.sign(ts[-1] - ts[0]),
        y0=y0,
        args=args,
        saveat=saveat_v,
        stepsize_controller=diffrax.ConstantStepSize(),
        adjoint=adjoint_v,
        event=event_v,
        max_steps=max_steps,
        throw=False,
    )
    return finish(sol, ts, layout, extra_t1, None, 0, max_steps, name, throw, entry)
