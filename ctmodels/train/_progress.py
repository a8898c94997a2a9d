"""A small progress bar on stderr (no dependency) and the per-epoch summary line."""

from __future__ import annotations

import logging
import math
import sys
import time
from collections.abc import Callable
from typing import Any

_LOGGER = logging.getLogger("ctmodels.train")


def _fmt_time(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    seconds = int(round(seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m:02d}:{s:02d}"


def _fmt_num(x: Any) -> str:
    try:
        x = float(x)
    except (TypeError, ValueError):
        return str(x)
    if not math.isfinite(x):
        return str(x)
    return f"{x:.4g}"


def resolve_log(log: Any) -> Callable[[str], None] | None:
    if log is None:
        return _LOGGER.info
    if log is False:
        return None
    if isinstance(log, logging.Logger):
        return log.info
    if callable(log):
        return log
    raise ValueError(
        f"log must be None (the 'ctmodels.train' logger), False, a logging.Logger or "
        f"a callable taking one string; got {log!r}."
    )


class Progress:
    """`epoch e/E | step s/S [####----] 40% | loss 0.123 | 52.1 it/s | ETA 00:12`.

    Shown on `stream` when `enabled` (redrawn at most `refresh` times a second); the
    per-epoch summary then goes to the same stream, otherwise to `log`.
    """

    def __init__(
        self,
        *,
        total_steps: int,
        total_epochs: int | None,
        start_step: int,
        enabled: bool | None,
        log: Callable[[str], None] | None,
        stream=None,
        refresh: float = 10.0,
    ):
        self.stream = sys.stderr if stream is None else stream
        if enabled is None:
            isatty = getattr(self.stream, "isatty", None)
            try:
                enabled = bool(isatty and isatty())
            except ValueError:  # closed stream
                enabled = False
        self.enabled = bool(enabled)
        self.log = log
        self.total_steps = total_steps
        self.total_epochs = total_epochs
        self.start_step = start_step
        self.first: tuple[int, float] | None = None
        self.last_draw = -math.inf
        self.interval = 1.0 / refresh
        self.width = 0

    def _write(self, text: str) -> None:
        try:
            self.stream.write(text)
            self.stream.flush()
        except (ValueError, OSError):  # closed stream: stay quiet
            self.enabled = False

    def rate(self, step: int) -> float:
        """Steps per second, timed from the first step done (which compiles)."""
        now = time.perf_counter()
        if self.first is None:
            self.first = (step, now)
            return math.nan
        done, dt = step - self.first[0], now - self.first[1]
        return done / dt if dt > 0 and done > 0 else math.nan

    def update(self, *, step: int, epoch: int, loss: Any, force: bool = False):
        if not self.enabled:
            return
        if self.first is None:
            self.rate(step)
        now = time.perf_counter()
        if not force and now - self.last_draw < self.interval:
            return
        self.last_draw = now
        rate = self.rate(step)
        eta = (self.total_steps - step) / rate if rate > 0 else math.nan
        frac = min(1.0, step / max(1, self.total_steps))
        bar = "#" * int(20 * frac)
        ep = f"epoch {epoch + 1}" + (
            f"/{self.total_epochs}" if self.total_epochs is not None else ""
        )
        line = (
            f"{ep} | step {step}/{self.total_steps} [{bar:<20}] {100 * frac:3.0f}% | "
            f"loss {_fmt_num(loss)} | "
            f"{'?' if math.isnan(rate) else f'{rate:.1f}'} it/s | ETA {_fmt_time(eta)}"
        )
        pad = max(0, self.width - len(line))
        self.width = len(line)
        self._write("\r" + line + " " * pad)

    def summary(self, row: dict[str, Any]) -> None:
        parts = [f"epoch {row['epoch']}", f"step {row['step']}"]
        for k, v in row.items():
            if k in ("epoch", "step"):
                continue
            if k == "time":
                parts.append(f"time {_fmt_time(v)}")
            elif k == "nan_skips":
                if v:
                    parts.append(f"nan_skips {v}")
            elif isinstance(v, float) and math.isnan(v):
                continue
            else:
                parts.append(f"{k} {_fmt_num(v)}")
        line = " | ".join(parts)
        if self.enabled:
            pad = max(0, self.width - len(line))
            self.width = 0
            self._write("\r" + line + " " * pad + "\n")
        elif self.log is not None:
            self.log(line)

    def message(self, text: str) -> None:
        if self.enabled:
            pad = max(0, self.width - len(text))
            self.width = 0
            self._write("\r" + text + " " * pad + "\n")
        elif self.log is not None:
            self.log(text)

    def close(self) -> None:
        if self.enabled and self.width:
            self._write("\n")
            self.width = 0
