"""Batched, differentiable augmented-Lagrangian MPC (the MPC-m block of DEQ-MPC).

Quick use::

    from deqmpc_gym.mpc import MPCConfig, MPCProblem, solve
    problem = MPCProblem(Pendulum(), MPCConfig(horizon=5))
    x, u, state, info = solve(problem, x0, theta, iters=2)            # cold (a DEQ-MPC step: the iterate)
    x, u, state, info = solve(problem, x0, theta2, state=state)       # warm (next DEQ iteration)
    state = state.shift(problem, x_last=theta_new[:, -1])             # next control step

    fast = CompiledSolver(problem)   # small box-constrained problems: the same calls, compiled (torch.compile)
    x, u, state, info = fast(x0, theta, state=state, iters=2)

Both ``CompiledSolver(problem)`` and ``EagerSolver(problem)`` (``solve`` bound to a problem) are an ``MPCSolver``
(:mod:`deqmpc_gym.mpc.protocol`, which lists where the two paths differ on purpose).
"""

from deqmpc_gym.mpc.compiled import CompiledSolver
from deqmpc_gym.mpc.config import STANDALONE_ITERS, MPCConfig
from deqmpc_gym.mpc.problem import MPCProblem
from deqmpc_gym.mpc.protocol import MPCSolver
from deqmpc_gym.mpc.solver import EagerSolver, SolveInfo, SolverState, init_state, shooting_kkt, solve

__all__ = ["STANDALONE_ITERS", "CompiledSolver", "EagerSolver", "MPCConfig", "MPCProblem", "MPCSolver", "SolverState",
           "SolveInfo", "init_state", "shooting_kkt", "solve"]
