"""Physical constants of a quadrotor (:class:`QuadParams`), shared by its dynamics and their Jacobians."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass(frozen=True)
class QuadParams:
    """Physical constants of a "+"-rotated (x-configuration) quadrotor.

    Motor ``i`` gets the command ``u_c,i = act_scale * (u_i + u_offset)`` and produces the force
    ``f_i = kf u_c,i + bf`` [N] along body z and the yaw torque ``+-km u_c,i``. Arms point along
    ``(1,1), (1,-1), (-1,-1), (-1,1) / sqrt(2)`` with length ``arm`` [m].
    """

    mass: float
    inertia: tuple[tuple[float, float, float], ...]
    arm: float
    kf: float
    bf: float
    km: float
    act_scale: float
    u_offset: float = 0.0
    gravity: float = 9.81
    inertia_inv: tuple[tuple[float, float, float], ...] = field(init=False)

    def __post_init__(self) -> None:
        inv = np.linalg.inv(np.asarray(self.inertia, dtype=np.float64))
        object.__setattr__(self, "inertia_inv", tuple(tuple(float(v) for v in row) for row in inv))


__all__ = ["QuadParams"]
