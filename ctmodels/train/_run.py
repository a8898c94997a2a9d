"""One call of `fit`, prepared: checked options, opened data, the run's description
(what a resume must match), the compiled steps bound to it, and its first state."""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from pathlib import Path
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp

from ..data import bucket_length
from ._checkpoint import FIT_SUBDIR, model_description, resolve_checkpoint
from ._data import as_data, auto_min_times, check_same_channels
from ._options import FitOptions, check_options, describe, json_roundtrip
from ._progress import resolve_log
from ._resume import pow2_era, resume
from ._sharding import Placement, resolve_devices
from ._state import LoopState, strong
from ._step import ADAM, StepConfig, Steps
from ._stopping import check_monitor


@dataclasses.dataclass(frozen=True, eq=False)
class Run:
    """Everything fixed for one call of `fit`."""

    options: FitOptions  # normalised; `time_bucket` as used (see `_open_data`)
    train: Any  # SeriesData | ArrayData
    valid: Any  # the same, or None
    num_batches: int  # training batches per epoch
    total_steps: int
    min_times: int  # time_bucket="auto"'s floor (0: none)
    pass_kl: bool  # the loss takes a `kl_weight`
    key_data: list[int]
    extra_json: Any
    log: Callable[[str], None] | None
    model_desc: dict[str, Any]
    compare: dict[str, Any]  # what a resumed run must match
    config: dict[str, Any]  # `compare` and the other settings, for the checkpoint
    compiled: Steps  # the compiled steps, bound to this run
    placement: Placement | None  # fit(devices=...)'s mesh (None: one device)
    data_key: Any  # epoch e shuffles with fold_in(data_key, e)
    ckpt_path: Path | None

    def finished(self, s: LoopState) -> bool:
        if s.stopped_early:
            return True
        if self.options.epochs is not None:
            return s.epoch >= self.options.epochs
        return s.step >= self.options.steps and s.batch == 0

    def epoch_done(self, s: LoopState) -> bool:
        steps = self.options.steps
        return s.batch >= self.num_batches or (steps is not None and s.step >= steps)

    def returned_model(self, s: LoopState):
        """The best model (with validation data and `restore_best`) or the last (on
        the default device)."""
        model = s.model
        if self.valid is not None and self.options.restore_best:
            if s.best_model is not None:
                model = s.best_model
        return model if self.placement is None else self.placement.to_default(model)


def prepare(model, train, valid, key, options: FitOptions) -> Run:
    """Check the arguments and open the data; errors come before anything runs."""
    checked = check_options(model, valid, key, options)
    o = checked.options
    log_fn = resolve_log(o.log)
    placement = resolve_devices(o.devices, o.batch_size)
    o, train_data, valid_data, min_times = _open_data(
        o, train, valid, log_fn, placement
    )
    nb = train_data.num_batches(train=True)
    total_steps = o.steps if o.steps is not None else o.epochs * nb
    model_desc = _model_desc(model, o)
    compare = _compare(o, checked.key_data, model_desc, train_data, valid_data,
                       min_times, total_steps)  # fmt: skip
    config = {
        **compare,
        **{k: getattr(o, k) for k in ("epochs", "steps")},
        "total_steps": total_steps,
        **{k: getattr(o, k) for k in _CONFIG_ONLY},
        # not in `compare`: a run resumes on any number of devices
        "devices": 1 if placement is None else placement.size,
    }
    run = Run(
        options=o, train=train_data, valid=valid_data, num_batches=nb,
        total_steps=total_steps, min_times=min_times, pass_kl=checked.pass_kl,
        key_data=checked.key_data, extra_json=checked.extra_json, log=log_fn,
        model_desc=model_desc, compare=compare, config=config,
        compiled=_bind_steps(o, key, checked.pass_kl, total_steps, placement),
        placement=placement,
        data_key=jax.random.fold_in(key, 0),
        ckpt_path=None if o.checkpoint_dir is None
        else Path(o.checkpoint_dir) / FIT_SUBDIR,
    )  # fmt: skip
    if o.monitor != "loss":
        check_monitor(run, model)
    return run


_CONFIG_ONLY = ("patience", "restore_best", "nan_policy", "max_nan_skips",
                "checkpoint_every")  # fmt: skip


def _open_data(o: FitOptions, train, valid, log_fn, placement=None):
    """The training and validation data as batch sources, and the `time_bucket` and
    `min_times` they are padded with. With a `placement` over several processes,
    each process reads only its own rows of every batch."""
    auto = isinstance(o.time_bucket, str) and o.time_bucket == "auto"
    if (
        auto
        and o.checkpoint_dir is not None
        and o.resume
        and pow2_era(o.checkpoint_dir)
    ):
        # written when "pow2" was fit's default: finish that run as it was started
        auto = False
        o = dataclasses.replace(o, time_bucket="pow2")
        if log_fn is not None:
            log_fn(
                "resuming a checkpoint written before time_bucket='auto' became fit's "
                "default: continuing with its time_bucket='pow2'"
            )
    rounding = "pow2" if auto else o.time_bucket
    bucket_length(1, rounding)  # a bad time_bucket fails here, not at the first batch
    opened = functools.partial(
        as_data, batch_size=o.batch_size, layout=o.layout, time_bucket=rounding
    )
    train_data = opened(train, name="train")
    valid_data = None if valid is None else opened(valid, name="valid")
    for d in (train_data, valid_data):
        if d is not None:
            d.place(placement)
    if valid_data is not None:
        check_same_channels(train_data, valid_data)
    min_times = 0
    if auto and train_data.kind == "series":
        # one floor for training and validation batches, fixed by the training data
        min_times = auto_min_times(train_data)
        for d in (train_data, valid_data):
            if d is not None and d.kind == "series":
                d.min_times = min_times
    return o, train_data, valid_data, min_times


def _model_desc(model, o: FitOptions) -> dict[str, Any]:
    try:
        return model_description(model)
    except ValueError:  # hyperparameters that are not JSON matter only to checkpoints
        if o.checkpoint_dir is not None:
            raise
        return {
            "model_class": type(model).__name__,
            "model_module": type(model).__module__,
            "hyperparameters": None,
        }


def _compare(o, key_data, model_desc, train_data, valid_data, min_times, total_steps):
    """The settings a resumed run must share with the interrupted one (JSON)."""
    series = train_data.kind == "series"
    default = o.optimizer is None
    return json_roundtrip({
        "model_class": model_desc["model_class"],
        "key": key_data,
        "data": train_data.kind,
        "n_train": int(train_data.n),
        "n_valid": None if valid_data is None else int(valid_data.n),
        "batch_size": int(o.batch_size),
        "layout": o.layout if series else None,
        "time_bucket": o.time_bucket if series else None,
        # time_bucket="auto"'s floor, from the training data: a resumed run must pad
        # as the interrupted one did
        "min_times": min_times if series else None,
        "optimizer": "default" if default else "custom",
        "learning_rate": float(o.learning_rate) if default else None,
        "schedule": describe(o.schedule) if default else None,
        "schedule_steps": total_steps
        if default and o.schedule in ("warmup_cosine", "exponential")
        else None,
        "clip_norm": o.clip_norm if default else None,
        "kl_anneal_steps": int(o.kl_anneal_steps),
        "monitor": o.monitor,
        "task": describe(o.task),
        "eval_task": describe(o.eval_task),
        "loss_kwargs": {k: describe(v) for k, v in sorted(o.loss_kwargs.items())},
    })  # fmt: skip


def _bind_steps(o: FitOptions, key, pass_kl: bool, total_steps: int,
                placement: Placement | None) -> Steps:  # fmt: skip
    """The compiled steps for this run: module-level jitted steps with a hashable
    static configuration, so a second `fit` with the same optimizer / task / model
    structure reuses the compiled code."""
    default = o.optimizer is None
    cfg = StepConfig(
        optimizer=o.optimizer,
        schedule=o.schedule if default else None,
        clip=default and o.clip_norm is not None,
        task=o.task,
        eval_task=o.eval_task,
        pass_kl=pass_kl,
    )
    f32 = functools.partial(jnp.asarray, dtype=jnp.float32)
    hyper = {
        "peak_lr": f32(o.learning_rate if default else 1.0),
        "total_steps": jnp.asarray(total_steps, jnp.int32),
        "clip_norm": f32(1.0 if o.clip_norm is None else o.clip_norm),
        "kl_steps": jnp.asarray(o.kl_anneal_steps, jnp.int32),
    }
    step_key, eval_key = jax.random.fold_in(key, 1), jax.random.fold_in(key, 2)
    if placement is not None:  # on every device, as the parameters are
        hyper, step_key, eval_key = placement.replicate((hyper, step_key, eval_key))
    return Steps(
        cfg=cfg,
        hyper=hyper,
        step_key=step_key,
        eval_key=eval_key,
        loss_kwargs=o.loss_kwargs,
        placement=placement,
    )


def first_state(run: Run, model) -> tuple[LoopState, int | None, float]:
    """The state to start from: fresh, or resumed from `checkpoint_dir`; the step
    it resumed from (None: fresh) and the seconds trained before. With several
    devices, its model and optimizer state are replicated over them."""
    opt = ADAM if run.options.optimizer is None else run.options.optimizer
    opt_state0 = opt.init(eqx.filter(model, eqx.is_inexact_array))
    state = LoopState(model=strong(model), opt_state=strong(opt_state0))
    o = run.options
    resumed_from, elapsed0 = None, 0.0
    if o.checkpoint_dir is not None and o.resume and resolve_checkpoint(run.ckpt_path):
        state, elapsed0 = resume(
            run.ckpt_path, model, opt_state0, run.model_desc, run.compare,
            o.checkpoint_dir,
        )  # fmt: skip
        resumed_from = state.step
    if run.placement is not None:
        p = run.placement
        state = dataclasses.replace(
            state,
            model=p.replicate(state.model),
            opt_state=p.replicate(state.opt_state),
            best_model=p.replicate(state.best_model),
        )
    return state, resumed_from, elapsed0
