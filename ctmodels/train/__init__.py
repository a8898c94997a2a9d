"""`ctmodels.train`: a generic training loop and atomic, pickle-free checkpoints.

`fit` trains any `equinox.Module` with a `loss(batch, *, key) -> (loss, metrics)`
method on time series (`ctmodels.data.TimeSeries` or a lazy source) or on plain
arrays, with Optax, a progress bar, early stopping, a NaN guard, a per-epoch history
and checkpoints from which a killed run resumes exactly.
"""

from ._checkpoint import (
    checkpoint_fingerprint as checkpoint_fingerprint,
    load_checkpoint as load_checkpoint,
    save_checkpoint as save_checkpoint,
    write_text_atomic as write_text_atomic,
)
from ._fit import ResumeRefused as ResumeRefused, fit as fit
