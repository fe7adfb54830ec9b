"""Torque-limited pendulum swing-up (paper section 5; constants from the reference implementation)."""

from __future__ import annotations

import math
from typing import Any

import torch

from deqmpc_gym.systems.base import System
from deqmpc_gym.systems.ops import TORCH


class Pendulum(System):
    """Pendulum, ``x = [theta, theta_dot]`` (theta from upright, counter-clockwise positive) [rad, rad/s].

    Dynamics ``theta_ddot = (u + m g l sin(theta)) / (m l^2)`` with ``m = l = 1``, ``g = 10``, integrated by
    semi-implicit Euler (``dt = 0.05``): ``theta_dot+ = theta_dot + dt theta_ddot``, ``theta+ = theta + dt theta_dot+``.
    Control: torque ``u`` in ``[-5, 5]`` N m (the paper's limit). Goal: upright at rest.
    """

    name = "pendulum"
    nx, nu, nq, dt = 2, 1, 1, 0.05
    state_names = ("theta", "theta_dot")
    control_names = ("torque",)
    u_low, u_high = (-5.0,), (5.0,)
    Q_diag, R_diag = (10.0, 1.0), (0.01,)
    goal = (0.0, 0.0)
    angle_indices = (0,)
    init_low, init_high = (-math.pi, -1.0), (math.pi, 1.0)
    reward_weights, effort_weights = (1.0, 0.1), (0.01,)
    success_tolerance = (0.1, 0.5)

    mass, length, gravity = 1.0, 1.0, 10.0

    def _step(self, x: Any, u: Any, ops: Any) -> Any:
        th, thd = x[..., 0], x[..., 1]
        ml2 = self.mass * self.length**2
        thdd = (u[..., 0] + self.mass * self.gravity * self.length * ops.sin(th)) / ml2
        thd_next = thd + self.dt * thdd
        return ops.stack([th + self.dt * thd_next, thd_next])

    def _step_and_jacobians(
        self, x: torch.Tensor, u: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Analytic Jacobians of the semi-implicit Euler step.

        ``d thd+/d th = dt g cos(th) / l``, ``d thd+/d u = dt / (m l^2)``, ``th+ = th + dt thd+``.
        """
        ml2 = self.mass * self.length**2
        dt = self.dt
        a10 = (dt * self.mass * self.gravity * self.length / ml2) * torch.cos(x[:, 0])  # d thd+ / d th
        one = torch.ones_like(a10)
        A = torch.stack([1.0 + dt * a10, one * dt, a10, one], dim=-1).reshape(-1, 2, 2)
        b = x.new_tensor([[dt * dt / ml2], [dt / ml2]])
        return self._step(x, u, TORCH), A, b.expand(x.shape[0], 2, 1).clone()
