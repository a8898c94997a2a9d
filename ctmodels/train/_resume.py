"""Resuming `fit`: is the checkpoint in `checkpoint_dir` a checkpoint of this very
run (same model, data sizes, key and settings), and if so, its loop state."""

from __future__ import annotations

import dataclasses
import inspect
import os
from pathlib import Path
from typing import Any

from ._checkpoint import (
    FIT_SUBDIR,
    jsonable,
    read_header,
    read_tree,
    resolve_checkpoint,
)
from ._history import in_order
from ._options import json_roundtrip
from ._state import LoopState, strong

# run settings added after checkpoints were first written: their value in those
_COMPARE_DEFAULTS = {"monitor": "loss"}

_INSTEAD = (
    "pass resume=False to start afresh (the checkpoint there is overwritten), or use "
    "another checkpoint_dir."
)


class ResumeRefused(ValueError):
    """`fit` cannot resume the checkpoint in `checkpoint_dir`: `reason` says what it
    holds instead, `diffs` (for a different run) how its settings differ. A caller
    with its own words for "resume=False" and "checkpoint_dir" (the CLI) builds its
    message from these."""

    def __init__(self, message: str, *, reason: str, diffs=()):
        super().__init__(message)
        self.reason = reason
        self.diffs = list(diffs)


def pow2_era(checkpoint_dir) -> bool:
    """Whether `checkpoint_dir` holds a checkpoint of a run on time series written
    before `time_bucket="auto"` became `fit`'s default (its configuration has no
    `min_times`) with that earlier default, "pow2"."""
    path = Path(checkpoint_dir) / FIT_SUBDIR
    if resolve_checkpoint(path) is None:
        return False
    try:
        meta = read_header(path)[1].get("metadata", {})
    except ValueError:  # a damaged header: resuming reports it
        return False
    config = meta.get("fit", {})
    return (
        isinstance(config, dict)
        and "min_times" not in config
        and meta.get("compare", {}).get("time_bucket") == "pow2"
    )


def resume(ckpt_path, model, opt_state0, model_desc, compare, checkpoint_dir):
    """The loop state stored in the checkpoint at `ckpt_path` and the seconds its
    run had trained; `ResumeRefused` if it is not a checkpoint of this run."""
    where, header = read_header(ckpt_path)
    meta = header.get("metadata", {})
    if "fit" not in meta or "state" not in meta:
        raise ResumeRefused(
            f"checkpoint_dir {os.fspath(checkpoint_dir)!r} holds a checkpoint that was "
            "not written by fit, so it cannot be resumed. Pass resume=False to start "
            "afresh (it is overwritten) or use another checkpoint_dir.",
            reason="a checkpoint that was not written by fit",
        )
    diffs = _model_diffs(header, model, model_desc) + _setting_diffs(meta, compare)
    if diffs:
        raise ResumeRefused(
            f"checkpoint_dir {os.fspath(checkpoint_dir)!r} holds a checkpoint of a "
            "different run, so it cannot be resumed:\n  - "
            + "\n  - ".join(diffs)
            + "\nResume with the same arguments, "
            + _INSTEAD,
            reason="a checkpoint of a different run",
            diffs=diffs,
        )
    trees = _read_trees(where, header, model, opt_state0, checkpoint_dir)
    resumed = LoopState.from_json(meta["state"], **trees)
    resumed = dataclasses.replace(
        resumed,
        history=tuple(
            in_order(r, meta.get("history_columns")) for r in meta.get("history", [])
        ),  # fmt: skip
    )
    return resumed, float(meta.get("elapsed", 0.0))


def _model_diffs(header: dict, model: Any, model_desc: dict) -> list[str]:
    """How the checkpoint's model class / hyperparameters differ from this model's."""
    old_hp = header.get("hyperparameters")
    new_hp = json_roundtrip(model_desc["hyperparameters"])
    if header.get("model_class") != model_desc["model_class"]:
        return [
            f"model class: checkpoint {header.get('model_class')!r}, now "
            f"{model_desc['model_class']!r}"
        ]
    if old_hp == new_hp:
        return []
    o, n = dict(old_hp or []), dict(new_hp or [])
    # a hyperparameter added to the model after the checkpoint was written has,
    # in that checkpoint, its constructor default
    params = inspect.signature(type(model).__init__).parameters
    for k in set(n) - set(o):
        default = getattr(params.get(k), "default", inspect.Parameter.empty)
        if default is not inspect.Parameter.empty:
            try:
                o[k] = json_roundtrip(jsonable(default, k))
            except ValueError:  # not JSON: it cannot match a stored value
                pass
    return [
        f"model hyperparameter {k}: checkpoint {o.get(k, '<absent>')!r}, "
        f"now {n.get(k, '<absent>')!r}"
        for k in sorted(set(o) | set(n))
        if o.get(k, "<absent>") != n.get(k, "<absent>")
    ]


def _setting_diffs(meta: dict, compare: dict) -> list[str]:
    """How the checkpoint's run settings (key, data sizes, ...) differ from these."""
    old_cmp = {**_COMPARE_DEFAULTS, **meta.get("compare", {})}
    # written before min_times was recorded: no "auto" floor (checked by time_bucket)
    old_cmp.setdefault("min_times", compare.get("min_times"))
    diffs = []
    for k in sorted(set(old_cmp) | set(compare)):
        if k == "model_class":
            continue
        if old_cmp.get(k) != compare.get(k):
            what = "key (seed)" if k == "key" else k
            diffs.append(
                f"{what}: checkpoint {old_cmp.get(k)!r}, now {compare.get(k)!r}"
            )
    return diffs


def _read_trees(where, header, model, opt_state0, checkpoint_dir) -> dict[str, Any]:
    """The checkpoint's model, optimizer state and best model, strongly typed."""
    try:
        trees = {
            "model": read_tree(where, header, "model", model),
            "opt_state": read_tree(where, header, "opt_state", opt_state0),
            "best_model": read_tree(where, header, "best_model", model)
            if "best_model" in header.get("files", {})
            else None,
        }
    except ValueError as e:
        raise ResumeRefused(
            f"checkpoint_dir {os.fspath(checkpoint_dir)!r} holds a checkpoint that "
            f"does not fit this model or optimizer, so it cannot be resumed. {e} Or "
            + _INSTEAD,
            reason=f"a checkpoint that does not fit this model or optimizer ({e})",
        ) from e
    return {k: None if v is None else strong(v) for k, v in trees.items()}
