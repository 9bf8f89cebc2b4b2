"""Validation shared by the settings dataclasses (training, recipes, model configs): every field
holds its default's type, and ranges are checked with messages naming the field."""

from __future__ import annotations

import dataclasses
import math


def field_kind(field: dataclasses.Field, value) -> type | None:
    """The type a field holds: its default's, or the one its annotation names when the default is None."""
    if value is not None:
        return type(value)
    annotation = str(field.type)
    return next((kind for kind in (bool, int, float, str) if kind.__name__ in annotation), None)


def _article(kind: type) -> str:
    return ("an " if kind.__name__[0] in "aeiou" else "a ") + kind.__name__


def check_types(config) -> None:
    """Every field of a settings dataclass holds its default's type (an int for an int, never a
    bool; an int or float for a float; None only where the annotation allows it)."""
    for field in dataclasses.fields(config):
        if not field.init:  # derived in __post_init__
            continue
        value = getattr(config, field.name)
        if field.default_factory is not dataclasses.MISSING:  # a nested group of settings
            expected = type(field.default_factory())
            if not isinstance(value, expected):
                raise ValueError(f"{type(config).__name__}: {field.name} must be a {expected.__name__}, "
                                 f"got {type(value).__name__} {value!r}")
            continue
        default = field.default if field.default is not dataclasses.MISSING else None
        kind = field_kind(field, default)
        if value is None:
            if "None" not in str(field.type) and default is not None:
                raise ValueError(f"{type(config).__name__}: {field.name} must be {_article(kind)}, got None")
            continue
        if kind is None or dataclasses.is_dataclass(value):
            continue
        ok = (isinstance(value, kind) and not (kind is not bool and isinstance(value, bool))) or \
            (kind is float and isinstance(value, int) and not isinstance(value, bool))
        if not ok:
            raise ValueError(f"{type(config).__name__}: {field.name} must be {_article(kind)}, "
                             f"got {type(value).__name__} {value!r}")


def require(config, name: str, ok: bool, expected: str, got) -> None:
    """Raise ValueError naming ``config``'s class and field ``name`` unless ``ok``."""
    if not ok:
        raise ValueError(f"{type(config).__name__}: {name} must be {expected}, got {got!r}")


def require_positive(config, *names: str) -> None:
    """Each named field is None (where its annotation allows) or at least 1."""
    for name in names:
        value = getattr(config, name)
        require(config, name, value is None or value >= 1, "at least 1", value)


def require_finite(config, name: str, *, low: float = -math.inf, high: float = math.inf, open_low: bool = False) -> None:
    """Field ``name`` is a finite number in [low, high] ((low, high] with ``open_low``)."""
    value = getattr(config, name)
    ok = math.isfinite(value) and (value > low if open_low else value >= low) and value <= high
    bounds = f"{'(' if open_low else '['}{low}, {high}]"
    require(config, name, ok, f"a finite number in {bounds}", value)
