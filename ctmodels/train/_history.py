"""`fit`'s history: one row per epoch (training means, validation scores, learning
rate, time, skipped steps), the `DataFrame` it returns and its `attrs`."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import pandas as pd

from ._state import LoopState
from ._stopping import evaluate, improved

if TYPE_CHECKING:
    from ._run import Run


def history_frame(history: tuple) -> pd.DataFrame:
    df = pd.DataFrame(list(history))
    if df.empty:
        df = pd.DataFrame(columns=["epoch", "step", "train_loss"])
    return df


def in_order(record: dict, columns) -> dict:
    """A history record with its keys in the order the run wrote them (`columns`,
    stored since the header's JSON sorts keys; None for older checkpoints)."""
    if not columns:
        return dict(record)
    first = {k: record[k] for k in columns if k in record}
    return {**first, **{k: v for k, v in record.items() if k not in first}}


def end_epoch(run: Run, s: LoopState, prog, elapsed: Callable[[], float]) -> LoopState:
    """Close the current epoch: its history row (validated, with early stopping
    decided), reported by `prog`; the counters of the next epoch start at zero."""
    row: dict[str, Any] = {"epoch": s.epoch + 1, "step": s.step}
    for name, total in s.sums:
        row[f"train_{name}"] = total / s.weight if s.weight > 0 else math.nan
    if "train_loss" not in row:
        row["train_loss"] = math.nan
    best = {
        "best_model": s.best_model,
        "best_loss": s.best_loss,
        "best_epoch": s.best_epoch,
        "bad_epochs": s.bad_epochs,
    }
    stop = False
    if run.valid is not None:
        row.update(evaluate(run, s.model))
        best = improved(s, row[f"valid_{run.options.monitor}"])
        stop = run.options.patience is not None and (
            best["bad_epochs"] >= run.options.patience
        )
    row["lr"] = s.last_lr
    if run.pass_kl:
        row["kl_weight"] = s.last_kl
    row["time"] = elapsed()
    row["nan_skips"] = s.epoch_skips
    prog.summary(row)
    if stop:
        prog.message(
            f"early stopping: no improvement of valid_{run.options.monitor} for "
            f"{best['bad_epochs']} epochs (best {best['best_loss']:.6g} at epoch "
            f"{best['best_epoch']})"
        )
    return dataclasses.replace(
        s,
        epoch=s.epoch + 1,
        batch=0,
        sums=(),
        weight=0.0,
        epoch_skips=0,
        stopped_early=stop,
        history=s.history + (row,),
        **best,
    )


def returned_history(
    run: Run, s: LoopState, compilations, resumed_from
) -> pd.DataFrame:
    """The history `fit` returns, with its `attrs` (see `fit`)."""
    history = history_frame(s.history)
    history.attrs["compilations"] = compilations
    if run.train.kind == "series":
        history.attrs["min_times"] = run.min_times
    history.attrs["best_epoch"] = s.best_epoch
    history.attrs["monitor"] = run.options.monitor
    history.attrs["best_valid"] = s.best_loss
    best_rows = [r for r in s.history if r["epoch"] == s.best_epoch]
    history.attrs["best_valid_loss"] = (
        best_rows[0].get("valid_loss") if best_rows else None
    )
    history.attrs["stopped_early"] = s.stopped_early
    history.attrs["nan_skips"] = s.nan_skips
    history.attrs["resumed_from_step"] = resumed_from
    history.attrs["steps"] = s.step
    return history
