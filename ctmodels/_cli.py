"""The `ctmodels` console script."""

from __future__ import annotations

import argparse
import functools
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

    from . import jobs
    from ._outputs import json_safe

    family = jobs.get_family(ns.model)
    options = {
        name: getattr(ns, _dest(name))
        for name in family.options
        if hasattr(ns, _dest(name))
    }
    for text in ns.option or ():
        key, value = _parse_assignment(text)
        job_flag = f"--{key.replace('_', '-')}"
        if key in _JOB_SETTINGS:
            raise ValueError(
                f"--option {text!r}: {key} is a training setting, not a model "
                f"option; give it as {job_flag}."
            )
        if key in options:
            raise ValueError(
                f"--option {text!r} sets {key!r}, which "
                f"--{key.replace('_', '-')} sets too: give it once."
            )
        options[key] = value
    given = {"epochs": ns.epochs, "learning_rate": ns.learning_rate,
             "batch_size": ns.batch_size}  # fmt: skip
    if ns.patience is not None:
        given["patience"] = ns.patience
    if ns.overwrite:
        given["overwrite"] = True
    for name in ("max_plots", "channels", "max_series", "devices"):
        if getattr(ns, name) is not None:
            given[name] = getattr(ns, name)
    if any(x is not None for x in (ns.coordinator, ns.num_processes, ns.process_id)):
        _join_distributed(ns)
    progress = False if ns.quiet else None
    metrics = jobs.fit(
        family.name, ns.data, ns.out, seed=ns.seed, progress=progress, **given,
        **options,
    )  # fmt: skip
    if "test" not in metrics:  # a process other than 0 of a distributed run
        print(json.dumps(json_safe(metrics), indent=1, default=str))
        return 0
    test = metrics["test"]
    summary = {
        "out": str(ns.out),
        "channels": metrics.get("channels"),
        "ignored_variables": metrics.get("ignored_variables"),
        "recipe": metrics["recipe"],
        "epochs_run": metrics["epochs_run"],
        "fit_seconds": metrics["fit_seconds"],
    }
    for task, entry in test.items():
        if isinstance(entry, dict) and "mse" in entry:
            summary[f"test_{task}_mse"] = entry["mse"]
        elif task in ("nll", "bits_per_dim", "baselines"):  # density families
            summary[f"test_{task}"] = entry
    tasks = {k: v for k, v in test.items() if isinstance(v, dict)}
    cover = {k: v.get("coverage_90") for k, v in tasks.items() if "coverage_90" in v}
    if cover:
        summary["test_coverage_90"] = cover
    base = {k: v["baselines"] for k, v in tasks.items() if "baselines" in v}
    if base:
        summary["baselines"] = base
    print(json.dumps(json_safe(summary), indent=1, default=str))
    return 0


def _join_distributed(ns) -> None:
    """`--coordinator HOST:PORT --num-processes N --process-id I`: join a
    `jax.distributed` run before anything else touches JAX (Gloo's collectives on
    CPUs)."""
    given = {"--coordinator": ns.coordinator, "--num-processes": ns.num_processes,
             "--process-id": ns.process_id}  # fmt: skip
    missing = [k for k, v in given.items() if v is None]
    if missing:
        raise ValueError(
            f"{', '.join(missing)} missing: a distributed run needs --coordinator "
            "HOST:PORT (process 0's host and a free port), --num-processes N and "
            "--process-id I (0 to N-1, a different one on every host)."
        )
    if not 0 <= ns.process_id < ns.num_processes:
        raise ValueError(
            f"--process-id {ns.process_id} is not in 0..{ns.num_processes - 1} "
            f"(--num-processes {ns.num_processes})."
        )
    import jax

    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(
        ns.coordinator, num_processes=ns.num_processes, process_id=ns.process_id
    )


def _devices_flag(text: str):
    """argparse type of --devices: an int >= 1 or `all`."""
    return "all" if text == "all" else _positive_int(text)


_JOB_SETTINGS = ("epochs", "learning_rate", "batch_size", "patience", "seed",
                 "overwrite", "max_plots", "channels", "max_series",
                 "devices")  # fmt: skip


def _parse_assignment(text: str):
    from .jobs import parse_assignment

    return parse_assignment(text)


def _dest(name: str) -> str:
    """The argparse attribute of a family option (apart from the job's own)."""
    return f"option_{name}"


def _predict(ns) -> int:
    from . import jobs

    pred = jobs.predict(
        ns.checkpoint,
        ns.data,
        ns.out,
        n_samples=ns.samples,
        seed=ns.seed,
        plots=ns.plots,
        devices=ns.devices,
    )
    print(f"wrote {ns.out}: variables {sorted(map(str, pred.data_vars))}")
    return 0


def _evaluate(ns) -> int:
    import json

    from . import jobs
    from ._outputs import json_safe

    metrics = jobs.evaluate(
        ns.checkpoint, ns.data, task=ns.task, out=ns.out, seed=ns.seed,
        devices=ns.devices,
    )  # fmt: skip
    print(json.dumps(json_safe(metrics), indent=1, default=str))
    return 0


def _sample(ns) -> int:
    from . import jobs

    options = dict(_parse_assignment(text) for text in ns.option or ())
    jobs.sample(ns.checkpoint, ns.out, n=ns.n, seed=ns.seed, devices=ns.devices,
                **options)  # fmt: skip
    print(f"wrote {ns.out}")
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

    _add_fit(sub)

    p = sub.add_parser(
        "predict",
        help="predict with a fitted model",
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
        "--n-samples", dest="samples", type=_positive_int, default=16,
        help="posterior samples (default 16)",
    )  # fmt: skip
    p.add_argument("--samples", dest="samples", type=_positive_int,
                   action=_Deprecated, new="--n-samples",
                   help=argparse.SUPPRESS)  # fmt: skip
    p.add_argument("--seed", type=int, default=0, help="random seed")
    p.add_argument("--plots", default=None, help="directory for per-series PNGs")
    _add_inference_devices(p, "predictions")
    p.set_defaults(func=_predict)

    p = sub.add_parser(
        "evaluate",
        help="the metrics of a fitted model (time series: interpolation and "
        "extrapolation MSE)",
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
        "--task", choices=(*_eval_tasks(), "both"), default="both",
        help="which of the family's evaluation tasks to score (time series: "
        "interpolation, extrapolation; neural-ode: forecast; default both: all)",
    )  # fmt: skip
    p.add_argument("--out", default=None, help="write the metrics JSON here too")
    p.add_argument("--seed", type=int, default=0, help="random seed")
    _add_inference_devices(p, "model's predictions")
    p.set_defaults(func=_evaluate)

    p = sub.add_parser(
        "sample",
        help="draw samples from a fitted model (families that sample)",
        description="Draw --n samples from the model in --checkpoint and write them "
        "to --out (what is sampled and the file's format: the family's; a family "
        "without a sample job says so).",
    )
    p.add_argument(
        "--checkpoint", required=True,
        help="checkpoint directory (a `fit` --out directory or its checkpoint/)",
    )  # fmt: skip
    p.add_argument("--out", required=True, help="output file")
    p.add_argument("-n", "--n", type=_positive_int, default=16,
                   help="number of samples (default 16)")  # fmt: skip
    p.add_argument("--seed", type=int, default=0, help="random seed")
    p.add_argument(
        "--option", action="append", metavar="KEY=VALUE",
        help="a sampling option of the family (VALUE: a JSON literal or a name)",
    )  # fmt: skip
    _add_inference_devices(p, "sampling", " (the same samples as on one device)")
    p.set_defaults(func=_sample)
    return parser


def _add_inference_devices(p, what: str, same: str = "") -> None:
    p.add_argument(
        "--devices", type=_positive_int, default=None,
        help=f"split the {what} over this many local devices{same} (GPUs, or CPU "
        "devices simulated with XLA_FLAGS=--xla_force_host_platform_device_count="
        "N); any count works: batches are padded to a multiple of it (default: 1)",
    )  # fmt: skip


def _eval_tasks() -> list[str]:
    from . import jobs

    names = [t for f in jobs.families().values() for t in f.eval_tasks]
    return list(dict.fromkeys(names))


class _Deprecated(argparse.Action):
    """An old flag spelling: accepted, with a message naming the current one."""

    def __init__(self, option_strings, dest, new=None, **kwargs):
        self.new = new
        super().__init__(option_strings, dest, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None):
        print(
            f"ctmodels: warning: {option_string} is deprecated; use {self.new}.",
            file=sys.stderr,
        )
        setattr(namespace, self.dest, values)


def _flag_type(opt):
    """argparse type of a family option: its own parser, errors as usage errors."""

    def parse(text):
        try:
            return opt.parse(text)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None

    parse.__name__ = opt.flag_type  # argparse names the type in its message
    return parse


def _add_job_flags(p, *, recipe_help) -> None:
    """The training flags every family shares (the recipe's and the run's);
    `recipe_help(key)` says a recipe setting's default."""
    p.add_argument(
        "--data", required=True,
        help="a bundled dataset name (see `ctmodels datasets`) or a netCDF path",
    )  # fmt: skip
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument(
        "--epochs",
        type=int,
        default=None,
        help=f"training epochs (default: {recipe_help('epochs')})",
    )
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument(
        "--batch-size", type=int, default=None,
        help=f"series per batch (default: {recipe_help('batch_size')})",
    )  # fmt: skip
    p.add_argument(
        "--learning-rate", type=float, default=None,
        help=f"peak Adam step (default: {recipe_help('learning_rate')})",
    )  # fmt: skip
    p.add_argument("--lr", dest="learning_rate", type=float, action=_Deprecated,
                   new="--learning-rate", help=argparse.SUPPRESS)  # fmt: skip
    p.add_argument("--quiet", action="store_true", help="no progress output")


def _recipe_words(family, key: str) -> str:
    """`key`'s value in the family's recipe, and where a dataset's recipe differs."""

    def word(v):
        return "off" if v is None else f"{v:g}" if isinstance(v, float) else str(v)

    value = family.recipe[key]
    words = f"the dataset's recipe; {word(value)}"
    # the default recipe's step budget (ctmodels.jobs.budget; docs/cli.md)
    if key == "epochs" and family.recipe.get("min_steps") is not None:
        words += f" or enough for {family.recipe['min_steps']} steps if more"
        if family.recipe.get("max_steps") is not None:
            words += f", at most {family.recipe['max_steps']} steps"
    if (
        key == "patience"
        and value is not None
        and family.recipe.get("patience_fraction")
    ):
        words += f" or {family.recipe['patience_fraction']:g} of the epochs if more"
    for name, r in family.recipes.items():
        if key in r and r[key] != value:
            words += f", {name} {word(r[key])}"
    return words


def _add_fit(sub) -> None:
    from . import jobs

    fams = jobs.families()
    p = sub.add_parser(
        "fit",
        help="fit a model to a dataset",
        description="Fit a model and write history.csv, metrics.json, "
        "predictions.nc and plots into --out, and the checkpoint/ that predict, "
        "evaluate and sample read. "
        "`ctmodels fit MODEL --help` lists a model's options with their defaults.",
    )
    models = p.add_subparsers(dest="model", metavar="MODEL", required=True)
    for name, family in sorted(fams.items()):
        q = models.add_parser(
            name, help=family.summary or family.title,
            description=f"Fit a {family.title} ({family.model.__name__}). Options "
            "left unset take the defaults shown (the model's constructor's, or "
            "the family's own table); the training recipe depends on the dataset.",
        )  # fmt: skip
        _add_job_flags(q, recipe_help=functools.partial(_recipe_words, family))
        q.add_argument(
            "--patience", type=int, default=None,
            help="early-stopping patience in epochs, 0 = off (default: "
            f"{_recipe_words(family, 'patience')})",
        )  # fmt: skip
        q.add_argument(
            "--overwrite", action="store_true",
            help="start afresh in --out, replacing the run there (by default a run "
            "in --out is resumed if its options match, else refused)",
        )  # fmt: skip
        q.add_argument("--max-plots", type=int, default=None,
                       help="test series plotted (default 6)")  # fmt: skip
        q.add_argument("--channels", default=None,
                       help="the variables to model, comma-separated (default: "
                       "every channel of the data)")  # fmt: skip
        q.add_argument(
            "--max-series",
            type=int,
            default=None,
            help="train on a random subset of this many series",
        )
        q.add_argument(
            "--devices", type=_devices_flag, default=None,
            help="train data-parallel on this many local devices (GPUs, or CPU "
            "devices simulated with XLA_FLAGS=--xla_force_host_platform_device_"
            "count=N), or 'all': every device of every process of a distributed "
            "run (--coordinator); the batch size must be a multiple of the count "
            "(default: 1)",
        )  # fmt: skip
        d = q.add_argument_group(
            "several hosts (jax.distributed; docs/scaling.md)",
            "run the same command on every host, each with its own --process-id",
        )
        d.add_argument("--coordinator", default=None, metavar="HOST:PORT",
                       help="process 0's host and a free port")  # fmt: skip
        d.add_argument(
            "--num-processes",
            type=_positive_int,
            default=None,
            metavar="N",
            help="how many processes (hosts) take part",
        )
        d.add_argument(
            "--process-id",
            type=int,
            default=None,
            metavar="I",
            help="this process's number, 0 to N-1 (0 writes --out)",
        )
        g = q.add_argument_group(
            f"{family.model.__name__} options",
            "(also settable as --option KEY=VALUE)",
        )
        for opt in family.options.values():
            default = f"default: {opt.default!r}" if opt.default is not None else (
                "default: none")  # fmt: skip
            words = opt.help or ""
            if opt.where == "loss":
                words = f"in the training loss: {opt.name} ({words.rstrip('.')})."
            help_text = (words.replace("%", "%%") + f" ({default})").strip()
            kw = dict(dest=_dest(opt.name), default=argparse.SUPPRESS,
                      help=help_text)  # fmt: skip
            if opt.flag_type == "bool":
                g.add_argument(opt.flag, action=argparse.BooleanOptionalAction, **kw)
            elif opt.choices is not None:
                g.add_argument(opt.flag, choices=opt.choices, **kw)
            else:
                g.add_argument(opt.flag, type=_flag_type(opt), metavar="X"
                               if opt.flag_type != "str" else "NAME", **kw)  # fmt: skip
        for old, new in jobs.DEPRECATED.items():
            if new in family.options and old not in family.options:
                g.add_argument(f"--{old}", dest=_dest(new), action=_Deprecated,
                               type=_flag_type(family.options[new]),
                               new=family.options[new].flag,
                               default=argparse.SUPPRESS,
                               help=argparse.SUPPRESS)  # fmt: skip
        g.add_argument(
            "--option", action="append", metavar="KEY=VALUE",
            help="any option above by its name (VALUE: a JSON literal or a name, "
            "e.g. --option max_steps=8192 --option solver=tsit5)",
        )  # fmt: skip
        q.set_defaults(func=_fit)


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
    if ns.command in ("fit", "predict", "evaluate", "sample"):
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
            if ns.command == "fit"
            else ""
        )
        print(f"ctmodels {ns.command}: interrupted.{again}", file=sys.stderr)
        return 130
    finally:
        warnings.formatwarning = plain


if __name__ == "__main__":
    sys.exit(entry())
