"""Checks on the jobs' output paths, made before any work, and JSON they write.

A job that trains for minutes and then cannot write its result (an `--out` that is a
file, a folder under a file) loses the work; these checks say what is wrong first.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np


def _existing_ancestor(path: Path) -> Path:
    parent = path
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    return parent


def check_out_dir(path: str | Path, flag: str = "--out") -> Path:
    """`path` as a directory a job may create or write into (ValueError if not)."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ValueError(f"{flag} {str(path)!r} is a file; give a directory.")
    _check_parent(path, flag)
    return path


def check_out_file(path: str | Path, flag: str = "--out", example: str = "") -> Path:
    """`path` as a file a job may create or replace (ValueError if not)."""
    raw = str(path)
    ends_in_sep = raw.endswith(("/", "\\"))
    path = Path(path)
    if path.is_dir() or ends_in_sep:
        hint = f", e.g. {str(path / example)!r}" if example else ""
        what = "is a directory" if path.is_dir() else "ends in '/' (a directory)"
        raise ValueError(f"{flag} {raw!r} {what}; give a file path{hint}.")
    _check_parent(path, flag)
    return path


def _check_parent(path: Path, flag: str) -> None:
    base = _existing_ancestor(path.parent)
    if base.exists() and not base.is_dir():
        raise ValueError(
            f"{flag} {str(path)!r} cannot be created: {str(base)!r} is a file, not "
            "a directory."
        )


def json_safe(obj: Any) -> Any:
    """`obj` with NaN / inf floats as None (strict JSON: `null`), recursively."""
    if isinstance(obj, (float, np.floating)):
        return float(obj) if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    return obj
