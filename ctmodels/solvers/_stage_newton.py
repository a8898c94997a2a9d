"""The Newton iteration inside the implicit ODE steppers."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, final

import optimistix as optx
from diffrax._root_finder import use_stepsize_tol
from jaxtyping import PyTree, Scalar


@final
class StageNewton(optx.AbstractRootFinder):
    """Newton's method for the stage equations of an implicit ODE stepper, stopping
    at whichever of two standard tests passes first:

    - Optimistix's "Cauchy" test: the step `|dz| <= atol + rtol |z|` and the residual
      `|G(z)| <= atol`;
    - the rate test of Hairer & Wanner (Solving ODEs II, IV.8), which Diffrax's
      default VeryChord uses: the iteration's observed contraction `rate` predicts
      the remaining error `|dz| rate / (1 - rate)` below `kappa` tolerances.

    Either alone fails on problems the other solves. The Cauchy test alone asks of a
    float32 stiff stage residual (roundoff times the stiffness: ~1e-4 h on
    y' = -1000 (y - cos t)) more than float32 gives, so every Newton solve failed and
    `integrate(..., solver="kvaerno5")` hit max_steps where `diffrax.Kvaerno5()`
    took 14 steps. The rate test alone fails the KenCarp steppers in float64 (even
    y' = A y hits max_steps: on a linear stage Newton converges in one step and the
    rate test has no contraction to observe). Divergence (a rate above 2 before
    either test passes) still stops the iteration, so the stepper rejects the step.

    `rtol`, `atol` and `norm` default to the step-size controller's (Diffrax's
    `with_stepsize_controller_tols`).
    """

    rtol: Any = use_stepsize_tol
    atol: Any = use_stepsize_tol
    norm: Callable[[PyTree], Scalar] | Any = use_stepsize_tol
    kappa: float = 1e-2

    def _newton(self, cauchy: bool) -> optx.Newton:
        return optx.Newton(
            rtol=self.rtol, atol=self.atol, norm=self.norm, kappa=self.kappa,
            cauchy_termination=cauchy,
        )  # fmt: skip

    def init(self, fn, y, args, options, f_struct, aux_struct, tags):
        return self._newton(True).init(fn, y, args, options, f_struct, aux_struct, tags)

    def step(self, fn, y, args, options, state, tags):
        return self._newton(True).step(fn, y, args, options, state, tags)

    def terminate(self, fn, y, args, options, state, tags):
        cauchy_done, cauchy_result = self._newton(True).terminate(
            fn, y, args, options, state, tags
        )
        rate_done, rate_result = self._newton(False).terminate(
            fn, y, args, options, state, tags
        )
        rate_ok = rate_done & (rate_result == optx.RESULTS.successful)
        cauchy_ok = cauchy_done & (cauchy_result == optx.RESULTS.successful)
        done = cauchy_done | rate_done
        result = optx.RESULTS.where(
            cauchy_ok | rate_ok,
            optx.RESULTS.successful,
            optx.RESULTS.where(rate_done, rate_result, cauchy_result),
        )
        return done, result

    def postprocess(self, fn, y, aux, args, options, state, tags, result):
        return y, aux, {}
