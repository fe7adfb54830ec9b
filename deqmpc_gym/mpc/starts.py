"""Multi-start cold solves (``MPCConfig.starts = K``): the K starting guesses of each sample solved as one batch of
``K B`` problems, and per sample the answer of the best start kept.

A cold solve of a nonconvex problem (a vehicle that can turn left or right, a pendulum that can swing either way)
ends in the local solution its start leads to. Solving from several starts and keeping the lowest-cost converged
answer is the usual remedy when the solves are cheap and batched, as here. The starts of a sample, in order:

0. the configured cold start (:func:`~deqmpc_gym.mpc.init_state`: the rollout of ``u_init`` when given, else
   ``MPCConfig.cold_start``);
1. the other of ``x = theta`` and the rollout of the clipped control reference (after an initial control guess:
   both, as starts 1 and 2);
2. (3. after ``u_init``) ... ``K - 1``: rollouts of constant controls drawn per sample uniformly within the
   control bounds (``u_ref`` +- 1 along unbounded components), from a generator seeded by the start's index -- the
   same starts for the same inputs on every call.

The answer of a sample is its converged answer (``SolveInfo.converged``, the flag the call reports) of the lowest
cost, the earlier start on ties; a sample no start converged keeps start 0's answer, so its flags are those of the
single-start call. ``SolveInfo.start`` says which start each sample's answer came from. Gradients flow to the
winning start's answer; with ``gradient="unroll"`` the starting guesses themselves are not differentiated (a
single-start cold call from ``x = theta`` also differentiates through that guess), which matters only for answers
short of convergence.

With ``MPCConfig.screen_iters = j`` the starts run only ``j`` AL iterations together; :func:`screen` then picks per
sample the start whose iterate looks best so far and the sample continues from it alone. After a couple of AL
iterations a start is already in the basin it will converge to, so the pick keeps most of the gain of running
every start to the end at a fraction of the work. An ``"unroll"`` gradient then differentiates the iterations after
the screening only (the continuation is a warm call from the chosen start's iterate).
"""

from __future__ import annotations

from dataclasses import fields, replace
from typing import TypeVar

import torch

from deqmpc_gym.mpc._common import SolveInfo, SolverState, init_state
from deqmpc_gym.mpc.config import COLD_STARTS
from deqmpc_gym.mpc.problem import MPCProblem

__all__ = ["start_states", "best_start", "screen", "take_rows"]

_T = TypeVar("_T", SolverState, SolveInfo)


def start_states(problem: MPCProblem, x0: torch.Tensor, theta: torch.Tensor, starts: int,
                 u_init: torch.Tensor | None = None, u_ref: torch.Tensor | None = None) -> SolverState:
    """The cold states of ``starts`` starting guesses per sample, stacked start-major into a batch of ``K B``.

    Args:
        problem: the problem (its config's dtype and cold start).
        x0: ``(B, nx)`` initial states; theta: ``(B, T, nx)`` waypoints (solver dtype).
        starts: ``K >= 2``, the number of starts per sample.
        u_init: initial control guess of start 0 (``(B, T, nu)`` or broadcastable), or None.
        u_ref: ``(B, T, nu)`` control reference, or None (the system's nominal control).

    Returns:
        :class:`SolverState` of batch ``K B``: sample ``b`` of start ``k`` at row ``k B + b``.
    """
    b = x0.shape[0]
    cfg = problem.config
    first = "u_init" if u_init is not None else cfg.cold_start
    kinds = [first] + [k for k in COLD_STARTS if k != first]
    c = problem.consts(x0)
    ref = (torch.as_tensor(problem.system.nominal_control, dtype=x0.dtype, device=x0.device).expand(b, problem.T, -1)
           if u_ref is None else u_ref)
    lo, hi = c.u_low.expand(b, 1, -1), c.u_high.expand(b, 1, -1)
    center = torch.maximum(torch.minimum(ref[:, :1], hi), lo)
    bounded = torch.isfinite(lo) & torch.isfinite(hi)
    out = []
    for k in range(starts):
        if k < len(kinds):
            kind = kinds[k]
            out.append(init_state(problem, x0, theta, u_init=u_init if kind == "u_init" else None, u_ref=u_ref,
                                  cold_start=None if kind == "u_init" else kind))
            continue
        gen = torch.Generator().manual_seed(k)
        r = torch.rand(b, 1, problem.nu, generator=gen, dtype=x0.dtype).to(x0.device)
        u = torch.where(bounded, torch.where(bounded, lo, 0.0) + r * torch.where(bounded, hi - lo, 0.0),
                        center + 2 * r - 1)
        out.append(init_state(problem, x0, theta, u_init=u.expand(b, problem.T, problem.nu), u_ref=u_ref))
    return _stack(out)


def _stack(states: list[SolverState]) -> SolverState:
    """Concatenate states along the batch (start-major)."""
    obs = None if states[0].obstacle_idx is None else torch.cat([s.obstacle_idx for s in states])  # type: ignore[misc]
    return SolverState(torch.cat([s.x for s in states]), torch.cat([s.u for s in states]),
                       torch.cat([s.lam_eq for s in states]), torch.cat([s.lam_ineq for s in states]),
                       torch.cat([s.rho for s in states]), obs)


def best_start(x: torch.Tensor, u: torch.Tensor, state: SolverState, info: SolveInfo, starts: int
               ) -> tuple[torch.Tensor, torch.Tensor, SolverState, SolveInfo]:
    """Per sample the answer of its best start (see the module docstring) from the ``K B`` answers of a
    multi-start call (start-major rows). ``x (KB, T, nx)`` and ``u (KB, T, nu)`` keep their autograd graph (the
    gradient of a sample flows to its winning start only); the returned info's ``start (B,)`` int64 says which
    start won."""
    kb = x.shape[0]
    b = kb // starts
    with torch.no_grad():
        win = _lowest(torch.where(info.converged, info.cost, torch.full_like(info.cost, float("inf"))), starts)
        rows = win * b + torch.arange(b, device=win.device)
    return x[rows], u[rows], take_rows(state, rows), replace(take_rows(info, rows), start=win)


def screen(problem: MPCProblem, x0: torch.Tensor, ref: torch.Tensor, state: SolverState, starts: int
           ) -> tuple[torch.Tensor, torch.Tensor]:
    """The start each sample continues from after the screening iterations of a multi-start call.

    The score of a start is the AL merit (:meth:`MPCProblem.merit`, with the state's multipliers and penalty) of
    the rollout of its controls clipped to the bounds: a dynamically feasible trajectory, so the merit is its cost
    plus the penalty terms of the other inequalities (obstacles). Non-finite scores never win; a sample whose
    starts are all non-finite keeps start 0.

    Args:
        problem: the problem; x0: ``(K B, nx)``; ref: ``(K B, T, nx)`` waypoints or ``[theta | u_ref]``
            ``(K B, T, nx + nu)``; state: the ``K B`` iterates after the screening iterations (start-major rows).
        starts: ``K``.

    Returns:
        ``(rows (B,), win (B,))`` int64: the row of each sample's chosen start in the ``K B`` batch and its index.
    """
    b = x0.shape[0] // starts
    with torch.no_grad():
        c = problem.consts(x0)
        u = torch.maximum(torch.minimum(state.u, c.u_high), c.u_low)
        x = problem.rollout(x0, u)
        score = problem.merit(x, u, ref, state.lam_eq, state.lam_ineq, state.rho, state.obstacle_idx)
        win = _lowest(score, starts)
    return win * b + torch.arange(b, device=win.device), win


def _lowest(score: torch.Tensor, starts: int) -> torch.Tensor:
    """Per sample the start of the lowest finite score (``score (K B,)``, start-major rows): ``(B,)`` int64, the
    earlier start on ties, start 0 where no score is finite."""
    s = score.reshape(starts, -1)
    s = torch.where(torch.isfinite(s), s, torch.full_like(s, float("inf")))
    win = s.argmin(0)
    return torch.where(torch.isinf(s.min(0).values), torch.zeros_like(win), win)


def take_rows(obj: _T, rows: torch.Tensor) -> _T:
    """The rows ``rows (B,)`` of every per-sample tensor field of a :class:`SolverState` / :class:`SolveInfo`."""
    return replace(obj, **{f.name: getattr(obj, f.name)[rows] for f in fields(obj)
                           if isinstance(getattr(obj, f.name), torch.Tensor)})

