"""Torch device names: ``"cpu"``, ``"cuda"``, ``"cuda:N"``, ``"mps"`` and ``"auto"`` (CUDA if available, else CPU)."""

from __future__ import annotations

from typing import Any

import torch

from deqmpc_gym.errors import DeviceError

#: device names accepted by :func:`resolve_device` (``cuda:N`` selects the N-th GPU).
DEVICE_CHOICES: tuple[str, ...] = ("cpu", "cuda", "cuda:N", "mps", "auto")


def resolve_device(device: Any = "cpu") -> torch.device:
    """Return the ``torch.device`` for ``device``, checking that it exists on this machine.

    Args:
        device: a ``torch.device`` or one of :data:`DEVICE_CHOICES`; ``"auto"`` picks ``cuda`` when a GPU is
            available, else ``cpu``.

    Raises:
        DeviceError: an unknown name, or a device this machine does not have (e.g. ``cuda`` without a GPU).
    """
    if isinstance(device, str) and device.strip().lower() == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = _parse(device)
    if dev.type == "cpu":
        return dev
    if dev.type == "cuda":
        _check_cuda(dev)
        return dev
    if dev.type == "mps":
        mps = getattr(torch.backends, "mps", None)
        if mps is None or not mps.is_available():
            raise DeviceError(f"device {str(dev)!r} is not available on this machine (no Apple MPS backend); "
                              "use --device cpu or auto")
        return dev
    raise DeviceError(f"unsupported device {str(dev)!r}; valid devices: {list(DEVICE_CHOICES)}")


def _parse(device: Any) -> torch.device:
    """``torch.device(device)`` with a :class:`DeviceError` for anything torch cannot parse."""
    if isinstance(device, torch.device):
        return device
    if not isinstance(device, str):
        raise DeviceError(f"device must be a string or torch.device, got {type(device).__name__}; "
                          f"valid devices: {list(DEVICE_CHOICES)}")
    try:
        return torch.device(device.strip().lower())
    except (RuntimeError, ValueError) as exc:
        raise DeviceError(f"unknown device {device!r}; valid devices: {list(DEVICE_CHOICES)}") from exc


def _check_cuda(dev: torch.device) -> None:
    """Raise :class:`DeviceError` unless ``dev`` (a cuda device) exists."""
    if not torch.cuda.is_available():
        raise DeviceError(f"device {str(dev)!r} requested but CUDA is not available on this machine "
                          "(CPU-only torch build or no GPU); use --device cpu, or auto to pick the GPU when "
                          "there is one")
    count = torch.cuda.device_count()
    if dev.index is not None and dev.index >= count:
        raise DeviceError(f"device {str(dev)!r} requested but this machine has {count} CUDA device(s) "
                          f"(cuda:0..cuda:{count - 1})")
