"""`devices=` for inference: `ctmodels.models.predict` (and `predict_grid`,
`calibrate_spread`), `FFJORD.log_prob` and `FFJORD.sample`, and the jobs' `predict`,
`evaluate` and `sample` (`--devices N`).

The devices form a one-axis `jax.sharding.Mesh` (axis `"data"`), as for
`ctmodels.train.fit(devices=...)`: the inputs' leading (series, point or sample) axis
is split over the devices, `NamedSharding(mesh, PartitionSpec("data"))`, and the model
and the keys are replicated, `NamedSharding(mesh, PartitionSpec())`. The compiled
function is the one the single-device path runs; only its inputs are placed, and
XLA's SPMD partitioner (GSPMD) splits the program. A batch that is solved as one ODE
state (FFJORD's points, a latent ODE's shared-grid batch) keeps one step-size control:
its error norm becomes an all-reduce, so the sharded solve takes the very steps the
single-device one takes, and the results agree up to the order of floating-point sums.

A leading axis that does not divide over the devices is padded to the next multiple
(copies of its last row) and the padding is cut from the results; see
`pad_rows`. Where the rows are solved together, the padded rows join the step-size
control, so the results then agree to the solver's tolerance rather than to
reduction order.

This module depends on JAX alone (the models know nothing of `ctmodels.train`); its
device checks say what `ctmodels.train.fit`'s say, in the caller's name.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from ._errors import is_int

AXIS = "data"


class Rows:
    """A one-axis mesh over `devices` that splits arrays along their first axis and
    replicates everything else."""

    def __init__(self, devices: Sequence[jax.Device]):
        self.devices = tuple(devices)
        self.size = len(self.devices)
        self.mesh = Mesh(np.asarray(self.devices, dtype=object), (AXIS,))
        self.split = NamedSharding(self.mesh, PartitionSpec(AXIS))
        self.replicated = NamedSharding(self.mesh, PartitionSpec())

    def round_up(self, n: int) -> int:
        """The nearest multiple of the device count at or above `n`."""
        return -(-int(n) // self.size) * self.size

    def replicate(self, tree: Any) -> Any:
        """Every array leaf of `tree` copied to every device (keys as key data)."""

        def put(x):
            if not eqx.is_array(x):
                return x
            if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
                data = jax.device_put(jax.random.key_data(x), self.replicated)
                return jax.random.wrap_key_data(data, impl=jax.random.key_impl(x))
            return jax.device_put(x, self.replicated)

        return jax.tree.map(put, tree)

    def split_rows(self, tree: Any) -> Any:
        """Every array leaf of `tree` split along its first axis (which must divide
        over the devices: pad first, `pad_rows`), in one `device_put`."""
        leaves, treedef = jax.tree.flatten(tree)
        where = [i for i, x in enumerate(leaves) if eqx.is_array(x)]
        for i in where:
            if leaves[i].ndim < 1 or leaves[i].shape[0] % self.size:
                raise ValueError(
                    f"An array of shape {leaves[i].shape} cannot be split over "
                    f"{self.size} devices along its first axis (internal: pad it to "
                    "a multiple first)."
                )
        placed = jax.device_put([leaves[i] for i in where], [self.split] * len(where))
        for i, x in zip(where, placed, strict=True):
            leaves[i] = x
        return jax.tree.unflatten(treedef, leaves)


def choose(devices: Any, entry: str, *, local_only: bool) -> list[jax.Device] | None:
    """The devices `devices=` names for `entry` (`"fit"`, `"predict"`, ...), or None
    for the single-device path; the checks and messages `fit` and the inference
    functions share.

    None and 1 are the single-device path (no mesh); an int N > 1 takes the first N
    of `jax.local_devices()`; a sequence of devices takes those, always on a mesh (a
    one-device sequence runs the sharded path on one device). `local_only`: every
    device must be this process's (inference); otherwise at least one must (`fit`
    across processes, where every process passes `jax.devices()`)."""
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
                f"{entry}(devices={n}) asks for more devices than this process has: "
                f"jax.local_device_count() is {available} "
                f"({jax.default_backend()}). Pass devices={available} or fewer. "
                "On CPU, more devices can be simulated by setting "
                f"XLA_FLAGS=--xla_force_host_platform_device_count={n} before JAX "
                "starts (they share the CPU's cores)."
            )
        return list(jax.local_devices()[:n])
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
    if local_only and not all(d.process_index == here for d in chosen):
        raise ValueError(
            f"{entry}(devices=...) runs on this process's devices only (jax."
            f"local_devices() is {jax.local_devices()}), got {chosen}: with several "
            "processes, let each predict its own share of the data."
        )
    if not any(d.process_index == here for d in chosen):
        raise ValueError(
            f"devices lists none of this process's devices (jax.local_devices() is "
            f"{jax.local_devices()}): with several processes (jax.distributed), every "
            "process passes the same list, e.g. jax.devices()."
        )
    return chosen


def resolve(devices: Any, entry: str) -> Rows | None:
    """`devices=` of the inference function `entry` as a `Rows` mesh, or None for the
    single-device path (`choose`, with every device this process's); a `Rows` is
    used as it is (a caller that resolved the devices once passes them on). The same
    meaning and checks as `ctmodels.train.fit(devices=...)`, less the batch size's:
    inference pads what does not divide."""
    if isinstance(devices, Rows):
        return devices
    chosen = choose(devices, entry, local_only=True)
    return None if chosen is None else Rows(chosen)


def pad_rows(x: Any, rows: int) -> Any:
    """`x` (an array) padded along its first axis to `rows` rows with copies of its
    last row: values the function already sees, so nothing new (a time before the
    batch's, a point far out) enters a computation shared by the rows."""
    n = x.shape[0]
    if n == rows:
        return x
    if n == 0:
        raise ValueError("Nothing to pad: the array has no rows.")
    last = x[-1:]
    reps = (rows - n,) + (1,) * (x.ndim - 1)
    if isinstance(x, np.ndarray):
        return np.concatenate([x, np.tile(last, reps)])
    return jnp.concatenate([x, jnp.tile(last, reps)])


def check_concrete(tree: Any, entry: str) -> None:
    """Refuse traced inputs: placing arrays on devices needs their values."""
    if any(isinstance(x, jax.core.Tracer) for x in jax.tree.leaves(tree)):
        raise ValueError(
            f"{entry}(devices=...) places its inputs on devices, so it cannot run "
            "inside jax.jit (or another JAX transformation): call it outside, or "
            "leave devices=None and shard the inputs yourself."
        )


def map_rows(
    fn: Callable, model: Any, x: Any, place: Rows, *args: Any, entry: str
) -> jax.Array:
    """`fn(model, x_rows, *args)` for `x [n, ...]` split over `place`'s devices: `x`
    padded to a multiple of the device count (`pad_rows`), `model` and `args`
    replicated, the padding cut from the result, which is returned on the default
    device (as a single-device call's would be)."""
    check_concrete((model, x, args), entry)
    n = x.shape[0]
    padded = place.split_rows(pad_rows(x, place.round_up(n)))
    out = fn(place.replicate(model), padded, *place.replicate(args))
    return jax.tree.map(lambda y: jnp.asarray(np.asarray(jax.device_get(y))[:n]), out)
