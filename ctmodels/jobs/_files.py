"""The files a job writes and reads besides the checkpoint itself: metrics JSON
(strict, atomic), `calibration.json` (which names the checkpoint it was made for),
and the way a `--checkpoint` argument is resolved and loaded."""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from .._outputs import json_safe
from ..train import checkpoint_fingerprint, load_checkpoint, write_text_atomic

CALIBRATION = "calibration.json"


def write_json(path: Path, obj) -> None:
    """Write `obj` as strict JSON atomically (a reader sees the old file or the new
    one); NaN (no points to score) is written as null."""
    text = json.dumps(json_safe(obj), indent=1, default=_json, allow_nan=False)
    write_text_atomic(path, text)


def _json(x):
    if isinstance(x, (np.integer, np.floating)):
        return x.item()
    if isinstance(x, np.ndarray):
        return x.tolist()
    return str(x)


def fingerprint(checkpoint: Path) -> str | None:
    """The SHA-256 of the checkpoint header at `checkpoint` (None if there is none)."""
    return checkpoint_fingerprint(checkpoint)


def write_calibration(checkpoint: Path, channels, scale) -> dict[str, Any]:
    """Write `calibration.json` (the residual std per channel, naming the checkpoint
    it belongs to) into `checkpoint`; returns what it wrote."""
    calibration = {
        "residual_std": dict(zip(channels, scale, strict=True)),
        "units": "normalised (train-split statistics)",
        "estimated_on": "validation split, interpolation and extrapolation tasks",
    }
    calibration["checkpoint_sha256"] = fingerprint(checkpoint)
    write_json(checkpoint / CALIBRATION, calibration)
    return calibration


def stamp_legacy_calibration(checkpoint: Path) -> None:
    """A calibration.json written before it named its checkpoint describes the
    checkpoint next to it (the job deleted it whenever a run started there): name
    that one now, so a run that changes the checkpoint makes it stale, as for a
    current one; without a checkpoint it describes nothing and is removed."""
    path = checkpoint / CALIBRATION
    if not path.is_file():
        return
    try:
        stored = json.loads(path.read_text())
    except ValueError:
        return  # damaged: reading it says so
    if not isinstance(stored, dict) or "checkpoint_sha256" in stored:
        return
    made_for = fingerprint(checkpoint)
    if made_for is None:
        path.unlink()
    else:
        write_json(path, {**stored, "checkpoint_sha256": made_for})


def read_calibration(checkpoint: Path, channels) -> list[float] | None:
    """The residual std per channel that `fit` wrote next to the checkpoint (None
    for a checkpoint without one: the model's own spread)."""
    for path in (checkpoint / CALIBRATION, checkpoint.parent / CALIBRATION):
        if path.is_file():
            try:
                stored = json.loads(path.read_text())
                scale = [stored["residual_std"][c] for c in channels]
                nulls = [c for c, v in zip(channels, scale, strict=True) if v is None]
                if nulls:  # NaN is written as null
                    raise ValueError(
                        f"no finite residual std for channel(s) {nulls}: the "
                        "model's validation predictions were not finite"
                    )
                scale = [float(v) for v in scale]
            except (ValueError, KeyError, TypeError) as e:
                raise ValueError(
                    f"{path} is damaged or does not match the checkpoint's channels "
                    f"{list(channels)} ({type(e).__name__}: {e}); delete it to use "
                    "the model's own (uncalibrated) predictive spread."
                ) from e
            made_for = stored.get("checkpoint_sha256")  # absent: written before 0.1
            if made_for is not None and made_for != fingerprint(path.parent):
                warnings.warn(
                    f"{path} was made for an earlier checkpoint than the one in "
                    f"{str(path.parent)!r} (training went on after it, or a new run "
                    "started there and has not finished), so it is not used: "
                    "predictive spreads are the model's own, which are far too "
                    "narrow. Finish the run (rerun `ctmodels fit` with its options) "
                    "to calibrate it.",
                    stacklevel=2,
                )
                return None
            return scale
    return None


def resolve_checkpoint_dir(path: str | Path) -> Path:
    """A `--checkpoint` argument (a `fit` --out directory or its checkpoint/) as the
    checkpoint directory; FileNotFoundError if there is nothing."""
    path = Path(path)
    if (path / "checkpoint").is_dir():
        path = path / "checkpoint"
    if not path.exists():
        raise FileNotFoundError(f"Checkpoint {str(path)!r} does not exist.")
    return path


def load_job_checkpoint(checkpoint: str | Path, family: str | None = None):
    """`(family name, model, job state)` of the job checkpoint at `checkpoint` (the
    state holds what `fit` recorded: channels, normaliser, time unit, ... and the
    calibrated spread as `scale`). With `family`, a checkpoint of another family is
    refused."""
    from ._family import _FAMILIES

    where = resolve_checkpoint_dir(checkpoint)
    model, meta = load_checkpoint(where)
    state = dict(meta.get("extra_state") or {})
    job = state.get("job")
    if family is not None and job != family:
        raise ValueError(
            f"{where} is not a {family} checkpoint (written by `ctmodels fit "
            f"{family}`)."
        )
    if job not in _FAMILIES:
        known = ", ".join(sorted(_FAMILIES))
        raise ValueError(
            f"{where} is not a checkpoint written by `ctmodels fit` for a registered "
            f"model family (it records {job!r}; the families: {known}). Register "
            "its family (ctmodels.jobs.register_family) before loading it."
        )
    state["scale"] = (
        read_calibration(where, state["channels"])
        if _FAMILIES[job].calibrate and "channels" in state
        else None
    )
    return job, model, state
