"""Model classes by name, for rebuilding models from checkpoints."""

from ._baselines import LOCF, RNNVAE, GRUDelta, LinearInterpolation
from ._latent_ode import LatentODE
from ._odernn import ODERNN

MODELS: dict[str, type] = {
    "LatentODE": LatentODE,
    "ODERNN": ODERNN,
    "GRUDelta": GRUDelta,
    "RNNVAE": RNNVAE,
    "LinearInterpolation": LinearInterpolation,
    "LOCF": LOCF,
}
