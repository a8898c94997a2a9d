"""`ctmodels.jobs`: the jobs behind the `ctmodels` command, for every model family.

A model family is a `Family` spec (its model class, the options read off the
model's constructor, its recipes, training task, evaluation, predictions, samples,
plots); `register_family` adds one, and the generic jobs `fit`, `predict`,
`evaluate` and `sample` run any registered family. The command line is built from
the registry: `ctmodels fit FAMILY --data ... --out ...` and
`ctmodels predict|evaluate|sample --checkpoint DIR` (dispatching on the family the
checkpoint records). See docs/cli.md.
"""

from ._family import (
    DEFAULT_RECIPE as DEFAULT_RECIPE,
    Family as Family,
    families as families,
    get_family as get_family,
    register_family as register_family,
)
from ._ffjord import FFJORD_FAMILY as FFJORD_FAMILY
from ._files import CALIBRATION as CALIBRATION
from ._jobs import (
    FROM_RECIPE as FROM_RECIPE,
    budget as budget,
    evaluate as evaluate,
    fit as fit,
    load_fitted as load_fitted,
    predict as predict,
    resolve_recipe as resolve_recipe,
    sample as sample,
)
from ._latent_ode import (
    LATENT_ODE as LATENT_ODE,
    RECIPES as RECIPES,
    mixed_task as mixed_task,
)
from ._neural_ode import (
    NEURAL_ODE as NEURAL_ODE,
    first_visit_task as first_visit_task,
)
from ._options import (
    DEPRECATED as DEPRECATED,
    Option as Option,
    parse_assignment as parse_assignment,
)
from ._series import EVAL_SAMPLES as EVAL_SAMPLES
from ._svae import SVAE_FAMILY as SVAE_FAMILY

register_family(LATENT_ODE)
register_family(NEURAL_ODE)
register_family(FFJORD_FAMILY)
register_family(SVAE_FAMILY)
