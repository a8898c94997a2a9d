"""ctmodels' own model classes in the model catalogue (`ctmodels._catalog`), by name,
for rebuilding models from checkpoints."""

from .._catalog import register
from ._baselines import LOCF, RNNVAE, GRUDelta, LinearInterpolation
from ._ffjord import FFJORD
from ._latent_ode import LatentODE
from ._neural_ode import NeuralODE
from ._odernn import ODERNN
from ._svae import SVAE

#: ctmodels' own models by class name (the catalogue may hold users' models too:
#: `ctmodels.models.registered()`).
MODELS: dict[str, type] = {
    "LatentODE": LatentODE,
    "ODERNN": ODERNN,
    "GRUDelta": GRUDelta,
    "RNNVAE": RNNVAE,
    "LinearInterpolation": LinearInterpolation,
    "LOCF": LOCF,
}

for _cls in (*MODELS.values(), NeuralODE, FFJORD, SVAE):
    register(_cls)
