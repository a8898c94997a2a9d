"""The default recipe's step budget (`ctmodels.jobs.budget`): optimiser steps for n
training series, checked against a brute-force count; per-dataset recipes untouched;
`fit` trains with the budgeted plan and records it. No training."""

from __future__ import annotations

import math

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ctmodels.data as cd
from ctmodels import jobs

DEFAULT = jobs.DEFAULT_RECIPE
UNSET = dict(epochs=None, learning_rate=None, batch_size=None,
             patience=jobs.FROM_RECIPE)  # fmt: skip


def _brute_epochs(recipe, n):
    """The epochs the budget describes, found by counting: the fewest epochs, at
    least `epochs`, whose steps reach `min_steps`; then the most whole epochs within
    `max_steps` (at least one) if that was over it."""
    per_epoch = math.ceil(n / recipe["batch_size"])
    e = recipe["epochs"]
    while e * per_epoch < recipe["min_steps"]:
        e += 1
    if e * per_epoch > recipe["max_steps"]:
        e = 1
        while (e + 1) * per_epoch <= recipe["max_steps"]:
            e += 1
    return e


@pytest.mark.parametrize("n", [1, 2, 9, 31, 32, 33, 40, 100, 240, 250, 999, 2400,
                               5000, 12533, 40_000, 10**6])  # fmt: skip
def test_budget_matches_a_brute_force_count(n):
    plan = jobs.budget(DEFAULT, n)
    per_epoch = math.ceil(n / DEFAULT["batch_size"])
    assert plan["epochs"] == _brute_epochs(DEFAULT, n)
    steps = plan["epochs"] * per_epoch
    if per_epoch <= DEFAULT["max_steps"]:
        assert steps <= DEFAULT["max_steps"]
    if 40 * per_epoch <= DEFAULT["max_steps"]:  # not capped: the minimum holds
        assert steps >= DEFAULT["min_steps"] and plan["epochs"] >= DEFAULT["epochs"]
    # early stopping waits a quarter of the run, at least 10 epochs
    assert plan["patience"] == max(10, math.ceil(0.25 * plan["epochs"]))
    # the rest of the recipe is unchanged, and the table is not touched
    assert {k: v for k, v in plan.items() if k not in ("epochs", "patience")} == {
        k: v for k, v in DEFAULT.items() if k not in ("epochs", "patience")
    }
    assert DEFAULT["epochs"] == 40 and DEFAULT["patience"] == 10


def test_budget_examples():
    # the issue's ~50 series (40 training): 2 steps per epoch, 80 steps before
    assert (jobs.budget(DEFAULT, 40)["epochs"], jobs.budget(DEFAULT, 40)["patience"]) \
        == (500, 125)  # fmt: skip
    assert jobs.budget(DEFAULT, 2400)["epochs"] == 40  # 75 per epoch: 3000 steps
    assert jobs.budget(DEFAULT, 12533)["epochs"] == 25  # 392 per epoch: capped
    assert jobs.budget(DEFAULT, 10**6)["epochs"] == 1  # never fewer than one


def test_given_settings_and_unbudgeted_recipes_are_kept():
    assert jobs.budget(DEFAULT, 40, epochs_given=True)["epochs"] == 40
    plan = jobs.budget(dict(DEFAULT, epochs=7), 40, epochs_given=True)
    assert (plan["epochs"], plan["patience"]) == (7, 10)
    assert jobs.budget(dict(DEFAULT, patience=3), 40, patience_given=True)[
        "patience"] == 3  # fmt: skip
    assert jobs.budget(dict(DEFAULT, patience=None), 40)["patience"] is None
    bare = {
        k: v
        for k, v in DEFAULT.items()
        if k not in ("min_steps", "max_steps", "patience_fraction")
    }
    assert jobs.budget(bare, 40) == bare  # no budget settings: as written


def test_recipes_of_their_own_are_not_budgeted(tmp_path, monkeypatch):
    resolve = jobs.resolve_recipe
    # pbcseq keeps today's 40 epochs (320 steps on its 250 training series)
    plan = resolve("latent-ode", "pbcseq", **UNSET, n_train=250)
    assert (plan["epochs"], plan["patience"], plan["batch_size"]) == (40, 10, 32)
    assert "min_steps" not in plan
    assert resolve("latent-ode", "periodic", **UNSET, n_train=800) == jobs.RECIPES[
        "periodic"]  # fmt: skip
    # neural-ode's own family recipe has no budget
    plan = resolve("neural-ode", "pbcseq", **UNSET, n_train=40)
    assert (plan["epochs"], plan["patience"]) == (150, None)
    # a file named like a bundled dataset gets the budgeted default
    monkeypatch.chdir(tmp_path)
    plan = resolve("latent-ode", "pbcseq.nc", **UNSET, n_train=250)
    assert (plan["epochs"], plan["patience"]) == (125, 32)
    # without n_train (before the data are read): the recipe as it stands
    assert resolve("latent-ode", "pbcseq.nc", **UNSET) == dict(DEFAULT)
    # the caller's epochs and patience win; the caller's batch size counts
    plan = resolve("latent-ode", "x.nc", **dict(UNSET, epochs=5), n_train=40)
    assert (plan["epochs"], plan["patience"]) == (5, 10)
    plan = resolve("latent-ode", "x.nc", **dict(UNSET, batch_size=8), n_train=40)
    assert (plan["epochs"], plan["patience"]) == (200, 50)
    plan = resolve("latent-ode", "x.nc", **dict(UNSET, patience=0), n_train=40)
    assert (plan["epochs"], plan["patience"]) == (500, None)


@pytest.mark.parametrize("bad, match", [
    (dict(min_steps=0), "min_steps"), (dict(max_steps=2.5), "max_steps"),
    (dict(min_steps=500, max_steps=100), "must not exceed"),
    (dict(patience_fraction=1.5), "patience_fraction"),
    (dict(patience_fraction=True), "patience_fraction"),
])  # fmt: skip
def test_bad_budgets_are_refused(bad, match):
    with pytest.raises(ValueError, match=match):
        jobs.budget(dict(DEFAULT, **bad), 40)
    with pytest.raises(ValueError, match="n_train"):
        jobs.budget(DEFAULT, 0)


class _Level(eqx.Module):
    """A level per channel: the least a family's model needs (never trained here)."""

    level: jax.Array
    hyperparameters: tuple = eqx.field(static=True)

    def __init__(self, num_channels: int, *, key):
        del key
        self.level = jnp.zeros((num_channels,))
        self.hyperparameters = (("num_channels", num_channels),)

    def loss(self, batch, *, key):
        del key
        return jnp.mean(self.level**2), {}


def test_fit_trains_and_records_the_budgeted_plan(tmp_path, monkeypatch):
    """`fit` reads the data, budgets for its training split (40 of 50 series) and
    hands that plan to `ctmodels.train.fit` (stopped there: no training), for a
    family on the default recipe."""
    import ctmodels.train

    # not registered: `fit` takes the spec itself
    family = jobs.Family(name="budget-level", model=_Level, title="level")
    assert family.recipe is DEFAULT
    rng = np.random.default_rng(0)
    t = np.sort(rng.uniform(0, 5, (50, 6)), axis=1)
    ts = cd.TimeSeries.from_arrays(t, rng.normal(size=(50, 6, 1)), channels=["y"])
    path = tmp_path / "small.nc"
    cd.to_xarray(ts).to_netcdf(path)
    seen = {}

    class Stop(Exception):
        pass

    def fake_fit(model, train, **kw):
        seen.update(kw, n_train=len(train))
        raise Stop

    monkeypatch.setattr(ctmodels.train, "fit", fake_fit)
    with pytest.raises(Stop):
        jobs.fit(family, path, tmp_path / "run", progress=False)
    assert seen["n_train"] == 40
    assert (seen["epochs"], seen["patience"], seen["batch_size"]) == (500, 125, 32)
    with pytest.raises(Stop):
        jobs.fit(family, path, tmp_path / "run2", progress=False, epochs=3)
    assert (seen["epochs"], seen["patience"]) == (3, 10)
