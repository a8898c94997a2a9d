"""Errors of the engine: readable under jit / vmap (issue 17, item 3) and bad
combinations refused up front with ctmodels' own ValueError (item 4). float32.

Oracle: the eager message. A failure inside compiled code must carry the same
explanation, and with `ctmodels.readable_errors` be the same error class with
ctmodels' message as its first line.
"""

from __future__ import annotations

import diffrax
import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ctmodels
from ctmodels import solvers
from ctmodels._errors import discard_failed_callbacks, traced_failures
from ctmodels._integrate import solver_tags

TS = jnp.array([0.0, 2.0])


# Each entry point, made to fail cheaply: (call on a scalar state, eager message start)
def _integrate(y0):
    return ctmodels.integrate(lambda t, y, a: y**2, y0, TS, max_steps=4).ys


def _fixed_point(y0):
    return ctmodels.fixed_point(lambda z, a: z + 1.0, y0, max_steps=4).value


def _root_find(y0):
    return ctmodels.root_find(lambda z, a: z**2 + 1.0, y0, max_steps=4).value


def _steady_state(y0):
    field = lambda t, y, a: jnp.ones_like(y)  # noqa: E731 - no equilibrium
    return ctmodels.steady_state(field, y0, method="integrate", max_steps=8).value


ENTRIES = {
    "integrate": _integrate,
    "fixed_point": _fixed_point,
    "root_find": _root_find,
    "steady_state": _steady_state,
}
MODES = {
    "eager": lambda f: f,
    "vmap": jax.vmap,
    "jax.jit": jax.jit,
    "eqx.filter_jit": eqx.filter_jit,
}


def _x(mode):
    return jnp.ones((2,)) if "vmap" in mode else jnp.ones(())


def _first_line(err) -> str:
    return str(err).splitlines()[0]


@pytest.mark.parametrize("entry", sorted(ENTRIES))
def test_failure_reads_the_same_eagerly_and_under_every_transform(entry):
    """The first line of the error is ctmodels' own: at once eagerly and under vmap,
    and through `readable_errors` under jax.jit / eqx.filter_jit; the class is
    SolverError with `entry` and `result` set."""
    f = ENTRIES[entry]
    with pytest.raises(ctmodels.SolverError) as eager:
        f(_x("eager"))
    why = str(eager.value).split(": ", 1)[1].split(". Try:")[0]  # e.g. max steps
    for mode, wrap in MODES.items():
        g = wrap(f)
        if mode == "jax.jit":  # the raw error: ctmodels' message is inside
            with pytest.raises(Exception) as raw:
                jax.block_until_ready(g(_x(mode)))
            discard_failed_callbacks()
            assert f"ctmodels.{entry} with solver" in str(raw.value), mode
        if "jit" in mode:
            with pytest.raises(ctmodels.SolverError) as info:
                with ctmodels.readable_errors():
                    jax.block_until_ready(g(_x(mode)))
            discard_failed_callbacks()
        else:
            with pytest.raises(ctmodels.SolverError) as info:
                jax.block_until_ready(g(_x(mode)))
        first = _first_line(info.value)
        assert first.startswith(f"ctmodels.{entry} with solver"), (mode, first)
        assert why in first, (mode, first)
        assert info.value.entry == entry
        assert bool(info.value.result != ctmodels.RESULTS.successful)


def test_readable_errors_as_a_decorator_and_for_input_checks():
    """Unsorted times under jit come back as ctmodels' ValueError; an error that is
    not one of ctmodels' passes through unchanged."""

    @ctmodels.readable_errors()
    @jax.jit
    def run(ts):
        return ctmodels.integrate(lambda t, y, a: -y, jnp.ones(2), ts).ys

    np.testing.assert_allclose(
        run(jnp.array([0.0, 1.0, 2.0]))[-1], np.exp(-2.0), rtol=1e-4
    )
    with pytest.raises(ValueError) as info:
        run(jnp.array([0.0, 2.0, 1.0]))
    assert _first_line(info.value).startswith("ts must be finite and strictly")
    with pytest.raises(ZeroDivisionError):
        with ctmodels.readable_errors():
            1 / 0  # noqa: B018


def test_unsorted_times_under_eager_vmap_raise_at_once():
    f = jax.vmap(lambda ts: ctmodels.integrate(lambda t, y, a: -y, 1.0, ts).ys)
    with pytest.raises(ValueError) as info:
        f(jnp.array([[0.0, 1.0, 2.0], [0.0, 2.0, 1.0]]))
    assert _first_line(info.value).startswith("ts must be finite and strictly")


def test_nan_mode_returns_nan_instead_of_raising():
    """`traced_failures("nan")` (as `fit` uses) turns a failed solve into NaN, under
    an eager vmap and under jit."""
    for wrap in (jax.vmap, lambda f: jax.jit(jax.vmap(f))):
        with traced_failures("nan"):
            out = wrap(_integrate)(jnp.ones((2,)))
        assert np.all(np.isnan(np.asarray(out)))


def test_throw_false_returns_the_code():
    sol = jax.jit(
        lambda y0: ctmodels.integrate(
            lambda t, y, a: y**2, y0, TS, max_steps=4, throw=False
        )
    )(jnp.ones(()))
    assert bool(sol.result == ctmodels.RESULTS.max_steps_reached)
    assert np.isinf(np.asarray(sol.ys[-1]))


# ----------------------------------------------------------------------------------
# item 4: bad combinations caught up front


def f_decay(t, y, a):
    return -y


Y2 = jnp.ones(2)

BAD_INTEGRATE = {
    "imex+backsolve": (
        dict(solver="kencarp4", adjoint="backsolve"),
        r"adjoint='backsolve' re-solves .* 'kencarp4' takes several",
    ),
    "rtol<0": (dict(rtol=-1.0), r"rtol must be a finite, non-negative number"),
    "rtol nan": (dict(rtol=float("nan")), r"rtol must be a finite, non-negative"),
    "atol<0": (dict(atol=-1e-6), r"atol must be a finite, non-negative number"),
    "both zero": (dict(rtol=0.0, atol=0.0), r"rtol and atol are both 0"),
    "fixed step, no dt0": (dict(solver="euler"), r"needs dt0 \(the step size\)"),
    "fixed step, pid": (
        dict(solver="euler", controller="pid"),
        r"has no error estimate, so it cannot take adaptive steps",
    ),
    "dt0=0": (dict(solver="euler", dt0=0.0), r"dt0 must be a finite, non-zero"),
    "dt0 nan": (dict(dt0=float("nan")), r"dt0 must be a finite, non-zero"),
    "too few steps": (
        dict(solver="euler", dt0=0.01, max_steps=100),
        r"need 200 steps .* raise max_steps to at least 200",
    ),
    "backsolve+dense": (
        dict(adjoint="backsolve", dense=True),
        r"only saves at given times .* not dense=True",
    ),
    "backsolve+steps": (
        dict(adjoint="backsolve", saveat="steps"),
        r"not saveat='steps'",
    ),
    "backsolve+event": (
        dict(adjoint="backsolve", event=lambda t, y, a: y[0] - 0.5),
        r"cannot differentiate a solve stopped by an event",
    ),
    "unknown saveat": (dict(saveat="step"), r"saveat must be one of .* 'steps'"),
    "several subs": (
        dict(
            saveat=diffrax.SaveAt(
                subs=[diffrax.SubSaveAt(t1=True), diffrax.SubSaveAt(t0=True)]
            )
        ),
        r"several SubSaveAts",
    ),
    "implicit adjoint": (dict(adjoint="implicit"), r"differentiates a fixed point"),
}


@pytest.mark.parametrize("case", sorted(BAD_INTEGRATE))
def test_integrate_refuses_bad_combinations(case):
    kwargs, match = BAD_INTEGRATE[case]
    with pytest.raises(ValueError, match=match) as info:
        ctmodels.integrate(f_decay, Y2, TS, **kwargs)
    first = _first_line(info.value)
    assert first.startswith("ctmodels.integrate") or first.startswith("Solver"), first


BAD_FIELDS = {
    "shape": (
        lambda t, y, a: jnp.ones(3),
        r"like y0 \(float32\[2\]\), got float32\[3\]",
    ),
    "dtype": (
        lambda t, y, a: (-y).astype(jnp.bfloat16),
        r"like y0 \(float32\[2\]\), got bfloat16\[2\]",
    ),
    "structure": (lambda t, y, a: (y, y), r"got \('float32\[2\]', 'float32\[2\]'\)"),
}


@pytest.mark.parametrize("case", sorted(BAD_FIELDS))
def test_vector_field_output_must_match_the_state(case):
    field, match = BAD_FIELDS[case]
    with pytest.raises(ValueError, match=r"vector_field\(t, y, args\) must return"):
        ctmodels.integrate(field, Y2, TS)
    with pytest.raises(ValueError, match=match):
        ctmodels.integrate(field, Y2, TS)
    with pytest.raises(ValueError, match=match):  # the same under jit, at trace time
        jax.jit(lambda y: ctmodels.integrate(field, y, TS).ys)(Y2)
    with pytest.raises(ValueError, match=r"ctmodels.steady_state: vector_field"):
        ctmodels.steady_state(field, Y2, method="integrate")


def test_imex_pair_fields_are_checked_each():
    with pytest.raises(ValueError, match=r"vector_field\[1\]\(t, y, args\)"):
        ctmodels.integrate(
            (f_decay, lambda t, y, a: jnp.ones(3)), Y2, TS, solver="kencarp4"
        )


def test_state_must_be_numeric():
    with pytest.raises(ValueError, match="y0 must be a pytree of numeric arrays"):
        ctmodels.integrate(f_decay, "a", TS)
    with pytest.raises(ValueError, match="y0 has no arrays"):
        ctmodels.integrate(f_decay, {}, TS)
    # integers are promoted to the default float, as before
    sol = ctmodels.integrate(f_decay, jnp.array([1, 2]), TS)
    assert sol.ys.dtype == jnp.float32
    np.testing.assert_allclose(sol.ys[-1], np.exp(-2.0) * np.array([1, 2]), rtol=1e-4)


@pytest.mark.parametrize(
    "call",
    [
        lambda **k: ctmodels.fixed_point(lambda z, a: 0.5 * z, Y2, **k),
        lambda **k: ctmodels.root_find(lambda z, a: z - 1.0, Y2, **k),
        lambda **k: ctmodels.steady_state(f_decay, Y2, **k),
        lambda **k: ctmodels.steady_state(f_decay, Y2, method="integrate", **k),
    ],
    ids=["fixed_point", "root_find", "steady_state-root", "steady_state-integrate"],
)
def test_nonlinear_entries_refuse_bad_tolerances(call):
    with pytest.raises(ValueError, match="rtol must be a finite, non-negative"):
        call(rtol=-1.0)
    with pytest.raises(ValueError, match="atol must be a finite, non-negative"):
        call(atol=float("nan"))
    with pytest.raises(ValueError, match="both 0"):
        call(rtol=0.0, atol=0.0)


def test_fixed_point_output_structure_must_match():
    with pytest.raises(ValueError, match="same structure, shapes and dtypes"):
        ctmodels.fixed_point(lambda z, a: (z, z), Y2)


@pytest.mark.parametrize("name", solvers.names("ode") + solvers.names("sde"))
def test_registry_compatibility_tags_match_the_solver(name):
    """The tags the compatibility checks read agree with the stepper itself, so a
    name and the equivalent value are refused (or accepted) alike."""
    tags = solvers.entry(name).tags
    inferred = solver_tags(solvers.get(name))
    assert tags["single_term"] == inferred["single_term"]
    if "sde" in solvers.entry(name).kinds:
        assert tags["sde_type"] == inferred["sde_type"]


def test_value_and_name_are_refused_alike():
    with pytest.raises(ValueError, match="takes several"):
        ctmodels.integrate(
            f_decay, Y2, TS, solver=diffrax.KenCarp4(), adjoint="backsolve"
        )
    with pytest.raises(ValueError, match="takes several"):
        ctmodels.integrate(
            f_decay, Y2, TS, solver="kencarp4", adjoint=diffrax.BacksolveAdjoint()
        )
