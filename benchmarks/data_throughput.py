"""Batching throughput and streaming memory on nafld2 (~400k observations) from netCDF.

Cases (one JSON line each):

- `batching`: one epoch of shuffled, bucketed batches from the netCDF file read lazily
  (dask, batch by batch) and from memory: seconds per batch.
- `train_step`: one jitted training step of a small latent ODE on those batches
  (median over steps after compilation), and the ratio batching / step (target < 0.10).
- `memory`: peak RSS of a subprocess that streams every batch of the file lazily, of
  one that loads the file whole, and of one that streams a file 10x larger (nafld2
  tiled 10 times): streaming memory must stay bounded (not grow with the file).

Usage: `python benchmarks/data_throughput.py [--batch-size 64] [--steps 20]`
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def _write_file(path: Path, tiles: int = 1) -> dict:
    import xarray as xr

    import ctmodels.datasets as D

    ds = D.load("nafld2")
    if tiles > 1:
        parts = []
        for k in range(tiles):
            part = ds.copy()
            part = part.assign_coords(series=ds["series"].values + k * 10_000_000)
            parts.append(part)
        ds = xr.concat(parts, dim="series")
    chunks = {"series": 256}
    enc = {
        v: {"chunksizes": tuple(chunks.get(d, ds.sizes[d]) for d in ds[v].dims)}
        for v in ds.data_vars
        if ds[v].ndim >= 1
    }
    ds.to_netcdf(path, encoding=enc)
    n_obs = int(sum(int(ds[c].notnull().sum()) for c in ds.attrs["channels"].split()))
    return {
        "series": int(ds.sizes["series"]),
        "observations": n_obs,
        "file_mb": round(path.stat().st_size / 2**20, 1),
    }


def _vm_hwm_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _stream(path: str, lazy: bool, batch_size: int, layout: str) -> None:
    """Subprocess body: iterate every batch, print peak RSS (MiB).

    Peak RSS is VmHWM from /proc (ru_maxrss survives exec on Linux and would report
    the parent's peak)."""
    import jax
    import xarray as xr

    import ctmodels.data as cd

    if lazy:
        ds = xr.open_dataset(path, chunks={"series": 256})
    else:
        ds = xr.load_dataset(path)
    src = cd.from_xarray(ds, static=[])
    base = _vm_hwm_mb()
    n = 0
    t0 = time.perf_counter()
    for _batch in cd.batches(
        src, batch_size, key=jax.random.key(0), layout=layout, shuffle="block"
    ):
        n += 1
    dt = time.perf_counter() - t0
    peak = _vm_hwm_mb()
    print(json.dumps({"peak_rss_mb": round(peak, 1), "before_mb": round(base, 1),
                      "batches": n, "seconds": round(dt, 2)}))  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--layout", default="padded")
    parser.add_argument("--stream", nargs=2, metavar=("PATH", "LAZY"))
    args = parser.parse_args()
    if args.stream:
        _stream(args.stream[0], args.stream[1] == "1", args.batch_size, args.layout)
        return

    import equinox as eqx
    import jax
    import optax
    import xarray as xr

    import ctmodels.data as cd
    from ctmodels.models import LatentODE

    tmp = Path(tempfile.mkdtemp(prefix="ctm-throughput-"))
    path = tmp / "nafld2.nc"
    info = _write_file(path)
    print(json.dumps({"case": "file", **info}), flush=True)

    ds = xr.open_dataset(path, chunks={"series": 256})
    lazy = cd.from_xarray(ds, static=[])
    t0 = time.perf_counter()
    eager = cd.from_xarray(xr.load_dataset(path), static=[])
    t_load = time.perf_counter() - t0
    norm = cd.Normalizer.fit(eager, time_scale="span")

    def epoch(src, shuffle):
        t0 = time.perf_counter()
        out = [
            b
            for b in cd.batches(
                src,
                args.batch_size,
                key=jax.random.key(1),
                layout=args.layout,
                shuffle=shuffle,
            )  # fmt: skip
        ]
        return out, time.perf_counter() - t0

    batches_lazy, t_lazy = epoch(lazy, "block")
    _, t_lazy_full = epoch(lazy, "full")
    batches_mem, t_mem = epoch(eager, "full")
    nb = len(batches_mem)
    print(
        json.dumps(
            {
                "case": "batching",
                "batches": nb,
                "batch_size": args.batch_size,
                "layout": args.layout,
                "lazy_block_shuffle_s_per_batch": round(t_lazy / nb, 5),
                "lazy_full_shuffle_s_per_batch": round(t_lazy_full / nb, 5),
                "memory_s_per_batch": round(t_mem / nb, 5),
                "eager_load_s": round(t_load, 2),
                "time_buckets": sorted({int(b.times.shape[1]) for b in batches_mem}),
            }
        ),
        flush=True,
    )

    # one training step of a small latent ODE on the normalised batches
    model = LatentODE(eager.num_channels, latent_size=6, encoder_size=16, units=32,
                      key=jax.random.key(0))  # fmt: skip
    opt = optax.adam(1e-3)
    state = opt.init(eqx.filter(model, eqx.is_inexact_array))
    scale = np.asarray(norm.std)
    shift = np.asarray(norm.mean)

    def normalise(b):
        v = (b.values - shift) / scale
        return eqx.tree_at(
            lambda x: (x.values, x.times), b, (v * b.mask, b.times / norm.time_scale)
        )

    @eqx.filter_jit
    def step(model, state, batch, key):
        (loss, _), grads = eqx.filter_value_and_grad(
            lambda m: m.loss(batch, key=key), has_aux=True
        )(model)
        updates, state = opt.update(grads, state, model)
        return eqx.apply_updates(model, updates), state, loss

    times = []
    by_bucket = {}
    for b in batches_mem:
        by_bucket.setdefault(int(b.times.shape[1]), b)
    common = max(by_bucket, key=lambda k: sum(int(b.times.shape[1]) == k
                                             for b in batches_mem))  # fmt: skip
    sample = [b for b in batches_mem if int(b.times.shape[1]) == common]
    for i in range(args.steps + 1):
        b = normalise(sample[i % len(sample)])
        t0 = time.perf_counter()
        model, state, loss = step(model, state, b, jax.random.key(i))
        jax.block_until_ready(loss)
        if i:
            times.append(time.perf_counter() - t0)
    t_step = float(np.median(times))
    print(
        json.dumps(
            {
                "case": "train_step",
                "model": "LatentODE(latent 6, encoder 16, units 32)",
                "time_bucket": common,
                "step_s": round(t_step, 4),
                "batching_over_step_lazy_block": round(t_lazy / nb / t_step, 3),
                "batching_over_step_memory": round(t_mem / nb / t_step, 3),
                "target": "< 0.10",
            }
        ),
        flush=True,
    )

    # streaming memory (separate processes, peak RSS)
    big = tmp / "nafld2_x10.nc"
    big_info = _write_file(big, tiles=10)
    rows = {}
    for label, p, lazy_flag in (
        ("stream_1x", path, "1"),
        ("stream_10x", big, "1"),
        ("load_1x", path, "0"),
        ("load_10x", big, "0"),
    ):
        out = subprocess.run(
            [sys.executable, __file__, "--stream", str(p), lazy_flag,
             "--batch-size", str(args.batch_size), "--layout", args.layout],
            capture_output=True, text=True, env=os.environ, check=True,
        )  # fmt: skip
        rows[label] = json.loads(out.stdout.strip().splitlines()[-1])
    print(
        json.dumps(
            {
                "case": "memory",
                "file_1x_mb": info["file_mb"],
                "file_10x_mb": big_info["file_mb"],
                **{f"{k}_peak_rss_mb": v["peak_rss_mb"] for k, v in rows.items()},
                **{f"{k}_s": v["seconds"] for k, v in rows.items()},
            }
        ),
        flush=True,
    )


if __name__ == "__main__":
    main()
