"""Shared by the benchmark scripts that time ctmodels against a peer side by side
(`ffjord_speed.py`, `deq_torchdeq.py`). Imports neither JAX nor torch: call
`single_thread()` before importing them."""

from __future__ import annotations

import math
import os
import time


def single_thread() -> None:
    """One thread for XLA, torch and the BLAS libraries (set before they load), and
    JAX on the CPU unless told otherwise."""
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "")
        + " --xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"
    ).strip()
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ.setdefault(name, "1")


def timed(runners: dict, reps: int, sample_s: float) -> dict[str, list[float]]:
    """Seconds per call of each runner: `reps` interleaved rounds, each sample
    repeating a call as often as fills `sample_s` (counted from one warm call)."""
    inner = {}
    for k, call in runners.items():
        t0 = time.perf_counter()
        call()
        dt = time.perf_counter() - t0
        inner[k] = max(1, math.ceil(sample_s / max(dt, 1e-6)))
    times = {k: [] for k in runners}
    for _ in range(reps):
        for k, call in runners.items():
            t0 = time.perf_counter()
            for _ in range(inner[k]):
                call()
            times[k].append((time.perf_counter() - t0) / inner[k])
    return times
