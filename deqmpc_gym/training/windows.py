"""Sampling fixed-length windows of expert states for imitation training.

A window starting at step ``s`` of a trajectory holds the expert states ``x_s .. x_{s+W-1}`` with
``W = T + L`` (horizon plus streaming steps). Knots past the end of the trajectory are masked out
(``mask = 0``, values repeat the last state). Angle coordinates are unwrapped along the window so that
consecutive knots never jump by ``2 pi`` (the solver's trajectories are continuous).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np
import torch

from deqmpc_gym.data import ExpertDataset
from deqmpc_gym.errors import DatasetError
from deqmpc_gym.systems import System


class WindowBatch(NamedTuple):
    """A batch of expert windows.

    Attributes:
        states: ``(B, W, nx)`` expert states (angles unwrapped along the window).
        mask: ``(B, W)`` 1.0 where the knot exists in the trajectory, else 0.0.
    """

    states: torch.Tensor
    mask: torch.Tensor


def unwrap_angles(states: np.ndarray, angle_indices: tuple[int, ...]) -> np.ndarray:
    """Unwrap ``angle_indices`` of ``states: (..., W, nx)`` along the window axis (-2); returns a copy."""
    out = np.array(states, dtype=np.float64, copy=True)
    for i in angle_indices:
        d = np.diff(out[..., i], axis=-1)
        d = (d + math.pi) % (2 * math.pi) - math.pi
        out[..., 1:, i] = out[..., :1, i] + np.cumsum(d, axis=-1)
    return out


class WindowSampler:
    """Random windows of length ``window`` from a dataset (seeded, reproducible).

    Args:
        dataset: expert trajectories of one env.
        system: the env's system (for angle unwrapping).
        window: knots per window (``T + L``).
        seed: RNG seed.
    """

    def __init__(self, dataset: ExpertDataset, system: System, window: int, seed: int = 0) -> None:
        if len(dataset) == 0:
            raise DatasetError("the dataset has no trajectories")
        if dataset.nx != system.nx:
            raise DatasetError(f"dataset states have nx={dataset.nx} but system {system.name!r} has nx={system.nx}")
        self.system, self.window = system, int(window)
        pads = [np.concatenate([t.obs, np.repeat(t.obs[-1:], self.window, 0)]) for t in dataset.trajectories]
        self._lengths = np.array([len(t.obs) for t in dataset.trajectories])
        self._offsets = np.concatenate([[0], np.cumsum([len(p) for p in pads])[:-1]])
        self._flat = np.concatenate(pads)
        # every start index with at least one following knot
        self._starts = np.concatenate([off + np.arange(n - 1) for off, n in zip(self._offsets, self._lengths)])
        self._start_len = np.concatenate([n - np.arange(n - 1) for n in self._lengths])
        self.rng = np.random.default_rng(seed)

    def __len__(self) -> int:
        return len(self._starts)

    def sample(self, batch_size: int, rng: np.random.Generator | None = None, *, dtype: torch.dtype = torch.float64,
               device: torch.device | str = "cpu") -> WindowBatch:
        """Draw ``batch_size`` windows (uniform over start indices)."""
        gen = self.rng if rng is None else rng
        pick = gen.integers(0, len(self._starts), size=batch_size)
        return self._gather(pick, dtype, device)

    def _gather(self, pick: np.ndarray, dtype: torch.dtype, device: torch.device | str) -> WindowBatch:
        idx = self._starts[pick, None] + np.arange(self.window)[None]
        states = unwrap_angles(self._flat[idx], self.system.angle_indices)
        mask = (np.arange(self.window)[None] < self._start_len[pick, None]).astype(np.float64)
        return WindowBatch(torch.as_tensor(states, dtype=dtype, device=device),
                           torch.as_tensor(mask, dtype=dtype, device=device))

    def fixed_batches(self, n_batches: int, batch_size: int, seed: int, **kw: object) -> list[WindowBatch]:
        """``n_batches`` batches drawn once with ``seed`` (for validation)."""
        rng = np.random.default_rng(seed)
        return [self.sample(batch_size, rng, **kw) for _ in range(n_batches)]  # type: ignore[arg-type]
