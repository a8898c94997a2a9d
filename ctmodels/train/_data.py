"""What `fit` trains on: irregular time series (batched into `Batch`es) or plain arrays.

Both kinds give batches of one shape per bucket, in an order fixed by a key, so that
batch `b` of epoch `e` can be rebuilt on its own (exact resume skips the batches an
interrupted epoch already did, without reading them).

With `fit(devices=...)` over several processes (`jax.distributed`), every process
draws the same order (the same key) but reads only its own rows of each batch: the
rows its devices hold (`Placement.local_rows`). Its rows of a time-series batch
must fit the others' (one time grid for the union layout, one time length for the
padded layout), so the processes exchange a few numbers per batch (each one's
distinct times, or its longest series) with `Placement.allgather` before building
their rows; the global batch is then assembled from the processes' rows
(`Placement.from_local`, `jax.make_array_from_process_local_data`). The result is
the batch one process would have built, row for row.
"""

from __future__ import annotations

import concurrent.futures
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ..data import (
    Batch,
    TimeSeries,
    bucket_length,
    num_batches,
    read_batch,
    shuffle_order,
)
from ..data._batch import common_length, default_block_size, host_batch, time_length


def _is_array(x: Any) -> bool:
    return isinstance(x, (np.ndarray, jax.Array))


#: How many training batches `time_bucket="auto"` looks at.
AUTO_SAMPLE_BATCHES = 16
_AUTO_KEY = 20261127


def auto_min_times(data: "SeriesData") -> int:
    """`fit(time_bucket="auto")`'s floor for the time length of every batch: the
    power-of-two bucket that holds 90% of the time lengths of `AUTO_SAMPLE_BATCHES`
    training batches (`ctmodels.data._batch.common_length`). Shorter batches are
    padded up to it, so they share the common batches' shape and compilation; longer
    ones are rounded to their own power of two, as with `"pow2"`. Fixed by the data
    alone (a key of its own), so a resumed run pads exactly as the interrupted one
    did."""
    return common_length(data.time_lengths(AUTO_SAMPLE_BATCHES))


class SeriesData:
    """A `TimeSeries` or lazy source, batched like `ctmodels.data.batches`.

    A lazy source (anything but an in-memory `TimeSeries`) is shuffled by blocks of
    its `block_size` (as `batches(..., shuffle="block")`), so each batch reads one or
    two contiguous stretches of the file. For every source, the next training batch
    is read and built by a background thread while the current step runs
    (`prefetch`).
    """

    kind = "series"

    def __init__(self, source, batch_size, *, layout, time_bucket, name):
        self.source = source
        self.batch_size = batch_size
        self.layout = layout
        self.time_bucket = time_bucket
        self.min_times = 0
        self.n = len(source)
        if self.n == 0:
            raise ValueError(f"`{name}` is empty: it has no series to train on.")
        self.lazy = not isinstance(source, TimeSeries)
        self._pool: concurrent.futures.ThreadPoolExecutor | None = None
        self._ahead: tuple[int, int, concurrent.futures.Future] | None = None
        self.placement = None  # several processes: each reads only its rows
        self._template: TimeSeries | None = None  # one series: shapes and dtypes

    def place(self, placement) -> None:
        """Read only this process's rows of every batch when `placement` spans
        several processes (otherwise nothing changes)."""
        self.placement = placement if placement and placement.processes > 1 else None

    def num_batches(self, *, train: bool) -> int:
        return num_batches(self.n, self.batch_size)

    def order(self, key) -> np.ndarray:
        # the same orders as `ctmodels.data.batches` (full / block shuffle)
        return shuffle_order(
            key,
            self.n,
            shuffle="block" if self.lazy else "full",
            block_size=default_block_size(self.source, self.batch_size),
        )

    def _read(self, order: np.ndarray, b: int):
        if self.placement is not None:
            return self._read_local(order, b)
        return read_batch(
            self.source,
            order[b * self.batch_size : (b + 1) * self.batch_size],
            layout=self.layout,
            batch_size=self.batch_size,
            time_bucket=self.time_bucket,
            min_times=self.min_times,
        )

    def time_lengths(self, max_batches: int) -> np.ndarray:
        """The time lengths (before bucketing) of up to `max_batches` training batches,
        drawn as training draws them but with a fixed key of their own (so the same
        data always gives the same answer). Reads those batches' series."""
        nb = self.num_batches(train=True)
        rounds = 1 if nb == 1 else -(-max_batches // nb)
        base = jax.random.key(_AUTO_KEY)
        lengths = []
        for r in range(rounds):
            order = self.order(jax.random.fold_in(base, r))
            for b in range(nb):
                if len(lengths) == max_batches:
                    break
                if self.placement is not None:  # this process's rows, and the others'
                    grid, longest, _ = self._agree(self._read_local(order, b))
                    lengths.append(longest if grid is None else len(grid))
                    continue
                idx = np.sort(order[b * self.batch_size : (b + 1) * self.batch_size])
                ts = self.source[idx]
                lengths.append(time_length(ts.times, ts.time_mask, self.layout))
        return np.asarray(lengths)

    def batch(self, order: np.ndarray, b: int, *, train: bool) -> Batch:
        ahead, self._ahead = self._ahead, None
        if ahead is not None and ahead[0] == id(order) and ahead[1] == b:
            got = ahead[2].result()
        else:
            got = self._read(order, b)
        # several processes: the exchange is a collective, so it runs here, in the
        # main thread, in the same order in every process (not in the prefetch
        # thread)
        return got if self.placement is None else self._assemble(got)

    # ------------------------------------------- several processes: their own rows

    def _read_local(self, order: np.ndarray, b: int) -> "_LocalRows":
        """Read this process's rows of batch `b` (the real ones: the rows past the
        last series of a short batch are padding, read by nobody)."""
        idx = order[b * self.batch_size : (b + 1) * self.batch_size]
        rows = self.placement.local_rows(self.batch_size)
        real = rows[rows < len(idx)]
        ts = None
        if real.size:
            sel = idx[real]
            sort = np.argsort(sel, kind="stable")
            ts = self.source[sel[sort]]  # in source order (contiguous reads)
            inv = np.empty_like(sort)
            inv[sort] = np.arange(len(sort))
            if not np.array_equal(inv, np.arange(len(inv))):
                ts = ts[inv]
            if self._template is None:
                self._template = ts[:1]
        elif self._template is None:  # no rows of its own yet: one series' shapes
            self._template = self.source[idx[:1]]
        return _LocalRows(idx=idx, rows=rows, real=real, ts=ts)

    def _agree(self, local: "_LocalRows"):
        """What this process's rows need from the others' to fit them: the batch's
        union grid (union layout; else None), its longest series (padded layout)
        and the time of its last series' last position (the padded layout's
        padding rows). Two `allgather`s: of each process's count of distinct
        times (or longest series) and last real row, then of its distinct times and
        last time (as float64 bits: exact without `jax_enable_x64`)."""
        ts, union = local.ts, self.layout == "union"
        if ts is None:
            own = np.empty(0)
            count, last_pos, last_time = 0, -1, np.nan
        else:
            if union:
                own = np.unique(ts.times[ts.time_mask])
                count = len(own)
            else:
                own = np.empty(0)
                count = int(ts.time_mask.sum(axis=1).max())
            last_pos = int(local.real[-1])
            last_valid = np.flatnonzero(ts.time_mask[-1])
            last_time = ts.times[-1, last_valid[-1] if last_valid.size else -1]
        p = self.placement
        head = p.allgather(np.asarray([count, last_pos], np.int32))
        # a power of two: each new width compiles the gather once more
        width = bucket_length(1 + (int(head[:, 0].max()) if union else 0), "pow2")
        mine = np.full(width, np.nan)
        mine[0] = last_time
        mine[1 : 1 + len(own)] = own
        every = p.allgather(mine.view(np.uint32)).view(np.float64)
        pad_time = float(every[int(np.argmax(head[:, 1])), 0])
        if union:
            grid = np.unique(np.concatenate([
                e[1 : 1 + c] for e, c in zip(every, head[:, 0], strict=True)
            ]))  # fmt: skip
            return grid, len(grid), pad_time
        return None, int(head[:, 0].max()), pad_time

    def _assemble(self, local: "_LocalRows") -> Batch:
        """The global batch from this process's rows (and the others', which they
        assemble alike)."""
        grid, longest, pad_time = self._agree(local)
        n_local = len(local.rows)
        kw = dict(layout=self.layout, time_bucket=self.time_bucket,
                  min_times=self.min_times)  # fmt: skip
        if local.ts is not None:
            host = host_batch(
                local.ts, index=local.idx[local.real], batch_size=n_local,
                grid=grid, num_times=longest, pad_time=pad_time, **kw,
            )  # fmt: skip
        else:
            host = _padding_rows(self._template, n_local, grid, longest, pad_time,
                                 **kw)  # fmt: skip
        arrays = self.placement.from_local(host, self.batch_size)
        return Batch(**arrays, target_mask=arrays["mask"], layout=self.layout)

    def prefetch(self, order: np.ndarray, b: int) -> None:
        """Start reading batch `b` of `order` in the background."""
        if b >= self.num_batches(train=True):
            return
        if self._pool is None:
            self._pool = concurrent.futures.ThreadPoolExecutor(1, "ctmodels-prefetch")
        self._ahead = (id(order), b, self._pool.submit(self._read, order, b))

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None
        self._ahead = None


class ArrayData:
    """An array, or a pytree of arrays sharing a leading axis of length N.

    Training batches always hold `batch_size` rows: the short last batch of an epoch
    is filled up with the first rows of that epoch's order (so one shape, one
    compilation). Validation batches are not filled up: the last one is shorter.
    """

    kind = "arrays"

    def __init__(self, data, batch_size, *, name):
        leaves = jax.tree.leaves(data)
        if not leaves:
            raise ValueError(f"`{name}` has no arrays.")
        shapes = [np.shape(x) for x in leaves]
        if any(len(s) == 0 for s in shapes):
            raise ValueError(
                f"`{name}` arrays need a leading (example) axis; got shapes {shapes}."
            )
        lengths = {s[0] for s in shapes}
        if len(lengths) != 1:
            raise ValueError(
                f"`{name}` arrays must share their leading (example) axis; got shapes "
                f"{shapes}."
            )
        self.n = lengths.pop()
        if self.n == 0:
            raise ValueError(f"`{name}` is empty: its arrays have 0 rows.")
        self.data = data
        self.batch_size = batch_size
        self.placement = None  # several processes: each takes only its rows

    def place(self, placement) -> None:
        """Take only this process's rows of every batch when `placement` spans
        several processes (otherwise nothing changes)."""
        self.placement = placement if placement and placement.processes > 1 else None

    def num_batches(self, *, train: bool) -> int:
        return num_batches(self.n, self.batch_size)

    def order(self, key) -> np.ndarray:
        return shuffle_order(key, self.n, shuffle="full")

    def batch(self, order: np.ndarray, b: int, *, train: bool) -> Any:
        bs = self.batch_size
        if train:
            order = np.resize(order, self.num_batches(train=True) * bs)  # wrap around
        idx = order[b * bs : (b + 1) * bs]
        rows = None if self.placement is None else self.placement.local_rows(len(idx))
        if rows is not None:  # this process's rows only, assembled with the others'

            def mine(x):
                if isinstance(x, np.ndarray):
                    return x[idx[rows]]
                return np.asarray(jnp.take(x, jnp.asarray(idx[rows]), axis=0))

            return self.placement.from_local(jax.tree.map(mine, self.data), len(idx))

        def take(x):
            if isinstance(x, np.ndarray):
                return jnp.asarray(x[idx])
            return jnp.take(x, jnp.asarray(idx), axis=0)

        return jax.tree.map(take, self.data)

    def prefetch(self, order: np.ndarray, b: int) -> None:
        """Arrays are in memory: nothing to read ahead."""

    def close(self) -> None:
        pass


class _LocalRows:
    """One process's rows of a time-series batch, read: the batch's series `idx`
    (every process's), this process's `rows` of it, the `real` ones among them (not
    padding) and their series `ts` (None: none)."""

    def __init__(self, idx, rows, real, ts):
        self.idx, self.rows, self.real, self.ts = idx, rows, real, ts


def _padding_rows(template: TimeSeries, n: int, grid, longest: int, pad_time: float,
                  *, layout, time_bucket, min_times) -> dict[str, Any]:  # fmt: skip
    """`n` padding rows (weight 0, nothing observed), as `make_batch` pads a short
    batch, for a process none of whose rows of this batch is a series. `template`
    (one series) gives the channels, static covariates and labels."""
    dtype = jax.dtypes.canonicalize_dtype(np.float64)
    if layout == "union":
        Tb = bucket_length(max(len(grid), min_times), time_bucket)
        row = np.full(Tb, grid[-1])
        row[: len(grid)] = grid
    else:
        Tb = bucket_length(max(longest, min_times), time_bucket)
        row = np.full(Tb, pad_time)
    C = template.values.shape[2]
    return {
        "times": np.broadcast_to(np.asarray(row, dtype), (n, Tb)).copy(),
        "values": np.zeros((n, Tb, C), dtype),
        "mask": np.zeros((n, Tb, C), bool),
        "time_mask": np.zeros((n, Tb), bool),
        "weight": np.zeros(n, dtype),
        "index": np.full(n, -1, np.int32),
        "position": np.full((n, Tb), -1, np.int32),
        "static": None
        if template.static is None
        else np.zeros((n, template.static.shape[1]), dtype),
        "labels": None if template.labels is None else np.zeros(n, np.int32),
    }


def as_data(x, batch_size: int, *, layout, time_bucket, name: str):
    """Wrap `train` / `valid` for `fit`."""
    if isinstance(x, TimeSeries):
        return SeriesData(
            x, batch_size, layout=layout, time_bucket=time_bucket, name=name
        )
    module = type(x).__module__.split(".")[0]
    if module in ("xarray", "pandas"):
        how = (
            "from_xarray(ds)"
            if module == "xarray"
            else "from_pandas(df, id=..., time=...)"
        )
        raise ValueError(
            f"`{name}` is {'an' if module == 'xarray' else 'a'} {module} "
            f"{type(x).__name__}: build a TimeSeries from it "
            f"first with ctmodels.data.{how}."
        )
    leaves = jax.tree.leaves(x)
    if leaves and all(_is_array(leaf) for leaf in leaves):
        return ArrayData(x, batch_size, name=name)
    if (
        not isinstance(x, (str, bytes))
        and hasattr(x, "__len__")
        and hasattr(x, "__getitem__")
    ):
        return SeriesData(
            x, batch_size, layout=layout, time_bucket=time_bucket, name=name
        )
    raise ValueError(
        f"`{name}` must be a ctmodels.data.TimeSeries, a lazy source (len() and "
        "source[indices] -> TimeSeries), or an array / pytree of arrays with a "
        f"leading example axis; got {type(x).__name__}."
    )


def check_same_channels(train: Any, valid: Any) -> None:
    """`valid` must have `train`'s channels: found before the first step, not when the
    first epoch ends."""
    if train.kind != "series" or valid.kind != "series":
        return
    a = getattr(train.source, "channels", None)
    b = getattr(valid.source, "channels", None)
    if a is not None and b is not None and tuple(a) != tuple(b):
        raise ValueError(
            f"`valid` has channels {list(b)} but `train` has {list(a)}: validation "
            "data must have the training data's channels, in the same order."
        )


def batch_weight(batch: Any):
    """How much a batch counts in averages: its real series (`Batch.weight`) or rows."""
    if isinstance(batch, Batch):
        return batch.weight.sum()
    return jnp.asarray(jax.tree.leaves(batch)[0].shape[0], jnp.float32)
