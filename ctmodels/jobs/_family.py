"""`Family`: what the generic jobs need to know about one model family, and the
registry of families that the command line is built from."""

from __future__ import annotations

import dataclasses
import difflib
import functools
import types
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from . import _series
from ._options import Option, resolve, signature_options

#: The training recipe when a family and dataset give none: Adam on the
#: warmup-cosine schedule of `ctmodels.train.fit` with this peak `learning_rate` and
#: `batch_size`, and early stopping on the validation `monitor` (the best epoch is
#: restored either way). Its length is a step budget (`ctmodels.jobs.budget`, applied
#: once the training split's size is known): at least `epochs` epochs and at least
#: `min_steps` optimiser steps, but no more epochs than fit in `max_steps` (never fewer
#: than one); early stopping after `patience` epochs without a better validation
#: value, or `patience_fraction` of the epochs if that is more (None: no early
#: stopping). The warm-up (5% of the steps) scales with the budget by itself.
#: On pbcseq's 250 training series (8 steps per epoch) the old 40 epochs were 320
#: steps; on 40 series they were 80, and the model predicted about the mean
#: (benchmarks/recipe_budget.py, docs/cli.md).
DEFAULT_RECIPE: Mapping[str, Any] = types.MappingProxyType({
    "epochs": 40,
    "learning_rate": 1e-2,
    "batch_size": 32,
    "patience": 10,
    "monitor": "loss",
    "min_steps": 1000,
    "max_steps": 10_000,
    "patience_fraction": 0.25,
})  # fmt: skip

#: The step-budget settings of a recipe (`ctmodels.jobs.budget`); a per-dataset
#: recipe that names none of them runs its `epochs` as written.
BUDGET_KEYS = ("min_steps", "max_steps", "patience_fraction")


def _num_channels(prepared) -> dict[str, Any]:
    return {"num_channels": prepared.num_channels}


@dataclasses.dataclass(frozen=True, kw_only=True)
class Family:
    """A model family as the jobs see it (`fit`, `predict`, `evaluate`, `sample`, the
    `ctmodels` command). Register one with `register_family`.

    **Arguments:**

    - `name`: the command-line name (`ctmodels fit NAME`), also recorded in the
      checkpoint (`predict`/`evaluate`/`sample` dispatch on it).
    - `model`: the model class, an `equinox.Module` with `loss(batch, *, key)` and
      `hyperparameters` (for checkpoints); `predict(batch, *, key, n_samples)` for the
      time-series `predict`/`evaluate` jobs. Its constructor's keyword-only
      parameters are the family's options, with their defaults (`--help` lists them).
    - `title`: a human name for plots and output attributes (`"latent ODE"`).
    - `summary`: one line for `ctmodels fit --help`.
    - `from_data`: the constructor arguments the data sets (`prepared -> dict`;
      default: `num_channels`); they are not options.
    - `hidden`: constructor parameters that are not offered as options (the data or
      the job sets them, or the job cannot feed what they need).
    - `defaults`: the family's own defaults over the constructor's, where the job
      trains a different size than the class's (one table; `--help` shows them).
    - `loss_options`: keyword arguments of `model.loss` offered as options (their
      defaults are `loss`'s), passed through `fit(loss_kwargs=...)`.
    - `recipe`: the training recipe for data the family has no recipe for (see
      `DEFAULT_RECIPE`: a step budget scaled to the number of training series);
      `recipes`: recipes by bundled dataset name (a setting left out is `recipe`'s,
      except the step budget's, `BUDGET_KEYS`: none unless the entry sets them).
    - `task`: the training task (`task(batch, *, key) -> batch`, the context a loss
      sees; None: `fit`'s default); also the validation task.
    - `fit_options`: further keyword arguments of `ctmodels.train.fit` (default:
      the union-of-times batch layout).
    - `data`: a module or object with `is_file(data)`, `prepare(data, *, seed,
      **data_options) -> prepared` (open, split, normalise: `prepared.train_n`,
      `valid_n`, `test_n` for `ctmodels.train.fit`, `.state` for the checkpoint,
      `.summary` and `.sizes` for metrics.json, `.ts`/`.test` for predictions and
      plots), `reload(data, state)` (new data read as at training) and
      `to_model_units(data, state)`; default: irregular time series
      (`ctmodels.jobs._series`).
    - `evaluate(model, data_n, *, seed, n_samples, batch_size, tasks, scale,
      **task_options) -> dict`, `eval_tasks`: the metrics of a model on normalised
      data and the task names they score (default: interpolation and extrapolation
      MSE against
      LOCF and linear interpolation, with 90% coverage); `metric_units` says what
      the numbers are (`metrics.json`'s `"units"`).
    - `calibrate`: whether `fit` estimates a residual spread per channel on the
      validation split (`calibration.json`), used by `predict` and `evaluate`.
    - `predict(model, data, state, *, key, n_samples, spread, batch_size,
      time_units=None) -> xarray.Dataset`: what `predict` writes (default: every
      variable `V` as its predicted mean and `V_std`, on the data's own
      coordinates, netCDF).
    - `sample`: `sample(model, state, *, key, n, out, **options)` writing samples
      (None: the family has no `sample` job).
    - `predict`, `evaluate` and `sample` may take `devices=None` (an int or a
      `ctmodels.models.predict`-style device list): `--devices N` of those jobs is
      passed on to a hook that names it and refused for one that does not; `fit`
      passes its training devices to the hooks that take them.
    - `plot(data, predictions, out_dir, *, series=None, max_series=6, title="")`:
      per-series plots after `fit` and with `predict --plots` (None: none).
    """

    name: str
    model: type
    title: str
    summary: str = ""
    from_data: Callable[[Any], dict[str, Any]] = _num_channels
    hidden: tuple[str, ...] = ()
    defaults: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    loss_options: tuple[str, ...] = ()
    recipe: Mapping[str, Any] = dataclasses.field(
        default_factory=lambda: DEFAULT_RECIPE
    )
    recipes: Mapping[str, Mapping[str, Any]] = dataclasses.field(default_factory=dict)
    task: Callable | None = None
    fit_options: Mapping[str, Any] = dataclasses.field(
        default_factory=lambda: {"layout": "union"}
    )
    data: Any = _series
    evaluate: Callable = _series.evaluate
    eval_tasks: tuple[str, ...] = _series.TASKS
    metric_units: str = "MSE in normalised units (train-split statistics)"
    calibrate: bool = True
    predict: Callable | None = _series.predict
    sample: Callable | None = None
    plot: Callable | None = _series.plot

    def __post_init__(self):
        known = set(self.options)
        bad = sorted(set(self.defaults) - known)
        if bad:
            raise ValueError(
                f"Family {self.name!r}: defaults for {bad}, which are not options of "
                f"{self.model.__name__} (its options: {sorted(known)})."
            )

    @functools.cached_property
    def options(self) -> dict[str, Option]:
        """The family's options by name: the constructor's keyword-only parameters
        (less `hidden` and what the data set), then the `loss_options`."""
        model = signature_options(
            self.model.__init__, where="model", skip=self.hidden,
            defaults=self.defaults,
        )  # fmt: skip
        loss = {}
        if self.loss_options:
            loss = signature_options(
                self.model.loss, where="loss", only=self.loss_options
            )
        return {**model, **loss}

    def resolve_options(self, given: Mapping[str, Any]):
        """(constructor kwargs, loss kwargs): the defaults with `given` over them."""
        return resolve(self.options, given, family=self.name)

    def recipe_for(self, data: str | Path) -> dict[str, Any]:
        """The training recipe for `data`: its entry of `recipes` over `recipe` for a
        bundled dataset, `recipe` for a file whatever its name; a new dict."""
        if self.data.is_file(data) or str(data) not in self.recipes:
            return dict(self.recipe)
        # a dataset's own recipe is measured as it is: no step budget unless it
        # gives one
        base = {k: v for k, v in self.recipe.items() if k not in BUDGET_KEYS}
        return {**base, **self.recipes[str(data)]}


_FAMILIES: dict[str, Family] = {}


def register_family(family: Family, *, overwrite: bool = False) -> Family:
    """Add `family` to the registry (`ctmodels fit NAME` and the checkpoints of that
    family). A second family of the same name is refused unless `overwrite`.
    Its model class joins the model catalogue (`ctmodels.models.register`) too, so
    that its checkpoints load by name."""
    from .._catalog import register

    if not isinstance(family, Family):
        raise TypeError(f"register_family takes a Family, got {type(family).__name__}.")
    if family.name in _FAMILIES and not overwrite:
        raise ValueError(
            f"A family named {family.name!r} is registered already; pass "
            "overwrite=True to replace it."
        )
    register(family.model, overwrite=overwrite)
    _FAMILIES[family.name] = family
    return family


def families() -> dict[str, Family]:
    """The registered families by name (a copy)."""
    return dict(_FAMILIES)


def get_family(family: str | Family) -> Family:
    """The registered family named `family` (ValueError with close matches)."""
    if isinstance(family, Family):
        return family
    try:
        return _FAMILIES[family]
    except KeyError:
        close = difflib.get_close_matches(str(family), list(_FAMILIES), n=3)
        hint = f" Did you mean {', '.join(map(repr, close))}?" if close else ""
        raise ValueError(
            f"No model family {family!r}.{hint} The families: "
            f"{', '.join(sorted(_FAMILIES))}."
        ) from None
