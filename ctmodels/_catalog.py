"""The model catalogue: the model classes a checkpoint can be rebuilt as, by name.

It sits below `ctmodels.models` (which registers its classes here) and
`ctmodels.train` (whose `load_checkpoint` looks a saved class name up here), so that
neither imports the other. Users add their own models with
`ctmodels.models.register`, as solvers with `ctmodels.solvers.register`.
"""

from __future__ import annotations

import difflib
from collections.abc import Mapping
from types import MappingProxyType

_CATALOG: dict[str, type] = {}


def register(cls: type, *, overwrite: bool = False) -> type:
    """Add the model class `cls` to the catalogue under its `__name__` (the name a
    checkpoint records), so that `ctmodels.train.load_checkpoint` and the jobs can
    rebuild it as `cls(**hyperparameters, key=...)` from a checkpoint. Returns `cls`
    (usable as a class decorator). A different class of the same name is refused
    unless `overwrite=True`."""
    if not isinstance(cls, type):
        raise TypeError(
            f"register takes a model class, got {type(cls).__name__}: register the "
            "class (e.g. `register(MyModel)`), not an instance."
        )
    name = cls.__name__
    have = _CATALOG.get(name)
    if have is not None and have is not cls and not overwrite:
        raise ValueError(
            f"A model class named {name!r} is registered already ({have.__module__}."
            f"{have.__qualname__}); a checkpoint records only the class name, so two "
            "classes cannot share one. Rename yours, or pass overwrite=True to "
            "replace the registered one."
        )
    _CATALOG[name] = cls
    return cls


def registered() -> Mapping[str, type]:
    """The registered model classes by name (a read-only live view)."""
    return MappingProxyType(_CATALOG)


def lookup(name: str) -> type:
    """The registered class named `name` (ValueError naming close matches)."""
    try:
        return _CATALOG[name]
    except KeyError:
        close = difflib.get_close_matches(str(name), list(_CATALOG), n=3)
        hint = f" Did you mean {', '.join(map(repr, close))}?" if close else ""
        raise ValueError(
            f"No model class {name!r} is registered.{hint} Register yours with "
            "ctmodels.models.register(YourModel) before loading its checkpoint."
        ) from None
