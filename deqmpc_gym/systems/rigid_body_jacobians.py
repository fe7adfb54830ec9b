"""Analytic Jacobians of the rigid-body quadrotor dynamics in batched matrix form (torch or numpy).

Companion of :func:`deqmpc_gym.systems.quadrotor.rigid_body_derivative`: the same continuous dynamics,
differentiated by hand and written with 3x3 matrices (``R(q)``, skew matrices, outer products), so the RK4
Jacobians of :class:`~deqmpc_gym.systems.quadrotor.Quadrotor` and :class:`~deqmpc_gym.systems.qpole.QPole` cost
a few dozen kernels instead of an autodiff pass over hundreds of scalar ops.

Every function accepts torch tensors or numpy arrays (all inputs of one call of the same kind); the numpy form
serves the no-grad CPU fast path of :meth:`~deqmpc_gym.systems.base.System.step_and_jacobians`.

Layout: everything here is *batch-last* -- a 3-vector is ``(3, B)``, a 3x3 matrix ``(3, 3, B)`` -- so that every
elementwise kernel runs over a contiguous batch (batch-first ``(B, 3, 3)`` ops with inner size 3, and batched
3x3 ``bmm``, are 10-20x slower on CPU at ``B ~ 1000``).

Identities used (quaternion ``q = (s, v)``, scalar first; ``n = sigma . sigma``)::

    R(q) y = (s^2 - v.v) y + 2 v (v.y) + 2 s (v x y)
    d(R y)/ds = 2 s y + 2 v x y,     d(R y)/dv = 2 (v.y) I + 2 [y x v]x - 2 s [y]x
    R(q)^T y = R(s, -v) y
    s = (1 - n)/(1 + n), v = 2 sigma/(1 + n):   ds/dsigma = -4 sigma^T/(1 + n)^2,
                                                dv/dsigma = 2 I/(1 + n) - 4 sigma sigma^T/(1 + n)^2
    a b^T - b a^T = [b x a]x
"""

from __future__ import annotations

from collections.abc import Hashable
from dataclasses import dataclass

import numpy as np
import torch

from deqmpc_gym.systems.quad_params import QuadParams

Array = torch.Tensor | np.ndarray
_S2 = 1.0 / np.sqrt(2.0)
_CACHE: dict[tuple, Array] = {}


def cached_constant(key: Hashable, value: np.ndarray, like: Array) -> Array:
    """A cached constant on ``like``'s kind, dtype and device (a torch constant never requires grad)."""
    if isinstance(like, np.ndarray):
        k: tuple = (key, "numpy")
        t = _CACHE.get(k)
        if t is None:
            t = _CACHE[k] = np.asarray(value, dtype=np.float64)
        return t
    k = (key, like.dtype, like.device)
    t = _CACHE.get(k)
    if t is None:
        t = torch.as_tensor(np.asarray(value, dtype=np.float64), dtype=like.dtype, device=like.device)
        _CACHE[k] = t
    return t


def _eye(like: Array) -> Array:
    """``(3, 3, 1)`` identity (broadcasts against ``(3, 3, B)``)."""
    return cached_constant("eye3", np.eye(3)[:, :, None], like)


def dot(a: Array, b: Array) -> Array:
    """``(3, B) . (3, B) -> (B,)``."""
    return (a * b).sum(0)


def outer(a: Array, b: Array) -> Array:
    """``a b^T``: ``(3, B), (3, B) -> (3, 3, B)``."""
    return a[:, None] * b[None]


def cross(a: Array, b: Array) -> Array:
    """``a x b`` on ``(3, B)``."""
    if isinstance(a, np.ndarray):  # np.array of equal-shape rows: a few times cheaper than np.stack
        return np.array([a[1] * b[2] - a[2] * b[1], a[2] * b[0] - a[0] * b[2], a[0] * b[1] - a[1] * b[0]])
    return torch.linalg.cross(a, b, dim=0)


def skew(w: Array) -> Array:
    """``(3, B) -> (3, 3, B)`` cross-product matrix ``[w]x`` (``[w]x y = w x y``)."""
    nw = -w
    if isinstance(w, np.ndarray):
        z = np.zeros_like(w[0])
        return np.array([z, nw[2], w[1], w[2], z, nw[0], nw[1], w[0], z]).reshape(3, 3, -1)
    z = torch.zeros_like(w[0])
    return torch.stack([z, nw[2], w[1], w[2], z, nw[0], nw[1], w[0], z]).unflatten(0, (3, 3))


def matmul(a: Array, b: Array) -> Array:
    """Batch-last matrix product ``(m, k, B) @ (k, n, B) -> (m, n, B)`` (either may be a ``(., ., 1)`` constant)."""
    return (a[:, :, None] * b[None]).sum(1)


@dataclass(frozen=True)
class MrpRotation:
    """Rotation quantities of MRPs ``sigma: (3, B)``: quaternion, ``R`` and ``dq/dsigma`` (batch-last)."""

    sigma: Array  # (3, B)
    qs: Array  # (B,)
    qv: Array  # (3, B)
    R: Array  # (3, 3, B), body -> world
    dqs: Array  # (3, B)  d qs / d sigma_j
    dqv: Array  # (3, 3, B)  d qv_i / d sigma_j

    @staticmethod
    def from_mrp(sigma: Array) -> MrpRotation:
        eye = _eye(sigma)
        n = dot(sigma, sigma)
        inv_d = 1.0 / (1.0 + n)
        qs = (1.0 - n) * inv_d
        qv = (2.0 * inv_d) * sigma
        inv_d2 = inv_d * inv_d
        dqs = (-4.0 * inv_d2) * sigma
        dqv = (2.0 * inv_d) * eye - (4.0 * inv_d2) * outer(sigma, sigma)
        R = (qs * qs - dot(qv, qv)) * eye + 2.0 * outer(qv, qv) + (2.0 * qs) * skew(qv)
        return MrpRotation(sigma, qs, qv, R, dqs, dqv)

    def d_rotate(self, y: Array, *, inverse: bool = False) -> Array:
        """``d (R y) / d sigma`` (or ``d (R^T y) / d sigma`` if ``inverse``), ``(3, 3, B)``, for ``y: (3, B)``
        held fixed."""
        qs = self.qs
        v = -self.qv if inverse else self.qv
        d_s = 2.0 * (qs * y + cross(v, y))  # (3, B)
        d_v = (2.0 * dot(v, y)) * _eye(y) + 2.0 * skew(cross(y, v) - qs * y)
        if inverse:
            d_v = -d_v
        return outer(d_s, self.dqs) + matmul(d_v, self.dqv)


@dataclass(frozen=True)
class RigidBodyJacobians:
    """Blocks ``d(row)/d(col)`` of the Jacobian of :func:`~deqmpc_gym.systems.quadrotor.rigid_body_derivative`,
    each ``(3, 3, B)`` (batch-last); the position ``r`` does not appear on the right-hand side and ``d/du`` is
    constant (:func:`control_jacobians`)."""

    r_sigma: Array
    r_v: Array
    sigma_sigma: Array
    sigma_w: Array
    v_sigma: Array
    v_v: Array
    v_w: Array
    w_w: Array
    rot: MrpRotation


def rigid_body_jacobians(
    sigma: Array, v: Array, w: Array, p: QuadParams
) -> RigidBodyJacobians:
    """Analytic Jacobian blocks of the quadrotor equations.

    Args:
        sigma, v, w: ``(3, B)`` MRP attitude, body velocity, body rate (batch-last).
        p: the quadrotor constants.
    """
    rot = MrpRotation.from_mrp(sigma)
    J = cached_constant(("J", p), np.asarray(p.inertia)[:, :, None], sigma)
    Jinv = cached_constant(("Jinv", p), np.asarray(p.inertia_inv)[:, :, None], sigma)
    eye = _eye(sigma)
    g = cached_constant(("g", p), np.array([[0.0], [0.0], [-p.gravity]]), sigma)
    Sw = skew(w)
    r_sigma = rot.d_rotate(v)
    v_sigma = rot.d_rotate(g, inverse=True)  # g (3, 1) broadcasts
    # sigma_dot = 1/4 [(1 - n) w + 2 sigma x w + 2 sigma (sigma . w)]:
    #   d/dsigma = 1/2 [(sigma . w) I + [w x sigma - w]x],  d/dw = 1/4 [(1 - n) I + 2 [sigma]x + 2 sigma sigma^T]
    sigma_sigma = 0.5 * (dot(sigma, w) * eye + skew(cross(w, sigma) - w))
    sigma_w = 0.25 * ((1.0 - dot(sigma, sigma)) * eye + 2.0 * (skew(sigma) + outer(sigma, sigma)))
    # v_dot = F_b/m - w x v:  d/dv = -[w]x, d/dw = [v]x.   w_dot = J^-1 (tau - w x J w):  d/dw = J^-1 ([J w]x - [w]x J)
    Jw = (J * w[None]).sum(1)
    w_w = matmul(Jinv, skew(Jw) - matmul(Sw, J))
    return RigidBodyJacobians(r_sigma, rot.R, sigma_sigma, sigma_w, v_sigma, -Sw, skew(v), w_w, rot)


def control_jacobians(p: QuadParams, like: Array) -> tuple[Array, Array]:
    """Constant ``d v_dot / d u`` and ``d w_dot / d u``, ``(3, 4, 1)`` each (batch-last, broadcastable)."""
    if isinstance(like, np.ndarray):
        k: tuple = (("w_u", p), "numpy")
        if k in _CACHE:
            return _CACHE[(("v_u", p), "numpy")], _CACHE[k]
    else:
        k = (("w_u", p), like.dtype, like.device)
        if k in _CACHE:
            return _CACHE[(("v_u", p), like.dtype, like.device)], _CACHE[k]
    df = p.kf * p.act_scale  # d f_i / d u_i
    la = p.arm * _S2
    v_u = np.zeros((3, 4))
    v_u[2, :] = df / p.mass
    tau_u = np.array([
        [la * df, -la * df, -la * df, la * df],
        [-la * df, -la * df, la * df, la * df],
        [p.km * p.act_scale, -p.km * p.act_scale, p.km * p.act_scale, -p.km * p.act_scale],
    ])
    w_u = np.asarray(p.inertia_inv) @ tau_u
    return cached_constant(("v_u", p), v_u[:, :, None], like), cached_constant(("w_u", p), w_u[:, :, None], like)
