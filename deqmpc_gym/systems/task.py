"""The task on a system, written once for numpy and torch: reward, success, termination, obstacle distance.

The single Gymnasium env evaluates it on one numpy ``(nx,)`` float64 state, the batched env on a torch
``(N, nx)`` batch; both call the functions of :class:`Task` with the array namespace of :mod:`.ops`, as the
dynamics do. Definitions (``x``: the state reached by a step, ``a``: the normalized action in ``[-1, 1]``,
``g``: ``system.goal``):

* reward ``r = exp(-1/2 sum_i w_i (x_i - g_i)^2 - 1/2 sum_j e_j (a_j - a_nom_j)^2)`` in ``(0, 1]`` with
  ``w = system.reward_weights``, ``e = system.effort_weights`` and ``a_nom`` the nominal control normalized;
* success: ``|x_i - g_i| <= system.success_tolerance_i`` for every ``i``;
* obstacle distance: ``min_k ||p - o_k|| - radius`` [m] (``p``: the position, ``o_k``: the sphere centres), < 0
  inside a sphere;
* violation (the Safety-Gymnasium ``cost``): the state leaves ``system.state_envelope`` or enters a sphere;
* a state that is not finite in float32 (the observation's dtype) ends the episode with reward 0, no
  violation, no success and a NaN distance; otherwise a violation ends it.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from deqmpc_gym.systems.base import System
from deqmpc_gym.systems.ops import NUMPY, TORCH


@dataclass(frozen=True)
class StepOutcome:
    """What the task says about the state a step reached (arrays of the task's kind, leading shape ``(...)``).

    ``reward``: float; ``terminated``, ``violated``, ``success``: bool; ``distance``: the signed obstacle
    distance [m] (NaN for a non-finite state), or None without obstacles; ``obs``: the float32 observation.
    """

    obs: Any
    reward: Any
    terminated: Any
    violated: Any
    success: Any
    distance: Any | None


@dataclass(frozen=True)
class Task:
    """The task constants of a system as arrays of one kind (numpy float64, or torch of one dtype and device).

    Build it with :meth:`of`. Attributes: ``goal``, ``reward_weights``, ``success_tolerance`` ``(nx,)``;
    ``effort_weights``, ``nominal_action`` ``(nu,)``; ``envelope`` ``(nx,)`` or None; ``position``: the
    ``(start, stop)`` of the 3-D position or None; ``centers``: ``(cx, cy, cz)``, each ``(K,)`` [m] (``K = 0``
    without obstacles); ``radius`` [m].
    """

    goal: Any
    reward_weights: Any
    effort_weights: Any
    nominal_action: Any
    success_tolerance: Any
    envelope: Any | None
    position: tuple[int, int] | None
    centers: tuple[Any, Any, Any]
    radius: float

    @classmethod
    def of(cls, system: System, obstacle_centers: np.ndarray | None = None, obstacle_radius: float = 0.5, *,
           dtype: torch.dtype | None = None, device: torch.device | str | None = None) -> Task:
        """The task of ``system`` with spheres at ``obstacle_centers (K, 3)`` [m] (None: none) of radius
        ``obstacle_radius`` [m]: numpy float64 arrays when ``dtype`` is None, else torch tensors of ``dtype``
        on ``device``."""
        u_low = np.asarray(system.u_low, dtype=np.float64)
        u_high = np.asarray(system.u_high, dtype=np.float64)
        scale, offset = 0.5 * (u_high - u_low), 0.5 * (u_high + u_low)
        centers = np.zeros((0, 3)) if obstacle_centers is None else np.asarray(obstacle_centers, dtype=np.float64)

        def arr(v: Any) -> Any:
            a = np.asarray(v, dtype=np.float64)
            return a if dtype is None else torch.as_tensor(a, dtype=dtype, device=device)

        return cls(goal=arr(system.goal), reward_weights=arr(system.reward_weights),
                   effort_weights=arr(system.effort_weights),
                   nominal_action=arr((system.nominal_control - offset) / scale),
                   success_tolerance=arr(system.success_tolerance),
                   envelope=None if system.state_envelope is None else arr(system.state_envelope),
                   position=system.position_slice,
                   centers=tuple(arr(np.ascontiguousarray(centers[:, k])) for k in range(3)),  # type: ignore
                   radius=float(obstacle_radius))

    @property
    def has_obstacles(self) -> bool:
        """True when there is at least one sphere."""
        return int(self.centers[0].shape[0]) > 0

    @property
    def ops(self) -> Any:
        """The array namespace of the task's arrays."""
        return TORCH if isinstance(self.goal, torch.Tensor) else NUMPY

    def with_radius(self, radius: float) -> Task:
        """The same task with spheres of ``radius`` [m]."""
        return dataclasses.replace(self, radius=float(radius))

    # ------------------------------------------------------------------ pieces
    def reward(self, x: Any, a: Any) -> Any:
        """``(...)`` reward of reaching ``x (..., nx)`` with the normalized action ``a (..., nu)``."""
        ops = self.ops
        d = x - self.goal
        da = a - self.nominal_action
        return ops.exp(-0.5 * (ops.dot(d * d, self.reward_weights) + ops.dot(da * da, self.effort_weights)))

    def success(self, x: Any) -> Any:
        """``(...)`` bool: every coordinate of ``x (..., nx)`` within its success tolerance of the goal."""
        return self.ops.all(self.ops.abs(x - self.goal) <= self.success_tolerance, -1)

    def center_distance(self, x: Any) -> Any:
        """``(...)`` distance [m] from the position of ``x (..., nx)`` to the nearest sphere centre (obstacle
        tasks only), evaluated as ``sqrt(min(dx^2 + dy^2 + dz^2))``."""
        ops, (cx, cy, cz) = self.ops, self.centers
        a, _ = self.position  # type: ignore[misc]
        dx, dy, dz = x[..., a:a + 1] - cx, x[..., a + 1:a + 2] - cy, x[..., a + 2:a + 3] - cz
        return ops.sqrt(ops.amin(dx * dx + dy * dy + dz * dz, -1))

    def obstacle_distance(self, x: Any) -> Any:
        """``(...)`` signed distance [m] from the position of ``x (..., nx)`` to the nearest sphere surface."""
        return self.center_distance(x) - self.radius

    def violation(self, x: Any) -> tuple[Any, Any | None]:
        """``(violated (...) bool, obstacle distance (...) or None)`` of a finite state ``x (..., nx)``:
        outside the state envelope or inside a sphere."""
        ops = self.ops
        if self.envelope is not None:
            violated = ops.any(ops.abs(x - self.goal) > self.envelope, -1)
        else:
            violated = ops.zeros_like(x, tuple(x.shape[:-1])) != 0.0
        dist = None
        if self.has_obstacles:
            dist = self.obstacle_distance(x)
            violated = violated | (dist < 0.0)
        return violated, dist

    # ------------------------------------------------------------------ a step
    def outcome(self, x: Any, a: Any) -> StepOutcome:
        """The task's verdict on the state ``x (..., nx)`` reached with the normalized action ``a (..., nu)``
        (see the module docstring for the non-finite case)."""
        ops = self.ops
        obs = ops.float32(x)
        finite = ops.all(ops.isfinite(obs), -1)
        reward = ops.where(finite, self.reward(x, a), 0.0)
        violated, dist = self.violation(x)
        violated = violated & finite
        if dist is not None:
            dist = ops.where(finite, dist, float("nan"))
        return StepOutcome(obs=obs, reward=reward, terminated=violated | ~finite, violated=violated,
                           success=self.success(x) & finite, distance=dist)


__all__ = ["StepOutcome", "Task"]
