"""The solver registry: listing, lookup, suggestions, user registration, CLI."""

import subprocess
import sys
from pathlib import Path

import diffrax
import lineax as lx
import optimistix as optx
import pandas as pd
import pytest

import ctmodels
from ctmodels import solvers
from ctmodels._cli import main as cli_main

REQUIRED = {
    "ode": [
        "euler", "heun", "midpoint", "ralston", "bosh3", "tsit5", "dopri5", "dopri8",
        "implicit_euler", "kvaerno3", "kvaerno4", "kvaerno5", "kencarp3", "kencarp4",
        "kencarp5",
    ],
    "sde": ["euler", "euler_heun", "reversible_heun", "ito_milstein", "shark"],
    "controller": ["constant", "pid"],
    "adjoint": ["checkpoint", "backsolve", "direct", "forward", "implicit"],
    "fixed_point": ["iteration", "damped", "newton", "chord", "anderson", "broyden"],
    "root": ["newton", "chord", "anderson", "broyden"],
    "linear": ["auto", "lu", "qr", "cg", "gmres"],
}  # fmt: skip

VALUE_TYPES = {
    "ode": diffrax.AbstractSolver,
    "sde": diffrax.AbstractSolver,
    "controller": diffrax.AbstractStepSizeController,
    "adjoint": (diffrax.AbstractAdjoint, solvers.ImplicitAdjoint),
    "fixed_point": (optx.AbstractFixedPointSolver, optx.AbstractRootFinder),
    "root": optx.AbstractRootFinder,
    "linear": lx.AbstractLinearSolver,
}


@pytest.mark.parametrize("kind", sorted(REQUIRED))
def test_required_entries_present(kind):
    assert set(REQUIRED[kind]) <= set(solvers.names(kind))


@pytest.mark.parametrize(
    "kind,name", [(k, n) for k in solvers.KINDS for n in solvers.names(k)]
)
def test_every_entry_builds_a_value_of_its_kind(kind, name):
    value = solvers.get(name)
    assert isinstance(value, VALUE_TYPES[kind])
    assert solvers.entry(name).doc, f"{name} has no one-line doc"


def test_available_table():
    table = solvers.available()
    assert isinstance(table, pd.DataFrame)
    for col in [
        "name",
        "kind",
        "adaptive",
        "stiff",
        "order",
        "implicit_gradient",
        "doc",
    ]:
        assert col in table.columns
    # one row per (entry, kind): a root finder that also solves fixed points appears
    # twice
    assert len(table) == sum(len(solvers.names(k)) for k in solvers.KINDS)
    ode = solvers.available("ode")
    assert set(ode["kind"]) == {"ode"}
    assert ode.set_index("name").loc["kvaerno5", "stiff"] == True  # noqa: E712
    assert ode.set_index("name").loc["tsit5", "order"] == 5


def test_unknown_name_suggests_close_match():
    with pytest.raises(ValueError, match="tsit5"):
        solvers.get("tsit6")
    with pytest.raises(ValueError, match="anderson"):
        solvers.get("andersen")
    with pytest.raises(ValueError, match="Unknown solver kind"):
        solvers.available("odes")


def test_wrong_kind_is_explained():
    with pytest.raises(ValueError, match="controller entry, not an ode solver"):
        solvers.get("pid", kind="ode")


def test_options_reach_the_factory():
    pid = solvers.get("pid", rtol=1e-3, atol=1e-5)
    assert pid.rtol == 1e-3 and pid.atol == 1e-5
    anderson = solvers.get("anderson", rtol=1e-4, atol=1e-4, memory=3)
    assert anderson.memory == 3
    implicit = solvers.get("implicit", linear_solver="gmres")
    assert isinstance(implicit.linear_solver, lx.GMRES)
    with pytest.raises(ValueError, match="Bad options"):
        solvers.get("tsit5", not_an_option=1)


def test_user_registration_round_trip():
    solvers.register(
        "my_heun", diffrax.Heun, kind="ode", tags={"order": 2, "adaptive": True},
        doc="test entry",
    )  # fmt: skip
    try:
        assert "my_heun" in solvers.names("ode")
        assert isinstance(solvers.get("my_heun"), diffrax.Heun)
        row = solvers.available("ode").set_index("name").loc["my_heun"]
        assert row["order"] == 2 and row["doc"] == "test entry"
        with pytest.raises(ValueError, match="already registered"):
            solvers.register("my_heun", diffrax.Heun, kind="ode")
        # usable by name from the entry points
        import jax.numpy as jnp

        sol = ctmodels.integrate(
            lambda t, y, a: -y, jnp.array([1.0]), jnp.array([0.0, 1.0]),
            solver="my_heun", rtol=1e-6, atol=1e-8,
        )  # fmt: skip
        assert abs(float(sol.ys[-1, 0]) - float(jnp.exp(-1.0))) < 1e-4
    finally:
        solvers.unregister("my_heun")
    assert "my_heun" not in solvers.names()


def test_register_rejects_bad_kind():
    with pytest.raises(ValueError, match="Unknown solver kind"):
        solvers.register("x", diffrax.Heun, kind="odee")


def test_cli_solvers_table(capsys):
    assert cli_main(["solvers", "--kind", "root"]) == 0
    out = capsys.readouterr().out
    for name in REQUIRED["root"]:
        assert name in out
    assert "tsit5" not in out


def test_cli_solvers_csv(capsys):
    assert cli_main(["solvers", "--format", "csv"]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0].startswith("name,kind,")
    assert len(out.splitlines()) == 1 + len(solvers.available())


def test_console_script_help():
    proc = subprocess.run(
        [sys.executable, "-m", "ctmodels", "solvers", "--help"],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    assert "--kind" in proc.stdout


def test_cli_bad_input_is_one_readable_line(capsys):
    assert cli_main(["datasets", "show", "pbcseqq"]) == 2
    err = capsys.readouterr().err
    assert "Did you mean 'pbcseq'" in err and "Traceback" not in err


def test_cli_datasets_list_and_card(capsys):
    assert cli_main(["datasets"]) == 0
    assert "pbcseq" in capsys.readouterr().out
    assert cli_main(["datasets", "show", "pbcseq"]) == 0
    out = capsys.readouterr().out
    assert "License" in out or "license" in out


# -- one vocabulary, one table of defaults --------------------------------------------


def test_results_print_as_ctmodels_names():
    assert repr(ctmodels.RESULTS.successful) == "ctmodels.RESULTS<successful>"
    assert repr(ctmodels.RESULTS.max_steps_reached) == (
        "ctmodels.RESULTS<the maximum number of steps was reached>"
    )
    assert "_errors" not in repr(ctmodels.RESULTS.no_solution)


def test_no_stray_modules_in_the_namespace():
    assert not hasattr(ctmodels, "importlib")
    assert ctmodels.__version__


def test_default_tolerances_table():
    from ctmodels import _defaults

    assert ctmodels.default_tolerances("ode", "float64") == (1e-6, 1e-8)
    assert ctmodels.default_tolerances("ode", "float32") == (1e-5, 1e-6)
    assert ctmodels.default_tolerances("implicit_ode", "float32") == (1e-3, 1e-6)
    assert ctmodels.default_tolerances("implicit_ode", "float64") == (1e-6, 1e-8)
    assert ctmodels.default_tolerances("nonlinear", "float64") == (1e-6, 1e-8)
    assert ctmodels.default_tolerances("nonlinear", "float32") == (1e-5, 1e-6)
    # half precision gets the float32 row, integers JAX's default float
    assert ctmodels.default_tolerances("ode", "float16") == (1e-5, 1e-6)
    default = ctmodels.default_tolerances("ode", None)
    assert ctmodels.default_tolerances("ode", "int32") == default
    with pytest.raises(ValueError, match="Unknown kind"):
        ctmodels.default_tolerances("sde", "float32")
    # the documented table is this table
    doc = (Path(__file__).parents[1] / "docs" / "precision.md").read_text()
    for kind, row in _defaults.TOLERANCES.items():
        f32, f64 = row["float32"], row["float64"]
        line = f"| `{kind}` |"
        (text,) = [ln for ln in doc.splitlines() if ln.startswith(line)]
        e = [f"`{x:.0e}`".replace("e-0", "e-") for x in (*f32, *f64)]  # `1e-3`
        assert f"{e[0]}, {e[1]} | {e[2]}, {e[3]} |" in text
    assert _defaults.SOLVERS["integrate"] == "tsit5"
    assert _defaults.SOLVERS["fixed_point"] == "anderson"
    assert _defaults.SOLVERS["root_find"] == "newton"


def test_solvers_by_name_get_the_default_float_tolerances():
    rtol, atol = ctmodels.default_tolerances("ode", None)
    pid = solvers.get("pid")
    assert (pid.rtol, pid.atol) == (rtol, atol)
    rtol, atol = ctmodels.default_tolerances("nonlinear", None)
    anderson = solvers.get("anderson")
    assert (anderson.rtol, anderson.atol) == (rtol, atol)
