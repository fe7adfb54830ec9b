"""The single-shooting view of a standalone solve: its first-order test (:func:`shooting_kkt`, the convergence test
of every rollout answer) and the shooting polish, a projected Levenberg-Marquardt method on the controls alone for
the samples that the augmented-Lagrangian iterations leave unconverged (``MPCConfig.polish_iters``).

The AL iterations treat the dynamics as constraints of the states and controls (multiple shooting). On some long
horizons (a torque-limited arm swing-up, a badly scaled orbital rendezvous) they stall: the penalty reaches its cap,
the Gauss-Newton Hessian ``W + rho J^T J`` loses the cost's curvature to round-off, and the answer stays above the
optimum. Those answers are returned as rollouts of their controls anyway (``output="rollout"``), so the problem left
is the single-shooting one

    min_u  J(u) = 1/2 sum_t |x_t(u) - theta_t|_Q^2 + 1/2 sum_t |u_t - u_ref_t|_R^2,   u_low <= u_t <= u_high,

with ``x(u)`` the rollout from ``x_0``: a nonlinear least-squares problem with box bounds, and no penalty at all.
Each iteration (the control-limited DDP of Tassa, Mansard and Todorov, ICRA 2014, in dense form; Bertsekas'
projected Newton for the bounds):

1. roll out ``u``, linearise the dynamics, and build the sensitivities ``S = dx/du`` (``(T nx) x (T nu)``, one
   forward recursion); the Gauss-Newton Hessian ``H = S^T Q S + R`` and the gradient ``g`` of ``J``;
2. fix the controls at a bound whose gradient points outwards, solve ``(H_ff + mu diag(H_ff)) du_f = -g_f`` on the
   free ones (Levenberg-Marquardt damping ``mu``, Cholesky); from iteration :data:`EXACT_AFTER` on, ``H`` is the
   exact Hessian of ``J`` (:func:`shooting_model` with ``exact``) wherever it is positive definite on the free controls,
   the Gauss-Newton one elsewhere (a sample whose exact Hessian was indefinite tries again :data:`EXACT_RETRY`
   iterations later);
3. backtrack ``u <- clip(u + alpha du)`` on the true cost of the rollout (Armijo); a failed search grows ``mu``
   tenfold and retries, a successful one divides it by 3.

Gauss-Newton converges only linearly where the residuals ``x_t - theta_t`` stay large at the solution (waypoints
the system cannot reach, the usual case in MPC): on the car of ``benchmarks/solver_suite.py`` a few samples took
more than 50 iterations. Newton's steps with the exact Hessian converge quadratically near a local minimum, but each
costs ``nx + nu`` Hessian-vector products of the dynamics, and far from a minimum the Hessian may be indefinite;
the first :data:`EXACT_AFTER` iterations therefore stay Gauss-Newton, so samples that converge quickly are
polished as before, and only the slow ones switch.

Every iterate is a rollout within the bounds, so an unconverged answer is still a feasible trajectory whose cost
never rose. A sample stops when :func:`shooting_kkt`'s projected reduced gradient meets
``tol_shooting`` (the convergence test of every rollout answer) or when no step decreases its cost.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from deqmpc_gym.mpc import fused, kkt
from deqmpc_gym.mpc._common import finite_rows
from deqmpc_gym.mpc.problem import MPCProblem

#: Levenberg-Marquardt damping: first value (relative to diag H), bounds, and the factors of a failed / good step
MU_START, MU_MIN, MU_MAX = 1e-8, 1e-12, 1e8
MU_UP, MU_DOWN = 10.0, 3.0
#: Armijo constant and step halvings of the projected line search
ARMIJO, HALVINGS = 1e-4, 10
#: the iteration from which the exact Hessian replaces the Gauss-Newton one where it is positive definite on the
#: free controls (``None``: never), and the iterations a sample waits to try again after an indefinite one
EXACT_AFTER: int | None = 20
EXACT_RETRY = 3


@dataclass(frozen=True)
class PolishResult:
    """Outcome of :func:`shooting_polish` (all ``(B, ...)``): ``u`` the polished controls (within the bounds),
    ``converged`` the samples whose projected reduced gradient met ``tol_shooting``, ``stationarity`` that measure,
    ``lam_box (B,T,2 nu)`` the bound multipliers implied by the reduced gradient (positive on the active rows, in
    the order of :meth:`MPCProblem.ineq`: ``u - u_high``, then ``u_low - u``), ``iters`` the iterations run."""

    u: torch.Tensor
    converged: torch.Tensor
    stationarity: torch.Tensor
    lam_box: torch.Tensor
    iters: torch.Tensor


def sensitivities(A: torch.Tensor, Bu: torch.Tensor) -> torch.Tensor:
    """``S (B, T, nx, T, nu)``: ``dx_t / du_s`` of the rollout ``x_{t+1} = f(x_t, u_t)`` with ``x_0`` fixed, from the
    Jacobians ``A (B,T-1,nx,nx)``, ``Bu (B,T-1,nx,nu)`` of knots ``0..T-2``."""
    b, tm1, nx, nu = Bu.shape
    S = Bu.new_zeros(b, tm1 + 1, nx, tm1 + 1, nu)
    for t in range(tm1):
        S[:, t + 1] = torch.einsum("bij,bjsk->bisk", A[:, t], S[:, t])
        S[:, t + 1, :, t] += Bu[:, t]
    return S


def shooting_model(problem: MPCProblem, x0: torch.Tensor, ref: torch.Tensor, u: torch.Tensor,
                   exact: bool | torch.Tensor = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """``(H (B,n,n), g (B,n), He)`` with ``n = T nu``: the Gauss-Newton Hessian ``S^T Q S + R`` and the gradient of
    the single-shooting cost ``J`` at the controls ``u (B,T,nu)`` (``ref``: ``theta (B,T,nx)`` or ``[theta |
    u_ref]``), and the exact Hessian of ``J`` ``He (B,n,n)`` on the samples ``exact`` selects (True: all; a ``(B,)``
    bool mask: those, ``He = H`` on the others; None when it selects none): ``He = H + sum_t Z_t^T C_t Z_t``, ``C_t``
    the dynamics' second-order terms weighted by the costates (:meth:`MPCProblem.lagrangian_curvature` with the
    multipliers of :func:`~deqmpc_gym.mpc.kkt.multipliers`, no bound active), ``Z_t = d(x_t, u_t)/du``."""
    c = problem.consts(u)
    b, T, nu = u.shape
    nx = problem.nx
    xr = problem.rollout(x0, u)
    _, A, Bu = problem.dynamics(xr, u)
    th, du = problem.split_ref(u, ref)
    S = sensitivities(A, Bu).reshape(b, T, nx, T * nu)
    QS = torch.einsum("ij,btjn->btin", c.Q, S)
    H = torch.einsum("btim,btin->bmn", S, QS) + torch.block_diag(*([c.R] * T))
    g = torch.einsum("bti,btin->bn", (xr - th) @ c.Q, S) + (du @ c.R).reshape(b, T * nu)
    rows = (torch.ones(b, dtype=torch.bool, device=u.device) if exact is True
            else torch.zeros(b, dtype=torch.bool, device=u.device) if exact is False else exact).nonzero()[:, 0]
    if rows.numel() == 0:
        return H, g, None
    xs, us = xr[rows], u[rows]
    mu, nu_ = kkt.multipliers(problem, xs, us, ref[rows], u.new_zeros(rows.numel(), T, 2 * nu), None)
    curv = problem.lagrangian_curvature(xs, us, mu, nu_, None)
    eye = torch.eye(T * nu, dtype=u.dtype, device=u.device).view(T, nu, T * nu).expand(rows.numel(), -1, -1, -1)
    Z = torch.cat([S[rows], eye], 2)
    He = H.clone()
    He[rows] += torch.einsum("btim,btij,btjn->bmn", Z, curv, Z)
    return H, g, He


def shooting_polish(problem: MPCProblem, x0: torch.Tensor, ref: torch.Tensor, u: torch.Tensor, iters: int,
                    tol: float | None = None) -> PolishResult:
    """Polish the controls ``u (B,T,nu)`` of a box-constrained problem by at most ``iters`` projected
    Levenberg-Marquardt iterations on its single-shooting form (module docstring); no graph.

    Args:
        problem: an :class:`MPCProblem` with control bounds only (``problem.box_only``).
        x0: ``(B, nx)`` initial states; ref: ``(B,T,nx)`` waypoints or ``(B,T,nx+nu)`` ``[theta | u_ref]``.
        u: ``(B, T, nu)`` starting controls (clipped to the bounds first).
        iters: the largest number of iterations (``>= 0``).
        tol: the projected-reduced-gradient tolerance (default ``problem.config.tol_shooting``).
    """
    if not problem.box_only:
        raise ValueError("the shooting polish handles control bounds only (no obstacles or user constraints)")
    tol = problem.config.tol_shooting if tol is None else tol
    with torch.no_grad():
        c = problem.consts(u)
        b, T, nu = u.shape
        lo, hi = c.u_low.repeat(T), c.u_high.repeat(T)
        uf = torch.maximum(torch.minimum(u.detach().reshape(b, T * nu), hi), lo)
        x0, ref = x0.detach(), ref.detach()
        cost = problem.cost(problem.rollout(x0, uf.view(b, T, nu)), uf.view(b, T, nu), ref)
        mu = torch.full_like(cost, MU_START)
        _, stat = shooting_kkt(problem, x0, ref, uf.view(b, T, nu))
        run = (stat > tol) & torch.isfinite(cost)
        n_it = torch.zeros(b, dtype=torch.int64, device=u.device)
        # the iteration at which each sample (next) tries the exact Hessian
        next_exact = torch.full_like(n_it, iters if EXACT_AFTER is None else EXACT_AFTER)
        for it in range(iters):
            if not bool(run.any()):
                break
            idx = run.nonzero()[:, 0]
            want = next_exact[idx] <= it
            u_new, c_new, mu_new, moved, pd = _iteration(problem, x0[idx], ref[idx], uf[idx], cost[idx], mu[idx], lo,
                                                         hi, want)
            next_exact[idx] = torch.where(want, torch.where(pd, it + 1, it + EXACT_RETRY), next_exact[idx])
            uf[idx], cost[idx], mu[idx] = u_new, c_new, mu_new
            n_it[idx] += 1
            _, s_new = shooting_kkt(problem, x0[idx], ref[idx], u_new.view(-1, T, nu))
            stat[idx] = s_new
            run[idx] = moved & (s_new > tol)
        un = uf.view(b, T, nu)
        _, g, _ = shooting_model(problem, x0, ref, un)
        g = g.view(b, T, nu)
        at_hi, at_lo = (un >= c.u_high) & (g < 0), (un <= c.u_low) & (g > 0)
        lam_box = torch.cat([torch.where(at_hi, -g, torch.zeros_like(g)), torch.where(at_lo, g, torch.zeros_like(g))],
                            -1)
    return PolishResult(un, stat <= tol, stat, lam_box, n_it)


def _iteration(problem: MPCProblem, x0: torch.Tensor, ref: torch.Tensor, uf: torch.Tensor, cost: torch.Tensor,
               mu: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, exact: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """One projected LM iteration of the samples given (``uf (B, T nu)`` flat controls; ``exact (B,)``: the samples
    that try the exact Hessian): returns the new controls, costs and dampings, which samples moved (a sample none of
    whose damped steps decreased its cost did not) and which used the exact Hessian (positive definite)."""
    b, n = uf.shape
    T, nu = problem.T, problem.nu
    H, g, He = shooting_model(problem, x0, ref, uf.view(b, T, nu), exact)
    free = ~(((uf <= lo) & (g > 0)) | ((uf >= hi) & (g < 0)))
    fm = free.to(uf.dtype)
    pin = torch.diag_embed(1.0 - fm)
    Hf = H * fm[:, :, None] * fm[:, None, :] + pin
    pd = torch.zeros_like(exact)
    if He is not None:  # the exact Hessian where it is positive definite on the free controls
        Hef = He * fm[:, :, None] * fm[:, None, :] + pin
        pd = exact & (torch.linalg.cholesky_ex(Hef)[1] == 0) & torch.isfinite(Hef).all((1, 2))
        Hf = torch.where(pd[:, None, None], Hef, Hf)
    gf = g * fm
    diag = torch.diagonal(Hf, dim1=1, dim2=2).clamp_min(torch.finfo(uf.dtype).tiny)
    moved = torch.zeros(b, dtype=torch.bool, device=uf.device)
    tried = ~torch.isfinite(gf).all(1)  # a non-finite model: nothing to try
    while not bool((moved | tried).all()):
        todo = ~(moved | tried)
        L, bad = torch.linalg.cholesky_ex(Hf + torch.diag_embed(mu[:, None] * diag))
        step = -torch.cholesky_solve(gf[..., None], L)[..., 0]
        ok_fac = (bad == 0) & torch.isfinite(step).all(1)
        step = torch.where(ok_fac[:, None], step, torch.zeros_like(step))
        slope = (gf * step).sum(1)  # < 0 for a descent direction
        # the projected backtracking line search, its step lengths 1, 1/2, ... evaluated in one batched rollout:
        # the first (longest) one with an Armijo decrease is taken, as a sequential search would
        trial = todo & ok_fac
        found = torch.zeros_like(moved)
        if bool(trial.any()):
            rows = trial.nonzero()[:, 0]
            alphas = 0.5 ** torch.arange(HALVINGS, dtype=uf.dtype, device=uf.device)  # (H,)
            un = uf[rows][None] + alphas[:, None, None] * step[rows][None]  # (H, R, n)
            un = torch.maximum(torch.minimum(un, hi), lo).reshape(-1, T, nu)
            m = rows.numel()
            cn = problem.cost(problem.rollout(x0[rows].repeat(HALVINGS, 1), un), un,
                              ref[rows].repeat(HALVINGS, 1, 1)).view(HALVINGS, m)
            c0, sl = cost[rows][None], slope[rows][None]
            dec = torch.isfinite(cn) & (cn <= c0 + ARMIJO * alphas[:, None] * sl) & (cn < c0)  # (H, R)
            first = torch.where(dec.any(0), dec.to(torch.int64).argmax(0), torch.full_like(rows, -1))
            hit = first >= 0
            pick = first.clamp_min(0)
            u_pick = un.view(HALVINGS, m, n)[pick, torch.arange(m, device=uf.device)]
            c_pick = cn[pick, torch.arange(m, device=uf.device)]
            uf[rows] = torch.where(hit[:, None], u_pick, uf[rows])
            cost[rows] = torch.where(hit, c_pick, cost[rows])
            found[rows] = hit
        moved |= found
        mu = torch.where(found, (mu / MU_DOWN).clamp_min(MU_MIN), torch.where(todo, mu * MU_UP, mu))
        tried |= todo & ~found & (mu > MU_MAX)
    return uf, cost, mu.clamp_max(MU_MAX), moved, pd


def shooting_kkt(problem: MPCProblem, x0: torch.Tensor, ref: torch.Tensor, u: torch.Tensor
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """First-order optimality of the controls ``u (B,T,nu)`` as a shooting problem (states = the rollout from
    ``x0 (B,nx)``; control bounds only). Returns ``(violation (B,), stationarity (B,))``: the largest bound violation
    and ``||u - clip(u - grad_u J, u_low, u_high)||_inf / (1 + max(||R (u - u_ref)||_inf, ||lam||_inf))``, the
    projected reduced gradient of the cost ``J(u) = C(rollout(u), u)`` (``ref``: ``theta (B,T,nx)`` or
    ``[theta | u_ref] (B,T,nx+nu)``), with the costates ``lam_{T-2} = -Q e_{T-1}``,
    ``lam_{t-1} = A_t^T lam_t - Q e_t`` by one backward pass. It is independent of the solver's multipliers and
    penalty: zero exactly at a KKT point of the problem, with the bounds' multipliers implied by the sign of the
    reduced gradient. Without a graph on float64 CPU tensors it runs compiled (:func:`fused.shooting_kkt`)."""
    if not (u.requires_grad or x0.requires_grad or ref.requires_grad) and fused.usable(problem, u, False):
        return fused.shooting_kkt(problem, x0, ref, u)
    c = problem.consts(u)
    T = problem.T
    xr = problem.rollout(x0, u)
    _, A, Bu = problem.dynamics(xr, u)
    th, du = problem.split_ref(u, ref)
    qe = (xr - th) @ c.Q  # (B,T,nx)
    lam = torch.zeros_like(xr[:, :-1])  # (B,T-1,nx)
    lam[:, -1] = -qe[:, -1]
    for t in range(T - 2, 0, -1):
        lam[:, t - 1] = (A[:, t].transpose(-1, -2) @ lam[:, t, :, None])[..., 0] - qe[:, t]
    rdu = du @ c.R
    grad = rdu.clone()
    grad[:, :-1] -= (Bu.transpose(-1, -2) @ lam[..., None])[..., 0]
    pg = u - torch.maximum(torch.minimum(u - grad, c.u_high), c.u_low)
    viol = torch.maximum((u - c.u_high).clamp_min(0).amax((1, 2)), (c.u_low - u).clamp_min(0).amax((1, 2)))
    scale = 1.0 + torch.maximum(rdu.abs().amax((1, 2)), lam.abs().amax((1, 2)))
    stat = pg.abs().amax((1, 2)) / scale
    bad = ~finite_rows(pg, lam)
    if bool(bad.any()):
        stat = torch.where(bad, torch.full_like(stat, float("inf")), stat)
    return viol, stat
