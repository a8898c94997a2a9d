"""Data-parallel `fit(devices=N)`: latent ODE training throughput on 1, 2 and 4 devices,
and the overhead of the sharded path on one device.

The model and data are `latent_ode_step.py`'s periodic configuration scaled down to
the 2-core machine: `LatentODE(1)` with its defaults (ODE-RNN encoder, dopri5, every
MLP 100 wide, 3 IWAE samples), noisy sines on one shared grid of `--times` points of
which half are each series' observations, `--series` series, union layout, float32.
What is timed is `ctmodels.train.fit` itself (batch reading, placement, the compiled
step, the host-side bookkeeping): `fit`'s callback stamps the end of every step (it
runs after the step's outputs reached the host), and a step's time is the gap between
two stamps. The first `--warmup` steps of a run (compilation) are dropped; `fit` is
run `--reps` times per case from the same initial model (the same trajectory, so the
same solver work per step in every case), and a case's figure is the median step
time over all timed steps of all runs.

JAX fixes its device count when it starts, so every device count runs in its own
subprocess with `XLA_FLAGS=--xla_force_host_platform_device_count=N` (CPU devices
that share the machine's cores: on a machine with fewer cores than devices this
measures the sharded path's cost, not a speed-up). In each:

- strong scaling: the global batch fixed at `--batch` series, split over N devices;
- weak scaling: `--per-device` series per device (global batch `N * --per-device`).

A fourth subprocess (one device) times the overhead of the sharded path: `fit` with
`devices=None` (the plain path) against `devices=jax.local_devices()[:1]` (a
one-device mesh: the batch placed by `jax.device_put` every step, the parameters
replicated), interleaved run by run. Target: at most 5% slower.

Output: one JSON line per case (printed, and written to `--out`,
default `benchmarks/results/scale.jsonl`): `case` ("strong", "weak", "overhead"),
`devices`, `batch`, `median_step_s`, `series_per_s` (batch / median step), and for
the scaling cases `speedup` (series/s over the same case's on one device) and
`efficiency` (speedup / devices: 1 is perfect scaling, strong and weak alike); the
overhead line has `plain_step_s`, `sharded_step_s` and `overhead` (their ratio
minus 1).

Usage:
  python benchmarks/scale.py [--quick] [--reps N] [--steps N] [--devices 1,2,4]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="a tiny smoke run")
    p.add_argument("--series", type=int, default=512)
    p.add_argument("--times", type=int, default=100)
    p.add_argument("--batch", type=int, default=64, help="strong scaling's batch")
    p.add_argument("--per-device", type=int, default=16, help="weak scaling's")
    p.add_argument("--steps", type=int, default=8, help="steps per fit run")
    p.add_argument("--warmup", type=int, default=2, help="untimed first steps")
    p.add_argument("--reps", type=int, default=3, help="fit runs per case")
    p.add_argument("--devices", default="1,2,4")
    p.add_argument("--out", default=os.path.join(HERE, "results", "scale.jsonl"))
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.quick:
        args.series, args.times, args.batch, args.per_device = 64, 20, 16, 4
        args.steps, args.warmup, args.reps = 4, 1, 2
    return args


# ------------------------------------------------------------------ in a subprocess


def _data(args):
    import numpy as np

    from ctmodels.data import TimeSeries

    rng = np.random.default_rng(0)
    grid = np.sort(np.concatenate([[0.0], rng.uniform(0.0, 1.0, args.times - 1)]))
    freq = rng.uniform(1.0, 4.0, (args.series, 1))
    amp = rng.uniform(0.5, 1.5, (args.series, 1))
    phase = rng.uniform(0.0, 2 * np.pi, (args.series, 1))
    values = amp * np.sin(2 * np.pi * freq * grid + phase)
    values = values + rng.normal(0.0, 0.01, values.shape)
    for s in range(args.series):  # half of the grid observed, at random
        values[s, rng.choice(args.times, args.times // 2, replace=False)] = np.nan
    times = np.broadcast_to(grid, values.shape)
    return TimeSeries.from_arrays(times, values[..., None])


def _step_times(data, devices, batch, args) -> list[float]:
    """The step times of one `fit` run after its warm-up steps."""
    import jax

    from ctmodels.models import LatentODE
    from ctmodels.train import fit

    stamps = []
    model = LatentODE(1, key=jax.random.key(0))
    fit(model, data, steps=args.steps, batch_size=batch, devices=devices,
        key=jax.random.key(1), log=False, progress=False,
        callback=lambda info: stamps.append(time.perf_counter()))  # fmt: skip
    gaps = [b - a for a, b in zip(stamps, stamps[1:], strict=False)]
    return gaps[args.warmup - 1 :] if args.warmup >= 1 else gaps


def _child(args) -> None:
    import jax

    data = _data(args)
    if args.child == "overhead":
        cases = {"plain": None, "sharded": jax.local_devices()[:1]}
        times = {k: [] for k in cases}
        for _ in range(args.reps):  # interleaved, run by run
            for k, devices in cases.items():
                times[k] += _step_times(data, devices, args.batch, args)
        print(json.dumps({k: statistics.median(v) for k, v in times.items()}))
        return
    n = int(args.child)
    assert jax.local_device_count() == n, jax.devices()
    sizes = {"strong": args.batch, "weak": n * args.per_device}
    times = {k: [] for k in sizes}
    for _ in range(args.reps):
        for k, batch in sizes.items():
            times[k] += _step_times(data, n, batch, args)
    print(json.dumps({k: [sizes[k], statistics.median(v)] for k, v in times.items()}))


# ------------------------------------------------------------------ the driver


def _run_child(args, child: str, devices: int) -> dict:
    env = dict(os.environ)
    flags = env.get("XLA_FLAGS", "")
    env["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={devices}"
    env.setdefault("JAX_PLATFORMS", "cpu")
    argv = [a for a in sys.argv[1:] if a != "--child"]
    proc = subprocess.run(
        [sys.executable, os.path.abspath(__file__), *argv, "--child", child],
        env=env, capture_output=True, text=True,
    )  # fmt: skip
    if proc.returncode != 0:
        sys.exit(f"scale.py: the {child} subprocess failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.child is not None:
        _child(args)
        return
    counts = [int(c) for c in args.devices.split(",")]
    common = {
        "model": "LatentODE(1) defaults", "series": args.series,
        "times": args.times, "steps": args.steps, "warmup": args.warmup,
        "reps": args.reps, "cpu_count": os.cpu_count(),
        "machine": platform.machine(), "quick": args.quick,
        "load_avg_1m": round(os.getloadavg()[0], 2),
    }  # fmt: skip
    lines = []
    by_count = {}
    for n in counts:
        t0 = time.perf_counter()
        by_count[n] = _run_child(args, str(n), n)
        by_count[n]["wall_s"] = time.perf_counter() - t0
    base = by_count.get(1)
    for n in counts:
        for case in ("strong", "weak"):
            batch, step = by_count[n][case]
            line = {"case": case, "devices": n, "batch": batch,
                    "median_step_s": round(step, 5),
                    "series_per_s": round(batch / step, 1)}  # fmt: skip
            if base is not None:
                b_batch, b_step = base[case]
                speedup = (batch / step) / (b_batch / b_step)
                line["speedup"] = round(speedup, 3)
                line["efficiency"] = round(speedup / n, 3)
            lines.append({**line, **common})
    over = _run_child(args, "overhead", 1)
    lines.append({
        "case": "overhead", "devices": 1, "batch": args.batch,
        "plain_step_s": round(over["plain"], 5),
        "sharded_step_s": round(over["sharded"], 5),
        "series_per_s": round(args.batch / over["sharded"], 1),
        "overhead": round(over["sharded"] / over["plain"] - 1, 4), **common,
    })  # fmt: skip
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        for line in lines:
            print(json.dumps(line))
            f.write(json.dumps(line) + "\n")


if __name__ == "__main__":
    main()
