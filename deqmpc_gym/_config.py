"""Helpers shared by the frozen configuration dataclasses."""

from __future__ import annotations

import dataclasses
import math
from typing import Any, TypeVar

import numpy as np

from deqmpc_gym.errors import ConfigError

C = TypeVar("C")


def config_from_dict(cls: type[C], data: dict[str, Any]) -> C:
    """Build the dataclass ``cls`` from ``data``, rejecting unknown keys with a :class:`ConfigError`."""
    if not isinstance(data, dict) or not all(isinstance(k, str) for k in data):
        raise ConfigError(f"{cls.__name__} must be built from a dict with string keys, got {type(data).__name__}")
    names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(f"unknown {cls.__name__} keys {unknown}; valid keys: {sorted(names)}")
    return cls(**data)


def require_at_least_one(config: Any, names: tuple[str, ...]) -> None:
    """Raise :class:`ConfigError` unless every integer field ``names`` of ``config`` is ``>= 1``."""
    for name in names:
        value = getattr(config, name)
        if not isinstance(value, (int,)) or isinstance(value, bool) or value < 1:
            raise ConfigError(f"{type(config).__name__}.{name} must be an integer >= 1, got {value!r}")


#: the annotation atoms :func:`check_field_types` understands (others are not checked).
_SIMPLE = {"int", "float", "str", "bool", "None"}


def _python_scalar(value: Any) -> Any:
    """numpy scalars -> the Python scalar of the same kind (configs are written as JSON)."""
    if isinstance(value, np.bool_):
        return bool(value)
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, np.floating):
        return float(value)
    return value


def _matches(value: Any, atom: str) -> bool:
    if atom == "None":
        return value is None
    if atom == "bool":
        return isinstance(value, bool)
    if atom == "int":
        return isinstance(value, int) and not isinstance(value, bool)
    if atom == "float":
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    return isinstance(value, str)


def check_field_types(config: Any) -> None:
    """Raise :class:`ConfigError` unless every field of the frozen dataclass ``config`` has its annotated type.

    Understands annotations made of ``int``, ``float`` (any finite real number), ``str``, ``bool`` and ``None``
    joined by ``|``; numpy scalars are converted to Python scalars in place. Fields with other annotations are
    left to the class's own checks.
    """
    for f in dataclasses.fields(config):
        atoms = [a.strip() for a in str(f.type).split("|")]
        if not set(atoms) <= _SIMPLE:
            continue
        value = _python_scalar(getattr(config, f.name))
        object.__setattr__(config, f.name, value)
        if not any(_matches(value, a) for a in atoms):
            want = " or ".join("a finite number" if a == "float" else a for a in atoms)
            raise ConfigError(f"{type(config).__name__}.{f.name} must be {want}, got {value!r} "
                              f"({type(value).__name__})")
