"""Normalisation (fitted on the training split only), splits by series, and mapping
batch predictions back onto a `TimeSeries` grid."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import numpy as np

from ._batch import Batch
from ._timeseries import TimeSeries


@dataclasses.dataclass(frozen=True)
class Normalizer:
    """Per-channel affine normalisation (optionally after a log transform) and a time
    scale, fitted on training data and stored with the model (`to_dict`/`from_dict`
    give plain JSON).

    `transform` maps data to model space: `z = (f(x) - mean) / std` with `f = log` for
    channels listed in `log` (else identity), and `t -> t / time_scale`. `inverse` maps
    a predicted mean and standard deviation back to the original units.
    """

    channels: tuple[str, ...]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    log: tuple[bool, ...]
    time_scale: float = 1.0

    @classmethod
    def fit(
        cls,
        ts: Any,
        *,
        log: Sequence[str] = (),
        time_scale: float | str = 1.0,
        chunk_size: int = 2048,
    ) -> Normalizer:
        """Fit on the observed values of `ts` (pass the training split only).

        **Arguments:**

        - `ts`: training series: a `TimeSeries`, or a lazy source
          (`from_xarray(..., lazy=True)`, or anything with `len()` and
          `source[indices] -> TimeSeries`), read in chunks of `chunk_size` series
          one after the other, so that memory holds one chunk, never the whole
          source (the statistics are merged chunk by chunk: the same as on the
          loaded data up to rounding).
        - `log`: channels to log-transform first (their observed values must be > 0).
        - `time_scale`: divide times by this; `"span"` uses the largest time span of
          a training series (so model time runs over about [0, 1]).
        - `chunk_size`: series per read of a lazy source.
        """
        channels = tuple(ts.channels)
        unknown = [c for c in log if c not in channels]
        if unknown:
            raise ValueError(
                f"log channels {unknown} are not channels of the data "
                f"({list(channels)})."
            )
        is_log = tuple(c in set(log) for c in channels)
        stats = _Moments(len(channels))
        span = 0.0
        for part in _chunks(ts, chunk_size):
            for c, name in enumerate(channels):
                x = part.values[..., c][part.mask[..., c]]
                if is_log[c] and x.size:
                    if (x <= 0).any():
                        raise ValueError(
                            f"Channel {name!r} has non-positive values "
                            f"(min {x.min():g}); it cannot be log-transformed."
                        )
                    x = np.log(x)
                stats.add(c, x)
            if time_scale == "span":
                t = part.nan_times()
                span = max(span, float(np.max(np.nanmax(t, 1) - np.nanmin(t, 1))))
        means, stds = [], []
        for c, name in enumerate(channels):
            if stats.n[c] == 0:
                raise ValueError(
                    f"Channel {name!r} has no observed value in the training data; "
                    "cannot fit its normalisation. Drop the channel."
                )
            sd = float(np.sqrt(stats.m2[c] / stats.n[c]))
            means.append(float(stats.mean[c]))
            stds.append(sd if sd > 0 and np.isfinite(sd) else 1.0)
        if time_scale == "span":
            time_scale = span if span > 0 else 1.0
        time_scale = float(time_scale)
        if not (time_scale > 0 and np.isfinite(time_scale)):
            raise ValueError(f"time_scale must be positive, got {time_scale}.")
        return cls(channels, tuple(means), tuple(stds), is_log, time_scale)

    def _check(self, ts: TimeSeries) -> None:
        if tuple(ts.channels) != self.channels:
            raise ValueError(
                f"The data's channels {list(ts.channels)} differ from the "
                f"normalisation's {list(self.channels)}."
            )

    def transform(self, ts: TimeSeries) -> TimeSeries:
        """Data units -> model units (values and times). The observed values of log
        channels must be > 0 (as in `fit`). A lazy source
        (`ctmodels.data.LazyTimeSeries`) gives a lazy source that transforms each
        batch as it is read (`LazyTimeSeries.map`): nothing is read now."""
        from ._xarray import LazyTimeSeries

        if isinstance(ts, LazyTimeSeries):
            self._check(ts)
            return ts.map(self.transform)
        self._check(ts)
        for c, lg in enumerate(self.log):
            bad = ts.mask[..., c] & ~(ts.values[..., c] > 0) if lg else None
            if lg and bad.any():
                b, t = (int(i) for i in np.argwhere(bad)[0])
                ids = getattr(getattr(ts, "meta", None), "series_ids", None)
                where = f"series {ids[b]!r}" if ids is not None else f"series {b}"
                raise ValueError(
                    f"Channel {self.channels[c]!r} is log-transformed (the "
                    f"normalisation was fitted so), so its observed values must be "
                    f"> 0, but {int(bad.sum())} are not (the first: "
                    f"{ts.values[b, t, c]:g} in {where} at position {t}). Correct "
                    "them, or mark them missing (NaN)."
                )
        x = ts.values.copy()
        for c, lg in enumerate(self.log):
            if lg:
                x[..., c] = np.log(np.where(ts.mask[..., c], x[..., c], 1.0))
        x = (x - np.asarray(self.mean)) / np.asarray(self.std)
        return dataclasses.replace(
            ts,
            values=np.where(ts.mask, x, 0.0),
            times=ts.times / self.time_scale,
        )

    def inverse(
        self, mean: np.ndarray, std: np.ndarray | None = None
    ) -> tuple[np.ndarray, np.ndarray | None]:
        """Model-space predictive mean/std `[..., C]` -> original units.

        Affine channels scale exactly. For log channels the prediction is treated as
        log-normal: mean `exp(mu + s^2/2)`, std `mean * sqrt(exp(s^2) - 1)`.
        """
        mu = np.asarray(mean) * np.asarray(self.std) + np.asarray(self.mean)
        sd = None if std is None else np.asarray(std) * np.asarray(self.std)
        lg = np.asarray(self.log)
        if lg.any():
            mu = np.array(mu, dtype=np.float64, copy=True)
            s2 = 0.0 if sd is None else sd[..., lg] ** 2
            m_log = np.exp(mu[..., lg] + s2 / 2)
            if sd is not None:
                sd = np.array(sd, dtype=np.float64, copy=True)
                sd[..., lg] = m_log * np.sqrt(np.expm1(s2))
            mu[..., lg] = m_log
        return mu, sd

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Normalizer:
        return cls(
            channels=tuple(d["channels"]),
            mean=tuple(float(x) for x in d["mean"]),
            std=tuple(float(x) for x in d["std"]),
            log=tuple(bool(x) for x in d["log"]),
            time_scale=float(d.get("time_scale", 1.0)),
        )


class _Moments:
    """Per-channel count, mean and sum of squared deviations, merged chunk by chunk
    (Chan, Golub & LeVeque's pairwise update: stable where sums of squares are
    not)."""

    def __init__(self, channels: int):
        self.n = np.zeros(channels, np.int64)
        self.mean = np.zeros(channels)
        self.m2 = np.zeros(channels)

    def add(self, c: int, x: np.ndarray) -> None:
        if x.size == 0:
            return
        n_b, mean_b = x.size, float(x.mean())
        m2_b = float(((x - mean_b) ** 2).sum())
        n_a = self.n[c]
        n = n_a + n_b
        delta = mean_b - self.mean[c]
        self.mean[c] += delta * n_b / n
        self.m2[c] += m2_b + delta**2 * n_a * n_b / n
        self.n[c] = n


def _chunks(ts: Any, size: int):
    """`ts` (a `TimeSeries` or a lazy source) in chunks of `size` series, in order;
    a `TimeSeries` in one piece (it is in memory already)."""
    if isinstance(ts, TimeSeries):
        yield ts
        return
    if size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {size}.")
    n = len(ts)
    if n == 0:
        raise ValueError("The training data have no series.")
    read = getattr(ts, "read", None)
    for start in range(0, n, size):
        stop = min(n, start + size)
        yield read(start, stop) if read else ts[np.arange(start, stop)]


def split_series(
    ts: TimeSeries,
    fractions: Sequence[float] = (0.8, 0.1, 0.1),
    *,
    seed: int = 0,
) -> tuple[TimeSeries, ...]:
    """Split by series (never within a series) into parts of the given fractions,
    after a seeded shuffle. Returns one `TimeSeries` per fraction."""
    fractions = np.asarray(fractions, float)
    if not (fractions > 0).all() or abs(fractions.sum() - 1) > 1e-9:  # NaN too
        raise ValueError(
            f"fractions must be positive and sum to 1, got {fractions.tolist()}."
        )
    n = len(ts)
    if n < len(fractions):
        raise ValueError(
            f"Cannot split {n} series into {len(fractions)} parts (train / "
            f"validation / test ...): it needs at least {len(fractions)} series."
        )
    order = np.random.default_rng(seed).permutation(n)
    bounds = np.round(np.cumsum(fractions) * n).astype(int)
    # every part gets at least one series: where rounding makes a part empty (5
    # series at 0.8/0.1/0.1 round to 4, 4, 5), it takes one from its neighbour
    k = len(bounds)
    for i in range(k):
        bounds[i] = max(bounds[i], (bounds[i - 1] if i else 0) + 1)
    bounds[-1] = n
    for i in range(k - 2, -1, -1):
        bounds[i] = min(bounds[i], bounds[i + 1] - 1)
    parts, start = [], 0
    for end in bounds:
        parts.append(ts[np.sort(order[start:end])])
        start = end
    return tuple(parts)


def unbatch(
    batch: Batch, prediction, out: np.ndarray | None = None, *, shape=None
) -> np.ndarray:
    """Scatter a per-batch prediction `[B, T_b, C]` back onto the source grid.

    `out` (`[S, T, C]`, NaN-initialised if None with the given `shape`) receives row
    `b` at series `batch.index[b]`, positions `batch.position[b]`; padding rows and
    positions are dropped. Returns `out`.
    """
    pred = np.asarray(prediction)
    if out is None:
        if shape is None:
            raise ValueError("unbatch needs `out` or `shape`.")
        out = np.full(shape, np.nan)
    index = np.asarray(batch.index)
    position = np.asarray(batch.position)
    b, t = np.nonzero((position >= 0) & (index >= 0)[:, None])
    out[index[b], position[b, t]] = pred[b, t]
    return out
