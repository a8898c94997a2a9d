"""Streaming: `fit` on a lazy zarr store holds a few batches in memory, not the store.

One subprocess (a fresh interpreter, so nothing else's allocations count) writes a
zarr store of 60,000 series x 100 times chunk by chunk (uncompressed float32: 24 MB
on disk, about 370 MB as an in-memory `TimeSeries`), then, under `tracemalloc`
(which sees every NumPy buffer, so any read of the whole store), fits the
normalisation on the lazy training part in chunks and trains through `fit` for a
few steps on the lazily normalised source, with lazy validation data. The oracle is
a bound well below the store's size; the control is the in-memory path (loading
the training part), which must exceed it, so the measurement can fail.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

SERIES, TIMES = 60_000, 100
BOUND_MB = 8.0  # a third of the store on disk

SCRIPT = textwrap.dedent(
    r"""
    import json, sys, tracemalloc, warnings
    import numpy as np, xarray as xr
    import jax, jax.numpy as jnp, equinox as eqx
    import ctmodels.data as cd
    from ctmodels.train import fit

    path, n, T = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    chunk = 1024
    grid = np.linspace(0.0, 1.0, T)
    for start in range(0, n, chunk):  # written chunk by chunk
        m = min(chunk, n - start)
        rng = np.random.default_rng(start)
        x = np.sin(2 * np.pi * rng.uniform(1, 4, (m, 1)) * grid).astype(np.float32)
        x[rng.uniform(size=(m, T)) < 0.5] = np.nan
        x[:, 0] = 0.0
        ds = xr.Dataset({"x": (("series", "time"), x)}, coords={"time": grid})
        kw = (dict(mode="w", encoding={"x": {"chunks": (chunk, T),
                                             "compressors": None}})
              if start == 0 else dict(append_dim="series"))
        ds.to_zarr(path, consolidated=False, **kw)

    class Sine(eqx.Module):
        a: jax.Array

        def loss(self, batch, *, key):
            w = batch.target_mask * batch.weight[:, None, None]
            pred = self.a * jnp.sin(batch.times)[..., None]
            return jnp.sum(w * (pred - batch.values) ** 2) / jnp.maximum(w.sum(), 1), {}

    ds = xr.open_dataset(path, engine="zarr", chunks=None, cache=False,
                         consolidated=False)
    n_train = n - 2048
    train = cd.from_xarray(ds.isel(series=slice(0, n_train)), lazy=True)
    valid = cd.from_xarray(ds.isel(series=slice(n_train, None)), lazy=True)
    # compile first, on a few series in memory (compilation is not data)
    fit(Sine(jnp.ones(())), train[np.arange(64)], steps=1, batch_size=32,
        key=jax.random.key(0), log=False)

    def peak_mb(f):
        tracemalloc.start()
        out = f()
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        return out, peak / 2**20

    norm, norm_mb = peak_mb(lambda: cd.Normalizer.fit(
        train, time_scale="span", chunk_size=512))
    steps = []
    (model, hist), fit_mb = peak_mb(lambda: fit(
        Sine(jnp.ones(())), norm.transform(train), valid=norm.transform(valid),
        steps=20, batch_size=32, key=jax.random.key(1), log=False,
        callback=lambda i: steps.append(i["loss"])))
    loaded, load_mb = peak_mb(lambda: train.load())  # the in-memory path
    # the streamed statistics are those of the loaded data
    ref = cd.Normalizer.fit(loaded, time_scale="span")
    del loaded
    print("RESULT " + json.dumps({
        "norm_mb": norm_mb, "fit_mb": fit_mb, "load_mb": load_mb,
        "steps": len(steps), "finite": bool(np.isfinite(steps).all()),
        "valid_loss": float(hist["valid_loss"].iloc[-1]),
        "mean": [norm.mean[0], ref.mean[0]], "std": [norm.std[0], ref.std[0]],
        "time_scale": [norm.time_scale, ref.time_scale],
        "store_mb": sum(os.path.getsize(os.path.join(d, f))
                        for d, _, fs in os.walk(path) for f in fs) / 2**20,
    }))
    """
).replace("import json, sys,", "import json, os, sys,")


def test_streamed_fit_memory_stays_below_the_store(tmp_path):
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=os.pathsep.join(sys.path))
    proc = subprocess.run(
        [sys.executable, "-W", "ignore", "-c", SCRIPT, str(tmp_path / "s.zarr"),
         str(SERIES), str(TIMES)],
        env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")][-1]
    r = json.loads(line[len("RESULT ") :])
    # the store is larger than the bound; the in-memory path exceeds it many times
    assert r["store_mb"] > 2.5 * BOUND_MB
    assert r["load_mb"] > 10 * BOUND_MB
    # the streaming path: normalisation statistics and training stay below it
    assert r["norm_mb"] < BOUND_MB and r["fit_mb"] < BOUND_MB
    assert r["steps"] == 20 and r["finite"] and r["valid_loss"] > 0
    for a, b in (r["mean"], r["std"], r["time_scale"]):
        assert abs(a - b) <= 1e-9 * abs(b)


def test_streamed_normalizer_and_lazy_transform_match_the_loaded_data(tmp_path):
    """`Normalizer.fit` on a lazy source (read in chunks of 7 series, moments merged
    chunk by chunk) gives the statistics of the loaded data, a log channel
    included; `transform` of a lazy source is lazy and reads what the in-memory
    transform gives."""
    import dataclasses

    import numpy as np
    import xarray as xr

    import ctmodels.data as cd

    rng = np.random.default_rng(0)
    n, t = 40, 9
    times = np.sort(rng.uniform(0, 5, (n, t)), axis=1)
    times[:, 6:][rng.uniform(size=(n, 3)) < 0.5] = np.nan  # ragged ends
    times = np.sort(times, axis=1)  # NaN last
    a = rng.normal(3.0, 2.0, (n, t))
    b = rng.lognormal(1.0, 0.5, (n, t))
    for x in (a, b):
        x[rng.uniform(size=x.shape) < 0.3] = np.nan
        x[np.isnan(times)] = np.nan
    a[:, 0] = 1.0
    ds = xr.Dataset(
        {"a": (("series", "obs"), a), "b": (("series", "obs"), b),
         "time": (("series", "obs"), times)}
    )  # fmt: skip
    ds.to_netcdf(tmp_path / "d.nc")
    lazy = cd.from_xarray(
        xr.open_dataset(tmp_path / "d.nc", cache=False), lazy=True, block_size=8
    )
    loaded = lazy.load()
    streamed = cd.Normalizer.fit(lazy, log=["b"], time_scale="span", chunk_size=7)
    whole = cd.Normalizer.fit(loaded, log=["b"], time_scale="span")
    np.testing.assert_allclose(streamed.mean, whole.mean, rtol=1e-12)
    np.testing.assert_allclose(streamed.std, whole.std, rtol=1e-12)
    assert streamed.log == whole.log == (False, True)
    assert streamed.time_scale == whole.time_scale
    # the oracle for the merge: NumPy on every observed value at once
    b_obs = np.log(b[~np.isnan(b)])
    np.testing.assert_allclose(streamed.mean[1], b_obs.mean(), rtol=1e-12)
    np.testing.assert_allclose(streamed.std[1], b_obs.std(), rtol=1e-12)

    norm_lazy = streamed.transform(lazy)
    assert isinstance(norm_lazy, cd.LazyTimeSeries) and norm_lazy is not lazy
    idx = np.array([3, 17, 2, 30])
    got, want = norm_lazy[idx], streamed.transform(loaded)[idx]
    np.testing.assert_array_equal(got.values, want.values)
    np.testing.assert_array_equal(got.times, want.times)
    # a second map composes after the first
    doubled = norm_lazy.map(lambda ts: dataclasses.replace(ts, times=2 * ts.times))
    np.testing.assert_array_equal(doubled[idx].times, 2 * want.times)
    np.testing.assert_array_equal(doubled[idx].values, want.values)
