"""ctmodels.data: TimeSeries validation, xarray/pandas round trips, batching, tasks,
normalisation, splits and lazy (dask/netCDF) reading."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pandas as pd
import pytest
import xarray as xr
from hypothesis import given, settings, strategies as st

import ctmodels.data as cd
import ctmodels.datasets as D

# --------------------------------------------------------------------------- helpers


def ragged_dataset(rng, n_series=4, n_obs=6, n_channels=2, missing=0.3, shared=False):
    """A random dataset in from_xarray's default layout (NaN-padded 2-D times)."""
    lengths = rng.integers(1, n_obs + 1, size=n_series)
    times = np.full((n_series, n_obs), np.nan)
    values = np.full((n_series, n_obs, n_channels), np.nan)
    for s, n in enumerate(lengths):
        times[s, :n] = np.sort(rng.choice(1000, size=n, replace=False)) / 10.0
        v = rng.normal(size=(n, n_channels))
        v[rng.random((n, n_channels)) < missing] = np.nan
        v[0, 0] = rng.normal()  # at least one observation per series
        values[s, :n] = v
    data_vars = {
        f"x{c}": (("series", "obs"), values[..., c], {"units": "m", "role": "channel"})
        for c in range(n_channels)
    }
    data_vars["age"] = ("series", rng.normal(size=n_series), {"role": "static"})
    return xr.Dataset(
        data_vars,
        coords={
            "series": ("series", np.arange(100, 100 + n_series)),
            "time": (("series", "obs"), times, {"units": "days"}),
        },
        attrs={"title": "random"},
    )


# ------------------------------------------------------------------- round trips


def test_pbcseq_round_trip_is_identical():
    ds = D.load("pbcseq")
    ts = cd.from_xarray(ds)
    assert ts.channels == (
        "bili",
        "chol",
        "albumin",
        "alk_phos",
        "ast",
        "platelet",
        "protime",
    )
    assert ts.meta.static_names == ("age", "sex", "trt")
    back = cd.to_xarray(ts)
    ref = ds[list(back.data_vars)].drop_vars(
        [c for c in ds.coords if c not in back.coords]
    )
    xr.testing.assert_identical(back, ref)
    # NaN <-> mask exactly
    np.testing.assert_array_equal(ts.mask[..., 0], ds["bili"].notnull().values)
    sub = ts[np.array([5, 2, 7])]
    xr.testing.assert_identical(cd.to_xarray(sub), ref.isel(series=[5, 2, 7]))


def test_datetime_times_round_trip_and_units():
    t0 = np.datetime64("2020-01-01T00:00", "ns")
    times = np.array(
        [
            [t0, t0 + np.timedelta64(36, "h"), np.datetime64("NaT")],
            [
                t0 + np.timedelta64(1, "D"),
                t0 + np.timedelta64(3, "D"),
                t0 + np.timedelta64(7, "D"),
            ],
        ],
        dtype="datetime64[ns]",
    )
    ds = xr.Dataset(
        {"y": (("series", "obs"), [[1.0, np.nan, np.nan], [2.0, 3.0, 4.0]])},
        coords={"time": (("series", "obs"), times)},
    )
    ts = cd.from_xarray(ds, time_units="hours")
    assert ts.meta.time_kind == "datetime" and ts.meta.time_units == "hours"
    assert ts.meta.time_origin == t0
    np.testing.assert_allclose(ts.nan_times()[0, :2], [0.0, 36.0])
    np.testing.assert_allclose(ts.nan_times()[1], [24.0, 72.0, 168.0])
    # the position with a time but no value is kept as a position to predict
    assert ts.time_mask[0, 1] and not ts.mask[0, 1, 0]
    xr.testing.assert_identical(
        cd.to_xarray(ts), ds.assign_coords(series=[0, 1]).drop_vars("series")
    )


def test_shared_time_dimension_round_trip():
    time = pd.date_range("2021-01-01", periods=5, freq="7D").values
    y = np.array([[1.0, np.nan, 3.0, 4.0, np.nan], [np.nan, 2.0, 2.5, np.nan, 1.0]])
    ds = xr.Dataset(
        {"co2": (("series", "time"), y, {"units": "ppm"})},
        coords={"series": ["a", "b"], "time": time},
    )
    ts = cd.from_xarray(ds)
    assert ts.meta.shared_time
    np.testing.assert_allclose(ts.times[1], [0, 7, 14, 21, 28])
    xr.testing.assert_identical(cd.to_xarray(ts), ds)


def test_single_series_without_series_dim():
    ds = xr.Dataset(
        {"y": ("time", [1.0, np.nan, 2.0])},
        coords={"time": ("time", [0.0, 0.5, 2.0])},
    )
    ts = cd.from_xarray(ds)
    assert ts.values.shape == (1, 3, 1)
    xr.testing.assert_identical(cd.to_xarray(ts), ds)


def test_timedelta_times():
    ds = xr.Dataset(
        {"y": (("series", "time"), [[1.0, 2.0]])},
        coords={"time": np.array([0, 90], "timedelta64[m]").astype("timedelta64[ns]")},
    )
    ts = cd.from_xarray(ds, time_units="hours")
    np.testing.assert_allclose(ts.times[0], [0.0, 1.5])
    xr.testing.assert_identical(
        cd.to_xarray(ts), ds.drop_vars([]).assign_coords(series=[0]).drop_vars("series")
    )


@settings(max_examples=25, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    n_series=st.integers(1, 6),
    n_obs=st.integers(1, 7),
    n_channels=st.integers(1, 3),
    missing=st.floats(0.0, 0.9),
)
def test_property_ragged_round_trip_and_batches(
    seed, n_series, n_obs, n_channels, missing
):
    rng = np.random.default_rng(seed)
    ds = ragged_dataset(rng, n_series, n_obs, n_channels, missing)
    ts = cd.from_xarray(ds)
    xr.testing.assert_identical(cd.to_xarray(ts), ds)
    for layout in ("padded", "union"):
        out = None
        for batch in cd.batches(ts, 4, layout=layout, key=jax.random.key(seed % 7)):
            assert batch.values.shape[0] == 4
            assert batch.times.shape[1] == cd.bucket_length(batch.times.shape[1])
            assert bool(jnp.all(jnp.diff(batch.times, axis=1) >= 0))
            # union layout: every row has the same grid
            if layout == "union":
                assert bool(jnp.all(batch.times == batch.times[:1]))
            vals = np.where(np.asarray(batch.mask), np.asarray(batch.values), np.nan)
            out = cd.unbatch(batch, vals, out, shape=ts.values.shape)
            tt = cd.unbatch(
                batch,
                np.asarray(batch.times)[..., None],
                shape=ts.values.shape[:2] + (1,),
            )
            got = tt[..., 0][ts.time_mask & ~np.isnan(tt[..., 0])]
            np.testing.assert_allclose(
                got, ts.times[ts.time_mask & ~np.isnan(tt[..., 0])], rtol=1e-6
            )
        np.testing.assert_allclose(out, ts.nan_values(), rtol=1e-6)


def test_from_pandas_long_and_wide_round_trip():
    long = pd.DataFrame(
        {
            "pid": [2, 2, 2, 1, 1, 1],
            "t": [0.0, 0.0, 1.5, 3.0, 0.5, 0.5],
            "var": ["hr", "temp", "hr", "hr", "hr", "temp"],
            "val": [80.0, 37.0, 85.0, 70.0, 72.0, 36.5],
        }
    )
    ts = cd.from_pandas(long, id="pid", time="t", variable="var", value="val")
    assert ts.channels == ("hr", "temp")
    ds = cd.to_xarray(ts)
    np.testing.assert_array_equal(ds["series"].values, [1, 2])
    back = ds.to_dataframe().reset_index()
    back = back.melt(
        id_vars=["series", "time"],
        value_vars=["hr", "temp"],
        var_name="var",
        value_name="val",
    ).dropna(subset=["val"])
    merged = long.merge(
        back, left_on=["pid", "t", "var"], right_on=["series", "time", "var"]
    )
    assert len(merged) == len(long)
    np.testing.assert_array_equal(merged["val_x"], merged["val_y"])
    wide = long.pivot(index=["pid", "t"], columns="var", values="val").reset_index()
    wide["group"] = wide["pid"].map({1: "a", 2: "b"})
    ts2 = cd.from_pandas(wide, id="pid", time="t", labels="group")
    np.testing.assert_array_equal(ts2.nan_values(), ts.nan_values())
    np.testing.assert_array_equal(ts2.labels, [0, 1])
    assert ts2.meta.label_classes == ("a", "b")


# ------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "times, values, match",
    [
        ([[0.0, 2.0, 1.0]], [[1.0, 1.0, 1.0]], "not sorted in series 0"),
        ([[0.0, 1.0, 1.0]], [[1.0, 1.0, 1.0]], "duplicate time 1.0 in series 0"),
        ([[0.0, np.nan, 1.0]], [[1.0, 2.0, 1.0]], "observed value at a NaN time"),
        ([[0.0, np.inf]], [[1.0, 1.0]], "infinite time"),
        ([[0.0, 1.0]], [[np.nan, np.nan]], "series 0 has no observed value"),
        ([[0.0, 1.0]], [[1.0, 1.0, 1.0]], "times must be"),
        ([[0.0, 1.0]], [["a", "b"]], "must be numeric"),
        ([[0.0, 1.0]], [[1.0, np.inf]], "infinite value"),
    ],
)
def test_bad_timeseries_input(times, values, match):
    with pytest.raises(ValueError, match=match):
        cd.TimeSeries.from_arrays(np.asarray(times), np.asarray(values))


@pytest.mark.parametrize(
    "times_b, values_b, match",
    [
        ([0.0, -1.0], [1.0, 1.0], r"sorted in series 'b' \(index 1\): position 1"),
        ([1.0, 1.0], [1.0, 1.0], r"in series 'b' \(index 1\) at position 1"),
        ([0.0, 1.0], [np.inf, 1.0], r"'b' \(index 1\), position 0, channel 'y'"),
        ([0.0, 1.0], [np.nan, np.nan], r"series 'b' \(index 1\) has no observed"),
    ],
)
def test_bad_input_names_the_series_by_id(times_b, values_b, match):
    # the ids are what a user finds in the data; positions alone (series 1) are not
    times = np.asarray([[0.0, 1.0], times_b])
    values = np.asarray([[1.0, 1.0], values_b])
    with pytest.raises(ValueError, match=match):
        cd.TimeSeries.from_arrays(times, values, channels=["y"], series_ids=["a", "b"])


@pytest.mark.parametrize("layout", ["padded", "union"])
def test_times_that_float32_cannot_tell_apart_are_refused(layout):
    # Unix seconds 30 s apart: float32 resolves ~128 s there, so a series' times
    # would collapse onto a few values (oracle: the float64 times are distinct)
    t = 1.6e9 + np.cumsum(np.full((3, 5), 30.0), axis=1) + np.arange(3)[:, None]
    ts = cd.TimeSeries.from_arrays(t, np.ones((3, 5)))
    assert len(np.unique(t[0].astype(np.float32))) < 5
    f32 = dict(layout=layout, dtype=np.float32)  # (another test may enable x64)
    with pytest.raises(ValueError, match="become equal in float32.*Subtract an origin"):
        cd.make_batch(ts, **f32)
    shifted = cd.TimeSeries.from_arrays(t - t.min(), np.ones((3, 5)))
    b = cd.make_batch(shifted, **f32)
    own = np.asarray(b.times)[0][np.asarray(b.time_mask)[0]]
    np.testing.assert_allclose(own, (t - t.min())[0])
    # different series' times that merge in float32 are harmless: accepted
    near = cd.TimeSeries.from_arrays(np.array([[0.3, 1.0], [0.1 + 0.2, 2.0]]),
                                     np.ones((2, 2)))  # fmt: skip
    cd.make_batch(near, **f32)


def test_series_ids_in_messages_are_positional():
    # a pandas Series of ids is read by position, whatever its index
    ids = pd.Series(["a", "b", "c"], index=[2, 0, 1])
    values = np.ones((3, 2))
    values[1, 0] = np.inf
    with pytest.raises(ValueError, match=r"series 'b' \(index 1\)"):
        cd.TimeSeries.from_arrays(np.zeros((3, 2)) + [0.0, 1.0], values, series_ids=ids)


def test_from_pandas_mistakes_are_named():
    """Missing or mixed ids, timezone-aware or text times, a misspelt long-format
    channel: each a ValueError saying what to do (they were raw TypeErrors, a series
    called nan, or a silently all-NaN channel). Non-string column labels work."""
    base = pd.DataFrame({"id": [1, 1, 2], "time": [0.0, 1.0, 0.0], "x": [1.0, 2, 3]})
    cases = [
        (base.assign(id=[1.0, np.nan, 2.0]), "missing id \\(row 1\\)"),
        (base.assign(id=["a", None, "b"]), "missing id \\(row 1\\)"),
        (base.assign(id=[1, "a", 2]), "mixes kinds of ids"),
        (base.assign(time=pd.to_datetime([0, 1, 0], unit="D", utc=True)),
         "timezone-aware.*tz_localize\\(None\\)"),
        (base.assign(time=["2020-01-01", "2020-01-02", "2020-01-01"]),
         "pd.to_datetime"),
    ]  # fmt: skip
    for df, match in cases:
        with pytest.raises(ValueError, match=match):
            cd.from_pandas(df, id="id", time="time")
    long = pd.DataFrame({"id": [1, 1], "time": [0.0, 1.0], "var": ["hr", "bp"],
                         "val": [60.0, 120.0]})  # fmt: skip
    with pytest.raises(ValueError, match=r"Channels \['BP'\] never occur in column"):
        cd.from_pandas(long, id="id", time="time", variable="var", value="val",
                       channels=["hr", "BP"])  # fmt: skip
    for col, match in (([40.0, 41.0], "not constant within series 1"),
                       (["m", "m"], "must be numeric.*cat.codes")):  # fmt: skip
        with pytest.raises(ValueError, match=match):
            cd.from_pandas(long.assign(age=col), id="id", time="time",
                           variable="var", value="val", static=["age"])  # fmt: skip
    coded = pd.DataFrame({"id": [0, 0], "time": [0.0, 1.0], 5: [1.0, 2.0]})
    ts = cd.from_pandas(coded, id="id", time="time")
    assert ts.channels == ("5",)
    np.testing.assert_array_equal(ts.values[0, :, 0], [1.0, 2.0])


def test_bad_xarray_and_pandas_input():
    ds = ragged_dataset(np.random.default_rng(0))
    with pytest.raises(ValueError, match="no time variable or coordinate 'when'"):
        cd.from_xarray(ds, time="when")
    with pytest.raises(ValueError, match="Variable 'nope' is not in the dataset"):
        cd.from_xarray(ds, variables=["nope"])
    with pytest.raises(ValueError, match="expects an xarray.Dataset"):
        cd.from_xarray(ds["x0"])
    bad = ds.copy()
    bad["time"] = bad["time"].copy(data=bad["time"].values[:, ::-1])
    with pytest.raises(ValueError, match="not sorted|observed value at a NaN time"):
        cd.from_xarray(bad)
    df = pd.DataFrame({"id": [1, 1], "t": [0.0, 0.0], "v": ["a", "a"], "x": [1.0, 2.0]})
    with pytest.raises(ValueError, match="Duplicate observation: id=1, time=0.0"):
        cd.from_pandas(df, id="id", time="t", variable="v", value="x")
    with pytest.raises(ValueError, match="Duplicate row"):
        cd.from_pandas(df, id="id", time="t")
    with pytest.raises(
        ValueError, match=r"Columns \['when'\] are not in the DataFrame"
    ):
        cd.from_pandas(df, id="id", time="when")
    with pytest.raises(ValueError, match="empty"):
        cd.from_pandas(df.iloc[:0], id="id", time="t")


# ----------------------------------------------------------------------- batching


def small_ts():
    return cd.from_xarray(
        ragged_dataset(np.random.default_rng(3), n_series=11, n_obs=9)
    )


def test_batches_cover_every_series_once_and_shuffle_is_keyed():
    ts = small_ts()
    seen = []
    for batch in cd.batches(ts, 4, key=jax.random.key(1)):
        idx = np.asarray(batch.index)
        w = np.asarray(batch.weight)
        assert ((idx >= 0) == (w > 0)).all()
        seen += list(idx[idx >= 0])
        # each row holds that series' own data
        for b, s in enumerate(idx):
            if s >= 0:
                n = ts.lengths[s]
                np.testing.assert_allclose(
                    np.asarray(batch.times[b, :n]),
                    ts.nan_times()[s][ts.time_mask[s]],
                    rtol=1e-6,
                )
    assert sorted(seen) == list(range(len(ts)))
    order = lambda k: np.concatenate(
        [np.asarray(b.index) for b in cd.batches(ts, 4, key=k)]
    )
    np.testing.assert_array_equal(order(jax.random.key(1)), order(jax.random.key(1)))
    assert not np.array_equal(order(jax.random.key(1)), order(jax.random.key(2)))
    assert cd.num_batches(11, 4) == 3 and cd.num_batches(11, 4, drop_last=True) == 2


def test_bucketed_shapes_compile_once():
    ts = small_ts()
    traces = []

    @jax.jit
    def f(batch):
        traces.append(1)
        return jnp.sum(jnp.where(batch.mask, batch.values, 0.0))

    shapes = set()
    for batch in cd.batches(ts, 4, key=jax.random.key(0), layout="padded"):
        shapes.add(batch.values.shape)
        f(batch)
    assert len(traces) == len(shapes) == 1
    assert cd.bucket_length(9) == 16 and cd.bucket_length(3) == 8
    assert cd.bucket_length(130, 64) == 192 and cd.bucket_length(5, None) == 5
    with pytest.raises(ValueError, match="'auto' is fit's option"):
        cd.bucket_length(5, "auto")


def test_min_times_pads_the_time_dimension_only():
    ts = small_ts()
    for layout in ("padded", "union"):
        ref = cd.make_batch(ts[np.arange(4)], layout=layout, batch_size=5)
        T = ref.times.shape[1]
        got = cd.make_batch(
            ts[np.arange(4)], layout=layout, batch_size=5, min_times=T + 1
        )
        # raised to T + 1, then rounded to the next power of two
        assert got.times.shape[1] == cd.bucket_length(T + 1) == 2 * T
        for name in ("times", "values", "mask", "time_mask", "position"):
            np.testing.assert_array_equal(
                np.asarray(getattr(got, name))[:, :T], np.asarray(getattr(ref, name))
            )
        extra = slice(T, None)
        assert not np.asarray(got.time_mask)[:, extra].any()
        assert not np.asarray(got.mask)[:, extra].any()
        assert (np.asarray(got.position)[:, extra] == -1).all()
        # padding repeats each row's last time: times stay non-decreasing
        assert (np.diff(np.asarray(got.times), axis=1) >= 0).all()
        np.testing.assert_array_equal(got.weight, ref.weight)
        np.testing.assert_array_equal(got.index, ref.index)
        # a floor below the batch's own length changes nothing
        low = cd.make_batch(ts[np.arange(4)], layout=layout, batch_size=5, min_times=3)
        assert low.times.shape == ref.times.shape
    shapes = {b.times.shape for b in cd.batches(ts, 4, layout="padded", min_times=20)}
    assert shapes == {(4, 32)}
    for bad in (-1, 2.5, True):
        with pytest.raises(ValueError, match="min_times must be an int >= 0"):
            cd.make_batch(ts, min_times=bad)


def test_tasks_partition_observations():
    ts = small_ts()
    batch = cd.make_batch(ts, layout="union")
    interp = cd.interpolation_task(batch, key=jax.random.key(0), fraction=0.5)
    m, c, t = map(np.asarray, (batch.mask, interp.mask, interp.target_mask))
    assert not (c & t).any() and ((c | t) == m).all()
    assert 0.35 < t.sum() / m.sum() < 0.65
    assert c.reshape(len(ts), -1).any(axis=1).all()  # context never empty
    extra = cd.extrapolation_task(batch, split=0.5)
    c, t = np.asarray(extra.mask), np.asarray(extra.target_mask)
    assert not (c & t).any() and ((c | t) == m).all()
    times = np.asarray(batch.times)
    for s in range(len(ts)):
        obs = m[s].any(-1)
        cut = times[s][obs].min() + 0.5 * (times[s][obs].max() - times[s][obs].min())
        np.testing.assert_array_equal(c[s].any(-1), obs & (times[s] <= cut))


# ------------------------------------------------------------- normalise / split


def test_normalizer_fits_train_only_and_inverts():
    ts = small_ts()
    train, valid = cd.split_series(ts, (0.7, 0.3), seed=0)
    norm = cd.Normalizer.fit(train, time_scale="span")
    x0 = train.values[..., 0][train.mask[..., 0]]
    assert norm.mean[0] == pytest.approx(x0.mean()) and norm.std[0] == pytest.approx(
        x0.std()
    )
    z = norm.transform(valid)
    mu, sd = norm.inverse(z.values, np.ones_like(z.values))
    np.testing.assert_allclose(np.where(valid.mask, mu, 0), valid.values, atol=1e-12)
    np.testing.assert_allclose(sd[..., 1], norm.std[1])
    assert cd.Normalizer.from_dict(norm.to_dict()) == norm
    # log channel: exp(N(mu, s^2)) moments
    pos = valid.with_values(np.exp(valid.values))
    lnorm = cd.Normalizer.fit(pos, log=["x0"])
    m, s = lnorm.inverse(np.zeros((1, 2)), np.full((1, 2), 0.5))
    sigma = 0.5 * lnorm.std[0]
    expect = np.exp(lnorm.mean[0] + sigma**2 / 2)
    assert m[0, 0] == pytest.approx(expect)
    assert s[0, 0] == pytest.approx(expect * np.sqrt(np.expm1(sigma**2)))
    with pytest.raises(ValueError, match="non-positive"):
        cd.Normalizer.fit(valid, log=["x0"])


def test_split_series_partitions():
    ts = small_ts()
    parts = cd.split_series(ts, (0.6, 0.2, 0.2), seed=3)
    ids = np.concatenate([p.meta.series_ids for p in parts])
    assert sorted(ids) == sorted(ts.meta.series_ids)
    assert [len(p) for p in parts] == [7, 2, 2]
    with pytest.raises(ValueError, match=r"sum to 1, got \[0.5, 0.2\]"):
        cd.split_series(ts, (0.5, 0.2))
    with pytest.raises(ValueError, match="positive"):
        cd.split_series(ts, (np.nan, 0.5, 0.5))


def test_split_series_never_leaves_a_part_empty():
    # 5 series at 0.8/0.1/0.1 round to bounds 4, 4, 5: the validation part was
    # empty and `ctmodels fit` failed with "Selecting no series ..."
    big = cd.from_xarray(ragged_dataset(np.random.default_rng(4), n_series=30, n_obs=4))
    for fractions in [(0.8, 0.1, 0.1), (0.6, 0.2, 0.2), (0.5, 0.5), (0.9, 0.05, 0.05)]:
        for n in range(len(fractions), 31):
            ts = big[np.arange(n)]
            parts = cd.split_series(ts, fractions, seed=n)
            sizes = [len(p) for p in parts]
            assert min(sizes) >= 1 and sum(sizes) == n, (fractions, n, sizes)
            ids = np.concatenate([p.meta.series_ids for p in parts])
            assert sorted(ids) == sorted(ts.meta.series_ids)
            # where plain rounding already gave every part a series, it is kept
            bounds = np.round(np.cumsum(fractions) * n).astype(int)
            plain = np.diff(np.concatenate([[0], bounds]))
            if plain.min() >= 1:
                assert sizes == list(plain), (fractions, n, sizes)
    assert [len(p) for p in cd.split_series(big[np.arange(5)], (0.8, 0.1, 0.1))] == [
        3, 1, 1,
    ]  # fmt: skip


# ------------------------------------------------------------------------ lazy


def _spied_pbcseq_file(tmp_path, monkeypatch):
    """pbcseq written to netCDF, and a list that records each `(variable, key)` the
    netCDF backend reads from it."""
    import xarray.backends.netCDF4_ as nc4

    path = tmp_path / "pbc.nc"
    D.load("pbcseq").to_netcdf(path)
    reads = []
    original = nc4.NetCDF4ArrayWrapper._getitem

    def spy(self, key):
        reads.append((self.variable_name, key))
        return original(self, key)

    monkeypatch.setattr(nc4.NetCDF4ArrayWrapper, "_getitem", spy)
    return path, reads


def _rows_read(reads, variables=("bili",)) -> set[int]:
    """The series (of pbcseq's 312) that the recorded reads of `variables` touched."""
    rows = set()
    for name, key in reads:
        if name in variables:
            rows |= set(np.arange(312)[key[0]].tolist())
    return rows


def test_lazy_netcdf_reads_only_requested_batches(tmp_path, monkeypatch):
    pytest.importorskip("dask")
    path, reads = _spied_pbcseq_file(tmp_path, monkeypatch)
    with xr.open_dataset(path, chunks={"series": 8}) as ds:
        src = cd.from_xarray(ds, block_size=8)
        assert isinstance(src, cd.LazyTimeSeries) and len(src) == 312
        reads.clear()
        batch_iter = cd.batches(src, 8, layout="padded", prefetch=0)
        batch = next(batch_iter)
        series_read = _rows_read(reads, ("bili", "albumin"))
        assert series_read == set(range(8)), series_read
        eager = cd.from_xarray(D.load("pbcseq"))
        ref = cd.make_batch(eager[np.arange(8)], layout="padded", batch_size=8)
        np.testing.assert_array_equal(np.asarray(batch.values), np.asarray(ref.values))


def test_block_shuffled_prefetched_epoch_reads_each_block_once(tmp_path, monkeypatch):
    """An epoch of block-shuffled batches from a lazy file, read ahead by a thread:
    the same batches as in memory, every series once, every block read once (also
    when the short last block shifts batches off the block boundaries)."""
    pytest.importorskip("dask")
    path, reads = _spied_pbcseq_file(tmp_path, monkeypatch)
    eager = cd.from_xarray(D.load("pbcseq"))
    key = jax.random.key(3)
    order = cd.shuffle_order(key, 312, shuffle="block", block_size=40)
    assert sorted(order.tolist()) == list(range(312))
    # blocks stay together: each aligned block of 40 is one contiguous run
    runs = np.flatnonzero(np.diff(order // 40) != 0).size + 1
    assert runs == 8
    with xr.open_dataset(path, chunks={"series": 40}) as ds:
        src = cd.from_xarray(ds, block_size=40)
        reads.clear()
        got = list(cd.batches(src, 16, key=key, shuffle="block", layout="padded"))
        bili_reads = [key for name, key in reads if name == "bili"]
        assert len(bili_reads) == 8  # one contiguous read per block (312 = 7*40 + 32)
        want = list(
            cd.batches(
                eager, 16, key=key, shuffle="block", block_size=40, layout="padded"
            )
        )
        assert len(got) == len(want) == 20
        for g, w in zip(got, want, strict=True):
            np.testing.assert_array_equal(np.asarray(g.index), np.asarray(w.index))
            np.testing.assert_array_equal(np.asarray(g.values), np.asarray(w.values))
            np.testing.assert_array_equal(np.asarray(g.mask), np.asarray(w.mask))
        # prefetch is only a schedule: the same batches without the thread
        again = list(
            cd.batches(src, 16, key=key, shuffle="block", layout="padded", prefetch=0)
        )
        for g, w in zip(got, again, strict=True):
            np.testing.assert_array_equal(np.asarray(g.values), np.asarray(w.values))


def test_lazy_block_cache_reads_each_block_once(tmp_path, monkeypatch):
    path, reads = _spied_pbcseq_file(tmp_path, monkeypatch)
    eager = cd.from_xarray(D.load("pbcseq"))
    with xr.open_dataset(path) as ds:
        src = cd.from_xarray(ds, lazy=True, block_size=16)
        reads.clear()
        a = src[np.array([3, 1, 9])]
        n_first = len(reads)
        b = src[np.array([15, 0])]  # same block: served from memory
        assert n_first > 0 and len(reads) == n_first
        c = src[np.array([16, 20])]  # next block: read again
        assert len(reads) > n_first
        for got, idx in ((a, [3, 1, 9]), (b, [15, 0]), (c, [16, 20])):
            np.testing.assert_array_equal(got.nan_values(), eager[idx].nan_values())
            np.testing.assert_array_equal(
                got.meta.series_ids, eager.meta.series_ids[idx]
            )
        # a request over two blocks reads those blocks (block 0 is still cached),
        # not the range between
        reads.clear()
        d = src[np.array([300, 0])]
        assert _rows_read(reads) == set(range(288, 304))
        np.testing.assert_array_equal(d.nan_values(), eager[[300, 0]].nan_values())
        np.testing.assert_array_equal(
            d.meta.series_ids, eager.meta.series_ids[[300, 0]]
        )
        # a scattered request (over more blocks) reads just the requested series
        reads.clear()
        e = src[np.array([0, 150, 300])]
        assert _rows_read(reads) == {0, 150, 300}
        np.testing.assert_array_equal(e.nan_values(), eager[[0, 150, 300]].nan_values())
