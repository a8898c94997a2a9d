"""The neural-ODE family (`ctmodels fit neural-ode`): a `NeuralODE` that forecasts
each series from its first observation, scored on that forecast (`forecast`: the
context is each series' first visit, the targets every later observed value) against
carrying the first visit forward (`locf`) and the training mean (`train_mean`)."""

from __future__ import annotations

import functools

import equinox as eqx
import jax.numpy as jnp

from ..models import NeuralODE
from . import _series
from ._family import Family


def first_visit_task(batch, *, key=None):
    """Context: each series' first observed time (all its values there); targets:
    every observed value after it. jit-safe; `key` unused."""
    del key
    seen = batch.mask.any(axis=-1) & batch.time_mask
    i0 = jnp.argmax(seen, axis=1)
    pos = jnp.arange(batch.times.shape[1])[None, :]
    first = (pos == i0[:, None])[..., None] & batch.mask
    later = (pos > i0[:, None])[..., None] & batch.mask
    return eqx.tree_at(lambda x: (x.mask, x.target_mask), batch, (first, later))


#: The neural-ODE job's recipe (the old job's: 150 epochs at 3e-3, batch 32, no
#: early stopping; the best validation epoch is restored).
RECIPE = {
    "epochs": 150,
    "learning_rate": 3e-3,
    "batch_size": 32,
    "patience": None,
    "monitor": "loss",
}

NEURAL_ODE = Family(
    name="neural-ode",
    model=NeuralODE,
    title="neural ODE",
    summary="neural ODE forecaster from each series' first visit (Chen et al. 2018)",
    hidden=("num_static",),
    recipe=RECIPE,
    evaluate=functools.partial(
        _series.evaluate,
        extra_tasks={"forecast": first_visit_task},
        baselines=("locf", "train_mean"),
    ),  # fmt: skip
    eval_tasks=("forecast",),
)
