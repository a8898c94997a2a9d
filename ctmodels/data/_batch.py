"""Device-side batches of irregular series, bucketed shapes, and the two standard tasks.

Two layouts (Rubanova, Chen & Duvenaud 2019 use the second):

- `"padded"`: each row holds one series' own valid times, compacted to the front and
  padded at the end (padding repeats the last valid time; `time_mask` is False there).
- `"union"`: all valid times of the batch merged into one sorted grid shared by every
  row (`times[b]` is the same for every `b`); `time_mask[b, j]` says whether grid time
  `j` is one of series `b`'s own times, `mask` which channels it observed there. One ODE
  solve then serves the whole batch.

Shapes are bucketed so that `jit` compiles once per bucket, not once per batch: the
batch dimension is always `batch_size` (a short last batch is padded with rows of
weight 0) and the time dimension is rounded up (`time_bucket`), after raising it to
`min_times` where that is given (so that shorter batches share a longer one's shape).
"""

from __future__ import annotations

import collections
import concurrent.futures
from collections.abc import Iterator
from typing import Any, Literal

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Bool, Float, Int, PRNGKeyArray

from ._timeseries import TimeSeries


class Batch(eqx.Module):
    """A batch of `B` series on `T` time positions with `C` channels (JAX arrays).

    - `times` `[B, T]`: non-decreasing in each row (in the union layout every row is
      the same grid).
    - `values` `[B, T, C]`: 0 where not observed.
    - `mask` `[B, T, C]`: the observations the model is given (its context).
    - `target_mask` `[B, T, C]`: the observations the loss scores. Equal to `mask` for
      reconstruction; the hidden points for interpolation; the future points for
      extrapolation (see `interpolation_task`, `extrapolation_task`).
    - `time_mask` `[B, T]`: positions that are real times of that series (padding is
      False); predictions are wanted at every such position.
    - `weight` `[B]`: 1 for real series, 0 for rows that pad a short last batch.
    - `index` `[B]`: each row's series index in the source (-1 for padding rows).
    - `position` `[B, T]`: each position's index along the source's time axis (-1 where
      the position is not one of that series' times).
    - `static` `[B, K]` and `labels` `[B]`, or None.
    - `layout`: `"padded"` or `"union"` (static).
    """

    times: Float[Array, "B T"]
    values: Float[Array, "B T C"]
    mask: Bool[Array, "B T C"]
    target_mask: Bool[Array, "B T C"]
    time_mask: Bool[Array, "B T"]
    weight: Float[Array, " B"]
    index: Int[Array, " B"]
    position: Int[Array, "B T"]
    static: Float[Array, "B K"] | None
    labels: Int[Array, " B"] | None
    layout: str = eqx.field(static=True, default="padded")

    @property
    def batch_size(self) -> int:
        return self.values.shape[0]

    @property
    def num_times(self) -> int:
        return self.values.shape[1]

    @property
    def num_channels(self) -> int:
        return self.values.shape[2]


def bucket_length(n: int, time_bucket: int | str | None = "pow2") -> int:
    """Round a time length up to its bucket: `"pow2"` (the next power of two, at least
    8), an int `k` (the next multiple of `k`), or None (no rounding)."""
    n = max(int(n), 1)
    if time_bucket is None:
        return n
    if time_bucket == "pow2":
        return max(8, 1 << (n - 1).bit_length())
    if isinstance(time_bucket, (int, np.integer)) and time_bucket > 0:
        return int(-(-n // time_bucket) * time_bucket)
    hint = (
        " ('auto' is fit's option: it picks `min_times` from the training data)"
        if time_bucket == "auto"
        else ""
    )
    raise ValueError(
        f"time_bucket must be 'pow2', a positive int or None, got {time_bucket!r}."
        + hint
    )


def time_length(times: np.ndarray, time_mask: np.ndarray, layout: str) -> int:
    """The time length of a batch of these series' `times` / `time_mask` before
    bucketing, as `make_batch` finds it: the distinct valid times (`"union"`) or the
    most valid times of one series (`"padded"`)."""
    if layout == "union":
        return len(np.unique(times[time_mask]))
    return int(time_mask.sum(axis=1).max(initial=0))


def common_length(lengths, quantile: float = 0.9) -> int:
    """The power-of-two bucket (see `bucket_length`) that holds the `quantile`
    quantile of batch time `lengths`: as `min_times`, it pads the batches shorter
    than most to the common shape, so they share its compilation, while the few
    longer ones keep their own bucket."""
    lengths = np.asarray(lengths)
    if lengths.size == 0:
        return 0
    return bucket_length(int(np.quantile(lengths, quantile, method="higher")), "pow2")


def _pad_rows(x: np.ndarray | None, rows: int, fill) -> np.ndarray | None:
    if x is None or x.shape[0] == rows:
        return x
    pad = np.full((rows - x.shape[0],) + x.shape[1:], fill, dtype=x.dtype)
    return np.concatenate([x, pad], axis=0)


def make_batch(
    ts: TimeSeries,
    *,
    index=None,
    layout: Literal["padded", "union"] = "padded",
    batch_size: int | None = None,
    time_bucket: int | str | None = "pow2",
    min_times: int = 0,
    dtype=None,
) -> Batch:
    """Turn a (small) `TimeSeries` into one `Batch` in the given layout.

    **Arguments:**

    - `ts`: the series of this batch.
    - `index`: their indices in the full source (default `0..S-1`), kept in
      `Batch.index` to map predictions back.
    - `layout`: `"padded"` or `"union"` (see the module docstring).
    - `batch_size`: pad to this many rows (weight 0); default `len(ts)`.
    - `time_bucket`: how to round the time length (see `bucket_length`).
    - `min_times`: pad the time dimension to at least this many positions before
      rounding it, so that a batch with fewer times gets a longer batch's shape (and
      reuses its compilation; the extra positions are padding, as above). Default 0.
    - `dtype`: float dtype of times/values; default JAX's default float dtype.
    """
    host = host_batch(
        ts,
        index=index,
        layout=layout,
        batch_size=batch_size,
        time_bucket=time_bucket,
        min_times=min_times,
        dtype=dtype,
    )
    dev = jax.device_put(host)
    return Batch(
        **dev,
        target_mask=dev["mask"],
        layout=layout,
    )


def host_batch(
    ts: TimeSeries,
    *,
    index=None,
    layout: str = "padded",
    batch_size: int | None = None,
    time_bucket: int | str | None = "pow2",
    min_times: int = 0,
    dtype=None,
    grid: np.ndarray | None = None,
    num_times: int | None = None,
    pad_time: float | None = None,
) -> dict[str, Any]:
    """`make_batch`'s arrays as NumPy arrays on the host (a dict of `Batch`'s fields
    without `target_mask` and `layout`).

    The last three arguments let a process build its own rows of a batch whose other
    rows another process builds (`fit` over several processes) so that they fit
    together, exactly as one process would have built the whole batch: `grid` is
    the union layout's grid of the whole batch (a superset of `ts`' valid times),
    `num_times` the padded layout's longest series of the whole batch, and
    `pad_time` the time that fills the padded layout's padding rows (the whole
    batch's last series' last time)."""
    S, T, C = ts.values.shape
    batch_size = S if batch_size is None else int(batch_size)
    if batch_size < S:
        raise ValueError(f"batch_size={batch_size} is smaller than {S} series.")
    if isinstance(min_times, bool) or not isinstance(min_times, (int, np.integer)):
        raise ValueError(f"min_times must be an int >= 0, got {min_times!r}.")
    if min_times < 0:
        raise ValueError(f"min_times must be an int >= 0, got {min_times!r}.")
    index = np.arange(S) if index is None else np.asarray(index)
    # float32 unless jax_enable_x64
    dtype = jax.dtypes.canonicalize_dtype(np.float64 if dtype is None else dtype)
    if layout == "padded":
        lengths = ts.time_mask.sum(axis=1)
        longest = lengths.max() if num_times is None else num_times
        Tb = bucket_length(max(longest, min_times), time_bucket)
        # compact valid positions to the front, keeping their order
        order = np.argsort(~ts.time_mask, axis=1, kind="stable")
        take = order[:, : min(Tb, T)]
        if Tb > T:
            take = np.concatenate([take, np.repeat(take[:, -1:], Tb - T, axis=1)], 1)
        rows = np.arange(S)[:, None]
        valid = np.arange(Tb)[None, :] < lengths[:, None]
        last = np.take_along_axis(take, np.maximum(lengths - 1, 0)[:, None], axis=1)
        take = np.where(valid, take, last)
        times = ts.times[rows, take]
        values = np.where(valid[..., None], ts.values[rows, take], 0.0)
        mask = valid[..., None] & ts.mask[rows, take]
        time_mask = valid
        position = np.where(valid, take, -1)
    elif layout == "union":
        if grid is None:
            grid = np.unique(ts.times[ts.time_mask])
        Tb = bucket_length(max(len(grid), min_times), time_bucket)
        j = np.searchsorted(grid, ts.times)  # [S, T]: grid index of each position
        times = np.full((S, Tb), grid[-1])
        times[:, : len(grid)] = grid
        values = np.zeros((S, Tb, C))
        mask = np.zeros((S, Tb, C), bool)
        time_mask = np.zeros((S, Tb), bool)
        position = np.full((S, Tb), -1, np.int64)
        s, t = np.nonzero(ts.time_mask)
        values[s, j[s, t]] = ts.values[s, t]
        mask[s, j[s, t]] = ts.mask[s, t]
        time_mask[s, j[s, t]] = True
        position[s, j[s, t]] = t
    else:
        raise ValueError(f"layout must be 'padded' or 'union', got {layout!r}.")

    weight = np.ones(S)
    if batch_size > S:
        # padding rows: the last row's grid (union) or a constant time (padded)
        if layout == "union":
            pad_row = times[-1:]
        else:
            pad_row = np.full((1, Tb), times[-1, -1] if pad_time is None else pad_time)
        times = np.concatenate([times, np.repeat(pad_row, batch_size - S, axis=0)], 0)
    # cast on the host and transfer everything with one call: per-array conversions
    # on the device cost a dispatch each, more than the batch itself
    host = {
        "times": np.asarray(times, dtype),
        "values": np.asarray(_pad_rows(values, batch_size, 0.0), dtype),
        "mask": _pad_rows(mask, batch_size, False),
        "time_mask": _pad_rows(time_mask, batch_size, False),
        "weight": np.asarray(_pad_rows(weight, batch_size, 0.0), dtype),
        "index": _pad_rows(index.astype(np.int32), batch_size, -1),
        "position": _pad_rows(position.astype(np.int32), batch_size, -1),
        "static": None
        if ts.static is None
        else np.asarray(_pad_rows(ts.static, batch_size, 0.0), dtype),
        "labels": None
        if ts.labels is None
        else _pad_rows(ts.labels.astype(np.int32), batch_size, 0),
    }
    _check_resolution(host["times"][:S], time_mask, times[:S], dtype)
    return host


def _check_resolution(cast, time_mask, times, dtype) -> None:
    """Refuse a batch in which a series' distinct times become equal (or out of
    order) when cast to `dtype`: float32 resolves about 7 digits, so times such as
    Unix seconds 30 s apart collapse, and a model would train on a wrong clock
    without a sign. (Times of different series that merge are harmless.)"""
    if np.dtype(dtype) == np.float64:
        return
    # each series' own times, in order, first (a union row also holds the others')
    order = np.argsort(~time_mask, axis=1, kind="stable")
    cast = np.take_along_axis(cast, order, axis=1)
    times = np.take_along_axis(times, order, axis=1)
    time_mask = np.take_along_axis(time_mask, order, axis=1)
    both = time_mask[:, 1:] & time_mask[:, :-1]
    if not both.any():
        return
    with np.errstate(invalid="ignore"):
        merged = both & (np.diff(cast, axis=1) <= 0) & (np.diff(times, axis=1) > 0)
    if merged.any():
        s, t = np.argwhere(merged)[0]
        a, b = float(times[s, t]), float(times[s, t + 1])
        raise ValueError(
            f"Times {a!r} and {b!r} become equal in {np.dtype(dtype).name} (it "
            f"resolves about {np.finfo(dtype).eps * max(abs(a), abs(b)):.3g} at "
            "that size). Subtract an origin from the times first (e.g. each "
            "series' first time, or ds['time'] - ds['time'].min() in xarray), or "
            "enable float64 with jax.config.update('jax_enable_x64', True)."
        )


def num_batches(n_series: int, batch_size: int, *, drop_last: bool = False) -> int:
    return n_series // batch_size if drop_last else -(-n_series // batch_size)


def batches(
    source: Any,
    batch_size: int,
    *,
    key: PRNGKeyArray | None = None,
    layout: Literal["padded", "union"] = "padded",
    time_bucket: int | str | None = "pow2",
    min_times: int = 0,
    drop_last: bool = False,
    dtype=None,
    shuffle: Literal["full", "block"] = "full",
    block_size: int | None = None,
    prefetch: int | None = None,
) -> Iterator[Batch]:
    """Iterate over a dataset in batches of `batch_size` series.

    **Arguments:**

    - `source`: a `TimeSeries`, or a lazy source from `from_xarray(..., lazy=True)`
      (anything with `len()` whose `source[indices]` returns a `TimeSeries`): a lazy
      source reads only the series of each batch.
    - `batch_size`: series per batch. Every batch has exactly this many rows (a short
      last batch is padded with weight-0 rows) unless `drop_last`.
    - `key`: a JAX PRNG key to shuffle the series order; None keeps the order.
    - `shuffle`: `"full"` (a uniform permutation) or `"block"`: permute contiguous
      blocks of `block_size` series (default: the lazy source's own `block_size`,
      else `4 * batch_size`) and the series within
      each block, so that each batch of a lazy on-disk source reads one or two
      contiguous stretches of the file instead of `batch_size` scattered rows.
    - `layout`, `time_bucket`, `min_times`, `dtype`: see `make_batch`.
    - `prefetch`: batches read ahead by a background thread, so that reading (and
      building) the next batch overlaps with whatever consumes this one (a training
      step). Default 1; 0 builds each batch when it is asked for, with no thread.

    **Yields:** `Batch`es.
    """
    n = len(source)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
    if prefetch is None:
        prefetch = 1
    if prefetch < 0:
        raise ValueError(f"prefetch must be >= 0, got {prefetch}.")
    order = shuffle_order(
        key,
        n,
        shuffle=shuffle,
        block_size=block_size or default_block_size(source, batch_size),
    )

    def read(b: int) -> Batch:
        return read_batch(
            source,
            order[b * batch_size : (b + 1) * batch_size],
            layout=layout,
            batch_size=batch_size,
            time_bucket=time_bucket,
            min_times=min_times,
            dtype=dtype,
        )

    count = num_batches(n, batch_size, drop_last=drop_last)
    if prefetch == 0:
        for b in range(count):
            yield read(b)
        return
    # a background thread reads ahead (file reads and numpy work release the GIL,
    # so reading overlaps with the training step that consumes the batches)
    with concurrent.futures.ThreadPoolExecutor(1, "ctmodels-prefetch") as pool:
        pending = collections.deque(
            pool.submit(read, b) for b in range(min(prefetch, count))
        )
        try:
            for b in range(count):
                batch = pending.popleft().result()
                if b + prefetch < count:
                    pending.append(pool.submit(read, b + prefetch))
                yield batch
        finally:
            for f in pending:
                f.cancel()


def default_block_size(source: Any, batch_size: int) -> int:
    """The block of a block shuffle: a lazy source's own `block_size` (the blocks it
    reads and caches), else `4 * batch_size`."""
    return getattr(source, "block_size", None) or 4 * batch_size


def shuffle_order(
    key: PRNGKeyArray | None,
    n: int,
    *,
    shuffle: Literal["full", "block"] = "full",
    block_size: int = 256,
) -> np.ndarray:
    """The order in which `batches` visits `n` series (see its `shuffle` argument).

    `"full"`: a uniform permutation. `"block"`: the aligned blocks of `block_size`
    series in a random order, and the series within each block in a random order.
    `key=None` keeps the order.
    """
    if shuffle not in ("full", "block"):
        raise ValueError(f"shuffle must be 'full' or 'block', got {shuffle!r}.")
    if block_size < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size}.")
    if key is None:
        return np.arange(n)
    if shuffle == "full":
        return np.asarray(jax.random.permutation(key, n), dtype=np.int64)
    k_blocks, k_within = jax.random.split(key)
    n_blocks = -(-n // block_size)
    rank = np.asarray(jax.random.permutation(k_blocks, n_blocks))
    u = np.asarray(jax.random.uniform(k_within, (n,)))
    return np.lexsort((u, rank[np.arange(n) // block_size])).astype(np.int64)


def read_batch(
    source: Any,
    idx: np.ndarray,
    *,
    layout: Literal["padded", "union"] = "padded",
    batch_size: int | None = None,
    time_bucket: int | str | None = "pow2",
    min_times: int = 0,
    dtype=None,
) -> Batch:
    """The `Batch` of series `idx` of `source` (in that order), as `batches` builds
    it: the series are read in source order (contiguous for lazy on-disk sources),
    then put back in the order of `idx`. Other arguments: see `make_batch`."""
    sort = np.argsort(idx, kind="stable")
    sub = source[idx[sort]]
    inv = np.empty_like(sort)
    inv[sort] = np.arange(len(sort))
    if not np.array_equal(inv, np.arange(len(inv))):
        sub = sub[inv]
    return make_batch(
        sub,
        index=idx,
        layout=layout,
        batch_size=batch_size,
        time_bucket=time_bucket,
        min_times=min_times,
        dtype=dtype,
    )


# ------------------------------------------------------------------------------ tasks


def interpolation_task(
    batch: Batch,
    *,
    key: PRNGKeyArray,
    fraction: float = 0.5,
    score: Literal["hidden", "all"] = "hidden",
) -> Batch:
    """Hide a random `fraction` of the observed values from the model.

    The model sees the rest (`mask`); the loss scores the hidden ones
    (`target_mask`), or every observed value with `score="all"` (the latent ODE
    paper's training objective: reconstruct the whole series from a subsample).
    Each series keeps at least one observed value in its context. jit-safe.
    """
    if score not in ("hidden", "all"):
        raise ValueError(f"score must be 'hidden' or 'all', got {score!r}.")
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"fraction must be in [0, 1), got {fraction}.")
    u = jax.random.uniform(key, batch.mask.shape)
    hide = batch.mask & (u < fraction)
    keep = batch.mask & ~hide
    # never leave a series without context: keep its first observed value
    flat = batch.mask.reshape(batch.batch_size, -1)
    first = jnp.argmax(flat, axis=1)
    rescue = ~keep.reshape(batch.batch_size, -1).any(axis=1)
    rescue_mask = (
        jax.nn.one_hot(first, flat.shape[1], dtype=bool) & rescue[:, None] & flat
    ).reshape(batch.mask.shape)
    keep = keep | rescue_mask
    hide = hide & ~rescue_mask
    target = hide if score == "hidden" else batch.mask
    return eqx.tree_at(lambda b: (b.mask, b.target_mask), batch, (keep, target))


def extrapolation_task(batch: Batch, *, split: float = 0.5) -> Batch:
    """Observe the early part of each series and predict the rest.

    Each series' time span (its first to last observed time) is cut at `split` of the
    way: values at or before the cut are the context (`mask`), later ones the target
    (`target_mask`). jit-safe.
    """
    if not 0.0 < split < 1.0:
        raise ValueError(f"split must be in (0, 1), got {split}.")
    observed_t = batch.mask.any(axis=2)
    big = jnp.finfo(batch.times.dtype).max
    t_first = jnp.min(jnp.where(observed_t, batch.times, big), axis=1)
    t_last = jnp.max(jnp.where(observed_t, batch.times, -big), axis=1)
    cut = t_first + split * (t_last - t_first)
    early = (batch.times <= cut[:, None])[..., None]
    return eqx.tree_at(
        lambda b: (b.mask, b.target_mask),
        batch,
        (batch.mask & early, batch.mask & ~early),
    )
