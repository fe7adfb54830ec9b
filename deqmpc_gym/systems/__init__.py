"""Batched, differentiable dynamics of the controlled systems (one source of truth for envs, MPC and tests)."""

from __future__ import annotations

from deqmpc_gym.errors import ConfigError
from deqmpc_gym.systems.base import System, rk4
from deqmpc_gym.systems.cartpole import Cartpole
from deqmpc_gym.systems.obstacles import (
    OBSTACLE_CENTERS,
    center_distances,
    min_obstacle_distance,
    nearest_obstacles,
)
from deqmpc_gym.systems.pendulum import Pendulum
from deqmpc_gym.systems.qpole import QPole
from deqmpc_gym.systems.quadrotor import QuadParams, Quadrotor

SYSTEMS: dict[str, type[System]] = {
    "pendulum": Pendulum,
    "cartpole": Cartpole,
    "quadrotor": Quadrotor,
    "qpole": QPole,
}


def get_system(name: str | System | type[System]) -> System:
    """Return a system instance from a registered name (``"pendulum"``, ...), a class or an instance."""
    if isinstance(name, System):
        return name
    if isinstance(name, type) and issubclass(name, System):
        return name()
    if isinstance(name, str) and name.lower() in SYSTEMS:
        return SYSTEMS[name.lower()]()
    raise ConfigError(f"unknown system {name!r}; valid names: {sorted(SYSTEMS)} (or pass a System subclass)")


__all__ = [
    "System", "rk4", "Pendulum", "Cartpole", "Quadrotor", "QPole", "QuadParams", "SYSTEMS", "get_system",
    "OBSTACLE_CENTERS", "center_distances", "min_obstacle_distance", "nearest_obstacles",
]
