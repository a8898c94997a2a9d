"""`fit`'s compiled steps: the guarded training step, the validation step, and the
probe that says why a step was not finite.

They are module-level `equinox.filter_jit` functions with a hashable static
configuration (`StepConfig`), so a second `fit` with the same optimizer, task and model
structure reuses the compiled code; the learning rate, schedule length, clip norm, KL
annealing length and rollback factor enter as traced arrays (`hyper`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
from collections.abc import Mapping
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import optax

from .._errors import discard_failed_callbacks, runtime_message, traced_failures
from ._data import batch_weight


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


# Incremented whenever a step is traced (= compiled); `fit` reports the difference.
TRACES = {"train_step": 0, "eval_step": 0}


# The default optimizer's direction: Adam's scaled moments. Clipping, the learning
# rate and its schedule are applied by the step from traced values, so one compiled
# step serves every learning rate, clip norm and run length.
ADAM = optax.scale_by_adam()


@dataclasses.dataclass(frozen=True)
class StepConfig:
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
    TRACES["train_step"] += 1
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
        direction, new_opt_state = ADAM.update(grads, opt_state, params)
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
    TRACES["eval_step"] += 1
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


def _diagnose(model, batch, step, hyper, step_key, loss_kwargs, cfg) -> str | None:
    """Why a step was not finite, if a solver failed: rerun it with errors raised.

    The compiled train step turns solver failures into NaN (`traced_failures`); this
    recompiles the step with the runtime checks on, only when `fit` is about to fail.
    """
    try:
        with traced_failures("raise"):
            out = _probe_step(
                model,
                batch,
                jnp.asarray(step, jnp.int32),
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


# ------------------------------------------------------------------ one run's steps


@dataclasses.dataclass(frozen=True)
class Steps:
    """The compiled steps bound to one run: the static configuration, the traced
    hyperparameters (`peak_lr`, `total_steps`, `clip_norm`, `kl_steps`), the step and
    validation keys, the loss keyword arguments, and (with `fit(devices=...)`) the
    `Placement` that splits each batch over the devices (None: one device)."""

    cfg: StepConfig
    hyper: dict[str, jax.Array]
    step_key: Any
    eval_key: Any
    loss_kwargs: dict[str, Any]
    placement: Any = None

    def _place(self, batch):
        return batch if self.placement is None else self.placement.batch(batch)

    def train(self, model, opt_state, batch, step: int, lr_scale: float):
        """Training step `step` on `batch`: `(new_model, new_opt_state, outputs)`."""
        hyper = {**self.hyper, "lr_scale": jnp.asarray(lr_scale, dtype=jnp.float32)}
        with traced_failures("nan"), gc_paused():  # no host callbacks when compiled
            return _train_step(
                model,
                opt_state,
                self._place(batch),
                jnp.asarray(step, jnp.int32),
                hyper,
                self.step_key,
                self.loss_kwargs,
                self.cfg,
            )

    def eval(self, model, batch, index: int):
        """Loss, metrics and weight of validation batch `index`."""
        with traced_failures("nan"), gc_paused():
            return _eval_step(
                model, self._place(batch), jnp.asarray(index), self.eval_key,
                self.loss_kwargs, self.cfg,
            )  # fmt: skip

    def eval_shapes(self, model, batch):
        """The shapes of `eval`'s outputs (nothing runs)."""
        with traced_failures("nan"):
            return eqx.filter_eval_shape(
                _eval_outputs, model, batch, jnp.asarray(0), self.eval_key,
                self.loss_kwargs, self.cfg,
            )  # fmt: skip

    def diagnose(self, model, batch, step: int) -> str | None:
        """Why training step `step` on `batch` was not finite, if a solver failed."""
        return _diagnose(
            model, self._place(batch), step, self.hyper, self.step_key,
            self.loss_kwargs, self.cfg,
        )  # fmt: skip
