"""Plots: observed points, predicted mean and a 95% predictive band, one PNG per
series."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import xarray as xr


def _safe(name) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in str(name))


def predictive_interval(
    mean: np.ndarray, std: np.ndarray, *, log: bool = False, level: float = 0.95
) -> tuple[np.ndarray, np.ndarray]:
    """The central `level` interval of a predictive distribution given its mean and
    std: Gaussian (`mean +- z std`), or for a log-transformed channel (`log`) the
    log-normal with that mean and std, `exp(m +- z s)` with `s^2 = log(1 + std^2 /
    mean^2)` and `m = log(mean) - s^2 / 2` (positive, and skewed like the data)."""
    from statistics import NormalDist

    z = NormalDist().inv_cdf(0.5 + level / 2)
    mean, std = np.asarray(mean, float), np.asarray(std, float)
    if not log:
        return mean - z * std, mean + z * std
    with np.errstate(divide="ignore", invalid="ignore"):
        s = np.sqrt(np.log1p((std / mean) ** 2))
        m = np.log(mean) - s**2 / 2
    return np.exp(m - z * s), np.exp(m + z * s)


def plot_series(
    observed: xr.Dataset,
    predicted: xr.Dataset,
    out_dir: str | Path,
    *,
    series: Sequence | None = None,
    channels: Sequence[str] | None = None,
    series_dim: str = "series",
    time: str = "time",
    max_series: int = 6,
    title: str = "",
) -> list[Path]:
    """One PNG per series: a panel per channel with the observed values (dots), the
    predicted mean (line) and the central 95% predictive interval (band; log-normal
    for channels whose attrs say `transform="log"`, see `predictive_interval`).

    `observed` and `predicted` share dims and coordinates (as `to_xarray` writes them);
    `predicted` holds `V` (mean) and `V_std` for each channel `V`. Returns the paths.
    """
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if channels is None:
        channels = [
            str(v)
            for v in predicted.data_vars
            if f"{v}_std" in predicted.data_vars and v in observed.data_vars
        ]
    has_series = series_dim in observed.dims
    if series is None:
        series = (
            list(observed[series_dim].values[:max_series]) if has_series else [None]
        )
    paths = []
    for sid in series:
        obs = observed.sel({series_dim: sid}) if has_series else observed
        pred = predicted.sel({series_dim: sid}) if has_series else predicted
        n = len(channels)
        cols = min(n, 3)
        rows = -(-n // cols)
        fig, axes = plt.subplots(
            rows, cols, figsize=(4.2 * cols, 2.8 * rows), squeeze=False
        )
        t_obs = np.asarray(obs[time].values)
        t_pred = np.asarray(pred[time].values)
        order = np.argsort(t_pred)  # NaN/NaT (padding) sort last
        for k, ch in enumerate(channels):
            ax = axes[k // cols][k % cols]
            mu = np.asarray(pred[ch].values)[order]
            tp = t_pred[order]
            ok = ~np.isnan(mu)
            if f"{ch}_std" in pred:
                sd = np.asarray(pred[f"{ch}_std"].values)[order]
                log = pred[ch].attrs.get("transform") == "log"
                lo, hi = predictive_interval(mu, sd, log=log)
                ax.fill_between(
                    tp[ok], lo[ok], hi[ok], alpha=0.25, color="tab:blue", lw=0,
                    label="95% predictive interval",
                )  # fmt: skip
            ax.plot(tp[ok], mu[ok], color="tab:blue", lw=1.5, label="predicted mean")
            y = np.asarray(obs[ch].values)
            seen = ~np.isnan(y)
            ax.plot(t_obs[seen], y[seen], "o", color="k", ms=3.5, label="observed")
            units = obs[ch].attrs.get("units", "")
            ax.set_title(f"{ch}" + (f" [{units}]" if units else ""), fontsize=9)
            ax.tick_params(labelsize=8)
        for k in range(n, rows * cols):
            axes[k // cols][k % cols].axis("off")
        axes[0][0].legend(fontsize=7, loc="best")
        tunits = observed[time].attrs.get("units", "")
        fig.supxlabel(f"{time}" + (f" [{tunits}]" if tunits else ""), fontsize=9)
        label = f"{series_dim} {sid}" if sid is not None else "series"
        fig.suptitle(f"{title} {label}".strip(), fontsize=10)
        fig.tight_layout()
        path = out_dir / f"series_{_safe(sid)}.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        paths.append(path)
    return paths
