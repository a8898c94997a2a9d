"""FFJORD, a continuous normalizing flow, on a 2-D toy density, step by step.

Run: python tutorials/ffjord.py [--data pinwheel] [--out DIR]
(set CTMODELS_TUTORIAL_SMALL=1 for the short smoke version the tests run)

1. Generate one of the FFJORD paper's 2-D toy sets (`eight_gaussians`, `pinwheel`,
   `checkerboard`, `two_spirals`) by seed; split it and standardise it with the
   training statistics only.
2. Train an `FFJORD` (a ConcatSquash vector field, exact trace in 2-D, a small
   kinetic-energy penalty) with `ctmodels.train.fit` on the array of points, early
   stopping on the validation NLL.
3. Score the test NLL in the data's original units (the standardisation's
   log-determinant counted) against a full-covariance Gaussian; compare the exact
   log-density with Hutchinson's unbiased estimate.
4. Sample by the reverse solve and plot the learned density with the data and the
   samples over it (PNG).
"""

import argparse
import os
import tempfile
from pathlib import Path

import equinox as eqx
import jax
import jax.numpy as jnp
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

import ctmodels  # noqa: E402
from ctmodels.models import FFJORD  # noqa: E402

SMALL = os.environ.get("CTMODELS_TUTORIAL_SMALL") == "1"


def gaussian_nll(train: np.ndarray, test: np.ndarray) -> float:
    """Mean NLL (nats) of `test` under the maximum-likelihood full-covariance Gaussian
    of `train`: the baseline every density model should beat."""
    mean, cov = train.mean(0), np.cov(train.T, bias=True)
    diff = test - mean
    maha = np.einsum("ni,ij,nj->n", diff, np.linalg.inv(cov), diff)
    _, logdet = np.linalg.slogdet(cov)
    return float(np.mean(0.5 * (maha + logdet + train.shape[1] * np.log(2 * np.pi))))


def main(name: str, out: Path):
    # 1. data: points [n, 2], split 80/10/10, standardised with training statistics
    n = 600 if SMALL else 6000
    ds = ctmodels.datasets.load(name, n_samples=n, seed=0)
    points = np.stack([ds["x"].values, ds["y"].values], axis=1)
    n_train, n_valid = int(0.8 * n), int(0.1 * n)
    train, valid, test = np.split(points, [n_train, n_train + n_valid])
    mu, sigma = train.mean(0), train.std(0)

    def standardise(x):
        return ((x - mu) / sigma).astype(np.float32)

    # log p(x) = log p_std((x - mu) / sigma) - sum(log sigma)
    log_scale = float(np.sum(np.log(sigma)))

    # 2. the flow and its training
    model = FFJORD(
        2,
        width=16 if SMALL else 64,
        depth=2 if SMALL else 3,
        kinetic_weight=0.01,
        rtol=1e-3 if SMALL else 1e-5,
        atol=1e-3 if SMALL else 1e-5,
        key=jax.random.key(0),
    )
    model, history = ctmodels.train.fit(
        model, standardise(train), valid=standardise(valid),
        steps=30 if SMALL else 5000, batch_size=128 if SMALL else 512,
        learning_rate=1e-2 if SMALL else 3e-3, patience=None if SMALL else 15,
        key=jax.random.key(1), progress=False,
    )  # fmt: skip
    cols = ["epoch", "train_nll", "train_nfe", "valid_nll"]
    print(history[cols].to_string(index=False))
    assert history["valid_nll"].iloc[-1] < history["valid_nll"].iloc[0]

    # 3. test NLL in original units, against a full-covariance Gaussian
    log_prob = eqx.filter_jit(lambda m, x: m.log_prob(x))
    ours = -float(jnp.mean(log_prob(model, standardise(test)))) + log_scale
    base = gaussian_nll(train, test)
    print(f"test NLL (nats, original units): FFJORD {ours:.3f}   Gaussian {base:.3f}")
    assert np.isfinite(ours)
    if not SMALL:
        assert ours < base, "the trained flow should beat a Gaussian"
    # Hutchinson's estimate (what high-dimensional training uses) is unbiased:
    # its mean over probes matches the exact log-density
    x = jnp.tile(standardise(test[:4]), (256, 1))  # each row draws its own probe
    hutch = eqx.filter_jit(lambda m, x, k: m.log_prob(x, trace="hutchinson", key=k))(
        model, x, jax.random.key(2)
    ).reshape(256, 4)
    exact = log_prob(model, standardise(test[:4]))
    print("exact log p:", np.round(exact, 3))
    se = hutch.std(0) / np.sqrt(256)
    print("Hutchinson :", np.round(hutch.mean(0), 3), "+-", np.round(se, 3))

    # 4. samples and the learned density on a grid, in original units
    samples = np.asarray(model.sample(2000, key=jax.random.key(3))) * sigma + mu
    lo, hi = points.min(0) - 0.5, points.max(0) + 0.5
    g = 60 if SMALL else 200
    gx, gy = np.meshgrid(np.linspace(lo[0], hi[0], g), np.linspace(lo[1], hi[1], g))
    grid = np.stack([gx.ravel(), gy.ravel()], axis=1)
    density = np.exp(np.asarray(log_prob(model, standardise(grid))) - log_scale)
    cell = (hi[0] - lo[0]) / (g - 1) * (hi[1] - lo[1]) / (g - 1)
    print(f"the density integrates to {density.sum() * cell:.3f} over the plot")
    fig, axes = plt.subplots(1, 3, figsize=(12, 4), sharex=True, sharey=True)
    axes[0].scatter(*train.T, s=1, alpha=0.5)
    axes[0].set_title(f"{name}: training data")
    axes[1].pcolormesh(gx, gy, density.reshape(g, g), shading="auto")
    axes[1].set_title("FFJORD density")
    axes[2].scatter(*samples.T, s=1, alpha=0.5, color="C1")
    axes[2].set_title("FFJORD samples")
    for ax in axes:
        ax.set_xlim(lo[0], hi[0])
        ax.set_ylim(lo[1], hi[1])
        ax.set_aspect("equal")
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"ffjord_{name}.png"
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)
    print("plot:", path)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--data",
        default="pinwheel",
        choices=["eight_gaussians", "pinwheel", "checkerboard", "two_spirals"],
    )
    parser.add_argument("--out", default=None, help="directory for the PNG plot")
    args = parser.parse_args()
    out = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="ffjord-"))
    main(args.data, out)
