"""`ctmodels.models`: continuous-time sequence models and their baselines.

`MODELS` maps class names to classes, so that a checkpoint can rebuild a model as
`MODELS[name](**dict(model.hyperparameters), key=...)`.
"""

from ._baselines import (
    LOCF as LOCF,
    RNNVAE as RNNVAE,
    GRUDelta as GRUDelta,
    LinearInterpolation as LinearInterpolation,
)
from ._catalog import MODELS as MODELS
from ._latent_ode import LatentODE as LatentODE
from ._odernn import ODERNN as ODERNN
from ._predict import (
    Fitted as Fitted,
    calibrate_spread as calibrate_spread,
    load_fitted as load_fitted,
    predict as predict,
)
