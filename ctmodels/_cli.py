"""The `ctmodels` console script."""

from __future__ import annotations

import argparse
import sys


def _solvers(ns) -> int:
    import pandas as pd

    from . import solvers

    table = solvers.available(ns.kind)
    if ns.format == "csv":
        table.to_csv(sys.stdout, index=False)
    elif ns.format == "json":
        sys.stdout.write(table.to_json(orient="records", indent=1) + "\n")
    else:
        table = table.astype(object).where(pd.notna(table), "")
        with pd.option_context("display.max_colwidth", 80, "display.width", 200):
            print(table.to_string(index=False))
    return 0


def _datasets(ns) -> int:
    import pandas as pd

    from . import datasets

    if ns.action == "show":
        if not ns.name:
            raise SystemExit("ctmodels datasets show: give a dataset NAME")
        print(datasets.card(ns.name))
        return 0
    with pd.option_context("display.max_colwidth", 60, "display.width", 200):
        print(datasets.available().to_string(index=False))
    return 0


def _fit(ns) -> int:
    import json

    from ._outputs import json_safe

    if ns.model == "latent-ode":
        from ._latent_job import fit_latent_ode

        options = dict(
            seed=ns.seed,
            solver=ns.solver or "dopri5",
            batch_size=ns.batch_size,
            latent_size=ns.latent_size,
            learning_rate=ns.learning_rate,
            epochs=ns.epochs,
            adjoint=ns.adjoint,
        )
        if ns.patience is not None:
            options["patience"] = ns.patience
        if ns.anchor is not None:
            options["anchor"] = ns.anchor
        if ns.overwrite:
            options["overwrite"] = True
        progress = False if ns.quiet else None
        metrics = fit_latent_ode(ns.data, ns.out, progress=progress, **options)
        test = metrics["test"]
        summary = {
            "out": str(ns.out),
            "channels": metrics.get("channels"),
            "ignored_variables": metrics.get("ignored_variables"),
            "recipe": metrics["recipe"],
            "epochs_run": metrics["epochs_run"],
            "fit_seconds": metrics["fit_seconds"],
            "test_interpolation_mse": test["interpolation"]["mse"],
            "test_extrapolation_mse": test["extrapolation"]["mse"],
            "test_coverage_90": {k: v.get("coverage_90") for k, v in test.items()},
            "baselines": {k: v["baselines"] for k, v in test.items()},
        }
        print(json.dumps(json_safe(summary), indent=1, default=str))
        return 0
    from ._node_job import run_neural_ode

    if ns.overwrite:
        raise ValueError(
            "--overwrite applies to latent-ode only: the neural-ode job keeps no "
            "checkpoint and always starts afresh."
        )

    if ns.patience is not None:
        raise ValueError(
            "--patience applies to latent-ode only: the neural-ode job trains for "
            "--epochs without early stopping."
        )
    if ns.anchor is not None:
        raise ValueError(
            "--anchor applies to latent-ode only (where its latent state is "
            "anchored); the neural-ode job has no encoder."
        )
    options = dict(
        seed=ns.seed, solver=ns.solver or "tsit5", adjoint=ns.adjoint,
        latent=ns.latent_size,
    )  # fmt: skip
    given = {"epochs": ns.epochs, "batch_size": ns.batch_size, "lr": ns.learning_rate}
    options.update({k: v for k, v in given.items() if v is not None})
    metrics = run_neural_ode(data=ns.data, out=ns.out, progress=not ns.quiet, **options)
    print(json.dumps(metrics, indent=1, default=str))
    return 0


def _predict(ns) -> int:
    from ._latent_job import predict_checkpoint

    pred = predict_checkpoint(
        ns.checkpoint,
        ns.data,
        ns.out,
        n_samples=ns.samples,
        seed=ns.seed,
        plots=ns.plots,
    )
    print(f"wrote {ns.out}: variables {sorted(map(str, pred.data_vars))}")
    return 0


def _evaluate(ns) -> int:
    import json

    from ._latent_job import evaluate_checkpoint
    from ._outputs import json_safe

    metrics = evaluate_checkpoint(
        ns.checkpoint, ns.data, task=ns.task, out=ns.out, seed=ns.seed
    )
    print(json.dumps(json_safe(metrics), indent=1, default=str))
    return 0


def _positive_int(text: str) -> int:
    """argparse type: an int >= 1 (else a one-line usage error)."""
    try:
        value = int(text)
    except ValueError:
        msg = f"expected an int >= 1, got {text!r}"
        raise argparse.ArgumentTypeError(msg) from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an int >= 1, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    from . import __version__
    from .solvers import KINDS

    parser = argparse.ArgumentParser(
        prog="ctmodels",
        description="Continuous-time models and implicit layers on JAX.",
    )
    parser.add_argument(
        "--version", action="version", version=f"ctmodels {__version__}"
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser(
        "solvers",
        help="list the solver registry",
        description="List the solver registry: name, kind, capability tags, doc.",
    )
    p.add_argument("--kind", choices=KINDS, help="only entries of this kind")
    p.add_argument(
        "--format", choices=("table", "csv", "json"), default="table",
        help="output format (default: table)",
    )  # fmt: skip
    p.set_defaults(func=_solvers)

    p = sub.add_parser(
        "datasets",
        help="list the bundled datasets, or show one's data card",
        description="List the datasets (`ctmodels datasets`) or print a data card "
        "(`ctmodels datasets show NAME`).",
    )
    p.add_argument("action", nargs="?", choices=("list", "show"), default="list")
    p.add_argument("name", nargs="?", help="dataset name (for show)")
    p.set_defaults(func=_datasets)

    p = sub.add_parser(
        "fit",
        help="fit a model to a dataset",
        description="Fit a model and write history.csv, metrics.json, "
        "predictions.nc and plots into --out (latent-ode: plots/series_<id>.png and "
        "the checkpoint/ that predict and evaluate read; neural-ode: plot.png).",
    )
    p.add_argument(
        "model", choices=("latent-ode", "neural-ode"), help="the model to fit"
    )
    p.add_argument(
        "--data", required=True,
        help="a bundled dataset name (see `ctmodels datasets`) or a netCDF path",
    )  # fmt: skip
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument(
        "--epochs", type=int, default=None,
        help="training epochs (default: latent-ode: the dataset's recipe, 40, "
        "periodic 200; neural-ode: 150)",
    )  # fmt: skip
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument(
        "--solver", default=None,
        help="ODE solver registry name (default dopri5 for latent-ode, tsit5 for "
        "neural-ode)",
    )  # fmt: skip
    p.add_argument(
        "--batch-size", type=int, default=None,
        help="series per batch (default 32; latent-ode on periodic: 50)",
    )  # fmt: skip
    p.add_argument(
        "--latent-size",
        type=_positive_int,
        default=8,
        help="latent state size (default 8)",
    )
    p.add_argument(
        "--learning-rate", type=float, default=None,
        help="peak Adam step (default: latent-ode: the dataset's recipe, 1e-2, "
        "periodic 2e-3; neural-ode: 3e-3)",
    )  # fmt: skip
    p.add_argument(
        "--patience", type=int, default=None,
        help="latent-ode: early-stopping patience in epochs, 0 = off (default: the "
        "dataset's recipe; 10, periodic off)",
    )  # fmt: skip
    p.add_argument(
        "--anchor", choices=("first", "last"), default=None,
        help="latent-ode: where the inferred latent state sits: 'first' (the "
        "paper's model, the batch's first time; default) or 'last' (each series' "
        "last context observation, the encoder run forwards; see LatentODE)",
    )  # fmt: skip
    p.add_argument(
        "--adjoint",
        default="checkpoint",
        help="adjoint registry name (default checkpoint)",
    )
    p.add_argument(
        "--overwrite", action="store_true",
        help="latent-ode: start afresh in --out, replacing the run there (by "
        "default a run in --out is resumed if its options match, else refused)",
    )  # fmt: skip
    p.add_argument("--quiet", action="store_true", help="no progress output")
    p.set_defaults(func=_fit)

    p = sub.add_parser(
        "predict",
        help="predict with a fitted latent ODE",
        description="Condition on the observed (non-NaN) values of --data and write, "
        "on its own dims and coordinates, each variable V as the predicted mean and "
        "V_std as the predictive standard deviation at every position with a valid "
        "time (hidden values with kept times = interpolation; future times with NaN "
        "values = extrapolation).",
    )
    p.add_argument(
        "--checkpoint", required=True,
        help="checkpoint directory (a `fit` --out directory or its checkpoint/)",
    )  # fmt: skip
    p.add_argument("--data", required=True, help="netCDF path or bundled name")
    p.add_argument("--out", required=True, help="output netCDF path")
    p.add_argument(
        "--samples", type=_positive_int, default=16,
        help="posterior samples (default 16)",
    )  # fmt: skip
    p.add_argument("--seed", type=int, default=0, help="random seed")
    p.add_argument("--plots", default=None, help="directory for per-series PNGs")
    p.set_defaults(func=_predict)

    p = sub.add_parser(
        "evaluate",
        help="interpolation/extrapolation MSE of a fitted latent ODE",
        description="Hide 50% of the observed values (interpolation) or the second "
        "half of each series' time span (extrapolation) and report the MSE of the "
        "model and of LOCF / linear interpolation, in normalised units, and how often "
        "the model's 90% predictive interval holds the hidden values, as JSON.",
    )
    p.add_argument(
        "--checkpoint", required=True,
        help="checkpoint directory (a `fit` --out directory or its checkpoint/)",
    )  # fmt: skip
    p.add_argument("--data", required=True, help="netCDF path or bundled name")
    p.add_argument(
        "--task", choices=("interpolation", "extrapolation", "both"), default="both",
        help="which task to score (default both)",
    )  # fmt: skip
    p.add_argument("--out", default=None, help="write the metrics JSON here too")
    p.add_argument("--seed", type=int, default=0, help="random seed")
    p.set_defaults(func=_evaluate)
    return parser


def _enable_compilation_cache() -> None:
    """Persist XLA compilations across runs, so a second `ctmodels fit`/`predict`
    starts warm. Location: `$CTMODELS_JAX_CACHE` (empty to disable), else
    `$XDG_CACHE_HOME/ctmodels/jax` or `~/.cache/ctmodels/jax`."""
    import os
    from pathlib import Path

    path = os.environ.get("CTMODELS_JAX_CACHE")
    if path == "":
        return
    if path is None:
        base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
        path = str(Path(base) / "ctmodels" / "jax")
    import jax

    if jax.config.jax_compilation_cache_dir:  # the user configured one already
        return
    try:
        Path(path).mkdir(parents=True, exist_ok=True)
    except OSError:
        return  # read-only home: run without the cache
    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)


def _process_wide_nan_checks() -> None:
    """Run the command with Equinox's runtime checks in NaN mode (unless the user set
    `EQX_ON_ERROR`), as if started with `EQX_ON_ERROR=nan`.

    Diffrax's own checks then compile without host callbacks, and so do fit's
    training steps (ctmodels' checks there already are; see
    `ctmodels._errors.traced_failures`): JAX's persistent compilation cache can store
    them and a second run starts warm. Nothing is lost: fit's NaN guard catches a
    failed solve and names it, and predictions and evaluations keep ctmodels' own
    checks, which raise. Only for the `ctmodels` command (a whole process), set
    before anything is traced: changing it mid-process could mix cached traces.
    """
    import os

    if "EQX_ON_ERROR" in os.environ:
        return
    import equinox._errors as eqx_errors

    if hasattr(eqx_errors, "EQX_ON_ERROR"):
        eqx_errors.EQX_ON_ERROR = "nan"


def entry() -> int:
    """The `ctmodels` command (and `python -m ctmodels`)."""
    _process_wide_nan_checks()
    return main()


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    ns = parser.parse_args(argv)
    if not getattr(ns, "func", None):
        parser.print_help()
        return 2
    if ns.command in ("fit", "predict", "evaluate"):
        _enable_compilation_cache()
    import warnings

    from ._errors import SolverError

    def one_line(message, category, filename, lineno, line=None):
        kind = "" if category is UserWarning else f" ({category.__name__})"
        return f"ctmodels {ns.command}: warning{kind}: {message}\n"

    plain, warnings.formatwarning = warnings.formatwarning, one_line
    try:
        return ns.func(ns)
    except (ValueError, OSError, ImportError, SolverError) as err:
        # bad input, a path that cannot be written, a failed solve: one readable
        # line, not a traceback
        print(f"ctmodels {ns.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        again = (
            " The last checkpoint in --out was kept: rerun the same command "
            "(without --overwrite) to resume."
            if ns.command == "fit" and getattr(ns, "model", "") == "latent-ode"
            else ""
        )
        print(f"ctmodels {ns.command}: interrupted.{again}", file=sys.stderr)
        return 130
    finally:
        warnings.formatwarning = plain


if __name__ == "__main__":
    sys.exit(entry())
