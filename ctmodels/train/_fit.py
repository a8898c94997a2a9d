"""`fit`: one generic, resumable training loop for any model with a `loss` method.

The loop is built so that an interrupted run, resumed, ends in exactly the same
parameters as an uninterrupted one:

- all randomness comes from the `key` by `fold_in`, never from a stateful generator:
  epoch `e` shuffles with `fold_in(fold_in(key, 0), e)` (the same order as
  `ctmodels.data.batches(train, batch_size, key=that)`), step `s` draws its task and
  loss keys from `fold_in(fold_in(key, 1), s)`, validation batch `i` uses
  `fold_in(fold_in(key, 2), i)` in every epoch;
- the host-side state (step, epoch, batch within the epoch, running sums of the
  epoch's metrics, early-stopping state, history, learning-rate scale) changes by one
  assignment per step, so a `KeyboardInterrupt` always sees a consistent state;
- a checkpoint stores all of it, and resuming skips the batches of the current epoch
  that were already done (without reading them).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import gc
import inspect
import json
import math
import os
import re
import signal
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Literal

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pandas as pd
from jaxtyping import PRNGKeyArray

from .._errors import (
    discard_failed_callbacks,
    is_int as _is_int,
    runtime_message,
    traced_failures,
)
from ..data import bucket_length
from ._checkpoint import (
    FIT_SUBDIR,
    jsonable,
    model_description,
    read_header,
    read_tree,
    resolve_checkpoint,
    write_checkpoint,
    write_text_atomic,
)
from ._data import as_data, auto_min_times, batch_weight, check_same_channels
from ._progress import Progress, resolve_log

_SCHEDULES = ("warmup_cosine", "exponential", "constant")
_NAN_POLICIES = ("skip", "rollback", "raise")
_ROLLBACK_FACTOR = 0.5


# ------------------------------------------------------------------ small helpers


def _check_key(key: Any) -> list[int]:
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


_ADDRESS = re.compile(r" at 0x[0-9a-fA-F]+")


def _describe(obj: Any) -> Any:
    """A stable, JSON-able description of a callable / value (for resume checks)."""
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    if isinstance(obj, functools.partial):
        args = [repr(_describe(a)) for a in obj.args]
        args += [f"{k}={_describe(v)!r}" for k, v in sorted(obj.keywords.items())]
        return f"{_describe(obj.func)}({', '.join(args)})"
    qualname = getattr(obj, "__qualname__", None)
    if isinstance(qualname, str) and not isinstance(obj, type(None)):
        return f"{getattr(obj, '__module__', '?')}.{qualname}"
    return _ADDRESS.sub("", f"{type(obj).__qualname__}: {obj!r}")


def _json_roundtrip(x: Any) -> Any:
    return json.loads(json.dumps(x, sort_keys=True))


def _accepts(fn: Callable, name: str) -> bool:
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False
    return name in params


def _schedule_lr(schedule, step, peak, total):
    """The default optimizer's learning rate at `step` (see `fit`); `peak` and
    `total` are traced arrays, so changing them does not recompile."""
    if callable(schedule):
        return jnp.asarray(schedule(step), jnp.float32)
    s = step.astype(jnp.float32)
    total = jnp.maximum(total, 1)
    if schedule == "constant":
        return peak
    if schedule == "exponential":
        return peak * 0.1 ** (s / total.astype(jnp.float32))
    # warmup_cosine
    warmup = jnp.clip(total // 20, 1, 1000)
    decay = jnp.maximum(total, warmup + 1) - warmup
    warm = peak * (0.1 + 0.9 * s / warmup.astype(jnp.float32))
    frac = jnp.clip((s - warmup) / decay.astype(jnp.float32), 0.0, 1.0)
    cos = peak * (0.01 + 0.99 * 0.5 * (1.0 + jnp.cos(jnp.pi * frac)))
    return jnp.where(s < warmup, warm, cos)


def _select(pred, new, old):
    """`new` where `pred` else `old`, leaf by leaf (arrays only)."""
    return jax.tree.map(
        lambda n, o: jnp.where(pred, n, o) if eqx.is_array(n) else n, new, old
    )


def _all_finite(tree) -> jax.Array:
    leaves = [x for x in jax.tree.leaves(tree) if eqx.is_inexact_array(x)]
    if not leaves:
        return jnp.array(True)
    return jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves]).all()


def _current_lr(opt_state) -> jax.Array:
    """The learning rate recorded by `optax.inject_hyperparams`, or NaN."""
    found = [
        node.hyperparams["learning_rate"]
        for node in jax.tree.leaves(
            opt_state,
            is_leaf=lambda x: isinstance(getattr(x, "hyperparams", None), dict),
        )
        if isinstance(getattr(node, "hyperparams", None), dict)
        and "learning_rate" in node.hyperparams
    ]
    if len(found) != 1 or not eqx.is_array_like(found[0]):
        return jnp.array(jnp.nan, jnp.float32)
    return jnp.asarray(found[0], jnp.float32)


def _strong(tree):
    """Strongly typed copies of the array leaves (weak types would retrace later)."""
    return jax.tree.map(
        lambda x: jnp.array(x, dtype=x.dtype) if eqx.is_array(x) else x, tree
    )


def _call_loss(model, batch, key, kwargs):
    out = model.loss(batch, key=key, **kwargs)
    if isinstance(out, tuple) and len(out) == 2:
        loss, metrics = out
    else:
        loss, metrics = out, {}
    loss = jnp.asarray(loss)
    if loss.shape != ():
        raise ValueError(
            f"{type(model).__name__}.loss must return a scalar loss (and a dict of "
            f"scalar metrics); got a loss of shape {loss.shape}."
        )
    if not isinstance(metrics, Mapping):
        raise ValueError(
            f"{type(model).__name__}.loss must return (loss, metrics) with metrics a "
            f"dict of scalars; got metrics of type {type(metrics).__name__}."
        )
    metrics = {str(k): jnp.asarray(v) for k, v in metrics.items()}
    bad = {k: v.shape for k, v in metrics.items() if v.shape != ()}
    if bad:
        raise ValueError(
            f"{type(model).__name__}.loss metrics must be scalars; got shapes {bad}."
        )
    # the returned scalar is the loss; a metric of the same name is redundant
    metrics.pop("loss", None)
    return loss, metrics


@contextlib.contextmanager
def gc_paused():
    """Python's cyclic garbage collector paused (if it was running) inside.

    `fit` calls its compiled steps inside this: the first call traces the step, which
    creates millions of short-lived Python objects, and the collections they trigger
    took about 15% of the trace (0.4 s of the latent ODE's 2.6 s first-step trace in
    `benchmarks/latent_ode_step.py`). The later calls only dispatch, so pausing costs
    them nothing; the garbage is collected once the collector runs again."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


# ------------------------------------------------------------------ compiled steps

# Incremented whenever a step is traced (= compiled); `fit` reports the difference.
_TRACES = {"train_step": 0, "eval_step": 0}


# The default optimizer's direction: Adam's scaled moments. Clipping, the learning
# rate and its schedule are applied by the step from traced values, so one compiled
# step serves every learning rate, clip norm and run length.
_ADAM = optax.scale_by_adam()


@dataclasses.dataclass(frozen=True)
class _StepConfig:
    """The static (hashed) part of the compiled steps."""

    optimizer: Any  # None: the default (clipping + Adam + schedule)
    schedule: Any  # the default optimizer's schedule name or callable
    clip: bool
    task: Any
    eval_task: Any
    pass_kl: bool


def _step_inputs(batch, step, hyper, step_key, loss_kwargs, cfg):
    """What training step `step` feeds the loss: its task applied to `batch`, its loss
    key, and the loss keyword arguments with the annealed KL weight (returned too;
    NaN when the loss takes none)."""
    k_task, k_loss = jax.random.split(jax.random.fold_in(step_key, step))
    if cfg.task is not None:
        batch = cfg.task(batch, key=k_task)
    kwargs = dict(loss_kwargs)
    if cfg.pass_kl:
        kl_steps = hyper["kl_steps"]
        kl = jnp.where(
            kl_steps > 0,
            jnp.minimum(1.0, (step + 1) / jnp.maximum(kl_steps, 1)),
            1.0,
        ).astype(jnp.float32)
        kwargs["kl_weight"] = kl
    else:
        kl = jnp.array(jnp.nan, jnp.float32)
    return batch, k_loss, kwargs, kl


@eqx.filter_jit
def _train_step(model, opt_state, batch, step, hyper, step_key, loss_kwargs, cfg):
    """One guarded optimizer step: task, loss, gradient, update, NaN guard.

    `hyper` holds traced scalars: `lr_scale` (rollback factor), `peak_lr`,
    `total_steps`, `clip_norm`, `kl_steps`.
    """
    _TRACES["train_step"] += 1
    batch, k_loss, kwargs, kl = _step_inputs(
        batch, step, hyper, step_key, loss_kwargs, cfg
    )

    def loss_fn(m):
        return _call_loss(m, batch, k_loss, kwargs)

    (loss, metrics), grads = eqx.filter_value_and_grad(loss_fn, has_aux=True)(model)
    params = eqx.filter(model, eqx.is_inexact_array)
    lr_scale = hyper["lr_scale"]
    if cfg.optimizer is None:
        if cfg.clip:
            norm = jnp.sqrt(sum(jnp.sum(jnp.square(g)) for g in jax.tree.leaves(grads)))
            factor = jnp.minimum(1.0, hyper["clip_norm"] / jnp.maximum(norm, 1e-30))
            grads = jax.tree.map(lambda g: g * factor.astype(g.dtype), grads)
        direction, new_opt_state = _ADAM.update(grads, opt_state, params)
        lr = _schedule_lr(cfg.schedule, step, hyper["peak_lr"], hyper["total_steps"])
        lr = lr * lr_scale
        updates = jax.tree.map(lambda u: -lr.astype(u.dtype) * u, direction)
    else:
        updates, new_opt_state = cfg.optimizer.update(grads, opt_state, params)
        updates = jax.tree.map(lambda u: u * lr_scale.astype(u.dtype), updates)
        lr = _current_lr(new_opt_state) * lr_scale
    new_model = eqx.apply_updates(model, updates)
    # the NaN guard: a non-finite loss or gradient leaves everything as it was
    finite = jnp.isfinite(loss) & _all_finite(grads)
    new_model = _select(finite, new_model, model)
    new_opt_state = _select(finite, new_opt_state, opt_state)
    out = {
        "loss": loss,
        "metrics": metrics,
        "finite": finite,
        "weight": batch_weight(batch),
        "lr": lr,
        "kl_weight": kl,
    }
    return new_model, new_opt_state, out


@eqx.filter_jit
def _eval_step(model, batch, index, eval_key, loss_kwargs, cfg):
    """Loss and metrics of one validation batch (inference mode, fixed key)."""
    _TRACES["eval_step"] += 1
    return _eval_outputs(model, batch, index, eval_key, loss_kwargs, cfg)


def _eval_outputs(model, batch, index, eval_key, loss_kwargs, cfg):
    model = eqx.nn.inference_mode(model)
    k_task, k_loss = jax.random.split(jax.random.fold_in(eval_key, index))
    if cfg.eval_task is not None:
        batch = cfg.eval_task(batch, key=k_task)
    kwargs = dict(loss_kwargs)
    if cfg.pass_kl:
        kwargs["kl_weight"] = jnp.array(1.0, jnp.float32)
    loss, metrics = _call_loss(model, batch, k_loss, kwargs)
    return {"loss": loss, "metrics": metrics, "weight": batch_weight(batch)}


@eqx.filter_jit
def _probe_step(model, batch, step, hyper, step_key, loss_kwargs, cfg):
    """The train step's task, loss and gradient, compiled with solver errors raised."""
    batch, k_loss, kwargs, _ = _step_inputs(
        batch, step, hyper, step_key, loss_kwargs, cfg
    )
    return eqx.filter_value_and_grad(
        lambda m: _call_loss(m, batch, k_loss, kwargs), has_aux=True
    )(model)


def _diagnose(state, batch, hyper, step_key, loss_kwargs, cfg) -> str | None:
    """Why a step was not finite, if a solver failed: rerun it with errors raised.

    The compiled train step turns solver failures into NaN (`traced_failures`); this
    recompiles the step with the runtime checks on, only when `fit` is about to fail.
    """
    try:
        with traced_failures("raise"):
            out = _probe_step(
                state.model,
                batch,
                jnp.asarray(state.step, jnp.int32),
                hyper,
                step_key,
                loss_kwargs,
                cfg,
            )
            jax.block_until_ready(out)
    except Exception as e:  # noqa: BLE001 - any runtime check that fired
        discard_failed_callbacks()  # reported below; not again at exit (GPU)
        return runtime_message(e)
    return None


# ------------------------------------------------------------------ loop state


@dataclasses.dataclass(frozen=True)
class _State:
    """Everything the loop needs to continue; replaced (never mutated) each step."""

    model: Any
    opt_state: Any
    best_model: Any = None
    step: int = 0  # optimizer steps taken (skipped NaN steps count too)
    epoch: int = 0  # completed epochs
    batch: int = 0  # batches of the current epoch done
    lr_scale: float = 1.0  # lowered by nan_policy="rollback"
    sums: tuple = ()  # ((name, weighted sum), ...) over the current epoch
    weight: float = 0.0  # total batch weight of the current epoch's good steps
    epoch_skips: int = 0
    nan_skips: int = 0  # all skipped (non-finite) steps
    consecutive_bad: int = 0
    rollbacks: int = 0  # since the last save point
    best_loss: float | None = None
    best_epoch: int | None = None
    bad_epochs: int = 0
    stopped_early: bool = False
    last_lr: float = math.nan
    last_kl: float = math.nan
    history: tuple = ()

    def progress_json(self) -> dict[str, Any]:
        out = {
            f.name: getattr(self, f.name)
            for f in dataclasses.fields(self)
            if f.name not in ("model", "opt_state", "best_model", "history")
        }
        out["sums"] = [[k, v] for k, v in self.sums]
        return out

    @classmethod
    def from_json(cls, d: dict[str, Any], **trees) -> _State:
        names = {f.name for f in dataclasses.fields(cls)}
        kw = {k: v for k, v in d.items() if k in names}
        kw["sums"] = tuple((k, float(v)) for k, v in d.get("sums", []))
        return cls(**kw, **trees)


# ------------------------------------------------------------------ fit


def fit(
    model: eqx.Module,
    train: Any,
    *,
    valid: Any = None,
    epochs: int | None = None,
    steps: int | None = None,
    batch_size: int = 50,
    key: PRNGKeyArray,
    optimizer: optax.GradientTransformation | None = None,
    learning_rate: float = 1e-3,
    schedule: str | Callable = "warmup_cosine",
    clip_norm: float | None = 1.0,
    kl_anneal_steps: int = 0,
    layout: Literal["padded", "union"] = "union",
    time_bucket: int | str | None = "auto",
    task: Callable | None = None,
    eval_task: Callable | None = None,
    loss_kwargs: dict[str, Any] | None = None,
    checkpoint_dir: str | os.PathLike | None = None,
    checkpoint_every: int | None = None,
    resume: bool = True,
    patience: int | None = None,
    restore_best: bool = True,
    monitor: str = "loss",
    nan_policy: Literal["skip", "rollback", "raise"] = "skip",
    max_nan_skips: int = 20,
    progress: bool | None = None,
    log: Any = None,
    callback: Callable[[dict[str, Any]], None] | None = None,
    extra_state: dict[str, Any] | None = None,
) -> tuple[eqx.Module, pd.DataFrame]:
    """Train `model` by minimising `model.loss` with Optax; resumable and NaN-guarded.

    The model needs one method, `loss(self, batch, *, key, **kwargs) -> (loss,
    metrics)` (a scalar and a dict of scalars). If `loss` has a `kl_weight` parameter,
    `fit` passes the KL-annealing weight (a traced array: changing it never
    recompiles; validation uses 1). One `equinox.filter_jit`-compiled step does the
    task, the loss, the gradient, the update and the NaN guard; it compiles once per
    batch shape (bucket), counted in `history.attrs["compilations"]`.

    **Arguments:**

    - `model`: an `equinox.Module` with a `loss` method (see above). Models that keep
      their constructor arguments in a static `hyperparameters` field can be rebuilt
      from checkpoints by `load_checkpoint`.
    - `train`: a `ctmodels.data.TimeSeries`, a lazy source (`len()` and
      `source[indices] -> TimeSeries`), batched as `ctmodels.data.batches` does; or
      an array / pytree of arrays with a leading example axis (for flows, DEQs, ...),
      batched by rows (the short last batch of an epoch is filled up with the
      epoch's first rows, so every training batch has one shape).
    - `valid`: validation data of the same kind, scored at the end of every epoch
      (the mean of the loss and metrics over its batches, weighted by each batch's
      `weight.sum()` or row count).
    - `epochs` / `steps`: how long to train; give exactly one. With `steps`, the
      last (partial) epoch is still validated and recorded.
    - `batch_size`: series (or rows) per batch.
    - `key`: a JAX PRNG key; all randomness derives from it (see the module docs).
    - `optimizer`: any `optax.GradientTransformation` (its updates are applied as
      they are). Default: Adam after global-norm clipping at `clip_norm`, on the
      learning-rate `schedule`. The default's learning rate, schedule length, clip
      norm (and `kl_anneal_steps`) enter the compiled step as arrays, so changing
      them, or running longer, does not recompile.
    - `learning_rate`: the default optimizer's peak learning rate.
    - `schedule`: the default optimizer's learning rate as a function of the step:
      `"warmup_cosine"` (default: linear warm-up from `0.1 * learning_rate` over 5%
      of the steps, at most 1000, then cosine decay to `0.01 * learning_rate` at the
      last step), `"exponential"` (decays smoothly to `0.1 * learning_rate` at the
      last step), `"constant"`, or a callable `step -> learning rate` (e.g. an Optax
      schedule; `learning_rate` is then unused).
    - `clip_norm`: global gradient-norm clipping of the default optimizer (None: off).
    - `kl_anneal_steps`: if > 0, the `kl_weight` passed to the loss rises linearly
      from `1 / kl_anneal_steps` to 1 over this many steps (needs a loss with a
      `kl_weight` parameter). Otherwise 1.
    - `layout`, `time_bucket`: how time series are batched (see
      `ctmodels.data.make_batch`). `time_bucket="auto"` (default) rounds time lengths
      to powers of two, as `"pow2"` does, but first pads every training and
      validation batch to at least the bucket that holds 90% of the time lengths of
      16 training batches drawn up front (`min_times`, recorded in the checkpoint's
      fit configuration): the few shorter batches then share the common shape
      instead of compiling their own. It reads up to 16 batches once before
      training (drawn from one or more epochs' orders); `"pow2"` keeps every batch at
      its own bucket.
    - `task`: `task(batch, *, key) -> batch`, applied inside the compiled step (e.g.
      `functools.partial(ctmodels.data.interpolation_task, fraction=0.5)`).
    - `eval_task`: the same for validation batches, with a fixed key per batch so
      every epoch is scored on the same task. Default: `task`.
    - `loss_kwargs`: extra keyword arguments for `loss`.
    - `checkpoint_dir`: folder for atomic checkpoints (`checkpoint/`: model,
      optimizer state, best model, and a JSON of the model class and
      hyperparameters, the fit configuration, the loop state and `extra_state`) and
      `history.csv`. Checkpoints are written at every epoch end, every
      `checkpoint_every` steps, at the end, and on `KeyboardInterrupt` / `SIGTERM`.
    - `checkpoint_every`: also checkpoint every this many steps (default: only at
      epoch ends).
    - `resume`: continue from the checkpoint in `checkpoint_dir` if there is one (the
      arguments must describe the same run). With the same arguments the result is
      bitwise the same as an uninterrupted run (on the same device). `False` starts
      afresh and overwrites it.
    - `patience`: stop when the validation loss (or `monitor`) has not improved for
      this many epochs (needs `valid`).
    - `restore_best`: with `valid`, return the model of the best validation loss
      (or `monitor`; otherwise the last one).
    - `monitor`: which validation value `patience` and `restore_best` minimise: the
      loss (default) or one of the metrics the loss returns, by name (e.g. `"mse"`
      when the MSE is what will be reported; needs `valid`). An unknown name is an
      error before training starts, listing the names there are.
    - `nan_policy`: what to do with a step whose loss or gradient is not finite. The
      step never changes the parameters or optimizer state (this is decided inside
      the compiled step). `"skip"`: count it and go on, failing after
      `max_nan_skips` consecutive ones; `"rollback"`: return to the last save point
      and halve the learning rate, failing after `max_nan_skips` rollbacks without
      reaching a new save point; `"raise"`: fail at once.
    - `max_nan_skips`: see `nan_policy`.
    - `progress`: show a progress bar (step, loss, it/s, ETA) on stderr. Default: only
      when stderr is a terminal.
    - `log`: where the one-line epoch summaries go when there is no bar: None (the
      `"ctmodels.train"` logger, level INFO), a `logging.Logger`, a callable taking
      a string (e.g. `print`), or False.
    - `callback`: called after every step with a dict (`step`, `epoch`, `batch`,
      `loss`, `metrics`, `skipped`, `lr`, `model`).
    - `extra_state`: a JSON-serialisable dict stored in every checkpoint (e.g.
      normalisation statistics; read it back with `load_checkpoint`).

    **Returns:** `(model, history)`: the trained (or best) model and a
    `pandas.DataFrame` with one row per epoch: `epoch`, `step`, `train_loss`,
    `train_<metric>`, `valid_loss`, `valid_<metric>`, `lr` (of the epoch's last
    step; for a custom optimizer only if it records one through
    `optax.inject_hyperparams`, else NaN), `kl_weight` (if the loss takes one),
    `time` (seconds since the start of training), `nan_skips`. Its `attrs` hold
    `compilations` (how many times this call traced, i.e. compiled, the train and
    eval steps: once per batch shape; 0 when an earlier `fit` already compiled the
    same configuration), `monitor`, `best_epoch`, `best_valid` (the best monitored
    value), `best_valid_loss` (the validation loss at `best_epoch`), `stopped_early`,
    `nan_skips`, `steps`, `resumed_from_step` and, for time series, `min_times`
    (the time length every batch was padded to at least; 0 unless
    `time_bucket="auto"`).

    **Raises:** `ValueError` for bad arguments or a checkpoint of a different run;
    `FloatingPointError` when non-finite losses persist (see `nan_policy`).

    References: Adam (Kingma & Ba, 2015); cosine schedule (Loshchilov & Hutter, 2017);
    KL annealing (Bowman et al., 2016).

    ```bibtex
    @inproceedings{kingma2015adam,
      title={Adam: A Method for Stochastic Optimization},
      author={Kingma, Diederik P. and Ba, Jimmy},
      booktitle={International Conference on Learning Representations},
      year={2015}
    }
    @inproceedings{loshchilov2017sgdr,
      title={{SGDR}: Stochastic Gradient Descent with Warm Restarts},
      author={Loshchilov, Ilya and Hutter, Frank},
      booktitle={International Conference on Learning Representations},
      year={2017}
    }
    @inproceedings{bowman2016generating,
      title={Generating Sentences from a Continuous Space},
      author={Bowman, Samuel R. and Vilnis, Luke and Vinyals, Oriol and Dai, Andrew
              M. and Jozefowicz, Rafal and Bengio, Samy},
      booktitle={Conference on Computational Natural Language Learning},
      year={2016}
    }
    ```
    """
    # ------------------------------------------------------------ check arguments
    loss_method = getattr(model, "loss", None)
    if not callable(loss_method):
        raise ValueError(
            f"fit needs a model with a method loss(batch, *, key) -> (loss, "
            f"metrics); {type(model).__name__} has no `loss`."
        )
    if (epochs is None) == (steps is None):
        raise ValueError(
            "Give exactly one of epochs= or steps= (how long to train); got "
            f"epochs={epochs!r}, steps={steps!r}."
        )
    for name, v in (("epochs", epochs), ("steps", steps)):
        if v is not None and (not _is_int(v) or v < 1):
            raise ValueError(f"{name} must be a positive int, got {v!r}.")
    if not _is_int(batch_size) or batch_size < 1:
        raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}.")
    if nan_policy not in _NAN_POLICIES:
        raise ValueError(
            f"nan_policy must be one of {_NAN_POLICIES}, got {nan_policy!r}."
        )
    if not _is_int(max_nan_skips) or max_nan_skips < 1:
        raise ValueError(f"max_nan_skips must be an int >= 1, got {max_nan_skips!r}.")
    if not isinstance(monitor, str) or not monitor:
        raise ValueError(
            f"monitor must be the name of a validation value ('loss' or a metric of "
            f"the loss, e.g. 'mse'), got {monitor!r}."
        )
    if monitor != "loss" and valid is None:
        raise ValueError(
            f"monitor={monitor!r} names a validation value: pass valid= as well."
        )
    if patience is not None:
        if not _is_int(patience) or patience < 1:
            raise ValueError(f"patience must be an int >= 1, got {patience!r}.")
        if valid is None:
            raise ValueError(
                "patience (early stopping) needs validation data: pass valid=."
            )
    if checkpoint_every is not None and (
        not _is_int(checkpoint_every) or checkpoint_every < 1
    ):
        raise ValueError(
            f"checkpoint_every must be an int >= 1 (steps) or None, got "
            f"{checkpoint_every!r}."
        )
    if not _is_int(kl_anneal_steps) or kl_anneal_steps < 0:
        raise ValueError(
            f"kl_anneal_steps must be an int >= 0, got {kl_anneal_steps!r}."
        )
    pass_kl = _accepts(loss_method, "kl_weight")
    if kl_anneal_steps > 0 and not pass_kl:
        raise ValueError(
            f"kl_anneal_steps={kl_anneal_steps} but {type(model).__name__}.loss has "
            "no `kl_weight` parameter to receive the annealing weight."
        )
    if layout not in ("padded", "union"):
        raise ValueError(f"layout must be 'padded' or 'union', got {layout!r}.")
    if optimizer is None:
        if not (isinstance(learning_rate, (int, float)) and learning_rate > 0):
            raise ValueError(
                f"learning_rate must be a positive number, got {learning_rate!r}."
            )
        if not (callable(schedule) or schedule in _SCHEDULES):
            raise ValueError(
                f"schedule must be one of {_SCHEDULES} or a callable step -> "
                f"learning rate; got {schedule!r}."
            )
        if clip_norm is not None and not (
            isinstance(clip_norm, (int, float)) and clip_norm > 0
        ):
            raise ValueError(
                f"clip_norm must be a positive number or None, got {clip_norm!r}."
            )
    elif not isinstance(optimizer, optax.GradientTransformation):
        raise ValueError(
            "optimizer must be an optax.GradientTransformation (e.g. "
            f"optax.adam(1e-3)); got {type(optimizer).__name__}."
        )
    if loss_kwargs is not None and not isinstance(loss_kwargs, Mapping):
        raise ValueError(f"loss_kwargs must be a dict, got {type(loss_kwargs)}.")
    loss_kwargs = dict(loss_kwargs or {})
    if "key" in loss_kwargs or "kl_weight" in loss_kwargs:
        raise ValueError(
            "loss_kwargs may not set `key` or `kl_weight`: fit passes them."
        )
    if extra_state is not None and not isinstance(extra_state, Mapping):
        raise ValueError(f"extra_state must be a dict, got {type(extra_state)}.")
    extra_json = jsonable(dict(extra_state or {}), "extra_state")
    key_data = _check_key(key)
    log_fn = resolve_log(log)
    if eval_task is None:
        eval_task = task

    auto = isinstance(time_bucket, str) and time_bucket == "auto"
    if auto and checkpoint_dir is not None and resume and _pow2_era(checkpoint_dir):
        # written when "pow2" was fit's default: finish that run as it was started
        auto = False
        time_bucket = "pow2"
        if log_fn is not None:
            log_fn(
                "resuming a checkpoint written before time_bucket='auto' became fit's "
                "default: continuing with its time_bucket='pow2'"
            )
    rounding = "pow2" if auto else time_bucket
    bucket_length(1, rounding)  # a bad time_bucket fails here, not at the first batch
    train_data = as_data(
        train, batch_size, layout=layout, time_bucket=rounding, name="train"
    )
    valid_data = (
        None
        if valid is None
        else as_data(
            valid, batch_size, layout=layout, time_bucket=rounding, name="valid"
        )
    )
    if valid_data is not None:
        check_same_channels(train_data, valid_data)
    min_times = 0
    if auto and train_data.kind == "series":
        # one floor for training and validation batches, fixed by the training data
        min_times = auto_min_times(train_data)
        for d in (train_data, valid_data):
            if d is not None and d.kind == "series":
                d.min_times = min_times
    nb = train_data.num_batches(train=True)
    total_steps = steps if steps is not None else epochs * nb

    opt = _ADAM if optimizer is None else optimizer

    # ------------------------------------------------------------ run description
    try:
        model_desc = model_description(model)
    except ValueError:  # hyperparameters that are not JSON matter only to checkpoints
        if checkpoint_dir is not None:
            raise
        model_desc = {
            "model_class": type(model).__name__,
            "model_module": type(model).__module__,
            "hyperparameters": None,
        }
    compare = {
        "model_class": model_desc["model_class"],
        "key": key_data,
        "data": train_data.kind,
        "n_train": int(train_data.n),
        "n_valid": None if valid_data is None else int(valid_data.n),
        "batch_size": int(batch_size),
        "layout": layout if train_data.kind == "series" else None,
        "time_bucket": time_bucket if train_data.kind == "series" else None,
        # time_bucket="auto"'s floor, from the training data: a resumed run must pad
        # as the interrupted one did
        "min_times": min_times if train_data.kind == "series" else None,
        "optimizer": "default" if optimizer is None else "custom",
        "learning_rate": float(learning_rate) if optimizer is None else None,
        "schedule": _describe(schedule) if optimizer is None else None,
        "schedule_steps": total_steps
        if optimizer is None and schedule in ("warmup_cosine", "exponential")
        else None,
        "clip_norm": clip_norm if optimizer is None else None,
        "kl_anneal_steps": int(kl_anneal_steps),
        "monitor": monitor,
        "task": _describe(task),
        "eval_task": _describe(eval_task),
        "loss_kwargs": {k: _describe(v) for k, v in sorted(loss_kwargs.items())},
    }
    compare = _json_roundtrip(compare)
    config = {
        **compare,
        "epochs": epochs,
        "steps": steps,
        "total_steps": total_steps,
        "patience": patience,
        "restore_best": restore_best,
        "nan_policy": nan_policy,
        "max_nan_skips": max_nan_skips,
        "checkpoint_every": checkpoint_every,
    }

    # ------------------------------------------------------------ compiled steps
    # module-level jitted steps with hashable static configuration: a second `fit`
    # with the same optimizer / task / model structure reuses the compiled code
    traces0 = dict(_TRACES)
    cfg = _StepConfig(
        optimizer=optimizer,
        schedule=schedule if optimizer is None else None,
        clip=optimizer is None and clip_norm is not None,
        task=task,
        eval_task=eval_task,
        pass_kl=pass_kl,
    )
    f32 = functools.partial(jnp.asarray, dtype=jnp.float32)
    hyper0 = {
        "peak_lr": f32(learning_rate if optimizer is None else 1.0),
        "total_steps": jnp.asarray(total_steps, jnp.int32),
        "clip_norm": f32(1.0 if clip_norm is None else clip_norm),
        "kl_steps": jnp.asarray(kl_anneal_steps, jnp.int32),
    }
    data_key = jax.random.fold_in(key, 0)
    step_key = jax.random.fold_in(key, 1)
    eval_key = jax.random.fold_in(key, 2)

    def evaluate(model) -> dict[str, float]:
        order = valid_data.order(None)
        sums: dict[str, float] = {}
        total = 0.0
        for i in range(valid_data.num_batches(train=False)):
            batch = valid_data.batch(order, i, train=False)
            with traced_failures("nan"), gc_paused():
                out = _eval_step(
                    model, batch, jnp.asarray(i), eval_key, loss_kwargs, cfg
                )
            out = jax.device_get(out)
            w = float(out["weight"])
            total += w
            for name, v in (("loss", out["loss"]), *out["metrics"].items()):
                sums[name] = sums.get(name, 0.0) + w * float(v)
        return {
            f"valid_{k}": (v / total if total > 0 else math.nan)
            for k, v in sums.items()
        }

    if monitor != "loss":  # a name the loss returns? (shapes only: nothing runs)
        batch0 = valid_data.batch(valid_data.order(None), 0, train=False)
        with traced_failures("nan"):
            shapes = eqx.filter_eval_shape(
                _eval_outputs, model, batch0, jnp.asarray(0), eval_key, loss_kwargs,
                cfg,
            )  # fmt: skip
        names = sorted(["loss", *shapes["metrics"]])
        if monitor not in names:
            raise ValueError(
                f"monitor={monitor!r} is not a validation value of this model's "
                f"loss; it has {names}. Pass one of them."
            )

    # ------------------------------------------------------------ initial / resumed
    opt_state0 = opt.init(eqx.filter(model, eqx.is_inexact_array))
    state = _State(model=_strong(model), opt_state=_strong(opt_state0))
    ckpt_path = None if checkpoint_dir is None else Path(checkpoint_dir) / FIT_SUBDIR
    elapsed0 = 0.0
    resumed_from = None
    if checkpoint_dir is not None and resume and resolve_checkpoint(ckpt_path):
        state, elapsed0 = _resume(
            ckpt_path, state, model, opt_state0, model_desc, compare, checkpoint_dir
        )
        resumed_from = state.step

    # ------------------------------------------------------------ loop pieces
    t_start = time.perf_counter()

    def elapsed() -> float:
        return elapsed0 + time.perf_counter() - t_start

    def finished(s: _State) -> bool:
        if s.stopped_early:
            return True
        if epochs is not None:
            return s.epoch >= epochs
        return s.step >= steps and s.batch == 0

    def history_frame(s: _State) -> pd.DataFrame:
        df = pd.DataFrame(list(s.history))
        if df.empty:
            df = pd.DataFrame(columns=["epoch", "step", "train_loss"])
        return df

    saved = {"token": None}
    if resumed_from is not None:  # no need to rewrite the checkpoint just read
        saved["token"] = (state.step, state.epoch, state.batch, len(state.history))

    def save_point(s: _State) -> _State:
        """A checkpoint (if there is a folder) and the rollback target."""
        s = dataclasses.replace(s, rollbacks=0)
        token = (s.step, s.epoch, s.batch, len(s.history))
        if ckpt_path is not None and saved["token"] != token:
            frame = history_frame(s)
            meta = {
                "fit": config,
                "compare": compare,
                "state": s.progress_json(),
                "elapsed": elapsed(),
                "rng": {
                    "key_data": key_data,
                    "streams": "epoch e: fold_in(fold_in(key, 0), e); step s: "
                    "fold_in(fold_in(key, 1), s); valid batch i: "
                    "fold_in(fold_in(key, 2), i)",
                    "step": s.step,
                    "epoch": s.epoch,
                    "batch": s.batch,
                },
                "history": [dict(r) for r in s.history],
                # the header is written with sorted keys: the columns' own order
                "history_columns": list(frame.columns),
                "extra_state": extra_json,
            }
            header = {
                **model_desc,
                "default": "best_model"
                if restore_best and s.best_model is not None
                else "model",
                "metadata": meta,
            }
            write_checkpoint(
                ckpt_path,
                {
                    "model": s.model,
                    "opt_state": s.opt_state,
                    "best_model": s.best_model,
                },
                header,
            )
            write_text_atomic(
                Path(checkpoint_dir) / "history.csv",
                frame.to_csv(index=False),
            )
            saved["token"] = token
        return s

    def end_epoch(s: _State) -> _State:
        row: dict[str, Any] = {"epoch": s.epoch + 1, "step": s.step}
        for name, total in s.sums:
            row[f"train_{name}"] = total / s.weight if s.weight > 0 else math.nan
        if "train_loss" not in row:
            row["train_loss"] = math.nan
        best_model, best_loss, best_epoch, bad = (
            s.best_model,
            s.best_loss,
            s.best_epoch,
            s.bad_epochs,
        )
        stop = False
        if valid_data is not None:
            row.update(evaluate(s.model))
            v = row[f"valid_{monitor}"]
            if math.isfinite(v) and (best_loss is None or v < best_loss):
                best_model, best_loss, best_epoch, bad = s.model, v, s.epoch + 1, 0
            else:
                bad += 1
            stop = patience is not None and bad >= patience
        row["lr"] = s.last_lr
        if pass_kl:
            row["kl_weight"] = s.last_kl
        row["time"] = elapsed()
        row["nan_skips"] = s.epoch_skips
        prog.summary(row)
        if stop:
            prog.message(
                f"early stopping: no improvement of valid_{monitor} for {bad} epochs "
                f"(best {best_loss:.6g} at epoch {best_epoch})"
            )
        return dataclasses.replace(
            s,
            epoch=s.epoch + 1,
            batch=0,
            sums=(),
            weight=0.0,
            epoch_skips=0,
            best_model=best_model,
            best_loss=best_loss,
            best_epoch=best_epoch,
            bad_epochs=bad,
            stopped_early=stop,
            history=s.history + (row,),
        )

    def nan_message(s: _State, out, what: str, batch=None) -> str:
        cause = ""
        if batch is not None:
            found = _diagnose(s, batch, hyper0, step_key, loss_kwargs, cfg)
            if found:
                cause = f" Cause: {found}"
        hint = (
            "checkpointing more often (checkpoint_every=) so that rollbacks return "
            "to parameters from before the divergence"
            if nan_policy == "rollback"
            else "nan_policy='rollback'"
        )
        return (
            f"fit: {what} at step {s.step} (epoch {s.epoch + 1}, batch "
            f"{s.batch + 1}): the loss ({float(out['loss'])}) or its gradient is not "
            "finite. The parameters were left as they were before this step. Try: a "
            "lower learning_rate (or a stronger clip_norm), checking the data "
            "normalisation (standardised channels, no huge values or times), a "
            "tighter solver tolerance (rtol/atol) or a larger max_steps for ODE / "
            f"fixed-point models, or {hint}.{cause}"
        )

    # ------------------------------------------------------------ signals
    term = {"flag": False, "installed": False}
    old_handler = None

    def on_term(signum, frame):
        term["flag"] = True

    if (
        checkpoint_dir is not None
        and threading.current_thread() is threading.main_thread()
        and signal.getsignal(signal.SIGTERM) is not signal.SIG_IGN
    ):
        old_handler = signal.signal(signal.SIGTERM, on_term)
        term["installed"] = True

    def handle_term(s: _State) -> None:
        term["flag"] = False
        save_point(s)
        prog.close()
        handler = signal.SIG_DFL if old_handler is None else old_handler
        signal.signal(signal.SIGTERM, handler)
        if callable(handler):  # a Python handler: let it decide, then go on
            handler(signal.SIGTERM, None)
            signal.signal(signal.SIGTERM, on_term)
        else:  # the default action: terminate, now that the checkpoint is safe
            signal.raise_signal(signal.SIGTERM)

    prog = Progress(
        total_steps=total_steps,
        total_epochs=epochs,
        start_step=state.step,
        enabled=progress,
        log=log_fn,
    )
    snapshot = state
    orders: dict[int, np.ndarray] = {}

    def epoch_order(e: int) -> np.ndarray:
        if e not in orders:
            orders.clear()
            orders[e] = train_data.order(jax.random.fold_in(data_key, e))
        return orders[e]

    # ------------------------------------------------------------ the loop
    try:
        while not finished(state):
            if term["flag"]:
                handle_term(state)
            if state.batch >= nb or (steps is not None and state.step >= steps):
                state = end_epoch(state)
                state = snapshot = save_point(state)
                continue
            batch = train_data.batch(epoch_order(state.epoch), state.batch, train=True)
            with traced_failures("nan"), gc_paused():  # no host callbacks when compiled
                new_model, new_opt_state, out = _train_step(
                    state.model,
                    state.opt_state,
                    batch,
                    jnp.asarray(state.step, jnp.int32),
                    {**hyper0, "lr_scale": f32(state.lr_scale)},
                    step_key,
                    loss_kwargs,
                    cfg,
                )
            # the step runs asynchronously: read the next batch meanwhile
            train_data.prefetch(epoch_order(state.epoch), state.batch + 1)
            out = jax.device_get(out)
            good = bool(out["finite"])
            if good:
                w = float(out["weight"])
                sums = dict(state.sums)
                for name, v in (("loss", out["loss"]), *out["metrics"].items()):
                    sums[name] = sums.get(name, 0.0) + w * float(v)
                new_state = dataclasses.replace(
                    state,
                    model=new_model,
                    opt_state=new_opt_state,
                    step=state.step + 1,
                    batch=state.batch + 1,
                    sums=tuple(sums.items()),
                    weight=state.weight + w,
                    consecutive_bad=0,
                    last_lr=float(out["lr"]),
                    last_kl=float(out["kl_weight"]),
                )
            elif nan_policy == "raise":
                raise FloatingPointError(
                    nan_message(state, out, "non-finite loss", batch)
                )
            elif nan_policy == "rollback":
                if state.rollbacks >= max_nan_skips:
                    raise FloatingPointError(
                        nan_message(
                            state,
                            out,
                            f"{state.rollbacks} rollbacks without reaching a new "
                            "save point",
                            batch,
                        )
                    )
                scale = state.lr_scale * _ROLLBACK_FACTOR
                prog.message(
                    f"non-finite loss at step {state.step}: rolled back to step "
                    f"{snapshot.step}, learning rate scaled by {scale:g}"
                )
                state = dataclasses.replace(
                    snapshot,
                    lr_scale=scale,
                    rollbacks=state.rollbacks + 1,
                    nan_skips=state.nan_skips + 1,
                )
                continue
            else:  # skip
                if state.consecutive_bad + 1 >= max_nan_skips:
                    raise FloatingPointError(
                        nan_message(
                            state,
                            out,
                            f"{state.consecutive_bad + 1} consecutive skipped steps",
                            batch,
                        )
                    )
                new_state = dataclasses.replace(
                    state,
                    model=new_model,
                    opt_state=new_opt_state,
                    step=state.step + 1,
                    batch=state.batch + 1,
                    epoch_skips=state.epoch_skips + 1,
                    nan_skips=state.nan_skips + 1,
                    consecutive_bad=state.consecutive_bad + 1,
                )
            state = new_state  # the one commit of this step
            prog.update(step=state.step, epoch=state.epoch, loss=out["loss"])
            if checkpoint_every is not None and state.step % checkpoint_every == 0:
                state = snapshot = save_point(state)
            if callback is not None:
                callback(
                    {
                        "step": state.step,
                        "epoch": state.epoch,
                        "batch": state.batch,
                        "loss": float(out["loss"]),
                        "metrics": {k: float(v) for k, v in out["metrics"].items()},
                        "skipped": not good,
                        "lr": float(out["lr"]),
                        "model": state.model,
                    }
                )
        state = save_point(state)
        if term["flag"]:
            handle_term(state)
    except KeyboardInterrupt:
        if ckpt_path is not None:
            save_point(state)
            prog.message(f"interrupted: checkpoint saved at step {state.step}")
        raise
    finally:
        prog.close()
        train_data.close()
        if term["installed"]:
            signal.signal(
                signal.SIGTERM, signal.SIG_DFL if old_handler is None else old_handler
            )

    history = history_frame(state)
    history.attrs["compilations"] = {k: _TRACES[k] - traces0[k] for k in _TRACES}
    if train_data.kind == "series":
        history.attrs["min_times"] = min_times
    history.attrs["best_epoch"] = state.best_epoch
    history.attrs["monitor"] = monitor
    history.attrs["best_valid"] = state.best_loss
    best_rows = [r for r in state.history if r["epoch"] == state.best_epoch]
    history.attrs["best_valid_loss"] = (
        best_rows[0].get("valid_loss") if best_rows else None
    )
    history.attrs["stopped_early"] = state.stopped_early
    history.attrs["nan_skips"] = state.nan_skips
    history.attrs["resumed_from_step"] = resumed_from
    history.attrs["steps"] = state.step
    out_model = (
        state.best_model
        if valid_data is not None and restore_best and state.best_model is not None
        else state.model
    )
    return out_model, history


# run settings added after checkpoints were first written: their value in those
_COMPARE_DEFAULTS = {"monitor": "loss"}


def _pow2_era(checkpoint_dir) -> bool:
    """Whether `checkpoint_dir` holds a checkpoint of a run on time series written
    before `time_bucket="auto"` became `fit`'s default (its configuration has no
    `min_times`) with that earlier default, "pow2"."""
    path = Path(checkpoint_dir) / FIT_SUBDIR
    if resolve_checkpoint(path) is None:
        return False
    try:
        meta = read_header(path)[1].get("metadata", {})
    except ValueError:  # a damaged header: resuming reports it
        return False
    config = meta.get("fit", {})
    return (
        isinstance(config, dict)
        and "min_times" not in config
        and meta.get("compare", {}).get("time_bucket") == "pow2"
    )


def _in_order(record: dict, columns) -> dict:
    """A history record with its keys in the order the run wrote them (`columns`,
    stored since the header's JSON sorts keys; None for older checkpoints)."""
    if not columns:
        return dict(record)
    first = {k: record[k] for k in columns if k in record}
    return {**first, **{k: v for k, v in record.items() if k not in first}}


class ResumeRefused(ValueError):
    """`fit` cannot resume the checkpoint in `checkpoint_dir`: `reason` says what it
    holds instead, `diffs` (for a different run) how its settings differ. A caller
    with its own words for "resume=False" and "checkpoint_dir" (the CLI) builds its
    message from these."""

    def __init__(self, message: str, *, reason: str, diffs=()):
        super().__init__(message)
        self.reason = reason
        self.diffs = list(diffs)


def _resume(ckpt_path, state, model, opt_state0, model_desc, compare, checkpoint_dir):
    where, header = read_header(ckpt_path)
    meta = header.get("metadata", {})
    if "fit" not in meta or "state" not in meta:
        raise ResumeRefused(
            f"checkpoint_dir {os.fspath(checkpoint_dir)!r} holds a checkpoint that was "
            "not written by fit, so it cannot be resumed. Pass resume=False to start "
            "afresh (it is overwritten) or use another checkpoint_dir.",
            reason="a checkpoint that was not written by fit",
        )
    diffs = []
    old_hp = header.get("hyperparameters")
    new_hp = _json_roundtrip(model_desc["hyperparameters"])
    if header.get("model_class") != model_desc["model_class"]:
        diffs.append(
            f"model class: checkpoint {header.get('model_class')!r}, now "
            f"{model_desc['model_class']!r}"
        )
    elif old_hp != new_hp:
        o, n = dict(old_hp or []), dict(new_hp or [])
        # a hyperparameter added to the model after the checkpoint was written has,
        # in that checkpoint, its constructor default
        params = inspect.signature(type(model).__init__).parameters
        for k in set(n) - set(o):
            default = getattr(params.get(k), "default", inspect.Parameter.empty)
            if default is not inspect.Parameter.empty:
                try:
                    o[k] = _json_roundtrip(jsonable(default, k))
                except ValueError:  # not JSON: it cannot match a stored value
                    pass
        for k in sorted(set(o) | set(n)):
            if o.get(k, "<absent>") != n.get(k, "<absent>"):
                diffs.append(
                    f"model hyperparameter {k}: checkpoint {o.get(k, '<absent>')!r}, "
                    f"now {n.get(k, '<absent>')!r}"
                )
    old_cmp = {**_COMPARE_DEFAULTS, **meta.get("compare", {})}
    # written before min_times was recorded: no "auto" floor (checked by time_bucket)
    old_cmp.setdefault("min_times", compare.get("min_times"))
    for k in sorted(set(old_cmp) | set(compare)):
        if k == "model_class":
            continue
        if old_cmp.get(k) != compare.get(k):
            what = "key (seed)" if k == "key" else k
            diffs.append(
                f"{what}: checkpoint {old_cmp.get(k)!r}, now {compare.get(k)!r}"
            )
    if diffs:
        raise ResumeRefused(
            f"checkpoint_dir {os.fspath(checkpoint_dir)!r} holds a checkpoint of a "
            "different run, so it cannot be resumed:\n  - "
            + "\n  - ".join(diffs)
            + "\nResume with the same arguments, pass resume=False to start afresh "
            "(the checkpoint there is overwritten), or use another checkpoint_dir.",
            reason="a checkpoint of a different run",
            diffs=diffs,
        )
    try:
        trees = {
            "model": read_tree(where, header, "model", model),
            "opt_state": read_tree(where, header, "opt_state", opt_state0),
            "best_model": read_tree(where, header, "best_model", model)
            if "best_model" in header.get("files", {})
            else None,
        }
    except ValueError as e:
        raise ResumeRefused(
            f"checkpoint_dir {os.fspath(checkpoint_dir)!r} holds a checkpoint that "
            f"does not fit this model or optimizer, so it cannot be resumed. {e} Or "
            "pass resume=False to start afresh (the checkpoint there is overwritten), "
            "or use another checkpoint_dir.",
            reason=f"a checkpoint that does not fit this model or optimizer ({e})",
        ) from e
    trees = {k: None if v is None else _strong(v) for k, v in trees.items()}
    resumed = _State.from_json(meta["state"], **trees)
    resumed = dataclasses.replace(
        resumed,
        history=tuple(
            _in_order(r, meta.get("history_columns")) for r in meta.get("history", [])
        ),  # fmt: skip
    )
    return resumed, float(meta.get("elapsed", 0.0))
