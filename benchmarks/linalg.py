"""Dense vs banded (block-tridiagonal) factorise + solve of the MPC Gauss-Newton Hessian, side by side.

Prints a markdown table (median ms per factorise + solve, one thread, float64) over knot sizes ``n = nx + nu``
(Pendulum 3, Cartpole 6, Quadrotor 16, QPole 18), horizons ``T`` and batch sizes ``B``, with the work measure
``B (T n)^3`` that ``MPCConfig.dense_max_work`` thresholds (``linear_solver="auto"``), and the kind "auto" picks.

Usage: ``python benchmarks/linalg.py [--reps 30]``.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir))  # run from a checkout

import torch

from deqmpc_gym.mpc import MPCConfig, MPCProblem, linalg
from deqmpc_gym.systems import Cartpole, Pendulum, QPole, Quadrotor

from _timing import median_time  # noqa: E402  (benchmarks/ is on sys.path as the script's dir)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=30)
    args = ap.parse_args()
    torch.set_num_threads(1)
    gen = torch.Generator().manual_seed(0)
    print("| system | n | T | B | B (Tn)^3 | dense [ms] | banded [ms] | dense / banded | auto picks |")
    print("|---|---|---|---|---|---|---|---|---|")
    for system in (Pendulum(), Cartpole(), Quadrotor(), QPole()):
        n = system.nx + system.nu
        for T in (5, 10, 20):
            problem = MPCProblem(system, MPCConfig(horizon=T))
            for B in (1, 4, 16, 64, 200):
                A = torch.randn(B, T, n, n, dtype=torch.float64, generator=gen)
                D = A @ A.transpose(-1, -2) + 10 * n * torch.eye(n, dtype=torch.float64)
                L = torch.randn(B, T - 1, n, n, dtype=torch.float64, generator=gen)
                g = torch.randn(B, T, n, dtype=torch.float64, generator=gen)
                td = 1e3 * median_time(lambda: linalg.solve(linalg.factor(D, L, "dense"), g), args.reps)
                tb = 1e3 * median_time(lambda: linalg.solve(linalg.factor(D, L, "banded"), g), args.reps)
                print(f"| {system.name} | {n} | {T} | {B} | {B * (T * n) ** 3:.1e} | {td:.3f} | {tb:.3f} | "
                      f"{td / tb:.2f} | {problem.linear_solver_kind(B)} |", flush=True)


if __name__ == "__main__":
    main()
