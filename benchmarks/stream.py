"""Streaming `fit` from a zarr store of a million series: throughput and peak memory
against the in-memory path.

The store (`--series` series x `--times` times, default 10^6 x 100) is generated
chunk by chunk (`--chunk` series per zarr chunk, appended one after the other, so
generation holds one chunk): noisy sines of random frequency, amplitude and phase
on one shared grid of `--times` points in [0, 1], float32, NaN where a series is
not observed (half of the grid at random). It goes under `--dir` (default /tmp)
and is reused by later runs with the same shape (`--fresh` regenerates it).

Every case runs in its own subprocess (a clean peak RSS, `resource.getrusage`'s
`ru_maxrss`):

- `stream`: the whole store through the streaming recipe (`docs/scaling.md`):
  `from_xarray(xr.open_dataset(path, engine="zarr", chunks=None, cache=False),
  lazy=True)` on the store split by series (the last `--valid` series for
  validation), the normalisation statistics streamed in chunks
  (`Normalizer.fit(lazy)`), the source normalised lazily (`Normalizer.transform`)
  and `fit` for `--steps` steps with lazy validation data;
- `stream_subset`: the same on the first `--memory-series` series;
- `memory`: those `--memory-series` series loaded into memory first (`.load()`),
  the statistics and `fit` on the in-memory `TimeSeries` (the usual path).

The model is a small `NeuralODE` (`--latent` latent, `--hidden` wide, tsit5),
union layout, `--batch` series per batch, float32 on the CPU. Each case first
compiles the train and eval steps with a two-step `fit` on a few series in memory,
so that the measured `fit` (`compilations` 0) shows the data's memory and the steady
state, not XLA's compiler. Throughput (`series_per_s`) is the batch over the median
step time after `--warmup` steps (`fit`'s callback stamps each step's end; reading
overlaps the step through `fit`'s prefetch thread); `fit_s` is the measured fit's
wall time (with its validation pass). Memory, all RSS of the case's subprocess
(Linux: `/proc/self/status`'s VmHWM, reset with `/proc/self/clear_refs` before each
measured part): `rss_open_mb` after the imports and opening (for `memory`: loading)
the data, `normalizer_peak_rss_mb` the peak while the statistics are computed,
`rss_before_fit_mb` after the compiling fit, `fit_peak_rss_mb` the peak during the
measured fit and `fit_rss_growth_mb` its growth over `rss_before_fit_mb`;
`process_peak_rss_mb` is `resource.getrusage`'s `ru_maxrss` at the end (since the
last reset). `store_mb` is the store on disk (compressed), `store_raw_mb` its
float32 values uncompressed.

Output: one JSON line per case (printed, and written to `--out`, default
`benchmarks/results/stream.jsonl`).

Usage:
  python benchmarks/stream.py [--quick] [--series N] [--steps N] [--dir DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="a small smoke run")
    p.add_argument("--dir", default="/tmp", help="where the store goes")
    p.add_argument("--series", type=int, default=1_000_000)
    p.add_argument("--times", type=int, default=100)
    p.add_argument("--chunk", type=int, default=4096, help="series per zarr chunk")
    p.add_argument(
        "--block",
        type=int,
        default=1024,
        help="series per contiguous read (LazyTimeSeries block_size)",
    )
    p.add_argument("--valid", type=int, default=2048, help="validation series")
    p.add_argument(
        "--memory-series",
        type=int,
        default=100_000,
        help="the subset read in memory (and streamed) for comparison",
    )
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--warmup", type=int, default=5, help="untimed first steps")
    p.add_argument("--latent", type=int, default=4)
    p.add_argument("--hidden", type=int, default=16)
    p.add_argument("--cases", default="stream,stream_subset,memory")
    p.add_argument("--fresh", action="store_true", help="regenerate the store")
    p.add_argument("--out", default=os.path.join(HERE, "results", "stream.jsonl"))
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.quick:
        args.series, args.memory_series, args.steps = 40_000, 10_000, 30
        args.valid, args.chunk = 512, 1024
    return args


def _rss_mb() -> float:
    """The current RSS (Linux: /proc/self/statm), in MiB."""
    with open("/proc/self/statm") as f:
        pages = int(f.read().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def _reset_peak() -> None:
    """Reset this process's peak RSS (VmHWM) to its current RSS (Linux >= 4.0)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def _hwm_mb() -> float:
    """This process's peak RSS since the last `_reset_peak` (VmHWM), in MiB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def store_path(args) -> str:
    return os.path.join(args.dir, f"ctmodels_stream_{args.series}x{args.times}.zarr")


# ------------------------------------------------------------------ in a subprocess


def generate(path: str, n: int, n_times: int, chunk: int, seed: int = 0) -> None:
    """Write the store chunk by chunk (each chunk drawn from its own seed)."""
    import numpy as np
    import xarray as xr

    grid = np.linspace(0.0, 1.0, n_times)
    for start in range(0, n, chunk):
        m = min(chunk, n - start)
        rng = np.random.default_rng([seed, start])
        freq = rng.uniform(1.0, 4.0, (m, 1))
        amp = rng.uniform(0.5, 1.5, (m, 1))
        phase = rng.uniform(0.0, 2 * np.pi, (m, 1))
        x = amp * np.sin(2 * np.pi * freq * grid + phase)
        x = (x + rng.normal(0.0, 0.05, x.shape)).astype(np.float32)
        x[rng.uniform(size=x.shape) < 0.5] = np.nan
        x[:, 0] = (amp * np.sin(phase))[:, 0]  # every series observed at t = 0
        ds = xr.Dataset({"x": (("series", "time"), x)}, coords={"time": grid})
        if start == 0:
            ds.to_zarr(path, mode="w", consolidated=False,
                       encoding={"x": {"chunks": (chunk, n_times)}})  # fmt: skip
        else:
            ds.to_zarr(path, append_dim="series", consolidated=False)


def _child(args) -> None:
    import warnings

    warnings.filterwarnings("ignore", module="zarr")
    if args.child == "generate":
        t0 = time.perf_counter()
        generate(store_path(args), args.series, args.times, args.chunk)
        print(json.dumps({"generate_s": time.perf_counter() - t0,
                          "peak_rss_mb": _peak_rss_mb()}))  # fmt: skip
        return
    import jax
    import numpy as np
    import xarray as xr

    import ctmodels.data as cd
    from ctmodels.models import NeuralODE
    from ctmodels.train import fit

    ds = xr.open_dataset(store_path(args), engine="zarr", chunks=None, cache=False,
                         consolidated=False)  # fmt: skip
    n = args.series if args.child == "stream" else args.memory_series
    n_train = n - args.valid

    def part(sl):
        src = cd.from_xarray(ds.isel(series=sl), lazy=True, block_size=args.block)
        return src.load() if args.child == "memory" else src

    t0 = time.perf_counter()
    train, valid = part(slice(0, n_train)), part(slice(n_train, n))
    open_s = time.perf_counter() - t0
    rss_open = _rss_mb()
    _reset_peak()
    t0 = time.perf_counter()
    norm = cd.Normalizer.fit(train, time_scale="span")
    norm_s = time.perf_counter() - t0
    norm_peak = _hwm_mb()
    train_n, valid_n = norm.transform(train), norm.transform(valid)

    def node():
        return NeuralODE(1, latent_size=args.latent, hidden_size=args.hidden,
                         key=jax.random.key(0))  # fmt: skip

    # compile the train and eval steps first, on a few series in memory, so that
    # the measured fit's memory is the data's and the steady state's
    few = norm.transform(train[np.arange(8 * args.batch)])
    t0 = time.perf_counter()
    fit(node(), few, valid=few, steps=2, batch_size=args.batch,
        key=jax.random.key(1), log=False, progress=False)  # fmt: skip
    compile_s = time.perf_counter() - t0
    del few
    rss_before = _rss_mb()
    _reset_peak()
    stamps = []
    t0 = time.perf_counter()
    _, hist = fit(node(), train_n, valid=valid_n, steps=args.steps,
                  batch_size=args.batch, key=jax.random.key(1), log=False,
                  progress=False,
                  callback=lambda info: stamps.append(time.perf_counter()))  # fmt: skip
    fit_s = time.perf_counter() - t0
    fit_peak = _hwm_mb()
    gaps = np.diff(stamps)[max(args.warmup - 1, 0) :]
    step = statistics.median(gaps.tolist())
    print(json.dumps({
        "train_series": n_train, "valid_series": args.valid,
        "open_s": round(open_s, 2), "normalizer_s": round(norm_s, 2),
        "compile_s": round(compile_s, 1), "fit_s": round(fit_s, 2),
        "compilations": hist.attrs["compilations"],
        "median_step_s": round(step, 5),
        "series_per_s": round(args.batch / step, 1),
        "rss_open_mb": round(rss_open, 1),
        "normalizer_peak_rss_mb": round(norm_peak, 1),
        "rss_before_fit_mb": round(rss_before, 1),
        "fit_peak_rss_mb": round(fit_peak, 1),
        "fit_rss_growth_mb": round(fit_peak - rss_before, 1),
        "process_peak_rss_mb": round(_peak_rss_mb(), 1),
        "valid_loss": float(hist["valid_loss"].iloc[-1]),
    }))  # fmt: skip


# ------------------------------------------------------------------ the driver


def _run_child(args, child: str) -> dict:
    env = dict(os.environ)
    env.setdefault("JAX_PLATFORMS", "cpu")
    argv = [a for a in (sys.argv[1:] if args.argv is None else args.argv)]
    proc = subprocess.run(
        [sys.executable, os.path.abspath(__file__), *argv, "--child", child],
        env=env, capture_output=True, text=True,
    )  # fmt: skip
    if proc.returncode != 0:
        sys.exit(f"stream.py: the {child} subprocess failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _size_mb(path: str) -> float:
    total = 0
    for d, _, files in os.walk(path):
        total += sum(os.path.getsize(os.path.join(d, f)) for f in files)
    return total / 2**20


def main(argv=None) -> None:
    args = parse_args(argv)
    args.argv = argv
    if args.child is not None:
        _child(args)
        return
    path = store_path(args)
    lines = []
    common = {
        "series": args.series, "times": args.times, "chunk": args.chunk,
        "block": args.block, "batch": args.batch, "steps": args.steps,
        "model": f"NeuralODE(1, latent {args.latent}, hidden {args.hidden})",
        "cpu_count": os.cpu_count(), "machine": platform.machine(),
        "quick": args.quick,
    }  # fmt: skip
    if args.fresh or not os.path.exists(path):
        shutil.rmtree(path, ignore_errors=True)
        gen = _run_child(args, "generate")
        lines.append({"case": "generate", "generate_s": round(gen["generate_s"], 1),
                      "peak_rss_mb": round(gen["peak_rss_mb"], 1)})  # fmt: skip
    raw_mb = args.series * args.times * 4 / 2**20  # float32 values
    store = {"store_mb": round(_size_mb(path), 1), "store_raw_mb": round(raw_mb, 1)}
    for line in lines:
        line.update(store, **common)
    for case in args.cases.split(","):
        r = _run_child(args, case)
        lines.append({"case": case, **r, **store, **common,
                      "load_avg_1m": round(os.getloadavg()[0], 2)})  # fmt: skip
        print(json.dumps(lines[-1]), flush=True)
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        for line in lines:
            f.write(json.dumps(line) + "\n")


if __name__ == "__main__":
    main()
