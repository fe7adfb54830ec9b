"""Cart-pole swing-up (paper section 5; equations and constants from the reference implementation)."""

from __future__ import annotations

import math
from typing import Any

from deqmpc_gym.systems.base import System, rk4


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

    def _deriv(self, x: Any, u: Any, ops: Any) -> Any:
        th, pd, thd = x[..., 1], x[..., 2], x[..., 3]
        s, c = ops.sin(th), ops.cos(th)
        pdd = (u[..., 0] + 4.905 * s * c - s * thd * thd) / (11.0 - 0.5 * c * c)
        thdd = 0.5 * (c * pdd + 9.81 * s)
        return ops.stack([pd, thd, pdd, thdd])

    def _step(self, x: Any, u: Any, ops: Any) -> Any:
        return rk4(lambda a, b: self._deriv(a, b, ops), x, u, self.dt)
