"""The SVAE family (`ctmodels fit svae`): an `SVAE` (structured VAE with a
continuous-time linear-Gaussian prior) on irregular time series, with the latent
ODE's data path, training task (`mixed_task`), evaluation (interpolation and
extrapolation against LOCF and linear interpolation, 90% coverage), calibrated
predictive spread and plots.

Recipes: every dataset starts on `DEFAULT_RECIPE` (a step budget scaled to the
training split); per-dataset recipes are added here as they are measured.
"""

from __future__ import annotations

from typing import Any

from ..models import SVAE
from ._family import DEFAULT_RECIPE, Family
from ._latent_ode import mixed_task

#: Per-dataset recipes (by bundled dataset name); none measured yet.
RECIPES: dict[str, dict[str, Any]] = {}

SVAE_FAMILY = Family(
    name="svae",
    model=SVAE,
    title="SVAE",
    summary="structured VAE with a continuous-time linear-Gaussian prior "
    "(Johnson et al. 2016) on irregular time series",
    defaults={"latent_size": 8, "units": 64},
    loss_options=("n_samples",),
    recipe=DEFAULT_RECIPE,
    recipes=RECIPES,
    task=mixed_task,
)
