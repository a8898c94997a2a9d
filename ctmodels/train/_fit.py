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

The loop is in pieces, each in a private module of `ctmodels.train`: `_options`
(the keyword arguments as one value and their checks), `_run` (a prepared call: data,
run description, bound steps, first state), `_step` (the compiled steps), `_resume`
(whether a checkpoint is of this run), `_loop` (the epoch loop), `_nan` (the NaN
policy), `_stopping` (validation and early stopping), `_history` (the per-epoch
rows), `_savepoint` (checkpoints and rollback targets), `_signals` (SIGTERM),
`_sharding` (`devices=`: the mesh, and where batches and parameters are placed).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import Any, Literal

import equinox as eqx
import jax
import optax
import pandas as pd
from jaxtyping import PRNGKeyArray

from ._history import returned_history
from ._loop import train_loop
from ._options import FitOptions
from ._progress import Progress
from ._resume import ResumeRefused as ResumeRefused
from ._run import first_state, prepare
from ._savepoint import SavePoints
from ._signals import TermGuard
from ._state import Clock
from ._step import (
    TRACES,
    _schedule_lr as _schedule_lr,  # imported by benchmarks/latent_ode_variants.py
    gc_paused as gc_paused,  # imported by benchmarks/latent_ode_step.py
)

# `fit`'s arguments that are not options
_NOT_OPTIONS = ("model", "train", "valid", "key")


def fit(
    model: eqx.Module,
    train: Any,
    *,
    valid: Any = None,
    epochs: int | None = None,
    steps: int | None = None,
    batch_size: int = 32,
    devices: int | Sequence[jax.Device] | None = None,
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
      `source[indices] -> TimeSeries`, e.g. `from_xarray(ds, lazy=True)` on a
      netCDF file or zarr store: streamed, memory holds a few blocks of series,
      `docs/scaling.md`), batched as `ctmodels.data.batches` does; or
      an array / pytree of arrays with a leading example axis (for flows, DEQs, ...),
      batched by rows (the short last batch of an epoch is filled up with the
      epoch's first rows, so every training batch has one shape).
    - `valid`: validation data of the same kind, scored at the end of every epoch
      (the mean of the loss and metrics over its batches, weighted by each batch's
      `weight.sum()` or row count).
    - `epochs` / `steps`: how long to train; give exactly one. With `steps`, the
      last (partial) epoch is still validated and recorded.
    - `batch_size`: series (or rows) per batch (default 32, as in the default
      recipe of `ctmodels fit`).
    - `devices`: train data-parallel on several local devices (`docs/scaling.md`).
      None or 1 (default): one device, exactly as without the option. An int N > 1:
      the first N of `jax.local_devices()`; a sequence of devices: those (a
      one-device sequence runs the sharded path on one device). The devices form a
      one-axis `jax.sharding.Mesh`; each batch is split along its series (row) axis
      and the parameters, optimizer state and keys are replicated, by
      `jax.device_put` of the step's inputs. The compiled step is the same function
      as on one device (not a second `jit` with explicit in/out shardings): `jit`
      compiles it once per placement and XLA's SPMD partitioner (GSPMD) inserts the
      all-reduce of the gradient, whose result, like the new parameters, comes out
      replicated. So results equal one device's up to the order of floating-point
      sums. Checkpoints hold host arrays: a run resumes on any number of devices.
      `batch_size` must be a multiple of the device count. With several processes
      (`jax.distributed.initialize`), every process passes `jax.devices()` and the
      same data and key; each reads only its own rows of every batch (from a lazy
      source: only those series) and only process 0 writes checkpoints.
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
    options = FitOptions(**{k: v for k, v in locals().items() if k not in _NOT_OPTIONS})
    run = prepare(model, train, valid, key, options)
    traces0 = dict(TRACES)
    state, resumed_from, elapsed0 = first_state(run, model)
    resumed = None if resumed_from is None else state
    save = SavePoints(run, Clock(elapsed0), resumed=resumed)
    term = TermGuard(options.checkpoint_dir)
    prog = Progress(
        total_steps=run.total_steps,
        total_epochs=options.epochs,
        start_step=state.step,
        enabled=options.progress,
        log=run.log,
    )
    state = train_loop(run, state, prog=prog, save=save, term=term)
    compilations = {k: TRACES[k] - traces0[k] for k in TRACES}
    history = returned_history(run, state, compilations, resumed_from)
    return run.returned_model(state), history
