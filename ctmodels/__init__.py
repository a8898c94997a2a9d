"""ctmodels: continuous-time models and implicit layers on JAX.

Latent ODEs, FFJORD, SVAEs and DEQs over one solver registry (`ctmodels.solvers`) and
one gradient engine (`integrate`, `fixed_point`, `root_find`, `steady_state`).
"""

from importlib import metadata as _metadata

from . import (
    data as data,
    datasets as datasets,
    lgssm as lgssm,
    models as models,
    nn as nn,
    solvers as solvers,
    train as train,
)
from ._defaults import default_tolerances as default_tolerances
from ._errors import (
    RESULTS as RESULTS,
    SolverError as SolverError,
    readable_errors as readable_errors,
)
from ._fixed_point import (
    FixedPointSolution as FixedPointSolution,
    fixed_point as fixed_point,
    root_find as root_find,
)
from ._integrate import Solution as Solution, integrate as integrate
from ._sde import integrate_sde as integrate_sde
from ._steady_state import steady_state as steady_state

try:
    __version__ = _metadata.version("ctmodels")
except _metadata.PackageNotFoundError:  # running from a source tree
    __version__ = "0.0.0+unknown"
