"""Synthetic datasets with known ground truth, generated on demand with NumPy.

Every generator returns an `xarray.Dataset` in the ctmodels layout: observed channels
(`role="channel"`, NaN = not observed), the noise-free values and latent quantities they
came from (`role="truth"`), and, where there is one, a class label (`role="label"`).
All randomness comes from one `numpy.random.Generator` made from `seed`, so the same
arguments give the same dataset.
"""

from __future__ import annotations

import math
import numbers

import numpy as np
import xarray as xr

from .._references import cites
from ._common import flag_attrs

_TIME_UNITS = "arbitrary"

# ------------------------------------------------------------------------ validation


def _rng(seed) -> np.random.Generator:
    if isinstance(seed, np.random.Generator):
        return seed
    if seed is None or (
        isinstance(seed, numbers.Integral) and not isinstance(seed, bool) and seed >= 0
    ):
        return np.random.default_rng(seed)
    raise ValueError(
        f"seed must be a non-negative int, None or a numpy.random.Generator, got "
        f"{seed!r}."
    )


def _int(name: str, value, minimum: int, maximum: int | None = None) -> int:
    if not isinstance(value, numbers.Integral) or isinstance(value, bool):
        raise ValueError(f"{name} must be an int, got {value!r}.")
    value = int(value)
    if value < minimum or (maximum is not None and value > maximum):
        bound = f">= {minimum}" if maximum is None else f"in [{minimum}, {maximum}]"
        raise ValueError(f"{name} must be {bound}, got {value}.")
    return value


def _float(name: str, value, *, positive=False, nonnegative=False, below=None) -> float:
    if not isinstance(value, numbers.Real) or isinstance(value, bool):
        raise ValueError(f"{name} must be a real number, got {value!r}.")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}.")
    if positive and not value > 0:
        raise ValueError(f"{name} must be > 0, got {value}.")
    if nonnegative and not value >= 0:
        raise ValueError(f"{name} must be >= 0, got {value}.")
    if below is not None and not value < below:
        raise ValueError(f"{name} must be < {below}, got {value}.")
    return value


def _range(name: str, value, *, positive=False) -> tuple[float, float]:
    try:
        lo, hi = value
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a pair (low, high), got {value!r}.") from None
    lo = _float(f"{name}[0]", lo, positive=positive)
    hi = _float(f"{name}[1]", hi, positive=positive)
    if not lo <= hi:
        raise ValueError(f"{name} must have low <= high, got {value!r}.")
    return lo, hi


# --------------------------------------------------------------------------- layouts


def _irregular_times(rng, n_series, n_times, t_max) -> np.ndarray:
    """Per-series times: 0, then `n_times - 1` sorted uniform draws on [0, t_max]."""
    rest = np.sort(rng.uniform(0.0, t_max, size=(n_series, n_times - 1)), axis=1)
    return np.concatenate([np.zeros((n_series, 1)), rest], axis=1)


def _time_coord(times: np.ndarray, shared: bool, description: str):
    attrs = {"long_name": "time", "units": _TIME_UNITS, "description": description}
    if shared:
        return ("time", times, attrs)
    return (("series", "obs"), times, attrs)


def _dataset(data_vars, *, time, n_series, channels, attrs) -> xr.Dataset:
    coords = {
        "series": ("series", np.arange(n_series), {"long_name": "series number"}),
        "time": time,
    }
    return xr.Dataset(
        data_vars,
        coords=coords,
        attrs={"source": "synthetic", "license": "none (generated locally)"}
        | attrs
        | {"channels": " ".join(channels)},
    )


def _observe(rng, truth, n_observed, noise_std):
    """Noisy copies of `truth` [S, T, ...] at `n_observed` random time positions of
    each series (NaN elsewhere)."""
    S, T = truth.shape[:2]
    noisy = truth + rng.normal(0.0, 1.0, size=truth.shape) * noise_std
    # n_observed distinct positions per series, uniformly at random
    order = np.argsort(rng.random((S, T)), axis=1)
    observed = np.zeros((S, T), bool)
    np.put_along_axis(observed, order[:, :n_observed], True, axis=1)
    observed = observed.reshape((S, T) + (1,) * (truth.ndim - 2))
    return np.where(observed, noisy, np.nan)


# -------------------------------------------------------------------------- periodic


@cites("rubanova2019latent")
def periodic(
    n_series: int = 1000,
    n_times: int = 100,
    n_observed: int = 50,
    *,
    t_max: float = 5.0,
    frequency_range: tuple[float, float] = (0.4, 0.8),
    offset_std: float = 0.1,
    noise_std: float = 0.01,
    seed=0,
) -> xr.Dataset:
    """The toy periodic series of Rubanova, Chen & Duvenaud (2019), section 4.1.

    Each series is `y(t) = sin(2 pi f t) + z0` with its own frequency
    `f ~ U(frequency_range)` and offset `z0 ~ N(1, offset_std^2)` (amplitude 1), on one
    time grid shared by all series: `t = 0` and `n_times - 1` sorted uniform draws on
    `[0, t_max]`. Each series observes `n_observed` of the `n_times` points, chosen at
    random, with Gaussian noise of standard deviation `noise_std`.

    **Arguments:**

    - `n_series`, `n_times`, `n_observed`: sizes (paper: 1000, 100, 50).
    - `t_max`: end of the time interval (paper: 5).
    - `frequency_range`, `offset_std`: the random per-series parameters.
    - `noise_std`: observation noise (paper's code: `noise_weight = 0.01`).
    - `seed`: int, None or `numpy.random.Generator`.

    **Returns:** an `xarray.Dataset` with dims `(series, time)`: channel `y` (NaN where
    not observed), truth `y_true` (noise-free, at every grid point), and per-series
    truths `frequency` and `offset`.
    """
    n_series = _int("n_series", n_series, 1)
    n_times = _int("n_times", n_times, 2)
    n_observed = _int("n_observed", n_observed, 1, n_times)
    t_max = _float("t_max", t_max, positive=True)
    f_lo, f_hi = _range("frequency_range", frequency_range, positive=True)
    offset_std = _float("offset_std", offset_std, nonnegative=True)
    noise_std = _float("noise_std", noise_std, nonnegative=True)
    rng = _rng(seed)

    times = np.concatenate([[0.0], np.sort(rng.uniform(0.0, t_max, n_times - 1))])
    frequency = rng.uniform(f_lo, f_hi, n_series)
    offset = 1.0 + offset_std * rng.normal(size=n_series)
    truth = np.sin(2 * np.pi * frequency[:, None] * times[None, :]) + offset[:, None]
    y = _observe(rng, truth, n_observed, noise_std)

    dims = ("series", "time")
    return _dataset(
        {
            "y": (dims, y, {"long_name": "noisy observation", "role": "channel"}),
            "y_true": (
                dims,
                truth,
                {"long_name": "noise-free value sin(2 pi f t) + z0", "role": "truth"},
            ),
            "frequency": (
                "series",
                frequency,
                {"long_name": "frequency f", "units": "1/time", "role": "truth"},
            ),
            "offset": ("series", offset, {"long_name": "offset z0", "role": "truth"}),
        },
        time=_time_coord(times, True, "shared grid: 0 and sorted uniform draws"),
        n_series=n_series,
        channels=["y"],
        attrs={
            "title": "Periodic toy series (Rubanova et al. 2019)",
            "generator": "ctmodels.datasets.periodic",
            "noise_std": noise_std,
            "layout": f"shared time grid; each series observes {n_observed} of "
            f"{n_times} points",
        },
    )


# --------------------------------------------------------------------------- spirals


@cites("chen2018neural")
def spirals(
    n_series: int = 1000,
    n_times: int = 100,
    n_observed: int | None = None,
    *,
    n_total: int = 1000,
    t_max: float = 6 * np.pi,
    a: float = 0.0,
    b: float = 0.3,
    noise_std: float = 0.3,
    seed=0,
) -> xr.Dataset:
    """Two-dimensional spirals of the latent-ODE experiment of Chen et al. (2018),
    section 5.1 (`examples/latent_ode.py` of torchdiffeq).

    Two Archimedean spirals on `n_total` equally spaced parameter values
    `theta in [0, t_max]`: counter-clockwise `r = a + b theta` centred at `(5, 0)`,
    and clockwise `r = a + 50 b / (t_max + 1 - theta)` (with angle `t_max + 1 - theta`)
    centred at `(-5, 0)`. Each series picks a direction at random and a window of
    `n_times` consecutive points starting uniformly in `[n_times, n_total - n_times)`,
    observed with Gaussian noise `noise_std`; its times are the first `n_times` grid
    values (shared by all series). `n_observed < n_times` keeps only that many random
    points per series.

    **Returns:** an `xarray.Dataset` with dims `(series, time)`: channels `x`, `y`;
    truths `x_true`, `y_true` and `start` (the spiral parameter at the window's
    start); label `direction` (0 counter-clockwise, 1 clockwise).
    """
    n_series = _int("n_series", n_series, 1)
    n_times = _int("n_times", n_times, 2)
    n_observed = n_times if n_observed is None else n_observed
    n_observed = _int("n_observed", n_observed, 1, n_times)
    n_total = _int("n_total", n_total, 2 * n_times + 1)
    t_max = _float("t_max", t_max, positive=True)
    a = _float("a", a)
    b = _float("b", b)
    noise_std = _float("noise_std", noise_std, nonnegative=True)
    rng = _rng(seed)

    theta = np.linspace(0.0, t_max, n_total)
    z_cw = t_max + 1.0 - theta
    r_cw = a + b * 50.0 / z_cw
    cw = np.stack([r_cw * np.cos(z_cw) - 5.0, r_cw * np.sin(z_cw)], axis=-1)
    r_cc = a + b * theta
    cc = np.stack([r_cc * np.cos(theta) + 5.0, r_cc * np.sin(theta)], axis=-1)

    clockwise = rng.random(n_series) < 0.5
    start = rng.integers(n_times, n_total - n_times, size=n_series)
    window = start[:, None] + np.arange(n_times)[None, :]
    truth = np.where(clockwise[:, None, None], cw[window], cc[window])  # [S, T, 2]
    obs = _observe(rng, truth, n_observed, noise_std)

    dims = ("series", "time")
    data_vars = {}
    for i, name in enumerate(["x", "y"]):
        data_vars[name] = (
            dims,
            obs[..., i],
            {"long_name": f"noisy {name} coordinate", "role": "channel"},
        )
    for i, name in enumerate(["x", "y"]):
        data_vars[f"{name}_true"] = (
            dims,
            truth[..., i],
            {"long_name": f"noise-free {name} coordinate", "role": "truth"},
        )
    data_vars["start"] = (
        "series",
        theta[start],
        {
            "long_name": "spiral parameter theta at the window's first point",
            "role": "truth",
        },
    )
    data_vars["direction"] = (
        "series",
        clockwise.astype(np.int64),
        flag_attrs(
            ["counterclockwise", "clockwise"],
            long_name="direction of rotation",
            classes="counterclockwise clockwise",
            role="label",
        ),
    )
    return _dataset(
        data_vars,
        time=_time_coord(
            theta[:n_times],
            True,
            f"the first {n_times} of {n_total} equally spaced values on [0, {t_max:g}]",
        ),
        n_series=n_series,
        channels=["x", "y"],
        attrs={
            "title": "Bidirectional 2-D spirals (Chen et al. 2018)",
            "generator": "ctmodels.datasets.spirals",
            "noise_std": noise_std,
            "label": "direction",
            "layout": "shared time grid (window-relative)",
        },
    )


# -------------------------------------------------------------------- lotka_volterra

_RK4_MAX_STEP = 0.01


def _rk4_step(f, y, h):
    k1 = f(y)
    k2 = f(y + 0.5 * h * k1)
    k3 = f(y + 0.5 * h * k2)
    k4 = f(y + h * k3)
    return y + (h / 6.0) * (k1 + 2 * k2 + 2 * k3 + k4)


def _rk4_to_times(f, y0: np.ndarray, times: np.ndarray) -> np.ndarray:
    """Solve `dy/dt = f(y)` (autonomous, batched: `f` maps `[N, D]` to `[N, D]`) from
    `y(0) = y0` `[S, D]` to every `times[s, k] >= 0` `[S, T]`: classical RK4 on a
    uniform grid of steps <= `_RK4_MAX_STEP`, then one partial RK4 step from the grid
    point below each time. Returns `[S, T, D]`."""
    S, T = times.shape
    t_end = float(times.max())
    n = max(1, math.ceil(t_end / _RK4_MAX_STEP))
    h = t_end / n if t_end > 0 else _RK4_MAX_STEP
    states = np.empty((n + 1,) + y0.shape)
    states[0] = y = y0
    for i in range(n):
        states[i + 1] = y = _rk4_step(f, y, h)
    below = np.clip(np.floor(times / h).astype(np.int64), 0, n)
    rest = (times - below * h).reshape(S * T, 1)
    base = states[below, np.arange(S)[:, None]].reshape(S * T, -1)
    return _rk4_step(f, base, rest).reshape(S, T, -1)


@cites("lotka1925elements")
def lotka_volterra(
    n_series: int = 1000,
    n_times: int = 100,
    *,
    t_max: float = 15.0,
    alpha: float = 2 / 3,
    beta: float = 4 / 3,
    delta: float = 1.0,
    gamma: float = 1.0,
    initial_range: tuple[float, float] = (0.5, 1.5),
    noise_std: float = 0.05,
    p_missing: float = 0.0,
    regular: bool = False,
    seed=0,
) -> xr.Dataset:
    """Predator-prey (Lotka-Volterra) trajectories observed at irregular times.

    `dx/dt = alpha x - beta x y`, `dy/dt = delta x y - gamma y` (x prey, y predator),
    from initial states drawn uniformly in `initial_range` (both species), solved with
    RK4 (steps <= 0.01, error far below the noise). Each series has its own times, 0
    and `n_times - 1` sorted uniform draws on `[0, t_max]` (or, with `regular=True`, one
    shared equally spaced grid); observations add Gaussian noise `noise_std`, and each
    value is independently missing with probability `p_missing`.

    **Returns:** an `xarray.Dataset` with dims `(series, obs)` and a 2-D `time`
    (dims `(series, time)` and a 1-D `time` if `regular`): channels `prey`,
    `predator`; truths `prey_true`, `predator_true` and the initial states `prey0`,
    `predator0`. The parameters are in `attrs`.
    """
    n_series = _int("n_series", n_series, 1)
    n_times = _int("n_times", n_times, 2)
    t_max = _float("t_max", t_max, positive=True)
    params = {
        name: _float(name, value, positive=True)
        for name, value in dict(
            alpha=alpha, beta=beta, delta=delta, gamma=gamma
        ).items()
    }
    lo, hi = _range("initial_range", initial_range, positive=True)
    noise_std = _float("noise_std", noise_std, nonnegative=True)
    p_missing = _float("p_missing", p_missing, nonnegative=True, below=1.0)
    if not isinstance(regular, bool):
        raise ValueError(f"regular must be a bool, got {regular!r}.")
    rng = _rng(seed)

    if regular:
        grid = np.linspace(0.0, t_max, n_times)
        times = np.broadcast_to(grid, (n_series, n_times))
    else:
        times = _irregular_times(rng, n_series, n_times, t_max)
    y0 = rng.uniform(lo, hi, size=(n_series, 2))
    al, be, de, ga = (params[k] for k in ("alpha", "beta", "delta", "gamma"))

    def f(y):
        x, p = y[:, 0], y[:, 1]
        return np.stack([al * x - be * x * p, de * x * p - ga * p], axis=1)

    truth = _rk4_to_times(f, y0, times)  # [S, T, 2]
    obs = truth + noise_std * rng.normal(size=truth.shape)
    obs = np.where(rng.random(truth.shape) < p_missing, np.nan, obs)

    dims = ("series", "time") if regular else ("series", "obs")
    data_vars = {}
    for i, name in enumerate(["prey", "predator"]):
        data_vars[name] = (
            dims,
            obs[..., i],
            {"long_name": f"noisy {name} population", "role": "channel"},
        )
    for i, name in enumerate(["prey", "predator"]):
        data_vars[f"{name}_true"] = (
            dims,
            truth[..., i],
            {"long_name": f"noise-free {name} population", "role": "truth"},
        )
        data_vars[f"{name}0"] = (
            "series",
            y0[:, i],
            {"long_name": f"initial {name} population", "role": "truth"},
        )
    time = (
        _time_coord(grid, True, "equally spaced on [0, t_max]")
        if regular
        else _time_coord(times, False, "per series: 0 and sorted uniform draws")
    )
    return _dataset(
        data_vars,
        time=time,
        n_series=n_series,
        channels=["prey", "predator"],
        attrs={
            "title": "Lotka-Volterra predator-prey trajectories",
            "generator": "ctmodels.datasets.lotka_volterra",
            **params,
            "noise_std": noise_std,
            "p_missing": p_missing,
            "layout": "shared time grid" if regular else "per-series irregular times",
        },
    )


# ------------------------------------------------------------------- linear_gaussian


def oscillator_transition(
    dt, *, frequency: float, damping: float, process_std: float
) -> tuple[np.ndarray, np.ndarray]:
    """Exact transition of the latent SDE of `linear_gaussian` over time steps `dt`
    (array `[...]`): the mean map `A(dt) = exp(F dt)` `[..., 2, 2]` and the process
    noise covariance `Q(dt)` `[..., 2, 2]`, so that `x(t + dt) ~ N(A x(t), Q)`."""
    dt = np.asarray(dt, np.float64)
    omega = 2 * np.pi * frequency
    decay = np.exp(-damping * dt)
    c, s = np.cos(omega * dt), np.sin(omega * dt)
    A = decay[..., None, None] * np.stack(
        [np.stack([c, -s], -1), np.stack([s, c], -1)], -2
    )
    var = process_std**2 / (2 * damping) * (1 - np.exp(-2 * damping * dt))
    Q = var[..., None, None] * np.eye(2)
    return A, Q


def linear_gaussian(
    n_series: int = 200,
    n_times: int = 50,
    *,
    t_max: float = 10.0,
    frequency: float = 0.25,
    damping: float = 0.2,
    process_std: float = 0.5,
    observation_matrix=None,
    noise_std: float = 0.1,
    regular: bool = False,
    seed=0,
) -> xr.Dataset:
    """A continuous-time linear-Gaussian state-space model, sampled exactly.

    The latent state `x in R^2` is a stochastic damped oscillator,
    `dx = F x dt + process_std dW` with `F = [[-damping, -w], [w, -damping]]` and
    `w = 2 pi frequency`, started from its stationary law `N(0, P I)`,
    `P = process_std^2 / (2 damping)`. Between two times `dt` apart,
    `x' ~ N(A(dt) x, Q(dt))` with `A(dt) = exp(F dt)` (a rotation by `w dt` scaled by
    `exp(-damping dt)`) and `Q(dt) = P (1 - exp(-2 damping dt)) I`
    (`oscillator_transition`). Observations are `y = H x + noise_std * eps` with
    `H = observation_matrix` (`[K, 2]`, default `[[1, 0], [0, 1], [1, 1]]`). Times are
    per series, 0 and `n_times - 1` sorted uniform draws on `[0, t_max]` (or one shared
    equally spaced grid with `regular=True`).

    **Returns:** an `xarray.Dataset` with dims `(series, obs)` and a 2-D `time`
    (`(series, time)` if `regular`): channels `y1..yK`, latent states `x1`, `x2`
    (`role="truth"`). `attrs` hold `drift_matrix` (F, row-major), `observation_matrix`
    (H, row-major, shape in `observation_matrix_shape`), `process_std`, `noise_std`
    and `stationary_variance` (P).
    """
    n_series = _int("n_series", n_series, 1)
    n_times = _int("n_times", n_times, 2)
    t_max = _float("t_max", t_max, positive=True)
    frequency = _float("frequency", frequency, nonnegative=True)
    damping = _float("damping", damping, positive=True)
    process_std = _float("process_std", process_std, nonnegative=True)
    noise_std = _float("noise_std", noise_std, nonnegative=True)
    if observation_matrix is None:
        H = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    else:
        H = np.asarray(observation_matrix, dtype=np.float64)
        if H.ndim != 2 or H.shape[1] != 2 or H.shape[0] < 1:
            raise ValueError(
                "observation_matrix must have shape [K, 2] (K observed channels, 2 "
                f"latent dimensions), got shape {H.shape}."
            )
        if not np.all(np.isfinite(H)):
            raise ValueError("observation_matrix must be finite.")
    if not isinstance(regular, bool):
        raise ValueError(f"regular must be a bool, got {regular!r}.")
    rng = _rng(seed)

    if regular:
        grid = np.linspace(0.0, t_max, n_times)
        times = np.broadcast_to(grid, (n_series, n_times))
    else:
        times = _irregular_times(rng, n_series, n_times, t_max)
    stationary = process_std**2 / (2 * damping)
    A, Q = oscillator_transition(
        np.diff(times, axis=1),
        frequency=frequency,
        damping=damping,
        process_std=process_std,
    )
    x = np.empty((n_series, n_times, 2))
    x[:, 0] = math.sqrt(stationary) * rng.normal(size=(n_series, 2))
    for k in range(1, n_times):
        std = np.sqrt(Q[:, k - 1, 0, 0])[:, None]  # Q is isotropic
        mean = np.einsum("sij,sj->si", A[:, k - 1], x[:, k - 1])
        x[:, k] = mean + std * rng.normal(size=(n_series, 2))
    y = x @ H.T + noise_std * rng.normal(size=(n_series, n_times, H.shape[0]))

    dims = ("series", "time") if regular else ("series", "obs")
    channels = [f"y{i + 1}" for i in range(H.shape[0])]
    data_vars = {}
    for i, name in enumerate(channels):
        data_vars[name] = (
            dims,
            y[..., i],
            {
                "long_name": f"observation {i + 1}: H[{i}] . x + noise",
                "role": "channel",
            },
        )
    for i in range(2):
        data_vars[f"x{i + 1}"] = (
            dims,
            x[..., i],
            {"long_name": f"latent state {i + 1}", "role": "truth"},
        )
    omega = 2 * np.pi * frequency
    time = (
        _time_coord(grid, True, "equally spaced on [0, t_max]")
        if regular
        else _time_coord(times, False, "per series: 0 and sorted uniform draws")
    )
    return _dataset(
        data_vars,
        time=time,
        n_series=n_series,
        channels=channels,
        attrs={
            "title": "Linear-Gaussian state-space model (stochastic damped oscillator)",
            "generator": "ctmodels.datasets.linear_gaussian",
            "drift_matrix": np.array([-damping, -omega, omega, -damping]),
            "frequency": frequency,
            "damping": damping,
            "process_std": process_std,
            "stationary_variance": stationary,
            "observation_matrix": H.ravel(),
            "observation_matrix_shape": np.array(H.shape),
            "noise_std": noise_std,
            "layout": "shared time grid" if regular else "per-series irregular times",
        },
    )
