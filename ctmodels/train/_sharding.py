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

from collections.abc import Sequence
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from .._errors import is_int
from ._state import strong

AXIS = "data"


class Placement:
    """Where `fit`'s arrays live when it trains on a mesh of devices."""

    def __init__(self, devices: Sequence[jax.Device]):
        self.devices = tuple(devices)
        self.size = len(self.devices)
        self.mesh = Mesh(np.asarray(self.devices, dtype=object), (AXIS,))
        self.replicated = NamedSharding(self.mesh, PartitionSpec())
        self.split = NamedSharding(self.mesh, PartitionSpec(AXIS))

    def replicate(self, tree: Any) -> Any:
        """Every array leaf of `tree` copied to every device."""

        def put(x):
            if not eqx.is_array(x):
                return x
            if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
                # keys move as their raw data (across processes, only that can)
                data = jax.device_put(jax.random.key_data(x), self.replicated)
                return jax.random.wrap_key_data(data, impl=jax.random.key_impl(x))
            return jax.device_put(x, self.replicated)

        return jax.tree.map(put, tree)

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
    if devices is None:
        return None
    if is_int(devices):
        n = int(devices)
        if n < 1:
            raise ValueError(
                f"devices must be None, an int >= 1 or a sequence of JAX devices; "
                f"got {devices!r}."
            )
        if n == 1:
            return None
        available = jax.local_device_count()
        if n > available:
            raise ValueError(
                f"fit(devices={n}) asks for more devices than this process has: "
                f"jax.local_device_count() is {available} "
                f"({jax.default_backend()}). Pass devices={available} or fewer. "
                "On CPU, more devices can be simulated by setting "
                f"XLA_FLAGS=--xla_force_host_platform_device_count={n} before JAX "
                "starts (they share the CPU's cores)."
            )
        chosen = jax.local_devices()[:n]
    else:
        chosen = _device_sequence(devices)
    n = len(chosen)
    if batch_size % n:
        raise ValueError(
            f"batch_size={batch_size} does not divide over {n} devices: each device "
            f"takes batch_size / devices series of every batch. Pass a batch_size "
            f"that is a multiple of {n} (e.g. {_multiple(batch_size, n)}), or "
            f"devices={_divisor(batch_size, n)}."
        )
    return Placement(chosen)


def _device_sequence(devices: Any) -> list[jax.Device]:
    if isinstance(devices, (str, bytes)) or not isinstance(devices, Sequence):
        raise ValueError(
            f"devices must be None, an int >= 1 or a sequence of JAX devices (e.g. "
            f"jax.local_devices()[:2]); got {devices!r}."
        )
    chosen = list(devices)
    if not chosen or not all(isinstance(d, jax.Device) for d in chosen):
        raise ValueError(
            f"devices must be a non-empty sequence of JAX devices (e.g. "
            f"jax.local_devices()[:2]); got {devices!r}."
        )
    if len(set(chosen)) != len(chosen):
        raise ValueError(f"devices lists a device twice: {chosen}.")
    here = jax.process_index()
    if not any(d.process_index == here for d in chosen):
        raise ValueError(
            f"devices lists none of this process's devices (jax.local_devices() is "
            f"{jax.local_devices()}): with several processes (jax.distributed), every "
            "process passes the same list, e.g. jax.devices()."
        )
    return chosen


def _multiple(batch_size: int, n: int) -> int:
    """The nearest multiple of `n` at or above `batch_size`."""
    return -(-batch_size // n) * n


def _divisor(batch_size: int, n: int) -> int:
    """The largest device count below `n` that divides `batch_size`."""
    return max(d for d in range(1, n) if batch_size % d == 0)
