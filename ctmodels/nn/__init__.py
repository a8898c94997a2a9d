"""`ctmodels.nn`: reusable blocks of the continuous-time models (masked GRU update, MLP
helpers, the ODE-RNN, the continuous-normalizing-flow field and divergences) and the
equilibrium layers (`DEQ`, `SteadyState`)."""

from ._cnf import (
    CNFField as CNFField,
    ConcatSquashLinear as ConcatSquashLinear,
    exact_divergence as exact_divergence,
    hutchinson_divergence as hutchinson_divergence,
)
from ._deq import DEQ as DEQ, EquilibriumSolution as EquilibriumSolution
from ._gru import GRUUpdate as GRUUpdate
from ._mlp import apply as apply, autonomous_field as autonomous_field, mlp as mlp
from ._odernn import ODERNNEncoder as ODERNNEncoder
from ._steady import SteadyState as SteadyState
