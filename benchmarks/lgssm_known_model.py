"""Maximum-likelihood fit of a known continuous-time linear-Gaussian model observed at
irregular times: ctmodels.lgssm against dynamax and cd-dynamax.

Data (float64, per seed): the model `dx = A x dt + L dW`, `y = H x + v`,
`v ~ N(0, R)`, latent size 3 (a damped oscillator, period ~2.1, decay time 10, and a
slower mode it drives), 2 observed channels (a random `H`, noise std 0.3 and 0.4),
`x(t_0)` from the stationary distribution. Each sequence has 100 times with gaps
drawn `Exp(mean 0.25)` (a gap lies between 0 and ~1.5 times the oscillation's period,
so equal spacing is badly wrong), and each value is missing independently with
probability 0.2 (a step with both channels missing is a pure prediction step).
Sequences are simulated exactly (transitions from `scipy.linalg.expm` of Van Loan's
block matrix, an oracle independent of ctmodels). 24 training and 32 test sequences.

Fits (every one by maximum likelihood, full batch, the same optimiser: optax Adam,
step 0.05 on a cosine decay to 0.005 over `--steps` steps (default 200), from the
same initial model):

- `ctmodels`: `ctmodels.lgssm.LinearSDE` (its stable parametrisation of `A`, the
  diffusion's Cholesky factor, the stationary initial distribution) with a free
  `H` and a Cholesky-factored `R`; the loss is `-sum log_marginal_likelihood / n`
  over the training sequences (the exact discretisation at each sequence's own
  times, masks for the missing values); jitted.
- `cd-dynamax`: `cd_dynamax.cdlgssm_filter` (its continuous-discrete Kalman filter:
  the transition over each interval from a Diffrax solve of the moment ODEs, here
  Tsit5 with an adaptive step, rtol 1e-6, atol 1e-8, 5x faster than its default
  constant step 0.01 and as exact; `emission_mask` for the missing values)
  on `ParamsCDLGSSM` built from free `A` (cd-dynamax's parametrisation: unconstrained
  drift), Cholesky-factored `L Qc L^T` (`L = I`), free `H`, Cholesky `R`, free initial
  mean and Cholesky initial covariance, no biases. Its own `fit_sgd` cannot take
  `emission_mask`, so the same Adam loop as ctmodels' drives it (same steps, same
  schedule).
- `dynamax`: `dynamax.linear_gaussian_ssm.lgssm_filter` (discrete time) on the same
  observations treated as equally spaced, one step per observation: free `F`,
  Cholesky `Q`, free `H`, Cholesky `R`, free initial mean and covariance, no
  biases. dynamax has no missing-value support (its EM cannot take a mask), so a
  missing channel enters as cd-dynamax does it: a zero row of `H`, `R`'s diagonal
  `1/(2 pi)` there and `y = 0`, which scores exactly 0; the same Adam loop. This is
  the honest peer for irregular data in a discrete-time package: it cannot know the
  gaps.
- `true`: the data's own parameters, no fitting.

Initial model for every fit: ctmodels' `LinearSDE(3, rate=1)` (A near -I,
stationary covariance I) with `H ~ 0.5 N(0, 1)`, `R = 0.5 I`, from the seed; the
discrete peer starts from its exact discretisation at the mean gap.

Reported per seed and model: test log-likelihood per observed value (sum of
`log p(y)` of the observed test values, each model scored by its own filter,
divided by their number), the fit's compile and run wall times (CPU, one thread,
float64) and the final training loss; then mean and sample std over seeds, and
whether ctmodels' fit is within 1% of the true model's (issue 20's target:
`|ll_fit - ll_true| <= 0.01 |ll_true|`). Checks in every run: the true model's test
log-likelihood from ctmodels, from cd-dynamax's filter and from dynamax's filter with
the exact per-interval transitions (scipy) agree (`true_check_*`).

Output: one JSON line per (seed, model) in `benchmarks/results/lgssm_known_model.jsonl`
(and on stdout), a summary line, then a Markdown table.

Usage (dynamax and cd-dynamax in their own environment, not ctmodels' dependencies):
  python benchmarks/lgssm_known_model.py [--seeds 0 1 2] [--steps 200]
  python benchmarks/lgssm_known_model.py --quick   # smoke run
  python benchmarks/lgssm_known_model.py --summarise \
      benchmarks/results/lgssm_known_model.jsonl   # the table of a recorded run
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _timing import emit, package_version, read_jsonl, single_thread  # noqa: E402

single_thread()

import argparse  # noqa: E402
import functools  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402
import scipy.linalg  # noqa: E402

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
D, C = 3, 2
MEAN_GAP = 0.25
P_MISSING = 0.2
LR, LR_END = 0.05, 0.005
FITTED = ("ctmodels", "cd-dynamax", "dynamax")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--steps", type=int, default=200, help="Adam steps per fit")
    p.add_argument("--train", type=int, default=24, help="training sequences")
    p.add_argument("--test", type=int, default=32, help="test sequences")
    p.add_argument("--length", type=int, default=100, help="times per sequence")
    p.add_argument("--models", nargs="+", default=list(FITTED), choices=FITTED)
    p.add_argument("--quick", action="store_true", help="small sizes, smoke run")
    p.add_argument("--out", default=os.path.join(RESULTS, "lgssm_known_model.jsonl"))
    args = p.parse_args(argv)
    if args.quick:
        args.seeds = args.seeds[:1]
        args.steps = min(args.steps, 20)
        args.train, args.test, args.length = 8, 8, 30
        args.out = args.out.replace(".jsonl", "_quick.jsonl")
    return args


# ------------------------------------------------------------------ the known model


def true_params():
    w, decay = 3.0, 0.1  # angular frequency (period 2.09), decay rate of the pair
    A = np.array([[-decay, -w, 0.0], [w, -decay, 0.0], [0.3, 0.0, -0.4]])
    Qc = np.diag([0.2, 0.2, 0.3])  # L L^T
    H = np.array([[1.0, 0.0, 0.5], [0.3, 0.8, -0.7]])
    R = np.diag([0.3, 0.4]) ** 2
    return A, Qc, H, R


def van_loan(A, Qc, dt):
    """Exact `(F, Q)` over `dt` by scipy's expm of Van Loan's block (the oracle)."""
    n = A.shape[0]
    M = np.block([[-A, Qc], [np.zeros_like(A), A.T]]) * dt
    E = scipy.linalg.expm(M)
    F = E[n:, n:].T
    Q = F @ E[:n, n:]
    return F, 0.5 * (Q + Q.T)


def stationary(A, Qc):
    return scipy.linalg.solve_continuous_lyapunov(A, -Qc)


def simulate(rng, n, T, params):
    A, Qc, H, R = params
    gaps = rng.exponential(MEAN_GAP, (n, T - 1))
    times = np.concatenate([np.zeros((n, 1)), np.cumsum(gaps, 1)], 1)
    P = stationary(A, Qc)
    ys = np.empty((n, T, C))
    for i in range(n):
        x = rng.multivariate_normal(np.zeros(D), P)
        for t in range(T):
            if t:
                F, Q = van_loan(A, Qc, gaps[i, t - 1])
                x = F @ x + rng.multivariate_normal(np.zeros(D), Q)
            ys[i, t] = H @ x + rng.multivariate_normal(np.zeros(C), R)
    mask = rng.random((n, T, C)) >= P_MISSING
    ys = np.where(mask, ys, np.nan)  # every model must ignore the missing values
    return times, ys, mask


# ------------------------------------------------------------------ helpers


def chol_raw(S):
    """Lower Cholesky factor with log diagonal: the free parameter of a covariance."""
    L = np.linalg.cholesky(S)
    return np.tril(L, -1) + np.diag(np.log(np.diag(L)))


def main(argv=None):
    args = parse_args(argv)
    try:
        import cd_dynamax
        import dynamax.linear_gaussian_ssm.inference as dyn_inf
    except ImportError as e:
        raise SystemExit(
            "benchmarks/lgssm_known_model.py compares against dynamax and cd-dynamax, "
            f"which are not installed ({e}). They are not ctmodels dependencies: "
            "install them in a separate environment (pip install dynamax cd-dynamax) "
            "next to ctmodels and run this script there."
        ) from None

    import equinox as eqx
    import jax
    import jax.numpy as jnp
    import optax

    jax.config.update("jax_enable_x64", True)
    import ctmodels.lgssm as lg

    def cov_of(raw):
        L = jnp.tril(raw, -1) + jnp.diag(jnp.exp(jnp.diagonal(raw)))
        return L @ L.T

    def dyn_masked(H, R, y, mask):
        """dynamax has no masks: time-varying H, R with a missing channel's row of H
        zero, R's row/column zero and diagonal 1/(2 pi), y = 0 (scores exactly 0;
        cd-dynamax's own convention)."""
        m = mask.astype(H.dtype)  # [T, C]
        Ht = m[:, :, None] * H[None]
        Rt = m[:, :, None] * R[None] * m[:, None, :]
        Rt = Rt + jax.vmap(jnp.diag)((1 - m) / (2 * jnp.pi))
        return Ht, Rt, jnp.where(mask, y, 0.0)

    # ---- per-model log-likelihood of one sequence, from free parameters
    def ll_ctmodels(p, times, y, mask):
        sde, H, R_raw = p
        ssm = sde.ssm(times, emission=H, emission_cov=cov_of(R_raw))
        return lg.log_marginal_likelihood(ssm, y, mask)

    def cd_params(p):
        A, Qc_raw, H, R_raw, m0, P0_raw = p
        from cd_dynamax.src.continuous_discrete_linear_gaussian_ssm.cdlgssm_utils import (  # noqa: E501
            ParamsCDLGSSM,
            ParamsCDLGSSMDynamics,
            ParamsLGSSMEmissions,
            ParamsLGSSMInitial,
        )

        return ParamsCDLGSSM(
            initial=ParamsLGSSMInitial(mean=m0, cov=cov_of(P0_raw)),
            dynamics=ParamsCDLGSSMDynamics(
                weights=A,
                bias=jnp.zeros(D),
                input_weights=jnp.zeros((D, 0)),
                diffusion_coefficient=jnp.eye(D),
                diffusion_cov=cov_of(Qc_raw),
            ),  # fmt: skip
            emissions=ParamsLGSSMEmissions(
                weights=H,
                bias=jnp.zeros(C),
                input_weights=jnp.zeros((C, 0)),
                cov=cov_of(R_raw),
            ),  # fmt: skip
        )

    def ll_cd(p, times, y, mask):
        post = cd_dynamax.cdlgssm_filter(
            cd_params(p), jnp.where(mask, y, 0.0), times[:, None],
            CD_SETTINGS, output_fields=[], warn=False, emission_mask=mask,
        )  # fmt: skip
        return post.marginal_loglik

    def ll_dyn(p, times, y, mask):
        F, Q_raw, H, R_raw, m0, P0_raw = p
        if F.ndim == 2:  # one transition, equally spaced steps
            F_t, Q_t = F, cov_of(Q_raw)
        else:  # (the check) exact per-interval transitions given as [T, D, D]
            F_t, Q_t = F, Q_raw
        Ht, Rt, y0 = dyn_masked(H, cov_of(R_raw), y, mask)
        params = dyn_inf.make_lgssm_params(
            m0, cov_of(P0_raw), F_t, Q_t, Ht, Rt,
        )  # fmt: skip
        return dyn_inf.lgssm_filter(params, y0).marginal_loglik

    import diffrax

    # cd-dynamax's defaults (Dopri5, constant step 0.01, max_steps 1e5) took 3.2 s
    # for one gradient over 8 sequences here; Tsit5 with an adaptive step (rtol
    # 1e-6, atol 1e-8) took 0.64 s and is as exact (the true model's log-likelihood
    # agrees with ctmodels' to 1e-9)
    CD_SETTINGS = cd_dynamax.KFHyperParams(
        diffeqsolve_settings=dict(
            solver=diffrax.Tsit5(),
            stepsize_controller=diffrax.PIDController(rtol=1e-6, atol=1e-8),
            dt0=0.05, max_steps=64,
        )
    )  # fmt: skip

    LL = {"ctmodels": ll_ctmodels, "cd-dynamax": ll_cd, "dynamax": ll_dyn}

    def total_ll(fn, p, data):
        times, y, mask = data
        return jnp.sum(jax.vmap(fn, in_axes=(None, 0, 0, 0))(p, times, y, mask))

    def fit(name, p0, data, steps):
        n_obs = float(np.sum(data[2]))
        params, static = eqx.partition(p0, eqx.is_inexact_array)
        sched = optax.cosine_decay_schedule(LR, steps, alpha=LR_END / LR)
        opt = optax.adam(sched)

        def loss(q):
            return -total_ll(LL[name], eqx.combine(q, static), data) / n_obs

        @jax.jit
        def step(q, s):
            val, g = jax.value_and_grad(loss)(q)
            upd, s = opt.update(g, s, q)
            return optax.apply_updates(q, upd), s, val

        s = opt.init(params)
        t0 = time.perf_counter()
        compiled = step.lower(params, s).compile()
        t_compile = time.perf_counter() - t0
        t0 = time.perf_counter()
        losses = []
        for _ in range(steps):
            params, s, val = compiled(params, s)
            losses.append(val)
        jax.block_until_ready(params)
        t_run = time.perf_counter() - t0
        losses = [float(v) for v in losses]
        return eqx.combine(params, static), t_compile, t_run, losses

    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    rows = []
    with open(args.out, "w") as fh:
        for seed in args.seeds:
            rng = np.random.default_rng(seed)
            truth = true_params()
            train = [
                jnp.asarray(a) for a in simulate(rng, args.train, args.length, truth)
            ]
            test = [
                jnp.asarray(a) for a in simulate(rng, args.test, args.length, truth)
            ]
            n_test = float(np.sum(test[2]))

            # the true model, scored three ways (each an independent check)
            A, Qc, H, R = truth

            def ll_true_ct(times, y, mask, A=A, Qc=Qc, H=H, R=R):
                F, Q = lg.discretise(A, Qc, jnp.diff(times))
                ssm = lg.LinearGaussianSSM(jnp.zeros(D), stationary(A, Qc), F, Q, H, R)
                return lg.log_marginal_likelihood(ssm, y, mask)

            ll_true = float(jnp.sum(jax.vmap(ll_true_ct)(*test))) / n_test
            true_cd = (jnp.asarray(A), jnp.asarray(chol_raw(Qc)), jnp.asarray(H),
                       jnp.asarray(chol_raw(R)), jnp.zeros(D),
                       jnp.asarray(chol_raw(stationary(A, Qc))))  # fmt: skip
            ll_true_cd = float(total_ll(ll_cd, true_cd, test)) / n_test
            # dynamax given the exact transitions per interval (scipy), one sequence
            # at a time (its time-varying F, Q: F[t] maps step t-1 to t)
            ll_true_dyn = 0.0
            for i in range(args.test):
                gaps = np.diff(np.asarray(test[0][i]))
                FQ = [van_loan(A, Qc, g) for g in gaps]
                F_t = jnp.asarray(np.stack([np.eye(D)] + [f for f, _ in FQ]))
                Q_t = jnp.asarray(np.stack([np.eye(D)] + [q for _, q in FQ]))
                p = (F_t, Q_t, jnp.asarray(H), jnp.asarray(chol_raw(R)), jnp.zeros(D),
                     jnp.asarray(chol_raw(stationary(A, Qc))))  # fmt: skip
                ll_true_dyn += float(ll_dyn(p, test[0][i], test[1][i], test[2][i]))
            ll_true_dyn /= n_test
            row = {"seed": seed, "model": "true", "test_ll_per_obs": ll_true,
                   "true_check_cd_dynamax": ll_true_cd,
                   "true_check_dynamax_exact": ll_true_dyn,
                   "n_test_obs": n_test}  # fmt: skip
            emit(row, fh)
            rows.append(row)

            # ---- the common initial model
            key = jax.random.key(seed + 100)
            ks, kh = jax.random.split(key)
            sde0 = lg.LinearSDE(D, rate=1.0, key=ks)
            H0 = 0.5 * jax.random.normal(kh, (C, D))
            R0 = 0.5 * np.eye(C)
            A0 = np.asarray(sde0.drift())
            Qc0 = np.asarray(sde0.diffusion_cov())
            P00 = stationary(A0, Qc0)
            F0, Q0 = van_loan(A0, Qc0, MEAN_GAP)
            inits = {
                "ctmodels": (sde0, H0, jnp.asarray(chol_raw(R0))),
                "cd-dynamax": (
                    jnp.asarray(A0),
                    jnp.asarray(chol_raw(Qc0)),
                    H0,
                    jnp.asarray(chol_raw(R0)),
                    jnp.zeros(D),
                    jnp.asarray(chol_raw(P00)),
                ),  # fmt: skip
                "dynamax": (
                    jnp.asarray(F0),
                    jnp.asarray(chol_raw(Q0)),
                    H0,
                    jnp.asarray(chol_raw(R0)),
                    jnp.zeros(D),
                    jnp.asarray(chol_raw(P00)),
                ),  # fmt: skip
            }
            for name in args.models:
                print(f"[{time.strftime('%H:%M:%S')}] seed {seed}: fitting {name}",
                      file=sys.stderr, flush=True)  # fmt: skip
                p, t_c, t_r, losses = fit(name, inits[name], train, args.steps)
                score = jax.jit(functools.partial(total_ll, LL[name], data=test))
                ll = float(score(p)) / n_test
                row = {
                    "seed": seed, "model": name, "test_ll_per_obs": ll,
                    "rel_gap_to_true": (ll_true - ll) / abs(ll_true),
                    "compile_s": round(t_c, 2), "fit_s": round(t_r, 2),
                    "steps": args.steps, "first_loss": losses[0],
                    "final_loss": losses[-1],
                    "finite": bool(np.isfinite(ll)),
                }  # fmt: skip
                emit(row, fh)
                rows.append(row)

        summary = summarise(rows, args)
        emit(summary, fh)
    print_table(summary)


def summarise(rows, args=None):
    """Mean and sample std over seeds per model (each (seed, model) counted once:
    the last row recorded), the gap to the true model's test log-likelihood and
    the 1% target, the fit times."""
    last = {(r["seed"], r["model"]): r for r in rows if "model" in r}
    rows = list(last.values())
    summary = {"summary": True}
    names = [m for m in ("true", *FITTED) if any(r["model"] == m for r in rows)]
    for name in names:
        mine = [r for r in rows if r["model"] == name]
        v = [r["test_ll_per_obs"] for r in mine]
        entry = {"mean": statistics.fmean(v),
                 "std": statistics.stdev(v) if len(v) > 1 else 0.0,
                 "seeds": sorted(r["seed"] for r in mine)}  # fmt: skip
        if name != "true":
            gaps = [r["rel_gap_to_true"] for r in mine]
            entry |= {"fit_s_mean": statistics.fmean(r["fit_s"] for r in mine),
                      "compile_s_mean": statistics.fmean(
                          r["compile_s"] for r in mine),
                      "rel_gap_mean": statistics.fmean(gaps),
                      "within_1pct_all_seeds": all(g <= 0.01
                                                   for g in gaps)}  # fmt: skip
        summary[name] = entry
    if args is not None:
        summary |= {
            "seeds": args.seeds, "steps": args.steps, "train": args.train,
            "test": args.test, "length": args.length, "latent": D, "channels": C,
            "mean_gap": MEAN_GAP, "p_missing": P_MISSING, "quick": args.quick,
            "dtype": "float64", "jax": package_version("jax"),
            "dynamax_version": package_version("dynamax"),
            "cd_dynamax_version": package_version("cd_dynamax"),
            "load_avg_1min": os.getloadavg()[0],
        }  # fmt: skip
    return summary


def print_table(summary):
    print()
    print("| model | test log-lik / obs (mean ± std) | seeds | gap to true (mean) | "
          "fit s (compile s) |")  # fmt: skip
    print("| --- | --- | --- | --- | --- |")
    for name in ("true", *FITTED):
        if name not in summary:
            continue
        e = summary[name]
        cell = f"{e['mean']:.4f} ± {e['std']:.4f}"
        n = len(e["seeds"])
        if name == "true":
            print(f"| true model | {cell} | {n} | - | - |")
        else:
            ok = ", within 1% every seed" if e["within_1pct_all_seeds"] else ""
            print(f"| {name} | {cell} | {n} | {100 * e['rel_gap_mean']:.2f} %{ok} | "
                  f"{e['fit_s_mean']:.1f} ({e['compile_s_mean']:.1f}) |")  # fmt: skip


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "--summarise":
        # the table of recorded runs: --summarise FILE.jsonl [FILE.jsonl ...]
        recorded = read_jsonl(sys.argv[2:])
        print_table(summarise(recorded))
    else:
        main()
