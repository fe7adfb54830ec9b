"""Rigid-body quadrotor models: the 12-state "Rex" quadrotor (Jackson et al. 2022) used in the paper."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from deqmpc_gym.systems.base import System, rk4
from deqmpc_gym.systems.ops import batch_first, batch_last, ops_for
from deqmpc_gym.systems.quad_params import QuadParams
from deqmpc_gym.systems.rigid_body_jacobians import control_jacobians, rigid_body_jacobians
from deqmpc_gym.systems.rotations import (
    cross,
    euler_xyz_to_mrp,
    matvec,
    mrp_kinematics,
    mrp_to_quat,
    quat_matrix,
)

_S2 = 1.0 / math.sqrt(2.0)


def _matvec(m: tuple[tuple[float, float, float], ...], v: tuple[Any, Any, Any]) -> tuple[Any, Any, Any]:
    """``m v`` for a constant float matrix ``m``; its zero entries are skipped (a diagonal inertia costs 3
    products instead of 15 operations)."""
    out = []
    for row in m:
        terms = [mij * vj for mij, vj in zip(row, v) if mij != 0.0]
        acc = terms[0] if terms else 0.0 * v[0]
        for t in terms[1:]:
            acc = acc + t
        out.append(acc)
    return tuple(out)  # type: ignore[return-value]


def rigid_body_derivative(r: Any, s: Any, v: Any, w: Any, u: Any, p: QuadParams) -> tuple[Any, ...]:
    """Continuous quadrotor dynamics on component tuples.

    Args:
        r, s, v, w: world position [m], MRP attitude, body velocity [m/s], body rate [rad/s] (3-tuples).
        u: ``(..., 4)`` motor inputs (array or tensor).

    Returns:
        ``(r_dot, s_dot, v_dot, w_dot, a_world)``: 3-tuples, where ``a_world = R(q) F_b / m`` is the world-frame
        acceleration of the body (gravity included).
    """
    rot = quat_matrix(mrp_to_quat(s))  # R(q), body -> world
    uc = [p.act_scale * (u[..., i] + p.u_offset) for i in range(4)]
    f = [p.kf * c + p.bf for c in uc]
    mg = -p.gravity * p.mass
    g_body = (mg * rot[2][0], mg * rot[2][1], mg * rot[2][2])  # R^T (0, 0, -m g)
    fb = (g_body[0], g_body[1], g_body[2] + f[0] + f[1] + f[2] + f[3])
    la = p.arm * _S2
    tau = (la * (f[0] - f[1] - f[2] + f[3]), la * (-f[0] - f[1] + f[2] + f[3]), p.km * (uc[0] - uc[1] + uc[2] - uc[3]))
    r_dot = matvec(rot, v)
    s_dot = mrp_kinematics(s, w)
    wxv = cross(w, v)
    v_dot = tuple(fb[i] / p.mass - wxv[i] for i in range(3))
    jw = _matvec(p.inertia, w)
    wxjw = cross(w, jw)
    w_dot = _matvec(p.inertia_inv, tuple(tau[i] - wxjw[i] for i in range(3)))  # type: ignore[arg-type]
    a_world = matvec(rot, tuple(fb[i] / p.mass for i in range(3)))  # type: ignore[arg-type]
    return r_dot, s_dot, v_dot, w_dot, a_world


def fill_rigid_body_blocks(G: Any, jb: Any, v_u: Any, w_u: Any, *, v: int, w: int, u: int) -> None:
    """Write the rigid-body blocks into ``G = [dx_dot/dx | dx_dot/du]`` ``(B, nx, nx + nu)`` in place.

    The state starts ``[r (3), sigma (3), ...]``; ``v``, ``w`` are the first indices of the body velocity and rate
    and ``u`` the first column of the controls. ``jb``: :class:`~deqmpc_gym.systems.rigid_body_jacobians.
    RigidBodyJacobians` (batch-last); ``v_u``, ``w_u``: :func:`control_jacobians` ``(3, 4, 1)``.
    """
    sv, sw, su = slice(v, v + 3), slice(w, w + 3), slice(u, u + 4)
    G[:, 0:3, 3:6] = batch_first(jb.r_sigma)
    G[:, 0:3, sv] = batch_first(jb.r_v)
    G[:, 3:6, 3:6] = batch_first(jb.sigma_sigma)
    G[:, 3:6, sw] = batch_first(jb.sigma_w)
    G[:, sv, 3:6] = batch_first(jb.v_sigma)
    G[:, sv, sv] = batch_first(jb.v_v)
    G[:, sv, sw] = batch_first(jb.v_w)
    G[:, sv, su] = batch_first(v_u)
    G[:, sw, sw] = batch_first(jb.w_w)
    G[:, sw, su] = batch_first(w_u)


def components(x: Any, a: int, b: int) -> tuple[Any, ...]:
    """The coordinates ``a .. b-1`` of ``x: (..., n)`` as a tuple of ``(...,)`` arrays or tensors."""
    return tuple(x[..., i] for i in range(a, b))


class RigidBodySystem(System):
    """Shared behaviour of the quadrotor-based systems: RK4 with analytic Jacobians (3 MRP coordinates are
    "free" in the chain rule) and initial attitudes drawn as Euler x-y-z angles, converted to canonical MRPs."""

    numpy_fast_path = True
    #: measured (benchmarks/jacobians.py): the complex step is ~2x cheaper at B <= 16, ~2x dearer at B = 64
    complex_step_max_batch = 24

    def _step_and_jacobians(
        self, x: torch.Tensor, u: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self._rk4_step_and_jacobians(x, u, n_free=3)

    def sample_initial_states(self, rng: np.random.Generator, n: int) -> np.ndarray:
        """Uniform box; the attitude box is in Euler x-y-z angles, converted to canonical MRPs."""
        x = super().sample_initial_states(rng, n)
        x[:, 3:6] = euler_xyz_to_mrp(x[:, 3:6])
        return x


class Quadrotor(RigidBodySystem):
    """12-state Rex quadrotor, ``x = [r (3) m, sigma (3) MRP, v (3) m/s body, w (3) rad/s body]``.

    ``r_dot = R(q) v``, ``sigma_dot = 1/4[(1 - s.s) I + 2[s]x + 2 s s^T] w``, ``v_dot = F_b/m - w x v``,
    ``w_dot = J^-1 (tau - w x J w)`` with ``F_b = [0, 0, sum f_i] + R(q)^T m g``; RK4 with ``dt = 0.05``.
    Controls are the four motor commands in ``[11.5, 18.3]`` (x100 = PWM 1150-1830); hover is 14.498.
    """

    name = "quadrotor"
    nx, nu, nq, dt = 12, 4, 7, 0.05
    state_names = ("x", "y", "z", "s1", "s2", "s3", "vx", "vy", "vz", "wx", "wy", "wz")
    control_names = ("m1", "m2", "m3", "m4")
    params = QuadParams(
        mass=2.0,
        inertia=((0.01566089, 3.18037e-6, 0.0), (3.18037e-6, 0.01562078, 0.0), (0.0, 0.0, 0.02226868)),
        arm=0.28, kf=0.0244101, bf=-30.48576, km=0.00029958, act_scale=100.0,
    )
    u_low, u_high = (11.5,) * 4, (18.3,) * 4
    u_nominal = ((2.0 * 9.81 - 4 * -30.48576) / (100.0 * 0.0244101 * 4),) * 4
    Q_diag, R_diag = (10.0,) * 6 + (1.0,) * 6, (1e-8,) * 4
    goal = (0.0,) * 12
    mrp_slice = (3, 6)
    position_slice = (0, 3)
    _euler_window = math.radians(70.0)
    init_low = (-5.0,) * 3 + (-_euler_window,) * 3 + (-0.5,) * 3 + (-0.25,) * 3
    init_high = (5.0,) * 3 + (_euler_window,) * 3 + (0.5,) * 3 + (0.25,) * 3
    reward_weights = (0.1,) * 3 + (1.0,) * 3 + (0.01,) * 6
    effort_weights = (0.01,) * 4
    success_tolerance = (0.3,) * 3 + (0.1,) * 3 + (0.5,) * 3 + (1.0,) * 3
    flight_bound = 15.0
    state_envelope = (15.0,) * 3 + (math.inf,) * 3 + (50.0,) * 3 + (30.0,) * 3

    def _step(self, x: Any, u: Any, ops: Any) -> Any:
        return rk4(lambda a, b: self._deriv(a, b, ops), x, u, self.dt)

    def _deriv(self, x: Any, u: Any, ops: Any) -> Any:
        r, s, v, w = components(x, 0, 3), components(x, 3, 6), components(x, 6, 9), components(x, 9, 12)
        r_dot, s_dot, v_dot, w_dot, _ = rigid_body_derivative(r, s, v, w, u, self.params)
        return ops.stack([*r_dot, *s_dot, *v_dot, *w_dot])

    def continuous_jacobians(
        self, x: torch.Tensor, u: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(x_dot (B, 12), dx_dot/dx (B, 12, 12), dx_dot/du (B, 12, 4))``, analytic (see
        :mod:`~deqmpc_gym.systems.rigid_body_jacobians`)."""
        f, G = self._deriv_and_jac(x, u)
        return f, G[..., :12], G[..., 12:]

    def _deriv_and_jac(self, x: Any, u: Any) -> tuple[Any, Any]:
        """``x_dot (B, 12)`` (via :meth:`_deriv`, bit-identical) and ``[dx_dot/dx | dx_dot/du] (B, 12, 16)``
        (torch tensors or numpy arrays)."""
        ops = ops_for(x)
        f = self._deriv(x, u, ops)
        xt = batch_last(x)
        jb = rigid_body_jacobians(xt[3:6], xt[6:9], xt[9:12], self.params)
        v_u, w_u = control_jacobians(self.params, x)
        G = ops.zeros_like(x, (x.shape[0], 12, 16))
        fill_rigid_body_blocks(G, jb, v_u, w_u, v=6, w=9, u=12)
        return f, G
