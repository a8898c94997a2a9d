"""What `fit` trains on: irregular time series (batched into `Batch`es) or plain arrays.

Both kinds give batches of one shape per bucket, in an order fixed by a key, so that
batch `b` of epoch `e` can be rebuilt on its own (exact resume skips the batches an
interrupted epoch already did, without reading them).
"""

from __future__ import annotations

import concurrent.futures
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ..data import Batch, TimeSeries, num_batches, read_batch, shuffle_order
from ..data._batch import common_length, default_block_size, time_length


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

    def _read(self, order: np.ndarray, b: int) -> Batch:
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
                idx = np.sort(order[b * self.batch_size : (b + 1) * self.batch_size])
                ts = self.source[idx]
                lengths.append(time_length(ts.times, ts.time_mask, self.layout))
        return np.asarray(lengths)

    def batch(self, order: np.ndarray, b: int, *, train: bool) -> Batch:
        ahead, self._ahead = self._ahead, None
        if ahead is not None and ahead[0] == id(order) and ahead[1] == b:
            return ahead[2].result()
        return self._read(order, b)

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

    def num_batches(self, *, train: bool) -> int:
        return num_batches(self.n, self.batch_size)

    def order(self, key) -> np.ndarray:
        return shuffle_order(key, self.n, shuffle="full")

    def batch(self, order: np.ndarray, b: int, *, train: bool) -> Any:
        bs = self.batch_size
        if train:
            order = np.resize(order, self.num_batches(train=True) * bs)  # wrap around
        idx = order[b * bs : (b + 1) * bs]

        def take(x):
            if isinstance(x, np.ndarray):
                return jnp.asarray(x[idx])
            return jnp.take(x, jnp.asarray(idx), axis=0)

        return jax.tree.map(take, self.data)

    def prefetch(self, order: np.ndarray, b: int) -> None:
        """Arrays are in memory: nothing to read ahead."""

    def close(self) -> None:
        pass


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
