"""Helpers shared by the frozen configuration dataclasses."""

from __future__ import annotations

import dataclasses
from typing import Any, TypeVar

from deqmpc_gym.errors import ConfigError

C = TypeVar("C")


def config_from_dict(cls: type[C], data: dict[str, Any]) -> C:
    """Build the dataclass ``cls`` from ``data``, rejecting unknown keys with a :class:`ConfigError`."""
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
