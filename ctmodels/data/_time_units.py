"""Time units: the names ctmodels reads in a time variable's `units` attribute, and
their lengths, for converting float times and datetimes between units."""

from __future__ import annotations

#: Seconds per time unit, by canonical unit name.
TIME_UNITS: dict[str, float] = {
    "seconds": 1.0,
    "minutes": 60.0,
    "hours": 3600.0,
    "days": 86400.0,
    "weeks": 7 * 86400.0,
    "years": 365.25 * 86400.0,
}

_ALIASES = {
    "s": "seconds",
    "sec": "seconds",
    "second": "seconds",
    "min": "minutes",
    "minute": "minutes",
    "h": "hours",
    "hour": "hours",
    "d": "days",
    "day": "days",
    "w": "weeks",
    "week": "weeks",
    "y": "years",
    "year": "years",
}


def canonical_time_unit(units: str) -> str:
    """The canonical name (a key of `TIME_UNITS`) of the time unit `units` (`"d"`,
    `"day"`, `"days"` -> `"days"`); ValueError for a unit ctmodels does not know."""
    u = _ALIASES.get(units, units)
    if u not in TIME_UNITS:
        raise ValueError(
            f"Unknown time_units {units!r}; use one of {sorted(TIME_UNITS)}."
        )
    return u


def ns_per_time_unit(units: str) -> float:
    """Nanoseconds in one `units` (any spelling `canonical_time_unit` accepts)."""
    return TIME_UNITS[canonical_time_unit(units)] * 1e9
