"""Latent-ODE training step: ctmodels.models.LatentODE vs the same model in torchdiffeq
and in plain Diffrax.

The periodic configuration of Rubanova, Chen & Duvenaud (2019)'s code: 1000 series of a
noisy sine (random frequency, amplitude and phase), 100 time points (one shared random
grid in [0, 1]) of which 50 random ones per series are the encoder's context; the loss
scores all 100 values. Batch 50 (20 steps = one epoch), latent 6, ODE-RNN encoder state
20, every MLP 100 units wide, 3 latent samples (IWAE), dopri5 rtol 1e-3 atol 1e-4 for
the latent ODE, one Euler step per interval in the encoder, Adam 1e-2. float32, CPU,
one thread each (or one GPU: `--device gpu`).

The three implementations compute the same function from the same weights and the
same noise samples (the first step's losses are printed side by side):

- `ctmodels`: `LatentODE(1)` with defaults, batches in the `"union"` layout (one dopri5
  solve for the whole `[3, 50, 6]` state); `jax.value_and_grad` of `model.loss` and an
  optax Adam update, jitted. Its ODE-RNN encoder steps only through each series'
  observed positions (moved to the front; 50 of the 100 here) and skips the rest.
- `torchdiffeq`: the same architecture written in torch: the ODE-RNN encoder as a
  Python loop over all 100 time positions, masked as in the paper's code, with its
  Euler step written out directly (`h + dt * f(h)`, which is what the paper's code
  does for small gaps; cheaper than calling `odeint` per gap), and
  `torchdiffeq.odeint(..., method="dopri5")` for the latent ODE over the shared grid;
  autograd backprop; `torch.optim.Adam`.
- `diffrax`: the same model written by hand in JAX, Diffrax and Equinox, without
  ctmodels: the encoder as a `lax.scan` over all 100 time positions, masked (the
  same Euler step and GRU update), `diffrax.diffeqsolve(Dopri5(), SaveAt(ts=grid),
  PIDController)` with its default adjoint for the latent ODE, the same optax Adam,
  jitted, on the same parameter pytree. The issue asks that ctmodels not be slower
  than this.

The JAX step is compiled as `ctmodels.train.fit` under the `ctmodels` command
compiles its steps: `traced_failures("nan")` and `EQX_ON_ERROR=nan`, so a failed
solve gives a NaN loss (fit's NaN guard) instead of a host callback; host callbacks
also cost ~0.7 ms per call in dispatch. Python's garbage collector is paused while
it traces and compiles, as in `fit` (`ctmodels.train._fit.gc_paused`); the plain
Diffrax step is compiled the same way.

Timing: the JAX step is AOT-compiled first (trace/lower and compile times reported);
then `--reps` interleaved rounds, each running `--steps` training steps of each
implementation in turn on the same batches. A sample is the mean time
per step of one round; `median_s`/`min_s` are over the rounds.

Output: one JSON line per implementation, then a summary line with
`torch_over_ctmodels` (> 1 means ctmodels is faster; the ratio of the medians),
`diffrax_over_ctmodels` (likewise against plain Diffrax),
`torch_over_ctmodels_by_min` and `torch_over_ctmodels_per_round(_median)` (each
round's ratio). The cost of a step grows as
training makes the latent dynamics harder (more dopri5 steps; both implementations
alike), so the lines also report the solver work at the end of the run:
`final_latent_steps` (ctmodels and plain Diffrax: dopri5 steps of the latent solve
from the same `z0` with each one's trained weights) and
`final_latent_nfe_fwd` (torchdiffeq: vector-field evaluations of a forward pass,
about 6 per step).

`--device gpu` runs both on the first GPU instead (JAX's default GPU backend, torch on
`cuda`; same model, data and timing), for the GPU figure in benchmarks/README.md; the
issue's target is the CPU setting.

Usage:
  python benchmarks/latent_ode_step.py [--reps N] [--steps N] [--quick] [--device gpu]
"""

from __future__ import annotations

import os
import sys

from _timing import device_from_argv, setup_device

DEVICE = device_from_argv(sys.argv[1:])
setup_device(DEVICE)  # before jax / torch are imported: one thread each on a CPU
# compile the step as `ctmodels fit` does: runtime checks in NaN mode, no host callbacks
os.environ.setdefault("EQX_ON_ERROR", "nan")

import argparse  # noqa: E402
import json  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402

RTOL, ATOL = 1e-3, 1e-4
LR = 1e-2


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--reps", type=int, default=7, help="interleaved rounds")
    p.add_argument("--steps", type=int, default=5, help="training steps per round")
    p.add_argument("--quick", action="store_true", help="small sizes, smoke run")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--device",
        choices=("cpu", "gpu"),
        default="cpu",
        help="cpu: one thread each (the issue's setting); gpu: JAX and torch on "
        "the first GPU",
    )
    return p.parse_args(argv)


def emit(obj):
    print(json.dumps(obj), flush=True)


def periodic_data(n_series, n_times, n_context, rng):
    """Noisy sines on one shared random grid; a random context subset per series."""
    grid = np.sort(np.concatenate([[0.0], rng.uniform(0.0, 1.0, n_times - 1)]))
    freq = rng.uniform(1.0, 4.0, (n_series, 1))
    amp = rng.uniform(0.5, 1.5, (n_series, 1))
    phase = rng.uniform(0.0, 2 * np.pi, (n_series, 1))
    values = amp * np.sin(2 * np.pi * freq * grid + phase)
    values = values + rng.normal(0.0, 0.01, values.shape)
    context = np.zeros((n_series, n_times), bool)
    for s in range(n_series):
        context[s, rng.choice(n_times, n_context, replace=False)] = True
    return grid, values[..., None], context[..., None]


def main(argv=None):
    args = parse_args(argv)
    if args.quick:
        n_series, n_times, n_context, batch = 40, 20, 10, 10
        latent, enc_size, units, samples = 4, 8, 16, 2
        reps, steps = min(args.reps, 2), min(args.steps, 2)
    else:
        n_series, n_times, n_context, batch = 1000, 100, 50, 50
        latent, enc_size, units, samples = 6, 20, 100, 3
        reps, steps = args.reps, args.steps

    import torch
    import torchdiffeq

    torch.set_num_threads(1)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:
        pass

    import equinox as eqx
    import jax
    import jax.numpy as jnp
    import optax

    try:
        import ctmodels  # noqa: F401
    except ImportError:  # a source checkout without `pip install -e .`
        sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from ctmodels._errors import traced_failures
    from ctmodels.data import Batch
    from ctmodels.models import LatentODE
    from ctmodels.train._fit import gc_paused

    jax.config.update("jax_enable_x64", False)
    if args.device == "gpu" and jax.default_backend() != "gpu":
        raise SystemExit(
            f"--device gpu, but JAX runs on {jax.default_backend()!r}: install a JAX "
            "with CUDA (e.g. pip install 'jax[cuda13]') or leave --device out."
        )
    if args.device == "gpu" and not torch.cuda.is_available():
        raise SystemExit("--device gpu, but torch sees no CUDA device.")
    rng = np.random.default_rng(args.seed)
    grid, values, context = periodic_data(n_series, n_times, n_context, rng)
    n_batches = n_series // batch

    # ------------------------------------------------------------------ ctmodels
    def jax_batch(i):
        sl = slice(i * batch, (i + 1) * batch)
        B = batch
        return Batch(
            times=jnp.asarray(np.broadcast_to(grid, (B, n_times)), jnp.float32),
            values=jnp.asarray(values[sl], jnp.float32),
            mask=jnp.asarray(context[sl]),
            target_mask=jnp.ones((B, n_times, 1), bool),
            time_mask=jnp.ones((B, n_times), bool),
            weight=jnp.ones(B, jnp.float32),
            index=jnp.arange(i * B, (i + 1) * B, dtype=jnp.int32),
            position=jnp.broadcast_to(
                jnp.arange(n_times, dtype=jnp.int32), (B, n_times)
            ),
            static=None,
            labels=None,
            layout="union",
        )

    jbatches = [jax_batch(i) for i in range(n_batches)]
    model = LatentODE(
        1,
        latent_size=latent,
        encoder_size=enc_size,
        units=units,
        rtol=RTOL,
        atol=ATOL,
        key=jax.random.key(args.seed),
    )
    params, static = eqx.partition(model, eqx.is_inexact_array)
    opt = optax.adam(LR)

    def jax_step(params, opt_state, batch, key):
        def f(p):
            return eqx.combine(p, static).loss(batch, key=key, n_samples=samples)

        (loss, _), grads = jax.value_and_grad(f, has_aux=True)(params)
        updates, opt_state = opt.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    key0 = jax.random.key(args.seed + 1)
    t0 = time.perf_counter()
    # as `ctmodels.train.fit` traces its steps
    with traced_failures("nan"), gc_paused():
        lowered = jax.jit(jax_step).lower(params, opt.init(params), jbatches[0], key0)
    t_lower = time.perf_counter() - t0
    t0 = time.perf_counter()
    with gc_paused():
        step_c = lowered.compile()
    t_compile = time.perf_counter() - t0

    # ------------------------------------------------------------------ plain Diffrax
    # The same model written directly in JAX + Diffrax + Equinox, as a user would by
    # hand (no ctmodels code): a `lax.scan` for the ODE-RNN encoder (Euler step and
    # GRU update per time position, backwards), `diffrax.diffeqsolve(Dopri5(),
    # SaveAt(ts=...), PIDController(rtol, atol))` with its default adjoint for the
    # latent ODE, on the same parameter pytree (so the same weights and Adam state).
    import diffrax

    def p_mlp(m, x):  # an eqx.nn.MLP (tanh) over leading axes, as one matmul a layer
        for i, layer in enumerate(m.layers):
            x = x @ layer.weight.T + layer.bias
            if i < len(m.layers) - 1:
                x = jnp.tanh(x)
        return x

    def p_gru(g, h, x):
        hx = jnp.concatenate([h, x], -1)
        a = jnp.tanh(hx @ g.gate_hidden.weight.T + g.gate_hidden.bias)
        a = a.reshape(hx.shape[0], 2, -1)
        gates = jnp.einsum("gou,bgu->gbo", g.gate_weight, a)
        u, r = jax.nn.sigmoid(gates + g.gate_bias[:, None, :])
        c = jnp.tanh(p_mlp(g.candidate, jnp.concatenate([r * h, x], -1)))
        return (1 - u) * c + u * h

    def plain_solve(dynamics, z0, times):  # latent states at `times`: [T, K, B, L]
        return diffrax.diffeqsolve(
            diffrax.ODETerm(lambda t, z, dyn: p_mlp(dyn, z)),
            diffrax.Dopri5(),
            t0=times[0],
            t1=times[-1],
            dt0=None,
            y0=z0,
            args=dynamics,
            saveat=diffrax.SaveAt(ts=times),
            stepsize_controller=diffrax.PIDController(rtol=RTOL, atol=ATOL),
        )

    def plain_loss(m, times, values, context, eps):
        B, T, _ = values.shape
        enc = m.encoder
        x = jnp.where(context, values, 0.0)
        inputs = jnp.concatenate([x, context.astype(values.dtype)], -1)
        observed = context.any(-1)
        t_last0 = jnp.where(observed, times, -jnp.inf).max(1)
        h0 = jnp.zeros((B, enc.gru.gate_bias.shape[-1]), values.dtype)

        def body(carry, j):  # ODE-RNN backwards in time; one Euler step per gap
            h, t_last = carry
            h_minus = h + (times[j] - t_last)[:, None] * p_mlp(enc.vector_field, h)
            obs = observed[:, j]
            h = jnp.where(obs[:, None], p_gru(enc.gru, h_minus, inputs[:, j]), h)
            return (h, jnp.where(obs, times[j], t_last)), None

        (h, t_last), _ = jax.lax.scan(body, (h0, t_last0), jnp.arange(T)[::-1])
        h = h + (times[0] - t_last)[:, None] * p_mlp(enc.vector_field, h)
        mean, pre = jnp.split(p_mlp(m.to_z0, h), 2, -1)
        std = jax.nn.softplus(pre + m.std_shift) + 1e-5
        z0 = mean + std * eps  # [K, B, L]
        sol = plain_solve(m.dynamics, z0, times)
        pred = jnp.moveaxis(p_mlp(m.decoder, sol.ys), 0, 2)  # [K, B, T, C]
        log_std = float(np.log(m.obs_std))
        z = (values - pred) / m.obs_std
        ll = (-0.5 * z**2 - log_std - 0.5 * np.log(2 * np.pi)).sum((2, 3))
        lq = (-0.5 * eps**2 - jnp.log(std) - 0.5 * np.log(2 * np.pi)).sum(-1)
        lp = (-0.5 * z0**2 - 0.5 * np.log(2 * np.pi)).sum(-1)
        bound = jax.nn.logsumexp(ll + lp - lq, 0) - np.log(eps.shape[0])
        return -bound.sum() / (B * T * values.shape[-1])

    pgrid = jnp.asarray(grid, jnp.float32)
    pbatches = [
        (
            jnp.asarray(values[i * batch : (i + 1) * batch], jnp.float32),
            jnp.asarray(context[i * batch : (i + 1) * batch]),
        )
        for i in range(n_batches)
    ]

    def plain_step(params, opt_state, v, c, key):
        eps = jax.random.normal(key, (samples, batch, latent))  # as LatentODE.loss

        def f(p):
            return plain_loss(eqx.combine(p, static), pgrid, v, c, eps)

        loss, grads = jax.value_and_grad(f)(params)
        updates, opt_state = opt.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    params_p = params  # the same initial weights
    t0 = time.perf_counter()
    with gc_paused():  # the compile times compare the programs, measured alike
        lowered_p = jax.jit(plain_step).lower(
            params_p, opt.init(params_p), *pbatches[0], key0
        )
    t_lower_p = time.perf_counter() - t0
    t0 = time.perf_counter()
    with gc_paused():
        plain_c = lowered_p.compile()
    t_compile_p = time.perf_counter() - t0

    # ------------------------------------------------------------------ torch
    def lin(layer):
        m = torch.nn.Linear(layer.in_features, layer.out_features)
        with torch.no_grad():
            m.weight.copy_(torch.tensor(np.asarray(layer.weight)))
            m.bias.copy_(torch.tensor(np.asarray(layer.bias)))
        return m

    def seq(mlp):
        return torch.nn.ModuleList([lin(layer) for layer in mlp.layers])

    def run(layers, x):
        for i, layer in enumerate(layers):
            x = layer(x)
            if i < len(layers) - 1:
                x = torch.tanh(x)
        return x

    class Dynamics(torch.nn.Module):
        def __init__(self, layers):
            super().__init__()
            self.layers = layers
            self.nfe = 0

        def forward(self, t, z):
            self.nfe += 1
            return run(self.layers, z)

    class TorchLatentODE(torch.nn.Module):
        def __init__(self, m):
            super().__init__()
            enc = m.encoder
            self.enc_field = seq(enc.vector_field)
            gru = enc.gru
            self.gate_hidden = lin(gru.gate_hidden)
            self.gate_weight = torch.nn.Parameter(
                torch.tensor(np.asarray(gru.gate_weight))
            )
            self.gate_bias = torch.nn.Parameter(torch.tensor(np.asarray(gru.gate_bias)))
            self.candidate = seq(enc.gru.candidate)
            self.to_z0 = seq(m.to_z0)
            self.dynamics = Dynamics(seq(m.dynamics))
            self.decoder = seq(m.decoder)
            self.log_std = float(np.log(m.obs_std))
            self.std_shift = m.std_shift

        def gru(self, h, x):
            hx = torch.cat([h, x], -1)
            a = torch.tanh(self.gate_hidden(hx)).reshape(hx.shape[0], 2, -1)
            gates = torch.einsum("gou,bgu->gbo", self.gate_weight, a)
            u, r = torch.sigmoid(gates + self.gate_bias[:, None, :])
            c = torch.tanh(run(self.candidate, torch.cat([r * h, x], -1)))
            return (1 - u) * c + u * h

        def loss(self, times, values, context, eps):
            B, T, _ = values.shape
            x = torch.where(context, values, values.new_zeros(()))
            inputs = torch.cat([x, context.float()], -1)
            observed = context.any(-1)
            t_ref = times[0]
            t_last = torch.where(observed, times, times.new_tensor(-float("inf"))).amax(
                1
            )
            h = values.new_zeros(B, self.enc_field[-1].out_features)
            for j in reversed(range(T)):  # ODE-RNN backwards; one Euler step
                h_minus = h + (times[j] - t_last)[:, None] * run(self.enc_field, h)
                obs = observed[:, j]
                h = torch.where(obs[:, None], self.gru(h_minus, inputs[:, j]), h)
                t_last = torch.where(obs, times[j], t_last)
            h = h + (t_ref - t_last)[:, None] * run(self.enc_field, h)
            mean, pre = run(self.to_z0, h).chunk(2, -1)
            std = torch.nn.functional.softplus(pre + self.std_shift) + 1e-5
            z0 = mean + std * eps  # [K, B, L]
            zs = torchdiffeq.odeint(
                self.dynamics, z0, times, rtol=RTOL, atol=ATOL, method="dopri5"
            )  # [T, K, B, L]
            pred = run(self.decoder, zs).permute(1, 2, 0, 3)  # [K, B, T, C]
            z = (values - pred) / np.exp(self.log_std)
            ll = (-0.5 * z**2 - self.log_std - 0.5 * np.log(2 * np.pi)).sum((2, 3))
            lq = (-0.5 * eps**2 - torch.log(std) - 0.5 * np.log(2 * np.pi)).sum(-1)
            lp = (-0.5 * z0**2 - 0.5 * np.log(2 * np.pi)).sum(-1)
            bound = torch.logsumexp(ll + lp - lq, 0) - np.log(eps.shape[0])
            return -bound.sum() / (B * T * values.shape[-1])

    dev = torch.device("cuda" if args.device == "gpu" else "cpu")
    tmodel = TorchLatentODE(model).to(dev)
    topt = torch.optim.Adam(tmodel.parameters(), lr=LR)
    tgrid = torch.from_numpy(grid.astype(np.float32)).to(dev)
    tbatches = [
        (
            torch.from_numpy(values[i * batch : (i + 1) * batch].astype(np.float32)).to(
                dev
            ),
            torch.from_numpy(context[i * batch : (i + 1) * batch]).to(dev),
        )
        for i in range(n_batches)
    ]

    def eps_of(key):  # the noise LatentODE.loss draws from `key`, as a torch tensor
        e = np.array(jax.random.normal(key, (samples, batch, latent)))
        return torch.from_numpy(e).to(dev)

    def torch_step(i, eps):
        v, c = tbatches[i]
        topt.zero_grad()
        loss = tmodel.loss(tgrid, v, c, eps)
        loss.backward()
        topt.step()
        return float(loss.detach())

    # first steps (same weights, batch and noise): losses side by side
    opt_state = opt.init(params)
    t0 = time.perf_counter()
    params, opt_state, loss_j = step_c(params, opt_state, jbatches[0], key0)
    loss_j = float(loss_j)
    t_first_j = time.perf_counter() - t0
    t0 = time.perf_counter()
    loss_t = torch_step(0, eps_of(key0))
    t_first_t = time.perf_counter() - t0
    opt_state_p = opt.init(params_p)
    t0 = time.perf_counter()
    params_p, opt_state_p, loss_p = plain_c(params_p, opt_state_p, *pbatches[0], key0)
    loss_p = float(loss_p)
    t_first_p = time.perf_counter() - t0

    # ------------------------------------------------------------------ timing
    keys = [jax.random.key(100 + i) for i in range(n_batches)]
    teps = [eps_of(k) for k in keys]  # drawn outside the timed loop
    samples_s = {"ctmodels": [], "torchdiffeq": [], "diffrax": []}
    losses = {"ctmodels": [], "torchdiffeq": [], "diffrax": []}
    k = 1
    for _ in range(reps):
        idx = [(k + s) % n_batches for s in range(steps)]
        k += steps
        t0 = time.perf_counter()
        for i in idx:
            params, opt_state, loss = step_c(params, opt_state, jbatches[i], keys[i])
        jax.block_until_ready(loss)
        samples_s["ctmodels"].append((time.perf_counter() - t0) / steps)
        losses["ctmodels"].append(float(loss))
        t0 = time.perf_counter()
        for i in idx:
            loss = torch_step(i, teps[i])
        samples_s["torchdiffeq"].append((time.perf_counter() - t0) / steps)
        losses["torchdiffeq"].append(loss)
        t0 = time.perf_counter()
        for i in idx:
            params_p, opt_state_p, loss = plain_c(
                params_p, opt_state_p, *pbatches[i], keys[i]
            )
        jax.block_until_ready(loss)
        samples_s["diffrax"].append((time.perf_counter() - t0) / steps)
        losses["diffrax"].append(float(loss))

    # solver work at the end of the run: dopri5 steps of the latent solve (JAX, on
    # the last batch) and vector-field evaluations of torchdiffeq's last forward
    from ctmodels import integrate
    from ctmodels.models._latent_ode import _latent_field

    trained = eqx.combine(params, static)
    z0 = jax.random.normal(key0, (samples, batch, latent))
    n_steps_jax = int(
        integrate(
            _latent_field,
            z0,
            jnp.asarray(grid, jnp.float32),
            (trained.dynamics, None, None),
            solver="dopri5",
            rtol=RTOL,
            atol=ATOL,
        ).stats["num_steps"]
    )
    # the plain version's own weights after training
    sol_p = plain_solve(eqx.combine(params_p, static).dynamics, z0, pgrid)
    n_steps_plain = int(sol_p.stats["num_steps"])
    tmodel.dynamics.nfe = 0
    torch_step(idx[-1], teps[idx[-1]])
    nfe_torch = tmodel.dynamics.nfe

    med = {k: statistics.median(v) for k, v in samples_s.items()}
    pairs = zip(samples_s["ctmodels"], samples_s["torchdiffeq"], strict=True)
    per_round = [t / c for c, t in pairs]
    pairs = zip(samples_s["ctmodels"], samples_s["diffrax"], strict=True)
    per_round_p = [p / c for c, p in pairs]
    compile_times = {
        "ctmodels": (t_lower, t_compile),
        "diffrax": (t_lower_p, t_compile_p),
        "torchdiffeq": (0.0, 0.0),
    }
    for impl, first_loss, first_s in (
        ("ctmodels", loss_j, t_first_j),
        ("torchdiffeq", loss_t, t_first_t),
        ("diffrax", loss_p, t_first_p),
    ):
        emit(
            {
                "impl": impl,
                "median_s": med[impl],
                "min_s": min(samples_s[impl]),
                "times_s": [round(t, 6) for t in samples_s[impl]],
                "first_step_loss": first_loss,
                "last_loss": losses[impl][-1],
                "first_step_s": first_s,
                "trace_lower_s": compile_times[impl][0],
                "compile_s": compile_times[impl][1],
                "final_latent_steps": {
                    "ctmodels": n_steps_jax,
                    "diffrax": n_steps_plain,
                }.get(impl),
                "final_latent_nfe_fwd": nfe_torch if impl == "torchdiffeq" else None,
            }
        )
    emit(
        {
            "summary": True,
            "torch_over_ctmodels": med["torchdiffeq"] / med["ctmodels"],
            "torch_over_ctmodels_by_min": min(samples_s["torchdiffeq"])
            / min(samples_s["ctmodels"]),
            # rounds interleave, so each round's ratio compares like with like (the
            # step cost grows with training in both implementations)
            "torch_over_ctmodels_per_round": [round(r, 3) for r in per_round],
            "torch_over_ctmodels_per_round_median": statistics.median(per_round),
            "first_loss_rel_diff": abs(loss_j - loss_t) / abs(loss_t),
            # the same model in plain Diffrax + Equinox (>= 1: ctmodels not slower)
            "diffrax_over_ctmodels": med["diffrax"] / med["ctmodels"],
            "diffrax_over_ctmodels_by_min": min(samples_s["diffrax"])
            / min(samples_s["ctmodels"]),
            "diffrax_over_ctmodels_per_round_median": statistics.median(per_round_p),
            "first_loss_rel_diff_diffrax": abs(loss_j - loss_p) / abs(loss_p),
            "series": n_series,
            "times": n_times,
            "context": n_context,
            "batch": batch,
            "latent": latent,
            "encoder_size": enc_size,
            "units": units,
            "samples": samples,
            "reps": reps,
            "steps_per_rep": steps,
            "quick": args.quick,
            "device": args.device,
            "jax_device": jax.devices()[0].device_kind,
            "torch_device": (
                torch.cuda.get_device_name() if args.device == "gpu" else "cpu"
            ),
            "load_avg_1min": os.getloadavg()[0],
            "jax": jax.__version__,
            "torch": torch.__version__,
        }
    )


if __name__ == "__main__":
    main()
