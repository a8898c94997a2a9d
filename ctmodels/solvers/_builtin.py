"""The registry's built-in entries: Diffrax steppers, controllers, adjoints, Optimistix
and ctmodels fixed-point/root solvers, and Lineax linear solvers."""

from __future__ import annotations

import diffrax
import lineax as lx
import optimistix as optx

from .._defaults import default_tolerances
from ._implicit import AndersonLinearSolver, ImplicitAdjoint, NeumannLinearSolver
from ._registry import get, register
from ._stage_newton import StageNewton
from ._unrolled import unrolled

# The float64 defaults, kept for code that imported them; solvers built by name
# without tolerances get `ctmodels._defaults.default_tolerances(kind)` for JAX's
# default float (float32 unless x64 is enabled).
DEFAULT_RTOL, DEFAULT_ATOL = default_tolerances("ode", "float64")


def _implicit_adjoint(
    linear_solver="auto", *, backward_tol=1e-2, on_backward=None, **options
) -> ImplicitAdjoint:
    if isinstance(linear_solver, str):
        linear_solver = get(linear_solver, kind="linear", **options)
    return ImplicitAdjoint(linear_solver, backward_tol, on_backward)


def _newton_root_finder(cls):
    """Implicit steppers default to Newton with the controller's tolerances: Diffrax's
    default VeryChord root finder fails inside the KenCarp steppers (diffrax 0.7.2:
    even dy/dt = -2y hits max_steps) and makes Kvaerno5 reject about half its steps
    on stiff problems (779 steps against 51 with Newton on our stiff steady state).

    Newton stops at whichever of Optimistix's Cauchy test and Hairer & Wanner's rate
    test passes first ([`ctmodels.solvers.StageNewton`][]): the Cauchy test alone
    rejected every stiff step in float32, the rate test alone fails the KenCarp
    steppers."""

    def factory(**options):
        options.setdefault("root_finder", StageNewton())
        return cls(**options)

    factory.__name__ = cls.__name__
    return factory


def _ode(cls, order, *, stiff=False, adaptive=True, imex=False, doc=""):
    name = cls.__name__.lower()
    if name == "impliciteuler":
        name = "implicit_euler"
    elif name == "reversibleheun":
        name = "reversible_heun"
    elif name == "leapfrogmidpoint":
        name = "leapfrog_midpoint"
    register(
        name,
        cls,
        kind="ode",
        tags={
            "adaptive": adaptive,
            "stiff": stiff,
            "order": order,
            "implicit_gradient": False,
            "memory": None,
            "imex": imex,
        },
        doc=doc,
    )


_ode(diffrax.Euler, 1, adaptive=False, doc="Explicit Euler; fixed steps (pass dt0).")
_ode(
    unrolled(diffrax.Heun),
    2,
    doc="Heun's method, 2nd order with embedded Euler error estimate.",
)
_ode(unrolled(diffrax.Midpoint), 2, doc="Explicit midpoint, 2nd order, adaptive.")
_ode(
    unrolled(diffrax.Ralston),
    2,
    doc="Ralston's 2nd-order method (minimal truncation error).",
)
_ode(
    unrolled(diffrax.Bosh3), 3, doc="Bogacki-Shampine 3(2); cheap at loose tolerances."
)
_ode(unrolled(diffrax.Tsit5), 5, doc="Tsitouras 5(4); the default non-stiff solver.")
_ode(
    unrolled(diffrax.Dopri5),
    5,
    doc="Dormand-Prince 5(4) (torchdiffeq's and scipy's RK45).",
)
_ode(unrolled(diffrax.Dopri8), 8, doc="Dormand-Prince 8(7); for tight tolerances.")
_ode(
    _newton_root_finder(diffrax.ImplicitEuler),
    1,
    stiff=True,
    doc="Implicit Euler; L-stable, for stiff ODEs.",
)
_ode(
    _newton_root_finder(diffrax.Kvaerno3),
    3,
    stiff=True,
    doc="Kvaerno 3(2) ESDIRK; L-stable, stiff ODEs.",
)
_ode(
    _newton_root_finder(diffrax.Kvaerno4),
    4,
    stiff=True,
    doc="Kvaerno 4(3) ESDIRK; L-stable, stiff ODEs.",
)
_ode(
    _newton_root_finder(diffrax.Kvaerno5),
    5,
    stiff=True,
    doc="Kvaerno 5(4) ESDIRK; the default stiff solver.",
)


_imex_doc = (
    "Kennedy-Carpenter {} IMEX; pass vector_field=(explicit, implicit), or one field "
    "to treat it all implicitly."
)
_ode(
    _newton_root_finder(diffrax.KenCarp3),
    3,
    stiff=True,
    imex=True,
    doc=_imex_doc.format("3(2)"),
)
_ode(
    _newton_root_finder(diffrax.KenCarp4),
    4,
    stiff=True,
    imex=True,
    doc=_imex_doc.format("4(3)"),
)
_ode(
    _newton_root_finder(diffrax.KenCarp5),
    5,
    stiff=True,
    imex=True,
    doc=_imex_doc.format("5(4)"),
)
_ode(
    _newton_root_finder(diffrax.Sil3),
    2,
    stiff=True,
    imex=True,
    doc="SIL3 IMEX (3rd-order explicit / 2nd-order implicit part).",
)
_ode(
    diffrax.ReversibleHeun,
    2,
    doc="Reversible Heun; algebraically reversible, exact backsolve gradients.",
)
_ode(
    diffrax.LeapfrogMidpoint,
    2,
    adaptive=False,
    doc="Leapfrog/midpoint two-step method; fixed steps, time-reversible.",
)


def _constant():
    return diffrax.ConstantStepSize()


def _pid(rtol=None, atol=None, **options):
    d_rtol, d_atol = default_tolerances("ode")
    rtol = d_rtol if rtol is None else rtol
    atol = d_atol if atol is None else atol
    return diffrax.PIDController(rtol=rtol, atol=atol, **options)


register(
    "constant",
    _constant,
    kind="controller",
    tags={"adaptive": False},
    doc="Fixed step size dt0.",
)
register(
    "pid",
    _pid,
    kind="controller",
    tags={"adaptive": True},
    doc="Adaptive PI(D) controller on the embedded error estimate (rtol, atol).",
)

register(
    "checkpoint",
    diffrax.RecursiveCheckpointAdjoint,
    kind="adjoint",
    tags={"implicit_gradient": False, "memory": "O(log steps) checkpoints"},
    doc="Discretise-then-optimise: backprop through the solver with checkpointing.",
)
register(
    "backsolve",
    diffrax.BacksolveAdjoint,
    kind="adjoint",
    tags={"implicit_gradient": False, "memory": "O(1)"},
    doc="Continuous adjoint: solve the adjoint ODE backwards (Chen et al. 2018).",
)
register(
    "direct",
    diffrax.DirectAdjoint,
    kind="adjoint",
    tags={"implicit_gradient": False, "memory": "O(max_steps)"},
    doc="Plain autodiff through the solve; supports forward and reverse mode.",
)
register(
    "forward",
    diffrax.ForwardMode,
    kind="adjoint",
    tags={"implicit_gradient": False, "memory": "O(1)"},
    doc="Forward-mode autodiff (jax.jvp/jacfwd); good for few parameters.",
)
register(
    "implicit",
    _implicit_adjoint,
    kind="adjoint",
    tags={"implicit_gradient": True, "memory": "O(1)"},
    doc="Implicit function theorem at a fixed point / steady state (one linear solve).",
)


def _fp(cls, **fixed):
    def factory(rtol=None, atol=None, **options):
        d_rtol, d_atol = default_tolerances("nonlinear")
        rtol = d_rtol if rtol is None else rtol
        atol = d_atol if atol is None else atol
        return cls(rtol=rtol, atol=atol, **{**fixed, **options})

    return factory


def _register_nonlinear():
    from ._anderson import Anderson
    from ._broyden import Broyden

    register(
        "iteration",
        _fp(optx.FixedPointIteration),
        kind="fixed_point",
        tags={"order": 1, "implicit_gradient": True},
        doc="Plain fixed-point iteration z <- f(z).",
    )
    register(
        "damped",
        _fp(optx.FixedPointIteration, damp=0.5),
        kind="fixed_point",
        tags={"order": 1, "implicit_gradient": True},
        doc="Damped iteration z <- (1-d) f(z) + d z (damp=0.5 by default).",
    )
    register(
        "newton",
        _fp(optx.Newton),
        kind=("fixed_point", "root"),
        tags={"order": 2, "implicit_gradient": True},
        doc="Newton's method with a dense Jacobian; quadratic, for small systems.",
    )
    register(
        "chord",
        _fp(optx.Chord),
        kind=("fixed_point", "root"),
        tags={"order": 1, "implicit_gradient": True},
        doc="Chord method: Newton with the Jacobian of the initial point.",
    )
    register(
        "anderson",
        _fp(Anderson),
        kind=("fixed_point", "root"),
        tags={"order": 1, "implicit_gradient": True},
        doc="Anderson acceleration (memory m, mixing beta, scaled Tikhonov term).",
    )
    register(
        "broyden",
        _fp(Broyden),
        kind=("fixed_point", "root"),
        tags={"order": 1, "implicit_gradient": True},
        doc="Limited-memory good Broyden quasi-Newton (Jacobian-free).",
    )


_register_nonlinear()


def _iterative(cls, **fixed):
    def factory(rtol=1e-6, atol=1e-6, **options):
        return cls(rtol=rtol, atol=atol, **{**fixed, **options})

    return factory


register(
    "auto",
    lambda well_posed=None: lx.AutoLinearSolver(well_posed=well_posed),
    kind="linear",
    tags={"implicit_gradient": True},
    doc="Lineax picks: LU for square, QR/SVD otherwise (dense).",
)
register(
    "lu",
    lx.LU,
    kind="linear",
    tags={"implicit_gradient": True},
    doc="Dense LU; square, well-posed.",
)
register(
    "qr",
    lx.QR,
    kind="linear",
    tags={"implicit_gradient": True},
    doc="Dense QR; least squares for non-square or rank-deficient systems.",
)


def _normal_cg(rtol=1e-6, atol=1e-6, **options):
    return lx.Normal(lx.CG(rtol=rtol, atol=atol, **options))


register(
    "anderson_linear",
    AndersonLinearSolver,
    kind="linear",
    tags={"implicit_gradient": True, "memory": "O(m n)"},
    doc="Matrix-free Anderson-accelerated x <- x + (Ax - b); the default backward "
    "solve of fixed_point (contractive maps).",
)
register(
    "neumann",
    NeumannLinearSolver,
    kind="linear",
    tags={"implicit_gradient": True, "memory": "O(n)"},
    doc="Matrix-free plain iteration x <- x + w (Ax - b) (Neumann series); the "
    "default backward solve of fixed_point with solver 'iteration' / 'damped'.",
)
register(
    "cg",
    _normal_cg,
    kind="linear",
    tags={"implicit_gradient": True},
    doc="Conjugate gradients on the normal equations (matrix-free).",
)
register(
    "gmres",
    _iterative(lx.GMRES),
    kind="linear",
    tags={"implicit_gradient": True},
    doc="Restarted GMRES (matrix-free), for large nonsymmetric systems.",
)


# ---------------------------------------------------------------------------------
# Capability tags read by the entry points' compatibility checks
# (`ctmodels._integrate.check_compatible`), and the SDE steppers (kind "sde").
#
# - ode/sde `single_term`: the stepper takes one term. `adjoint="backsolve"` wraps the
#   problem in one adjoint term, so it needs such a stepper (not the IMEX ones, which
#   take an explicit and an implicit term, nor the SDE Runge-Kutta ones, which take
#   the drift and the diffusion separately).
# - sde `sde_type` ("ito" / "stratonovich"): which SDE the stepper converges to;
#   `noise`: the noise it supports ("general", "commutative", "additive");
#   `strong_order`: its strong order of convergence on that noise.
# - adjoint `single_term_only`, `events`, `saves`, `sde_types`: what the adjoint can
#   differentiate (absent: anything).


def _add_tags(name: str, **tags) -> None:
    from ._registry import entry

    entry(name).tags.update(tags)


def _also_kind(name: str, kind: str, doc: str, **tags) -> None:
    """Give an existing entry a second kind (the same value solves both)."""
    from ._registry import entry

    e = entry(name)
    register(
        name,
        e.factory,
        kind=(*e.kinds, kind),
        tags={**e.tags, **tags},
        doc=f"{e.doc} As an SDE stepper: {doc}",
        overwrite=True,
    )


for _name in ("kencarp3", "kencarp4", "kencarp5", "sil3"):
    _add_tags(_name, single_term=False)
for _name in (
    "euler", "heun", "midpoint", "ralston", "bosh3", "tsit5", "dopri5", "dopri8",
    "implicit_euler", "kvaerno3", "kvaerno4", "kvaerno5", "reversible_heun",
    "leapfrog_midpoint",
):  # fmt: skip
    _add_tags(_name, single_term=True)

_add_tags(
    "backsolve",
    single_term_only=True,
    events=False,
    saves=("ts", "t0", "t1"),
    sde_types=("stratonovich",),
)


def _sde(name, cls, *, sde_type, noise, strong_order, single_term, doc):
    register(
        name,
        cls,
        kind="sde",
        tags={
            "adaptive": False,
            "stiff": False,
            "order": strong_order,
            "implicit_gradient": False,
            "memory": None,
            "sde_type": sde_type,
            "noise": noise,
            "strong_order": strong_order,
            "single_term": single_term,
        },
        doc=doc,
    )


_also_kind(
    "euler",
    "sde",
    "Euler-Maruyama (Ito), strong order 0.5.",
    sde_type="ito",
    noise="general",
    strong_order=0.5,
)
_also_kind(
    "reversible_heun",
    "sde",
    "Stratonovich, strong order 0.5; exact backsolve reconstruction.",
    sde_type="stratonovich",
    noise="general",
    strong_order=0.5,
)
_sde(
    "euler_heun",
    diffrax.EulerHeun,
    sde_type="stratonovich",
    noise="general",
    strong_order=0.5,
    single_term=False,
    doc="Euler-Heun (Stratonovich), strong order 0.5.",
)
_sde(
    "ito_milstein",
    diffrax.ItoMilstein,
    sde_type="ito",
    noise="commutative",
    strong_order=1.0,
    single_term=False,
    doc="Milstein (Ito), strong order 1 on commutative (e.g. diagonal) noise.",
)
_sde(
    "stratonovich_milstein",
    diffrax.StratonovichMilstein,
    sde_type="stratonovich",
    noise="commutative",
    strong_order=1.0,
    single_term=False,
    doc="Milstein (Stratonovich), strong order 1 on commutative noise.",
)
_sde(
    "sea",
    diffrax.SEA,
    sde_type="stratonovich",
    noise="additive",
    strong_order=1.0,
    single_term=False,
    doc="Shifted Euler, additive noise only (diffusion independent of y).",
)
_sde(
    "sra1",
    diffrax.SRA1,
    sde_type="stratonovich",
    noise="additive",
    strong_order=1.5,
    single_term=False,
    doc="SRA1 stochastic Runge-Kutta, additive noise only; strong order 1.5.",
)
_sde(
    "shark",
    diffrax.ShARK,
    sde_type="stratonovich",
    noise="additive",
    strong_order=1.5,
    single_term=False,
    doc="ShARK, additive noise only; strong order 1.5, cheap.",
)
_sde(
    "general_shark",
    diffrax.GeneralShARK,
    sde_type="stratonovich",
    noise="general",
    strong_order=0.5,
    single_term=False,
    doc="ShARK for general-noise Stratonovich SDEs.",
)
_sde(
    "spark",
    diffrax.SPaRK,
    sde_type="stratonovich",
    noise="general",
    strong_order=0.5,
    single_term=False,
    doc="SPaRK splitting-path Runge-Kutta (Stratonovich), general noise.",
)
_sde(
    "slow_rk",
    diffrax.SlowRK,
    sde_type="stratonovich",
    noise="commutative",
    strong_order=1.5,
    single_term=False,
    doc="SLOW-RK, commutative-noise Stratonovich SDEs; strong order 1.5.",
)
