"""Explicit Runge--Kutta steppers of Diffrax with their stages unrolled."""

from __future__ import annotations

from typing import Any, final

import diffrax
import equinox.internal as eqxi
import jax.lax as lax
import jax.numpy as jnp
import jax.tree_util as jtu
from jaxtyping import PyTree


def _combine(coeffs, ks):
    """`sum_j coeffs[j] * ks[j]` over the nonzero (static) coefficients; `None` if
    there are none."""
    out = None
    for c, k in zip(coeffs, ks, strict=False):
        c = float(c)
        if c == 0.0:
            continue
        term = jtu.tree_map(lambda x, c=c: c * x, k)
        out = term if out is None else jtu.tree_map(jnp.add, out, term)
    return out


@final
class UnrolledERK(diffrax.AbstractAdaptiveSolver):
    """Runs an explicit Runge--Kutta stepper of Diffrax (`diffrax.Dopri5()`,
    `diffrax.Tsit5()`, ...) with its stages written out one after the other in the
    traced program, instead of in Diffrax's loop over stages.

    Same tableau, same error estimate, same dense output and FSAL reuse, so the same
    steps and (to roundoff) the same values as the wrapped stepper. What changes is the
    cost of reverse-mode differentiation: Diffrax runs the stages of a step in a
    checkpointed loop (one trace of the vector field, whatever the number of stages),
    whose backward pass evaluates every stage once more; unrolled, JAX differentiates a
    step directly. Under `adjoint="checkpoint"` each stage is then evaluated twice per
    gradient (forward, and the recomputation of the step for its VJP) instead of three
    times, and the stage-by-stage bookkeeping disappears: on the neural-ODE benchmark
    (`benchmarks/node_overhead.py`) a forward + backward takes about 25 % less time,
    a backsolve gradient about 30 % less, a forward solve about 15 % less. The price
    is compilation: the vector field is traced once per stage (7 times for Dopri5, 13
    for Dopri8); build the plain stepper (`ctmodels.solvers.get(name,
    unroll=False)`) for a vector field that is slow to compile.

    Falls back to the wrapped stepper's own `step` wherever unrolling would change the
    algorithm: several terms, or a term whose vector field Diffrax treats as expensive
    (it then works with vector-field--control products only).

    **Arguments:**

    - `solver`: a `diffrax.AbstractERK` with a single `diffrax.ButcherTableau`.

    Reference: Hairer, Norsett & Wanner, "Solving Ordinary Differential Equations I",
    2nd ed., Springer 1993, II.1 and II.5 (explicit Runge--Kutta methods, embedded
    error estimates, FSAL).
    """

    solver: diffrax.AbstractERK

    def __check_init__(self):
        if not isinstance(self.solver, diffrax.AbstractERK) or not isinstance(
            getattr(self.solver, "tableau", None), diffrax.ButcherTableau
        ):
            raise ValueError(
                "UnrolledERK wraps an explicit Runge--Kutta stepper with one Butcher "
                f"tableau (e.g. diffrax.Dopri5()), got {type(self.solver).__name__}."
            )

    # Delegated, as diffrax.HalfSolver does.
    @property
    def term_structure(self):
        return self.solver.term_structure

    @property
    def interpolation_cls(self):  # pyright: ignore
        return self.solver.interpolation_cls

    @property
    def term_compatible_contr_kwargs(self):
        return self.solver.term_compatible_contr_kwargs

    @property
    def tableau(self) -> diffrax.ButcherTableau:
        return self.solver.tableau

    def order(self, terms):
        return self.solver.order(terms)

    def strong_order(self, terms):
        return self.solver.strong_order(terms)

    def error_order(self, terms):
        return self.solver.error_order(terms)

    def func(self, terms, t0, y0, args):
        return self.solver.func(terms, t0, y0, args)

    def _unrolled(self, terms, t0, t1, y0, args) -> bool:
        """Whether this step is unrolled (static: decided from types and shapes)."""
        if isinstance(terms, diffrax.MultiTerm):
            return False
        return not terms.is_vf_expensive(t0, t1, y0, args)

    def init(self, terms, t0, t1, y0, args):
        if not self._unrolled(terms, t0, t1, y0, args):
            return self.solver.init(terms, t0, t1, y0, args)
        if self.tableau.fsal:
            return terms.vf(t0, y0, args)
        return None

    def step(
        self,
        terms,
        t0,
        t1,
        y0: PyTree,
        args: Any,
        solver_state,
        made_jump,
    ):
        if not self._unrolled(terms, t0, t1, y0, args):
            return self.solver.step(terms, t0, t1, y0, args, solver_state, made_jump)
        tab = self.tableau
        control = terms.contr(t0, t1)
        dt = t1 - t0
        if not tab.fsal:
            f0 = terms.vf(t0, y0, args)
        elif made_jump is False:  # resolved at trace time (no jumps): the usual case
            f0 = solver_state
        else:
            # After a jump the stored first-same-as-last value is stale. `unvmap_any`
            # keeps this a real branch under vmap (no evaluation when nothing jumped).
            def fresh():
                f = terms.vf(t0, y0, args)
                return jtu.tree_map(
                    lambda a, b: jnp.where(made_jump, a, b), f, solver_state
                )

            f0 = lax.cond(eqxi.unvmap_any(made_jump), fresh, lambda: solver_state)
        fs = [f0]
        ks = [terms.prod(f0, control)]
        yi = y0
        for ci, ai in zip(tab.c, tab.a_lower, strict=True):
            increment = _combine(ai, ks)
            yi = y0 if increment is None else jtu.tree_map(jnp.add, y0, increment)
            fi = terms.vf(t0 + float(ci) * dt, yi, args)
            fs.append(fi)
            ks.append(terms.prod(fi, control))
        if tab.ssal:  # the solution is the last stage's point
            y1 = yi
        else:
            increment = _combine(tab.b_sol, ks)
            y1 = y0 if increment is None else jtu.tree_map(jnp.add, y0, increment)
        y_error = _combine(tab.b_error, ks)
        if y_error is None:
            y_error = jtu.tree_map(jnp.zeros_like, y0)
        dense_info = dict(y0=y0, y1=y1, k=jtu.tree_map(lambda *k: jnp.stack(k), *ks))
        new_state = fs[-1] if tab.fsal else None
        return y1, y_error, dense_info, new_state, diffrax.RESULTS.successful

    def __init_subclass__(cls, **kwargs):
        raise TypeError("`UnrolledERK` is final and may not be subclassed.")


def unrolled(cls):
    """Registry factory: `cls(**options)`, wrapped in [`UnrolledERK`][] unless
    `unroll=False`."""

    def factory(*, unroll: bool = True, **options):
        solver = cls(**options)
        return UnrolledERK(solver) if unroll else solver

    factory.__name__ = cls.__name__
    factory.__doc__ = cls.__doc__
    return factory
