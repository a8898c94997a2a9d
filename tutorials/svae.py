"""A structured VAE (SVAE) on irregularly sampled series from a damped oscillator.

Run: python tutorials/svae.py [--out DIR]
(set CTMODELS_TUTORIAL_SMALL=1 for the short smoke version the tests run)

1. Simulate a continuous-time linear-Gaussian model (a noisy damped rotation,
   `dx = A x dt + L dW`) at each series' own irregular times, observed in two channels
   with noise and a third of the values missing; keep it as a `TimeSeries`.
2. Split by series and normalise with the training split's statistics.
3. Train an `SVAE` (Johnson et al. 2016): per-observation recognition potentials,
   Kalman smoothing under a continuous-time linear-Gaussian prior, a neural decoder)
   with `ctmodels.train.fit` on the latent ODE job's mixed interpolation /
   extrapolation task.
4. Score interpolation (hidden values) and extrapolation (the second half of each
   series' span) on held-out series against LOCF and linear interpolation.
5. Predict a dense trajectory with its uncertainty, back in data units, as xarray,
   and plot it.
"""

import argparse
import os
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

import ctmodels
import ctmodels.lgssm as lg
from ctmodels import data as cd
from ctmodels._plot import plot_series
from ctmodels.jobs import mixed_task

SMALL = os.environ.get("CTMODELS_TUTORIAL_SMALL") == "1"


def simulate(n_series: int, n_times: int, seed: int = 0) -> cd.TimeSeries:
    """Series of a 2-D Ornstein-Uhlenbeck process that rotates (period about 1.6)
    and decays, started from its stationary distribution, at irregular times in
    [0, 5], observed through a fixed 2 x 2 matrix with noise std 0.1."""
    rng = np.random.default_rng(seed)
    A = jnp.array([[-0.3, -4.0], [4.0, -0.3]])
    LLt = 0.6 * jnp.eye(2)
    P0 = np.asarray(lg.stationary_cov(A, LLt), np.float64)
    H = np.array([[1.0, 0.0], [0.6, 0.8]])
    times = np.sort(rng.uniform(0.0, 5.0, (n_series, n_times)), axis=1)
    x = np.zeros((n_series, n_times, 2))
    for s in range(n_series):
        F, Q = map(np.asarray, lg.discretise(A, LLt, jnp.diff(times[s])))
        x[s, 0] = rng.multivariate_normal(np.zeros(2), P0)
        for t in range(1, n_times):
            x[s, t] = rng.multivariate_normal(F[t - 1] @ x[s, t - 1], Q[t - 1])
    values = x @ H.T + 0.1 * rng.normal(size=x.shape)
    values[rng.uniform(size=values.shape) < 1 / 3] = np.nan
    return cd.TimeSeries.from_arrays(times, values, channels=["u", "v"])


def scores(model, ts, *, key):
    """Interpolation and extrapolation MSE on `ts` (normalised), with the context
    and the hidden values each task sets."""
    out = {}
    for name, task in ctmodels.models.evaluation_tasks(0.5, 0.5).items():
        mean, _, _, tgt = ctmodels.models.predict_grid(
            model, ts, key=key, n_samples=16, batch_size=64, task=task
        )
        out[name] = float(((mean - ts.values) ** 2)[tgt].mean())
    return out


def main(out: Path):
    # 1. data: irregular times per series, missing values as NaN
    ts = simulate(60 if SMALL else 400, 12 if SMALL else 30)
    print(ts)

    # 2. split by series; normalise on the training split (times scaled to its span)
    train, valid, test = cd.split_series(ts, (0.8, 0.1, 0.1), seed=0)
    norm = cd.Normalizer.fit(train, time_scale="span")
    train_n, valid_n, test_n = map(norm.transform, (train, valid, test))

    # 3. the SVAE: the prior's rate is per unit of normalised time (the span, 5 here).
    # Each series on its own times ("padded"): the union grid of a batch would make
    # every row as long as all of the batch's times together
    model = ctmodels.models.SVAE(
        ts.num_channels,
        latent_size=2 if SMALL else 4,
        units=8 if SMALL else 32,
        key=jax.random.key(0),
    )
    model, history = ctmodels.train.fit(
        model, train_n, valid=valid_n, epochs=2 if SMALL else 60, batch_size=32,
        learning_rate=1e-2, task=mixed_task, layout="padded", key=jax.random.key(1),
        progress=False,
    )  # fmt: skip
    print(history[["epoch", "train_loss", "valid_loss", "valid_mse"]].to_string(
        index=False))  # fmt: skip
    assert np.isfinite(history["valid_loss"]).all()
    print("learned noise std per channel (normalised):",
          np.round(np.exp(np.asarray(model.log_std)), 3))  # fmt: skip
    print("learned drift A (per unit normalised time):")
    print(np.round(np.asarray(model.prior.drift()), 2))

    # 4. held-out scores against LOCF and linear interpolation on the same points
    key = jax.random.key(2)
    ours = scores(model, test_n, key=key)
    locf = scores(ctmodels.models.LOCF(2), test_n, key=key)
    lin = scores(ctmodels.models.LinearInterpolation(2), test_n, key=key)
    for name in ours:
        print(f"{name:>13}: SVAE MSE {ours[name]:.3f}   LOCF {locf[name]:.3f}   "
              f"linear interpolation {lin[name]:.3f}")  # fmt: skip
        assert np.isfinite(ours[name])
        if not SMALL:
            assert ours[name] < locf[name], "the trained SVAE should beat LOCF"

    # 5. a dense trajectory with uncertainty for three test series, in data units:
    # smoothing inside each series' observations, prediction beyond its last one
    few = test[np.arange(3)]
    query = np.linspace(0.0, 6.0, 80)  # the data end at 5
    pred = ctmodels.models.predict(
        model, few, query, key=jax.random.key(3), n_samples=32, normalizer=norm
    )
    assert np.isfinite(pred["u"].values).all() and (pred["u_std"] > 0).all()
    paths = plot_series(cd.to_xarray(few), pred, out, title="SVAE, dense")
    print("plots:", ", ".join(str(p) for p in paths))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=None, help="directory for the PNG plots")
    args = parser.parse_args()
    main(Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="svae-")))
