"""A latent ODE on irregularly sampled clinical data (pbcseq), step by step.

Run: python tutorials/latent_ode.py [--out DIR]
(set CTMODELS_TUTORIAL_SMALL=1 for the few-second smoke version the tests run)

1. Load a real dataset as xarray and turn it into a `TimeSeries` (per-series irregular
   times, per-channel missingness as a mask).
2. Split by patient, fit the normalisation on the training split only.
3. Train a `LatentODE` (ODE-RNN encoder, Rubanova et al. 2019) with `ctmodels.train.fit`
   on the interpolation objective: reconstruct every visit from a random half.
4. Score interpolation (hidden visits) and extrapolation (the second half of each
   patient's follow-up) on held-out patients, against last-observation-carried-forward.
5. Calibrate the predictive spread on the validation patients, predict a dense
   trajectory with its uncertainty, back in original units, as xarray, and plot it.
"""

import argparse
import functools
import os
import tempfile
from pathlib import Path

import jax
import numpy as np

import ctmodels
from ctmodels import data as cd
from ctmodels._plot import plot_series

SMALL = os.environ.get("CTMODELS_TUTORIAL_SMALL") == "1"


def masked_mse(model, ts, task, *, key):
    """Mean squared error on the target points of `task`, over all batches of `ts`."""
    se, n = 0.0, 0
    for i, batch in enumerate(cd.batches(ts, 32, layout="union")):
        batch = task(batch, key=jax.random.fold_in(key, i))
        mean, _ = model.predict(batch, key=jax.random.fold_in(key, 10_000 + i))
        err = np.where(batch.target_mask, (np.asarray(mean) - batch.values) ** 2, 0.0)
        se, n = se + float(err.sum()), n + int(batch.target_mask.sum())
    return se / n


def main(out: Path):
    # 1. xarray -> TimeSeries
    ds = ctmodels.datasets.load("pbcseq")
    if SMALL:
        ds = ds.isel(series=slice(0, 60))
    ts = cd.from_xarray(ds, static=[])
    print(ts)

    # 2. split by series; normalise with training statistics only (log for skewed labs)
    train, valid, test = cd.split_series(ts, (0.8, 0.1, 0.1), seed=0)
    log = [c for c in ts.channels if ds[c].attrs.get("transform") == "log"]
    norm = cd.Normalizer.fit(train, log=log, time_scale="span")
    train_n, valid_n, test_n = map(norm.transform, (train, valid, test))

    # 3. model and training
    model = ctmodels.models.LatentODE(
        ts.num_channels,
        latent_size=4 if SMALL else 8,
        encoder_size=8 if SMALL else 24,
        units=16 if SMALL else 64,
        key=jax.random.key(0),
    )
    task = functools.partial(cd.interpolation_task, fraction=0.5, score="all")
    model, history = ctmodels.train.fit(
        model, train_n, valid=valid_n, epochs=3 if SMALL else 40, batch_size=32,
        learning_rate=1e-2, task=task, key=jax.random.key(1), progress=False,
    )  # fmt: skip
    print(history[["epoch", "train_loss", "valid_mse"]].to_string(index=False))
    assert history["valid_mse"].min() < history["valid_mse"].iloc[0]

    # 4. held-out scores against LOCF on the same hidden points
    tasks = {
        "interpolation": functools.partial(cd.interpolation_task, fraction=0.5),
        "extrapolation": lambda b, *, key: cd.extrapolation_task(b, split=0.5),
    }
    locf = ctmodels.models.LOCF(ts.num_channels)
    key = jax.random.key(2)
    for name, t in tasks.items():
        ours = masked_mse(model, test_n, t, key=key)
        base = masked_mse(locf, test_n, t, key=key)
        print(f"{name:>13}: latent ODE MSE {ours:.3f}   LOCF {base:.3f}")
        assert np.isfinite(ours)
        if not SMALL and name == "interpolation":
            assert ours < base, "the trained latent ODE should beat LOCF"

    # 5. a dense trajectory with uncertainty for three test patients, in lab units:
    # `ctmodels.models.predict` conditions on each patient's visits and answers at any
    # times (in the data's unit, years here), mapped back through the normaliser. A
    # latent ODE's own spread is far narrower than its errors, so first estimate a
    # residual std per channel on the validation patients (as `ctmodels fit
    # latent-ode` does; `ctmodels.models.load_fitted` returns its estimate).
    spread = ctmodels.models.calibrate_spread(
        model, valid, key=jax.random.key(4), normalizer=norm, n_samples=8
    )
    print("residual std per channel (normalised):", np.round(spread, 2))
    few = test[np.arange(3)]
    query = np.linspace(0.0, float(np.nanmax(few.nan_times())), 60)
    pred = ctmodels.models.predict(
        model, few, query, key=jax.random.key(3), n_samples=20, normalizer=norm,
        spread=spread,
    )  # fmt: skip
    assert np.isfinite(pred["bili"].values).all() and (pred["bili_std"] > 0).all()
    paths = plot_series(cd.to_xarray(few), pred, out, title="latent ODE, dense")
    print("plots:", ", ".join(str(p) for p in paths))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=None, help="directory for the PNG plots")
    args = parser.parse_args()
    main(Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="latent-ode-")))
