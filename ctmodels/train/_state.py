"""`fit`'s host-side loop state: one immutable value, replaced once per step."""

from __future__ import annotations

import dataclasses
import math
import time
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp


def strong(tree):
    """Strongly typed copies of the array leaves (weak types would retrace later)."""
    return jax.tree.map(
        lambda x: jnp.array(x, dtype=x.dtype) if eqx.is_array(x) else x, tree
    )


class Clock:
    """Seconds of training: the interrupted runs' (`elapsed0`) plus this one's."""

    def __init__(self, elapsed0: float = 0.0):
        self.elapsed0 = elapsed0
        self.start = time.perf_counter()

    def __call__(self) -> float:
        return self.elapsed0 + time.perf_counter() - self.start


@dataclasses.dataclass(frozen=True)
class LoopState:
    """Everything the loop needs to continue; replaced (never mutated) each step."""

    model: Any
    opt_state: Any
    best_model: Any = None
    step: int = 0  # optimizer steps taken (skipped NaN steps count too)
    epoch: int = 0  # completed epochs
    batch: int = 0  # batches of the current epoch done
    lr_scale: float = 1.0  # lowered by nan_policy="rollback"
    sums: tuple = ()  # ((name, weighted sum), ...) over the current epoch
    weight: float = 0.0  # total batch weight of the current epoch's good steps
    epoch_skips: int = 0
    nan_skips: int = 0  # all skipped (non-finite) steps
    consecutive_bad: int = 0
    rollbacks: int = 0  # since the last save point
    best_loss: float | None = None
    best_epoch: int | None = None
    bad_epochs: int = 0
    stopped_early: bool = False
    last_lr: float = math.nan
    last_kl: float = math.nan
    history: tuple = ()

    def progress_json(self) -> dict[str, Any]:
        out = {
            f.name: getattr(self, f.name)
            for f in dataclasses.fields(self)
            if f.name not in ("model", "opt_state", "best_model", "history")
        }
        out["sums"] = [[k, v] for k, v in self.sums]
        return out

    @classmethod
    def from_json(cls, d: dict[str, Any], **trees) -> LoopState:
        names = {f.name for f in dataclasses.fields(cls)}
        kw = {k: v for k, v in d.items() if k in names}
        kw["sums"] = tuple((k, float(v)) for k, v in d.get("sums", []))
        return cls(**kw, **trees)
