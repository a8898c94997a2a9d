"""Data-parallel `fit` over several devices with JAX's sharding (`fit(devices=...)`).

With several devices, `fit` lays them out as a one-axis `jax.sharding.Mesh` (axis
`"data"`), and places

- every batch *split* along its first (series / row) axis:
  `NamedSharding(mesh, PartitionSpec("data"))`, so each device holds
  `batch_size / devices` series of it;
- the parameters, the optimizer state, the keys and the traced hyperparameters
  *replicated*: `NamedSharding(mesh, PartitionSpec())`.

The compiled step is the very function the single-device path runs
(`_step._train_step`); only its inputs are placed, with `jax.device_put`. `jax.jit`
compiles one program per input placement, and XLA's SPMD partitioner (GSPMD) splits
it: the loss's sum over the series axis becomes a per-device partial sum and an
all-reduce, so the gradient (and with it the update, the new parameters and the
optimizer state) comes out replicated, ready for the next step. We place the inputs
rather than give `jit` explicit in/out shardings because then there is one step for
every device count, no second jitted wrapper per mesh, and no sharding annotation in
model code; the outputs' placement is the one GSPMD propagates from replicated
parameters, which is replicated (checked by `tests/test_sharding.py`).

Parameters are replicated rather than sharded: ctmodels' models are small (their cost
is the solver's many steps per series, not their parameter count), so the memory a
sharded optimizer state would save is negligible next to the all-gathers it would add
to every vector-field evaluation.

Several processes (`jax.distributed.initialize`, one per host) train one model when
each passes the same list of every process's devices (`devices=jax.devices()`): the
mesh then spans the processes, XLA's collectives (NCCL on GPUs, Gloo on CPUs) carry
the all-reduce, and only process 0 writes checkpoints. Every process draws the same
order of the series (the same data and key) but reads only its own rows of each
batch, the rows its devices hold (`local_rows`), from the source (a lazy netCDF /
zarr source reads just those series); the processes exchange a few numbers per
time-series batch so that their rows share one time grid (`allgather`, see
`ctmodels.train._data`), and the global batch is assembled from the processes' rows
with `jax.make_array_from_process_local_data` (`from_local`). The step is unchanged,
and the batches are row for row those of one process.

Checkpoints hold host (NumPy) arrays gathered from the replicas (`to_host`), the same
bytes as a single-device run's, so a run started on 4 devices resumes on 1 and the
reverse; the model `fit` returns lives on the default device, as after a
single-device run.
"""

from __future__ import annotations

from typing import Any

import equinox as eqx
import jax
import numpy as np

from .._devices import Rows, choose
from ._state import strong


class Placement(Rows):
    """Where `fit`'s arrays live when it trains on a mesh of devices: the inference
    mesh (`ctmodels._devices.Rows`: `mesh`, `split`, `replicated`, `replicate`),
    with what training across processes adds."""

    @property
    def processes(self) -> int:
        """How many processes the mesh's devices belong to (1 without
        `jax.distributed`)."""
        return len({d.process_index for d in self.devices})

    def local_rows(self, n: int) -> np.ndarray | None:
        """The rows (in increasing order) of an `n`-row batch that this process's
        devices hold when the batch is split along its first axis, or None when `n`
        does not divide over the devices (such a batch is replicated)."""
        if n % self.size:
            return None
        per = n // self.size
        here = jax.process_index()
        mine = [i for i, d in enumerate(self.devices) if d.process_index == here]
        return np.concatenate([np.arange(i * per, (i + 1) * per) for i in mine])

    def from_local(self, tree: Any, n: int) -> Any:
        """Global arrays of `n` rows, split over the devices, from this process's
        rows of them (`tree`'s NumPy leaves, rows as in `local_rows(n)`): every
        process passes its own rows, none the others' (`jax.make_array_from_process_
        local_data`)."""

        def make(x):
            if x is None:
                return None
            x = np.asarray(x)
            x = x.astype(jax.dtypes.canonicalize_dtype(x.dtype), copy=False)
            return jax.make_array_from_process_local_data(
                self.split, x, (n, *x.shape[1:])
            )

        return jax.tree.map(make, tree, is_leaf=lambda x: x is None)

    def allgather(self, x: np.ndarray) -> np.ndarray:
        """Every process's `x` (the same shape and dtype in every process), stacked
        along a new first axis in process order; host arrays in and out. A
        collective: every process must call it, in the same order."""
        from jax.experimental import multihost_utils

        return np.asarray(multihost_utils.process_allgather(x))

    def batch(self, batch: Any) -> Any:
        """A batch split along its first axis over the devices. An array whose first
        axis does not divide (the short last validation batch of array data) is
        replicated instead: correct, only not parallel. One `device_put` for all
        the arrays (a call per array cost a millisecond more per step). Arrays
        already spread over several processes (built by `from_local`) are left as
        they are."""
        leaves, treedef = jax.tree.flatten(batch)
        where = [
            i
            for i, x in enumerate(leaves)
            if eqx.is_array(x)
            and not (isinstance(x, jax.Array) and not x.is_fully_addressable)
        ]
        shardings = [
            self.split
            if leaves[i].ndim >= 1 and leaves[i].shape[0] % self.size == 0
            else self.replicated
            for i in where
        ]
        if not where:
            return batch
        placed = jax.device_put([leaves[i] for i in where], shardings)
        for i, x in zip(where, placed, strict=True):
            leaves[i] = x
        return jax.tree.unflatten(treedef, leaves)

    def to_host(self, tree: Any) -> Any:
        """Every array leaf as one NumPy array on the host (what checkpoints hold)."""
        return jax.tree.map(
            lambda x: np.asarray(jax.device_get(x)) if eqx.is_array(x) else x, tree
        )

    def to_default(self, tree: Any) -> Any:
        """Every array leaf as one array on the default device (what `fit` returns)."""
        return strong(self.to_host(tree))


def resolve_devices(devices: Any, batch_size: int) -> Placement | None:
    """`fit(devices=...)` as a `Placement`, or None for the single-device path.

    None and 1 are the single-device path (no mesh). An int N > 1 takes the first N
    of `jax.local_devices()`; a sequence of devices takes those, always on a mesh
    (a one-device sequence runs the sharded path on one device, which is how
    `benchmarks/scale.py` measures its overhead)."""
    chosen = choose(devices, "fit", local_only=False)
    if chosen is None:
        return None
    n = len(chosen)
    if batch_size % n:
        raise ValueError(
            f"batch_size={batch_size} does not divide over {n} devices: each device "
            f"takes batch_size / devices series of every batch. Pass a batch_size "
            f"that is a multiple of {n} (e.g. {_multiple(batch_size, n)}), or "
            f"devices={_divisor(batch_size, n)}."
        )
    return Placement(chosen)


def _multiple(batch_size: int, n: int) -> int:
    """The nearest multiple of `n` at or above `batch_size`."""
    return -(-batch_size // n) * n


def _divisor(batch_size: int, n: int) -> int:
    """The largest device count below `n` that divides `batch_size`."""
    return max(d for d in range(1, n) if batch_size % d == 0)
