"""QPole: a quadrotor carrying a free planar pole ("FlyingCartpole" in the reference code)."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from deqmpc_gym.systems.base import System, rk4
from deqmpc_gym.systems.quadrotor import QuadParams, _comps, rigid_body_derivative
from deqmpc_gym.systems.rotations import euler_xyz_to_mrp

_MASS = 2.1
_U_HOVER = _MASS * 9.81 / (10.0 * 1.0 * 4)


class QPole(System):
    """QPole, ``x = [r (3), sigma (3), theta, v (3), w (3), theta_dot]`` (nx = 14, nq = 7).

    The quadrotor (total mass 2.1 kg, J = diag(0.0023, 0.0023, 0.004), arm 0.175 m, kf = 1, km = 0.025) follows
    the rigid-body equations of :class:`~deqmpc_gym.systems.quadrotor.Quadrotor`. Controls are per-motor
    *deltas around hover* (``u_c = 10 (u + u_hover)``, ``u_hover = 0.515025``) bounded by ``+-0.3 u_hover``.

    A pole of length 0.5 m swings in the world x-z plane about the quadrotor's centre (no back-reaction);
    ``theta = pi`` is upright, ``theta = 0`` hangs down::

        theta_ddot = (a_x cos(theta) + (g_z - a_z) sin(theta)) / L_p,   g_z = -9.81,

    with ``a = R(q) F_b / m`` the world acceleration of the pivot. (The reference code used ``R(q) v_dot``,
    which misses the ``w x v`` term, and dropped ``a_z``; both are fixed here.) RK4 with ``dt = 0.05``.
    """

    name = "qpole"
    nx, nu, nq, dt = 14, 4, 7, 0.05
    state_names = ("x", "y", "z", "s1", "s2", "s3", "theta", "vx", "vy", "vz", "wx", "wy", "wz", "theta_dot")
    control_names = ("du1", "du2", "du3", "du4")
    pole_length = 0.5
    params = QuadParams(
        mass=_MASS, inertia=((0.0023, 0.0, 0.0), (0.0, 0.0023, 0.0), (0.0, 0.0, 0.004)),
        arm=0.175, kf=1.0, bf=0.0, km=0.025, act_scale=10.0, u_offset=_U_HOVER,
    )
    u_hover = _U_HOVER
    u_low, u_high = (-0.3 * _U_HOVER,) * 4, (0.3 * _U_HOVER,) * 4
    Q_diag = (10.0,) * 6 + (80.0,) + (1.0,) * 7
    R_diag = (1e-8,) * 4
    goal = (0.0,) * 6 + (math.pi,) + (0.0,) * 7
    angle_indices = (6,)
    mrp_slice = (3, 6)
    position_slice = (0, 3)
    _e = math.radians(45.0)
    init_low = (-5.0,) * 3 + (-_e,) * 3 + (0.0,) + (-1.0,) * 7
    init_high = (5.0,) * 3 + (_e,) * 3 + (2 * math.pi,) + (1.0,) * 7
    reward_weights = (0.1,) * 3 + (1.0,) * 3 + (1.0,) + (0.01,) * 7
    effort_weights = (0.01,) * 4
    success_tolerance = (0.3,) * 3 + (0.1,) * 3 + (0.3,) + (0.5,) * 3 + (1.0,) * 3 + (1.5,)
    flight_bound = 15.0

    def _deriv(self, x: Any, u: Any, ops: Any) -> Any:
        r, s, v, w = _comps(x, 0, 3), _comps(x, 3, 6), _comps(x, 7, 10), _comps(x, 10, 13)
        th, thd = x[..., 6], x[..., 13]
        r_dot, s_dot, v_dot, w_dot, acc = rigid_body_derivative(r, s, v, w, u, self.params)
        gz = -self.params.gravity
        thdd = (acc[0] * ops.cos(th) + (gz - acc[2]) * ops.sin(th)) / self.pole_length
        return ops.stack([*r_dot, *s_dot, thd, *v_dot, *w_dot, thdd])

    def _step(self, x: Any, u: Any, ops: Any) -> Any:
        return rk4(lambda a, b: self._deriv(a, b, ops), x, u, self.dt)

    def sample_initial_states(self, rng: np.random.Generator, n: int) -> np.ndarray:
        """Uniform box (Euler attitude -> canonical MRP; ``theta = pi + U(-pi, pi)``)."""
        x = super().sample_initial_states(rng, n)
        x[:, 3:6] = euler_xyz_to_mrp(x[:, 3:6])
        return x
