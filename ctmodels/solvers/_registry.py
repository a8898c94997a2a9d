"""The one solver registry: names -> configured solver values, with capability tags."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable
from typing import Any

import pandas as pd

from .._errors import suggest

KINDS = ("ode", "sde", "controller", "adjoint", "fixed_point", "root", "linear")

# Columns always present in `available()`, in this order; other tags are appended.
_TAG_COLUMNS = ("adaptive", "stiff", "order", "implicit_gradient", "memory")


@dataclasses.dataclass(frozen=True)
class Entry:
    name: str
    kinds: tuple[str, ...]
    factory: Callable[..., Any]
    tags: dict[str, Any]
    doc: str


_REGISTRY: dict[str, Entry] = {}


def register(
    name: str,
    factory: Callable[..., Any],
    *,
    kind: str | Iterable[str],
    tags: dict[str, Any] | None = None,
    doc: str = "",
    overwrite: bool = False,
) -> None:
    """Add a solver to the registry.

    **Arguments:**

    - `name`: the registry name (lower case, as used on the command line).
    - `factory`: called as `factory(**options)` by [`ctmodels.solvers.get`][]; returns
        the solver value (a Diffrax/Optimistix/Lineax object or your own).
    - `kind`: one of `"ode"`, `"sde"`, `"controller"`, `"adjoint"`, `"fixed_point"`,
        `"root"`, `"linear"`, or several of them (a root finder also solves
        fixed-point problems).
    - `tags`: capability tags, e.g. `{"adaptive": True, "stiff": False, "order": 5}`.
        For `fixed_point`/`root`/`ode` entries the test-suite reads `order` and
        `stiff`; unknown tags become extra columns of `available()`.
    - `doc`: a one-line description.
    - `overwrite`: replace an existing entry of the same name instead of raising.

    A registered entry is picked up by the parametrized test-suite automatically.
    """
    kinds = (kind,) if isinstance(kind, str) else tuple(kind)
    for k in kinds:
        if k not in KINDS:
            raise ValueError(
                f"Unknown solver kind {k!r}; kinds are {', '.join(KINDS)}."
            )
    if not isinstance(name, str) or not name:
        raise ValueError("A solver name must be a non-empty string.")
    if not callable(factory):
        raise ValueError(f"The factory for {name!r} must be callable.")
    if name in _REGISTRY and not overwrite:
        raise ValueError(
            f"A solver named {name!r} is already registered; pass overwrite=True to "
            "replace it."
        )
    _REGISTRY[name] = Entry(name, kinds, factory, dict(tags or {}), doc)


def unregister(name: str) -> None:
    """Remove a registry entry (mainly for tests and plugins)."""
    _lookup(name, None)
    del _REGISTRY[name]


def names(kind: str | None = None) -> list[str]:
    """The registered names, optionally of one kind, in registration order."""
    if kind is not None and kind not in KINDS:
        raise ValueError(f"Unknown solver kind {kind!r}; kinds are {', '.join(KINDS)}.")
    return [n for n, e in _REGISTRY.items() if kind is None or kind in e.kinds]


def entry(name: str, kind: str | None = None) -> Entry:
    """The registry entry of `name` (with its tags and doc)."""
    return _lookup(name, kind)


def _lookup(name: str, kind: str | None) -> Entry:
    if not isinstance(name, str):
        raise ValueError(
            f"Expected a solver name (a string), got {type(name).__name__}."
        )
    key = name.strip().lower()
    e = _REGISTRY.get(key)
    if e is None:
        pool = names(kind) if kind is not None else list(_REGISTRY)
        what = f"{kind} solver" if kind else "solver"
        raise ValueError(
            f"Unknown {what} {name!r}.{suggest(key, pool)} "
            f"Available: {', '.join(pool)}. (`ctmodels solvers` lists them all.)"
        )
    if kind is not None and kind not in e.kinds:
        raise ValueError(
            f"{name!r} is a {'/'.join(e.kinds)} entry, not "
            f"{'an' if kind[0] in 'aeiou' else 'a'} {kind} solver. "
            f"{kind} solvers: {', '.join(names(kind))}."
        )
    return e


def get(name: str, *, kind: str | None = None, **options) -> Any:
    """Return a configured solver value.

    **Arguments:**

    - `name`: a registry name such as `"tsit5"`, `"pid"`, `"anderson"`.
    - `kind`: optionally, the kind the caller expects; a name of another kind raises.
    - `**options`: passed to the entry's factory (e.g. `rtol`, `atol`, `memory`).

    **Returns:** the solver value, e.g. `diffrax.Tsit5()`.

    Raises `ValueError` naming the close matches for an unknown name.
    """
    e = _lookup(name, kind)
    try:
        return e.factory(**options)
    except TypeError as err:
        raise ValueError(
            f"Bad options {sorted(options)} for solver {name!r}: {err}"
        ) from err


def available(kind: str | None = None) -> pd.DataFrame:
    """One row per (entry, kind): name, kind, capability tags and a one-line doc.

    **Arguments:**

    - `kind`: restrict to one kind (`"ode"`, `"controller"`, `"adjoint"`,
        `"fixed_point"`, `"root"`, `"linear"`).
    """
    rows = []
    extra: list[str] = []
    for n in names(kind):
        e = _REGISTRY[n]
        for k in e.kinds:
            if kind is not None and k != kind:
                continue
            row = {"name": n, "kind": k}
            for t in _TAG_COLUMNS:
                row[t] = e.tags.get(t)
            for t, v in e.tags.items():
                if t not in _TAG_COLUMNS:
                    row[t] = v
                    if t not in extra:
                        extra.append(t)
            row["doc"] = e.doc
            rows.append(row)
    columns = ["name", "kind", *_TAG_COLUMNS, *extra, "doc"]
    return pd.DataFrame(rows, columns=columns)


def resolve(value: Any, kind: str, **options) -> tuple[Any, str]:
    """A registry name or a value -> (value, display name). Used by entry points."""
    if isinstance(value, str):
        e = _lookup(value, kind)
        return get(e.name, kind=kind, **options), e.name
    if value is None:
        raise ValueError(f"Expected a {kind} solver name or value, got None.")
    return value, type(value).__name__
