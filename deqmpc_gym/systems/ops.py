"""Array-namespace shim so each system's dynamics are written once and run on numpy or torch.

The single-state Gymnasium envs step numpy ``float64`` states (a torch call per step costs more than the
whole Gymnasium ``Pendulum-v1`` step); the batched envs, the MPC solver and training run torch. Both call the
same dynamics function with the namespace returned by :func:`ops_for`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch


class _NumpyOps:
    """Elementwise math on numpy arrays / numpy scalars."""

    sin = staticmethod(np.sin)
    cos = staticmethod(np.cos)
    sqrt = staticmethod(np.sqrt)
    tanh = staticmethod(np.tanh)
    abs = staticmethod(np.abs)

    @staticmethod
    def stack(xs: Sequence[Any]) -> np.ndarray:
        """Stack components along a new last axis (python floats are broadcast); C-contiguous.

        Written as one allocation plus slice assignments: ``np.stack`` costs several times more per call on the
        small arrays of a single env or a warm MPC solve."""
        shape = np.broadcast_shapes(*(np.shape(x) for x in xs))
        dtype = np.result_type(*xs)
        out = np.empty(shape + (len(xs),), dtype=dtype)
        for i, x in enumerate(xs):
            out[..., i] = x
        return out

    @staticmethod
    def where(cond: Any, a: Any, b: Any) -> Any:
        return np.where(cond, a, b)

    @staticmethod
    def zeros_like(x: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
        """Zeros of ``shape`` with ``x``'s dtype."""
        return np.zeros(shape, dtype=x.dtype)

    @staticmethod
    def exp(x: Any) -> Any:
        """``exp``; a scalar goes through ``math.exp`` (the single env's reward is a Python float)."""
        return math.exp(x) if np.ndim(x) == 0 else np.exp(x)

    isfinite = staticmethod(np.isfinite)

    @staticmethod
    def dot(a: Any, w: Any) -> Any:
        """``sum_i a[..., i] w[i]`` over the last axis ``(..., n) -> (...)`` (BLAS ``dot``/``gemv``)."""
        return np.dot(a, w)

    @staticmethod
    def amin(x: Any, dim: int) -> Any:
        return np.min(x, axis=dim)

    @staticmethod
    def all(x: Any, dim: int) -> Any:
        return np.all(x, axis=dim)

    @staticmethod
    def any(x: Any, dim: int) -> Any:
        return np.any(x, axis=dim)

    @staticmethod
    def float32(x: Any) -> Any:
        """``x`` rounded to float32 (values beyond its range become ``inf``, without a warning)."""
        with np.errstate(over="ignore"):
            return np.asarray(x).astype(np.float32)


class _TorchOps:
    """Elementwise math on torch tensors (differentiable, vmap-compatible)."""

    sin = staticmethod(torch.sin)
    cos = staticmethod(torch.cos)
    sqrt = staticmethod(torch.sqrt)
    tanh = staticmethod(torch.tanh)
    abs = staticmethod(torch.abs)

    @staticmethod
    def stack(xs: Sequence[Any]) -> torch.Tensor:
        """Stack components along a new last axis (python floats are broadcast)."""
        ref = next(x for x in xs if isinstance(x, torch.Tensor))
        parts = [x if isinstance(x, torch.Tensor) else torch.full_like(ref, float(x)) for x in xs]
        return torch.stack(torch.broadcast_tensors(*parts), dim=-1)

    @staticmethod
    def where(cond: Any, a: Any, b: Any) -> Any:
        return torch.where(cond, a, b)

    @staticmethod
    def zeros_like(x: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
        """Zeros of ``shape`` with ``x``'s dtype and device."""
        return x.new_zeros(shape)

    exp = staticmethod(torch.exp)
    isfinite = staticmethod(torch.isfinite)

    @staticmethod
    def dot(a: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """``sum_i a[..., i] w[i]`` over the last axis ``(..., n) -> (...)``."""
        return (a * w).sum(-1)

    @staticmethod
    def amin(x: torch.Tensor, dim: int) -> torch.Tensor:
        return x.amin(dim)

    @staticmethod
    def all(x: torch.Tensor, dim: int) -> torch.Tensor:
        return x.all(dim)

    @staticmethod
    def any(x: torch.Tensor, dim: int) -> torch.Tensor:
        return x.any(dim)

    @staticmethod
    def float32(x: torch.Tensor) -> torch.Tensor:
        """``x`` rounded to float32 (values beyond its range become ``inf``)."""
        return x.to(torch.float32)


NUMPY = _NumpyOps()
TORCH = _TorchOps()


def batch_last(x: Any) -> Any:
    """``(B, n) -> (n, B)`` contiguous copy (numpy array or torch tensor)."""
    return np.ascontiguousarray(x.T) if isinstance(x, np.ndarray) else x.t().contiguous()


def batch_first(a: Any) -> Any:
    """Batch-last ``(m, n, B)`` or ``(n, B)`` -> batch-first ``(B, m, n)`` / ``(B, n)`` view."""
    if a.ndim == 2:
        return a.T
    return a.transpose(2, 0, 1) if isinstance(a, np.ndarray) else a.permute(2, 0, 1)


def ops_for(x: Any) -> _NumpyOps | _TorchOps:
    """Return the namespace matching ``x`` (torch tensor -> torch, anything else -> numpy)."""
    return TORCH if isinstance(x, torch.Tensor) else NUMPY
