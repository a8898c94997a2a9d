"""`fit`'s NaN policy: what follows a step whose loss or gradient was not finite.

The compiled step has already left the parameters and optimizer state as they were;
here the host decides: `"skip"` counts the step and goes on, `"rollback"` returns to
the last save point with a lower learning rate, `"raise"` fails at once. Each gives
up with a `FloatingPointError` that says what to try (and, if a solver failed, why).
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

from ._state import LoopState

if TYPE_CHECKING:
    from ._run import Run

ROLLBACK_FACTOR = 0.5


def after_bad_step(
    run: Run, s: LoopState, snapshot: LoopState, stepped, out, batch, prog
) -> tuple[LoopState, bool]:
    """The state after the non-finite step `s.step` and whether it rolled back.

    `stepped` is the step's `(model, opt_state)`, `out` its outputs, `snapshot` the
    last save point."""
    policy = run.options.nan_policy
    if policy == "raise":
        raise FloatingPointError(nan_message(run, s, out, "non-finite loss", batch))
    if policy == "rollback":
        return _rollback(run, s, snapshot, out, batch, prog), True
    return _skip(run, s, stepped, out, batch), False


def _rollback(run: Run, s, snapshot, out, batch, prog) -> LoopState:
    if s.rollbacks >= run.options.max_nan_skips:
        raise FloatingPointError(
            nan_message(
                run,
                s,
                out,
                f"{s.rollbacks} rollbacks without reaching a new save point",
                batch,
            )
        )
    scale = s.lr_scale * ROLLBACK_FACTOR
    prog.message(
        f"non-finite loss at step {s.step}: rolled back to step "
        f"{snapshot.step}, learning rate scaled by {scale:g}"
    )
    return dataclasses.replace(
        snapshot,
        lr_scale=scale,
        rollbacks=s.rollbacks + 1,
        nan_skips=s.nan_skips + 1,
    )


def _skip(run: Run, s, stepped, out, batch) -> LoopState:
    if s.consecutive_bad + 1 >= run.options.max_nan_skips:
        raise FloatingPointError(
            nan_message(
                run, s, out, f"{s.consecutive_bad + 1} consecutive skipped steps", batch
            )
        )
    model, opt_state = stepped
    return dataclasses.replace(
        s,
        model=model,
        opt_state=opt_state,
        step=s.step + 1,
        batch=s.batch + 1,
        epoch_skips=s.epoch_skips + 1,
        nan_skips=s.nan_skips + 1,
        consecutive_bad=s.consecutive_bad + 1,
    )


def nan_message(run: Run, s: LoopState, out, what: str, batch=None) -> str:
    cause = ""
    if batch is not None:
        found = run.compiled.diagnose(s.model, batch, s.step)
        if found:
            cause = f" Cause: {found}"
    hint = (
        "checkpointing more often (checkpoint_every=) so that rollbacks return "
        "to parameters from before the divergence"
        if run.options.nan_policy == "rollback"
        else "nan_policy='rollback'"
    )
    return (
        f"fit: {what} at step {s.step} (epoch {s.epoch + 1}, batch "
        f"{s.batch + 1}): the loss ({float(out['loss'])}) or its gradient is not "
        "finite. The parameters were left as they were before this step. Try: a "
        "lower learning_rate (or a stronger clip_norm), checking the data "
        "normalisation (standardised channels, no huge values or times), a "
        "tighter solver tolerance (rtol/atol) or a larger max_steps for ODE / "
        f"fixed-point models, or {hint}.{cause}"
    )
