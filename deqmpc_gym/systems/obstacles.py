"""Sphere obstacles as data: the 40 fixed obstacle centres of the paper's QPoleObs task and distance helpers."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

#: ``(40, 3)`` obstacle centres [m] (x, y, z), in the order of the reference implementation.
OBSTACLE_CENTERS: np.ndarray = np.array([
    (-0.81024811, 2.47097938, -1.46527507), (4.25182361, 2.61438853, -3.99336202),
    (-1.88037898, 0.56471661, -4.89251658), (-0.89694315, -1.17227775, -2.31071003),
    (0.31117451, 1.80695677, -1.32360805), (-0.83515347, -3.00524971, -0.37880997),
    (0.42646518, -2.55505666, -1.4580139), (-3.06794499, -3.75663134, -2.68146399),
    (-2.47485677, -3.2241943, 4.05956764), (4.90234242, -0.44360142, 3.00769067),
    (-0.4466156, 2.82236085, -3.70498888), (-3.30175667, -0.37915783, 3.76276084),
    (-1.55007116, 2.10577068, 1.29878497), (-3.18635985, 1.77041154, 2.70392382),
    (4.59851198, 1.34127491, -3.2508418), (-1.37583745, -2.16044885, 2.95391448),
    (-0.86607566, 1.90383346, -2.29595208), (-3.90222124, 3.93796524, -4.8222375),
    (1.83414656, -4.90150613, -3.97004479), (2.10004524, 4.32631374, -1.7743607),
    (-0.73089303, 0.71350811, 4.39234036), (-0.57377963, -1.27260017, -4.02256416),
    (4.17079007, 1.09192127, 3.44064471), (0.12940132, 2.81247143, 0.63458352),
    (0.64863905, 3.19743266, 2.347993), (-0.23519056, -3.91345489, -1.63826518),
    (3.18776744, -3.65825113, 3.33950477), (4.04449088, 1.13759982, -2.09952288),
    (1.34288453, 4.09059731, 4.26551507), (2.60116671, 3.27868729, -2.24891686),
    (2.45285101, -1.71007925, 3.67593524), (0.75708598, 0.37944072, 1.00573208),
    (-1.8836751, 3.45417808, -3.70553914), (-2.48427958, -2.98336577, -3.69115236),
    (2.53442509, 1.69021664, 4.56683953), (-3.40910921, -1.15168358, -3.11048661),
    (-1.85093449, -3.27903642, 4.40783757), (1.11234478, -2.84715317, 1.92532219),
    (-0.23470463, -4.51888895, 0.77568075), (-1.32348548, 1.48201938, 1.9124648),
], dtype=np.float64)
OBSTACLE_CENTERS.setflags(write=False)


def center_distances(p: Any, centers: Any) -> Any:
    """Distances ``(..., K)`` [m] from points ``p: (..., 3)`` to sphere centres ``centers: (K, 3)``.

    Works on numpy arrays or torch tensors (``centers`` must be of the same kind).
    """
    d = p[..., None, :] - centers
    return (d * d).sum(-1) ** 0.5


def min_obstacle_distance(p: Any, centers: Any, radius: float) -> Any:
    """Signed distance ``(...,)`` [m] from ``p: (..., 3)`` to the nearest sphere surface (< 0 inside)."""
    dist = center_distances(p, centers)
    return (dist.min(-1).values if isinstance(dist, torch.Tensor) else dist.min(-1)) - radius


def nearest_obstacles(p: torch.Tensor, centers: torch.Tensor, k: int) -> torch.Tensor:
    """Indices ``(..., k)`` of the ``k`` obstacles nearest to each point ``p: (..., 3)`` (ascending distance)."""
    k = min(k, centers.shape[0])
    return torch.topk(center_distances(p, centers), k, dim=-1, largest=False).indices
