"""Batched, differentiable augmented-Lagrangian MPC solver (the MPC-m block of DEQ-MPC, paper Alg. 1).

One AL iteration (per sample ``b``, merit ``M`` as in :mod:`deqmpc_gym.mpc.problem`):

1. up to ``newton_steps`` Gauss-Newton steps ``dz = -H^{-1} grad M`` with ``H = W + rho J_eq^T J_eq +
   rho J_act^T J_act``, a per-sample backtracking line search (``alpha = 1`` for all samples, halving only for
   samples without strict merit decrease; a sample whose search fails keeps its iterate) and a per-sample
   exit test (finished samples are no longer updated): a small step, a contraction estimate predicting a small
   next step, or -- with ``exit_residual > 0``, the reference implementation's test used by streaming calls -- a
   constraint residual below that value;
2. dual update ``lam_eq <- lam_eq + rho d``, ``lam_in <- max(lam_in + rho g, 0)``;
3. ``rho <- rho_growth * rho``.

Robustness: a sample whose Cholesky fails is regularised (``H + mu I``), and skipped (iterate kept) if that
fails too; non-finite steps are discarded; both are flagged in :class:`SolveInfo`. NaN never reaches the output.

Gradients w.r.t. ``theta`` (and ``x0``), selected per call:

* ``"implicit"`` (paper eq. 13-14): the returned iterate ``z*`` is treated as the solution of the last AL
  subproblem ``grad_z M(z; theta, lam_k, rho_k) = 0``; ``dz*/dtheta = H^{-1} [Q; 0]`` with the Gauss-Newton
  ``H`` re-linearised at ``z*`` (constraint curvature neglected, as in the paper). ``dz*/dx0`` adds the
  coupling ``-H^{-1} H_{z, x0}``. Iterations before the last one are detached (as in the paper).
* ``"unroll"``: autograd through every Newton step and dual update (step lengths are constants).
* ``"final_implicit"``: implicit function theorem on the KKT system of the constrained problem at ``z*`` with
  dynamics, ``x_0 = x0`` and the active inequalities (``lam > 0``) as hard constraints and Lagrangian Hessian
  ``W`` (linearised constraints, as mpc.pytorch / Diff-MPC).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any, NamedTuple

import torch

from deqmpc_gym.errors import ConfigError
from deqmpc_gym.mpc import fused, linalg, polish, starts
from deqmpc_gym.mpc._common import (
    BATCHED_TRIAL_KNOTS,
    REG_GROWTH,
    FinalImplicitFn,
    ImplicitFn,
    LastSubproblem,
    SolveInfo,
    SolverState,
    attach_gradient,
    check_gradient,
    check_hessian,
    check_inputs,
    check_iters,
    check_state,
    controls,
    exit_residual_of,
    factor,
    finite_rows,
    init_state,
)
from deqmpc_gym.mpc.polish import shooting_kkt
from deqmpc_gym.mpc.problem import Linearization, MPCProblem

__all__ = ["EagerSolver", "NewtonResult", "SolveInfo", "SolverState", "Subproblem", "init_state", "shooting_kkt",
           "solve"]

# the autograd functions under the names benchmarks/training.py times their backward by
_ImplicitFn, _FinalImplicitFn = ImplicitFn, FinalImplicitFn


# ====================================================================== batch rows
class _Rows:
    """The samples a step works on, selected by a ``(B,)`` mask: all of them (``idx`` None; ``take`` and ``put``
    pass tensors through) or the rows ``idx``. One code path serves both; the selection of every sample costs
    nothing."""

    def __init__(self, mask: torch.Tensor) -> None:
        self.size = mask.shape[0]
        self.all = bool(mask.all())
        self.idx = None if self.all else mask.nonzero()[:, 0]

    @property
    def empty(self) -> bool:
        return self.idx is not None and self.idx.numel() == 0

    def take(self, v: torch.Tensor) -> torch.Tensor:
        """The selected rows of ``v (B, ...)``."""
        return v if self.idx is None else v[self.idx]

    def put(self, full: torch.Tensor | None, part: torch.Tensor) -> torch.Tensor:
        """``full (B, ...)`` with the selected rows replaced by ``part``; ``full = None``: zeros elsewhere."""
        if self.idx is None:
            return part
        if full is None:
            full = part.new_zeros(self.size, *part.shape[1:])
        return full.index_copy(0, self.idx, part)

    def fill(self, full: torch.Tensor, value: bool) -> torch.Tensor:
        """The bool ``full (B,)`` set to ``value`` on the selected rows."""
        if self.idx is None:
            return torch.full_like(full, value)
        return full.index_fill(0, self.idx, value)

    def take_dynamics(self, dyn, ok: torch.Tensor):
        """The selected rows of the dynamics tuple ``dyn`` if they are valid there (``ok (B,)``), else None."""
        if dyn is None or not bool(self.take(ok).all()):
            return None
        return tuple(self.take(a) for a in dyn)

    def put_dynamics(self, full, part):
        """The dynamics tuple ``full`` (or None) with the selected rows replaced by those of ``part``."""
        if full is None:
            return tuple(self.put(None, ap) for ap in part)
        return tuple(self.put(a, ap) for a, ap in zip(full, part))


@dataclass
class Subproblem:
    """One AL subproblem of a batch: the iterate ``x (B,T,nx)``, ``u (B,T,nu)``, the cost's reference ``theta``
    (``(B,T,nx)`` or ``(B,T,nx+nu)``), multipliers ``lam_eq (B,T-1,nx)``, ``lam_in (B,T,mi)``, penalty ``rho (B,)``
    and obstacle sets ``obs (B,T,k)`` or None."""

    x: torch.Tensor
    u: torch.Tensor
    theta: torch.Tensor
    lam_eq: torch.Tensor
    lam_in: torch.Tensor
    rho: torch.Tensor
    obs: torch.Tensor | None

    def take(self, idx) -> Subproblem:
        return Subproblem(self.x[idx], self.u[idx], self.theta[idx], self.lam_eq[idx], self.lam_in[idx],
                          self.rho[idx], None if self.obs is None else self.obs[idx])

    def rows(self, rows: _Rows) -> Subproblem:
        return self if rows.idx is None else self.take(rows.idx)


class NewtonResult(NamedTuple):
    """What a Newton loop (:func:`_newton_loop`, or the fused one) returns, per sample: the new iterate ``x``,
    ``u``; ``steps`` taken; ``small_exit``: exited by the step test; ``dual_residual``: the stationarity at the
    last linearisation point; ``fallback``, ``nonfinite`` (as :class:`SolveInfo`); the defects ``d (B,T-1,nx)``
    and inequality residuals ``g (B,T,mi)`` at the new iterate (no graph); ``dyn``: the dynamics there
    (:meth:`MPCProblem.dynamics`) or None."""

    x: torch.Tensor
    u: torch.Tensor
    steps: torch.Tensor
    small_exit: torch.Tensor
    dual_residual: torch.Tensor
    fallback: torch.Tensor
    nonfinite: torch.Tensor
    d: torch.Tensor
    g: torch.Tensor
    dyn: tuple | None = None


# ====================================================================== direction
def _newton_direction(problem: MPCProblem, lin: Linearization):
    """``dz = -H^{-1} grad`` with per-sample regularisation fallback and the active-set prediction. Returns
    ``(dz (B,T,n), factor, fallback (B,))``; a failed or non-finite direction is zeroed and flagged."""
    F = factor(problem, lin.D, lin.L)
    fallback = ~F.ok
    if bool(fallback.any()):
        F = _regularise(problem, lin, F)
    dz = _predict_active_set(problem, lin, F, -linalg.solve(F, lin.grad))
    good = F.ok & finite_rows(dz)
    if not bool(good.all()):
        dz = torch.where(good.view(-1, 1, 1), dz, torch.zeros_like(dz))
    return dz, F, fallback | ~good


def _regularise(problem: MPCProblem, lin: Linearization, F: linalg.Factor) -> linalg.Factor:
    """``F`` with the samples whose factorisation failed factorised again as ``H + mu max|diag H| I``, ``mu`` from
    ``reg_min`` growing by :data:`REG_GROWTH`, at most three times."""
    scale = torch.diagonal(lin.D, dim1=-2, dim2=-1).abs().amax((1, 2)).clamp_min(1.0)
    mu = problem.config.reg_min
    D = lin.D
    for _ in range(3):
        bad = ~F.ok
        if not bool(bad.any()):
            break
        add = (mu * scale * bad.to(D.dtype))[:, None, None, None] * torch.eye(D.shape[-1], dtype=D.dtype,
                                                                               device=D.device)
        F2 = factor(problem, D + add, lin.L)
        F = _merge_factor(F, F2, bad & F2.ok)
        mu *= REG_GROWTH
    return F


def _predict_active_set(problem: MPCProblem, lin: Linearization, F: linalg.Factor, dz: torch.Tensor) -> torch.Tensor:
    """Active-set prediction: inactive inequality rows that the step ``dz`` would make active (``lam + rho (g + G dz)
    > 0``) are added to the local model with their full PHR quadratic (gradient ``G^T (lam + rho g)``, curvature
    ``rho G^T G``) and the step is recomputed for those samples (at most twice). Without it, a Gauss-Newton step
    along a weakly-penalised direction (e.g. R = 1e-10 on a control) overshoots a bound by orders of magnitude and
    the line search stalls at the kink of the PHR term."""
    extra_all = torch.zeros_like(lin.act)
    for _ in range(2):
        with torch.no_grad():
            pred = lin.s + lin.rho.view(-1, 1, 1) * problem.ineq_jac(lin.G, dz.detach())
            new_rows = (pred > 0) & ~lin.act & ~extra_all
            redo = new_rows.flatten(1).any(1) & F.ok
        if not bool(redo.any()):
            break
        extra_all = extra_all | new_rows
        rows = _Rows(redo)
        c = problem.consts(lin.D)
        Gp, ex = rows.take(lin.G), rows.take(extra_all)
        De = rows.take(lin.D) + rows.take(lin.rho).view(-1, 1, 1, 1) * problem.ineq_gram(Gp, ex) * c.pin2
        ge = rows.take(lin.grad) + problem.ineq_jac_t(Gp, rows.take(lin.s) * ex.to(Gp.dtype)) * c.pin
        F2 = factor(problem, De, rows.take(lin.L))
        dz2 = -linalg.solve(F2, ge)
        ok2 = F2.ok & finite_rows(dz2)
        dz = rows.put(dz, torch.where(ok2[:, None, None], dz2, rows.take(dz)))
    return dz


def _merge_factor(F: linalg.Factor, F2: linalg.Factor, take: torch.Tensor) -> linalg.Factor:
    """Per-sample merge of two factors of the same kind (``take (B,)`` bool: samples taken from ``F2``)."""
    if F.kind == "dense":
        C = torch.where(take[:, None, None], F2.dense(), F.dense())
        return linalg.Factor("dense", C, None, F.ok | take)
    m = take[:, None, None]
    if F.blocks is not None and F2.blocks is not None:
        C, Y = (torch.where(take.view(-1, 1, 1, 1), a, b) for a, b in zip(F2.blocks, F.blocks))
        return linalg.Factor("banded", list(C.unbind(1)), list(Y.unbind(1)), F.ok | take, (C, Y))
    (C2s, Y2s), (C1s, Y1s) = F2.banded(), F.banded()
    Cs = [torch.where(m, a, b) for a, b in zip(C2s, C1s)]
    Ys = [torch.where(m, a, b) for a, b in zip(Y2s, Y1s)]
    return linalg.Factor("banded", Cs, Ys, F.ok | take)


# ====================================================================== line search
class _Search(NamedTuple):
    """A line search's outcome per sample: the step length ``alpha`` (0 where ``ok`` is False: no decrease), the
    defects ``d`` and inequality residuals ``g`` at the accepted point (unset where not ``ok``), and the dynamics
    at the full step (or None), valid where ``alpha == 1``."""

    alpha: torch.Tensor
    ok: torch.Tensor
    d: torch.Tensor
    g: torch.Tensor
    dyn: tuple | None


def _first_trial_steps(problem: MPCProblem, sub: Subproblem, x: torch.Tensor, u: torch.Tensor, dx: torch.Tensor,
                       du: torch.Tensor, m0: torch.Tensor
                       ) -> tuple[torch.Tensor, torch.Tensor, int, torch.Tensor, torch.Tensor]:
    """Evaluate the merit at ``alpha = 1, 1/2, ..., 2^-(K-1)`` (``K`` trials in one call) and pick per sample
    the largest alpha with a strict decrease. Returns ``(alpha (B,), ok (B,), K, d, g)``; a sample without a
    decrease keeps the smallest tried alpha (the caller continues halving from there). ``d (B,T-1,nx)`` and
    ``g (B,T,mi)`` are the defects and inequality residuals at the returned alpha."""
    b, t = x.shape[:2]
    k = max(1, min(BATCHED_TRIAL_KNOTS // (b * t), problem.config.line_search_steps + 1))
    if k == 1:
        m1, d1, g1 = problem.merit_parts(x + dx, u + du, sub.theta, sub.lam_eq, sub.lam_in, sub.rho, sub.obs)
        return torch.ones_like(m0), (m1 < m0) & torch.isfinite(m1), 1, d1, g1
    al = 0.5 ** torch.arange(k, dtype=x.dtype, device=x.device)  # (K,)
    a4 = al[:, None, None, None]

    def rep(v: torch.Tensor | None) -> torch.Tensor | None:
        return None if v is None else v.unsqueeze(0).expand(k, *v.shape).reshape(k * b, *v.shape[1:])

    xk = (x.unsqueeze(0) + a4 * dx.unsqueeze(0)).reshape(k * b, *x.shape[1:])
    uk = (u.unsqueeze(0) + a4 * du.unsqueeze(0)).reshape(k * b, *u.shape[1:])
    mk, dk, gk = problem.merit_parts(xk, uk, rep(sub.theta), rep(sub.lam_eq), rep(sub.lam_in), rep(sub.rho),
                                     rep(sub.obs))
    okk = (mk.reshape(k, b) < m0) & torch.isfinite(mk.reshape(k, b))
    ok = okk.any(0)
    first = torch.where(ok, okk.to(torch.int8).argmax(0), k - 1)  # the first (largest) accepted alpha
    pick = first * b + torch.arange(b, device=x.device)  # row of (alpha index, sample) in the stacked batch
    return al[first], ok, k, dk[pick], gk[pick]


def _line_search(problem: MPCProblem, sub: Subproblem, x: torch.Tensor, u: torch.Tensor, dx: torch.Tensor,
                 du: torch.Tensor, m0: torch.Tensor, with_dynamics: bool, full_first: bool = False) -> _Search:
    """Backtracking on the merit from ``(x, u)`` along ``(dx, du)``: per sample the largest of ``alpha = 1, 1/2,
    ..., 2^-line_search_steps`` with a strict decrease below ``m0``, else ``alpha = 0``.

    With ``with_dynamics`` the full step is tried first together with the dynamics' Jacobians, which become the
    next linearisation when it is accepted (the usual case near a solution): one Jacobian evaluation per Newton
    step instead of a Jacobian plus a merit evaluation. ``full_first`` (implied by ``with_dynamics``) tries the full
    step alone before the batched trials of :func:`_first_trial_steps` (for the failing samples): cheaper where
    the full step is almost always accepted (a last AL iteration near the solution).
    """
    cfg = problem.config
    dyn = None
    if with_dynamics or full_first:
        alpha, ok, tried, d, g, dyn = _full_step_first(problem, sub, x, u, dx, du, m0, with_dynamics)
    else:
        alpha, ok, tried, d, g = _first_trial_steps(problem, sub, x, u, dx, du, m0)
    for _ in range(cfg.line_search_steps - tried + 1):  # halve the step of the samples still without a decrease
        pend = ~ok
        if not bool(pend.any()):
            break
        pi = pend.nonzero()[:, 0]
        alpha[pi] *= 0.5
        a = alpha[pi][:, None, None]
        sp = sub.take(pi)
        mp, dp, gp = problem.merit_parts(x[pi] + a * dx[pi], u[pi] + a * du[pi], sp.theta, sp.lam_eq, sp.lam_in,
                                         sp.rho, sp.obs)
        ok[pi] = (mp < m0[pi]) & torch.isfinite(mp)
        d[pi], g[pi] = dp, gp
    return _Search(torch.where(ok, alpha, torch.zeros_like(alpha)), ok, d, g, dyn)


def _full_step_first(problem: MPCProblem, sub: Subproblem, x: torch.Tensor, u: torch.Tensor, dx: torch.Tensor,
                     du: torch.Tensor, m0: torch.Tensor, with_dynamics: bool):
    """The full step alone (with the dynamics' Jacobians there if ``with_dynamics``), then the batched trials from
    ``alpha = 1/2`` for the samples it fails. Returns ``(alpha, ok, trials, d, g, dyn)`` as
    :func:`_first_trial_steps` plus the dynamics at the full step (or None)."""
    dyn = None
    x1, u1 = x + dx, u + du
    if with_dynamics:
        dyn = problem.dynamics(x1, u1)
        d = x1[:, 1:] - dyn[0]
        g, _ = problem.ineq(x1, u1, sub.obs, jac=False)
        m1 = problem.merit_from(problem.cost(x1, u1, sub.theta), d, g, sub.lam_eq, sub.lam_in, sub.rho)
    else:
        m1, d, g = problem.merit_parts(x1, u1, sub.theta, sub.lam_eq, sub.lam_in, sub.rho, sub.obs)
    ok = (m1 < m0) & torch.isfinite(m1)
    alpha = torch.ones_like(m0)
    tried = 1
    if problem.config.line_search_steps > 0 and not bool(ok.all()):
        ri = (~ok).nonzero()[:, 0]
        a2, ok2, tried2, d2, g2 = _first_trial_steps(problem, sub.take(ri), x[ri], u[ri], 0.5 * dx[ri],
                                                     0.5 * du[ri], m0[ri])
        alpha[ri], ok[ri], d[ri], g[ri] = 0.5 * a2, ok2, d2, g2
        tried += tried2
    return alpha, ok, tried, d, g, dyn


def _merge_dynamics(keep_new: torch.Tensor, new, old):
    """Per sample ``new`` where ``keep_new (B,)`` else ``old`` (tuples of :meth:`MPCProblem.dynamics` arrays)."""
    if bool(keep_new.all()):
        return new
    return tuple(torch.where(keep_new.reshape(-1, *([1] * (a.dim() - 1))), a, b) for a, b in zip(new, old))


# ====================================================================== the Newton loop
class _Step(NamedTuple):
    """One Newton step of the selected samples: the new iterate ``x``, ``u``; ``ok``: the line search found a
    decrease; ``done``: the sample leaves the loop; ``small``: by the step test; ``dres``: the stationarity at the
    linearisation point; ``fallback``, ``nonfinite``; ``moved``: ``alpha |dz|_inf``; ``d``, ``g`` at the new
    iterate; ``dyn``, ``dyn_ok``: the dynamics there and where they are valid (or None when not reused)."""

    x: torch.Tensor
    u: torch.Tensor
    ok: torch.Tensor
    done: torch.Tensor
    small: torch.Tensor
    dres: torch.Tensor
    fallback: torch.Tensor
    nonfinite: torch.Tensor
    moved: torch.Tensor
    d: torch.Tensor
    g: torch.Tensor
    dyn: tuple | None
    dyn_ok: torch.Tensor | None


@dataclass
class _NewtonState:
    """The per-sample state of a Newton loop over a batch (see :class:`NewtonResult`); ``active``: still
    iterating; ``prev_step``: ``|alpha dz|_inf`` of the last step; ``dyn`` valid where ``dyn_ok``."""

    x: torch.Tensor
    u: torch.Tensor
    active: torch.Tensor
    steps: torch.Tensor
    small_exit: torch.Tensor
    dres: torch.Tensor
    fb: torch.Tensor
    nf: torch.Tensor
    prev_step: torch.Tensor
    d: torch.Tensor | None
    g: torch.Tensor | None
    dyn: tuple | None
    dyn_ok: torch.Tensor

    @classmethod
    def start(cls, bt: Subproblem, dyn) -> _NewtonState:
        b, dev, dt = bt.x.shape[0], bt.x.device, bt.x.dtype
        false = torch.zeros(b, dtype=torch.bool, device=dev)
        inf = torch.full((b,), float("inf"), dtype=dt, device=dev)
        return cls(bt.x, bt.u, torch.ones(b, dtype=torch.bool, device=dev), torch.zeros(b, dtype=torch.long,
                   device=dev), false, inf, false, false, inf.clone(), None, None, dyn,
                   torch.ones(b, dtype=torch.bool, device=dev))

    def commit(self, rows: _Rows, step: _Step, trial: bool) -> _NewtonState:
        """The state with the step of the ``rows`` samples taken (the others unchanged)."""
        put, take = rows.put, rows.take
        return _NewtonState(
            put(self.x, step.x), put(self.u, step.u), put(self.active, ~step.done),
            put(self.steps, take(self.steps) + step.ok.long()), put(self.small_exit, step.small),
            put(self.dres, step.dres), put(self.fb, take(self.fb) | step.fallback),
            put(self.nf, take(self.nf) | step.nonfinite), put(self.prev_step, step.moved), put(self.d, step.d),
            put(self.g, step.g), rows.put_dynamics(self.dyn, step.dyn) if trial else None,
            put(self.dyn_ok, step.dyn_ok) if trial and step.dyn_ok is not None else self.dyn_ok)


def _newton_loop(problem: MPCProblem, bt: Subproblem, track_grad: bool, exit_residual: float = 0.0, dyn=None,
                 last: bool = False) -> NewtonResult:
    """Gauss-Newton minimisation of the merit of the AL subproblem for the samples of ``bt``: up to
    ``newton_steps`` steps (:func:`_newton_step`) of the samples that have not exited.

    ``dyn``: :meth:`MPCProblem.dynamics` at ``(bt.x, bt.u)`` if known (reused, not re-evaluated). ``last``: this
    is the call's last AL iteration, so the line search skips the dynamics' Jacobians at its full-step trial
    (the final step's would be wasted; a further step linearises afresh). The dynamics at the returned iterate
    are returned where known (never with ``track_grad``).
    """
    if fused.usable(problem, bt.x, track_grad):  # the same loop, compiled (deqmpc_gym.mpc.fused)
        return NewtonResult(*fused.newton_loop(problem, bt, exit_residual, REG_GROWTH))
    # an accepted full step's dynamics become the next linearisation
    reuse = not track_grad and problem.trial_dynamics(bt.x.shape[0])
    trial = reuse and not last  # the line search's full-step trial also evaluates the Jacobians
    st = _NewtonState.start(bt, dyn if reuse else None)
    for _ in range(problem.config.newton_steps):
        rows = _Rows(st.active)
        if rows.empty:
            break
        step = _newton_step(problem, bt.rows(rows), rows.take(st.x), rows.take(st.u),
                            rows.take_dynamics(st.dyn, st.dyn_ok), rows.take(st.prev_step), track_grad, trial, last,
                            exit_residual)
        st = st.commit(rows, step, trial)
    dyn_out = st.dyn if st.dyn is not None and bool(st.dyn_ok.all()) else None
    if st.d is None or st.g is None:  # unreachable: B >= 1 and newton_steps >= 1, the first step covers every sample
        raise RuntimeError("the Newton loop took no step; its residuals are unset")
    return NewtonResult(st.x, st.u, st.steps, st.small_exit, st.dres, st.fb, st.nf, st.d, st.g, dyn_out)


def _detached(track_grad: bool, *ts: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """``ts`` without their graph (as they are when nothing carries one: no detach calls)."""
    return tuple(t.detach() for t in ts) if track_grad else ts


def _newton_step(problem: MPCProblem, sub: Subproblem, x: torch.Tensor, u: torch.Tensor, dyn, prev_step: torch.Tensor,
                 track_grad: bool, trial: bool, last: bool, exit_residual: float) -> _Step:
    """One Gauss-Newton step from ``(x, u)`` on the subproblem ``sub`` (its multipliers, penalty, reference): the
    linearisation, the direction, the line search (``trial``: with the dynamics' Jacobians at the full step;
    ``last``: the full step first), the exit test."""
    nx = problem.nx
    lin = problem.linearize(x, u, sub.theta, sub.lam_eq, sub.lam_in, sub.rho, sub.obs, dyn=dyn)
    dz, _, fbs = _newton_direction(problem, lin)
    with torch.no_grad():
        gd, dzd, xd, ud, cgd, mmax, m0, d_lin, g_lin = _detached(
            track_grad, lin.grad, dz, x, u, lin.cgrad, lin.mu_max, lin.merit, lin.d, lin.g)
        dres = problem.relative_stationarity(gd, cgd, mmax)
        tol_s = problem.config.newton_tol * (1.0 + torch.maximum(xd.abs().amax((1, 2)), ud.abs().amax((1, 2))))
        step_norm = dzd.abs().amax((1, 2))
        ls = _line_search(problem, sub, xd, ud, dzd[..., :nx], dzd[..., nx:], m0, trial, full_first=last)
        dyn_n = dyn_nok = None
        if trial:  # dynamics at the new iterate: the full step's, or the linearisation's where alpha = 0
            full = ls.alpha == 1.0
            dyn_n = _merge_dynamics(full, ls.dyn, (lin.fx, lin.A, lin.Bu))
            dyn_nok = full | (ls.alpha == 0.0)
        # defects / inequality residuals at the new iterate (a failed search keeps the linearisation point)
        dn, gn = ls.d, ls.g
        if not bool(ls.ok.all()):
            okv = ls.ok.view(-1, 1, 1)
            dn, gn = torch.where(okv, dn, d_lin), torch.where(okv, gn, g_lin)
        small = _exit_test(gd, dzd, m0, step_norm, tol_s, prev_step, ls, dn, gn, exit_residual)
    a = ls.alpha[:, None, None]
    return _Step(x + a * dz[..., :nx], u + a * dz[..., nx:], ls.ok, small | ~ls.ok, small, dres, fbs,
                 ~torch.isfinite(m0), ls.alpha * step_norm, dn, gn, dyn_n, dyn_nok)


def _exit_test(grad: torch.Tensor, dz: torch.Tensor, m0: torch.Tensor, step_norm: torch.Tensor, tol_s: torch.Tensor,
               prev_step: torch.Tensor, ls: _Search, d: torch.Tensor, g: torch.Tensor,
               exit_residual: float) -> torch.Tensor:
    """``(B,)`` the Newton loop's exit test after a step (a zero step that is small still counts as converged:
    already at the minimiser):

    * a small step: ``|dz|_inf <= tol_s``, or a predicted decrease below the merit's round-off;
    * a contraction estimate (as for simplified Newton in implicit ODE solvers): a full step after a contraction
      rate ``r = |dz_k| / |dz_{k-1}| < 1`` leaves about ``r / (1 - r) |dz_k|`` to go; when that is below
      ``tol_s`` the next (confirming) step is skipped;
    * with ``exit_residual > 0`` (the reference implementation's test): the constraint residual at the new
      iterate (``d``, ``g``) below it.
    """
    small = step_norm <= tol_s
    small = small | ((grad * dz).sum((1, 2)).abs() <= 1e-13 * (1.0 + m0.abs()))
    rate = step_norm / prev_step
    small = small | ((ls.alpha == 1.0) & torch.isfinite(prev_step) & (rate < 1.0)
                     & (rate / (1.0 - rate) * step_norm <= tol_s))
    if exit_residual > 0.0:
        res = torch.sqrt((d * d).sum((1, 2)) + (g.clamp_min(0.0) ** 2).sum((1, 2)))
        small = small | (ls.ok & (res <= exit_residual))
    return small


# ====================================================================== the AL iterations
@dataclass
class _ALState:
    """The per-sample state of the AL iterations of a call: the iterate, multipliers and penalty; the last
    subproblem's multipliers and penalty (``last_*``); counters and flags of :class:`SolveInfo`; ``done``: stopped
    converged; ``d``, ``g``: the residuals at the iterate, valid where ``seen``; ``dyn``: the dynamics there, valid
    where ``dyn_ok``."""

    x: torch.Tensor
    u: torch.Tensor
    lam_eq: torch.Tensor
    lam_in: torch.Tensor
    rho: torch.Tensor
    last_eq: torch.Tensor
    last_in: torch.Tensor
    last_rho: torch.Tensor
    al_iters: torch.Tensor
    nsteps: torch.Tensor
    small_exit: torch.Tensor
    dres: torch.Tensor
    fb: torch.Tensor
    nf: torch.Tensor
    done: torch.Tensor
    d: torch.Tensor | None
    g: torch.Tensor | None
    seen: torch.Tensor
    dyn: tuple | None
    dyn_ok: torch.Tensor

    @classmethod
    def start(cls, x0: torch.Tensor, state: SolverState) -> _ALState:
        b, dev = x0.shape[0], x0.device
        x = torch.cat([x0[:, None], state.x[:, 1:]], 1)  # x_0 is fixed to x0 exactly

        def false() -> torch.Tensor:
            return torch.zeros(b, dtype=torch.bool, device=dev)

        return cls(x, state.u, state.lam_eq, state.lam_ineq, state.rho, state.lam_eq, state.lam_ineq, state.rho,
                   torch.zeros(b, dtype=torch.long, device=dev), torch.zeros(b, dtype=torch.long, device=dev), false(),
                   torch.full((b,), float("inf"), dtype=x.dtype, device=dev), false(), false(), false(), None, None,
                   false(), None, false())


class _ALResult(NamedTuple):
    """``x``, ``u`` (with their graph when tracked), the new :class:`SolverState`, :class:`SolveInfo` and the
    last subproblem of each sample."""

    x: torch.Tensor
    u: torch.Tensor
    state: SolverState
    info: SolveInfo
    last: LastSubproblem


def _al_iterations(problem: MPCProblem, x0: torch.Tensor, theta: torch.Tensor, state: SolverState, iters: int,
                   stop_at_rho_max: bool, track_grad: bool, stop_when_converged: bool = False,
                   exit_residual: float = 0.0, shooting: bool = False) -> _ALResult:
    """Run ``iters`` AL iterations (each: a Newton loop, then :func:`_al_update`) of the samples still running:
    all of them, without those past ``rho_max`` (``stop_at_rho_max``) and those that converged
    (``stop_when_converged``). ``shooting``: with ``stop_when_converged``, a sample stops when the rollout of its
    controls passes :func:`shooting_kkt` (the answer is that rollout) instead of the iterate's tests."""
    cfg = problem.config
    obs = state.obstacle_idx
    if not track_grad and not stop_when_converged and fused.usable(problem, state.x, track_grad):
        # the same iterations, compiled: one call for all of them (deqmpc_gym.mpc.fused)
        st, pres_conv = _fused_al_state(problem, x0, state, theta, iters, stop_at_rho_max, exit_residual)
        return _al_result(problem, st, theta, obs, pres_conv)
    st = _ALState.start(x0, state)
    for it in range(iters):
        run = st.rho <= cfg.rho_max if stop_at_rho_max else torch.ones_like(st.done)
        run = run & ~st.done
        if not bool(run.any()):
            break
        rows = _Rows(run)
        if not track_grad:
            st.x, st.u = st.x.detach(), st.u.detach()
        bt = Subproblem(st.x, st.u, theta, st.lam_eq, st.lam_in, st.rho, obs).rows(rows)
        # the last AL iteration of every running sample: the call's last, or (streaming) the one at rho_max
        last = it == iters - 1 or (stop_at_rho_max and bool((bt.rho * cfg.rho_growth > cfg.rho_max).all()))
        res = _newton_loop(problem, bt, track_grad, exit_residual, rows.take_dynamics(st.dyn, st.dyn_ok), last)
        st = _al_update(problem, st, rows, bt, res, track_grad, stop_when_converged, shooting)
    return _al_result(problem, st, theta, obs)


def _fused_al_state(problem: MPCProblem, x0: torch.Tensor, state: SolverState, theta: torch.Tensor, iters: int,
                    stop_at_rho_max: bool, exit_residual: float
                    ) -> tuple[_ALState, tuple[torch.Tensor, torch.Tensor] | None]:
    """The state after :func:`fused.al_iterations` from ``state`` with ``x_0 = x0`` (the loop of
    :func:`_al_iterations` and :func:`_al_update` in one compiled call; no dynamics are kept), and the kernel's
    ``(primal residual, converged)`` at it when every sample ran an AL iteration (else None)."""
    sub = Subproblem(state.x, state.u, theta, state.lam_eq, state.lam_ineq, state.rho, state.obstacle_idx)
    r = fused.al_iterations(problem, x0, sub, iters, stop_at_rho_max, exit_residual, REG_GROWTH)
    seen = r.al_iters > 0
    st = _ALState(r.x, r.u, r.lam_eq, r.lam_in, r.rho, r.last_eq, r.last_in, r.last_rho, r.al_iters,
                  r.newton_steps, r.small_exit, r.dual_residual, r.fallback, r.nonfinite, torch.zeros_like(seen),
                  r.d, r.g, seen, None, torch.zeros_like(seen))
    return st, ((r.primal_residual, r.converged) if bool(seen.all()) else None)


def _al_update(problem: MPCProblem, st: _ALState, rows: _Rows, bt: Subproblem, res: NewtonResult, track_grad: bool,
               stop_when_converged: bool, shooting: bool) -> _ALState:
    """The end of an AL iteration of the ``rows`` samples after their Newton loop ``res``: the dual update, the
    penalty growth, the convergence test of ``stop_when_converged``; the state with it all committed."""
    cfg = problem.config
    dyn_r = res.dyn
    # for the stationarity test below, and reused by the next AL iteration's first linearisation (not by the fused
    # loop, which linearises itself; the shooting test rolls the controls out instead)
    if stop_when_converged and dyn_r is None and not (shooting and fused.usable(problem, res.x, track_grad)):
        with torch.no_grad():
            dyn_r = problem.dynamics(res.x.detach(), res.u.detach())
    dyn, dyn_ok = st.dyn, rows.fill(st.dyn_ok, dyn_r is not None)
    if dyn_r is not None:
        dyn = rows.put_dynamics(st.dyn, dyn_r)
    leq, lin_, d, g, nf = _dual_update(problem, bt, res, track_grad)
    rnew = torch.clamp(bt.rho * cfg.rho_growth, max=cfg.rho_cap)
    done, dr = st.done, res.dual_residual
    if stop_when_converged:  # a sample whose new iterate meets both tolerances stops here
        prev = None
        if cfg.rho_progress > 0 and st.d is not None and st.g is not None:  # the violation before this iteration
            with torch.no_grad():
                prev = torch.where(rows.take(st.seen), problem.violation_from(rows.take(st.d), rows.take(st.g)),
                                   torch.full_like(bt.rho, math.inf))
        conv_r, dr, rnew = _stop_test(problem, bt, res.x.detach(), res.u.detach(), d.detach(), g.detach(),
                                      leq.detach(), lin_.detach(), dyn_r, res.small_exit, nf, rnew, shooting, prev)
        done = rows.put(done, conv_r)
    put, take = rows.put, rows.take
    return _ALState(
        put(st.x, res.x), put(st.u, res.u), put(st.lam_eq, leq), put(st.lam_in, lin_), put(st.rho, rnew),
        put(st.last_eq, bt.lam_eq), put(st.last_in, bt.lam_in), put(st.last_rho, bt.rho),
        put(st.al_iters, take(st.al_iters) + 1), put(st.nsteps, take(st.nsteps) + res.steps),
        put(st.small_exit, res.small_exit), put(st.dres, dr), put(st.fb, take(st.fb) | res.fallback),
        put(st.nf, take(st.nf) | nf), done, put(st.d, d.detach()), put(st.g, g.detach()), rows.fill(st.seen, True),
        dyn, dyn_ok)


def _dual_update(problem: MPCProblem, bt: Subproblem, res: NewtonResult, track_grad: bool):
    """``lam_eq + rho d``, ``max(lam_in + rho g, 0)`` at the Newton loop's iterate; a non-finite update keeps the
    previous multipliers and is flagged. Returns ``(lam_eq, lam_in, d, g, nonfinite)`` (``d``, ``g`` with their
    graph when tracked)."""
    d, g = res.d, res.g
    if track_grad:  # the line search's residuals carry no graph: recompute them differentiably
        d = problem.defects(res.x, res.u)
        g, _ = problem.ineq(res.x, res.u, bt.obs, jac=False)
    r = bt.rho.view(-1, 1, 1)
    leq = bt.lam_eq + r * d
    lin_ = (bt.lam_in + r * g).clamp_min(0.0)
    if not track_grad:
        leq, lin_ = leq.detach(), lin_.detach()
    okm = finite_rows(leq, lin_)
    if not bool(okm.all()):
        leq = torch.where(okm.view(-1, 1, 1), leq, bt.lam_eq)
        lin_ = torch.where(okm.view(-1, 1, 1), lin_, bt.lam_in)
    return leq, lin_, d, g, res.nonfinite | ~okm


def _stop_test(problem: MPCProblem, bt: Subproblem, x, u, d, g, leq, lin_, dyn, small_exit, nonfinite, rnew,
               shooting: bool, prev_violation: torch.Tensor | None = None):
    """The per-sample test of ``stop_when_converged`` after an AL iteration at its new iterate ``(x, u)`` (no
    graph) with the updated multipliers; ``prev_violation (B,)``: the violation before the iteration (for
    ``MPCConfig.rho_progress``). Returns ``(converged, dual residual, new penalty)``."""
    cfg = problem.config
    with torch.no_grad():
        pres = problem.violation_from(d, g)
        if prev_violation is not None:  # enough progress: the multipliers drive it, the penalty stays
            rnew = torch.where(pres <= cfg.rho_progress * prev_violation, bt.rho, rnew)
        # a sample already primal-feasible keeps its penalty: a larger one only worsens the Hessian's
        # conditioning (rho / smallest weight) while the multipliers converge (QPole, R = 1e-8, T = 20:
        # 29 -> 16 of 200 samples unconverged; no change on the Pendulum, Cartpole and Quadrotor)
        rnew = torch.where(pres <= cfg.tol_primal, bt.rho, rnew)
        if shooting:  # the returned answer is the rollout of u: test that (shooting_kkt)
            viol, dr = shooting_kkt(problem, x[:, 0], bt.theta, u)
            return (viol <= cfg.tol_primal) & (dr <= cfg.tol_shooting) & ~nonfinite, dr, rnew
        # stationarity at the new iterate with the updated multipliers (the Newton loop's is measured before its
        # last step): a converged sample stops without a confirming AL iteration
        dr = problem.stationarity(x, u, bt.theta, leq, lin_, bt.obs, dyn)
        conv = (pres <= cfg.tol_primal) & (dr <= cfg.tol_dual) & small_exit & ~nonfinite
    return conv, dr, rnew


def _al_result(problem: MPCProblem, st: _ALState, theta: torch.Tensor, obs: torch.Tensor | None,
               pres_conv: tuple[torch.Tensor, torch.Tensor] | None = None) -> _ALResult:
    """The call's answer from the final state: the residuals and cost at the iterate, the convergence flags
    (``pres_conv``: the primal residual and convergence flags when already known, from the fused loop)."""
    cfg = problem.config
    with torch.no_grad():
        xd, ud = st.x.detach(), st.u.detach()
        cost = problem.cost(xd, ud, theta.detach())
    if pres_conv is not None:
        pres, converged = pres_conv
    else:
        with torch.no_grad():
            d, g = st.d, st.g  # set where seen
            if d is not None and g is not None and bool(st.seen.all()):
                pres = problem.violation_from(d, g)
            else:
                pres = problem.violation(xd, ud, obs)
            converged = (pres <= cfg.tol_primal) & (st.dres <= cfg.tol_dual) & st.small_exit & ~st.nf
    new_state = SolverState(xd, ud, st.lam_eq.detach(), st.lam_in.detach(), st.rho.detach(), obs)
    info = SolveInfo(converged, pres, st.dres, st.al_iters, st.nsteps, st.rho.detach(), cost, st.fb, st.nf)
    last = LastSubproblem(st.last_eq.detach(), st.last_in.detach(), st.last_rho.detach(), st.al_iters > 0)
    return _ALResult(st.x, st.u, new_state, info, last)


# ====================================================================== public entry point
def solve(problem: MPCProblem, x0: torch.Tensor, theta: torch.Tensor, state: SolverState | None = None,
          iters: int = 2, gradient: str | None = None, stop_at_rho_max: bool = False,
          stop_when_converged: bool = False, exit_residual: float | None = None, *,
          u_ref: torch.Tensor | None = None, u_init: torch.Tensor | None = None, output: str | None = None,
          hessian: str | None = None):
    """Run ``iters`` AL iterations of the MPC problem (see :mod:`deqmpc_gym.mpc.problem` for the math).

    Horizon convention: ``T = config.horizon`` knots ``x_0 .. x_{T-1}`` (``x_0 = x0`` fixed) and one control per
    knot ``u_0 .. u_{T-1}``; ``u_t`` drives ``x_{t+1}``, so the last control ``u_{T-1}`` drives nothing: it only
    enters the cost and settles at ``u_ref`` clipped to the bounds -- the solution equals that of the problem with
    a terminal knot without a control (``u[:, :-1]`` are its controls; the cost differs by the constant
    ``1/2 |clip(u_ref) - u_ref|_R^2``, zero when ``u_ref`` is within the bounds).

    Args:
        problem: :class:`MPCProblem`.
        x0: ``(B, nx)`` current states (``x_0`` of the solution equals ``x0`` exactly).
        theta: ``(B, T, nx)`` waypoints (the tracking reference; ``theta[:, 0]`` only affects nothing but the
            constant cost). Inputs are cast to ``problem.config.dtype``; the device follows ``x0``.
        state: warm start (:class:`SolverState`, e.g. the previous call's, or ``state.shift(...)``);
            ``None``: a cold start, :func:`init_state` (with ``u_init`` and ``u_ref``); with ``MPCConfig.starts
            = K > 1`` the ``K`` starts of :mod:`deqmpc_gym.mpc.starts` in one batch, each sample's best kept.
        iters: AL iterations to run (``>= 1``).
        gradient: ``"implicit"`` | ``"unroll"`` | ``"final_implicit"`` (default ``problem.config.gradient``).
        hessian: the Hessian of the ``"final_implicit"`` backward: ``"gauss_newton"`` (the cost's) or ``"exact"``
            (the Lagrangian's, second-order terms of the dynamics and constraints included: the exact sensitivity of
            the constrained optimum; for a rollout answer it is taken at the rollout) -- default
            ``problem.config.hessian``; ``"exact"`` with another gradient is a ConfigError.
        stop_at_rho_max: streaming mode: a sample stops once its ``rho`` exceeds ``config.rho_max``.
        stop_when_converged: a sample stops as soon as its iterate meets ``config.tol_primal`` (dynamics defect
            and constraint violation) and ``config.tol_dual`` (KKT stationarity at the new iterate with the updated
            multipliers) -- ``iters`` becomes a maximum, and a sample whose iterate meets ``tol_primal`` keeps
            its penalty instead of growing it. Standalone cold solves: :meth:`MPCConfig.standalone` (first
            penalty 1e3; keep 1 for tiny control weights, see :class:`MPCConfig`).
            Off by default: DEQ-MPC runs a fixed number of AL iterations per network pass.
        exit_residual: Newton-loop exit on the constraint residual (default ``config.newton_exit_residual``;
            see :class:`MPCConfig`).
        u_ref: control reference of the cost ``1/2 |u_t - u_ref_t|_R^2``: ``(nu,)``, ``(B, nu)``, ``(T, nu)`` or
            ``(B, T, nu)`` (broadcast to ``(B, T, nu)``; ``(B, T, nu)`` is unambiguous when ``B = T``); default 0.
            Not differentiated.
        u_init: ``(B, T, nu)`` (or broadcastable) initial control guess of a cold start: the start is its
            rollout from ``x0`` (:func:`init_state`); ignored with a ``state``.
        output: what ``x`` is: ``"rollout"`` -- the rollout of the returned ``u`` from ``x0`` (equal to it to
            round-off on every sample, converged or not: a dynamically feasible trajectory), or ``"iterate"`` --
            the solver's primal iterate (within ``tol_primal`` per step of the rollout when converged). Default:
            ``"rollout"`` with ``stop_when_converged`` (a standalone solve, whose answer is the trajectory),
            ``"iterate"`` otherwise: a fixed number of AL iterations is a step of DEQ-MPC's joint fixed point,
            whose next network pass and warm start read the iterate (a rollout there would change that
            iteration's map). ``info.rollout`` says which ``x`` each sample got.

    Returns:
        ``(x (B,T,nx), u (B,T,nu), state, info)``: the final iterate (``x``: see ``output``; differentiable w.r.t.
        ``theta`` and ``x0`` when they require grad and grad mode is on -- a rollout differentiates through the
        dynamics from the implicit gradient of ``u``), the new :class:`SolverState` (detached; it holds the
        iterate) and :class:`SolveInfo`. Samples that ran no AL iteration in this call get zero gradient.

    Raises:
        ShapeError: wrong shapes, non-finite ``x0``/``theta``/``u_ref``/``u_init``. ConfigError: bad
        ``gradient``/``hessian``/``iters``/``output``.
    """
    check_inputs(problem, x0, theta)
    cfg = problem.config
    gradient = check_gradient(cfg, gradient)
    hessian = check_hessian(cfg, hessian, gradient)
    check_iters(iters)
    if output is None:
        output = "rollout" if stop_when_converged else "iterate"
    if output not in ("rollout", "iterate"):
        raise ConfigError(f"output must be 'rollout' or 'iterate', got {output!r}")
    exit_residual = exit_residual_of(cfg, exit_residual)
    x0c, thc = x0.to(cfg.dtype), theta.to(cfg.dtype)
    uref = None if u_ref is None else controls("u_ref", problem, u_ref, x0c).detach()
    if state is None and cfg.starts > 1:  # K starts per sample as one batch of K B (mpc.starts)
        def again(x0_: torch.Tensor, th_: torch.Tensor, st: SolverState, n: int, **kw: Any) -> tuple:
            kw = {"hessian": hessian, "output": output, **kw}
            return solve(problem, x0_, th_, st, n, gradient, stop_at_rho_max, stop_when_converged, exit_residual, **kw)

        uinit = None if u_init is None else controls("u_init", problem, u_init, x0c).detach()
        return _multi_start(problem, again, x0, theta, x0c, thc, uinit, uref, iters)
    cold_start = state is None
    state = _start_state(problem, x0c, thc, state, u_init, uref)
    # the cost's reference: waypoints, and the control reference when given ([theta | u_ref], MPCProblem.cost)
    ref = thc if uref is None else torch.cat([thc, uref], -1)
    needs_grad = torch.is_grad_enabled() and (x0.requires_grad or theta.requires_grad)
    # standalone answers that are rollouts are tested as such (shooting_kkt; control bounds only)
    shooting = output == "rollout" and stop_when_converged and problem.box_only
    if needs_grad and gradient == "unroll":
        if cold_start and u_init is None and cfg.cold_start == "theta":
            # the cold primal guess x = theta is part of the differentiated computation
            state = replace(state, x=thc)
        x, u, new_state, info, last = _al_iterations(problem, x0c, ref, state, iters, stop_at_rho_max, True,
                                                     stop_when_converged, exit_residual, shooting)
    else:
        with torch.no_grad():
            x, u, new_state, info, last = _al_iterations(problem, x0c.detach(), ref.detach(), state, iters,
                                                         stop_at_rho_max, False, stop_when_converged, exit_residual,
                                                         shooting)
            if shooting and cfg.polish_iters > 0 and not (needs_grad and gradient == "implicit"):
                x, u, new_state, info = _polish(problem, x0c.detach(), ref.detach(), x, u, new_state, info)
        if needs_grad:
            x, u = attach_gradient(problem, gradient, hessian, x0c, thc, ref, x, u, last, new_state.lam_ineq,
                                   new_state.obstacle_idx, at_rollout=output == "rollout")
    if output == "rollout":
        x, info = _rollout_output(problem, x0c, ref.detach(), x, u, new_state.obstacle_idx, info, shooting)
    else:
        info = replace(info, rollout=torch.zeros_like(info.converged))
    return x, u, new_state, info


def _multi_start(problem: MPCProblem, again: Callable[..., tuple], x0: torch.Tensor, theta: torch.Tensor,
                 x0c: torch.Tensor, thc: torch.Tensor, u_init: torch.Tensor | None, u_ref: torch.Tensor | None,
                 iters: int) -> tuple:
    """A cold multi-start call (:mod:`~deqmpc_gym.mpc.starts`): the ``K`` starts of each sample as one batch of ``K B``,
    either run to the end and the best converged answer kept, or screened after ``config.screen_iters`` AL iterations
    and each sample continued alone from its chosen start. ``again(x0, theta, state, iters, **kw)`` is the
    :func:`solve` call with the caller's other arguments; ``x0c, thc`` are the inputs in the solver's dtype and
    ``u_init, u_ref`` the checked ``(B, T, nu)`` controls (or None)."""
    k, j = problem.config.starts, problem.config.screen_iters
    first = starts.start_states(problem, x0c.detach(), thc.detach(), k, u_init, u_ref)
    x0k, thk, urefk = x0c.repeat(k, 1), thc.repeat(k, 1, 1), None if u_ref is None else u_ref.repeat(k, 1, 1)
    if not 0 < j < iters:
        xk, uk, sk, ik = again(x0k, thk, first, iters, u_ref=urefk)
        return starts.best_start(xk, uk, sk, ik, k)
    with torch.no_grad():  # the K starts together for j iterations, then each sample from its best start alone
        _, _, sk, ik = again(x0k.detach(), thk.detach(), first, j, u_ref=urefk, output="iterate")
    refk = thk if urefk is None else torch.cat([thk, urefk], -1)
    rows, win = starts.screen(problem, x0k.detach(), refk.detach(), sk, k)
    x, u, state, info = again(x0, theta, starts.take_rows(sk, rows), iters - j, u_ref=u_ref)
    return x, u, state, replace(info, start=win, al_iters=info.al_iters + ik.al_iters[rows],
                                newton_steps=info.newton_steps + ik.newton_steps[rows])


class EagerSolver:
    """:func:`solve` bound to one problem: the eager path as an :class:`~deqmpc_gym.mpc.protocol.MPCSolver` (the
    interface :class:`~deqmpc_gym.mpc.CompiledSolver` shares; the differences are listed there).

    ``EagerSolver(problem)(x0, theta, ...)`` is ``solve(problem, x0, theta, ...)``, with the arguments of
    :class:`~deqmpc_gym.mpc.CompiledSolver` in the same positions and the rest of :func:`solve`'s
    (``stop_when_converged``, ``u_ref``, ``u_init``, ``output``) by keyword.

    Raises:
        ConfigError: ``problem`` is not an :class:`MPCProblem`.
    """

    def __init__(self, problem: MPCProblem) -> None:
        if not isinstance(problem, MPCProblem):
            raise ConfigError(f"problem must be an MPCProblem, got {type(problem).__name__}")
        self.problem = problem

    def __call__(self, x0: torch.Tensor, theta: torch.Tensor, state: SolverState | None = None, iters: int = 2,
                 gradient: str | None = None, stop_at_rho_max: bool = False, exit_residual: float | None = None, *,
                 hessian: str | None = None, stop_when_converged: bool = False, u_ref: torch.Tensor | None = None,
                 u_init: torch.Tensor | None = None, output: str | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor, SolverState, SolveInfo]:
        """Run ``iters`` AL iterations: :func:`solve` with these arguments."""
        return solve(self.problem, x0, theta, state, iters, gradient, stop_at_rho_max, stop_when_converged,
                     exit_residual, u_ref=u_ref, u_init=u_init, output=output, hessian=hessian)


def _start_state(problem: MPCProblem, x0: torch.Tensor, theta: torch.Tensor, state: SolverState | None,
                 u_init: torch.Tensor | None, u_ref: torch.Tensor | None) -> SolverState:
    """The call's first state (detached, in the solver's dtype): a cold start (:func:`init_state`) without
    ``state``; else ``state`` checked, with its non-finite samples replaced by cold starts."""
    if state is None:
        return init_state(problem, x0.detach(), theta.detach(), u_init=u_init, u_ref=u_ref)
    check_state(problem, state, x0.shape[0])
    state = SolverState(state.x.detach().to(x0), state.u.detach().to(x0), state.lam_eq.detach().to(x0),
                        state.lam_ineq.detach().to(x0), state.rho.detach().to(x0), state.obstacle_idx)
    bad = ~finite_rows(state.x, state.u, state.lam_eq, state.lam_ineq, state.rho)
    if bool(bad.any()):
        state = init_state(problem, x0.detach(), theta.detach(), u_ref=u_ref).where(bad, state)
    return state


def _polish(problem: MPCProblem, x0: torch.Tensor, ref: torch.Tensor, x: torch.Tensor, u: torch.Tensor,
            state: SolverState, info: SolveInfo) -> tuple[torch.Tensor, torch.Tensor, SolverState, SolveInfo]:
    """The samples whose controls fail the shooting test (:func:`shooting_kkt`) after the AL iterations, polished
    by :func:`~deqmpc_gym.mpc.polish.shooting_polish` (``MPCConfig.polish_iters``): their controls, iterate (the
    rollout), state (with the bound multipliers the polish implies) and ``info.polished`` replaced (no graph)."""
    cfg = problem.config
    viol, stat = shooting_kkt(problem, x0, ref, u)
    todo = ~((viol <= cfg.tol_primal) & (stat <= cfg.tol_shooting)) & finite_rows(u)
    polished = torch.zeros_like(todo)
    if bool(todo.any()):
        idx = todo.nonzero()[:, 0]
        res = polish.shooting_polish(problem, x0[idx], ref[idx], u[idx], cfg.polish_iters)
        xr = problem.rollout(x0[idx], res.u)
        done = finite_rows(xr)
        idx, un, xr, lam = idx[done], res.u[done], xr[done], res.lam_box[done]
        u, x = u.index_put((idx,), un), x.index_put((idx,), xr)
        lam_in = state.lam_ineq.index_put((idx,), torch.cat([lam, state.lam_ineq[idx, :, lam.shape[-1]:]], -1))
        state = replace(state, x=state.x.index_put((idx,), xr), u=state.u.index_put((idx,), un), lam_ineq=lam_in)
        polished[idx] = True
    return x, u, state, replace(info, polished=polished)


def _rollout_output(problem: MPCProblem, x0: torch.Tensor, ref: torch.Tensor, x: torch.Tensor, u: torch.Tensor,
                    obs, info: SolveInfo, shooting: bool) -> tuple[torch.Tensor, SolveInfo]:
    """``x`` replaced by the rollout of ``u`` from ``x0`` where it is finite (differentiable through the dynamics
    when ``u`` / ``x0`` carry a graph), with ``info``'s primal residual and cost of the rollout; with
    ``shooting`` also its convergence flag and dual residual (:func:`shooting_kkt`)."""
    xr = problem.rollout(x0, u)
    with torch.no_grad():
        ok = finite_rows(xr.detach())
        xd, ud = xr.detach(), u.detach()
        pres = torch.where(ok, problem.violation(torch.where(ok[:, None, None], xd, x.detach()), ud, obs),
                           info.primal_residual)
        cost = torch.where(ok, problem.cost(torch.where(ok[:, None, None], xd, x.detach()), ud, ref), info.cost)
        conv, dres = info.converged, info.dual_residual
        if shooting:
            _, dres = shooting_kkt(problem, x0.detach(), ref, ud)
            dres = torch.where(ok, dres, torch.full_like(dres, float("inf")))
            conv = ok & (pres <= problem.config.tol_primal) & (dres <= problem.config.tol_shooting) & ~info.nonfinite
    if not bool(ok.all()):
        xr = torch.where(ok[:, None, None], xr, x)
    return xr, replace(info, primal_residual=pres, cost=cost, rollout=ok, converged=conv, dual_residual=dres)
