"""`fit`'s save points: where a rollback returns to, and (with a `checkpoint_dir`)
an atomic checkpoint of everything an exact resume needs, plus `history.csv`."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import TYPE_CHECKING, Any

import jax
import pandas as pd

from ._checkpoint import write_checkpoint, write_text_atomic
from ._history import history_frame
from ._state import Clock, LoopState

if TYPE_CHECKING:
    from ._run import Run

_STREAMS = (
    "epoch e: fold_in(fold_in(key, 0), e); step s: fold_in(fold_in(key, 1), s); "
    "valid batch i: fold_in(fold_in(key, 2), i)"
)


def _token(s: LoopState) -> tuple[int, int, int, int]:
    return (s.step, s.epoch, s.batch, len(s.history))


class SavePoints:
    """Call with a state to make it a save point; the checkpoint is written unless
    this very state was the last one written (or the one resumed from)."""

    def __init__(self, run: Run, clock: Clock, resumed: LoopState | None):
        self.run = run
        self.clock = clock
        # no need to rewrite the checkpoint just read
        self.saved = None if resumed is None else _token(resumed)

    def __call__(self, s: LoopState) -> LoopState:
        """A checkpoint (if there is a folder) and the rollback target."""
        s = dataclasses.replace(s, rollbacks=0)
        token = _token(s)
        if self.run.ckpt_path is not None and self.saved != token:
            if jax.process_index() == 0:  # with several processes, written once
                self._write(s)
            self.saved = token
        return s

    def _write(self, s: LoopState) -> None:
        run = self.run
        frame = history_frame(s.history)
        header = {
            **run.model_desc,
            "default": "best_model"
            if run.options.restore_best and s.best_model is not None
            else "model",
            "metadata": self._metadata(s, frame),
        }
        trees = {"model": s.model, "opt_state": s.opt_state, "best_model": s.best_model}
        if run.placement is not None:  # host arrays: resumable on any device count
            trees = run.placement.to_host(trees)
        write_checkpoint(run.ckpt_path, trees, header)
        write_text_atomic(
            Path(run.options.checkpoint_dir) / "history.csv",
            frame.to_csv(index=False),
        )

    def _metadata(self, s: LoopState, frame: pd.DataFrame) -> dict[str, Any]:
        run = self.run
        return {
            "fit": run.config,
            "compare": run.compare,
            "state": s.progress_json(),
            "elapsed": self.clock(),
            "rng": {
                "key_data": run.key_data,
                "streams": _STREAMS,
                "step": s.step,
                "epoch": s.epoch,
                "batch": s.batch,
            },
            "history": [dict(r) for r in s.history],
            # the header is written with sorted keys: the columns' own order
            "history_columns": list(frame.columns),
            "extra_state": run.extra_json,
        }
