"""The neural-ODE "main job": fit a neural ODE to a real irregular time series.

`run_neural_ode` loads a dataset in the `(series, obs)` layout of
`ctmodels.datasets.load` (or a netCDF file in the same layout), encodes each series'
first observation into a latent state, evolves it with a neural vector field through
[`ctmodels.integrate`][], decodes the channels at every later observation time, and
writes `history.csv`, `metrics.json`, `predictions.nc` and `plot.png`.

It is the quick-start job until the latent ODE lands; the CLI
(`ctmodels fit neural-ode`) calls it with keyword arguments.
"""

from __future__ import annotations

import json
import math
import platform
import sys
import time as _time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jaxtyping import Array, Float

from ._integrate import integrate, resolve_adjoint
from ._outputs import check_out_dir

_DEFAULT_CHANNELS = ("bili", "albumin", "protime")
_DEFAULT_STATIC = ("age", "sex", "trt")
_SPLIT_CODES = {"train": 0, "valid": 1, "test": 2}

# Incremented when the train step is traced: one trace means one compilation for the
# whole job (reported in metrics.json, checked by the tests).
_TRACES = {"train_step": 0}
# Adam without its learning rate and weight decay, which the step takes as array
# arguments (AdamW): one module-level optimizer and traced hyperparameters mean a new
# `lr` (or a second run) does not recompile.
_OPTIMIZER = optax.chain(optax.clip_by_global_norm(1.0), optax.scale_by_adam())


# ----------------------------------------------------------------------------- model


class _VectorField(eqx.Module):
    mlp: eqx.nn.MLP

    def __call__(self, t, z, args):
        return self.mlp(z)


class NeuralODEForecaster(eqx.Module):
    """Encode the first observation, evolve with a neural ODE, decode the channels.

    `z(t0) = encoder([x0 * m0, m0, s])`, `dz/dt = f_theta(z)` (a tanh MLP),
    `x_hat(t) = decoder(z(t))` (linear), where `x0` are the normalised channel values at
    the first observation, `m0` their observed-mask and `s` the static covariates.

    Reference: Chen, Rubanova, Bettencourt & Duvenaud, "Neural Ordinary Differential
    Equations", NeurIPS 2018.

    ```bibtex
    @inproceedings{chen2018neural,
      title={Neural Ordinary Differential Equations},
      author={Chen, Ricky T. Q. and Rubanova, Yulia and Bettencourt, Jesse and
              Duvenaud, David},
      booktitle={Advances in Neural Information Processing Systems},
      year={2018}
    }
    ```
    """

    encoder: eqx.nn.MLP
    field: _VectorField
    decoder: eqx.nn.Linear
    solver: str = eqx.field(static=True)
    adjoint: str = eqx.field(static=True)
    rtol: float = eqx.field(static=True)
    atol: float = eqx.field(static=True)

    def __init__(
        self,
        channels: int,
        static: int,
        *,
        latent: int,
        hidden: int,
        solver: str,
        adjoint: str,
        rtol: float,
        atol: float,
        key,
    ):
        k1, k2, k3 = jax.random.split(key, 3)
        self.encoder = eqx.nn.MLP(
            2 * channels + static, latent, hidden, depth=1, activation=jnp.tanh, key=k1
        )
        self.field = _VectorField(
            eqx.nn.MLP(latent, latent, hidden, depth=2, activation=jnp.tanh, key=k2)
        )
        self.decoder = eqx.nn.Linear(latent, channels, key=k3)
        self.solver, self.adjoint = solver, adjoint
        self.rtol, self.atol = rtol, atol

    def __call__(
        self,
        x0: Float[Array, " C"],
        m0: Float[Array, " C"],
        s: Float[Array, " S"],
        ts: Float[Array, " T"],
    ) -> Float[Array, "T C"]:
        """Predict the (normalised) channels at the strictly increasing times `ts`,
        starting from the first observation at `ts[0]`. One series; the caller vmaps."""
        z0 = self.encoder(jnp.concatenate([x0 * m0, m0, s]))
        sol = integrate(
            self.field,
            z0,
            ts,
            solver=self.solver,
            adjoint=self.adjoint,
            rtol=self.rtol,
            atol=self.atol,
        )
        return jax.vmap(self.decoder)(sol.ys)


def _masked_mse(pred, y, mask):
    err = jnp.where(mask > 0, pred - y, 0.0)
    return jnp.sum(err**2 * mask), jnp.sum(mask)


@eqx.filter_jit
def _step(model, opt_state, lr, wd, x0, m0, s, ts, y, mask):
    """One Adam step on a batch; also returns the batch's predictions (before the
    update). Evaluation and prediction reuse this step and discard the update, so the
    whole job compiles one program (the ODE solve and its adjoint dominate compile time
    on CPU; a second, forward-only program would nearly double it)."""
    _TRACES["train_step"] += 1

    def loss_fn(model):
        pred = jax.vmap(model)(x0, m0, s, ts)
        sse, n = _masked_mse(pred, y, mask)
        return sse / jnp.maximum(n, 1.0), (sse, n, pred)

    (_, (sse, n, pred)), grads = eqx.filter_value_and_grad(loss_fn, has_aux=True)(model)
    params = eqx.filter(model, eqx.is_inexact_array)
    updates, opt_state = _OPTIMIZER.update(grads, opt_state, params)
    updates = jax.tree.map(lambda u, p: -lr * (u + wd * p), updates, params)
    return eqx.apply_updates(model, updates), opt_state, sse, n, pred


def _forward(model, opt_state, x0, m0, s, ts):
    """Predictions [B, T, C] through the compiled step (update discarded)."""
    shape = ts.shape + (x0.shape[-1],)
    zeros = np.zeros(shape, np.float32)
    zero = jnp.zeros((), jnp.float32)
    return np.asarray(
        _step(model, opt_state, zero, zero, x0, m0, s, ts, zeros, zeros)[4]
    )


# ------------------------------------------------------------------------------ data


def _as_names(value, default, what: str) -> tuple[str, ...]:
    if value is None:
        return tuple(default)
    if isinstance(value, str):
        if value.strip().lower() in ("", "none"):
            return ()
        return tuple(v.strip() for v in value.split(",") if v.strip())
    names = tuple(value)
    if not all(isinstance(v, str) for v in names):
        raise ValueError(f"{what} must be names (strings), got {value!r}.")
    return names


def _open(data):
    import xarray as xr

    from . import datasets

    if isinstance(data, xr.Dataset):
        return data, "<xarray.Dataset>"
    if isinstance(data, str) and data in datasets.names():
        return datasets.load(data), data
    path = Path(data)
    if path.is_file():
        with xr.open_dataset(path) as ds:
            return ds.load(), str(path)
    raise ValueError(
        f"data={data!r} is neither a bundled dataset ({', '.join(datasets.names())}) "
        "nor an existing netCDF file in the (series, obs) layout of "
        "ctmodels.datasets.load."
    )


def _series_obs_dims(ds) -> tuple[str, str]:
    if "time" not in ds.variables or ds["time"].ndim != 2:
        raise ValueError(
            "The data needs a 2-D coordinate 'time' [series, obs] (NaN after each "
            "series' last observation), as ctmodels.datasets.load returns."
        )
    if ds["time"].shape[1] < 2:
        raise ValueError(
            "Every series has a single observation: there is nothing to forecast."
        )
    return ds["time"].dims  # type: ignore[return-value]


def _select_channels(ds, channels, obs_dims):
    missing = [c for c in channels if c not in ds.data_vars]
    if missing:
        avail = [v for v in ds.data_vars if ds[v].dims == obs_dims]
        raise ValueError(
            f"Channel(s) {missing} not in the data; channels on {obs_dims}: {avail}."
        )
    for c in channels:
        if ds[c].dims != obs_dims:
            raise ValueError(
                f"Channel {c!r} has dims {ds[c].dims}, expected {obs_dims}."
            )
    if not channels:
        raise ValueError("Give at least one channel.")


def _log_channels(ds, channels, log_transform, train_values) -> tuple[str, ...]:
    """Which channels to model on the log scale."""
    if log_transform is None or log_transform is False:
        return ()
    if isinstance(log_transform, str) and log_transform != "auto":
        log_transform = _as_names(log_transform, (), "log_transform")
    if log_transform == "auto":
        marked = [c for c in channels if "transform" in ds[c].attrs]
        if marked:
            return tuple(c for c in channels if ds[c].attrs.get("transform") == "log")
        out = []  # no hints in the file: log the positive, right-skewed channels
        for i, c in enumerate(channels):
            v = train_values[..., i]
            v = v[np.isfinite(v)]
            if v.size > 2 and np.all(v > 0):
                sd = v.std()
                skew = np.mean((v - v.mean()) ** 3) / sd**3 if sd > 0 else 0.0
                if skew > 1.0:
                    out.append(c)
        return tuple(out)
    names = tuple(log_transform)
    bad = [c for c in names if c not in channels]
    if bad:
        raise ValueError(
            f"log_transform names {bad} are not among channels {channels}."
        )
    return names


def _split(n: int, seed: int) -> dict[str, np.ndarray]:
    """Shuffle series indices with `seed`; 80/10/10 train/valid/test (each non-empty
    when n >= 3)."""
    perm = np.random.default_rng(seed).permutation(n)
    n_test = max(1, round(0.1 * n)) if n >= 3 else 0
    n_valid = max(1, round(0.1 * n)) if n >= 3 else 0
    n_train = n - n_test - n_valid
    return {
        "train": np.sort(perm[:n_train]),
        "valid": np.sort(perm[n_train : n_train + n_valid]),
        "test": np.sort(perm[n_train + n_valid :]),
    }


def _pad_times(times: np.ndarray, n_obs: np.ndarray, step: float) -> np.ndarray:
    """Times relative to the first observation, with the padding after the last
    observation replaced by last + k * step (strictly increasing, masked out)."""
    t = times - times[:, :1]
    k = np.arange(t.shape[1])[None, :] - (n_obs[:, None] - 1)
    last = np.take_along_axis(t, (n_obs - 1)[:, None], axis=1)
    return np.where(k > 0, last + k * step, t)


# ---------------------------------------------------------------------------- batches


def _batches(idx: np.ndarray, batch_size: int, rng=None):
    """Fixed-size batches of series indices; the last one padded (weight 0)."""
    if rng is not None:
        idx = rng.permutation(idx)
    for start in range(0, len(idx), batch_size):
        chunk = idx[start : start + batch_size]
        weight = np.ones(batch_size, np.float32)
        if len(chunk) < batch_size:
            weight[len(chunk) :] = 0.0
            chunk = np.concatenate([chunk, np.full(batch_size - len(chunk), chunk[0])])
        yield chunk, weight


def _predict_all(model, opt_state, arrays, idx, batch_size, ts=None):
    """Normalised predictions [len(idx), T, C] at the (padded) times `ts[idx]`
    (default: the observation grid), in batches of the training shape."""
    x0, m0, s = arrays["x0"], arrays["m0"], arrays["s"]
    ts = arrays["ts"] if ts is None else ts
    out = []
    for chunk, weight in _batches(idx, batch_size):
        pred = _forward(model, opt_state, x0[chunk], m0[chunk], s[chunk], ts[chunk])
        out.append(pred[weight > 0])
    return np.concatenate(out) if out else np.zeros((0,) + arrays["y"].shape[1:])


def _predict_dense(model, opt_state, arrays, idx, batch_size, dense):
    """Predictions [len(idx), G, C] on per-series grids `dense` [len(idx), G] starting
    at 0, through the training shape [batch, T]: each call integrates from the first
    observation to the next T-1 grid points."""
    T = arrays["ts"].shape[1]
    pieces = []
    for start in range(1, dense.shape[1], T - 1):
        grid = dense[:, start : start + T - 1]
        k = grid.shape[1]
        if k < T - 1:  # pad with increasing times beyond the grid
            extra = grid[:, -1:] + 1e-3 * np.arange(1, T - k)[None, :]
            grid = np.concatenate([grid, extra], axis=1)
        ts = np.zeros((arrays["ts"].shape[0], T), np.float32)
        ts[idx] = np.concatenate([np.zeros((len(idx), 1)), grid], axis=1)
        pred = _predict_all(model, opt_state, arrays, idx, batch_size, ts=ts)
        if start == 1:
            pieces.append(pred[:, :1])
        pieces.append(pred[:, 1 : 1 + k])
    return np.concatenate(pieces, axis=1)


def _mse(pred, y, mask) -> tuple[float, np.ndarray, np.ndarray]:
    """Overall and per-channel masked MSE, and per-channel counts."""
    err = np.where(mask > 0, pred - y, 0.0) ** 2 * mask
    sse_c, n_c = err.sum(axis=(0, 1)), mask.sum(axis=(0, 1))
    total = float(sse_c.sum() / n_c.sum()) if n_c.sum() > 0 else float("nan")
    with np.errstate(invalid="ignore", divide="ignore"):
        per = np.where(n_c > 0, sse_c / np.maximum(n_c, 1.0), np.nan)
    return total, per, n_c


# ------------------------------------------------------------------------------- main


def run_neural_ode(
    data: Any = "pbcseq",
    out: str | Path = "neural_ode_out",
    *,
    epochs: int = 150,
    seed: int = 0,
    channels: Sequence[str] | str = _DEFAULT_CHANNELS,
    static: Sequence[str] | str | None = None,
    log_transform: Sequence[str] | str | None = "auto",
    hidden: int = 32,
    latent: int = 8,
    solver: str = "tsit5",
    adjoint: str = "checkpoint",
    rtol: float = 1e-3,
    atol: float = 1e-4,
    batch_size: int = 32,
    lr: float = 3e-3,
    weight_decay: float = 0.1,
    max_series: int | None = None,
    plot: bool = True,
    progress: bool = True,
) -> dict[str, Any]:
    """Fit a neural ODE forecaster to an irregularly sampled dataset and write results.

    For each series the latent state at the first observation comes from an encoder of
    that observation (normalised channels, their mask, static covariates); a neural
    vector field evolves it through [`ctmodels.integrate`][]; a linear decoder maps it
    to the channels. The loss is the masked MSE (normalised units) over all later
    observations. Series are split 80/10/10 into train/valid/test with `seed`; the model
    with the best validation loss is kept and evaluated on the test split, next to two
    baselines: carrying the first observation forward and the train mean.

    **Arguments:**

    - `data`: a bundled dataset name (`ctmodels.datasets.names()`, default `"pbcseq"`)
        or a path to a netCDF file in the same layout (2-D coordinate `time`
        `[series, obs]`, NaN after each series' last observation, channels on the same
        dims, static covariates along `series`).
    - `out`: output folder (created). Receives `history.csv`, `metrics.json`,
        `predictions.nc` and `plot.png`.
    - `epochs`: passes over the training series.
    - `seed`: seeds the split, the initialisation and the shuffling.
    - `channels`: channel variables to model (names or one comma-separated string).
    - `static`: static covariates for the encoder (names, comma-separated string, `""`
        for none). Default: those of `age`, `sex`, `trt` present in the data.
    - `log_transform`: `"auto"` (the channels whose attrs say `transform="log"`; for
        files without such attrs, the positive right-skewed channels), names, or `None`.
    - `hidden`: width of the vector field and encoder MLPs. `latent`: latent size.
    - `solver`, `adjoint`, `rtol`, `atol`: passed to [`ctmodels.integrate`][] (registry
        names; see `ctmodels solvers`).
    - `batch_size`: series per minibatch (fixed: the last batch is padded and masked, so
        the step compiles once). `lr`: Adam learning rate. `weight_decay`: decoupled
        weight decay (AdamW), 0 for plain Adam.
    - `max_series`: use only this many series (a seeded random subset), for quick runs.
    - `plot`: write `plot.png`. `progress`: print one line per epoch to stderr.

    **Returns:** the metrics dict also written to `metrics.json`.
    """
    import pandas as pd
    import xarray as xr

    t_start = _time.perf_counter()
    if int(epochs) < 1:
        raise ValueError(f"epochs must be >= 1, got {epochs!r}.")
    if int(batch_size) < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size!r}.")
    epochs, batch_size, seed = int(epochs), int(batch_size), int(seed)
    out = check_out_dir(out)  # created once the data and settings passed
    resolve_adjoint(adjoint, "integrate")
    channels = _as_names(channels, _DEFAULT_CHANNELS, "channels")

    ds, data_name = _open(data)
    obs_dims = _series_obs_dims(ds)
    sdim, odim = obs_dims
    _select_channels(ds, channels, obs_dims)
    if static is None:
        static = tuple(v for v in _DEFAULT_STATIC if v in ds.data_vars)
    static = _as_names(static, (), "static")
    for v in static:
        if v not in ds.variables or ds[v].dims != (sdim,):
            raise ValueError(
                f"static covariate {v!r} must be a variable along {sdim!r}."
            )

    rng = np.random.default_rng(seed)
    if max_series is not None:
        max_series = int(max_series)
        if max_series < 3:
            raise ValueError(
                f"max_series must be >= 3 (train/valid/test), got {max_series}."
            )
        if max_series < ds.sizes[sdim]:
            keep = np.sort(rng.choice(ds.sizes[sdim], size=max_series, replace=False))
            ds = ds.isel({sdim: keep})

    times_raw = ds["time"].values.astype(np.float64)
    n_obs = np.isfinite(times_raw).sum(axis=1)
    if np.any(n_obs < 1):
        raise ValueError("Every series needs at least one observation time.")
    observed_prefix = np.arange(times_raw.shape[1])[None, :] < n_obs[:, None]
    if np.any(np.isfinite(times_raw) != observed_prefix):
        raise ValueError("time must be NaN only after each series' last observation.")
    later = observed_prefix[:, 1:]
    gaps = np.diff(np.where(observed_prefix, times_raw, 0.0), axis=1)
    if np.any(gaps[later] <= 0):
        raise ValueError(
            "Observation times must be strictly increasing within a series."
        )

    raw = np.stack([ds[c].values.astype(np.float64) for c in channels], axis=-1)
    raw = np.where(observed_prefix[..., None], raw, np.nan)
    splits = _split(ds.sizes[sdim], seed)
    tr = splits["train"]

    logged = _log_channels(ds, channels, log_transform, raw[tr])
    log_mask = np.array([c in logged for c in channels])
    if np.any(raw[..., log_mask][np.isfinite(raw[..., log_mask])] <= 0):
        raise ValueError(f"log_transform channels {logged} must be positive.")
    with np.errstate(invalid="ignore", divide="ignore"):
        work = np.where(log_mask, np.log(raw), raw)
    mean = np.nanmean(work[tr].reshape(-1, len(channels)), axis=0)
    std = np.nanstd(work[tr].reshape(-1, len(channels)), axis=0)
    if not np.all(np.isfinite(mean)):
        bad = [c for c, m in zip(channels, mean, strict=True) if not np.isfinite(m)]
        raise ValueError(
            f"Channel(s) {bad} have no observed values in the train split."
        )
    std = np.where(std > 0, std, 1.0)
    norm = (work - mean) / std
    mask_all = np.isfinite(norm)

    if static:
        s_raw = np.stack([ds[v].values.astype(np.float64) for v in static], axis=-1)
        s_mean = np.nanmean(s_raw[tr], axis=0)
        s_std = np.nanstd(s_raw[tr], axis=0)
        s_std = np.where(s_std > 0, s_std, 1.0)
        s_norm = np.nan_to_num((s_raw - s_mean) / s_std)
    else:
        s_norm = np.zeros((ds.sizes[sdim], 0))

    target_mask = mask_all.copy()
    target_mask[:, 0, :] = False  # the first observation is the input, not a target
    span = float(np.nanmax(times_raw - times_raw[:, :1]))
    pad_step = 1e-4 * span if span > 0 else 1e-4  # padding times: tiny, increasing
    arrays = {
        "x0": np.nan_to_num(norm[:, 0, :]).astype(np.float32),
        "m0": mask_all[:, 0, :].astype(np.float32),
        "s": s_norm.astype(np.float32),
        "ts": _pad_times(times_raw, n_obs, pad_step).astype(np.float32),
        "y": np.nan_to_num(norm).astype(np.float32),
        "mask": target_mask.astype(np.float32),
    }

    key = jax.random.key(seed)
    model = NeuralODEForecaster(
        len(channels),
        len(static),
        latent=int(latent),
        hidden=int(hidden),
        solver=solver,
        adjoint=adjoint,
        rtol=float(rtol),
        atol=float(atol),
        key=key,
    )
    opt_state = _OPTIMIZER.init(eqx.filter(model, eqx.is_inexact_array))
    out.mkdir(parents=True, exist_ok=True)
    lr_array = jnp.asarray(lr, jnp.float32)
    wd_array = jnp.asarray(weight_decay, jnp.float32)
    traces0 = dict(_TRACES)

    def evaluate(model, split):
        idx = splits[split]
        if len(idx) == 0:
            return float("nan")
        pred = _predict_all(model, opt_state, arrays, idx, batch_size)
        return _mse(pred, arrays["y"][idx], arrays["mask"][idx])[0]

    history = []
    best = (math.inf, 0, model)
    first_step_s = None
    t_train = _time.perf_counter()
    for epoch in range(1, epochs + 1):
        t_epoch = _time.perf_counter()
        sse_sum, n_sum = 0.0, 0.0
        for chunk, weight in _batches(tr, batch_size, rng):
            t_step = _time.perf_counter()
            model, opt_state, sse, n, _ = _step(
                model,
                opt_state,
                lr_array,
                wd_array,
                arrays["x0"][chunk],
                arrays["m0"][chunk],
                arrays["s"][chunk],
                arrays["ts"][chunk],
                arrays["y"][chunk],
                arrays["mask"][chunk] * weight[:, None, None],
            )
            sse_sum, n_sum = sse_sum + float(sse), n_sum + float(n)
            if first_step_s is None:
                first_step_s = _time.perf_counter() - t_step
        train_loss = sse_sum / max(n_sum, 1.0)
        if not math.isfinite(train_loss):
            raise FloatingPointError(
                f"The training loss became {train_loss} in epoch {epoch}; lower lr "
                f"(now {lr}) or loosen rtol/atol."
            )
        valid_loss = evaluate(model, "valid")
        seconds = _time.perf_counter() - t_epoch
        history.append(
            {
                "epoch": epoch,
                "train_loss": train_loss,
                "valid_loss": valid_loss,
                "seconds": seconds,
            }
        )
        if valid_loss < best[0] or not math.isfinite(best[0]):
            best = (valid_loss, epoch, model)
        if progress:
            print(
                f"epoch {epoch:>{len(str(epochs))}}/{epochs}  train {train_loss:.4f}  "
                f"valid {valid_loss:.4f}  {seconds:.1f}s",
                file=sys.stderr,
                flush=True,
            )
    train_s = _time.perf_counter() - t_train
    best_valid, best_epoch, model = best

    # --------------------------------------------------------------- evaluation
    te = splits["test"]
    y_te, m_te = arrays["y"][te], arrays["mask"][te]
    pred_te = _predict_all(model, opt_state, arrays, te, batch_size)
    test_mse, test_per, test_n = _mse(pred_te, y_te, m_te)
    locf = np.broadcast_to(arrays["x0"][te][:, None, :], y_te.shape)  # NaN x0 -> 0
    locf_mse, locf_per, _ = _mse(locf, y_te, m_te)
    mean_mse, mean_per, _ = _mse(np.zeros_like(y_te), y_te, m_te)

    def per_channel(values):
        return {c: float(v) for c, v in zip(channels, values, strict=True)}

    # ------------------------------------------------------------ predictions.nc
    all_idx = np.arange(ds.sizes[sdim])
    pred_norm = _predict_all(model, opt_state, arrays, all_idx, batch_size)
    pred_work = pred_norm * std + mean
    pred_orig = np.where(log_mask, np.exp(pred_work), pred_work)
    pred_orig = np.where(observed_prefix[..., None], pred_orig, np.nan)
    split_code = np.zeros(ds.sizes[sdim], np.int8)
    for name, idx in splits.items():
        split_code[idx] = _SPLIT_CODES[name]
    pred_vars = {}
    for i, c in enumerate(channels):
        attrs = {k: v for k, v in ds[c].attrs.items() if k in ("long_name", "units")}
        pred_vars[c] = (
            obs_dims,
            pred_orig[..., i],
            {
                **attrs,
                "description": "neural-ODE prediction in original units"
                + (" (exp of the predicted log value)" if log_mask[i] else "")
                + "; the first observation is the encoder's reconstruction, later "
                "ones are forecasts from it",
            },
        )
        pred_vars[f"{c}_observed"] = (
            obs_dims,
            raw[..., i],
            {**attrs, "description": "observed value (NaN = missing)"},
        )
    pred_vars["split"] = (
        (sdim,),
        split_code,
        {
            "flag_values": np.array(list(_SPLIT_CODES.values()), np.int8),
            "flag_meanings": " ".join(_SPLIT_CODES),
        },
    )
    coords = {sdim: ds[sdim]} if sdim in ds.coords else {}
    coords["time"] = ds["time"]
    predictions = xr.Dataset(
        pred_vars,
        coords=coords,
        attrs={
            "title": f"neural-ODE predictions for {data_name}",
            "model": "NeuralODEForecaster (ctmodels._node_job)",
            "channels": " ".join(channels),
            "log_transformed": " ".join(logged),
            "seed": seed,
        },
    )
    try:
        predictions.to_netcdf(out / "predictions.nc")
    except ValueError as e:  # no netCDF engine installed
        raise ValueError(
            f"Could not write predictions.nc ({e}); install netCDF4 "
            "(pip install netCDF4)."
        ) from e
    pd.DataFrame(history).to_csv(out / "history.csv", index=False)

    # ------------------------------------------------------------------ plot
    plot_s = 0.0
    if plot:
        t_plot = _time.perf_counter()
        _plot(
            out / "plot.png",
            model,
            opt_state,
            batch_size,
            arrays,
            te,
            n_obs,
            times_raw,
            raw,
            channels,
            ds,
            mean,
            std,
            log_mask,
        )
        plot_s = _time.perf_counter() - t_plot

    total_s = _time.perf_counter() - t_start
    traces = {k: _TRACES[k] - traces0[k] for k in _TRACES}
    metrics = {
        "data": data_name,
        "channels": list(channels),
        "static": list(static),
        "log_transformed": list(logged),
        "normalisation": {
            c: {"mean": float(m), "std": float(s)}
            for c, m, s in zip(channels, mean, std, strict=True)
        },
        "units": "masked MSE on normalised (train mean/std, after log transform) "
        "values, over observed entries at every visit after the first",
        "n_series": {k: int(len(v)) for k, v in splits.items()},
        "n_targets_test": {c: int(n) for c, n in zip(channels, test_n, strict=True)},
        "test_mse": test_mse,
        "test_mse_per_channel": per_channel(test_per),
        "baselines": {
            "locf_first_visit": {
                "test_mse": locf_mse,
                "test_mse_per_channel": per_channel(locf_per),
            },
            "train_mean": {
                "test_mse": mean_mse,
                "test_mse_per_channel": per_channel(mean_per),
            },
        },
        "skill_vs_locf": 1.0 - test_mse / locf_mse if locf_mse > 0 else float("nan"),
        "best_epoch": best_epoch,
        "best_valid_mse": best_valid,
        "final_train_loss": history[-1]["train_loss"],
        "settings": {
            "epochs": epochs,
            "seed": seed,
            "hidden": int(hidden),
            "latent": int(latent),
            "solver": solver,
            "adjoint": adjoint,
            "rtol": float(rtol),
            "atol": float(atol),
            "batch_size": batch_size,
            "lr": float(lr),
            "weight_decay": float(weight_decay),
            "max_series": max_series,
        },
        "timings": {
            "total_s": total_s,
            "train_s": train_s,
            "first_step_s": first_step_s,  # includes the one compilation
            "mean_epoch_s": float(np.mean([h["seconds"] for h in history])),
            "plot_s": plot_s,
        },
        "compilations": traces,
        "versions": {
            "python": platform.python_version(),
            "jax": jax.__version__,
            "equinox": eqx.__version__,
            "optax": optax.__version__,
            "backend": jax.default_backend(),
        },
    }
    with open(out / "metrics.json", "w") as f:
        json.dump(_jsonable(metrics), f, indent=2)
        f.write("\n")
    if progress:
        print(
            f"test MSE {test_mse:.4f}  (carry-forward {locf_mse:.4f}, train mean "
            f"{mean_mse:.4f}); best epoch {best_epoch}; {total_s:.0f}s; wrote {out}/",
            file=sys.stderr,
            flush=True,
        )
    return metrics


def _jsonable(x):
    if isinstance(x, dict):
        return {k: _jsonable(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_jsonable(v) for v in x]
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return x


def _plot(
    path,
    model,
    opt_state,
    batch_size,
    arrays,
    test_idx,
    n_obs,
    times_raw,
    raw,
    channels,
    ds,
    mean,
    std,
    log_mask,
    n_series=5,
    n_grid=100,
):
    import matplotlib
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    # The test series with the most observations (at least two).
    order = sorted(test_idx, key=lambda i: (-n_obs[i], i))
    chosen = [i for i in order if n_obs[i] >= 2][:n_series]
    fig = Figure(figsize=(4.2 * len(channels), 3.6))  # Agg canvas, no pyplot state
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(channels), squeeze=False)[0]
    if chosen:
        chosen = np.array(chosen)
        t0 = times_raw[chosen, 0]
        t_last = times_raw[chosen, n_obs[chosen] - 1] - t0
        dense = np.linspace(0.0, 1.0, n_grid)[None, :] * t_last[:, None]
        pred = _predict_dense(model, opt_state, arrays, chosen, batch_size, dense)
        pred = pred * std + mean
        pred = np.where(log_mask, np.exp(pred), pred)
        colors = matplotlib.colormaps["tab10"].colors
        sdim = ds["time"].dims[0]
        labels = ds[sdim].values[chosen] if sdim in ds.coords else chosen
        for j, i in enumerate(chosen):
            color = colors[j % len(colors)]
            for c, ax in enumerate(axes):
                ax.plot(dense[j] + t0[j], pred[j, :, c], color=color, lw=1.5)
                ax.plot(
                    times_raw[i], raw[i, :, c], "o", color=color, ms=4,
                    label=f"{sdim} {labels[j]}",
                )  # fmt: skip
    for c, ax in enumerate(axes):
        name = channels[c]
        units = ds[name].attrs.get("units", "")
        ax.set_title(ds[name].attrs.get("long_name", name), fontsize=10)
        ax.set_ylabel(f"{name} [{units}]" if units else name)
        ax.set_xlabel(f"time [{ds['time'].attrs.get('units', '')}]".replace(" []", ""))
        if log_mask[c]:
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
    if len(chosen):
        axes[-1].legend(fontsize=8, loc="best")
    fig.suptitle("Neural ODE from the first visit: observed (dots), predicted (lines); "
                 "test series", fontsize=10)  # fmt: skip
    fig.tight_layout()
    fig.savefig(path, dpi=110)
