"""The ODE-RNN (Rubanova, Chen & Duvenaud 2019): a GRU whose state evolves by an ODE
between observations; with no ODE, a GRU with a time-gap input (GRU-Δt)."""

from __future__ import annotations

import diffrax
import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, ArrayLike, Bool, Float, PRNGKeyArray

from .. import _errors
from .._errors import RESULTS, SolverError
from .._integrate import integrate
from .._references import cites
from ..solvers import _registry
from ..solvers._unrolled import UnrolledERK
from ._gru import GRUUpdate
from ._mlp import autonomous_field, mlp
from ._recurrence import recurrence


def check_ode_solver(
    solver, steps: int | None, what: str, steps_arg: str | None = "steps"
) -> None:
    """Trace-time validation of a solver given to a model (a registry name or value);
    `steps_arg`: the model's argument for fixed steps per interval (None: it has
    none, so its solver must be adaptive)."""
    value, name = _registry.resolve(solver, "ode")
    if not isinstance(value, diffrax.AbstractSolver):
        raise ValueError(
            f"{what} must be a registry name of kind 'ode' or a "
            f"diffrax.AbstractSolver, got {type(value).__name__}."
        )
    if steps is None and not isinstance(value, diffrax.AbstractAdaptiveSolver):
        given = (
            f"give {steps_arg}=N (fixed steps per interval) or choose"
            if steps_arg
            else "it solves between arbitrary observation times, so choose"
        )
        raise ValueError(
            f"{what}={name!r} takes fixed steps; {given} an adaptive solver such as "
            "'dopri5' or 'tsit5' (`ctmodels solvers --kind ode` lists them)."
        )


_UNIT_INTERVAL = np.array([0.0, 1.0])


def _rescaled_field(s, h, args):
    """`dh/ds = (t1 - t0) f(h)`: the ODE on `[t0, t1]` in the time `s` in `[0, 1]`."""
    field, span = args
    return span * autonomous_field(s, h, field)


def _direct_step_ok(solver, adjoint) -> bool:
    """Whether one fixed step over an interval can be taken by calling the stepper
    directly instead of through `integrate`: an explicit stepper (Euler or an explicit
    Runge--Kutta tableau) and a discretise-then-optimise adjoint (`checkpoint`,
    `direct` or `forward`, which differentiate exactly that step; `backsolve`
    differs)."""
    solver, _ = _registry.resolve(solver, "ode")
    adjoint, _ = _registry.resolve(adjoint, "adjoint")
    explicit = isinstance(solver, diffrax.Euler | diffrax.AbstractERK | UnrolledERK)
    explicit = explicit and not isinstance(solver, diffrax.AbstractImplicitSolver)
    return explicit and isinstance(
        adjoint,
        diffrax.RecursiveCheckpointAdjoint
        | diffrax.DirectAdjoint
        | diffrax.ForwardMode,
    )


def _one_step(solver, field, span, h):
    """One step of `solver` over `s` in [0, 1] of `dh/ds = span f(h)`: the step that
    `integrate(..., dt0=1.0)` takes (the same values), without Diffrax's loop,
    step-size bookkeeping and result checks. The caller checks for non-finite
    states."""
    solver, _ = _registry.resolve(solver, "ode")
    terms = diffrax.ODETerm(_rescaled_field)
    args = (field, span)
    s0, s1 = jnp.zeros((), h.dtype), jnp.ones((), h.dtype)
    state = solver.init(terms, s0, s1, h, args)
    h1, _, _, _, _ = solver.step(terms, s0, s1, h, args, state, False)
    return h1


@cites("rubanova2019latent")
class ODERNNEncoder(eqx.Module):
    """An ODE-RNN over a series (or a batch of series at once): between observations
    the state `h` follows `dh/dt = f(h)` (a tanh MLP solved through
    `ctmodels.integrate`); at each observed position a masked GRU update
    (`GRUUpdate`) takes the new input.

    The ODE always runs from the time of the last update straight to the next
    position, so the result does not depend on which other (unobserved) positions are
    on the time grid: a series gives the same answer on its own times (`"padded"`
    layout) and on a batch's union grid (`"union"` layout). With `steps` fixed steps
    per interval (Rubanova et al.'s code takes Euler steps of about 1/50 of the time
    span, i.e. mostly one step between neighbouring grid times) the discretisation
    depends only on the interval; `steps=None` solves adaptively to `rtol`/`atol`.

    With `ode=False` the state is constant between updates and the GRU input gets the
    time gap since the last update appended (GRU-Δt / the RNN encoder of the paper's
    RNN-VAE).

    Differentiation: reverse mode (`jax.grad`, `jax.vjp`, `jax.jacrev`, also under
    `jax.vmap` and `jax.jit`). The loop over the updates has its own reverse-mode rule
    (it runs only the steps the batch needs and recomputes each in the backward
    pass), so forward mode (`jax.jvp`, `jax.jacfwd`) and differentiating a gradient
    again are not available through it. With `adjoint="forward"` the encoder scans
    every position instead, which any JAX transformation can differentiate (slower:
    unobserved positions are stepped through as idle steps).
    """

    gru: GRUUpdate
    vector_field: eqx.nn.MLP | None
    hidden_size: int = eqx.field(static=True)
    solver: object = eqx.field(static=True)
    steps: int | None = eqx.field(static=True)
    adjoint: object = eqx.field(static=True)
    rtol: float = eqx.field(static=True)
    atol: float = eqx.field(static=True)
    max_steps: int = eqx.field(static=True)

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        *,
        units: int = 100,
        depth: int = 2,
        gru_units: int | None = None,
        ode: bool = True,
        solver="euler",
        steps: int | None = 1,
        adjoint="checkpoint",
        rtol: float = 1e-3,
        atol: float = 1e-4,
        max_steps: int = 4096,
        key: PRNGKeyArray,
    ):
        """**Arguments:**

        - `input_size`: size of the GRU input per position (e.g. `2 C` for
          `[x * mask, mask]`); with `ode=False` one more (the time gap) is appended
          internally.
        - `hidden_size`: size of the state.
        - `units`, `depth`: width and number of hidden layers of the ODE's MLP.
        - `gru_units`: hidden units of the GRU gates (default `units`).
        - `ode`: False for a GRU with a time-gap input instead of an ODE.
        - `solver`: registry name or Diffrax solver of the ODE (default `"euler"`).
        - `steps`: fixed steps per interval between updates; None: adaptive steps.
        - `adjoint`, `rtol`, `atol`, `max_steps`: passed to `ctmodels.integrate`.
        - `key`: a JAX PRNG key.
        """
        kg, kf = jax.random.split(key)
        if steps is not None and (not isinstance(steps, int) or steps < 1):
            raise ValueError(f"steps must be a positive int or None, got {steps!r}.")
        if ode:
            check_ode_solver(solver, steps, "The ODE-RNN's solver")
        gru_units = units if gru_units is None else gru_units
        extra = 0 if ode else 1
        self.gru = GRUUpdate(input_size + extra, hidden_size, units=gru_units, key=kg)
        self.vector_field = (
            mlp(hidden_size, hidden_size, units=units, depth=depth, key=kf)
            if ode
            else None
        )
        self.hidden_size = hidden_size
        self.solver = solver
        self.steps = steps
        self.adjoint = adjoint
        self.rtol = rtol
        self.atol = atol
        self.max_steps = max_steps

    def evolve(
        self, h: Float[Array, "*B H"], t0: ArrayLike, t1: ArrayLike
    ) -> Float[Array, "*B H"]:
        """The state at time `t1` given the state `h` at `t0` (either direction).

        `h` may carry leading batch axes `*B`, with `t0`, `t1` scalars or of shape
        `*B` (one interval per row): all rows are solved in ONE call, in the rescaled
        time `s = (t - t0) / (t1 - t0)` in `[0, 1]` (the field is autonomous, so this
        is the same ODE). A zero-length interval gives `h` back exactly.

        With one fixed step per interval (`steps=1`, the default), an explicit
        stepper and the `checkpoint`, `direct` or `forward` adjoint, that step is
        taken by calling the stepper directly rather than through
        `ctmodels.integrate`: the same values and gradients, without the solve
        loop's compile and run time (a NaN or inf state is still reported, with
        `integrate`'s message).
        """
        return self._evolve(h, t0, t1, check=True)

    def _direct(self) -> bool:
        """Whether `evolve` takes its one fixed step directly (see `_one_step`)."""
        return self.steps == 1 and _direct_step_ok(self.solver, self.adjoint)

    def _forward_mode(self) -> bool:
        """Whether the adjoint is forward mode (then `__call__` must be
        differentiable by `jax.jvp`, which its while loop is not)."""
        adjoint, _ = _registry.resolve(self.adjoint, "adjoint")
        return isinstance(adjoint, diffrax.ForwardMode)

    def _evolve(self, h, t0, t1, *, check: bool):
        """`evolve`; `check=False` skips the non-finite check of a direct step (the
        loop of `__call__` checks its result once instead of at every step)."""
        if self.vector_field is None:
            return h
        span = jnp.asarray(t1, h.dtype) - jnp.asarray(t0, h.dtype)
        span = jnp.broadcast_to(span, h.shape[:-1])[..., None]
        if self._direct():
            h = jnp.asarray(h, jnp.result_type(h, float))
            h1 = _one_step(self.solver, self.vector_field, span, h)
            return self._check_finite(h1) if check else h1
        if self.steps is None:
            dt0, max_steps = None, self.max_steps
        else:
            dt0, max_steps = 1.0 / self.steps, self.steps + 1
        sol = integrate(
            _rescaled_field,
            h,
            _UNIT_INTERVAL,
            (self.vector_field, span),
            solver=self.solver,
            adjoint=self.adjoint,
            rtol=self.rtol,
            atol=self.atol,
            dt0=dt0,
            max_steps=max_steps,
        )
        return sol.ys[-1]

    def _check_finite(self, h):
        """The failure `integrate` reports for a fixed-step solve that produced NaN
        or inf: a `SolverError` when eager, a runtime error under `jit`."""
        _, name = _registry.resolve(self.solver, "ode")
        msg = _errors.explain(
            "integrate", name, "nonfinite", "in the ODE-RNN's evolution between updates"
        )
        bad = ~jnp.all(jnp.isfinite(h))
        if not _errors.is_traced(h):
            if bool(bad):
                raise SolverError(
                    msg, result=RESULTS.nonfinite, solver=name, entry="integrate"
                )
            return h
        return _errors.error_if(h, bad, msg)

    def __call__(
        self,
        times: Float[Array, "*B T"],
        inputs: Float[Array, "*B T D"],
        observed: Bool[Array, "*B T"],
        *,
        t_start: Float[ArrayLike, "*B"],
        t_final: Float[ArrayLike, "*B"] | None = None,
        reverse: bool = False,
        h0: Float[Array, "*B H"] | None = None,
        outputs: bool = True,
    ) -> tuple[
        Float[Array, "*B H"], Float[Array, "*B T H"] | None, Float[Array, "*B T"] | None
    ]:
        """Run over one series, or over a batch of series at once.

        One series: `times [T]`, `inputs [T, D]`, `observed [T]`. A batch: leading
        axes `*B` on `inputs` and `observed`; `times` either `[*B, T]` or a shared
        `[T]`. All rows advance together: each step makes one `evolve` call for
        the whole batch, which is much faster than vmapping over
        series.

        Only the observed positions are stepped through: each row's observations are
        moved to the front (in processing order) and the loop stops after the
        longest row's last observation, so unobserved grid positions cost nothing
        (with a forward-mode `adjoint`, a scan runs through every position
        instead). The states at all positions (`outputs=True`) are then obtained
        in parallel, each evolved from the last update before it.

        **Arguments:**

        - `times`: non-decreasing times of the positions.
        - `inputs`: GRU inputs (only read where `observed`).
        - `observed`: where to update.
        - `t_start`: the time of the initial state `h0` (per row).
        - `t_final`: the time of the returned final state (default: each row's last
          update).
        - `reverse`: process the positions from last to first (backwards in time).
        - `h0`: the initial state (default zeros).
        - `outputs`: also return the per-position states (else None for those).

        **Returns:** `(h_final, h_before, gaps)`: the state at `t_final`; at each
        position the state just before its update (i.e. from the updates before it
        in processing order, evolved to that position's time); and each position's
        absolute time since the last update before it.
        """
        lead = observed.shape[:-1]
        T = observed.shape[-1]
        dtype = inputs.dtype
        times = jnp.broadcast_to(jnp.asarray(times, dtype), lead + (T,))
        h0 = jnp.zeros(lead + (self.hidden_size,), dtype) if h0 is None else h0
        t_start = jnp.broadcast_to(jnp.asarray(t_start, dtype), lead)
        ode = self.vector_field is not None

        # positions in processing order, observed ones first
        flip = (
            (lambda a, ax=-1: jnp.flip(a, axis=ax)) if reverse else (lambda a, ax=-1: a)
        )
        t_p, x_p, o_p = flip(times), flip(inputs, -2), flip(observed)
        perm = jnp.argsort(~o_p, axis=-1, stable=True)
        t_c = jnp.take_along_axis(t_p, perm, axis=-1)
        x_c = jnp.take_along_axis(x_p, perm[..., None], axis=-2)
        count = jnp.sum(o_p, axis=-1)
        # one more slot: after its last update each row evolves to `t_final` (in the
        # same loop, so the ODE solve is compiled once)
        t_c = jnp.concatenate([t_c, t_c[..., -1:]], axis=-1)
        x_c = jnp.concatenate([x_c, x_c[..., -1:, :]], axis=-2)
        k = jnp.arange(T + 1)
        is_obs = k < count[..., None]
        if t_final is None:
            is_final = jnp.zeros_like(is_obs)
            n_steps = count
        else:
            is_final = k == count[..., None]
            t_final = jnp.broadcast_to(jnp.asarray(t_final, dtype), lead)
            t_c = jnp.where(is_final, t_final[..., None], t_c)
            n_steps = count + 1
        n_steps = jnp.max(n_steps) if lead else n_steps

        def update(enc, carry, xs):
            t, x, obs, fin = xs
            h, t_last = carry
            move = obs | fin
            t = jnp.where(move, t, t_last)  # idle rows: a zero-length interval
            h_minus = enc._evolve(h, t_last, t, check=False)
            gap = jnp.abs(t - t_last)
            x_in = x if ode else jnp.concatenate([x, gap[..., None]], axis=-1)
            gru = enc.gru
            for _ in lead:
                gru = jax.vmap(gru)
            h_new = jnp.where(
                obs[..., None],
                gru(h_minus, x_in),
                jnp.where(fin[..., None], h_minus, h),
            )
            return h_new, t

        xs = tuple(jnp.moveaxis(a, len(lead), 0) for a in (t_c, x_c, is_obs, is_final))
        if self._forward_mode():
            # differentiable in forward mode: a scan through every slot (those after
            # a row's last step are idle)
            def scan_step(carry, xs):
                carry = update(self, carry, xs)
                return carry, (carry[0] if outputs else None)

            (h, t_last), after = jax.lax.scan(scan_step, (h0, t_start), xs)
        else:
            # Only the `n_steps` steps needed are run (a while loop, with its own
            # reverse-mode rule that recomputes each step in the backward pass). This
            # compiles faster and trains faster than scanning the padded length in
            # chunks and skipping the chunks after the last step.
            (h, t_last), after = recurrence(
                (self, (h0, t_start), xs), update, n_steps, outputs
            )
        if ode and self._direct():
            h = self._check_finite(h)  # the steps' check, once for the whole loop
        if not outputs:
            return h, None, None
        after = after[:T]

        # state before each position: the last update before it, evolved to it
        after = jnp.moveaxis(after, 0, len(lead))  # [*B, k, H]: after k+1 updates
        n_before = jnp.cumsum(o_p, axis=-1) - o_p  # updates strictly before
        idx = jnp.maximum(n_before - 1, 0)
        none = (n_before == 0)[..., None]
        h_prev = jnp.where(
            none,
            h0[..., None, :],
            jnp.take_along_axis(after, idx[..., None], axis=-2),
        )
        t_prev = jnp.where(
            none[..., 0], t_start[..., None], jnp.take_along_axis(t_c, idx, axis=-1)
        )
        h_before = self.evolve(h_prev, t_prev, t_p)
        return h, flip(h_before, -2), flip(jnp.abs(t_p - t_prev))
