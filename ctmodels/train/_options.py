"""`fit`'s keyword arguments as one value (`FitOptions`), and their checks.

The checks run in a fixed order, so that a call with several bad arguments always
reports the same one first.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import json
import re
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from .._errors import is_int as _is_int
from ._checkpoint import jsonable

SCHEDULES = ("warmup_cosine", "exponential", "constant")
NAN_POLICIES = ("skip", "rollback", "raise")


@dataclasses.dataclass(frozen=True, eq=False)
class FitOptions:
    """`fit`'s keyword arguments but `valid` and `key`, by the same names (see `fit`).
    `check_options` returns a normalised copy: `loss_kwargs` a dict, `eval_task`
    defaulted to `task`."""

    epochs: int | None
    steps: int | None
    batch_size: int
    devices: Any
    optimizer: optax.GradientTransformation | None
    learning_rate: float
    schedule: str | Callable
    clip_norm: float | None
    kl_anneal_steps: int
    layout: str
    time_bucket: int | str | None
    task: Callable | None
    eval_task: Callable | None
    loss_kwargs: Mapping[str, Any] | None
    checkpoint_dir: Any
    checkpoint_every: int | None
    resume: bool
    patience: int | None
    restore_best: bool
    monitor: str
    nan_policy: str
    max_nan_skips: int
    progress: bool | None
    log: Any
    callback: Callable[[dict[str, Any]], None] | None
    extra_state: Mapping[str, Any] | None


@dataclasses.dataclass(frozen=True)
class Checked:
    """What checking the arguments found besides the normalised options."""

    options: FitOptions
    pass_kl: bool  # the loss takes a `kl_weight`
    extra_json: Any  # `extra_state`, JSON-able
    key_data: list[int]  # the key's raw data (stored to check resumes)


def check_options(model: Any, valid: Any, key: Any, o: FitOptions) -> Checked:
    """Check `fit`'s arguments (all but the data, which `as_data` checks)."""
    loss_method = getattr(model, "loss", None)
    if not callable(loss_method):
        raise ValueError(
            f"fit needs a model with a method loss(batch, *, key) -> (loss, "
            f"metrics); {type(model).__name__} has no `loss`."
        )
    _check_length(o)
    _check_policies(o, valid)
    pass_kl = _check_kl(o, model, loss_method)
    if o.layout not in ("padded", "union"):
        raise ValueError(f"layout must be 'padded' or 'union', got {o.layout!r}.")
    _check_optimizer(o)
    if o.loss_kwargs is not None and not isinstance(o.loss_kwargs, Mapping):
        raise ValueError(f"loss_kwargs must be a dict, got {type(o.loss_kwargs)}.")
    loss_kwargs = dict(o.loss_kwargs or {})
    if "key" in loss_kwargs or "kl_weight" in loss_kwargs:
        raise ValueError(
            "loss_kwargs may not set `key` or `kl_weight`: fit passes them."
        )
    if o.extra_state is not None and not isinstance(o.extra_state, Mapping):
        raise ValueError(f"extra_state must be a dict, got {type(o.extra_state)}.")
    extra_json = jsonable(dict(o.extra_state or {}), "extra_state")
    key_data = check_key(key)
    o = dataclasses.replace(
        o,
        loss_kwargs=loss_kwargs,
        eval_task=o.task if o.eval_task is None else o.eval_task,
    )
    return Checked(o, pass_kl, extra_json, key_data)


def _check_length(o: FitOptions) -> None:
    if (o.epochs is None) == (o.steps is None):
        raise ValueError(
            "Give exactly one of epochs= or steps= (how long to train); got "
            f"epochs={o.epochs!r}, steps={o.steps!r}."
        )
    for name, v in (("epochs", o.epochs), ("steps", o.steps)):
        if v is not None and (not _is_int(v) or v < 1):
            raise ValueError(f"{name} must be a positive int, got {v!r}.")
    if not _is_int(o.batch_size) or o.batch_size < 1:
        raise ValueError(f"batch_size must be an int >= 1, got {o.batch_size!r}.")


def _check_policies(o: FitOptions, valid: Any) -> None:
    """NaN policy, monitor, early stopping, checkpoint interval."""
    if o.nan_policy not in NAN_POLICIES:
        raise ValueError(
            f"nan_policy must be one of {NAN_POLICIES}, got {o.nan_policy!r}."
        )
    if not _is_int(o.max_nan_skips) or o.max_nan_skips < 1:
        raise ValueError(f"max_nan_skips must be an int >= 1, got {o.max_nan_skips!r}.")
    if not isinstance(o.monitor, str) or not o.monitor:
        raise ValueError(
            f"monitor must be the name of a validation value ('loss' or a metric of "
            f"the loss, e.g. 'mse'), got {o.monitor!r}."
        )
    if o.monitor != "loss" and valid is None:
        raise ValueError(
            f"monitor={o.monitor!r} names a validation value: pass valid= as well."
        )
    if o.patience is not None:
        if not _is_int(o.patience) or o.patience < 1:
            raise ValueError(f"patience must be an int >= 1, got {o.patience!r}.")
        if valid is None:
            raise ValueError(
                "patience (early stopping) needs validation data: pass valid=."
            )
    if o.checkpoint_every is not None and (
        not _is_int(o.checkpoint_every) or o.checkpoint_every < 1
    ):
        raise ValueError(
            f"checkpoint_every must be an int >= 1 (steps) or None, got "
            f"{o.checkpoint_every!r}."
        )


def _check_kl(o: FitOptions, model: Any, loss_method: Callable) -> bool:
    """Whether the loss takes a `kl_weight` (and annealing has one to set)."""
    if not _is_int(o.kl_anneal_steps) or o.kl_anneal_steps < 0:
        raise ValueError(
            f"kl_anneal_steps must be an int >= 0, got {o.kl_anneal_steps!r}."
        )
    pass_kl = accepts(loss_method, "kl_weight")
    if o.kl_anneal_steps > 0 and not pass_kl:
        raise ValueError(
            f"kl_anneal_steps={o.kl_anneal_steps} but {type(model).__name__}.loss "
            "has no `kl_weight` parameter to receive the annealing weight."
        )
    return pass_kl


def _check_optimizer(o: FitOptions) -> None:
    if o.optimizer is not None:
        if not isinstance(o.optimizer, optax.GradientTransformation):
            raise ValueError(
                "optimizer must be an optax.GradientTransformation (e.g. "
                f"optax.adam(1e-3)); got {type(o.optimizer).__name__}."
            )
        return
    lr = o.learning_rate
    if not (isinstance(lr, (int, float)) and lr > 0):
        raise ValueError(f"learning_rate must be a positive number, got {lr!r}.")
    if not (callable(o.schedule) or o.schedule in SCHEDULES):
        raise ValueError(
            f"schedule must be one of {SCHEDULES} or a callable step -> "
            f"learning rate; got {o.schedule!r}."
        )
    clip = o.clip_norm
    if clip is not None and not (isinstance(clip, (int, float)) and clip > 0):
        raise ValueError(f"clip_norm must be a positive number or None, got {clip!r}.")


def check_key(key: Any) -> list[int]:
    """Validate a PRNG key; return its raw data (stored to check resumes)."""
    if isinstance(key, jax.Array) and jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
        if key.shape != ():
            raise ValueError(f"key must be a single PRNG key, got shape {key.shape}.")
        data = jax.random.key_data(key)
    elif (
        isinstance(key, (jax.Array, np.ndarray))
        and key.dtype == np.uint32
        and key.shape == (2,)
    ):
        data = key
    else:
        raise ValueError(
            f"key must be a JAX PRNG key such as jax.random.key(0); got {key!r}."
        )
    return [int(v) for v in np.asarray(data).ravel()]


def accepts(fn: Callable, name: str) -> bool:
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False
    return name in params


_ADDRESS = re.compile(r" at 0x[0-9a-fA-F]+")


def describe(obj: Any) -> Any:
    """A stable, JSON-able description of a callable / value (for resume checks)."""
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    if isinstance(obj, functools.partial):
        args = [repr(describe(a)) for a in obj.args]
        args += [f"{k}={describe(v)!r}" for k, v in sorted(obj.keywords.items())]
        return f"{describe(obj.func)}({', '.join(args)})"
    qualname = getattr(obj, "__qualname__", None)
    if isinstance(qualname, str) and not isinstance(obj, type(None)):
        return f"{getattr(obj, '__module__', '?')}.{qualname}"
    return _ADDRESS.sub("", f"{type(obj).__qualname__}: {obj!r}")


def json_roundtrip(x: Any) -> Any:
    return json.loads(json.dumps(x, sort_keys=True))
