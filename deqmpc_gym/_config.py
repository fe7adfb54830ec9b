"""Helpers shared by the frozen configuration dataclasses."""

from __future__ import annotations

import dataclasses
import math
import re
from enum import Enum
from typing import Any, TypeVar

import numpy as np

from deqmpc_gym.errors import ConfigError

C = TypeVar("C")


def check_deadline(deadline: Any) -> float | None:
    """``deadline`` as a ``time.time()`` instant [s since the epoch] (a finite number) or None; else ConfigError."""
    if deadline is None:
        return None
    if isinstance(deadline, bool) or not isinstance(deadline, (int, float)) or not math.isfinite(deadline):
        raise ConfigError(f"deadline must be a time.time() instant in seconds (a finite number) or None, got "
                          f"{deadline!r}")
    return float(deadline)


def config_from_dict(cls: type[C], data: dict[str, Any]) -> C:
    """Build the dataclass ``cls`` from ``data``, rejecting unknown keys with a :class:`ConfigError`."""
    if not isinstance(data, dict) or not all(isinstance(k, str) for k in data):
        raise ConfigError(f"{cls.__name__} must be built from a dict with string keys, got {type(data).__name__}")
    names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(f"unknown {cls.__name__} keys {unknown}; valid keys: {sorted(names)}")
    return cls(**data)


def require_at_least_one(config: Any, names: tuple[str, ...], minimum: int = 1) -> None:
    """Raise :class:`ConfigError` unless every integer field ``names`` of ``config`` is ``>= minimum``."""
    for name in names:
        value = getattr(config, name)
        if not isinstance(value, (int,)) or isinstance(value, bool) or value < minimum:
            raise ConfigError(f"{type(config).__name__}.{name} must be an integer >= {minimum}, got {value!r}")


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


def matches_annotation(value: Any, atom: str) -> bool:
    """True when ``value`` is of the annotation atom ``atom`` (int, float: finite, str, bool, None)."""
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
        if not any(matches_annotation(value, a) for a in atoms):
            want = " or ".join("a finite number" if a == "float" else a for a in atoms)
            raise ConfigError(f"{type(config).__name__}.{f.name} must be {want}, got {value!r} "
                              f"({type(value).__name__})")


class Choice(str, Enum):
    """Base of the configs' mode enums: members are their string values (``==``, JSON, f-strings), and
    :meth:`resolve` is the one place a mode string is checked."""

    def __str__(self) -> str:
        return str(self.value)

    def __format__(self, spec: str) -> str:
        return format(str(self.value), spec)

    @classmethod
    def resolve(cls: type[E], value: Any) -> E:
        """The member for ``value`` (a member or its string, case-insensitive, ``_`` read as ``-``); anything
        else raises :class:`ConfigError` listing the valid values."""
        if isinstance(value, cls):
            return value
        if isinstance(value, str):
            key = value.strip().lower()
            for member in cls:
                if member.value in (key, key.replace("_", "-")):
                    return member
        label = re.sub(r"(?<!^)(?=[A-Z])", " ", cls.__name__).lower()  # DeqGrad -> "deq grad"
        raise ConfigError(f"unknown {label} {value!r}; valid {label}s: {[m.value for m in cls]}")


E = TypeVar("E", bound=Choice)


class Gradient(Choice):
    """How the MPC solver's output is differentiated: the implicit function theorem at the last iterate,
    backpropagation through the unrolled iterations, or the IFT at the final solve only (Diff-MPC)."""

    IMPLICIT = "implicit"
    UNROLL = "unroll"
    FINAL_IMPLICIT = "final_implicit"


class LinearSolver(Choice):
    """The MPC's Newton-system factorisation: chosen per call, dense Cholesky or block-banded Cholesky."""

    AUTO = "auto"
    DENSE = "dense"
    BANDED = "banded"


class DeqGrad(Choice):
    """The DEQ network's backward pass: phantom gradient (extra applications of f) or the IFT adjoint."""

    PHANTOM = "phantom"
    IFT = "ift"


class SolverDtype(Choice):
    """The MPC solver's floating dtype (the network runs in float32)."""

    FLOAT64 = "float64"
    FLOAT32 = "float32"

    @property
    def torch_dtype(self) -> Any:
        """The ``torch.dtype`` of this member."""
        import torch

        return torch.float64 if self is SolverDtype.FLOAT64 else torch.float32

    @classmethod
    def of(cls, dtype: Any) -> SolverDtype:
        """The member of a ``torch.dtype`` (float64 or float32) or of its name."""
        return cls.resolve(str(dtype).removeprefix("torch."))
