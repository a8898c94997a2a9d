"""The one table of defaults of the gradient engine: solver names per entry point and
tolerances per kind of problem and floating-point precision.

Used by `integrate`, `fixed_point`, `root_find`, `steady_state` and the solver
registry (and meant for the models and the command line, so that a default is written
once). The numbers, and the measurements behind them, are in `docs/precision.md`.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

# The solver each entry point uses when none is given.
SOLVERS = {
    "integrate": "tsit5",
    "steady_state_integrate": "tsit5",
    "fixed_point": "anderson",
    "root_find": "newton",
    "steady_state": "newton",
}

# (rtol, atol) per kind of problem and precision. "ode": the step-size controller of
# an ODE solve with an explicit stepper; "implicit_ode": the same with an implicit
# stepper (kvaerno*, kencarp*, implicit_euler, sil3), whose Newton iteration uses the
# controller's tolerances. "nonlinear": fixed points, roots and steady states.
#
# float32 explicit steppers keep rtol 1e-5 (two orders above float32's resolution,
# so the error estimate is not roundoff; at 1e-3 a README-sized gradient through
# backsolve was off by 9e-4 relative). Only the implicit steppers need the looser
# row in float32 (below).
#
# float64: what the engine has always used. float32: the tightest round numbers at
# which every registry entry works by name on the standard test problems
# (docs/precision.md): an ESDIRK stepper (kvaerno3/4/5, kencarp*) on the stiff
# y' = -1000 (y - cos t) needs rtol >= 1e-3 in float32 (at 1e-4 its error estimate is
# dominated by the roundoff of the stiff stages and the solve hits max_steps), and a
# float32 fixed point or root resolves about 1e-7 relative error, so 1e-5 leaves a
# margin of ~100 ulps for the residual's own roundoff.
TOLERANCES: dict[str, dict[str, tuple[float, float]]] = {
    "ode": {"float64": (1e-6, 1e-8), "float32": (1e-5, 1e-6)},
    "implicit_ode": {"float64": (1e-6, 1e-8), "float32": (1e-3, 1e-6)},
    "nonlinear": {"float64": (1e-6, 1e-8), "float32": (1e-5, 1e-6)},
}
# float16 / bfloat16 states get the float32 row (they are rare in solves; a solve in
# half precision should be checked by hand).
_ROW = {"float64": "float64", "float32": "float32", "float16": "float32",
        "bfloat16": "float32"}  # fmt: skip


def _dtype_name(dtype) -> str:
    if dtype is None:
        dtype = jnp.result_type(float)  # JAX's default: float32 unless x64 is enabled
    dtype = jnp.dtype(dtype)
    if jnp.issubdtype(dtype, jnp.complexfloating):
        dtype = jnp.finfo(dtype).dtype
    if not jnp.issubdtype(dtype, jnp.floating):
        dtype = jnp.dtype(jnp.result_type(float))
    return _ROW.get(dtype.name, "float64")


def default_tolerances(kind: str, dtype: Any = None) -> tuple[float, float]:
    """The default `(rtol, atol)` of a solve of `kind` in `dtype`.

    **Arguments:**

    - `kind`: `"ode"` (the step-size controller of `integrate` with an explicit
        stepper, and of `steady_state(method="integrate")`'s integration),
        `"implicit_ode"` (the same with an implicit stepper) or `"nonlinear"`
        (`fixed_point`, `root_find`, `steady_state`'s stopping rule).
    - `dtype`: the floating dtype of the state; `None` means JAX's default float
        (float32 unless `jax_enable_x64` is on). Integer states count as that default.

    **Returns:** `(rtol, atol)`:

    | kind        | float32          | float64          |
    |-------------|------------------|------------------|
    | `ode`       | `1e-5`, `1e-6`   | `1e-6`, `1e-8`   |
    | `implicit_ode` | `1e-3`, `1e-6` | `1e-6`, `1e-8`   |
    | `nonlinear` | `1e-5`, `1e-6`   | `1e-6`, `1e-8`   |
    """
    try:
        row = TOLERANCES[kind]
    except KeyError:
        raise ValueError(
            f"Unknown kind {kind!r} of tolerances; kinds are {', '.join(TOLERANCES)}."
        ) from None
    return row[_dtype_name(dtype)]


def state_dtype(tree) -> Any:
    """The floating dtype a solve of the pytree `tree` runs in (JAX's promotion of its
    leaves, integers counting as the default float)."""
    leaves = [
        x for x in jax.tree_util.tree_leaves(tree) if hasattr(x, "dtype") or
        isinstance(x, int | float | complex | np.number)
    ]  # fmt: skip
    if not leaves:
        return jnp.result_type(float)
    dtype = jnp.result_type(*leaves)
    if not jnp.issubdtype(dtype, jnp.inexact):
        dtype = jnp.result_type(dtype, float)
    return dtype


def tolerances(kind: str, tree, rtol=None, atol=None) -> tuple[Any, Any]:
    """`(rtol, atol)` with each `None` replaced by its default for `tree`'s dtype."""
    d_rtol, d_atol = default_tolerances(kind, state_dtype(tree))
    return (d_rtol if rtol is None else rtol), (d_atol if atol is None else atol)
