"""Cart-pole swing-up (paper section 5; equations and constants from the reference implementation)."""

from __future__ import annotations

import math
from typing import Any

import torch

from deqmpc_gym.systems.base import System, rk4
from deqmpc_gym.systems.ops import ops_for


class Cartpole(System):
    """Cart-pole, ``x = [p, theta, p_dot, theta_dot]`` [m, rad, m/s, rad/s]; ``theta = 0`` is upright.

    Mass-matrix form (cart 10 kg, pole 1 kg with COM at 1 m and inertia 2 kg m^2 about the pivot, g = 9.81)::

        11 p_ddot - cos(theta) theta_ddot + sin(theta) theta_dot^2 = u
        2 theta_ddot - cos(theta) p_ddot - 9.81 sin(theta) = 0

    i.e. ``p_ddot = (u + 4.905 s c - s theta_dot^2) / (11 - 0.5 c^2)``, ``theta_ddot = 0.5 (c p_ddot + 9.81 s)``.
    RK4 with ``dt = 0.05``; horizontal force ``u`` in ``[-100, 100]`` N.
    """

    name = "cartpole"
    nx, nu, nq, dt = 4, 1, 2, 0.05
    state_names = ("p", "theta", "p_dot", "theta_dot")
    control_names = ("force",)
    u_low, u_high = (-100.0,), (100.0,)
    Q_diag, R_diag = (1.0, 1.0, 1.0, 1.0), (1e-10,)
    goal = (0.0, 0.0, 0.0, 0.0)
    angle_indices = (1,)
    init_low, init_high = (-math.pi,) * 4, (math.pi,) * 4
    reward_weights, effort_weights = (0.1, 1.0, 0.01, 0.01), (0.01,)
    success_tolerance = (0.5, 0.1, 0.5, 0.5)
    numpy_fast_path = True  # measured: 2-4x cheaper step / Jacobians at B <= 1000 (benchmarks/jacobians.py)
    numpy_jacobian_max_batch = 1024

    def _deriv(self, x: Any, u: Any, ops: Any) -> Any:
        th, pd, thd = x[..., 1], x[..., 2], x[..., 3]
        s, c = ops.sin(th), ops.cos(th)
        pdd = (u[..., 0] + 4.905 * s * c - s * thd * thd) / (11.0 - 0.5 * c * c)
        thdd = 0.5 * (c * pdd + 9.81 * s)
        return ops.stack([pd, thd, pdd, thdd])

    def _step(self, x: Any, u: Any, ops: Any) -> Any:
        return rk4(lambda a, b: self._deriv(a, b, ops), x, u, self.dt)

    def continuous_jacobians(
        self, x: torch.Tensor, u: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(x_dot (B, 4), dx_dot/dx (B, 4, 4), dx_dot/du (B, 4, 1))`` in closed form.

        With ``N = u + 4.905 s c - s thd^2`` and ``D = 11 - 0.5 c^2``: ``p_ddot = N / D``,
        ``d p_ddot/d theta = (dN/d theta - p_ddot dD/d theta) / D`` with ``dD/d theta = s c``.
        """
        f, G = self._deriv_and_jac(x, u)
        return f, G[..., :4], G[..., 4:]

    def _deriv_and_jac(self, x: Any, u: Any) -> tuple[Any, Any]:
        """``x_dot (B, 4)`` (via :meth:`_deriv`, bit-identical) and ``[dx_dot/dx | dx_dot/du] (B, 4, 5)`` (torch
        tensors or numpy arrays)."""
        ops = ops_for(x)
        th, thd = x[:, 1], x[:, 3]
        s, c = ops.sin(th), ops.cos(th)
        f = self._deriv(x, u, ops)
        pdd = f[:, 2]
        inv_d = 1.0 / (11.0 - 0.5 * c * c)
        pdd_th = (4.905 * (c * c - s * s) - c * thd * thd - pdd * s * c) * inv_d
        pdd_thd = -2.0 * s * thd * inv_d
        thdd_th = 0.5 * (c * pdd_th - s * pdd + 9.81 * c)
        thdd_thd = 0.5 * c * pdd_thd
        G = ops.zeros_like(x, (x.shape[0], 4, 5))
        G[:, 0, 2] = 1.0
        G[:, 1, 3] = 1.0
        G[:, 2, 1], G[:, 2, 3], G[:, 2, 4] = pdd_th, pdd_thd, inv_d
        G[:, 3, 1], G[:, 3, 3], G[:, 3, 4] = thdd_th, thdd_thd, 0.5 * c * inv_d
        return f, G

    def _step_and_jacobians(
        self, x: torch.Tensor, u: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self._rk4_step_and_jacobians(x, u, n_free=1)
