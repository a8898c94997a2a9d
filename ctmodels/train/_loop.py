"""`fit`'s epoch loop.

The host-side state is one immutable `LoopState`, replaced by one assignment per step
(or epoch end), so a `KeyboardInterrupt` always sees a consistent state to save.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

import jax
import numpy as np

from ._history import end_epoch
from ._nan import after_bad_step
from ._state import LoopState

if TYPE_CHECKING:
    from ._run import Run


def train_loop(run: Run, state: LoopState, *, prog, save, term) -> LoopState:
    """Train from `state` until `run` is finished; the final state (saved).

    `save` makes save points (`SavePoints`), `term` catches SIGTERM (`TermGuard`),
    `prog` reports (`Progress`). A `KeyboardInterrupt` saves a checkpoint first."""
    order_of = _EpochOrders(run)
    every, callback = run.options.checkpoint_every, run.options.callback
    snapshot = state  # the last save point: where a rollback returns to
    try:
        while not run.finished(state):
            if term.flag:
                term.handle(state, save, prog)
            if run.epoch_done(state):
                state = end_epoch(run, state, prog, save.clock)
                state = snapshot = save(state)
                continue
            order = order_of(state.epoch)
            batch = run.train.batch(order, state.batch, train=True)
            new_model, new_opt_state, out = run.compiled.train(
                state.model, state.opt_state, batch, state.step, state.lr_scale
            )
            # the step runs asynchronously: read the next batch meanwhile
            run.train.prefetch(order, state.batch + 1)
            out = jax.device_get(out)
            good = bool(out["finite"])
            if good:
                new_state = _after_good_step(state, new_model, new_opt_state, out)
            else:
                new_state, rolled_back = after_bad_step(
                    run, state, snapshot, (new_model, new_opt_state), out, batch, prog
                )
                if rolled_back:
                    state = new_state
                    continue
            state = new_state  # the one commit of this step
            prog.update(step=state.step, epoch=state.epoch, loss=out["loss"])
            if every is not None and state.step % every == 0:
                state = snapshot = save(state)
            if callback is not None:
                callback(_step_report(state, out, good))
        state = save(state)
        if term.flag:
            term.handle(state, save, prog)
    except KeyboardInterrupt:
        if run.ckpt_path is not None:
            save(state)
            prog.message(f"interrupted: checkpoint saved at step {state.step}")
        raise
    finally:
        prog.close()
        run.train.close()
        term.restore()
    return state


class _EpochOrders:
    """Epoch `e`'s order of the training examples (the current epoch's is kept)."""

    def __init__(self, run: Run):
        self.run = run
        self.orders: dict[int, np.ndarray] = {}

    def __call__(self, e: int) -> np.ndarray:
        if e not in self.orders:
            self.orders.clear()
            key = jax.random.fold_in(self.run.data_key, e)
            self.orders[e] = self.run.train.order(key)
        return self.orders[e]


def _after_good_step(s: LoopState, model, opt_state, out) -> LoopState:
    """The state after a finite step: its parameters, and its weighted loss and
    metrics added to the epoch's sums."""
    w = float(out["weight"])
    sums = dict(s.sums)
    for name, v in (("loss", out["loss"]), *out["metrics"].items()):
        sums[name] = sums.get(name, 0.0) + w * float(v)
    return dataclasses.replace(
        s,
        model=model,
        opt_state=opt_state,
        step=s.step + 1,
        batch=s.batch + 1,
        sums=tuple(sums.items()),
        weight=s.weight + w,
        consecutive_bad=0,
        last_lr=float(out["lr"]),
        last_kl=float(out["kl_weight"]),
    )


def _step_report(s: LoopState, out, good: bool) -> dict:
    """What `fit`'s `callback` receives after each step."""
    return {
        "step": s.step,
        "epoch": s.epoch,
        "batch": s.batch,
        "loss": float(out["loss"]),
        "metrics": {k: float(v) for k, v in out["metrics"].items()},
        "skipped": not good,
        "lr": float(out["lr"]),
        "model": s.model,
    }
