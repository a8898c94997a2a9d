"""Sharded inference (`devices=`): `ctmodels.models.predict` / `calibrate_spread`,
FFJORD's `log_prob` / `sample`, and `ctmodels predict|evaluate|sample --devices N`,
against the single-device path.

As in `tests/test_sharding.py`, JAX fixes its device count when it starts, so every
check runs in one subprocess with `XLA_FLAGS=--xla_force_host_platform_device_count=4`
(four CPU devices sharing this machine's cores) that prints one JSON line; the tests
below assert on it. The oracle is the same call without `devices`: split over 2 or 4
devices, the inputs' leading axis is partitioned by XLA and the results must agree up
to the order of floating-point sums (float32). A leading axis that does not divide
is padded: a batch size rounds up to a multiple of the device count (then the oracle
is one device with that batch size), FFJORD's points are padded with copies of the
last one, which join the batch's shared step-size control (then the oracle agrees to
the solver's tolerance).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

DEVICES = 4

SCRIPT = textwrap.dedent(
    r"""
    import contextlib, io, json, pathlib, tempfile
    import jax, jax.numpy as jnp, numpy as np
    import ctmodels.data as cd
    from ctmodels.models import FFJORD, SVAE, LatentODE, calibrate_spread, predict

    assert jax.local_device_count() == 4, jax.devices()
    out = {}
    rng = np.random.default_rng(0)

    def series(n, t=6):
        times = np.sort(rng.uniform(0, 2, size=(n, t)), axis=1)
        values = np.sin(times)[..., None] + 0.05 * rng.normal(size=(n, t, 1))
        values[rng.uniform(size=values.shape) < 0.2] = np.nan
        values[:, 0, :] = 0.0
        return cd.TimeSeries.from_arrays(times, values)

    TS = series(10)  # batches of 4: the last one padded (2 series)

    def rel(a, b):
        a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
        assert a.shape == b.shape, (a.shape, b.shape)
        if not np.array_equal(np.isnan(a), np.isnan(b)):
            return float("inf")
        a, b = a[~np.isnan(b)], b[~np.isnan(b)]
        return float(np.max(np.abs(a - b) / (1e-3 + np.abs(b)), initial=0.0))

    def rel_ds(a, b):
        return max(rel(a[v].values, b[v].values) for v in b.data_vars)

    def on_default(x):
        return sorted(str(d) for d in x.devices()) == [str(jax.devices()[0])]

    KEY = jax.random.key(3)
    Q = np.linspace(0.0, 2.5, 5)
    QS = np.sort(rng.uniform(0.0, 2.5, size=(10, 5)), axis=1)
    models = {
        "latent_ode": LatentODE(1, latent_size=2, encoder="rnn", encoder_size=8,
                                units=16, depth=1, key=jax.random.key(0)),
        "svae": SVAE(1, latent_size=2, units=8, key=jax.random.key(0)),
    }
    for name, model in models.items():  # each variant below is a compilation
        pred = lambda **kw: predict(model, TS, key=KEY, n_samples=3,
                                    **{"batch_size": 4, **kw})
        one = pred()
        r = {"d4": rel_ds(pred(devices=4), one)}
        if name == "latent_ode":
            r["times"] = rel_ds(pred(times=Q, devices=4), pred(times=Q))
            r["times_per_series"] = rel_ds(pred(times=QS, devices=2), pred(times=QS))
        else:  # the SVAE compiles faster
            r["d2"] = rel_ds(pred(devices=2), one)
            # a batch size that does not divide: rounded up to a multiple (8)
            six = pred(batch_size=6, devices=4)
            r["round_up"] = rel_ds(six, pred(batch_size=8))
            r["round_up_differs_from_4"] = rel_ds(six, one)
        out[name] = r

    cal = lambda **kw: calibrate_spread(models["latent_ode"], TS, key=KEY,
                                        n_samples=3, batch_size=4, **kw)
    out["calibrate"] = rel(cal(devices=4), cal())

    # FFJORD: one batched solve per block, its step-size control shared by the points
    flow = FFJORD(2, width=8, depth=1, key=jax.random.key(1))
    x = rng.normal(size=(12, 2)).astype(np.float32)
    lp = flow.log_prob(x)
    s = flow.sample(12, key=KEY)
    ffj = {"log_prob": {}, "sample": {}}
    for devices in (2, 4):
        got = flow.log_prob(x, devices=devices)
        ffj["log_prob"][f"d{devices}"] = rel(got, lp)
        ffj["log_prob"][f"d{devices}_default"] = on_default(got)
        got = flow.sample(12, key=KEY, devices=devices)
        ffj["sample"][f"d{devices}"] = rel(got, s)
        ffj["sample"][f"d{devices}_default"] = on_default(got)
    ffj["log_prob"]["shape"] = rel(flow.log_prob(x.reshape(3, 4, 2), devices=4),
                                   np.asarray(lp).reshape(3, 4))
    # Hutchinson's probes for 10 points padded to 12: the first 10 rows of the
    # probes drawn for 12 are those drawn for 10 (else O(1) apart, not 1e-3)
    hk = jax.random.key(5)
    ffj["log_prob"]["hutchinson_pad"] = rel(
        flow.log_prob(x[:10], trace="hutchinson", key=hk, devices=4),
        flow.log_prob(x[:10], trace="hutchinson", key=hk))
    # 10 points on 4 devices: padded to 12 with copies of the last point
    ffj["log_prob"]["pad"] = rel(flow.log_prob(x[:10], devices=4),
                                 flow.log_prob(x[:10]))
    ffj["sample"]["pad"] = rel(flow.sample(10, key=KEY, devices=4),
                               flow.sample(10, key=KEY))
    out["ffjord"] = ffj

    def error(fn):
        try:
            fn()
        except ValueError as e:
            return str(e)
        return None

    out["errors"] = {
        "too_many": error(lambda: predict(models["svae"], TS, key=KEY, devices=8)),
        "bad": error(lambda: flow.log_prob(x, devices="gpu")),
        "twice": error(lambda: flow.sample(4, key=KEY,
                                           devices=[jax.devices()[0]] * 2)),
        "jit": error(lambda: jax.jit(
            lambda k: flow.sample(4, key=k, devices=2))(KEY)),
    }

    # the jobs and the CLI: `--devices N` on predict, evaluate and sample
    import test_jobs
    import xarray as xr
    from ctmodels import jobs
    from ctmodels._cli import main

    def cli(*argv):
        err = io.StringIO()
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            rc = main(list(argv))
        return rc, err.getvalue()

    jobs.register_family(test_jobs.TOY_PLAIN, overwrite=True)
    c = {}
    with tempfile.TemporaryDirectory() as d:
        d = pathlib.Path(d)
        t = np.sort(rng.uniform(0, 10, (20, 6)), axis=1)
        cd.to_xarray(cd.TimeSeries.from_arrays(t, rng.normal(size=(20, 6, 2)),
                                               channels=["a", "b"])).to_netcdf(
            d / "toy.nc")
        run = str(d / "toy")
        c["fit"] = cli("fit", "toy-plain", "--data", str(d / "toy.nc"), "--out", run,
                       "--quiet", "--epochs", "1")
        for name, extra in (("one", []), ("four", ["--devices", "4"]),
                            ("three", ["--devices", "3"])):
            p = d / f"pred_{name}.nc"
            rc, err = cli("predict", "--checkpoint", run, "--data", str(d / "toy.nc"),
                          "--out", str(p), *extra)
            c[f"predict_{name}"] = {"rc": rc, "err": err}
            if rc == 0:
                c[f"predict_{name}"]["rel"] = (
                    rel_ds(xr.load_dataset(p), xr.load_dataset(d / "pred_one.nc")))
            if name == "three":  # the grouping (and the hidden values) change
                continue
            m = d / f"metrics_{name}.json"
            rc, err = cli("evaluate", "--checkpoint", run, "--data",
                          str(d / "toy.nc"), "--out", str(m), *extra)
            c[f"evaluate_{name}"] = {"rc": rc, "err": err}
            if rc == 0:
                a = json.loads(m.read_text())["interpolation"]["mse"]
                b = json.loads((d / "metrics_one.json").read_text())
                c[f"evaluate_{name}"]["rel"] = rel(a, b["interpolation"]["mse"])
        c["predict_eight"] = cli("predict", "--checkpoint", run, "--data",
                                 str(d / "toy.nc"), "--out", str(d / "p8.nc"),
                                 "--devices", "8")
        c["predict_eight_written"] = (d / "p8.nc").exists()
        c["sample_toy"] = cli("sample", "--checkpoint", run, "--out",
                              str(d / "s.csv"), "--devices", "2")

        # FFJORD: the flow above saved as a job checkpoint (no training: the jobs
        # read what `ctmodels fit ffjord` records), then sampled and evaluated
        from ctmodels.train import save_checkpoint
        np.savetxt(d / "pts.csv", x, delimiter=",", header="u,v", comments="")
        flow_run = str(d / "flow")
        save_checkpoint(d / "flow" / "checkpoint", flow, metadata={"extra_state": {
            "job": "ffjord", "channels": ["u", "v"], "gaussian": None,
            "standardiser": {"mean": [0.5, -1.0], "scale": [2.0, 0.5]}}})
        import pandas as pd
        for name, extra in (("one", []), ("four", ["--devices", "4"])):
            rc, err = cli("sample", "--checkpoint", flow_run, "--out",
                          str(d / f"s_{name}.csv"), "-n", "10", *extra)
            c[f"sample_{name}"] = {"rc": rc, "err": err}
            if rc == 0:
                c[f"sample_{name}"]["rel"] = rel(
                    pd.read_csv(d / f"s_{name}.csv").to_numpy(),
                    pd.read_csv(d / "s_one.csv").to_numpy())
            m = d / f"nll_{name}.json"
            rc, err = cli("evaluate", "--checkpoint", flow_run, "--data",
                          str(d / "pts.csv"), "--out", str(m), *extra)
            c[f"evaluate_ffjord_{name}"] = {"rc": rc, "err": err}
            if rc == 0:
                c[f"evaluate_ffjord_{name}"]["rel"] = rel(
                    json.loads(m.read_text())["nll"],
                    json.loads((d / "nll_one.json").read_text())["nll"])
    out["cli"] = c
    print("RESULT " + json.dumps(out))
    """
)


@pytest.fixture(scope="module")
def result():
    env = dict(os.environ)
    flags = env.get("XLA_FLAGS", "")
    env["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={DEVICES}"
    env["JAX_ENABLE_X64"] = "0"
    env["CTMODELS_JAX_CACHE"] = ""  # the CLI's persistent cache: not in a test
    # this folder too: the script borrows test_jobs.py's toy family
    here = os.path.dirname(os.path.abspath(__file__))
    env["PYTHONPATH"] = os.pathsep.join([here, *sys.path])
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True,
        timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")][-1]
    return json.loads(line[len("RESULT ") :])


# float32 through adaptive solves: sums split over devices are added in another
# order (measured: at most 2e-5 relative)
RTOL = 1e-4
# FFJORD with padded points: the padding joins the step-size control (rtol 1e-5)
SOLVER_RTOL = 1e-3


@pytest.mark.parametrize(
    "model, case",
    [("latent_ode", c) for c in ("d4", "times", "times_per_series")]
    + [("svae", "d2"), ("svae", "d4")],
)
def test_sharded_predict_agrees_with_one_device(result, model, case):
    """Mean and std, on the series' own grid, at shared query times and at
    per-series query times: split over 2 or 4 devices, the single-device
    predictions (the same posterior draws)."""
    assert result[model][case] < RTOL


def test_batch_size_rounds_up_to_the_devices(result):
    """batch_size=6 on 4 devices predicts in batches of 8: one device's batch_size=8
    predictions, not batch_size=4's (the oracle can tell groupings apart: the
    batch's posterior draws depend on them)."""
    r = result["svae"]
    assert r["round_up"] < RTOL
    assert r["round_up_differs_from_4"] > 100 * RTOL


def test_calibrate_spread_sharded(result):
    assert result["calibrate"] < RTOL


@pytest.mark.parametrize("what", ["log_prob", "sample"])
@pytest.mark.parametrize("devices", [2, 4])
def test_ffjord_sharded_agrees_with_one_device(result, what, devices):
    """`sample` draws the base points first, so the same key gives the same samples
    on any number of devices; both come back on the default device."""
    r = result["ffjord"][what]
    assert r[f"d{devices}"] < RTOL
    assert r[f"d{devices}_default"]


def test_ffjord_log_prob_shapes_and_hutchinson(result):
    """Leading dims are flattened and restored; Hutchinson's probes, drawn for the
    padded points, are the unsharded ones for the real points."""
    r = result["ffjord"]["log_prob"]
    assert r["shape"] < RTOL and r["hutchinson_pad"] < SOLVER_RTOL


@pytest.mark.parametrize("what", ["log_prob", "sample"])
def test_ffjord_points_that_do_not_divide_are_padded(result, what):
    """10 points on 4 devices: padded to 12 and cut; the padding copies join the
    shared step-size control, so agreement is to the solver's tolerance."""
    assert result["ffjord"][what]["pad"] < SOLVER_RTOL


def test_errors_say_what_to_do(result):
    e = result["errors"]
    assert e["too_many"].startswith("predict(devices=8) asks for more devices")
    assert "xla_force_host_platform_device_count=8" in e["too_many"]
    assert e["bad"].startswith("devices must be None, an int >= 1 or a sequence")
    assert e["twice"].startswith("devices lists a device twice")
    assert e["jit"].startswith("FFJORD.sample(devices=...) places its inputs")


def test_cli_devices_flag(result):
    """`ctmodels predict|evaluate --devices 4`: the one-device outputs; `predict
    --devices 3` too (3 does not divide the checkpoint's batch size 8: rounded up
    to 9; the toy model's predictions do not depend on the grouping, but
    `evaluate`'s randomly hidden values would); more devices than the
    machine has is refused before anything is written; a family whose hook takes
    no devices says so."""
    c = result["cli"]
    assert c["fit"][0] == 0, c["fit"][1]
    for job, name in (("predict", "four"), ("predict", "three"),
                      ("evaluate", "four")):  # fmt: skip
        r = c[f"{job}_{name}"]
        assert r["rc"] == 0, r["err"]
        assert r["rel"] < RTOL
    rc, err = c["predict_eight"]
    assert rc == 2 and not c["predict_eight_written"]
    assert err.startswith("ctmodels predict: error: --devices 8: this machine has 4")
    rc, err = c["sample_toy"]
    assert rc == 2 and "toy-plain family has no sample job" in err


def test_cli_ffjord_sample_and_evaluate_devices(result):
    """`ctmodels sample --devices 4`: the same samples as on one device;
    `evaluate --devices 4`: the same NLL."""
    c = result["cli"]
    assert c["sample_four"]["rc"] == 0, c["sample_four"]["err"]
    assert c["sample_four"]["rel"] < RTOL
    r = c["evaluate_ffjord_four"]
    assert r["rc"] == 0, r["err"]
    assert r["rel"] < RTOL
