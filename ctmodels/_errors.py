"""Result codes shared by every entry point, and the readable errors built from them.

Errors come in three tiers (see DESIGN.md):

1. a `ValueError` at trace time for a bad argument, saying what to do instead;
2. `eqx.error_if` for value-dependent checks under `jit` (unsorted times, ...);
3. a solver failure stored as a [`ctmodels.RESULTS`][] code; with `throw=True` it is
   raised as one [`ctmodels.SolverError`][] naming the solver, where it stopped, why,
   and what to try next.
"""

from __future__ import annotations

import contextlib
import contextvars
import difflib
import math
import os
import re
from collections.abc import Iterable

import diffrax
import equinox as eqx
import equinox.internal as eqxi
import jax
import jax.numpy as jnp
import numpy as np
import optimistix as optx


class RESULTS(eqxi.Enumeration):
    """Why a solve ended. `ctmodels.RESULTS[code]` gives the message."""

    successful = "successful"
    max_steps_reached = "the maximum number of steps was reached"
    dt_min_reached = "the step size fell below its minimum (step size underflow)"
    max_steps_rejected = "too many consecutive steps were rejected"
    implicit_failure = "the implicit stepper's nonlinear solve failed to converge"
    divergence = "the iteration diverged"
    no_solution = (
        "the tolerance was met only because the function is (nearly) flat there, not "
        "at a solution: there may be no fixed point, root or equilibrium nearby"
    )
    nonfinite = "the solution became NaN or infinite"
    stagnation = (
        "the iteration stopped making progress at floating-point precision before "
        "meeting the tolerance"
    )
    singular = "a linear solve met a singular (or numerically singular) matrix"
    linear_solve_failed = "a linear solve failed to converge"
    internal_error = "an internal error occurred in the solver"


# Printed as `ctmodels.RESULTS<successful>`, `ctmodels.RESULTS<the maximum number of
# steps was reached>`: where users meet it, not `ctmodels._errors.RESULTS<>`.
RESULTS.__module__ = "ctmodels"


class SolverError(RuntimeError):
    """Raised by an entry point called with `throw=True` when its solver fails.

    Attributes: `result` (the [`ctmodels.RESULTS`][] code), `solver` (its name) and
    `entry` (`"integrate"`, `"fixed_point"`, ...).
    """

    def __init__(self, message: str, *, result=None, solver: str = "", entry: str = ""):
        super().__init__(message)
        self.result = result
        self.solver = solver
        self.entry = entry


_OPTX_MAP = (
    (optx.RESULTS.nonlinear_max_steps_reached, RESULTS.max_steps_reached),
    (optx.RESULTS.nonlinear_divergence, RESULTS.divergence),
    (optx.RESULTS.nonfinite, RESULTS.nonfinite),
    (optx.RESULTS.singular, RESULTS.singular),
    (optx.RESULTS.breakdown, RESULTS.linear_solve_failed),
    (optx.RESULTS.stagnation, RESULTS.linear_solve_failed),
    (optx.RESULTS.conlim, RESULTS.linear_solve_failed),
    (optx.RESULTS.nonfinite_input, RESULTS.nonfinite),
    (optx.RESULTS.max_steps_reached, RESULTS.linear_solve_failed),
)

_DIFFRAX_MAP = (
    (diffrax.RESULTS.max_steps_reached, RESULTS.max_steps_reached),
    (diffrax.RESULTS.dt_min_reached, RESULTS.dt_min_reached),
    (diffrax.RESULTS.max_steps_rejected, RESULTS.max_steps_rejected),
    (diffrax.RESULTS.internal_error, RESULTS.internal_error),
    (diffrax.RESULTS.nonlinear_max_steps_reached, RESULTS.implicit_failure),
    (diffrax.RESULTS.nonlinear_divergence, RESULTS.implicit_failure),
    (diffrax.RESULTS.nonfinite, RESULTS.nonfinite),
    (diffrax.RESULTS.singular, RESULTS.singular),
    (diffrax.RESULTS.breakdown, RESULTS.linear_solve_failed),
    (diffrax.RESULTS.stagnation, RESULTS.linear_solve_failed),
    (diffrax.RESULTS.conlim, RESULTS.linear_solve_failed),
    (diffrax.RESULTS.nonfinite_input, RESULTS.nonfinite),
)


def _translate(result, table) -> RESULTS:
    out = RESULTS.successful
    for theirs, ours in table:
        out = RESULTS.where(result == theirs, ours, out)
    return out


def from_optimistix(result) -> RESULTS:
    """Map an `optimistix.RESULTS` code onto ours (jit-safe)."""
    return _translate(result, _OPTX_MAP)


def from_diffrax(result) -> RESULTS:
    """Map a `diffrax.RESULTS` code onto ours (jit-safe). An event is a success."""
    return _translate(result, _DIFFRAX_MAP)


# What to try next, per entry point and result. `{...}` fields are filled from context.
_HINTS = {
    "integrate": {
        "max_steps_reached": (
            "if the problem is stiff, use an implicit solver (solver='kvaerno5'); "
            "otherwise raise max_steps (now {max_steps}) or loosen rtol/atol"
        ),
        "dt_min_reached": (
            "use an implicit solver (solver='kvaerno5'), loosen rtol/atol, or check "
            "the vector field for a blow-up near that time"
        ),
        "max_steps_rejected": "loosen rtol/atol or use an implicit solver",
        "implicit_failure": (
            "give a smaller dt0, or a root finder with more steps, e.g. "
            "solver=ctmodels.solvers.get('{solver}', root_finder=optimistix.Newton("
            "rtol=1e-8, atol=1e-8))"
        ),
        "nonfinite": (
            "check the vector field for NaN/inf at these states (division by zero, "
            "log of a negative) or a finite-time blow-up; tighten rtol/atol or use "
            "an implicit solver"
        ),
        "singular": "the implicit stepper's Jacobian is singular; use 'kvaerno5'",
        "linear_solve_failed": "try another implicit solver, e.g. solver='kvaerno5'",
        "internal_error": "report this with the problem that triggers it",
    },
    "fixed_point": {
        "max_steps_reached": (
            "solver='anderson' or solver='broyden' (or 'newton' for small "
            "problems), raise max_steps (now {max_steps}), or give a better initial "
            "guess"
        ),
        "divergence": (
            "the map may not be contractive here: use solver='damped' or "
            "solver='anderson' with a smaller beta, or a better initial guess"
        ),
        "nonfinite": (
            "check fn for NaN/inf at these inputs; use a damped solver or a better "
            "initial guess"
        ),
        "stagnation": (
            "if the residual is near the tolerance, loosen rtol/atol (now "
            "rtol={rtol}, atol={atol}; {dtype} resolves about {eps:.1e} relative "
            "error) or enable float64 with jax.config.update('jax_enable_x64', "
            "True); if it is far above it, the iterates stalled away from a "
            "solution (the map may not be contractive here): use solver='damped', "
            "a smaller step, or a better initial guess"
        ),
        "singular": (
            "Newton's Jacobian is singular here: use solver='anderson' or "
            "solver='broyden', or a different initial guess"
        ),
        "linear_solve_failed": "use solver='anderson' or another linear solver",
        "internal_error": "report this with the problem that triggers it",
    },
}
_HINTS["root_find"] = _HINTS["fixed_point"]
_HINTS["steady_state"] = _HINTS["fixed_point"]


def explain(
    entry: str, solver: str, code: str, where: str = "", hints: str = "", **context
) -> str:
    """Build the one readable failure message (`hints`: whose hints, default entry)."""
    why = getattr(RESULTS, code)
    msg = f"ctmodels.{entry} with solver {solver!r} failed"
    if where:
        msg += f" {where}"
    msg += f": {RESULTS[why]}."
    hint = _HINTS.get(hints or entry, {}).get(code)
    if hint:
        ctx = dict(solver=solver, max_steps="?", rtol="?", atol="?", dtype="?", eps=0.0)
        ctx.update(context)
        msg += " Try: " + hint.format(**ctx) + "."
    msg += " (Pass throw=False to get the result code instead of an error.)"
    return msg


CODES = tuple(name for name in RESULTS._name_to_item)  # pyright: ignore


def result_name(result) -> str:
    """The name (`"max_steps_reached"`, ...) of a concrete result code."""
    value = int(np.asarray(result._value))
    for name in CODES:
        if int(np.asarray(getattr(RESULTS, name)._value)) == value:
            return name
    raise ValueError(f"unknown result code {value}")


def is_traced(*trees) -> bool:
    """True when any leaf is a JAX tracer (we are inside jit/vmap/grad)."""
    leaves = jax.tree_util.tree_leaves(trees)
    return any(isinstance(x, jax.core.Tracer) for x in leaves)


_ON_ERROR: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "ctmodels_on_error", default=None
)
_MODES = ("raise", "nan", "breakpoint", "off")


def _eqx_on_error() -> str:
    """Equinox's process-wide `EQX_ON_ERROR` (read once, when Equinox is imported)."""
    try:
        from equinox._config import EQX_ON_ERROR
    except ImportError:  # pragma: no cover - a future Equinox moved it
        EQX_ON_ERROR = os.environ.get("EQX_ON_ERROR", "raise")
    return EQX_ON_ERROR


def on_error_mode() -> str:
    """How a value-dependent check traced now reports a failure: the mode of the
    innermost `traced_failures`, else `"raise"` (`throw=True` asks for an error, so a
    process-wide `EQX_ON_ERROR=nan` or `off` does not silence ctmodels' checks; the
    debugging mode `EQX_ON_ERROR=breakpoint` is honoured)."""
    mode = _ON_ERROR.get()
    if mode is not None:
        return mode
    return "breakpoint" if _eqx_on_error() == "breakpoint" else "raise"


@contextlib.contextmanager
def traced_failures(mode: str):
    """How ctmodels' value-dependent checks report a failure in code traced inside
    this context: `"raise"` (a runtime error through a host callback), `"nan"` (the
    checked value becomes NaN; no callback), `"breakpoint"` or `"off"`. Outside any
    such context they raise (or, with `EQX_ON_ERROR=breakpoint`, open the debugger).

    It covers ctmodels' own checks (a solve that failed with `throw=True`, unsorted
    times, ...), which pass the mode to `eqx.error_if` explicitly, so compiled code
    keeps the mode it was traced with. The checks inside Diffrax follow Equinox's
    process-wide `EQX_ON_ERROR` setting. `ctmodels.train.fit` traces its steps with
    `"nan"`: a failed solve then shows as a non-finite loss, which the NaN guard
    handles (and diagnoses). With `EQX_ON_ERROR=nan` as well (the CLI sets it, see
    `ctmodels._cli`), the compiled steps have no host callbacks, so JAX's persistent
    compilation cache can store them.
    """
    if mode not in _MODES:
        raise ValueError(
            f"mode must be one of {', '.join(map(repr, _MODES))}, got {mode!r}."
        )
    token = _ON_ERROR.set(mode)
    try:
        yield
    finally:
        _ON_ERROR.reset(token)


# The messages of ctmodels' own runtime checks, so that `readable_errors` can tell
# them from other runtime errors in a compiled program's error text.
_RUNTIME_MESSAGES: set[str] = set()


def _concrete_any(pred):
    """`pred` reduced over any vmapped axes, if known now (eagerly, also under an eager
    `vmap` or `grad`); None under `jit`."""
    with jax.ensure_compile_time_eval():
        out = eqxi.unvmap_any(jnp.any(pred))
    return None if isinstance(out, jax.core.Tracer) else bool(out)


def _concrete_max(index):
    with jax.ensure_compile_time_eval():
        out = eqxi.unvmap_max(jnp.max(index))
    return None if isinstance(out, jax.core.Tracer) else int(out)


def error_if(x, pred, msg: str, error: type[Exception] = ValueError):
    """`eqx.error_if` in the mode of `traced_failures` (default: `EQX_ON_ERROR`).

    Where the predicate is already known (eagerly, and under an eager `vmap` or
    `grad`, whose values are concrete) a failed check raises `error(msg)` at once, so
    the message is the first line; under `jit` it becomes a runtime check (see
    [`ctmodels.readable_errors`][])."""
    mode = on_error_mode()
    _RUNTIME_MESSAGES.add(msg)
    if mode == "raise" and _concrete_any(pred) is True:
        raise error(msg)
    return eqx.error_if(x, pred, msg, on_error=mode)


def raise_if_failed_traced(
    result: RESULTS, x, entry: str, solver: str, hints: str = "", **context
):
    """Under jit: attach a runtime error (static message per result code) to `x`
    (NaN instead inside `traced_failures("nan")`). Under an eager `vmap`, where the
    result is concrete, raise the [`ctmodels.SolverError`][] at once."""
    msgs = [explain(entry, solver, code, hints=hints, **context) for code in CODES]
    _RUNTIME_MESSAGES.update(msgs)
    index = result._value
    pred = result != RESULTS.successful
    mode = on_error_mode()
    if mode == "raise" and _concrete_any(pred) is True:
        worst = _concrete_max(index)
        raise SolverError(
            msgs[worst],
            result=getattr(RESULTS, CODES[worst]),
            solver=solver,
            entry=entry,
        )
    return eqx.branched_error_if(x, pred, index, msgs, on_error=mode)


def runtime_message(err: BaseException) -> str:
    """The message of a runtime check that fired inside compiled code, without the
    stack dump and debugging advice Equinox wraps it in."""
    text = str(err).strip()
    marker = "EquinoxRuntimeError: "
    if marker in text:
        text = text.rsplit(marker, 1)[1]
    for end in ("\n\n\n", "\n-----", "\n\n"):
        text = text.split(end)[0]
    return text.strip() or type(err).__name__


_SOLVER_FAILED = re.compile(r"^ctmodels\.(\w+) with solver '([^']*)' failed")


def readable(err: BaseException) -> BaseException | None:
    """The ctmodels error that `err` (the error a compiled program raised when one of
    ctmodels' runtime checks fired) stands for, or None if it is not one of ours:
    a [`ctmodels.SolverError`][] for a failed solve, a `ValueError` for a bad input."""
    if isinstance(err, (SolverError, ValueError)) and not _is_runtime_error(err):
        return None
    msg = runtime_message(err)
    if msg not in _RUNTIME_MESSAGES:
        return None
    found = _SOLVER_FAILED.match(msg)
    if found is None:
        return ValueError(msg)
    code = next(
        (c for c in CODES if c != "successful" and RESULTS[getattr(RESULTS, c)] in msg),
        "internal_error",
    )
    return SolverError(
        msg, result=getattr(RESULTS, code), solver=found.group(2), entry=found.group(1)
    )


def _is_runtime_error(err: BaseException) -> bool:
    text = str(err)
    return "EquinoxRuntimeError: " in text or "CpuCallback error" in text


class readable_errors(contextlib.ContextDecorator):
    """Turn the error of a ctmodels check that fired inside compiled code back into
    ctmodels' own error, with ctmodels' message as its first line.

    Inside `jax.jit` or `eqx.filter_jit` a failed check can only stop the program
    through a host callback, and JAX (not ctmodels) writes the error that reaches
    you: a `JaxRuntimeError` (or, on later calls of the same compiled function, a
    `ValueError`) beginning `INTERNAL: CpuCallback error calling callback`, or
    Equinox's `EquinoxRuntimeError` beginning `Above is the stack outside of JIT`,
    with ctmodels' message further down. Around the call of a compiled function, as
    a context manager or a decorator, this re-raises it as a
    [`ctmodels.SolverError`][] (a failed solve; `result`, `solver` and `entry` set) or
    a `ValueError` (a bad input such as unsorted times) whose message is ctmodels'
    alone; other errors pass through unchanged.

    ```python
    step = jax.jit(loss_and_grad)
    with ctmodels.readable_errors():
        loss, grads = step(params)
    ```
    """

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc is None or not isinstance(exc, Exception):
            return False
        ours = readable(exc)
        if ours is None:
            return False
        discard_failed_callbacks()
        raise ours from None


def _concrete_float(x, name: str, entry: str) -> float | None:
    """`x` as a Python float if it is a concrete real scalar; None if traced."""
    if x is None or is_traced(x):
        return None
    arr = np.asarray(x)
    if arr.ndim != 0 or not np.issubdtype(arr.dtype, np.number) or np.iscomplexobj(arr):
        raise ValueError(f"ctmodels.{entry}: {name} must be a real number, got {x!r}.")
    return float(arr)


def check_tolerances(rtol, atol, entry: str) -> None:
    """Tolerances must be finite, non-negative and not both zero (a solve that can
    never stop). `None` (the precision-aware default) and traced values pass."""
    r = _concrete_float(rtol, "rtol", entry)
    a = _concrete_float(atol, "atol", entry)
    for name, v in (("rtol", r), ("atol", a)):
        if v is not None and not (math.isfinite(v) and v >= 0):
            raise ValueError(
                f"ctmodels.{entry}: {name} must be a finite, non-negative number, got "
                f"{name}={v!r}. Typical values: rtol=1e-3 to 1e-8, atol about 1e-3 "
                "of the state's scale (or leave both out for the defaults)."
            )
    if r == 0 and a == 0:
        raise ValueError(
            f"ctmodels.{entry}: rtol and atol are both 0, so no error is small "
            "enough and the solve can never stop; give a positive rtol or atol."
        )


def check_step(dt0, entry: str) -> None:
    """A given step size must be a finite, non-zero number (its sign is ignored)."""
    v = _concrete_float(dt0, "dt0", entry)
    if v is not None and not (math.isfinite(v) and v != 0):
        raise ValueError(
            f"ctmodels.{entry}: dt0 must be a finite, non-zero step size, got "
            f"dt0={v!r} (its sign follows the direction of ts)."
        )


def check_fixed_steps(ts, dt0, max_steps: int, entry: str) -> None:
    """A fixed-step solve needs |t1 - t0| / dt0 steps: refuse, up front, a
    `max_steps` that cannot reach the end (when the times and the step are known)."""
    if dt0 is None or is_traced(ts, dt0):
        return
    span = abs(float(np.asarray(ts)[-1]) - float(np.asarray(ts)[0]))
    step = abs(float(np.asarray(dt0)))
    if step == 0 or not math.isfinite(span / step):
        return
    needed = math.ceil(span / step * (1 - 1e-6))
    if needed > max_steps:
        raise ValueError(
            f"ctmodels.{entry}: fixed steps of dt0={step:g} need {needed} steps to "
            f"cover the {span:g} time units of ts, more than max_steps={max_steps}; "
            f"raise max_steps to at least {needed} or take a larger dt0."
        )


def is_int(x) -> bool:
    """An int for a count or a size: Python or NumPy ints, not bools."""
    return isinstance(x, (int, np.integer)) and not isinstance(x, bool)


def discard_failed_callbacks() -> None:
    """Drop a runtime-check failure that was already caught and reported.

    On a GPU, a check that fires inside compiled code (an Equinox runtime error from
    a host callback) also fails JAX's runtime token of that device, and JAX raises it
    again at its next effects barrier: at the latest when the interpreter exits, as
    an "Exception ignored in atexit callback" traceback after a run that handled the
    error (seen on an H200 after `fit` diagnosed a failed solve). Call this after
    catching such an error: it waits for outstanding effects and, if they re-raise
    the failure, forgets the failed tokens (JAX has no public way to; the next
    computation starts new ones). On a CPU the error is raised once, at dispatch,
    and this only waits.
    """
    try:
        jax.effects_barrier()
    except Exception:  # noqa: BLE001 - the failure already caught, raised again
        from jax._src import dispatch

        dispatch.runtime_tokens.clear()


def suggest(name: str, choices: Iterable[str]) -> str:
    close = difflib.get_close_matches(name, list(choices), n=3, cutoff=0.5)
    return f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""


def dtype_eps(tree) -> tuple[str, float]:
    leaves = [x for x in jax.tree_util.tree_leaves(tree) if hasattr(x, "dtype")]
    dtype = jnp.result_type(*leaves) if leaves else jnp.float32
    if not jnp.issubdtype(dtype, jnp.inexact):
        dtype = jnp.float32
    return jnp.dtype(dtype).name, float(jnp.finfo(dtype).eps)
