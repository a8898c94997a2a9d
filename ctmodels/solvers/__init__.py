"""The one solver registry shared by every ctmodels model and entry point.

`available(kind)` lists the entries with their capability tags, `get(name, **options)`
returns a configured solver value, and `register(name, factory, kind=...)` adds your
own (the parametrized test-suite covers registered entries automatically).
"""

from ._anderson import Anderson as Anderson
from ._broyden import Broyden as Broyden
from ._implicit import (
    BackwardMonitor as BackwardMonitor,
    CheckedLinearSolver as CheckedLinearSolver,
    ImplicitAdjoint as ImplicitAdjoint,
)
from ._registry import (
    KINDS as KINDS,
    available as available,
    entry as entry,
    get as get,
    names as names,
    register as register,
    unregister as unregister,
)
from ._stage_newton import StageNewton as StageNewton
from ._unrolled import UnrolledERK as UnrolledERK

# The built-in entries register themselves on import.
from . import _builtin as _builtin  # noqa: E402  # isort: skip
