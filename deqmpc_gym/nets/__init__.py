"""Torch-only networks of DEQ-MPC: temporal-conv feed-forward / DEQ nets and fixed-point solvers."""

from deqmpc_gym.nets.fixed_point import (
    AndersonConfig,
    Solver,
    SolverStats,
    anderson,
    fixed_point_iter,
    get_solver,
    register_solver,
    solver_names,
)
from deqmpc_gym.nets.tcn import DEQTCN, FeedForwardTCN, NetConfig, NetOutput, build_network, shift_latent

__all__ = [
    "AndersonConfig",
    "DEQTCN",
    "FeedForwardTCN",
    "NetConfig",
    "NetOutput",
    "Solver",
    "SolverStats",
    "anderson",
    "build_network",
    "fixed_point_iter",
    "get_solver",
    "register_solver",
    "shift_latent",
    "solver_names",
]
