"""QPole: a quadrotor carrying a free planar pole ("FlyingCartpole" in the reference code)."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from deqmpc_gym.systems.base import rk4
from deqmpc_gym.systems.ops import batch_first, batch_last, ops_for
from deqmpc_gym.systems.quadrotor import (
    QuadParams,
    RigidBodySystem,
    components,
    fill_rigid_body_blocks,
    rigid_body_derivative,
)
from deqmpc_gym.systems.rigid_body_jacobians import cached_constant, control_jacobians, rigid_body_jacobians

_MASS = 2.1
_U_HOVER = _MASS * 9.81 / (10.0 * 1.0 * 4)
_E3 = np.array([[0.0], [0.0], [1.0]])


class QPole(RigidBodySystem):
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
    state_envelope = (15.0,) * 3 + (math.inf,) * 4 + (50.0,) * 3 + (30.0,) * 3 + (100.0,)

    def _deriv(self, x: Any, u: Any, ops: Any) -> Any:
        r, s, v, w = components(x, 0, 3), components(x, 3, 6), components(x, 7, 10), components(x, 10, 13)
        th, thd = x[..., 6], x[..., 13]
        r_dot, s_dot, v_dot, w_dot, acc = rigid_body_derivative(r, s, v, w, u, self.params)
        gz = -self.params.gravity
        thdd = (acc[0] * ops.cos(th) + (gz - acc[2]) * ops.sin(th)) / self.pole_length
        return ops.stack([*r_dot, *s_dot, thd, *v_dot, *w_dot, thdd])

    def _step(self, x: Any, u: Any, ops: Any) -> Any:
        return rk4(lambda a, b: self._deriv(a, b, ops), x, u, self.dt)

    def continuous_jacobians(
        self, x: torch.Tensor, u: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(x_dot (B, 14), dx_dot/dx (B, 14, 14), dx_dot/du (B, 14, 4))``, analytic.

        The pivot acceleration is ``a = g + (T / m) R(q) e_3`` with the total thrust ``T = sum_i f_i``, so
        ``da/dsigma = (T / m) d(R e_3)/dsigma`` and ``da/du_i = (kf act_scale / m) R e_3``.
        """
        f, G = self._deriv_and_jac(x, u)
        return f, G[..., :14], G[..., 14:]

    def _deriv_and_jac(self, x: Any, u: Any) -> tuple[Any, Any]:
        """``x_dot (B, 14)`` (via :meth:`_deriv`, bit-identical) and ``[dx_dot/dx | dx_dot/du] (B, 14, 18)``
        (torch tensors or numpy arrays)."""
        p, L = self.params, self.pole_length
        ops = ops_for(x)
        f = self._deriv(x, u, ops)
        xt = batch_last(x)
        jb = rigid_body_jacobians(xt[3:6], xt[7:10], xt[10:13], p)
        v_u, w_u = control_jacobians(p, x)
        th = xt[6]
        sth, cth = ops.sin(th), ops.cos(th)
        thrust = (p.kf * p.act_scale) * (batch_last(u) + p.u_offset).sum(0) + 4.0 * p.bf  # (B,)
        tm = thrust / p.mass
        re3 = jb.rot.R[:, 2]  # (3, B) body z-axis in the world
        acc_sigma = tm * jb.rot.d_rotate(cached_constant("e3", _E3, re3))  # d a / d sigma, (3, 3, B)
        # theta_ddot = (a_x cos th + (g_z - a_z) sin th) / L with g_z = -g, a = g + tm R e3.
        ax, az = tm * re3[0], tm * re3[2] - p.gravity
        cx, cz = cth / L, -sth / L  # d thdd / d a_x, d thdd / d a_z
        G = ops.zeros_like(x, (x.shape[0], 14, 18))
        fill_rigid_body_blocks(G, jb, v_u, w_u, v=7, w=10, u=14)
        G[:, 6, 13] = 1.0
        G[:, 13, 3:6] = batch_first(cx * acc_sigma[0] + cz * acc_sigma[2])
        G[:, 13, 6] = (-ax * sth + (-p.gravity - az) * cth) / L
        G[:, 13, 14:18] = ((p.kf * p.act_scale / p.mass) * (cx * re3[0] + cz * re3[2]))[:, None]
        return f, G
