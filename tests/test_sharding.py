"""Data-parallel `fit(devices=...)` against the single-device run.

JAX fixes its device count when it starts, so the checks run in one subprocess with
`XLA_FLAGS=--xla_force_host_platform_device_count=4` (four CPU devices sharing this
machine's cores), appended to the suite's flags (`tests/conftest.py`). The subprocess
runs every check once and prints one JSON line; the tests below assert on it. The
oracle is the single-device run: a batch split over 2 or 4 devices must give the
same loss trajectory and parameters up to the order of floating-point sums (float32
tolerances), and the same checkpoints (a run resumes across device counts). A second
test runs two processes joined by `jax.distributed` (Gloo's CPU collectives), two
devices each, training one model over all four.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

DEVICES = 4

SCRIPT = textwrap.dedent(
    r"""
    import json, tempfile
    import equinox as eqx, jax, jax.numpy as jnp, numpy as np
    from ctmodels.data import TimeSeries
    from ctmodels.models import NeuralODE
    from ctmodels.train import fit, load_checkpoint

    assert jax.local_device_count() == 4, jax.devices()
    out = {}


    class Curve(eqx.Module):
        # a + b t + c sin(t) per channel, with a keyed jitter (the random draws
        # must not depend on the sharding) and a KL-like term (kl_weight)
        a: jax.Array
        b: jax.Array
        c: jax.Array

        def loss(self, batch, *, key, kl_weight=1.0):
            t = batch.times[..., None]
            pred = self.a + self.b * t + self.c * jnp.sin(t)
            pred = pred + 0.05 * jax.random.normal(key, pred.shape)
            w = batch.target_mask * batch.weight[:, None, None]
            mse = jnp.sum(w * (pred - batch.values) ** 2) / jnp.maximum(w.sum(), 1.0)
            return mse + 1e-2 * kl_weight * jnp.sum(self.a**2), {"mse": mse}


    class Regressor(eqx.Module):
        w: jax.Array

        def loss(self, batch, *, key):
            x, y = batch
            return jnp.mean((x @ self.w - y) ** 2), {}


    def series(n, t=8, seed=0):
        rng = np.random.default_rng(seed)
        times = np.sort(rng.uniform(0, 2, size=(n, t)), axis=1)
        values = np.sin(times)[..., None] + 0.05 * rng.normal(size=(n, t, 1))
        values[rng.uniform(size=values.shape) < 0.2] = np.nan
        values[:, 0, :] = 0.0
        return TimeSeries.from_arrays(times, values)


    TRAIN, VALID = series(20), series(12, seed=1)  # short last batches: padded
    ARRAYS = (np.random.default_rng(2).normal(size=(20, 3)).astype(np.float32),
              np.random.default_rng(3).normal(size=(20, 1)).astype(np.float32))
    ARRAYS_VALID = tuple(x[:10] for x in ARRAYS)  # last batch of 2 rows: replicated

    def curve():
        return Curve(jnp.array([0.1]), jnp.array([-0.2]), jnp.array([0.3]))

    def leaves(m):
        return [np.asarray(x) for x in jax.tree.leaves(eqx.filter(m, eqx.is_array))]

    def run(make, data, valid, devices=None, steps=6, stop_at=None, **kw):
        losses, replicated = [], []

        def callback(info):
            if info["step"] == stop_at:
                raise KeyboardInterrupt  # fit saves a checkpoint at this step
            losses.append(info["loss"])
            replicated.append(all(
                x.sharding.is_fully_replicated and len(x.devices()) == n_dev
                for x in jax.tree.leaves(eqx.filter(info["model"], eqx.is_array))))

        n_dev = devices if isinstance(devices, int) else (
            1 if devices is None else len(devices))
        m, hist = fit(make(), data, valid=valid, steps=steps, batch_size=4,
                      devices=devices, key=jax.random.key(1), log=False,
                      learning_rate=0.05, callback=callback, **kw)
        return {"losses": losses, "leaves": leaves(m), "replicated": replicated,
                "valid": hist["valid_loss"].tolist() if valid is not None else [],
                "compilations": hist.attrs["compilations"]["train_step"],
                "returned_devices": sorted({str(d) for x in jax.tree.leaves(
                    eqx.filter(m, eqx.is_array)) for d in x.devices()})}

    def rel(a, b):
        a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
        return float(np.max(np.abs(a - b) / (1e-3 + np.abs(b))))

    def compare(r, one):
        return {
            "loss_rel": rel(r["losses"], one["losses"]),
            "valid_rel": rel(r["valid"], one["valid"]) if one["valid"] else 0.0,
            "param_rel": max(rel(x, y) for x, y in zip(r["leaves"], one["leaves"],
                                                       strict=True)),
            "bitwise": all(np.array_equal(x, y) for x, y in zip(r["leaves"],
                                                                  one["leaves"])),
            "replicated": all(r["replicated"]),
            "steps": len(r["losses"]),
            "compilations": r["compilations"],
            "returned_devices": r["returned_devices"],
        }

    # the same run on one device and split over 2, 4 and a one-device mesh
    cases = {"curve": (curve, TRAIN, VALID),
             "arrays": (lambda: Regressor(jnp.zeros((3, 1))), ARRAYS, ARRAYS_VALID)}
    for name, (make, data, valid) in cases.items():
        one = run(make, data, valid)
        out[name] = {"steps": len(one["losses"])}
        for d, devices in (("d2", 2), ("d4", 4), ("mesh1", jax.local_devices()[:1])):
            out[name][d] = compare(run(make, data, valid, devices), one)

    # an ODE model: vmapped adaptive solves whose loop runs on every device
    node = lambda: NeuralODE(1, latent_size=2, hidden_size=8, key=jax.random.key(0))
    one = run(node, TRAIN, None, steps=3)
    out["node"] = compare(run(node, TRAIN, None, 4, steps=3), one)

    # resume across device counts: interrupted at step 3 on `a`, finished on `b`
    one = run(curve, TRAIN, VALID)

    for a, b in ((4, None), (None, 4), (2, 4)):
        with tempfile.TemporaryDirectory() as d:
            try:
                run(curve, TRAIN, VALID, a, checkpoint_dir=d, stop_at=3)
            except KeyboardInterrupt:
                pass
            _, meta = load_checkpoint(d, like=curve())
            r = run(curve, TRAIN, VALID, b, checkpoint_dir=d)
        out[f"resume_{a}_{b}"] = {
            "saved_step": meta["state"]["step"],
            "saved_devices": meta["fit"]["devices"],
            "steps_after": len(r["losses"]),
            "param_rel": max(rel(x, y) for x, y in zip(r["leaves"], one["leaves"])),
        }

    def error(**kw):
        try:
            fit(curve(), TRAIN, steps=1, key=jax.random.key(1), log=False, **kw)
        except ValueError as e:
            return str(e)
        return None

    out["errors"] = {
        "not_divisible": error(devices=4, batch_size=6),
        "too_many": error(devices=8, batch_size=8),
        "bad": error(devices="gpu", batch_size=8),
    }

    # the job layer: `ctmodels fit MODEL --devices N` (test_jobs.py's toy family)
    import contextlib, io, pathlib
    import ctmodels.data as cd
    import test_jobs
    from ctmodels import jobs
    from ctmodels._cli import main

    jobs.register_family(test_jobs.TOY_PLAIN, overwrite=True)
    rng = np.random.default_rng(0)
    t = np.sort(rng.uniform(0, 10, (20, 6)), axis=1)
    v = rng.normal(size=(20, 6, 2))
    with tempfile.TemporaryDirectory() as d:
        d = pathlib.Path(d)
        cd.to_xarray(cd.TimeSeries.from_arrays(t, v, channels=["a", "b"])).to_netcdf(
            d / "toy.nc")
        cli = {}
        for name, extra in (("one", []), ("four", ["--devices", "4"]),
                            ("three", ["--devices", "3"]),
                            ("no_id", ["--coordinator", "localhost:1"])):
            err = io.StringIO()
            with contextlib.redirect_stderr(err), contextlib.redirect_stdout(
                    io.StringIO()):
                rc = main(["fit", "toy-plain", "--data", str(d / "toy.nc"), "--out",
                           str(d / name), "--quiet", *extra])
            entry = {"rc": rc, "stderr": err.getvalue()}
            if rc == 0:
                metrics = json.loads((d / name / "metrics.json").read_text())
                _, meta = load_checkpoint(d / name / "checkpoint",
                                          model_class=test_jobs.ToyMean)
                entry.update(devices=metrics["devices"],
                             checkpoint_devices=meta["fit"]["devices"],
                             mse=metrics["test"]["interpolation"]["mse"])
            entry["written"] = (d / name).exists()
            cli[name] = entry
    out["cli"] = cli
    print("RESULT " + json.dumps(out))
    """
)


# two processes on this machine, two CPU devices each, one model over all four:
# `jax.distributed` with Gloo's CPU collectives. The data are a lazy source that
# counts the series each process reads: each must read only its own rows of every
# batch (22 series in batches of 4: the short last batch's real rows are all
# process 0's, process 1 holds only padding rows of it).
MULTI = textwrap.dedent(
    r"""
    import json, sys
    import jax
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    from types import SimpleNamespace
    from ctmodels._cli import _join_distributed, main

    pid, port, folder = int(sys.argv[1]), sys.argv[2], sys.argv[3]
    # what `ctmodels fit ... --coordinator localhost:PORT --num-processes 2
    # --process-id PID` does first: jax.distributed.initialize with Gloo
    _join_distributed(SimpleNamespace(coordinator=f"localhost:{port}",
                                      num_processes=2, process_id=pid))
    import equinox as eqx, jax.numpy as jnp, numpy as np
    import ctmodels.train._savepoint as savepoint
    from ctmodels.data import TimeSeries
    from ctmodels.train import fit, load_checkpoint

    writes = []
    _write = savepoint.write_checkpoint
    savepoint.write_checkpoint = lambda *a, **k: (writes.append(1), _write(*a, **k))

    class Curve(eqx.Module):
        a: jax.Array
        b: jax.Array

        def loss(self, batch, *, key):
            pred = self.a + self.b * batch.times[..., None]
            pred = pred + 0.05 * jax.random.normal(key, pred.shape)
            w = batch.target_mask * batch.weight[:, None, None]
            return jnp.sum(w * (pred - batch.values) ** 2) / jnp.maximum(w.sum(), 1), {}

    class Counting:
        # a lazy source (len, source[indices] -> TimeSeries) that counts its reads
        def __init__(self, ts):
            self.ts, self.rows = ts, 0

        def __len__(self):
            return len(self.ts)

        def __getitem__(self, idx):
            self.rows += len(idx)
            return self.ts[idx]

    def series(n, seed):
        rng = np.random.default_rng(seed)
        times = np.sort(rng.uniform(0, 2, size=(n, 8)), axis=1)  # irregular
        values = np.sin(times)[..., None]
        values[rng.uniform(size=values.shape) < 0.3] = np.nan
        values[:, 0] = 0.0
        ragged = np.arange(8) >= rng.integers(3, 9, size=(n, 1))  # lengths 3..8
        times[ragged], values[ragged] = np.nan, np.nan
        return TimeSeries.from_arrays(times, values)

    train_ts, valid_ts = series(22, 0), series(10, 1)

    def run(devices, layout, **kw):
        train, valid = Counting(train_ts), Counting(valid_ts)
        losses = []
        m, h = fit(Curve(jnp.array([0.1]), jnp.array([-0.2])), train, valid=valid,
                   steps=6, batch_size=4, devices=devices, key=jax.random.key(1),
                   log=False, learning_rate=0.05, layout=layout,
                   callback=lambda i: losses.append(i["loss"]), **kw)
        return m, losses, h["valid_loss"].tolist(), train.rows, valid.rows

    def rel(a, b):
        a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
        return float(np.max(np.abs(a - b) / (1e-6 + np.abs(b))))

    out = {"pid": pid, "devices": jax.device_count(), "local": jax.local_device_count()}
    for layout in ("union", "padded"):
        folder_kw = {"checkpoint_dir": folder} if layout == "union" else {}
        many = run(jax.devices(), layout, **folder_kw)
        one = run(None, layout)  # this process alone, one device: the oracle
        out[layout] = {
            "param_rel": max(rel(x, y) for x, y in zip(jax.tree.leaves(many[0]),
                                                        jax.tree.leaves(one[0]))),
            "loss_rel": rel(many[1], one[1]), "valid_rel": rel(many[2], one[2]),
            "steps": len(many[1]),
            "rows": many[3], "rows_one": one[3],
            "valid_rows": many[4], "valid_rows_one": one[4],
        }
    # array data (flows, DEQs): each process takes its rows of every training
    # batch; the short last validation batch (2 rows) is replicated
    class Regressor(eqx.Module):
        w: jax.Array

        def loss(self, batch, *, key):
            x, y = batch
            return jnp.mean((x @ self.w - y) ** 2), {}

    xs = np.random.default_rng(2).normal(size=(20, 3)).astype(np.float32)
    ys = np.random.default_rng(3).normal(size=(20, 1)).astype(np.float32)
    arrays = [fit(Regressor(jnp.zeros((3, 1))), (xs, ys), valid=(xs[:10], ys[:10]),
                  steps=6, batch_size=4, devices=d, key=jax.random.key(1),
                  log=False, learning_rate=0.05)
              for d in (jax.devices(), None)]
    out["arrays"] = {
        "param_rel": rel(arrays[0][0].w, arrays[1][0].w),
        "valid_rel": rel(arrays[0][1]["valid_loss"], arrays[1][1]["valid_loss"]),
    }

    _, meta = load_checkpoint(folder, like=many[0])
    out.update(writes=len(writes), saved_devices=meta["fit"]["devices"],
               saved_step=meta["state"]["step"])

    # the job layer, `ctmodels fit toy-plain --devices all` (test_jobs.py's toy
    # family) in both processes: one model over all four devices, process 0 writes
    import contextlib, io, pathlib
    import ctmodels.data as cd
    import test_jobs
    from ctmodels import jobs

    jobs.register_family(test_jobs.TOY_PLAIN, overwrite=True)
    rng = np.random.default_rng(0)
    t = np.sort(rng.uniform(0, 10, (20, 6)), axis=1)
    nc = pathlib.Path(folder + f"-data{pid}.nc")
    cd.to_xarray(cd.TimeSeries.from_arrays(t, rng.normal(size=(20, 6, 2)),
                                           channels=["a", "b"])).to_netcdf(nc)
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        rc = main(["fit", "toy-plain", "--data", str(nc), "--out", folder + "-cli",
                   "--quiet", "--devices", "all", "--epochs", "2"])
    out["cli"] = {"rc": rc, "printed": json.loads(printed.getvalue())}
    err = io.StringIO()
    with contextlib.redirect_stderr(err):  # a distributed run needs --devices all
        rc = main(["fit", "toy-plain", "--data", str(nc), "--out", folder + "-two",
                   "--quiet", "--devices", "2"])
    out["cli_two"] = {"rc": rc, "stderr": err.getvalue()}
    jax.distributed.shutdown()
    print("RESULT " + json.dumps(out))
    """
)


@pytest.fixture(scope="module")
def result():
    env = dict(os.environ)
    # appended to the suite's XLA flags (conftest.py), not replacing them
    flags = env.get("XLA_FLAGS", "")
    env["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={DEVICES}"
    env["JAX_ENABLE_X64"] = "0"
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


# float32 through a few Adam steps: sums split over devices are added in another
# order (measured: losses 3e-7, parameters 2e-6 relative apart at most)
LOSS_RTOL, PARAM_RTOL = 1e-5, 1e-4


@pytest.mark.parametrize("data", ["curve", "arrays"])
@pytest.mark.parametrize("devices", ["d2", "d4"])
def test_sharded_training_agrees_with_one_device(result, data, devices):
    r = result[data][devices]
    assert r["steps"] == result[data]["steps"] == 6
    assert r["loss_rel"] < LOSS_RTOL and r["valid_rel"] < LOSS_RTOL
    assert r["param_rel"] < PARAM_RTOL
    # the parameters stay replicated step after step (GSPMD's output placement),
    # so the step compiles once; `fit` returns them on the default device
    assert r["replicated"] and r["compilations"] == 1
    assert r["returned_devices"] == ["cpu:0"]


def test_ode_model_agrees_with_one_device(result):
    """Vmapped adaptive solves: each device's while loop, the same trajectory."""
    r = result["node"]
    assert r["steps"] == 3 and r["replicated"]
    assert r["loss_rel"] < LOSS_RTOL and r["param_rel"] < PARAM_RTOL


@pytest.mark.parametrize("data", ["curve", "arrays"])
def test_one_device_mesh_is_the_plain_path_bitwise(result, data):
    """The sharded path on a one-device mesh (what `benchmarks/scale.py` times as
    its overhead) computes exactly what the plain path does."""
    assert result[data]["mesh1"]["bitwise"]
    assert result[data]["mesh1"]["loss_rel"] == 0.0


@pytest.mark.parametrize("case", ["resume_4_None", "resume_None_4", "resume_2_4"])
def test_resume_across_device_counts(result, case):
    """Interrupted at step 3 on one device count, finished on another: the result
    of the uninterrupted single-device run (to float32 tolerance)."""
    r = result[case]
    assert r["saved_step"] == 3 and r["steps_after"] == 3
    assert r["saved_devices"] == {"4": 4, "None": 1, "2": 2}[case.split("_")[1]]
    assert r["param_rel"] < PARAM_RTOL


def test_errors_say_what_to_do(result):
    e = result["errors"]
    assert e["not_divisible"].startswith("batch_size=6 does not divide over 4 devices")
    assert "multiple of 4 (e.g. 8)" in e["not_divisible"]
    assert e["too_many"].startswith("fit(devices=8) asks for more devices")
    assert "jax.local_device_count() is 4" in e["too_many"]
    assert "xla_force_host_platform_device_count=8" in e["too_many"]
    assert e["bad"].startswith("devices must be None, an int >= 1 or a sequence")


def test_cli_fit_with_devices_records_them(result):
    """`ctmodels fit MODEL --devices 4`: metrics.json and the checkpoint record the
    count, the test metrics are one device's; a count that does not divide the
    recipe's batch size (8) is refused before anything is written."""
    one, four, three = (result["cli"][k] for k in ("one", "four", "three"))
    assert one["rc"] == 0 and four["rc"] == 0, (one["stderr"], four["stderr"])
    assert (one["devices"], one["checkpoint_devices"]) == (1, 1)
    assert (four["devices"], four["checkpoint_devices"]) == (4, 4)
    assert abs(four["mse"] - one["mse"]) <= LOSS_RTOL * abs(one["mse"])
    assert three["rc"] == 2 and not three["written"]
    assert three["stderr"].startswith(
        "ctmodels fit: error: --devices 3 does not divide the recipe's batch size 8"
    )
    assert "--batch-size 9" in three["stderr"]
    # joining a distributed run needs all three flags (checked before JAX joins)
    no_id = result["cli"]["no_id"]
    assert no_id["rc"] == 2 and not no_id["written"]
    assert no_id["stderr"].startswith(
        "ctmodels fit: error: --num-processes, --process-id missing"
    )


def test_one_device_is_the_plain_path():
    """None and 1 build no mesh (today's path); a device sequence always does."""
    import jax

    from ctmodels.train._sharding import resolve_devices

    assert resolve_devices(None, 7) is None and resolve_devices(1, 7) is None
    p = resolve_devices(jax.local_devices()[:1], 7)
    assert p is not None and p.size == 1
    for bad in (0, -2, True, [], ["cpu"], [jax.local_devices()[0]] * 2):
        with pytest.raises(ValueError, match="devices"):
            resolve_devices(bad, 8)
    x = np.arange(6.0)
    assert np.array_equal(p.to_host({"x": p.replicate(x)})["x"], x)


def test_two_processes_train_one_model(tmp_path):
    """`jax.distributed` on one machine: two processes with two CPU devices each
    train over all four (`devices=jax.devices()`), each reading only its own rows
    of every batch (together exactly the series one process reads, each about
    half), and agree with one device, in both layouts (the processes agree on the
    union grid, or the padded length, of every batch) and on array data; only
    process 0 writes the checkpoint; `ctmodels fit MODEL --devices all` joins the
    run (process 0 writes --out), and `--devices 2` is refused in it."""
    import socket

    with socket.socket() as sock:
        sock.bind(("localhost", 0))
        port = str(sock.getsockname()[1])
    env = dict(os.environ)
    flags = env.get("XLA_FLAGS", "")
    env["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count=2"
    here = os.path.dirname(os.path.abspath(__file__))  # test_jobs.py's toy family
    env.update(JAX_ENABLE_X64="0", JAX_PLATFORMS="cpu",
               PYTHONPATH=os.pathsep.join([here, *sys.path]))  # fmt: skip
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", MULTI, str(i), port, str(tmp_path / "run")],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )  # fmt: skip
        for i in range(2)
    ]
    results = []
    for proc in procs:
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err[-4000:]
        line = [x for x in out.splitlines() if x.startswith("RESULT ")][-1]
        results.append(json.loads(line[len("RESULT ") :]))
    for r in results:
        assert (r["devices"], r["local"]) == (4, 2)
        assert (r["saved_devices"], r["saved_step"]) == (4, 6)
        assert r["arrays"]["param_rel"] < PARAM_RTOL
        assert r["arrays"]["valid_rel"] < LOSS_RTOL
        for layout in ("union", "padded"):
            assert r[layout]["steps"] == 6
            assert r[layout]["param_rel"] < PARAM_RTOL
            assert r[layout]["loss_rel"] < LOSS_RTOL
            assert r[layout]["valid_rel"] < LOSS_RTOL
    for layout in ("union", "padded"):
        a, b = results[0][layout], results[1][layout]
        assert a["rows_one"] == b["rows_one"] > 0
        # every series one process reads, read once by one of the two
        assert a["rows"] + b["rows"] == a["rows_one"]
        assert a["valid_rows"] + b["valid_rows"] == a["valid_rows_one"]
        # process 0 holds the short last batch's 2 series, process 1 none of them
        assert a["rows"] > b["rows"] > 0.3 * a["rows_one"]
    assert results[0]["writes"] > 0 and results[1]["writes"] == 0
    # `ctmodels fit MODEL --devices all` in a distributed run: process 0 evaluates
    # and writes --out, recording all four devices; process 1 only trains
    cli0, cli1 = results[0]["cli"], results[1]["cli"]
    assert cli0["rc"] == 0 and cli1["rc"] == 0
    assert cli1["printed"]["process"] == 1 and cli1["printed"]["devices"] == 4
    metrics = json.loads((tmp_path / "run-cli" / "metrics.json").read_text())
    assert metrics["devices"] == 4 and cli0["printed"]["out"].endswith("run-cli")
    for r in results:
        assert r["cli_two"]["rc"] == 2
        assert "distributed run of 2 processes" in r["cli_two"]["stderr"]
        assert "--devices all, not --devices 2" in r["cli_two"]["stderr"]
    assert not (tmp_path / "run-two").exists()
