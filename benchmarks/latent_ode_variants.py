"""Latent ODE variants against GRU-Δt on pbcseq, paired by seed (ablations).

Trains the benchmark's latent ODE (`latent_ode_pbcseq.make_model`) with one setting
changed, and GRU-Δt as the benchmark does, on each seed's split, with the job's
recipe and the benchmark's training task, then scores both on the test split's
interpolation and extrapolation tasks exactly as `latent_ode_pbcseq.py` does (the
same masks, 32 posterior samples). With no options it reproduces that script's
LatentODE and GRUDelta rows. Prints one JSON line per (seed, model, task) and a
summary with six-seed means and the paired latent ODE minus GRU-Δt differences
(mean and standard error), which is the figure that says whether a variant closes
the extrapolation gap (see benchmarks/README.md).

Options change the latent ODE only, except `--train-task` (every model):

  --model-kwargs JSON   LatentODE constructor arguments over the benchmark's, e.g.
                        '{"latent_size": 16}' or '{"encoder_size": 48}'
  --decoder-units N     an MLP decoder with one hidden layer of N units instead of
                        the linear one
  --weight-decay W      AdamW with this decay (else `fit`'s default optimizer: the
                        same clipping and warmup-cosine schedule)
  --lr, --epochs        the recipe's peak step and epochs (both models)
  --train-task extrapolation
                        train every model on the extrapolation task alone (context:
                        first half of the span; targets: the values after the cut)
  --baselines GRUDelta ODERNN
                        also train ODE-RNN alike (GRU-Δt is always trained)
  --time-bucket pow2     fit's time bucketing of the tables recorded before session 9
                        (default: fit's default, "auto")
  --context-last K ...  also score the latent ODE's extrapolation from only each test
                        series' last K context visits
  --train-context-last K
                        train the latent ODE with its extrapolation draws' context
                        cut to each series' last K visits

Also reported: `posterior_mean`, the latent ODE's prediction from the mean of
`q(z0)` alone (one sample of a zero-width posterior) next to the 32-sample mean; and
with `--refine-steps N [N ...]`, `refined_N`: semi-amortised inference (Kim et al.,
2018), the prediction from `z0` refined per series by N Adam steps (step
`--refine-lr`) from the posterior mean on the MAP objective `-log p(context | z0) -
log N(z0; 0, I)`, with the context MSE it reaches. It asks whether the encoder's
`z0` (the amortisation gap), rather than the model, limits the fit to the context
and the extrapolation.

Usage:
  python benchmarks/latent_ode_variants.py --seeds 0 1 2 3 4 5
  python benchmarks/latent_ode_variants.py --decoder-units 64
  python benchmarks/latent_ode_variants.py --quick            # smoke run
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
# first: it sets the one-thread environment before JAX starts
import latent_ode_pbcseq as P  # noqa: E402, I001

import equinox as eqx  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

from ctmodels import data as cdata  # noqa: E402
from ctmodels import datasets  # noqa: E402
from ctmodels.jobs import EVAL_SAMPLES, LATENT_ODE  # noqa: E402
from ctmodels.jobs._series import (  # noqa: E402
    log_channels as _log_channels,
    mse as _mse,
)
from ctmodels.models import (  # noqa: E402
    evaluation_tasks as _tasks,
    predict_grid as _predict_grid,
)
from ctmodels.models import _common as C  # noqa: E402
from ctmodels.models._predict import _batches as _predict_batches  # noqa: E402
from ctmodels.nn import apply, mlp  # noqa: E402
from ctmodels.train._fit import _schedule_lr  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4, 5])
    p.add_argument("--model-kwargs", type=json.loads, default={})
    p.add_argument("--decoder-units", type=int, default=0)
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--epochs", type=int, default=None)
    p.add_argument(
        "--train-task", choices=("mixed", "extrapolation", "mixed-after-cut"),
        default="mixed",
        help="every model's training task: the job's mixed task; extrapolation "
        "only (values after the cut scored); or the mixed task with its "
        "extrapolation draws scoring only the values after the cut",
    )  # fmt: skip
    p.add_argument(
        "--baselines",
        nargs="+",
        default=["GRUDelta"],
        choices=("GRUDelta", "ODERNN"),
        help="trained alike for comparison (differences are to GRUDelta)",
    )
    p.add_argument(
        "--context-last", type=int, nargs="*", default=[],
        help="also score the latent ODE's extrapolation from only each series' last "
        "K context visits (for each K given)",
    )  # fmt: skip
    p.add_argument(
        "--train-context-last", type=int, default=0,
        help="train the latent ODE on the mixed task with its extrapolation draws' "
        "context cut to each series' last K visits",
    )  # fmt: skip
    p.add_argument("--refine-steps", type=int, nargs="*", default=[])
    p.add_argument("--refine-lr", type=float, default=0.01)
    P.add_time_bucket_option(p)
    p.add_argument("--quick", action="store_true", help="1 seed, 2 epochs")
    args = p.parse_args(argv)
    if args.refine_steps and args.model_kwargs.get("anchor", "first") != "first":
        p.error("--refine-steps refines z0 at the first time: anchor='first' only")
    if args.quick:
        args.seeds, args.epochs = args.seeds[:1], 2
    return args


BENCHMARK_MODEL = P.make_model  # the benchmark's models, before patching


def latent_ode(args, num_channels, seed):
    model = BENCHMARK_MODEL("LatentODE", num_channels, seed)
    if args.model_kwargs:
        hyper = dict(model.hyperparameters)
        hyper.update(args.model_kwargs)
        hyper.pop("num_channels")
        model = P.LatentODE(num_channels, **hyper, key=jax.random.key(seed))
    if args.decoder_units:
        decoder = mlp(
            model.latent_size, num_channels, units=args.decoder_units, depth=1,
            key=jax.random.key(seed + 77),
        )  # fmt: skip
        model = eqx.tree_at(lambda m: m.decoder, model, decoder)
    return model


def adamw_like_default(weight_decay, plan, *, n_train):
    """`fit`'s default optimizer (global-norm clipping at 1, the warmup-cosine
    schedule over the run's steps) with AdamW's decoupled weight decay for Adam."""
    total = jnp.asarray(plan["epochs"] * -(-n_train // plan["batch_size"]))
    peak = plan["learning_rate"]
    return optax.chain(
        optax.clip_by_global_norm(1.0),
        optax.adamw(
            lambda step: _schedule_lr("warmup_cosine", step, peak, total),
            weight_decay=weight_decay,
        ),
    )


def refined_predictions(model, ts_n, task, *, steps, lr, batch_size, key):
    """Predictions on `ts_n`'s grid from `z0` refined by MAP on each series' context
    (see the module docs), after each number of Adam steps in `steps`; and the task's
    context and target masks."""
    shape = ts_n.values.shape
    preds = {n: np.full(shape, np.nan) for n in steps}
    ctx, tgt = np.zeros(shape, bool), np.zeros(shape, bool)
    opt = optax.adam(lr)

    @eqx.filter_jit
    def start(model, batch):
        t_ref = C.reference_time(batch, model.t0)
        return model.posterior(batch, t_ref)[0], t_ref

    def decode(model, z, t_ref, batch):
        zs, _ = model._decode(z[None], t_ref, batch.times, True)
        return apply(model.decoder, zs)[0]

    @eqx.filter_jit
    def step(model, z, state, t_ref, batch):
        def neg_log_post(z):
            pred = decode(model, z, t_ref, batch)
            log_std = model._noise_log_std(pred.dtype)
            ll = C.gaussian_log_prob(batch.values, pred, log_std, batch.mask)
            return -jnp.sum(ll - 0.5 * jnp.sum(z**2, axis=-1))

        updates, state = opt.update(jax.grad(neg_log_post)(z), state)
        return optax.apply_updates(z, updates), state

    # the batches and task draws of `_predict_grid`, so every row is scored alike
    for i, batch in enumerate(_predict_batches(ts_n, batch_size)):
        batch = task(batch, key=jax.random.fold_in(jax.random.fold_in(key, i), 1))
        z, t_ref = start(model, batch)
        state = opt.init(z)
        for n in range(max(steps) + 1):
            if n in steps:
                pred = eqx.filter_jit(decode)(model, z, t_ref, batch)
                cdata.unbatch(batch, np.asarray(pred), preds[n])
            if n < max(steps):
                z, state = step(model, z, state, t_ref, batch)
        cdata.unbatch(batch, np.asarray(batch.mask), ctx)
        cdata.unbatch(batch, np.asarray(batch.target_mask), tgt)
    return preds, ctx.astype(bool), tgt.astype(bool)


def last_visits(task, k):
    """`task`, with its context cut down to each row's last `k` visits (time positions
    with any observed channel) in the context; the targets are unchanged."""

    def cut(batch, *, key):
        batch = task(batch, key=key)
        visit = jnp.any(batch.mask, axis=-1)  # [B, T], times in order
        after = jnp.cumsum(visit[:, ::-1], axis=1)[:, ::-1]  # visits at or after j
        mask = batch.mask & (after <= k)[..., None]
        return eqx.tree_at(lambda x: x.mask, batch, mask)

    return cut


def mixed_context_last(k):
    """The job's mixed task, its extrapolation draws' context cut to each row's last
    `k` context visits (every observed value still scored). jit-safe."""
    extrapolate = last_visits(_tasks(0.5, 0.5)["extrapolation"], k)

    def task(batch, *, key):
        k_interp, k_pick = jax.random.split(key)
        a = cdata.interpolation_task(batch, key=k_interp, fraction=0.5, score="all")
        b = extrapolate(batch, key=k_pick)
        mask = jnp.where(jax.random.bernoulli(k_pick), a.mask, b.mask)
        return eqx.tree_at(lambda x: (x.mask, x.target_mask), batch, (mask, batch.mask))

    return task


def mixed_after_cut(batch, *, key):
    """The job's mixed task, but its extrapolation draws score only the values
    after the cut (as the paper code's extrapolation mode). jit-safe."""
    k_interp, k_pick = jax.random.split(key)
    a = cdata.interpolation_task(batch, key=k_interp, fraction=0.5, score="all")
    b = cdata.extrapolation_task(batch, split=0.5)
    pick = jax.random.bernoulli(k_pick)
    mask = jnp.where(pick, a.mask, b.mask)
    target = jnp.where(pick, batch.mask, b.target_mask)
    return eqx.tree_at(lambda x: (x.mask, x.target_mask), batch, (mask, target))


def main(argv=None):
    args = parse_args(argv)
    P.TIME_BUCKET = args.time_bucket
    plan = LATENT_ODE.recipe_for("pbcseq")
    plan["learning_rate"] = args.lr or plan["learning_rate"]
    plan["epochs"] = args.epochs or plan["epochs"]
    if args.train_task == "extrapolation":
        task = _tasks(0.5, 0.5)["extrapolation"]
        for name in P.TRAIN_TASK:
            P.TRAIN_TASK[name] = ("extrapolation(0.5, score after the cut)", task)
    elif args.train_task == "mixed-after-cut":
        label = "1/2 interpolation(0.5, score all) + 1/2 extrapolation(0.5, after cut)"
        for name in P.TRAIN_TASK:
            P.TRAIN_TASK[name] = (label, mixed_after_cut)
    if args.train_context_last:
        P.TRAIN_TASK["LatentODE"] = (
            f"mixed, extrapolation context: last {args.train_context_last} visits",
            mixed_context_last(args.train_context_last),
        )
    ds = datasets.load("pbcseq")
    ts = cdata.from_xarray(ds, static=[])
    log_ch = _log_channels(ds, ts.channels)
    tasks = _tasks(0.5, 0.5)
    make_model, fit = BENCHMARK_MODEL, P.fit
    baselines = ["GRUDelta"] + [b for b in args.baselines if b != "GRUDelta"]
    rows = []
    for seed in args.seeds:
        train_s, valid_s, test_s = cdata.split_series(ts, (0.8, 0.1, 0.1), seed=seed)
        norm = cdata.Normalizer.fit(train_s, log=log_ch, time_scale="span")
        train_n, valid_n, test_n = map(norm.transform, (train_s, valid_s, test_s))
        for name in ("LatentODE", *baselines):

            def patched_make(n, c, s):
                if n == "LatentODE":
                    return latent_ode(args, c, s)
                return make_model(n, c, s)

            def patched_fit(model, *a, name=name, **k):
                if name == "LatentODE" and args.weight_decay:
                    k["optimizer"] = adamw_like_default(
                        args.weight_decay, plan, n_train=len(a[0])
                    )
                return fit(model, *a, **k)

            P.make_model, P.fit = patched_make, patched_fit
            try:
                model, info = P.train(
                    name, train_n, valid_n, seed=seed, epochs=plan["epochs"],
                    batch_size=plan["batch_size"], lr=plan["learning_rate"],
                    patience=plan["patience"], monitor=plan["monitor"],
                )  # fmt: skip
            finally:
                P.make_model, P.fit = make_model, fit
            scored = [(name, model, EVAL_SAMPLES)]
            if name == "LatentODE":
                narrow = copy.copy(model)  # q(z0) of (numerically) zero width
                object.__setattr__(narrow, "std_shift", -40.0)
                scored.append(("LatentODE/posterior_mean", narrow, 1))
            for label, m, k in scored:
                for tname in P.TASKS:
                    mean, _, _, tgt = _predict_grid(
                        m, test_n, key=jax.random.key(seed + 1000), n_samples=k,
                        batch_size=plan["batch_size"], task=tasks[tname],
                    )  # fmt: skip
                    row = {
                        "model": label, "seed": seed, "task": tname,
                        "mse": _mse(mean, test_n.values, tgt),
                        "epochs_run": info["epochs_run"],
                        "best_epoch": info["best_epoch"],
                    }  # fmt: skip
                    rows.append(row)
                    P.emit(row)
            if name == "LatentODE":
                for kv in args.context_last:
                    mean, _, _, tgt = _predict_grid(
                        model, test_n, key=jax.random.key(seed + 1000),
                        n_samples=EVAL_SAMPLES, batch_size=plan["batch_size"],
                        task=last_visits(tasks["extrapolation"], kv),
                    )  # fmt: skip
                    row = {
                        "model": f"LatentODE/last_{kv}_visits", "seed": seed,
                        "task": "extrapolation",
                        "mse": _mse(mean, test_n.values, tgt),
                    }  # fmt: skip
                    rows.append(row)
                    P.emit(row)
            if name == "LatentODE" and args.refine_steps:
                for tname in P.TASKS:
                    preds, ctx, tgt = refined_predictions(
                        model, test_n, tasks[tname], steps=[0, *args.refine_steps],
                        lr=args.refine_lr, batch_size=plan["batch_size"],
                        key=jax.random.key(seed + 1000),
                    )  # fmt: skip
                    for n in args.refine_steps:
                        row = {
                            "model": f"LatentODE/refined_{n}", "seed": seed,
                            "task": tname, "refine_lr": args.refine_lr,
                            "mse": _mse(preds[n], test_n.values, tgt),
                            "context_mse": _mse(preds[n], test_n.values, ctx),
                            "context_mse_unrefined": _mse(
                                preds[0], test_n.values, ctx
                            ),
                        }  # fmt: skip
                        rows.append(row)
                        P.emit(row)
    summary = {"variant": {k: v for k, v in vars(args).items() if k != "quick"}}
    get = {(r["model"], r["task"], r["seed"]): r["mse"] for r in rows}
    refined = [f"LatentODE/refined_{n}" for n in args.refine_steps]
    for label in ("LatentODE", "LatentODE/posterior_mean", *refined, *baselines):
        for tname in P.TASKS:
            v = np.array([get[(label, tname, s)] for s in args.seeds])
            d = v - np.array([get[("GRUDelta", tname, s)] for s in args.seeds])
            se = float(d.std(ddof=1) / np.sqrt(len(d))) if len(d) > 1 else None
            summary[f"{label}/{tname}"] = {
                "mean": float(v.mean()),
                "minus_GRUDelta": float(d.mean()),
                "minus_GRUDelta_se": se,
            }
    P.emit({"summary": summary})


if __name__ == "__main__":
    main()
