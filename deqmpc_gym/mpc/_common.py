"""What the eager (:func:`~deqmpc_gym.mpc.solve`) and compiled (:class:`~deqmpc_gym.mpc.CompiledSolver`) paths of the
MPC solver share: the warm-start state and the per-sample status they return, the constants of the algorithm, the
checks of a call's inputs and options, the cold start, and the gradients (the backward of both paths, and which one
a call takes). The merit itself lives with the problem (:func:`deqmpc_gym.mpc.problem.phr_terms`).
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, NamedTuple

import numpy as np
import torch

from deqmpc_gym.errors import ConfigError, ShapeError
from deqmpc_gym.mpc import fused, kkt, linalg
from deqmpc_gym.mpc.config import COLD_STARTS
from deqmpc_gym.mpc.problem import MPCProblem

#: growth of the regularisation ``mu`` of a failed factorisation (``H + mu max|diag H| I``, ``mu`` from
#: ``config.reg_min``), at most three attempts.
REG_GROWTH = 1e3
#: the first line-search step lengths 1, 1/2, ..., 2^-(K-1) are tried in one batched merit call, with K as
#: large as keeps the stacked batch within this many knots (per-call overhead dominates below it).
BATCHED_TRIAL_KNOTS = 2048
#: the gradients a call may select (``gradient=``) and the Hessians of the ``"final_implicit"`` backward
GRADIENTS = ("implicit", "unroll", "final_implicit")
HESSIANS = ("gauss_newton", "exact")


_NUMPY_FLOATS = (torch.float64, torch.float32)


def finite_rows(*ts: torch.Tensor) -> torch.Tensor:
    """``(B,)`` bool: every entry of sample ``b`` of every ``t (B, ...)`` is finite. A finite per-sample sum
    proves it (one reduction per tensor instead of an elementwise test; ``v - v == 0`` is the cheapest finiteness
    test of the sums); only if some sum is not finite are the entries tested. CPU float tensors are first tested
    whole by numpy (one call per tensor instead of a few torch operations)."""
    b = ts[0].shape[0]
    if all(t.device.type == "cpu" and t.dtype in _NUMPY_FLOATS for t in ts):
        if all(np.isfinite(t.detach().numpy()).all() for t in ts):
            return torch.ones(b, dtype=torch.bool)
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
    """Warm-start state of the AL solver (pass it back into :func:`~deqmpc_gym.mpc.solve`).

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
        out: dict[str, Any] = {f.name: (None if getattr(self, f.name) is None else getattr(self, f.name).detach())
                               for f in fields(self)}
        return SolverState(**out)

    def index(self, mask_or_idx) -> SolverState:
        """The sub-batch selected by a ``(B,)`` bool mask or an index tensor/list."""
        out: dict[str, Any] = {f.name: (None if getattr(self, f.name) is None else getattr(self, f.name)[mask_or_idx])
                               for f in fields(self)}
        return SolverState(**out)

    def where(self, mask: torch.Tensor, other: SolverState) -> SolverState:
        """Per sample: ``self`` where ``mask (B,)`` is True, ``other`` elsewhere (e.g. reset a subset)."""
        out: dict[str, Any] = {}
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
            last_obs = problem.select_obstacles(xs[:, -1:])
            if last_obs is None:
                raise ConfigError("the state has obstacle sets (obstacle_idx) but the problem has no obstacles")
            obs = torch.cat([obs[:, 1:], last_obs], 1)
        return SolverState(xs, us, torch.zeros_like(self.lam_eq), torch.zeros_like(self.lam_ineq), rho, obs)


@dataclass
class SolveInfo:
    """Per-sample status of a :func:`~deqmpc_gym.mpc.solve` call (all ``(B,)``; the solver never raises on
    non-convergence).

    Attributes:
        converged: primal residual <= ``tol_primal``, stationarity <= ``tol_dual`` and the last Newton loop
            exited by its step test. For a rollout answer of a ``stop_when_converged`` solve (control bounds
            only): the returned controls' bound violation <= ``tol_primal`` and their projected reduced gradient
            (:func:`~deqmpc_gym.mpc.shooting_kkt`, reported as ``dual_residual``) <= ``tol_shooting`` -- a test of
            the returned answer itself, independent of the multipliers and penalty.
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
        start: ``(B,)`` int64, the start each sample's answer came from, in a multi-start cold call
            (``MPCConfig.starts > 1``, :mod:`deqmpc_gym.mpc.starts`); None in other calls.
        polished: ``(B,)`` bool, the samples whose answer comes from the shooting polish
            (``MPCConfig.polish_iters``, :mod:`deqmpc_gym.mpc.polish`); None in calls without it.
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
    start: torch.Tensor | None = None
    polished: torch.Tensor | None = None


class LastSubproblem(NamedTuple):
    """The multipliers and penalty of each sample's last AL subproblem (what the ``"implicit"`` gradient
    differentiates), all detached, and ``ran (B,)``: the sample ran at least one AL iteration in the call."""

    lam_eq: torch.Tensor
    lam_in: torch.Tensor
    rho: torch.Tensor
    ran: torch.Tensor


# ====================================================================== input checks
def check_inputs(problem: MPCProblem, x0, theta) -> None:
    """ConfigError / ShapeError unless ``problem`` is an :class:`MPCProblem`, ``x0 (B, nx)`` and ``theta (B, T, nx)``
    finite floating tensors on one device, ``B >= 1``."""
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
        bad = ~finite_rows(v.detach())
        if bool(bad.any()):
            raise ShapeError(f"{name} has non-finite values in samples {bad.nonzero()[:, 0].tolist()[:10]} "
                             f"(shape {tuple(v.shape)})")


def check_state(problem: MPCProblem, state: SolverState, b: int) -> None:
    """ShapeError unless ``state`` is a :class:`SolverState` of ``b`` samples of ``problem``."""
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


def check_gradient(cfg, gradient: str | None, allowed: tuple[str, ...] = GRADIENTS) -> str:
    """The gradient of a call: ``gradient`` or the config's; ConfigError for one outside ``allowed``."""
    gradient = cfg.gradient if gradient is None else gradient
    if gradient not in GRADIENTS:
        names = [f"'{g}'" for g in allowed]
        raise ConfigError(f"gradient must be {', '.join(names[:-1])} or {names[-1]}, got {gradient!r}")
    return gradient


def check_hessian(cfg, hessian: str | None, gradient: str) -> str:
    """The backward's Hessian of a call: ``hessian`` or the config's; ConfigError for an unknown value or
    ``"exact"`` with a gradient it does not apply to."""
    hessian = cfg.hessian if hessian is None else hessian
    if hessian not in HESSIANS:
        raise ConfigError(f"hessian must be 'gauss_newton' or 'exact', got {hessian!r}")
    if hessian == "exact" and gradient != "final_implicit":
        raise ConfigError(f"hessian='exact' applies to gradient='final_implicit' (the KKT system of the constrained "
                          f"problem), not to gradient={gradient!r}: 'implicit' differentiates the last AL subproblem "
                          "with fixed multipliers and penalty, 'unroll' the iterations themselves")
    return hessian


def check_iters(iters) -> int:
    """ConfigError unless ``iters`` is an int ``>= 0``."""
    if not isinstance(iters, int) or iters < 0:
        raise ConfigError(f"iters must be an int >= 0, got {iters!r}")
    return iters


def exit_residual_of(cfg, value) -> float:
    """The Newton-loop exit residual of a call: ``value`` (a number >= 0) or the config's default."""
    if value is None:
        return float(cfg.newton_exit_residual)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0.0:
        raise ConfigError(f"exit_residual must be a number >= 0 (or None for the config's), got {value!r}")
    return float(value)


def controls(name: str, problem: MPCProblem, v, x0: torch.Tensor) -> torch.Tensor:
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


# ====================================================================== cold start
def init_state(problem: MPCProblem, x0: torch.Tensor, theta: torch.Tensor, u_init: torch.Tensor | None = None,
               u_ref: torch.Tensor | None = None, cold_start: str | None = None) -> SolverState:
    """Cold start, multipliers 0, ``rho = problem.cold_rho``, obstacle sets = nearest obstacles of ``theta`` (all
    detached).

    Primal guess: without ``u_init``, ``u`` = the control reference ``u_ref`` (default: the system's nominal
    control) clipped to the bounds and ``x = theta`` with ``x[:, 0] = x0`` (``MPCConfig.cold_start = "theta"``) or
    ``x`` the rollout of ``u`` from ``x0`` (``"rollout"``); with ``u_init``, ``u = u_init`` clipped to the bounds
    and ``x`` its rollout from ``x0``. A rollout start is dynamically feasible; samples whose rollout is not
    finite start from ``x = theta``.

    Args:
        x0: ``(B, nx)`` initial states; theta: ``(B, T, nx)`` waypoints.
        u_init: ``(B, T, nu)`` initial control guess, or None.
        u_ref: ``(B, T, nu)`` control reference of the cost, or None (see :func:`~deqmpc_gym.mpc.solve`).
        cold_start: ``"theta"`` or ``"rollout"`` in place of ``problem.config.cold_start`` (None: the config's).
    """
    check_inputs(problem, x0, theta)
    kind = problem.config.cold_start if cold_start is None else cold_start
    if kind not in COLD_STARTS:
        raise ConfigError(f"cold_start must be one of {COLD_STARTS}, got {cold_start!r}")
    dt = problem.config.dtype
    x0 = x0.detach().to(dt)
    theta = theta.detach().to(dt)
    c = problem.consts(x0)
    b = x0.shape[0]
    x = theta.clone()
    x[:, 0] = x0
    if u_init is not None:
        u = controls("u_init", problem, u_init, x0).detach()
        u = torch.maximum(torch.minimum(u, c.u_high), c.u_low)
    else:
        unom = (torch.as_tensor(problem.system.nominal_control, dtype=dt, device=x0.device) if u_ref is None
                else controls("u_ref", problem, u_ref, x0).detach())
        u = torch.maximum(torch.minimum(unom, c.u_high), c.u_low).expand(b, problem.T, problem.nu).clone()
    if u_init is not None or kind == "rollout":
        with torch.no_grad():
            xr = problem.rollout(x0, u)
        fin = finite_rows(xr)
        x = torch.where(fin[:, None, None], xr, x)
    obs = problem.select_obstacles(theta)
    if problem.m_user is None:
        problem.ineq(x, u, obs, jac=False)
    lam_in = x.new_zeros(b, problem.T, problem.n_ineq)
    return SolverState(x, u, x.new_zeros(b, problem.T - 1, problem.nx), lam_in,
                       torch.full((b,), problem.cold_rho, dtype=dt, device=x0.device), obs)


# ====================================================================== gradients
def factor(problem: MPCProblem, D: torch.Tensor, L: torch.Tensor) -> linalg.Factor:
    """Factorise with the kind that suits this batch (``MPCProblem.linear_solver_kind``): a sub-batch of a few
    samples (an active-set redo, the last samples of a Newton loop) takes the dense factorisation even when the
    full batch takes the banded one."""
    return linalg.factor(D, L, problem.linear_solver_kind(D.shape[0]))


class ImplicitFn(torch.autograd.Function):
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
                F = factor(problem, lin.D, lin.L)
                v = linalg.solve(F, rhs)
                ok = F.ok & finite_rows(v)
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


class FinalImplicitFn(torch.autograd.Function):
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


def attach_gradient(problem: MPCProblem, gradient: str, hessian: str, x0: torch.Tensor, theta: torch.Tensor,
                    ref: torch.Tensor, x: torch.Tensor, u: torch.Tensor, last: LastSubproblem, lam_in: torch.Tensor,
                    obs: torch.Tensor | None, at_rollout: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """The answer ``(x (B,T,nx), u (B,T,nu))`` of a forward run without a graph, made differentiable w.r.t.
    ``theta (B,T,nx)`` and ``x0 (B,nx)`` by the backward of ``gradient`` (``"implicit"`` or ``"final_implicit"``).

    ``ref``: the cost's reference (``theta`` or ``[theta | u_ref]``); ``last``: the last AL subproblem (implicit);
    ``lam_in (B,T,mi)``: the returned inequality multipliers, whose positive rows are the active set
    (final-implicit); ``at_rollout``: with ``hessian="exact"`` the KKT system is taken at the rollout of ``u`` (where
    it is finite), the answer a rollout output returns."""
    if gradient == "implicit":
        return ImplicitFn.apply(theta, x0, x, u, problem, last, obs, ref.detach())
    xk = x
    if hessian == "exact" and at_rollout:  # the second-order terms at the returned answer
        with torch.no_grad():
            xr = problem.rollout(x0.detach(), u)
            xk = torch.where(finite_rows(xr)[:, None, None], xr, x)
    return FinalImplicitFn.apply(theta, x0, xk, u, problem, lam_in, obs, ref.detach(), hessian)
