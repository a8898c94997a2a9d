"""Deep equilibrium and steady-state layers on real data: digits and Puromycin.

Cases (one JSON line each, then a summary line):

  digits      A classifier of the 8x8 digits (`ctmodels.datasets.load("digits")`,
              1797 images, pixels / 16, a seeded 80/20 split), three models of the
              same parameter count (8906), trained with Adam (lr 3e-3, batch 128) for
              --steps steps:
                deq       x -> z* = tanh(W z* + U x + b) (64 units) by
                          `ctmodels.nn.DEQ` (Anderson forward, implicit backward),
                          plus 1.0 x the Hutchinson Jacobian penalty `jac_loss`
                          (without it the cell loses contractivity within tens of
                          Adam steps; with 0.1 x, a forward solve failed to
                          converge after a few hundred steps), readout
                          Linear(64, 10);
                unrolled  the same cell applied --depth times from z = 0 (a
                          weight-tied network of fixed depth), plain backprop;
                explicit  tanh(B tanh(A x) + b) -> Linear(64, 10), two untied
                          layers (no bias in the first, as U has none).
              Reported: test accuracy, time per training step (median and min of
              the timed steps of the compiled step, the three models' steps
              interleaved; compile time separate), and the
              compiled step's memory from XLA (`jax.jit(step).lower(...).compile()
              .memory_analysis()`: `temp_bytes` is the scratch the step reserves,
              the peak training memory beyond parameters and batch; `peak_bytes` =
              temp + arguments + outputs - aliased). For the DEQ: forward
              iterations on the test set.
  memory      Peak training memory of one step against the number of iterations n
              in 10 / 100 / 1000 (same cell, batch 128): `unrolled` (a scan of n
              cell steps, plain backprop: activations of every step are kept) vs
              `deq_implicit` (`DEQ(max_steps=n)`, implicit backward: a while loop,
              nothing kept) vs `deq_unrolled` (`DEQ(backward="unrolled",
              max_steps=n)`: backprop through the solver's loop, checkpointed).
              Compile-time figures from XLA's memory analysis (as above).
  solvers     The trained DEQ cell on 128 test images (`cell`: "trained"), and a
              slowly contracting version of it ("slow_0.95": W rescaled to spectral
              norm 0.95, U and b scaled by 0.01 so that tanh stays in its linear
              range; full run only), by forward solver (anderson,
              broyden, iteration): iterations to the default float32 tolerance,
              forward time, and the time of the implicit backward pass
              (value-and-gradient minus forward, both the minimum over --reps
              interleaved calls; `backward_over_forward`).
  puromycin   A Michaelis-Menten steady-state model fitted to R's Puromycin data
              (`ctmodels.datasets.load("puromycin")`), per state (treated,
              untreated): the enzyme-substrate complex x (fraction of the enzyme,
              substrate held at conc c) follows dx/dt = (1 - x) c - K x, whose
              equilibrium is x* = c / (K + c); the velocity is rate = Vm x*. x* comes
              from `ctmodels.nn.SteadyState` (Newton root finding, float32); the
              parameters (log Vm, log K) are fitted by Levenberg-Marquardt
              (`optimistix.least_squares`), whose Jacobians are forward-mode
              derivatives through the layer's implicit function theorem; standard
              errors from Gauss-Newton, `s^2 (J^T J)^-1` with J = jax.jacfwd of the
              residuals in (Vm, K) through the layer and s^2 = RSS / (n - 2). Oracle:
              scipy.optimize.curve_fit on the closed form (R's `nls`, Bates & Watts
              1988: treated Vm = 212.68 +- 6.95, K = 0.06412 +- 0.00828). Also: the
              reverse-mode (implicit) gradient of the loss against the closed form,
              and the `method="integrate"` route against `method="root"`.

Usage:
  python benchmarks/deq.py [--quick] [--steps N] [--depth L] [--reps N] [--out PATH]

--quick: 30 training steps, memory at n = 10 / 100 without deq_unrolled, fewer
timings (about 80 s of CPU; longer in wall time on a busy machine). Results are
appended to --out (default benchmarks/results/deq.jsonl; --quick:
benchmarks/results/deq_quick.jsonl).
"""

from __future__ import annotations

import os

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "")
    + " --xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import argparse  # noqa: E402
import json  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

try:
    import ctmodels  # noqa: E402
except ImportError:  # run from a checkout without installing
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import ctmodels  # noqa: E402

import equinox as eqx  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import optax  # noqa: E402
import optimistix as optx  # noqa: E402

HERE = Path(__file__).resolve().parent
HIDDEN = 64
BATCH = 128
LR = 3e-3
JAC_WEIGHT = 1.0
OUT_LINES: list[dict] = []


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="smoke run (< 2 minutes)")
    p.add_argument("--steps", type=int, default=None, help="training steps (600)")
    p.add_argument("--depth", type=int, default=None, help="unrolled depth (30)")
    p.add_argument("--reps", type=int, default=None, help="timed solver calls (20)")
    p.add_argument("--cases", default="digits,memory,solvers,puromycin")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="JSONL file to append to")
    args = p.parse_args(argv)
    args.steps = args.steps or (30 if args.quick else 600)
    args.depth = args.depth or (10 if args.quick else 30)
    args.reps = args.reps or (5 if args.quick else 20)
    name = "deq_quick.jsonl" if args.quick else "deq.jsonl"
    args.out = Path(args.out) if args.out else HERE / "results" / name
    return args


def emit(obj):
    OUT_LINES.append(obj)
    print(json.dumps(obj), flush=True)


def memory(compiled) -> dict:
    m = compiled.memory_analysis()
    if m is None:
        return {"temp_bytes": None, "peak_bytes": None}
    peak = (
        m.temp_size_in_bytes
        + m.argument_size_in_bytes
        + m.output_size_in_bytes
        - m.alias_size_in_bytes
    )
    return {"temp_bytes": int(m.temp_size_in_bytes), "peak_bytes": int(peak)}


# ------------------------------------------------------------------------- models


class Cell(eqx.Module):
    """z -> tanh(W z + U x + b); `x` is the injected input (already U-projected is
    not assumed: the cell does it)."""

    W: jax.Array
    U: jax.Array
    b: jax.Array

    def __init__(self, key):
        kw, ku = jax.random.split(key)
        W = jax.random.normal(kw, (HIDDEN, HIDDEN))
        self.W = 0.5 * W / jnp.linalg.norm(W, 2)  # spectral norm 0.5: contractive
        self.U = jax.random.normal(ku, (HIDDEN, 64)) / 8.0
        self.b = jnp.zeros(HIDDEN)

    def __call__(self, z, x):
        return jnp.tanh(self.W @ z + self.U @ x + self.b)


class DEQClassifier(eqx.Module):
    deq: ctmodels.nn.DEQ
    readout: eqx.nn.Linear

    def __init__(self, key, **options):
        kc, kr = jax.random.split(key)
        self.deq = ctmodels.nn.DEQ(Cell(kc), **options)
        self.readout = eqx.nn.Linear(HIDDEN, 10, key=kr)

    def __call__(self, x, *, key=None):
        sol = self.deq.solve(x, jnp.zeros(HIDDEN), key=key)
        return self.readout(sol.value), sol.jac_loss, sol.stats["num_steps"]


class UnrolledClassifier(eqx.Module):
    cell: Cell
    readout: eqx.nn.Linear
    depth: int = eqx.field(static=True)

    def __init__(self, key, depth):
        kc, kr = jax.random.split(key)
        self.cell = Cell(kc)
        self.readout = eqx.nn.Linear(HIDDEN, 10, key=kr)
        self.depth = depth

    def __call__(self, x, *, key=None):
        z, _ = jax.lax.scan(
            lambda z, _: (self.cell(z, x), None), jnp.zeros(HIDDEN), None, self.depth
        )
        return self.readout(z), None, jnp.array(self.depth)


class ExplicitClassifier(eqx.Module):
    """tanh(B tanh(A x) + b) -> Linear(64, 10): two untied layers, the DEQ's count."""

    first: eqx.nn.Linear
    second: eqx.nn.Linear
    readout: eqx.nn.Linear

    def __init__(self, key):
        k1, k2, k3 = jax.random.split(key, 3)
        self.first = eqx.nn.Linear(64, HIDDEN, use_bias=False, key=k1)
        self.second = eqx.nn.Linear(HIDDEN, HIDDEN, key=k2)
        self.readout = eqx.nn.Linear(HIDDEN, 10, key=k3)

    def __call__(self, x, *, key=None):
        h = jnp.tanh(self.second(jnp.tanh(self.first(x))))
        return self.readout(h), None, jnp.array(0)


def n_params(model) -> int:
    leaves = jax.tree.leaves(eqx.filter(model, eqx.is_inexact_array))
    return int(sum(a.size for a in leaves))


def make_step(model, optim):
    params, static = eqx.partition(model, eqx.is_inexact_array)

    def loss_fn(params, x, y, key):
        m = eqx.combine(params, static)
        keys = jax.random.split(key, len(x))
        logits, jac, _ = jax.vmap(lambda xi, ki: m(xi, key=ki))(x, keys)
        loss = jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, y))
        if jac is not None:
            loss = loss + JAC_WEIGHT * jnp.mean(jac)
        return loss

    def step(params, opt_state, x, y, key):
        value, grads = jax.value_and_grad(loss_fn)(params, x, y, key)
        updates, opt_state = optim.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, value

    return params, static, step


def digits_data(seed):
    ds = ctmodels.datasets.load("digits")
    x = ds["image"].values.reshape(ds.sizes["sample"], 64).astype(np.float32) / 16.0
    y = ds["label"].values.astype(np.int32)
    perm = np.random.default_rng(seed).permutation(len(y))
    n_train = int(0.8 * len(y))
    tr, te = perm[:n_train], perm[n_train:]
    return (x[tr], y[tr]), (x[te], y[te])


def train(model, data, steps, seed, name):
    """A generator: compiles, then takes one training step per `next` (so that the
    models' steps interleave), then evaluates, emits the line and returns the model."""
    (xtr, ytr), (xte, yte) = data
    optim = optax.adam(LR)
    params, static, step = make_step(model, optim)
    opt_state = optim.init(params)
    rng = np.random.default_rng(seed + 1)
    idx = rng.choice(len(ytr), BATCH, replace=False)
    key = jax.random.PRNGKey(seed)
    t0 = time.perf_counter()
    lowered = jax.jit(step).lower(params, opt_state, xtr[idx], ytr[idx], key)
    t1 = time.perf_counter()
    compiled = lowered.compile()
    t2 = time.perf_counter()
    yield
    times, losses = [], []
    with ctmodels.readable_errors():
        for _ in range(steps):
            idx = rng.choice(len(ytr), BATCH, replace=False)
            key, sub = jax.random.split(key)
            s = time.perf_counter()
            params, opt_state, value = compiled(
                params, opt_state, xtr[idx], ytr[idx], sub
            )
            value.block_until_ready()
            times.append(time.perf_counter() - s)
            losses.append(float(value))
            yield
    model = eqx.combine(params, static)
    logits, _, steps_used = jax.jit(jax.vmap(lambda x: model(x)))(xte)
    acc = float(np.mean(np.argmax(np.asarray(logits), -1) == yte))
    timed = times[1:] if len(times) > 1 else times
    line = {
        "case": "digits",
        "model": name,
        "params": n_params(model),
        "steps": steps,
        "test_accuracy": acc,
        "final_train_loss": float(np.mean(losses[-10:])),
        "median_step_s": statistics.median(timed),
        "min_step_s": min(timed),
        "trace_lower_s": t1 - t0,
        "compile_s": t2 - t1,
        **memory(compiled),
    }
    if name == "deq":
        line["forward_iterations_mean"] = float(np.mean(steps_used))
        line["forward_iterations_max"] = int(np.max(steps_used))
    emit(line)
    return model


def case_digits(args):
    data = digits_data(args.seed)
    key = jax.random.PRNGKey(args.seed)
    models = {
        "deq": DEQClassifier(key),
        "unrolled": UnrolledClassifier(key, args.depth),
        "explicit": ExplicitClassifier(key),
    }
    counts = {name: n_params(m) for name, m in models.items()}
    assert len(set(counts.values())) == 1, counts
    runners = {
        name: train(model, data, args.steps, args.seed, name)
        for name, model in models.items()
    }
    for runner in runners.values():  # compile
        next(runner)
    for _ in range(args.steps):  # the models' steps interleaved
        for runner in runners.values():
            next(runner)
    trained = {}
    for name, runner in runners.items():
        try:
            next(runner)
        except StopIteration as stop:
            trained[name] = stop.value
    return trained, data


def case_memory(args):
    depths = (10, 100) if args.quick else (10, 100, 1000)
    key = jax.random.PRNGKey(args.seed)
    x = jax.random.uniform(key, (BATCH, 64))
    y = jnp.zeros(BATCH, jnp.int32)
    optim = optax.sgd(1e-3)
    builders = {
        "unrolled": lambda n: UnrolledClassifier(key, n),
        "deq_implicit": lambda n: DEQClassifier(key, max_steps=n),
        "deq_unrolled": lambda n: DEQClassifier(key, max_steps=n, backward="unrolled"),
    }
    if args.quick:  # its checkpointed loop compiles slowly
        del builders["deq_unrolled"]
    for n in depths:
        for name, build in builders.items():
            params, _, step = make_step(build(n), optim)
            opt_state = optim.init(params)
            t0 = time.perf_counter()
            compiled = jax.jit(step).lower(params, opt_state, x, y, key).compile()
            emit(
                {
                    "case": "memory",
                    "model": name,
                    "iterations": n,
                    "batch": BATCH,
                    "compile_s": time.perf_counter() - t0,
                    **memory(compiled),
                }
            )


def case_solvers(args, trained, data):
    (_, _), (xte, yte) = data
    deq = trained["deq"]
    x = jnp.asarray(xte[:BATCH])
    cells = {"trained": deq.deq.cell}
    if not args.quick:
        # a slowly contracting cell: W at spectral norm 0.95, and U, b scaled by 0.01
        # so that tanh stays in its linear range (the trained cell is saturated)
        cell = deq.deq.cell
        cells["slow_0.95"] = eqx.tree_at(
            lambda c: (c.W, c.U, c.b),
            cell,
            (0.95 * cell.W / jnp.linalg.norm(cell.W, 2), 0.01 * cell.U, 0.01 * cell.b),
        )
    for (cell_name, cell), solver in (
        (c, s) for c in cells.items() for s in ("anderson", "broyden", "iteration")
    ):
        model = eqx.tree_at(
            lambda m: m.deq,
            deq,
            ctmodels.nn.DEQ(cell, solver=solver, max_steps=1000),
        )
        params, static = eqx.partition(model, eqx.is_inexact_array)

        def forward(params, static=static):
            m = eqx.combine(params, static)
            logits, _, n = jax.vmap(lambda xi: m(xi))(x)
            return logits, n

        def loss(params):
            logits, n = forward(params)
            y = jnp.asarray(yte[:BATCH])
            ce = optax.softmax_cross_entropy_with_integer_labels(logits, y)
            return jnp.mean(ce), n

        fwd = jax.jit(forward).lower(params).compile()
        vg = jax.jit(jax.value_and_grad(loss, has_aux=True)).lower(params).compile()
        _, n = fwd(params)
        jax.block_until_ready(vg(params))
        tf, tg = [], []
        for _ in range(args.reps):  # interleaved
            s = time.perf_counter()
            jax.block_until_ready(fwd(params))
            tf.append(time.perf_counter() - s)
            s = time.perf_counter()
            jax.block_until_ready(vg(params))
            tg.append(time.perf_counter() - s)
        f, g = min(tf), min(tg)  # min: the least disturbed by other load
        emit(
            {
                "case": "solvers",
                "cell": cell_name,
                "solver": solver,
                "batch": BATCH,
                "iterations_max": int(np.max(n)),
                "iterations_mean": float(np.mean(n)),
                "forward_s": f,
                "value_and_grad_s": g,
                "forward_median_s": statistics.median(tf),
                "value_and_grad_median_s": statistics.median(tg),
                "backward_s": g - f,
                "backward_over_forward": (g - f) / f,
            }
        )


# ------------------------------------------------------------------------ puromycin


def complex_field(x, args):
    """d(complex fraction)/dt with the substrate clamped at c: (1 - x) c - K x."""
    c, log_k = args
    return (1 - x) * c - jnp.exp(log_k) * x


def case_puromycin(args):
    from scipy.optimize import curve_fit

    ds = ctmodels.datasets.load("puromycin")
    classes = ds["state"].attrs["flag_meanings"].split()
    layer = ctmodels.nn.SteadyState(complex_field)
    layer_int = ctmodels.nn.SteadyState(complex_field, method="integrate")
    lines = {}
    for code, state in enumerate(classes):
        rows = ds["state"].values == code
        conc = jnp.asarray(ds["conc"].values[rows], jnp.float32)
        rate = jnp.asarray(ds["rate"].values[rows], jnp.float32)
        n = int(rows.sum())

        def velocity(vm, log_k, layer=layer, conc=conc):
            x = jax.vmap(lambda c: layer((c, log_k), jnp.zeros(())))(conc)
            return vm * x

        def residuals(theta, _=None, conc=conc, rate=rate, velocity=velocity):
            log_vm, log_k = theta
            return rate - velocity(jnp.exp(log_vm), log_k)

        theta0 = jnp.log(jnp.array([float(rate.max()), float(jnp.median(conc))]))
        t0 = time.perf_counter()
        sol = optx.least_squares(
            residuals,
            optx.LevenbergMarquardt(rtol=1e-7, atol=1e-7),
            theta0,
            max_steps=200,
        )
        fit_s = time.perf_counter() - t0
        vm, k = (float(v) for v in jnp.exp(sol.value))

        # Gauss-Newton standard errors in (Vm, K), J by forward mode through the layer
        def resid_natural(p, conc=conc, rate=rate, velocity=velocity):
            return rate - velocity(p[0], jnp.log(p[1]))

        p = jnp.array([vm, k])
        J = np.asarray(jax.jacfwd(resid_natural)(p), np.float64)
        r = np.asarray(resid_natural(p), np.float64)
        rss = float(r @ r)
        cov = rss / (n - 2) * np.linalg.inv(J.T @ J)
        se = np.sqrt(np.diag(cov))

        # the oracle: scipy NLS on the closed form, float64
        c64, r64 = ds["conc"].values[rows], ds["rate"].values[rows]
        ref, ref_cov = curve_fit(
            lambda c, vm, k: vm * c / (k + c), c64, r64, p0=[200.0, 0.1]
        )
        ref_se = np.sqrt(np.diag(ref_cov))

        # reverse-mode (implicit) gradient of the loss vs the closed form
        def loss(p, velocity=velocity, rate=rate):
            return 0.5 * jnp.sum((rate - velocity(p[0], jnp.log(p[1]))) ** 2)

        def loss_closed(p, rate=rate, conc=conc):
            return 0.5 * jnp.sum((rate - p[0] * conc / (p[1] + conc)) ** 2)

        p_off = jnp.array([0.9 * vm, 1.2 * k])
        g = np.asarray(jax.grad(loss)(p_off))
        g_ref = np.asarray(jax.grad(loss_closed)(p_off))
        # the integrate route at the fit
        x_root = velocity(vm, jnp.log(k)) / vm
        log_k = jnp.log(k)
        x_int = jax.vmap(lambda c, lk=log_k: layer_int((c, lk), jnp.zeros(())))(conc)
        line = {
            "case": "puromycin",
            "state": state,
            "n": n,
            "dtype": "float32",
            "Vm": vm,
            "K": k,
            "se_Vm": float(se[0]),
            "se_K": float(se[1]),
            "rss": rss,
            "nls_Vm": float(ref[0]),
            "nls_K": float(ref[1]),
            "nls_se_Vm": float(ref_se[0]),
            "nls_se_K": float(ref_se[1]),
            "rel_err_Vm": abs(vm - ref[0]) / ref[0],
            "rel_err_K": abs(k - ref[1]) / ref[1],
            "rel_err_se_Vm": abs(se[0] - ref_se[0]) / ref_se[0],
            "rel_err_se_K": abs(se[1] - ref_se[1]) / ref_se[1],
            "lm_steps": int(sol.stats["num_steps"]),
            "fit_s": fit_s,
            "grad_rel_err_vs_closed_form": float(
                np.linalg.norm(g - g_ref) / np.linalg.norm(g_ref)
            ),
            "integrate_vs_root_max_abs": float(jnp.max(jnp.abs(x_int - x_root))),
        }
        emit(line)
        lines[state] = line
    return lines


def main(argv=None):
    args = parse_args(argv)
    cases = args.cases.split(",")
    start = time.perf_counter()
    summary = {"summary": True, "quick": args.quick, "steps": args.steps}
    if "digits" in cases or "solvers" in cases:
        trained, data = case_digits(args)
        acc = {line["model"]: line for line in OUT_LINES if line["case"] == "digits"}
        for name in ("unrolled", "explicit"):
            summary[f"deq_over_{name}_step_time"] = (
                acc["deq"]["median_step_s"] / acc[name]["median_step_s"]
            )
            summary[f"deq_over_{name}_step_time_by_min"] = (
                acc["deq"]["min_step_s"] / acc[name]["min_step_s"]
            )
            summary[f"deq_minus_{name}_accuracy"] = (
                acc["deq"]["test_accuracy"] - acc[name]["test_accuracy"]
            )
        if "solvers" in cases:
            case_solvers(args, trained, data)
    if "memory" in cases:
        case_memory(args)
        mem = [line for line in OUT_LINES if line["case"] == "memory"]
        for line in mem:
            summary[f"temp_MiB_{line['model']}_{line['iterations']}"] = round(
                (line["temp_bytes"] or 0) / 2**20, 3
            )
    if "puromycin" in cases:
        lines = case_puromycin(args)
        treated = lines["treated"]
        summary["puromycin_treated_Vm"] = treated["Vm"]
        summary["puromycin_treated_K"] = treated["K"]
        summary["puromycin_max_rel_err_vs_nls"] = max(
            max(line["rel_err_Vm"], line["rel_err_K"]) for line in lines.values()
        )
    summary["wall_s"] = time.perf_counter() - start
    summary["load_avg_1min"] = os.getloadavg()[0]
    summary["jax"] = jax.__version__
    emit(summary)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with open(args.out, "a") as fh:
        for line in OUT_LINES:
            fh.write(json.dumps(line) + "\n")


if __name__ == "__main__":
    main()
