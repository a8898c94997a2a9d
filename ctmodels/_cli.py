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

    from ._node_job import run_neural_ode

    options = dict(seed=ns.seed, solver=ns.solver, adjoint=ns.adjoint)
    if ns.epochs is not None:
        options["epochs"] = ns.epochs
    metrics = run_neural_ode(data=ns.data, out=ns.out, progress=not ns.quiet, **options)
    print(json.dumps(metrics, indent=1, default=str))
    return 0


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
        "predictions.nc and plot.png into --out.",
    )
    p.add_argument("model", choices=("neural-ode",), help="the model to fit")
    p.add_argument(
        "--data", required=True,
        help="a bundled dataset name (see `ctmodels datasets`) or a netCDF path",
    )  # fmt: skip
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--epochs", type=int, default=None, help="training epochs")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--solver", default="tsit5", help="ODE solver registry name")
    p.add_argument(
        "--adjoint",
        default="checkpoint",
        help="adjoint registry name (default checkpoint)",
    )
    p.add_argument("--quiet", action="store_true", help="no progress output")
    p.set_defaults(func=_fit)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    ns = parser.parse_args(argv)
    if not getattr(ns, "func", None):
        parser.print_help()
        return 2
    from ._errors import SolverError

    try:
        return ns.func(ns)
    except (ValueError, FileNotFoundError, SolverError) as err:
        # bad input: one readable line, not a traceback
        print(f"ctmodels {ns.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
