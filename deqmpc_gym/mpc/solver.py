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

from dataclasses import dataclass, fields, replace

import torch

from deqmpc_gym.errors import ConfigError, ShapeError
from deqmpc_gym.mpc import fused, kkt, linalg
from deqmpc_gym.mpc.problem import Linearization, MPCProblem

_REG_GROWTH = 1e3


def _finite_rows(*ts: torch.Tensor) -> torch.Tensor:
    """``(B,)`` bool: every entry of sample ``b`` of every ``t (B, ...)`` is finite. A finite per-sample sum
    proves it (one reduction per tensor instead of an elementwise test; ``v - v == 0`` is the cheapest finiteness
    test of the sums); only if some sum is not finite are the entries tested."""
    b = ts[0].shape[0]
    v = ts[0].reshape(b, -1).sum(1)
    for t in ts[1:]:
        v = v + t.reshape(b, -1).sum(1)
    ok = (v - v) == 0
    if bool(ok.all()):
        return ok
    out = torch.isfinite(ts[0]).reshape(b, -1).all(1)
    for t in ts[1:]:
        out = out & torch.isfinite(t).reshape(b, -1).all(1)
    return out


# ====================================================================== state / info
@dataclass
class SolverState:
    """Warm-start state of the AL solver (pass it back into :func:`solve`).

    Attributes:
        x: ``(B, T, nx)`` primal states (``x[:, 0]`` is the fixed initial state).
        u: ``(B, T, nu)`` primal controls.
        lam_eq: ``(B, T-1, nx)`` dynamics multipliers.
        lam_ineq: ``(B, T, mi)`` inequality multipliers (``>= 0``), rows ``[u_hi, u_lo, obstacles, user]``.
        rho: ``(B,)`` per-sample penalty.
        obstacle_idx: ``(B, T, k)`` indices of the constrained obstacles per knot, or ``None``.
    """

    x: torch.Tensor
    u: torch.Tensor
    lam_eq: torch.Tensor
    lam_ineq: torch.Tensor
    rho: torch.Tensor
    obstacle_idx: torch.Tensor | None = None

    @property
    def lam(self) -> torch.Tensor:
        """All multipliers flattened, ``(B, (T-1) nx + T mi)``: ``[lam_eq, lam_ineq]``."""
        b = self.x.shape[0]
        return torch.cat([self.lam_eq.reshape(b, -1), self.lam_ineq.reshape(b, -1)], 1)

    @property
    def batch_size(self) -> int:
        return self.x.shape[0]

    def detach(self) -> SolverState:
        """A copy with every tensor detached from the autograd graph."""
        return SolverState(**{f.name: (None if getattr(self, f.name) is None else getattr(self, f.name).detach())
                              for f in fields(self)})

    def index(self, mask_or_idx) -> SolverState:
        """The sub-batch selected by a ``(B,)`` bool mask or an index tensor/list."""
        return SolverState(**{f.name: (None if getattr(self, f.name) is None else getattr(self, f.name)[mask_or_idx])
                              for f in fields(self)})

    def where(self, mask: torch.Tensor, other: SolverState) -> SolverState:
        """Per sample: ``self`` where ``mask (B,)`` is True, ``other`` elsewhere (e.g. reset a subset)."""
        out = {}
        for f in fields(self):
            a, b = getattr(self, f.name), getattr(other, f.name)
            if a is None or b is None:
                out[f.name] = None if a is None and b is None else (a if b is None else b)
                continue
            m = mask.reshape(-1, *([1] * (a.dim() - 1)))
            out[f.name] = torch.where(m, a, b)
        return SolverState(**out)

    def shift(self, problem: MPCProblem, x_last: torch.Tensor | None = None,
              iters_remaining: int | None = None) -> SolverState:
        """Warm start for the next control step (paper 4.2.3).

        The primal is shifted by one knot: ``x <- [x_1..x_{T-1}, x_last]`` (``x_last (B, nx)``, e.g. the network's
        new last waypoint; default: duplicate ``x_{T-1}``), ``u <- [u_1..u_{T-1}, u_{T-1}]``. Duals are reset to 0.
        The penalty restarts at ``rho_0 = min(rho_prev, rho_init_max)``; with ``iters_remaining = n`` it is
        ``min(rho_prev, rho_max / rho_growth**(n-1))`` so that the n-th remaining AL iteration runs at
        ``rho_max`` -- the paper's ``rho = rho_max / 10^(N m - i)`` (``rho_max / 10 = 1e7 = rho_init_max`` for the
        default ``n = 2``). Obstacle sets are shifted and the last knot's set is re-selected from ``x_last``.
        """
        cfg = problem.config
        x = self.x.detach()
        if x_last is None:
            last = x[:, -1:]
        else:
            if not isinstance(x_last, torch.Tensor) or tuple(x_last.shape) != (x.shape[0], problem.nx):
                raise ShapeError(f"x_last must have shape ({x.shape[0]}, {problem.nx}), got "
                                 f"{tuple(getattr(x_last, 'shape', ()))}")
            last = x_last.detach().to(x)[:, None]
        xs = torch.cat([x[:, 1:], last], 1)
        u = self.u.detach()
        us = torch.cat([u[:, 1:], u[:, -1:]], 1)
        cap = cfg.rho_init_max
        if iters_remaining is not None:
            if int(iters_remaining) < 1:
                raise ConfigError(f"iters_remaining must be >= 1, got {iters_remaining!r}")
            cap = cfg.rho_max / cfg.rho_growth ** (int(iters_remaining) - 1)
        rho = torch.clamp(self.rho.detach(), max=cap)
        obs = self.obstacle_idx
        if obs is not None:
            obs = torch.cat([obs[:, 1:], problem.select_obstacles(xs[:, -1:])], 1)
        return SolverState(xs, us, torch.zeros_like(self.lam_eq), torch.zeros_like(self.lam_ineq), rho, obs)


@dataclass
class SolveInfo:
    """Per-sample status of a :func:`solve` call (all ``(B,)``; the solver never raises on non-convergence).

    Attributes:
        converged: primal residual <= ``tol_primal``, stationarity <= ``tol_dual`` and the last Newton loop
            exited by its step test. For a rollout answer of a ``stop_when_converged`` solve (control bounds
            only): the returned controls' bound violation <= ``tol_primal`` and their projected reduced gradient
            (:func:`shooting_kkt`, reported as ``dual_residual``) <= ``tol_shooting`` -- a test of the returned
            answer itself, independent of the multipliers and penalty.
        primal_residual: max(|dynamics defect|, inequality violation) at the returned iterate.
        dual_residual: AL stationarity ``||grad_z M||_inf / (1 + max(||grad_z C||_inf, ||lam + rho c||_inf))``
            at the last linearisation point of the last AL iteration (the iterate before the final step); with
            ``stop_when_converged`` (and in every :class:`~deqmpc_gym.mpc.CompiledSolver` call) the KKT
            stationarity at the returned iterate with the returned multipliers (:meth:`MPCProblem.stationarity`).
        al_iters: AL iterations run; newton_steps: Newton steps taken (summed over AL iterations).
        rho: penalty after the call; cost: tracking cost at the returned iterate.
        fallback: a regularised factorisation was needed or a step had to be skipped.
        nonfinite: a non-finite step/merit/state was met (the last finite iterate was kept).
        rollout: ``True`` where the returned ``x`` is the rollout of the returned ``u`` from ``x0`` (``output=
            "rollout"``: ``primal_residual`` and ``cost`` are then those of the rollout), ``False`` where it is the
            solver's iterate (``output="iterate"``, or a rollout that was not finite).
    """

    converged: torch.Tensor
    primal_residual: torch.Tensor
    dual_residual: torch.Tensor
    al_iters: torch.Tensor
    newton_steps: torch.Tensor
    rho: torch.Tensor
    cost: torch.Tensor
    fallback: torch.Tensor
    nonfinite: torch.Tensor
    rollout: torch.Tensor | None = None


# ====================================================================== validation / init
def _check_inputs(problem: MPCProblem, x0, theta):
    if not isinstance(problem, MPCProblem):
        raise ConfigError(f"problem must be an MPCProblem, got {type(problem).__name__}")
    for name, v in (("x0", x0), ("theta", theta)):
        if not isinstance(v, torch.Tensor):
            raise ShapeError(f"{name} must be a torch tensor, got {type(v).__name__}")
        if not v.is_floating_point():
            raise ShapeError(f"{name} must be a floating tensor, got dtype {v.dtype}")
    T, nx = problem.T, problem.nx
    if x0.dim() != 2 or x0.shape[1] != nx:
        raise ShapeError(f"x0 must have shape (B, {nx}), got {tuple(x0.shape)}")
    b = x0.shape[0]
    if b == 0:
        raise ShapeError("x0 is an empty batch (shape (0, nx)); solve needs at least one problem")
    if tuple(theta.shape) != (b, T, nx):
        raise ShapeError(f"theta must have shape (B, T, nx) = ({b}, {T}, {nx}) to match x0 {tuple(x0.shape)} "
                         f"and horizon {T}, got {tuple(theta.shape)}")
    if theta.device != x0.device:
        raise ShapeError(f"x0 and theta must be on the same device, got {x0.device} and {theta.device}")
    for name, v in (("x0", x0), ("theta", theta)):
        bad = ~_finite_rows(v.detach())
        if bool(bad.any()):
            raise ShapeError(f"{name} has non-finite values in samples {bad.nonzero()[:, 0].tolist()[:10]} "
                             f"(shape {tuple(v.shape)})")


def _check_state(problem: MPCProblem, state: SolverState, b: int) -> None:
    if not isinstance(state, SolverState):
        raise ShapeError(f"state must be a SolverState (from init_state or a previous solve), got "
                         f"{type(state).__name__}")
    T, nx, nu = problem.T, problem.nx, problem.nu
    want = {"x": (b, T, nx), "u": (b, T, nu), "lam_eq": (b, T - 1, nx), "rho": (b,)}
    for name, shp in want.items():
        v = getattr(state, name)
        if not isinstance(v, torch.Tensor) or tuple(v.shape) != shp:
            raise ShapeError(f"state.{name} must have shape {shp}, got {tuple(getattr(v, 'shape', ()))}")
    if state.lam_ineq.dim() != 3 or tuple(state.lam_ineq.shape[:2]) != (b, T):
        raise ShapeError(f"state.lam_ineq must have shape ({b}, {T}, mi), got {tuple(state.lam_ineq.shape)}")
    if problem.k:
        if state.obstacle_idx is None or tuple(state.obstacle_idx.shape) != (b, T, problem.k):
            raise ShapeError(f"state.obstacle_idx must have shape ({b}, {T}, {problem.k}), got "
                             f"{None if state.obstacle_idx is None else tuple(state.obstacle_idx.shape)}")


def init_state(problem: MPCProblem, x0: torch.Tensor, theta: torch.Tensor, u_init: torch.Tensor | None = None,
               u_ref: torch.Tensor | None = None) -> SolverState:
    """Cold start, multipliers 0, ``rho = rho_init``, obstacle sets = nearest obstacles of ``theta`` (all detached).

    Primal guess: without ``u_init``, ``x = theta`` with ``x[:, 0] = x0`` and ``u`` = the control reference
    ``u_ref`` (default: the system's nominal control) clipped to the bounds; with ``u_init``, ``u = u_init`` clipped
    to the bounds and ``x`` its rollout from ``x0`` (a dynamically feasible start; samples whose rollout is not
    finite start from ``x = theta``).

    Args:
        x0: ``(B, nx)`` initial states; theta: ``(B, T, nx)`` waypoints.
        u_init: ``(B, T, nu)`` initial control guess, or None.
        u_ref: ``(B, T, nu)`` control reference of the cost, or None (see :func:`solve`).
    """
    _check_inputs(problem, x0, theta)
    dt = problem.config.dtype
    x0 = x0.detach().to(dt)
    theta = theta.detach().to(dt)
    c = problem.consts(x0)
    b = x0.shape[0]
    x = theta.clone()
    x[:, 0] = x0
    if u_init is not None:
        u = _controls("u_init", problem, u_init, x0).detach()
        u = torch.maximum(torch.minimum(u, c.u_high), c.u_low)
        with torch.no_grad():
            xr = problem.rollout(x0, u)
        fin = _finite_rows(xr)
        x = torch.where(fin[:, None, None], xr, x)
    else:
        unom = (torch.as_tensor(problem.system.nominal_control, dtype=dt, device=x0.device) if u_ref is None
                else _controls("u_ref", problem, u_ref, x0).detach())
        u = torch.maximum(torch.minimum(unom, c.u_high), c.u_low).expand(b, problem.T, problem.nu).clone()
    obs = problem.select_obstacles(theta)
    if problem.m_user is None:
        problem.ineq(x, u, obs, jac=False)
    lam_in = x.new_zeros(b, problem.T, problem.n_ineq)
    return SolverState(x, u, x.new_zeros(b, problem.T - 1, problem.nx), lam_in,
                       torch.full((b,), float(problem.config.rho_init), dtype=dt, device=x0.device), obs)


def _controls(name: str, problem: MPCProblem, v, x0: torch.Tensor) -> torch.Tensor:
    """``v`` as a ``(B, T, nu)`` tensor on ``x0``'s device and the solver dtype (from ``(nu,)``, ``(B, nu)``,
    ``(T, nu)``... anything that broadcasts to ``(B, T, nu)``); ShapeError otherwise or if not finite."""
    b, T, nu = x0.shape[0], problem.T, problem.nu
    v = torch.as_tensor(v, dtype=problem.config.dtype, device=x0.device)
    if v.dim() == 2 and tuple(v.shape) == (b, nu) and b != T:
        v = v[:, None]
    try:
        out = v.expand(b, T, nu)
    except RuntimeError:
        raise ShapeError(f"{name} must broadcast to (B, T, nu) = ({b}, {T}, {nu}), got {tuple(v.shape)}") from None
    if not bool(torch.isfinite(out).all()):
        raise ShapeError(f"{name} must be finite")
    return out


# ====================================================================== linear algebra with fallbacks
def _factor(problem: MPCProblem, D: torch.Tensor, L: torch.Tensor) -> linalg.Factor:
    """Factorise with the kind that suits this batch (``MPCProblem.linear_solver_kind``): a sub-batch of a few
    samples (an active-set redo, the last samples of a Newton loop) takes the dense factorisation even when the
    full batch takes the banded one."""
    return linalg.factor(D, L, problem.linear_solver_kind(D.shape[0]))


def _newton_direction(problem: MPCProblem, lin: Linearization):
    """``dz = -H^{-1} grad`` with per-sample regularisation fallback. Returns (dz, factor, fallback (B,))."""
    F = _factor(problem, lin.D, lin.L)
    fallback = ~F.ok
    if bool(fallback.any()):
        scale = torch.diagonal(lin.D, dim1=-2, dim2=-1).abs().amax((1, 2)).clamp_min(1.0)
        mu = problem.config.reg_min
        D = lin.D
        for _ in range(3):
            bad = ~F.ok
            if not bool(bad.any()):
                break
            add = (mu * scale * bad.to(D.dtype))[:, None, None, None] * torch.eye(D.shape[-1], dtype=D.dtype,
                                                                                   device=D.device)
            F2 = _factor(problem, D + add, lin.L)
            F = _merge_factor(F, F2, bad & F2.ok)
            mu *= _REG_GROWTH
    dz = -linalg.solve(F, lin.grad)
    # Active-set prediction: inactive inequality rows that the step would make active (lam + rho (g + G dz) > 0)
    # are added to the local model with their full PHR quadratic (gradient G^T (lam + rho g), curvature
    # rho G^T G) and the step is recomputed for those samples (at most twice). Without it, a Gauss-Newton step
    # along a weakly-penalised direction (e.g. R = 1e-10 on a control) overshoots a bound by orders of magnitude
    # and the line search stalls at the kink of the PHR term.
    extra_all = torch.zeros_like(lin.act)
    for _ in range(2):
        with torch.no_grad():
            pred = lin.s + lin.rho.view(-1, 1, 1) * problem.ineq_jac(lin.G, dz.detach())
            new_rows = (pred > 0) & ~lin.act & ~extra_all
            redo = new_rows.flatten(1).any(1) & F.ok
        if not bool(redo.any()):
            break
        extra_all = extra_all | new_rows
        every = bool(redo.all())
        ri = None if every else redo.nonzero()[:, 0]

        def pick(v: torch.Tensor) -> torch.Tensor:
            return v if every else v[ri]  # noqa: B023 - used only within this iteration

        c = problem.consts(lin.D)
        Gp, ex = pick(lin.G), pick(extra_all)
        De = pick(lin.D) + pick(lin.rho).view(-1, 1, 1, 1) * problem.ineq_gram(Gp, ex) * c.pin2
        ge = pick(lin.grad) + problem.ineq_jac_t(Gp, pick(lin.s) * ex.to(Gp.dtype)) * c.pin
        F2 = _factor(problem, De, pick(lin.L))
        dz2 = -linalg.solve(F2, ge)
        ok2 = F2.ok & _finite_rows(dz2)
        dz2 = torch.where(ok2[:, None, None], dz2, pick(dz))
        dz = dz2 if every else dz.index_copy(0, ri, dz2)
    good = F.ok & _finite_rows(dz)
    if not bool(good.all()):
        dz = torch.where(good.view(-1, 1, 1), dz, torch.zeros_like(dz))
    return dz, F, fallback | ~good


def _merge_factor(F, F2, take):
    """Per-sample merge of two factors (``take``: samples taken from ``F2``)."""
    if F.kind == "dense":
        C = torch.where(take[:, None, None], F2.C, F.C)
        return linalg.Factor("dense", C, None, F.ok | take)
    m = take[:, None, None]
    if F.blocks is not None and F2.blocks is not None:
        C, Y = (torch.where(take.view(-1, 1, 1, 1), a, b) for a, b in zip(F2.blocks, F.blocks))
        return linalg.Factor("banded", list(C.unbind(1)), list(Y.unbind(1)), F.ok | take, (C, Y))
    Cs = [torch.where(m, a, b) for a, b in zip(F2.C, F.C)]
    Ys = [torch.where(m, a, b) for a, b in zip(F2.Y, F.Y)]
    return linalg.Factor("banded", Cs, Ys, F.ok | take)


# ====================================================================== core AL loop
@dataclass
class _Batch:
    x: torch.Tensor
    u: torch.Tensor
    theta: torch.Tensor
    lam_eq: torch.Tensor
    lam_in: torch.Tensor
    rho: torch.Tensor
    obs: torch.Tensor | None

    def take(self, idx):
        return _Batch(self.x[idx], self.u[idx], self.theta[idx], self.lam_eq[idx], self.lam_in[idx],
                      self.rho[idx], None if self.obs is None else self.obs[idx])


#: the first line-search step lengths 1, 1/2, ..., 2^-(K-1) are tried in one batched merit call, with K as
#: large as keeps the stacked batch within this many knots (per-call overhead dominates below it).
_BATCHED_TRIAL_KNOTS = 2048


def _first_trial_steps(problem: MPCProblem, sub: _Batch, x: torch.Tensor, u: torch.Tensor, dx: torch.Tensor,
                       du: torch.Tensor, m0: torch.Tensor
                       ) -> tuple[torch.Tensor, torch.Tensor, int, torch.Tensor, torch.Tensor]:
    """Evaluate the merit at ``alpha = 1, 1/2, ..., 2^-(K-1)`` (``K`` trials in one call) and pick per sample
    the largest alpha with a strict decrease. Returns ``(alpha (B,), ok (B,), K, d, g)``; a sample without a
    decrease keeps the smallest tried alpha (the caller continues halving from there). ``d (B,T-1,nx)`` and
    ``g (B,T,mi)`` are the defects and inequality residuals at the returned alpha."""
    b, t = x.shape[:2]
    k = max(1, min(_BATCHED_TRIAL_KNOTS // (b * t), problem.config.line_search_steps + 1))
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


def _line_search(problem: MPCProblem, sub: _Batch, x: torch.Tensor, u: torch.Tensor, dx: torch.Tensor,
                 du: torch.Tensor, m0: torch.Tensor, with_dynamics: bool, full_first: bool = False):
    """Backtracking on the merit from ``(x, u)`` along ``(dx, du)``: per sample the largest of ``alpha = 1, 1/2,
    ..., 2^-line_search_steps`` with a strict decrease below ``m0``, else ``alpha = 0``.

    With ``with_dynamics`` the full step is tried first together with the dynamics' Jacobians, which become the
    next linearisation when it is accepted (the usual case near a solution): one Jacobian evaluation per Newton
    step instead of a Jacobian plus a merit evaluation. ``full_first`` (implied by ``with_dynamics``) tries the full
    step alone before the batched trials of :func:`_first_trial_steps` (for the failing samples): cheaper where
    the full step is almost always accepted (a last AL iteration near the solution).

    Returns ``(alpha (B,), ok (B,), d (B,T-1,nx), g (B,T,mi), dyn)``: ``d``/``g`` at the accepted point (at
    ``alpha = 0``: unset, the caller keeps the linearisation's) and ``dyn``: :meth:`MPCProblem.dynamics` at the
    full step (or None), valid for the samples with ``alpha == 1``.
    """
    cfg = problem.config
    dyn = None
    if with_dynamics or full_first:
        x1, u1 = x + dx, u + du
        if with_dynamics:
            dyn = problem.dynamics(x1, u1)
            d = x1[:, 1:] - dyn[0]
            g, _ = problem.ineq(x1, u1, sub.obs, jac=False)
            m1 = problem._merit_from(problem.cost(x1, u1, sub.theta), d, g, sub.lam_eq, sub.lam_in, sub.rho)
        else:
            m1, d, g = problem.merit_parts(x1, u1, sub.theta, sub.lam_eq, sub.lam_in, sub.rho, sub.obs)
        ok = (m1 < m0) & torch.isfinite(m1)
        alpha = torch.ones_like(m0)
        tried = 1
        if cfg.line_search_steps > 0 and not bool(ok.all()):
            ri = (~ok).nonzero()[:, 0]
            a2, ok2, tried2, d2, g2 = _first_trial_steps(problem, sub.take(ri), x[ri], u[ri], 0.5 * dx[ri],
                                                         0.5 * du[ri], m0[ri])
            alpha[ri], ok[ri], d[ri], g[ri] = 0.5 * a2, ok2, d2, g2
            tried += tried2
    else:
        alpha, ok, tried, d, g = _first_trial_steps(problem, sub, x, u, dx, du, m0)
    for _ in range(cfg.line_search_steps - tried + 1):
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
    return torch.where(ok, alpha, torch.zeros_like(alpha)), ok, d, g, dyn


def _merge_dynamics(keep_new: torch.Tensor, new, old):
    """Per sample ``new`` where ``keep_new (B,)`` else ``old`` (tuples of :meth:`MPCProblem.dynamics` arrays)."""
    if bool(keep_new.all()):
        return new
    return tuple(torch.where(keep_new.reshape(-1, *([1] * (a.dim() - 1))), a, b) for a, b in zip(new, old))


def _newton_loop(problem: MPCProblem, bt: _Batch, track_grad: bool, stats: dict,
                 exit_residual: float = 0.0, dyn=None, last: bool = False):
    """Gauss-Newton minimisation of the merit of the AL subproblem for the samples of ``bt``.

    ``dyn``: :meth:`MPCProblem.dynamics` at ``(bt.x, bt.u)`` if known (reused, not re-evaluated). ``last``: this
    is the call's last AL iteration, so the line search skips the dynamics' Jacobians at its full-step trial
    (the final step's would be wasted; a further step linearises afresh). Returns updated
    ``(x, u)``, per-sample ``(steps, exited_by_step_test, dual_residual, fallback, nonfinite)``, ``(d, g)``: the
    defects and inequality residuals at the returned ``(x, u)`` (no autograd graph), and the dynamics there
    (or None; never with ``track_grad``).
    """
    if fused.usable(problem, bt.x, track_grad):  # the same loop, compiled (deqmpc_gym.mpc.fused)
        return fused.newton_loop(problem, bt, exit_residual, _REG_GROWTH)
    cfg = problem.config
    b = bt.x.shape[0]
    dev = bt.x.device
    x, u = bt.x, bt.u
    active = torch.ones(b, dtype=torch.bool, device=dev)
    steps = torch.zeros(b, dtype=torch.long, device=dev)
    small_exit = torch.zeros(b, dtype=torch.bool, device=dev)
    dres = torch.full((b,), float("inf"), dtype=x.dtype, device=dev)
    fb = torch.zeros(b, dtype=torch.bool, device=dev)
    nf = torch.zeros(b, dtype=torch.bool, device=dev)
    prev_step = torch.full((b,), float("inf"), dtype=x.dtype, device=dev)  # ||alpha dz||_inf of the last step
    d_cur = g_cur = None  # defects / inequality residuals at (x, u) once every sample has taken a step
    # an accepted full step's dynamics become the next linearisation
    reuse = not track_grad and problem.trial_dynamics(b)
    trial = reuse and not last  # the line search's full-step trial also evaluates the Jacobians
    dyn_cur = dyn if reuse else None  # dynamics at (x, u), valid where dyn_ok
    dyn_ok = torch.ones(b, dtype=torch.bool, device=dev)
    nx = problem.nx
    for _ in range(cfg.newton_steps):
        all_active = bool(active.all())
        if all_active:
            idx = None
            sub, xs, us = bt, x, u
            dyn_s = dyn_cur if dyn_cur is not None and bool(dyn_ok.all()) else None
        else:
            idx = active.nonzero()[:, 0]
            if idx.numel() == 0:
                break
            sub = bt.take(idx)
            xs, us = x[idx], u[idx]
            dyn_s = tuple(a[idx] for a in dyn_cur) if dyn_cur is not None and bool(dyn_ok[idx].all()) else None
        lin = problem.linearize(xs, us, sub.theta, sub.lam_eq, sub.lam_in, sub.rho, sub.obs, dyn=dyn_s)
        dz, _, fbs = _newton_direction(problem, lin)
        with torch.no_grad():
            if track_grad:
                gd, dzd, xd, ud = lin.grad.detach(), dz.detach(), xs.detach(), us.detach()
                cgd, mmax, m0, d_lin, g_lin = (lin.cgrad.detach(), lin.mu_max.detach(), lin.merit.detach(),
                                               lin.d.detach(), lin.g.detach())
            else:  # nothing carries a graph: skip the detach calls
                gd, dzd, xd, ud, cgd, mmax, m0, d_lin, g_lin = (lin.grad, dz, xs, us, lin.cgrad, lin.mu_max,
                                                                 lin.merit, lin.d, lin.g)
            dres_s = problem.relative_stationarity(gd, cgd, mmax)
            tol_s = cfg.newton_tol * (1.0 + torch.maximum(xd.abs().amax((1, 2)), ud.abs().amax((1, 2))))
            step_norm = dzd.abs().amax((1, 2))
            small = step_norm <= tol_s
            # or: the predicted decrease is below the merit's round-off (nothing left to gain)
            small = small | ((gd * dzd).sum((1, 2)).abs() <= 1e-13 * (1.0 + m0.abs()))
            finite0 = torch.isfinite(m0)
            # line search: alpha = 1 for all, halve only the failing samples
            dx, du = dzd[..., :nx], dzd[..., nx:]
            alpha, ok, dn, gn, dyn1 = _line_search(problem, sub, xd, ud, dx, du, m0, trial, full_first=last)
            if trial:  # dynamics at the new iterate: the full step's, or the linearisation's where alpha = 0
                full = alpha == 1.0
                dyn_n = _merge_dynamics(full, dyn1, (lin.fx, lin.A, lin.Bu))
                dyn_nok = full | (alpha == 0.0)
            # defects / inequality residuals at the new iterate (a failed search keeps the linearisation point)
            if not bool(ok.all()):
                okv = ok.view(-1, 1, 1)
                dn, gn = torch.where(okv, dn, d_lin), torch.where(okv, gn, g_lin)
            # Contraction estimate (as for simplified Newton in implicit ODE solvers): a full step after a
            # contraction rate r = |dz_k| / |dz_{k-1}| < 1 leaves about r / (1 - r) |dz_k| to go; when
            # that is below the step test's tolerance the next (confirming) step is skipped.
            prev = prev_step if all_active else prev_step[idx]
            rate = step_norm / prev
            small = small | ((alpha == 1.0) & torch.isfinite(prev) & (rate < 1.0)
                             & (rate / (1.0 - rate) * step_norm <= tol_s))
            if exit_residual > 0.0:  # the reference implementation's test: constraint residual small enough
                res = torch.sqrt((dn * dn).sum((1, 2)) + (gn.clamp_min(0.0) ** 2).sum((1, 2)))
                small = small | (ok & (res <= exit_residual))
            # a zero step that is "small" still counts as converged (already at the minimiser)
            done = small | ~ok
            nfs = ~finite0  # (a non-finite direction was zeroed and flagged as a fallback)
        a = alpha[:, None, None]
        xn = xs + a * dz[..., :nx]
        un = us + a * dz[..., nx:]
        if all_active:
            x, u = xn, un
            steps = steps + ok.long()
            small_exit = small
            dres = dres_s
            fb = fb | fbs
            nf = nf | nfs
            active = ~done
            prev_step = alpha * step_norm
            d_cur, g_cur = dn, gn
            if trial:
                dyn_cur, dyn_ok = dyn_n, dyn_nok
            else:
                dyn_cur = None
        else:
            x = x.index_copy(0, idx, xn)
            u = u.index_copy(0, idx, un)
            steps = steps.index_add(0, idx, ok.long())
            small_exit = small_exit.index_copy(0, idx, small)
            dres = dres.index_copy(0, idx, dres_s)
            fb = fb.index_copy(0, idx, fb[idx] | fbs)
            nf = nf.index_copy(0, idx, nf[idx] | nfs)
            active = active.index_copy(0, idx, ~done)
            prev_step = prev_step.index_copy(0, idx, alpha * step_norm)
            d_cur, g_cur = d_cur.index_copy(0, idx, dn), g_cur.index_copy(0, idx, gn)
            if trial:  # dyn_cur is set: the first Newton step runs on every sample
                dyn_cur = tuple(a.index_copy(0, idx, an) for a, an in zip(dyn_cur, dyn_n))
                dyn_ok = dyn_ok.index_copy(0, idx, dyn_nok)
            else:
                dyn_cur = None
    dyn_out = dyn_cur if dyn_cur is not None and bool(dyn_ok.all()) else None
    return x, u, steps, small_exit, dres, fb, nf, (d_cur, g_cur), dyn_out


def _stop_test(problem: MPCProblem, bt: _Batch, x, u, d, g, leq, lin_, dyn, small_exit, nonfinite, rnew,
               shooting: bool):
    """The per-sample test of ``stop_when_converged`` after an AL iteration at its new iterate ``(x, u)`` (no
    graph) with the updated multipliers. Returns ``(converged, dual residual, new penalty)``."""
    cfg = problem.config
    with torch.no_grad():
        pres = problem.violation_from(d, g)
        # stationarity at the new iterate with the updated multipliers (the Newton loop's is measured before its
        # last step): a converged sample stops without a confirming AL iteration
        dr = problem.stationarity(x, u, bt.theta, leq, lin_, bt.obs, dyn)
        conv = (pres <= cfg.tol_primal) & (dr <= cfg.tol_dual) & small_exit & ~nonfinite
        # a sample already primal-feasible keeps its penalty: a larger one only worsens the Hessian's
        # conditioning (rho / smallest weight) while the multipliers converge (QPole, R = 1e-8, T = 20:
        # 29 -> 16 of 200 samples unconverged; no change on the Pendulum, Cartpole and Quadrotor)
        rnew = torch.where(pres <= cfg.tol_primal, bt.rho, rnew)
        if shooting:  # the returned answer is the rollout of u: test that instead (shooting_kkt)
            viol, dr = shooting_kkt(problem, x[:, 0], bt.theta, u)
            conv = (viol <= cfg.tol_primal) & (dr <= cfg.tol_shooting) & ~nonfinite
    return conv, dr, rnew


def _al_iterations(problem: MPCProblem, x0, theta, state: SolverState, iters: int, stop_at_rho_max: bool,
                   track_grad: bool, stop_when_converged: bool = False, exit_residual: float = 0.0,
                   shooting: bool = False):
    """Run ``iters`` AL iterations. Returns (x, u, new_state, info, last) where ``last`` holds the
    ``(lam_eq, lam_in, rho)`` of each sample's last subproblem and ``ran`` (B,) (ran >= 1 iteration).
    ``shooting``: with ``stop_when_converged``, a sample stops when the rollout of its controls passes
    :func:`shooting_kkt` (the answer is that rollout) instead of the iterate's tests."""
    cfg = problem.config
    b = x0.shape[0]
    dev = x0.device
    x, u = state.x, state.u
    x = torch.cat([x0[:, None], x[:, 1:]], 1)  # x_0 is fixed to x0 exactly
    lam_eq, lam_in, rho = state.lam_eq, state.lam_ineq, state.rho
    obs = state.obstacle_idx
    last_eq, last_in, last_rho = lam_eq, lam_in, rho
    al_iters = torch.zeros(b, dtype=torch.long, device=dev)
    nsteps = torch.zeros(b, dtype=torch.long, device=dev)
    small_exit = torch.zeros(b, dtype=torch.bool, device=dev)
    dres = torch.full((b,), float("inf"), dtype=x.dtype, device=dev)
    fb = torch.zeros(b, dtype=torch.bool, device=dev)
    nf = torch.zeros(b, dtype=torch.bool, device=dev)
    stats: dict = {}
    done = torch.zeros(b, dtype=torch.bool, device=dev)
    d_all = g_all = None  # residuals at the current iterate, valid where `seen` (saves re-evaluating f at the end)
    seen = torch.zeros(b, dtype=torch.bool, device=dev)
    dyn_all = None  # problem.dynamics at the current iterate (from the last line search), valid where dyn_ok
    dyn_ok = torch.zeros(b, dtype=torch.bool, device=dev)
    for it in range(iters):
        run = rho <= cfg.rho_max if stop_at_rho_max else torch.ones(b, dtype=torch.bool, device=dev)
        run = run & ~done
        if not bool(run.any()):
            break
        all_run = bool(run.all())
        if not track_grad:
            x, u = x.detach(), u.detach()
        if all_run:
            bt = _Batch(x, u, theta, lam_eq, lam_in, rho, obs)
            dyn_in = dyn_all if dyn_all is not None and bool(dyn_ok.all()) else None
        else:
            ridx = run.nonzero()[:, 0]
            bt = _Batch(x, u, theta, lam_eq, lam_in, rho, obs).take(ridx)
            dyn_in = tuple(a[ridx] for a in dyn_all) if dyn_all is not None and bool(dyn_ok[ridx].all()) else None
        # the last AL iteration of every running sample: the call's last, or (streaming) the one at rho_max
        last = it == iters - 1 or (stop_at_rho_max and bool((bt.rho * cfg.rho_growth > cfg.rho_max).all()))
        xr, ur, st, se, dr, f1, n1, (d, g), dyn_r = _newton_loop(problem, bt, track_grad, stats, exit_residual,
                                                                 dyn_in, last)
        if stop_when_converged and dyn_r is None:  # for the stationarity test below (and reused by the next
            with torch.no_grad():                   # AL iteration's first linearisation)
                dyn_r = problem.dynamics(xr.detach(), ur.detach())
        if dyn_r is not None:
            if all_run or dyn_all is None:
                dyn_all = dyn_r if all_run else tuple(a.new_zeros(b, *a.shape[1:]).index_copy(0, ridx, a)
                                                      for a in dyn_r)
                dyn_ok = torch.ones_like(dyn_ok) if all_run else torch.zeros_like(dyn_ok).index_fill(0, ridx, True)
            else:
                dyn_all = tuple(a.index_copy(0, ridx, ar) for a, ar in zip(dyn_all, dyn_r))
                dyn_ok = dyn_ok.index_fill(0, ridx, True)
        else:
            dyn_ok = torch.zeros_like(dyn_ok) if all_run else dyn_ok.index_fill(0, ridx, False)
        # dual and penalty update at the new iterate
        if track_grad:  # the line search's residuals carry no graph: recompute them differentiably
            d = problem.defects(xr, ur)
            g, _ = problem.ineq(xr, ur, bt.obs, jac=False)
        r = bt.rho.view(-1, 1, 1)
        leq = bt.lam_eq + r * d
        lin_ = (bt.lam_in + r * g).clamp_min(0.0)
        if not track_grad:
            leq, lin_ = leq.detach(), lin_.detach()
        # guard: a non-finite update keeps the previous multipliers
        okm = _finite_rows(leq, lin_)
        if not bool(okm.all()):
            leq = torch.where(okm.view(-1, 1, 1), leq, bt.lam_eq)
            lin_ = torch.where(okm.view(-1, 1, 1), lin_, bt.lam_in)
        n1 = n1 | ~okm
        rnew = torch.clamp(bt.rho * cfg.rho_growth, max=cfg.rho_cap)
        if stop_when_converged:  # a sample whose new iterate meets both tolerances stops here
            conv_r, dr, rnew = _stop_test(problem, bt, xr.detach(), ur.detach(), d.detach(), g.detach(),
                                          leq.detach(), lin_.detach(), dyn_r, se, n1, rnew, shooting)
            done = conv_r if all_run else done.index_copy(0, ridx, conv_r)
        if all_run:
            d_all, g_all, seen = d.detach(), g.detach(), torch.ones_like(seen)
        elif d_all is None:
            d_all = d.new_zeros(b, *d.shape[1:]).index_copy(0, ridx, d.detach())
            g_all = g.new_zeros(b, *g.shape[1:]).index_copy(0, ridx, g.detach())
            seen = seen.index_fill(0, ridx, True)
        else:
            d_all, g_all = d_all.index_copy(0, ridx, d.detach()), g_all.index_copy(0, ridx, g.detach())
            seen = seen.index_fill(0, ridx, True)
        if all_run:
            last_eq, last_in, last_rho = bt.lam_eq, bt.lam_in, bt.rho
            x, u, lam_eq, lam_in, rho = xr, ur, leq, lin_, rnew
            al_iters = al_iters + 1
            nsteps = nsteps + st
            small_exit, dres = se, dr
            fb, nf = fb | f1, nf | n1
        else:
            last_eq = last_eq.index_copy(0, ridx, bt.lam_eq)
            last_in = last_in.index_copy(0, ridx, bt.lam_in)
            last_rho = last_rho.index_copy(0, ridx, bt.rho)
            x, u = x.index_copy(0, ridx, xr), u.index_copy(0, ridx, ur)
            lam_eq, lam_in = lam_eq.index_copy(0, ridx, leq), lam_in.index_copy(0, ridx, lin_)
            rho = rho.index_copy(0, ridx, rnew)
            al_iters = al_iters.index_add(0, ridx, torch.ones_like(ridx))
            nsteps = nsteps.index_add(0, ridx, st)
            small_exit = small_exit.index_copy(0, ridx, se)
            dres = dres.index_copy(0, ridx, dr)
            fb = fb.index_copy(0, ridx, fb[ridx] | f1)
            nf = nf.index_copy(0, ridx, nf[ridx] | n1)
    with torch.no_grad():
        xd, ud = x.detach(), u.detach()
        pres = problem.violation_from(d_all, g_all) if bool(seen.all()) else problem.violation(xd, ud, obs)
        cost = problem.cost(xd, ud, theta.detach())
        converged = (pres <= cfg.tol_primal) & (dres <= cfg.tol_dual) & small_exit & ~nf
    new_state = SolverState(xd, ud, lam_eq.detach(), lam_in.detach(), rho.detach(), obs)
    info = SolveInfo(converged, pres, dres, al_iters, nsteps, rho.detach(), cost, fb, nf)
    return x, u, new_state, info, (last_eq.detach(), last_in.detach(), last_rho.detach(), al_iters > 0)


def shooting_kkt(problem: MPCProblem, x0: torch.Tensor, ref: torch.Tensor, u: torch.Tensor
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """First-order optimality of the controls ``u (B,T,nu)`` as a shooting problem (states = the rollout from
    ``x0 (B,nx)``; control bounds only). Returns ``(violation (B,), stationarity (B,))``: the largest bound violation
    and ``||u - clip(u - grad_u J, u_low, u_high)||_inf / (1 + max(||R (u - u_ref)||_inf, ||lam||_inf))``, the
    projected reduced gradient of the cost ``J(u) = C(rollout(u), u)`` (``ref``: ``theta (B,T,nx)`` or
    ``[theta | u_ref] (B,T,nx+nu)``), with the costates ``lam_{T-2} = -Q e_{T-1}``,
    ``lam_{t-1} = A_t^T lam_t - Q e_t`` by one backward pass. It is independent of the solver's multipliers and
    penalty: zero exactly at a KKT point of the problem, with the bounds' multipliers implied by the sign of the
    reduced gradient."""
    c = problem.consts(u)
    T = problem.T
    xr = problem.rollout(x0, u)
    _, A, Bu = problem.dynamics(xr, u)
    th, du = problem._split_ref(u, ref)
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
    bad = ~_finite_rows(pg, lam)
    if bool(bad.any()):
        stat = torch.where(bad, torch.full_like(stat, float("inf")), stat)
    return viol, stat


# ====================================================================== implicit gradients
class _ImplicitFn(torch.autograd.Function):
    """Identity on the solution in the forward; IFT of the last AL subproblem in the backward."""

    @staticmethod
    def forward(ctx, theta, x0, x, u, problem, last, obs, ref):
        ctx.problem, ctx.last, ctx.obs = problem, last, obs
        ctx.save_for_backward(ref, x, u)
        return x.clone(), u.clone()

    @staticmethod
    def backward(ctx, gx, gu):
        theta, x, u = ctx.saved_tensors  # theta: the cost's reference ([theta | u_ref] with a control reference)
        problem = ctx.problem
        lam_eq, lam_in, rho, ran = ctx.last
        nx = problem.nx
        gx = torch.zeros_like(x) if gx is None else gx
        gu = torch.zeros_like(u) if gu is None else gu
        with torch.no_grad():
            rhs = torch.cat([gx, gu], -1) * problem.consts(x).pin
            if fused.usable(problem, x, track_grad=False):
                v, cross, ok = fused.implicit_solve(problem, x, u, theta, lam_eq, lam_in, rho, ctx.obs, rhs)
            else:
                lin = problem.linearize(x, u, theta, lam_eq, lam_in, rho, ctx.obs)
                F = _factor(problem, lin.D, lin.L)
                v = linalg.solve(F, rhs)
                ok = F.ok & _finite_rows(v)
                # F(z, x0) = grad_z M; dz/dx0 = -H^-1 H_{z,x0}  ->  g_x0 = gx_0 - H_{x0,z} v
                cross = (lin.D0x.transpose(-1, -2) @ v[:, 0, :, None])[..., 0] \
                    + (lin.L0x.transpose(-1, -2) @ v[:, 1, :, None])[..., 0]
            good = ok & ran
            v = torch.where(good[:, None, None], v, torch.zeros_like(v))
            g_theta = v[..., :nx] @ problem.consts(x).Q
            g_x0 = None
            if ctx.needs_input_grad[1]:
                g_x0 = gx[:, 0] - torch.where(good[:, None], cross, torch.zeros_like(cross))
        return g_theta, g_x0, None, None, None, None, None, None


class _FinalImplicitFn(torch.autograd.Function):
    """IFT of the KKT conditions of the constrained problem at the returned iterate (Diff-MPC style), with the cost's
    Hessian (``hessian="gauss_newton"``) or the Lagrangian's (``"exact"``: :func:`deqmpc_gym.mpc.kkt.kkt_solve`)."""

    @staticmethod
    def forward(ctx, theta, x0, x, u, problem, lam_in_final, obs, ref=None, hessian="gauss_newton"):
        ctx.problem, ctx.lam_in, ctx.obs, ctx.hessian = problem, lam_in_final, obs, hessian
        ctx.save_for_backward(x, u, theta if ref is None else ref)
        return x.clone(), u.clone()

    @staticmethod
    def backward(ctx, gx, gu):
        x, u, ref = ctx.saved_tensors
        problem = ctx.problem
        nx = problem.nx
        gx = torch.zeros_like(x) if gx is None else gx
        gu = torch.zeros_like(u) if gu is None else gu
        with torch.no_grad():
            v, g_x0, _ = kkt.kkt_solve(problem, x, u, ctx.lam_in, ctx.obs, torch.cat([gx, gu], -1), ref=ref.detach(),
                                       hessian=ctx.hessian)
            g_theta = v[..., :nx] @ problem.consts(x).Q
        return g_theta, g_x0, None, None, None, None, None, None, None


def _check_hessian(cfg, hessian, gradient: str) -> str:
    """The backward's Hessian of a call: ``hessian`` or the config's; ConfigError for an unknown value or
    ``"exact"`` with a gradient it does not apply to."""
    hessian = cfg.hessian if hessian is None else hessian
    if hessian not in ("gauss_newton", "exact"):
        raise ConfigError(f"hessian must be 'gauss_newton' or 'exact', got {hessian!r}")
    if hessian == "exact" and gradient != "final_implicit":
        raise ConfigError(f"hessian='exact' applies to gradient='final_implicit' (the KKT system of the constrained "
                          f"problem), not to gradient={gradient!r}: 'implicit' differentiates the last AL subproblem "
                          "with fixed multipliers and penalty, 'unroll' the iterations themselves")
    return hessian


def _exit_residual(cfg, value) -> float:
    """The Newton-loop exit residual of a call: ``value`` (a number >= 0) or the config's default."""
    if value is None:
        return float(cfg.newton_exit_residual)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0.0:
        raise ConfigError(f"exit_residual must be a number >= 0 (or None for the config's), got {value!r}")
    return float(value)


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
            ``None``: a cold start, :func:`init_state` (with ``u_init`` and ``u_ref``).
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
            its penalty instead of growing it. For standalone cold solves a first penalty
            ``rho_init = 1e5`` converges 2-3x faster than the DEQ-MPC default 1 where the control weight is not
            tiny (see :class:`MPCConfig`).
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
    _check_inputs(problem, x0, theta)
    gradient = problem.config.gradient if gradient is None else gradient
    if gradient not in ("implicit", "unroll", "final_implicit"):
        raise ConfigError(f"gradient must be 'implicit', 'unroll' or 'final_implicit', got {gradient!r}")
    hessian = _check_hessian(problem.config, hessian, gradient)
    if not isinstance(iters, int) or iters < 0:
        raise ConfigError(f"iters must be an int >= 0, got {iters!r}")
    if output is None:
        output = "rollout" if stop_when_converged else "iterate"
    if output not in ("rollout", "iterate"):
        raise ConfigError(f"output must be 'rollout' or 'iterate', got {output!r}")
    cfg = problem.config
    exit_residual = _exit_residual(cfg, exit_residual)
    dt = cfg.dtype
    x0c, thc = x0.to(dt), theta.to(dt)
    b = x0.shape[0]
    uref = None if u_ref is None else _controls("u_ref", problem, u_ref, x0c).detach()
    cold_start = state is None
    if cold_start:
        state = init_state(problem, x0c.detach(), thc.detach(), u_init=u_init, u_ref=uref)
    else:
        _check_state(problem, state, b)
        state = SolverState(state.x.detach().to(x0c), state.u.detach().to(x0c), state.lam_eq.detach().to(x0c),
                            state.lam_ineq.detach().to(x0c), state.rho.detach().to(x0c), state.obstacle_idx)
        bad = ~_finite_rows(state.x, state.u, state.lam_eq, state.lam_ineq, state.rho)
        if bool(bad.any()):
            state = init_state(problem, x0c.detach(), thc.detach(), u_ref=uref).where(bad, state)
    # the cost's reference: waypoints, and the control reference when given ([theta | u_ref], MPCProblem.cost)
    ref = thc if uref is None else torch.cat([thc, uref], -1)
    needs_grad = torch.is_grad_enabled() and (x0.requires_grad or theta.requires_grad)
    track = needs_grad and gradient == "unroll"
    # standalone answers that are rollouts are tested as such (shooting_kkt; control bounds only)
    shooting = output == "rollout" and stop_when_converged and problem.box_only
    if track:
        if cold_start and u_init is None:  # the cold primal guess x = theta is part of the differentiated computation
            state = replace(state, x=thc)
        x, u, new_state, info, last = _al_iterations(problem, x0c, ref, state, iters, stop_at_rho_max, True,
                                                     stop_when_converged, exit_residual, shooting)
    else:
        with torch.no_grad():
            x, u, new_state, info, last = _al_iterations(problem, x0c.detach(), ref.detach(), state, iters,
                                                         stop_at_rho_max, False, stop_when_converged, exit_residual,
                                                         shooting)
        if needs_grad:
            if gradient == "implicit":
                x, u = _ImplicitFn.apply(thc, x0c, x, u, problem, last, new_state.obstacle_idx, ref.detach())
            else:
                xk = x
                if hessian == "exact" and output == "rollout":  # the second-order terms at the returned answer
                    with torch.no_grad():
                        xr = problem.rollout(x0c.detach(), u)
                        xk = torch.where(_finite_rows(xr)[:, None, None], xr, x)
                x, u = _FinalImplicitFn.apply(thc, x0c, xk, u, problem, new_state.lam_ineq, new_state.obstacle_idx,
                                              ref.detach(), hessian)
    if output == "rollout":
        x, info = _rollout_output(problem, x0c, ref.detach(), x, u, new_state.obstacle_idx, info, shooting)
    else:
        info = replace(info, rollout=torch.zeros_like(info.converged))
    return x, u, new_state, info


def _rollout_output(problem: MPCProblem, x0: torch.Tensor, ref: torch.Tensor, x: torch.Tensor, u: torch.Tensor,
                    obs, info: SolveInfo, shooting: bool) -> tuple[torch.Tensor, SolveInfo]:
    """``x`` replaced by the rollout of ``u`` from ``x0`` where it is finite (differentiable through the dynamics
    when ``u`` / ``x0`` carry a graph), with ``info``'s primal residual and cost of the rollout; with
    ``shooting`` also its convergence flag and dual residual (:func:`shooting_kkt`)."""
    xr = problem.rollout(x0, u)
    with torch.no_grad():
        ok = _finite_rows(xr.detach())
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
