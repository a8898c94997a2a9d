"""Batching throughput and streaming memory on nafld2 (~400k observations) from netCDF.

Cases (one JSON line each):

- `batching`: one epoch of shuffled, bucketed batches, reading alone (no read-ahead
  thread): from memory, and from the netCDF file read lazily batch by batch, through
  dask (`open_dataset(chunks=...)`) or through xarray's own lazy backend
  (`open_dataset(path)`, `from_xarray(..., lazy=True)`); block shuffle for the lazy
  sources. Seconds per batch.
- `train_step`: a jitted training step of a small latent ODE (median over steps of
  the most common time bucket, after compiling every bucket); the reading cost per
  batch over that step time; and the cost batching adds to training, the target
  (< 0.10): whole training epochs that read their batches as `fit` does (a thread
  reads the next batch of a lazy source while the step runs) against the same epoch
  on batches already in memory, interleaved, median of `--epochs` rounds
  (`added_in_training_*` = extra epoch time / epoch time).
- `memory`: peak RSS of a subprocess that streams every batch of the file lazily
  (through dask, and through xarray's lazy backend), of
  one that loads the file whole, and of one that streams a file 10x larger (nafld2
  tiled 10 times): streaming memory must stay bounded (not grow with the file).

Usage:
  python benchmarks/data_throughput.py [--batch-size 64] [--steps 20] [--epochs 3]
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


def _stream(path: str, mode: str, batch_size: int, layout: str) -> None:
    """Subprocess body: iterate every batch, print peak RSS (MiB).

    `mode`: "dask" (opened with chunks), "netcdf" (xarray's lazy backend, no dask) or
    "load" (read whole). Peak RSS is VmHWM from /proc (ru_maxrss survives exec on
    Linux and would report the parent's peak)."""
    import jax
    import xarray as xr

    import ctmodels.data as cd

    if mode == "dask":
        src = cd.from_xarray(xr.open_dataset(path, chunks={"series": 256}), static=[])
    elif mode == "netcdf":
        src = cd.from_xarray(xr.open_dataset(path, cache=False), static=[], lazy=True)
    else:
        src = cd.from_xarray(xr.load_dataset(path), static=[])
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
    parser.add_argument("--epochs", type=int, default=3, help="timed training rounds")
    parser.add_argument("--layout", default="padded")
    parser.add_argument("--stream", nargs=2, metavar=("PATH", "MODE"))
    args = parser.parse_args()
    if args.stream:
        _stream(args.stream[0], args.stream[1], args.batch_size, args.layout)
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

    lazy = cd.from_xarray(xr.open_dataset(path, chunks={"series": 256}), static=[])
    # xarray's own lazy backend (no dask): the file opened without chunks
    lazy_nc = cd.from_xarray(xr.open_dataset(path, cache=False), static=[], lazy=True)
    t0 = time.perf_counter()
    eager = cd.from_xarray(xr.load_dataset(path), static=[])
    t_load = time.perf_counter() - t0
    norm = cd.Normalizer.fit(eager, time_scale="span")
    for shuffle in ("full", "block"):  # compile the shuffles once, outside the timing
        cd.shuffle_order(jax.random.key(0), len(eager), shuffle=shuffle)

    def epoch(src, shuffle, prefetch=0):
        t0 = time.perf_counter()
        out = list(
            cd.batches(
                src,
                args.batch_size,
                key=jax.random.key(1),
                layout=args.layout,
                shuffle=shuffle,
                prefetch=prefetch,
            )
        )
        return out, time.perf_counter() - t0

    batches_mem, t_mem = epoch(eager, "full")
    _, t_lazy = epoch(lazy, "block")
    batches_nc, t_lazy_nc = epoch(lazy_nc, "block")
    _, t_lazy_full = epoch(lazy, "full")
    nb = len(batches_mem)
    print(
        json.dumps(
            {
                "case": "batching",
                "batches": nb,
                "batch_size": args.batch_size,
                "layout": args.layout,
                "note": "reading alone, no prefetch thread",
                "memory_s_per_batch": round(t_mem / nb, 5),
                "lazy_dask_block_shuffle_s_per_batch": round(t_lazy / nb, 5),
                "lazy_netcdf_block_shuffle_s_per_batch": round(t_lazy_nc / nb, 5),
                "lazy_dask_full_shuffle_s_per_batch": round(t_lazy_full / nb, 5),
                "eager_load_s": round(t_load, 2),
                "time_buckets": sorted({int(b.times.shape[1]) for b in batches_mem}),
            }
        ),
        flush=True,
    )

    # training steps of a small latent ODE on the normalised batches
    model = LatentODE(eager.num_channels, latent_size=6, encoder_size=16, units=32,
                      key=jax.random.key(0))  # fmt: skip
    opt = optax.adam(1e-3)
    state = opt.init(eqx.filter(model, eqx.is_inexact_array))
    scale = np.asarray(norm.std, np.float32)
    shift = np.asarray(norm.mean, np.float32)

    @eqx.filter_jit
    def step(model, state, b, key):
        v = (b.values - shift) / scale
        b = eqx.tree_at(
            lambda x: (x.values, x.times), b, (v * b.mask, b.times / norm.time_scale)
        )
        (loss, _), grads = eqx.filter_value_and_grad(
            lambda m: m.loss(b, key=key), has_aux=True
        )(model)
        updates, state = opt.update(grads, state, model)
        return eqx.apply_updates(model, updates), state, loss

    # compile every time bucket first
    by_bucket = {}
    for b in batches_mem + batches_nc:
        by_bucket.setdefault(int(b.times.shape[1]), b)
    for b in by_bucket.values():
        jax.block_until_ready(step(model, state, b, jax.random.key(0)))
    common = max(by_bucket, key=lambda k: sum(int(b.times.shape[1]) == k
                                             for b in batches_mem))  # fmt: skip
    sample = [b for b in batches_mem if int(b.times.shape[1]) == common]
    times = []
    for i in range(args.steps):
        t0 = time.perf_counter()
        jax.block_until_ready(step(model, state, sample[i % len(sample)],
                                   jax.random.key(i)))  # fmt: skip
        times.append(time.perf_counter() - t0)
    t_step = float(np.median(times))

    def train_epoch(batch_iter):
        """Seconds for an epoch of training steps on the batches of `batch_iter`."""
        m, st = model, state
        t0 = time.perf_counter()
        for i, b in enumerate(batch_iter):
            m, st, loss = step(m, st, b, jax.random.key(i))
            float(loss)  # as fit does: wait for the step's result
        return time.perf_counter() - t0

    # the cost batching adds to training: an epoch that reads its batches (with the
    # default read-ahead thread for lazy sources) against the same epoch on batches
    # already in memory; interleaved, median of --epochs rounds
    rounds = {"ready_full": [], "ready_block": [], "memory": [], "lazy_dask": [],
              "lazy_netcdf": []}  # fmt: skip
    for _ in range(args.epochs):
        rounds["ready_full"].append(train_epoch(iter(batches_mem)))
        rounds["memory"].append(train_epoch(
            cd.batches(eager, args.batch_size, key=jax.random.key(1),
                       layout=args.layout)))  # fmt: skip
        rounds["ready_block"].append(train_epoch(iter(batches_nc)))
        rounds["lazy_dask"].append(train_epoch(
            cd.batches(lazy, args.batch_size, key=jax.random.key(1),
                       layout=args.layout, shuffle="block")))  # fmt: skip
        rounds["lazy_netcdf"].append(train_epoch(
            cd.batches(lazy_nc, args.batch_size, key=jax.random.key(1),
                       layout=args.layout, shuffle="block")))  # fmt: skip
    med = {k: float(np.median(v)) for k, v in rounds.items()}
    per_step = med["ready_full"] / nb
    ref = {
        "memory": "ready_full",
        "lazy_dask": "ready_block",
        "lazy_netcdf": "ready_block",
    }
    print(
        json.dumps(
            {
                "case": "train_step",
                "model": "LatentODE(latent 6, encoder 16, units 32)",
                "time_bucket": common,
                "step_s": round(t_step, 4),
                "epoch_step_s": round(per_step, 4),
                "read_alone_over_step_memory": round(t_mem / nb / t_step, 3),
                "read_alone_over_step_lazy_dask": round(t_lazy / nb / t_step, 3),
                "read_alone_over_step_lazy_netcdf": round(t_lazy_nc / nb / t_step, 3),
                **{f"epoch_{k}_s": round(v, 2) for k, v in med.items()},
                **{
                    f"added_in_training_{k}": round((med[k] - med[r]) / med[r], 3)
                    for k, r in ref.items()
                },
                "target": "< 0.10",
            }
        ),
        flush=True,
    )

    # streaming memory (separate processes, peak RSS)
    big = tmp / "nafld2_x10.nc"
    big_info = _write_file(big, tiles=10)
    rows = {}
    for label, p, mode in (
        ("stream_dask_1x", path, "dask"),
        ("stream_dask_10x", big, "dask"),
        ("stream_netcdf_1x", path, "netcdf"),
        ("stream_netcdf_10x", big, "netcdf"),
        ("load_1x", path, "load"),
        ("load_10x", big, "load"),
    ):
        out = subprocess.run(
            [sys.executable, __file__, "--stream", str(p), mode,
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
