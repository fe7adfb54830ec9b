"""Typed errors raised by deqmpc_gym.

Every error subclasses a builtin (``ValueError``, ``ImportError``, ``RuntimeError``) so callers can catch
either the specific class or the builtin one. Messages say what was wrong and how to fix it.
"""

from __future__ import annotations


class DeqmpcError(Exception):
    """Base class of every error raised on purpose by deqmpc_gym."""


class ShapeError(DeqmpcError, ValueError):
    """An array or tensor has the wrong shape, dtype or non-finite values."""


class ConfigError(DeqmpcError, ValueError):
    """A configuration value or keyword argument is invalid or unknown."""


class CheckpointError(DeqmpcError, ValueError):
    """A checkpoint file is corrupt, of the wrong kind, or made for another environment."""


class DatasetError(DeqmpcError, ValueError):
    """A dataset file is corrupt, of the wrong schema version, or made for another environment."""


class DependencyNotInstalled(DeqmpcError, ImportError):
    """An optional dependency is missing; the message names the pip command that installs it."""


def check_shape(name: str, value, expected: tuple[int | None, ...]) -> None:
    """Raise :class:`ShapeError` unless ``value.shape`` matches ``expected`` (``None`` = any size).

    Args:
        name: argument name used in the message.
        value: a numpy array or torch tensor.
        expected: expected shape; ``None`` entries match any size.
    """
    shape = tuple(value.shape)
    ok = len(shape) == len(expected) and all(e is None or e == s for e, s in zip(expected, shape))
    if not ok:
        want = "(" + ", ".join("*" if e is None else str(e) for e in expected) + ")"
        raise ShapeError(f"{name} must have shape {want}, got {shape}")
