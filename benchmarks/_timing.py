"""Shared by the benchmark scripts that time ctmodels against a peer side by side
(`ffjord_speed.py`, `deq_torchdeq.py`, `lgssm_speed.py`, `lgssm_known_model.py`):
the one-thread setup, interleaved timing, and their JSON-lines records. Imports
neither JAX nor torch: call `single_thread()` before importing them."""

from __future__ import annotations

import json
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


def device_from_argv(argv) -> str:
    """`--device cpu|gpu` read from the command line before JAX or torch is imported
    (it decides their settings); `"cpu"` when absent."""
    for i, a in enumerate(argv):
        if a == "--device" and i + 1 < len(argv):
            return argv[i + 1]
        if a.startswith("--device="):
            return a.split("=", 1)[1]
    return "cpu"


def add_device_argument(parser) -> None:
    """`--device cpu|gpu` on an argparse parser (read early by `device_from_argv`)."""
    parser.add_argument(
        "--device",
        choices=("cpu", "gpu"),
        default="cpu",
        help="cpu: one thread each; gpu: JAX and torch on the first GPU",
    )


def setup_device(device: str) -> None:
    """Before JAX and torch are imported: `"cpu"`, one thread each
    (`single_thread`); `"gpu"`, both on the first GPU (no thread limits, no
    up-front grab of most of its memory by JAX)."""
    if device == "cpu":
        single_thread()
    elif device == "gpu":
        os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    else:
        raise SystemExit(f"--device must be cpu or gpu, got {device!r}.")


def check_device(device: str):
    """After the imports: refuse `--device gpu` where JAX or torch sees no GPU, and
    return `(torch device, sync)`, where `sync()` waits for torch's queued GPU work
    (a torch step's time must include its backward pass, which runs
    asynchronously on a GPU; JAX's runners block on their outputs already)."""
    import jax
    import torch

    if device == "gpu":
        if jax.default_backend() != "gpu":
            raise SystemExit(
                f"--device gpu, but JAX runs on {jax.default_backend()!r}: install a "
                "JAX with CUDA (e.g. pip install 'jax[cuda13]') or leave --device "
                "out."
            )
        if not torch.cuda.is_available():
            raise SystemExit("--device gpu, but torch sees no CUDA device.")
        return torch.device("cuda"), torch.cuda.synchronize
    torch.set_num_threads(1)
    return torch.device("cpu"), lambda: None


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


def emit(obj, fh) -> None:
    """One JSON line to stdout and to the open results file `fh`."""
    line = json.dumps(obj)
    print(line, flush=True)
    fh.write(line + "\n")
    fh.flush()


def read_jsonl(paths) -> list[dict]:
    """The records of recorded runs (`--summarise FILE.jsonl ...`), in order."""
    rows = []
    for path in paths:
        with open(path) as f:
            rows += [json.loads(line) for line in f if line.strip()]
    return rows


def package_version(name: str) -> str | None:
    """An installed distribution's version, or None where it is not installed."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return None
