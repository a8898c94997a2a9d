"""Validation and early stopping: the epoch's validation scores, and whether the
monitored one improved."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import jax

from ._state import LoopState

if TYPE_CHECKING:
    from ._run import Run


def evaluate(run: Run, model) -> dict[str, float]:
    """`valid_<name>` for the loss and each metric: their means over the validation
    batches, weighted by each batch's weight (NaN without any weight)."""
    valid = run.valid
    order = valid.order(None)
    sums: dict[str, float] = {}
    total = 0.0
    for i in range(valid.num_batches(train=False)):
        batch = valid.batch(order, i, train=False)
        out = jax.device_get(run.compiled.eval(model, batch, i))
        w = float(out["weight"])
        total += w
        for name, v in (("loss", out["loss"]), *out["metrics"].items()):
            sums[name] = sums.get(name, 0.0) + w * float(v)
    return {
        f"valid_{k}": (v / total if total > 0 else math.nan) for k, v in sums.items()
    }


def improved(s: LoopState, value: float) -> dict[str, Any]:
    """The early-stopping fields after an epoch whose monitored validation value is
    `value`: a finite value below the best so far makes this epoch's model the best;
    anything else counts one more epoch without improvement."""
    if math.isfinite(value) and (s.best_loss is None or value < s.best_loss):
        return {
            "best_model": s.model,
            "best_loss": value,
            "best_epoch": s.epoch + 1,
            "bad_epochs": 0,
        }
    return {
        "best_model": s.best_model,
        "best_loss": s.best_loss,
        "best_epoch": s.best_epoch,
        "bad_epochs": s.bad_epochs + 1,
    }


def check_monitor(run: Run, model) -> None:
    """A monitor other than the loss must be a metric the loss returns (shapes only:
    nothing runs)."""
    monitor = run.options.monitor
    batch0 = run.valid.batch(run.valid.order(None), 0, train=False)
    shapes = run.compiled.eval_shapes(model, batch0)
    names = sorted(["loss", *shapes["metrics"]])
    if monitor not in names:
        raise ValueError(
            f"monitor={monitor!r} is not a validation value of this model's "
            f"loss; it has {names}. Pass one of them."
        )
