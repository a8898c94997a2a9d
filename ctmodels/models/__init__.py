"""`ctmodels.models`: continuous-time sequence models and their baselines.

The model catalogue maps class names to classes, so that a checkpoint can rebuild a
model as `cls(**dict(model.hyperparameters), key=...)`: ctmodels' own models are in
it (`MODELS`), and `register(MyModel)` adds a user's Equinox model (one with
`loss(batch, *, key)`, `hyperparameters` and, for predictions, `predict`), so that
`ctmodels.train.load_checkpoint` and the jobs load it like ours.
"""

from .._catalog import register as register, registered as registered
from ._baselines import (
    LOCF as LOCF,
    RNNVAE as RNNVAE,
    GRUDelta as GRUDelta,
    LinearInterpolation as LinearInterpolation,
)
from ._catalog import MODELS as MODELS
from ._ffjord import FFJORD as FFJORD
from ._latent_ode import LatentODE as LatentODE
from ._neural_ode import NeuralODE as NeuralODE
from ._odernn import ODERNN as ODERNN
from ._predict import (
    Fitted as Fitted,
    as_series as as_series,
    calibrate_spread as calibrate_spread,
    check_time_kind as check_time_kind,
    evaluation_tasks as evaluation_tasks,
    in_time_units as in_time_units,
    predict as predict,
    predict_grid as predict_grid,
    with_spread as with_spread,
)
from ._svae import (
    SVAE as SVAE,
    PriorStart as PriorStart,
    SVAEPosterior as SVAEPosterior,
)


def __getattr__(name: str):
    # `load_fitted` reads a job's checkpoint folder (checkpoint, normaliser,
    # calibration), which is the job layer's business: it lives in `ctmodels.jobs`
    # (models know nothing of train or jobs); this name stays for existing code.
    if name == "load_fitted":
        import importlib

        return importlib.import_module("ctmodels.jobs").load_fitted
    raise AttributeError(f"module 'ctmodels.models' has no attribute {name!r}")
