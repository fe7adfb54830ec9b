"""The interface both paths of the MPC solver implement (:class:`MPCSolver`), and where they differ on purpose."""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol, runtime_checkable

import torch

from deqmpc_gym.mpc._common import SolveInfo, SolverState
from deqmpc_gym.mpc.problem import MPCProblem


@runtime_checkable
class MPCSolver(Protocol):
    """An MPC-m call bound to one :class:`MPCProblem`: ``solver(x0, theta, state=..., iters=...)`` runs ``iters``
    AL iterations from ``state`` (``None``: a cold start) and returns ``(x (B,T,nx), u (B,T,nu), state, info)``,
    differentiable w.r.t. ``x0 (B,nx)`` and ``theta (B,T,nx)`` by the selected ``gradient``.

    Two implementations, one algorithm (the Newton steps, active-set prediction, line search, exit tests, dual and
    penalty updates of :mod:`deqmpc_gym.mpc.solver`, with the checks, constants, cold start and gradients of
    :mod:`deqmpc_gym.mpc._common` and the merit of :mod:`deqmpc_gym.mpc.problem`):

    * :class:`~deqmpc_gym.mpc.solver.EagerSolver` (:func:`~deqmpc_gym.mpc.solve` bound to a problem): batched
      PyTorch; on float64 CPU calls without an autograd graph its Newton loop runs compiled by numba (one call for
      all AL iterations, or one per AL iteration with ``stop_when_converged``: :mod:`deqmpc_gym.mpc.fused`), which
      gives the torch loop's iterates to round-off;
    * :class:`~deqmpc_gym.mpc.CompiledSolver`: the same iteration on per-sample scalar lists, fused by
      ``torch.compile`` (:mod:`deqmpc_gym.mpc.compiled`).

    The intended differences of :class:`~deqmpc_gym.mpc.CompiledSolver` from the eager path:

    1. **Scope.** Control bounds only (no obstacles, no user constraints), ``T (nx + nu)^3`` at most
       ``max_unrolled_work``, fixed numbers of AL iterations (``stop_at_rho_max`` included; no
       ``stop_when_converged``, hence no shooting polish, ``MPCConfig.polish_iters``), single-start cold calls
       (``MPCConfig.starts = 1``), no ``u_ref`` / ``u_init`` / ``output`` (``x`` is the iterate), gradients
       ``"implicit"`` and ``"final_implicit"`` only (``"unroll"`` needs autograd through the iterations).
    2. **Convergence report.** ``info.dual_residual`` and ``converged`` are measured at the returned iterate with
       the returned multipliers (:meth:`MPCProblem.stationarity`, the eager ``stop_when_converged`` test); the eager
       fixed-iteration calls report the Newton loop's stationarity at its last linearisation point, before the
       final step, which can flag samples at the optimum unconverged.
    3. **Regularisation.** A sample whose factorisation fails is retried with the regularisation added to every
       factorisation of that Newton step, the active-set re-solves included (eager: the first factorisation only).
    4. **Line search.** The step lengths are tried ``line_search_trials`` at a time per compiled call (eager: the
       full step, then as many halvings per batched merit call as keep the stack within
       ``BATCHED_TRIAL_KNOTS`` knots); the accepted step length is the same.
    5. **Dynamics.** The dynamics and their Jacobians come from the system's ``_step`` on component lists with
       forward-mode dual numbers (:mod:`deqmpc_gym.systems.components`), not from ``System.step_and_jacobians``.
    6. **Round-off.** The fused loops evaluate the same formulas in another order, so iterates agree with the eager
       ones to round-off, not bit for bit; near convergence, where the exit tests and the strict merit decrease
       compare quantities at round-off level, a sample may take one Newton step more or less.
    7. **Restarts.** A non-finite warm-start sample restarts from ``x = theta`` whatever ``MPCConfig.cold_start``
       says (cold calls start as :func:`~deqmpc_gym.mpc.init_state`, the rollout included).
    8. **Batches.** ``pad_batches=True`` solves a batch as one of the next power of two (copies of the first
       sample, dropped from the results), so that varying batch sizes compile at most ``log2(B) + 1`` times.

    Both raise :class:`~deqmpc_gym.errors.ShapeError` / :class:`~deqmpc_gym.errors.ConfigError` on bad inputs with
    the same checks, start cold the same way (:func:`~deqmpc_gym.mpc.init_state`), reset non-finite warm-start
    samples to that cold start, and share the backward of each gradient.
    """

    problem: MPCProblem

    def __call__(self, x0: torch.Tensor, theta: torch.Tensor, state: SolverState | None = None, iters: int = 2,
                 gradient: str | None = None, stop_at_rho_max: bool = False, exit_residual: float | None = None, *,
                 hessian: str | None = None) -> tuple[torch.Tensor, torch.Tensor, SolverState, SolveInfo]:
        """Run ``iters`` AL iterations (see :func:`~deqmpc_gym.mpc.solve` for the arguments and returns)."""
        ...


if TYPE_CHECKING:  # both implementations satisfy the protocol (checked by mypy)
    from deqmpc_gym.mpc.compiled import CompiledSolver
    from deqmpc_gym.mpc.solver import EagerSolver

    def _both_are_solvers(problem: MPCProblem) -> tuple[MPCSolver, MPCSolver]:
        eager: MPCSolver = EagerSolver(problem)
        compiled: MPCSolver = CompiledSolver(problem)
        return eager, compiled
