"""Suite-wide settings.

float64 per module: `test_integrate.py`, `test_fixed_point.py` and
`test_steady_state.py` compare with closed forms to float64 tolerances and switch
float64 on when imported (their module-level constants are float64), and pytest
imports every module before running any, so without this the whole suite would run
in float64 while users (and the quick start) run in float32. Each module runs with
the setting the session started with (JAX's default, float32) unless it sets
`X64 = True`.
"""

from __future__ import annotations

import os

# Compile-time settings for the suite (set before JAX starts its backend; inherited
# by the subprocesses that run the tutorials and the CLI). The suite's time is
# almost all XLA compilation of tiny programs, and LLVM's optimisation passes are
# a third of it: at backend optimisation level 0 the same tests take about 30% less
# CPU (measured on tests/test_sde.py: 82 s -> 56 s user). Floating-point semantics
# are unchanged (XLA's fast-math stays off); only the machine code is less tuned.
# `CTMODELS_TEST_FULL_OPT=1` runs the suite with XLA's defaults, as users run.
if os.environ.get("CTMODELS_TEST_FULL_OPT") != "1":
    _flags = os.environ.get("XLA_FLAGS", "")
    if "xla_backend_optimization_level" not in _flags:
        os.environ["XLA_FLAGS"] = (
            _flags + " --xla_backend_optimization_level=0"
            " --xla_llvm_disable_expensive_passes=true"
        ).strip()

import equinox as eqx  # noqa: E402
import jax  # noqa: E402
import pytest  # noqa: E402

_START = {"x64": bool(jax.config.jax_enable_x64)}


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector):
    """`test_integrate.py` and `test_fixed_point.py` switch float64 on when imported
    (their module constants are float64); pytest imports every module before running
    any, so without this every module collected after them built its own constants
    in float64 and then ran in float32 (seen: Diffrax's dense-output gradient and an
    SDE backsolve failing with "cond branches must have equal output types"). Each
    module is imported with the session's setting."""
    yield
    if isinstance(collector, pytest.Module):
        jax.config.update("jax_enable_x64", _START["x64"])


@pytest.fixture(autouse=True, scope="module")
def _x64_per_module(request):
    want = bool(getattr(request.module, "X64", False)) or _START["x64"]
    if want != bool(jax.config.jax_enable_x64):
        # JAX's and Equinox's caches keyed before the switch can hand a float64
        # trace (e.g. a Diffrax solve's constants) to a float32 call and the
        # reverse ("cond branches must have equal output types"); start afresh
        jax.clear_caches()
        eqx.clear_caches()
    jax.config.update("jax_enable_x64", want)
    yield


@pytest.fixture(autouse=True, scope="session")
def _cold_compilation_cache(tmp_path_factory):
    """The `ctmodels` command (`main`) turns on JAX's persistent compilation cache,
    by default in `~/.cache/ctmodels/jax`, and once on it serves the whole process.
    The suite gets a fresh one of its own instead (unless `CTMODELS_JAX_CACHE` is
    set): it neither writes into the user's cache nor runs warm from an earlier
    run, so a local run times like a cold CI run; within the session every file
    shares it."""
    if "CTMODELS_JAX_CACHE" in os.environ:
        yield
        return
    os.environ["CTMODELS_JAX_CACHE"] = str(tmp_path_factory.mktemp("jax-cache"))
    try:
        yield
    finally:
        os.environ.pop("CTMODELS_JAX_CACHE", None)


def pytest_sessionfinish(session, exitstatus):
    """Collect garbage while the session still runs: a pytest-xdist worker is shut
    down by an interrupt, and JAX's garbage-collection callback caught by it printed a
    `KeyboardInterrupt` warning at the end of an otherwise clean run."""
    import gc

    gc.collect()
