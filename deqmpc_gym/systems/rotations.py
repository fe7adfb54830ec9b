"""Rotation helpers on component tuples (numpy or torch), scalar-first quaternions.

Conventions: a quaternion is ``(q_s, q_x, q_y, q_z)`` with the canonical sign ``q_s >= 0``; attitudes in the
state are modified Rodrigues parameters (MRP) ``sigma = q_v / (1 + q_s)``, so ``|sigma| <= 1`` for canonical
quaternions. ``R(q)`` maps body-frame vectors to the world frame.
"""

from __future__ import annotations

from typing import Any

import numpy as np

Vec3 = tuple[Any, Any, Any]
Quat = tuple[Any, Any, Any, Any]


def mrp_to_quat(s: Vec3) -> Quat:
    """MRP ``sigma`` -> unit quaternion ``[1 - |s|^2, 2 s] / (1 + |s|^2)``."""
    n = s[0] * s[0] + s[1] * s[1] + s[2] * s[2]
    d = 1.0 + n
    return ((1.0 - n) / d, 2.0 * s[0] / d, 2.0 * s[1] / d, 2.0 * s[2] / d)


def cross(a: Vec3, b: Vec3) -> Vec3:
    """Cross product ``a x b``."""
    return (a[1] * b[2] - a[2] * b[1], a[2] * b[0] - a[0] * b[2], a[0] * b[1] - a[1] * b[0])


def dot(a: Vec3, b: Vec3) -> Any:
    """Dot product ``a . b``."""
    return a[0] * b[0] + a[1] * b[1] + a[2] * b[2]


def quat_rotate(q: Quat, r: Vec3) -> Vec3:
    """``R(q) r = (q_s^2 - q_v.q_v) r + 2 q_v (q_v.r) + 2 q_s (q_v x r)``."""
    qs, qv = q[0], (q[1], q[2], q[3])
    a = qs * qs - dot(qv, qv)
    b = 2.0 * dot(qv, r)
    c = cross(qv, r)
    return tuple(a * r[i] + b * qv[i] + 2.0 * qs * c[i] for i in range(3))  # type: ignore[return-value]


def quat_matrix(q: Quat) -> tuple[Vec3, Vec3, Vec3]:
    """Rows of ``R(q) = (q_s^2 - q_v.q_v) I + 2 q_v q_v^T + 2 q_s [q_v]_x`` (the map of :func:`quat_rotate`): one
    matrix serves several rotations by the same quaternion with fewer operations."""
    qs, qx, qy, qz = q
    xx, yy, zz = qx * qx, qy * qy, qz * qz
    xy, xz, yz = qx * qy, qx * qz, qy * qz
    sx, sy, sz = qs * qx, qs * qy, qs * qz
    a = qs * qs - (xx + yy + zz)
    return ((a + 2.0 * xx, 2.0 * (xy - sz), 2.0 * (xz + sy)),
            (2.0 * (xy + sz), a + 2.0 * yy, 2.0 * (yz - sx)),
            (2.0 * (xz - sy), 2.0 * (yz + sx), a + 2.0 * zz))


def matvec(m: tuple[Vec3, Vec3, Vec3], r: Vec3) -> Vec3:
    """``m r`` for a 3x3 matrix given by its rows (components may be arrays or floats)."""
    return tuple(m[i][0] * r[0] + m[i][1] * r[1] + m[i][2] * r[2] for i in range(3))  # type: ignore[return-value]


def quat_rotate_inv(q: Quat, r: Vec3) -> Vec3:
    """``R(q)^T r`` (rotation by the conjugate quaternion)."""
    return quat_rotate((q[0], -q[1], -q[2], -q[3]), r)


def mrp_kinematics(s: Vec3, w: Vec3) -> Vec3:
    """MRP rate ``sigma_dot = 1/4 [(1 - s.s) w + 2 s x w + 2 s (s.w)]`` for body rate ``w`` [rad/s]."""
    n = dot(s, s)
    c = cross(s, w)
    sw = dot(s, w)
    return tuple(0.25 * ((1.0 - n) * w[i] + 2.0 * c[i] + 2.0 * s[i] * sw) for i in range(3))  # type: ignore[return-value]


def euler_xyz_to_mrp(e: np.ndarray) -> np.ndarray:
    """Euler angles ``(n, 3)`` [rad] -> MRP ``(n, 3)`` with the canonical quaternion sign (``q_s >= 0``).

    The quaternion is the Hamilton product ``q_x(e1) (x) q_y(e2) (x) q_z(e3)``.
    """
    e = np.asarray(e, dtype=np.float64)
    h = 0.5 * e
    c, s = np.cos(h), np.sin(h)
    cx, cy, cz = c[:, 0], c[:, 1], c[:, 2]
    sx, sy, sz = s[:, 0], s[:, 1], s[:, 2]
    qw = cx * cy * cz - sx * sy * sz
    qx = sx * cy * cz + cx * sy * sz
    qy = cx * sy * cz - sx * cy * sz
    qz = cx * cy * sz + sx * sy * cz
    q = np.stack([qw, qx, qy, qz], axis=-1)
    q = np.where(q[:, :1] < 0.0, -q, q)
    return q[:, 1:] / (1.0 + q[:, :1])


def mrp_to_shadow_if_needed(s: Any, ops: Any) -> Any:
    """Map MRPs with ``|s| > 1`` to the shadow set ``-s / |s|^2`` (same attitude, ``q_s >= 0``).

    Args:
        s: ``(..., 3)`` MRPs (numpy array or torch tensor).
    """
    n = (s * s).sum(-1, keepdims=True) if not hasattr(s, "dim") else (s * s).sum(-1, keepdim=True)
    return ops.where(n > 1.0, -s / n, s)
