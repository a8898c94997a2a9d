"""`ctmodels.nn`: reusable blocks of the continuous-time models (masked GRU update, MLP
helpers, the ODE-RNN)."""

from ._gru import GRUUpdate as GRUUpdate
from ._mlp import apply as apply, autonomous_field as autonomous_field, mlp as mlp
from ._odernn import ODERNNEncoder as ODERNNEncoder
