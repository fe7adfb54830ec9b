"""The MPC problem as data (:class:`MPCProblem`) and its residuals, merit and Gauss-Newton model.

Problem (per sample, ``T`` knots ``t = 0..T-1``, state ``x_t (nx)``, control ``u_t (nu)``)::

    min  1/2 sum_t (x_t - theta_t)^T Q (x_t - theta_t) + 1/2 sum_t (u_t - u_ref_t)^T R (u_t - u_ref_t)
    s.t. x_0 = x_init                                  (eliminated exactly: x_0 is not a decision variable)
         d_t = x_{t+1} - f(x_t, u_t) = 0,             t = 0..T-2      (dynamics, the system's discrete map)
         u_t - u_high <= 0,  u_low - u_t <= 0,        t = 0..T-1      (physical control bounds)
         r^2 - ||p(x_t) - o_{t,j}||^2 <= 0,           t = 1..T-1, j < k (k nearest obstacles of knot t)
         h(x, u)_t <= 0                               (user constraints, separable over knots)

The inequalities of knot ``t`` are stacked as ``[box_hi (nu), box_lo (nu), obstacles (k), user (m)]``.
Obstacle rows of knot 0 only involve the fixed ``x_0``; they are kept as inactive dummies (residual -1).

AL merit (Powell-Hestenes-Rockafellar form for inequalities, ``s = lam + rho g``)::

    M(z) = C(z) + lam_eq^T d + rho/2 ||d||^2 + sum_i [ s_i > 0 ? lam_i g_i + rho/2 g_i^2 : -lam_i^2 / (2 rho) ]

which equals the paper's ``C + lam^T c + rho/2 ||c^+||^2`` with ``c^+`` keeping an inequality row when it is
violated or has a positive multiplier (``lam + rho g > 0``); it is C^1, so the line search is consistent with
the gradient. Gauss-Newton Hessian ``H = W + rho J_eq^T J_eq + rho J_act^T J_act`` (no constraint curvature).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from deqmpc_gym.errors import ConfigError, ShapeError
from deqmpc_gym.mpc.config import MPCConfig
from deqmpc_gym.systems.base import System
from deqmpc_gym.systems.obstacles import nearest_obstacles

Constraint = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def phr_equality(lam: torch.Tensor, d: torch.Tensor, rho: torch.Tensor,
                 half_rho: torch.Tensor | None = None) -> torch.Tensor:
    """The merit's term of equality rows, elementwise: ``(lam + rho/2 d) d`` (``rho`` broadcast to ``d``;
    ``half_rho``: ``0.5 * rho`` if the caller has it). The eager merit (:meth:`MPCProblem.merit_from`, batched
    tensors) and the compiled one (per-sample scalars) both take their terms from here."""
    hr = 0.5 * rho if half_rho is None else half_rho
    return (lam + hr * d) * d


def phr_inequality(lam: torch.Tensor, g: torch.Tensor, rho: torch.Tensor,
                   half_rho: torch.Tensor | None = None) -> torch.Tensor:
    """The merit's PHR term of inequality rows, elementwise: ``(lam + rho/2 g) g`` where ``s = lam + rho g > 0``,
    else ``-lam^2 / (2 rho)`` (``rho`` broadcast to ``g``; ``half_rho`` as :func:`phr_equality`)."""
    hr = 0.5 * rho if half_rho is None else half_rho
    s = lam + rho * g
    return torch.where(s > 0, (lam + hr * g) * g, lam * lam * (-0.5 / rho))


def _as_matrix(name: str, value, size: int, default) -> np.ndarray:
    v = np.asarray(default if value is None else (value.detach().cpu().numpy() if isinstance(value, torch.Tensor)
                                                   else value), dtype=np.float64)
    if v.shape == (size,):
        v = np.diag(v)
    if v.shape != (size, size):
        raise ShapeError(f"{name} must have shape ({size},) (diagonal) or ({size}, {size}), got {v.shape}")
    if not np.all(np.isfinite(v)):
        raise ShapeError(f"{name} must be finite, got {v.tolist()}")
    if not np.allclose(v, v.T):
        raise ConfigError(f"{name} must be symmetric")
    if np.linalg.eigvalsh(v).min() <= 0:
        raise ConfigError(f"{name} must be positive definite, got eigenvalues {np.linalg.eigvalsh(v).tolist()}")
    return v


def _as_vector(name: str, value, size: int, default) -> np.ndarray:
    v = np.asarray(default if value is None else (value.detach().cpu().numpy() if isinstance(value, torch.Tensor)
                                                   else value), dtype=np.float64)
    if v.shape == ():
        v = np.full(size, float(v))
    if v.shape != (size,):
        raise ShapeError(f"{name} must have shape ({size},), got {v.shape}")
    return v


def _read_only(a: np.ndarray) -> np.ndarray:
    """A view of ``a`` that cannot be written to."""
    v = a.view()
    v.flags.writeable = False
    return v


@dataclass
class _Consts:
    Q: torch.Tensor  # (nx, nx)
    R: torch.Tensor  # (nu, nu)
    W: torch.Tensor  # (n, n)
    u_low: torch.Tensor
    u_high: torch.Tensor
    centers: torch.Tensor | None
    G_box: torch.Tensor  # (2nu, n)
    pin: torch.Tensor  # (T, n) 0 on the x_0 entries, 1 elsewhere
    eye_n: torch.Tensor
    pin2: torch.Tensor  # (T, n, n) pin_i pin_j: pins the Hessian blocks
    unpin_diag: torch.Tensor  # (T, n, n) diag(1 - pin): unit diagonal on the pinned x_0 entries
    eye_x: torch.Tensor  # (n, n) identity on the state block, 0 on the control block
    w_diag: torch.Tensor | None  # (n,) diagonal of W when Q and R are diagonal (elementwise cost), else None
    q_half: torch.Tensor | None  # (nx,) diag(Q) / 2 when w_diag is set
    r_half: torch.Tensor | None  # (nu,) diag(R) / 2 when w_diag is set


@dataclass(slots=True)
class Linearization:
    """Quantities of one Gauss-Newton step at ``(x, u)`` (all batched over ``B``; built by
    :meth:`MPCProblem.linearize`)."""

    merit: torch.Tensor  # (B,) AL merit
    cost: torch.Tensor  # (B,) tracking cost
    grad: torch.Tensor  # (B,T,n) pinned merit gradient
    cgrad: torch.Tensor  # (B,T,n) pinned cost gradient
    D: torch.Tensor  # (B,T,n,n) pinned diagonal Hessian blocks
    L: torch.Tensor  # (B,T-1,n,n) pinned sub-diagonal Hessian blocks H[t+1, t]
    d: torch.Tensor  # (B,T-1,nx) dynamics defects
    g: torch.Tensor  # (B,T,mi) inequality residuals
    act: torch.Tensor  # (B,T,mi) bool active mask (lam + rho g > 0)
    fx: torch.Tensor  # (B,T-1,nx) the discrete map of knots 0..T-2
    A: torch.Tensor  # (B,T-1,nx,nx) its state Jacobian
    Bu: torch.Tensor  # (B,T-1,nx,nu) its control Jacobian
    G: torch.Tensor  # (B,T,mi,n) inequality Jacobian
    D0x: torch.Tensor  # (B,n,nx) unpinned coupling of x_0 with knot 0 (for d/dx0)
    L0x: torch.Tensor  # (B,n,nx) unpinned coupling of x_0 with knot 1 (for d/dx0)
    rho: torch.Tensor  # (B,) penalty
    s: torch.Tensor  # (B,T,mi) lam_in + rho g
    mu_max: torch.Tensor  # (B,) largest absolute first-order multiplier


class MPCProblem:
    """Data of a batched MPC problem (no solving; see :func:`deqmpc_gym.mpc.solve`).

    Args:
        system: a :class:`~deqmpc_gym.systems.System` (dynamics ``x_{t+1} = system.step(x_t, u_t)``).
        config: :class:`MPCConfig` (horizon ``T``, AL settings).
        Q: ``(nx,)`` diagonal or ``(nx, nx)`` SPD state weight (default ``system.Q_diag``).
        R: ``(nu,)`` diagonal or ``(nu, nu)`` SPD control weight (default ``system.R_diag``) of ``u - u_ref``
            (``u_ref``: per call, :func:`~deqmpc_gym.mpc.solve`; default 0).
        u_low, u_high: ``(nu,)`` control bounds in physical units (default the system's); ``u_low <= u_high``.
        obstacle_centers: ``(K, 3)`` sphere centres [m] (e.g. ``OBSTACLE_CENTERS``), needs
            ``system.position_slice``; obstacle_radius: sphere radius [m].
        constraints: callables ``h(x (B,T,nx), u (B,T,nu)) -> (B,T,m)``, feasible when ``<= 0``; row ``t`` may
            only depend on knot ``t`` (Jacobians are taken per knot by autograd).
        device: device of the cached constant tensors (they are moved to the inputs' device on demand).
    """

    def __init__(self, system: System, config: MPCConfig = MPCConfig(), *, Q=None, R=None, u_low=None,
                 u_high=None, obstacle_centers=None, obstacle_radius: float | None = None,
                 constraints: Sequence[Constraint] = (), device=None) -> None:
        if not isinstance(system, System):
            raise ConfigError(f"system must be a deqmpc_gym.systems.System instance, got {type(system).__name__}")
        if not isinstance(config, MPCConfig):
            raise ConfigError(f"config must be an MPCConfig, got {type(config).__name__}")
        self.system, self.config = system, config
        self.nx, self.nu, self.T = system.nx, system.nu, config.horizon
        self.n = self.nx + self.nu
        self._Q = _as_matrix("Q", Q, self.nx, system.Q_diag)
        self._R = _as_matrix("R", R, self.nu, system.R_diag)
        lo = _as_vector("u_low", u_low, self.nu, system.u_low)
        hi = _as_vector("u_high", u_high, self.nu, system.u_high)
        if not (np.all(np.isfinite(lo)) and np.all(np.isfinite(hi))):
            raise ConfigError(f"u_low and u_high must be finite, got u_low={lo.tolist()} u_high={hi.tolist()}")
        if np.any(lo > hi):
            raise ConfigError(f"u_low must be <= u_high elementwise, got u_low={lo.tolist()} u_high={hi.tolist()}")
        self._u_low, self._u_high = lo, hi
        self._centers = None
        self.obstacle_radius = None
        self.k = 0
        if obstacle_centers is not None:
            c = np.asarray(obstacle_centers.detach().cpu() if isinstance(obstacle_centers, torch.Tensor)
                           else obstacle_centers, dtype=np.float64)
            if c.ndim != 2 or c.shape[1] != 3 or c.shape[0] == 0:
                raise ShapeError(f"obstacle_centers must have shape (K, 3) with K >= 1, got {c.shape}")
            if system.position_slice is None:
                raise ConfigError(f"system {system.name!r} has no position_slice; obstacles need a 3-D position")
            if obstacle_radius is None or not float(obstacle_radius) > 0:
                raise ConfigError(f"obstacle_radius must be a positive number, got {obstacle_radius!r}")
            self._centers, self.obstacle_radius = np.array(c, copy=True), float(obstacle_radius)
            self.k = min(config.n_obstacle_constraints, c.shape[0])
        self.constraints = tuple(constraints)
        for h in self.constraints:
            if not callable(h):
                raise ConfigError(f"constraints must be callables h(x, u) -> (B, T, m), got {type(h).__name__}")
        self.m_user: int | None = 0 if not self.constraints else None
        #: only the control bounds constrain the problem (G^T G is diagonal; the solver takes elementwise paths)
        self.box_only = self.k == 0 and not self.constraints
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self._cache: dict[tuple[torch.device, torch.dtype], _Consts] = {}

    def linear_solver_kind(self, batch: int) -> str:
        """``"dense"`` or ``"banded"`` factorisation of the Gauss-Newton Hessian for a batch of ``batch`` problems
        (``config.linear_solver``; ``"auto"`` compares ``batch * (T n)**3`` with ``config.dense_max_work``)."""
        cfg = self.config
        if cfg.linear_solver != "auto":
            return cfg.linear_solver
        size = self.T * self.n
        return "dense" if batch * size ** 3 <= cfg.dense_max_work or (batch == 1 and size <= 400) else "banded"

    def trial_dynamics(self, batch: int) -> bool:
        """Whether the solver's line search evaluates the dynamics' Jacobians with the full-step trial (reused as
        the next linearisation when the step is accepted). Not when the Jacobians of ``batch`` problems leave the
        system's numpy fast path that its step keeps: one Jacobian evaluation then costs several merit
        evaluations (the rigid bodies at ``batch (T - 1) > numpy_jacobian_max_batch``)."""
        s = self.system
        return not (s.numpy_fast_path and batch * (self.T - 1) > s.numpy_jacobian_max_batch)

    # ------------------------------------------------------------------ constants
    @property
    def Q(self) -> np.ndarray:
        """``(nx, nx)`` state weight (read-only)."""
        return _read_only(self._Q)

    @property
    def R(self) -> np.ndarray:
        """``(nu, nu)`` control weight (read-only)."""
        return _read_only(self._R)

    @property
    def cold_rho(self) -> float:
        """The first penalty of a cold start: ``config.rho_init``, capped by ``config.rho_init_r_ratio`` times the
        smallest eigenvalue of R (never below 1) when that ratio is set (see :class:`MPCConfig`)."""
        cfg = self.config
        if cfg.rho_init_r_ratio <= 0:
            return float(cfg.rho_init)
        r_min = float(np.linalg.eigvalsh(self._R).min())
        return float(min(cfg.rho_init, max(1.0, cfg.rho_init_r_ratio * r_min)))

    @property
    def u_low(self) -> np.ndarray:
        """``(nu,)`` lower control bounds (read-only)."""
        return _read_only(self._u_low)

    @property
    def u_high(self) -> np.ndarray:
        """``(nu,)`` upper control bounds (read-only)."""
        return _read_only(self._u_high)

    @property
    def n_ineq(self) -> int:
        """Inequality rows per knot ``2 nu + k + m_user`` (``m_user`` is known after the first evaluation)."""
        return 2 * self.nu + self.k + (self.m_user or 0)

    def consts(self, like: torch.Tensor) -> _Consts:
        """Constant tensors on ``like``'s device/dtype (cached)."""
        key = (like.device, like.dtype)
        c = self._cache.get(key)
        if c is None:
            kw: dict[str, Any] = {"device": like.device, "dtype": like.dtype}
            Q, R = torch.as_tensor(self._Q, **kw), torch.as_tensor(self._R, **kw)
            W = torch.block_diag(Q, R)
            G_box = torch.zeros(2 * self.nu, self.n, **kw)
            eye_u = torch.eye(self.nu, **kw)
            G_box[: self.nu, self.nx:] = eye_u
            G_box[self.nu:, self.nx:] = -eye_u
            pin = torch.ones(self.T, self.n, **kw)
            pin[0, : self.nx] = 0.0
            eye_x = torch.zeros(self.n, self.n, **kw)
            eye_x[: self.nx, : self.nx] = torch.eye(self.nx, **kw)
            w_diag = torch.diagonal(W).clone() if bool((W == torch.diag(torch.diagonal(W))).all()) else None
            c = _Consts(Q, R, W, torch.as_tensor(self._u_low, **kw), torch.as_tensor(self._u_high, **kw),
                        None if self._centers is None else torch.as_tensor(self._centers, **kw), G_box, pin,
                        torch.eye(self.n, **kw), pin[:, :, None] * pin[:, None, :], torch.diag_embed(1.0 - pin),
                        eye_x, w_diag, *((None, None) if w_diag is None else
                                         (0.5 * w_diag[: self.nx], 0.5 * w_diag[self.nx:])))
            self._cache[key] = c
        return c

    # ------------------------------------------------------------------ obstacles
    def select_obstacles(self, x: torch.Tensor) -> torch.Tensor | None:
        """Indices ``(B, T', k)`` of the ``k`` obstacles nearest to ``system.position(x)`` for ``x: (B, T', nx)``."""
        if self.k == 0:
            return None
        centers, _, _, _ = self.obstacle_geometry(x)
        return nearest_obstacles(self.system.position(x.detach()), centers, self.k)

    def obstacle_geometry(self, like: torch.Tensor) -> tuple[torch.Tensor, float, int, int]:
        """``(centers (K, 3) [m], radius [m], a0, a1)`` of a problem with obstacles: the sphere centres (on
        ``like``'s device/dtype), their radius and the position slice ``x[..., a0:a1]`` of the state. Raises
        :class:`~deqmpc_gym.errors.ConfigError` if the problem has no obstacles."""
        centers, ps = self.consts(like).centers, self.system.position_slice
        if centers is None or self.obstacle_radius is None or ps is None:
            raise ConfigError("this MPC problem has no obstacles (obstacle_centers was not given)")
        return centers, self.obstacle_radius, ps[0], ps[1]

    # ------------------------------------------------------------------ residuals
    def ineq(self, x: torch.Tensor, u: torch.Tensor, obs_idx: torch.Tensor | None, jac: bool):
        """Inequality residuals ``g (B,T,mi)`` (feasible ``<= 0``) and, if ``jac``, Jacobians ``G (B,T,mi,n)``."""
        c = self.consts(x)
        b, t = x.shape[:2]
        parts = [u - c.u_high, c.u_low - u]
        jparts = [c.G_box.expand(b, t, 2 * self.nu, self.n)] if jac else []
        if self.k:
            if obs_idx is None:
                raise ConfigError("obs_idx (select_obstacles) is required for a problem with obstacles")
            centers, radius, a0, a1 = self.obstacle_geometry(x)
            p = x[..., a0:a1]
            oc = centers[obs_idx]  # (B,T,k,3)
            diff = p[:, :, None, :] - oc
            go = radius ** 2 - (diff * diff).sum(-1)
            knot0 = torch.zeros(t, 1, dtype=x.dtype, device=x.device)
            knot0[0] = 1.0
            go = go * (1.0 - knot0) - knot0  # knot 0: inactive dummy rows (x_0 is fixed)
            parts.append(go)
            if jac:
                Go = x.new_zeros(b, t, self.k, self.n)
                Go[:, :, :, a0:a1] = -2.0 * diff * (1.0 - knot0)[None, :, :, None]
                jparts.append(Go)
        if self.constraints:
            hs, hj = self._user(x, u, jac)
            parts.append(hs)
            if jac:
                jparts.append(hj)
        g = torch.cat(parts, -1)
        if not jac:
            return g, None
        return g, (jparts[0] if len(jparts) == 1 else torch.cat(jparts, -2))  # box rows only: the constant view

    def _user(self, x: torch.Tensor, u: torch.Tensor, jac: bool):
        create = torch.is_grad_enabled() and (x.requires_grad or u.requires_grad)
        b, t = x.shape[:2]
        values: list[torch.Tensor] = []
        jacs: list[torch.Tensor] = []
        for h in self.constraints:
            with torch.enable_grad():
                xr = x if create else x.detach().requires_grad_(jac)
                ur = u if create else u.detach().requires_grad_(jac)
                v = h(xr, ur)
                if not isinstance(v, torch.Tensor) or v.dim() != 3 or v.shape[:2] != (b, t):
                    raise ShapeError(f"constraint {getattr(h, '__name__', h)!r} must return (B, T, m) = ({b}, {t}, m),"
                                     f" got {tuple(getattr(v, 'shape', ()))}")
                rows = []
                if jac:
                    for j in range(v.shape[-1]):
                        gx, gu = torch.autograd.grad(v[..., j].sum(), (xr, ur), create_graph=create,
                                                     retain_graph=True, allow_unused=True)
                        gx = torch.zeros_like(x) if gx is None else gx
                        gu = torch.zeros_like(u) if gu is None else gu
                        rows.append(torch.cat([gx, gu], -1))
            values.append(v if create else v.detach())
            if jac:
                jacs.append(torch.stack(rows, -2))
        hs = torch.cat(values, -1)
        if self.m_user is None:
            self.m_user = hs.shape[-1]
        return hs, (torch.cat(jacs, -2) if jac else None)

    def split_ref(self, u: torch.Tensor, theta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(theta (B,T,nx), u - u_ref (B,T,nu))`` of a reference ``theta``: ``(B,T,nx)`` waypoints (``u_ref = 0``)
        or ``(B,T,nx+nu)`` waypoints and control reference ``[theta | u_ref]``."""
        if theta.shape[-1] == self.nx:
            return theta, u
        return theta[..., :self.nx], u - theta[..., self.nx:]

    def cost(self, x: torch.Tensor, u: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
        """Tracking cost ``(B,)``: ``1/2 sum_t (x_t-theta_t)^T Q (x_t-theta_t) + 1/2 sum_t (u_t-u_ref_t)^T R
        (u_t-u_ref_t)``; ``theta``: ``(B,T,nx)`` waypoints (``u_ref = 0``) or ``(B,T,nx+nu)`` ``[theta | u_ref]``."""
        c = self.consts(x)
        th, u = self.split_ref(u, theta)
        e = x - th
        if c.q_half is not None and c.r_half is not None:  # diagonal weights: elementwise (fewer small kernels)
            return (e * e * c.q_half).sum((1, 2)) + (u * u * c.r_half).sum((1, 2))
        return 0.5 * ((e @ c.Q) * e).sum((1, 2)) + 0.5 * ((u @ c.R) * u).sum((1, 2))

    def rollout(self, x0: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        """States ``(B, T, nx)`` of applying the controls ``u (B, T, nu)`` from ``x0 (B, nx)``: ``x_0 = x0``,
        ``x_{t+1} = f(x_t, u_t)`` (``u_{T-1}`` drives nothing). Differentiable w.r.t. ``x0`` and ``u``."""
        xs = [x0]
        for t in range(self.T - 1):
            xs.append(self.system.step(xs[-1], u[:, t]))
        return torch.stack(xs, 1)

    def defects(self, x: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        """Dynamics defects ``d_t = x_{t+1} - f(x_t, u_t)``, ``(B, T-1, nx)``."""
        return x[:, 1:] - self.system.step(x[:, :-1], u[:, :-1])

    def merit(self, x, u, theta, lam_eq, lam_in, rho, obs_idx) -> torch.Tensor:
        """AL merit ``M (B,)`` (see the module docstring); ``rho: (B,)``."""
        return self.merit_parts(x, u, theta, lam_eq, lam_in, rho, obs_idx)[0]

    def merit_parts(self, x, u, theta, lam_eq, lam_in, rho, obs_idx):
        """``(M (B,), d (B,T-1,nx), g (B,T,mi))``: the merit with the defects and inequality residuals it used."""
        d = self.defects(x, u)
        g, _ = self.ineq(x, u, obs_idx, jac=False)
        return self.merit_from(self.cost(x, u, theta), d, g, lam_eq, lam_in, rho), d, g

    @staticmethod
    def merit_from(cost: torch.Tensor, d: torch.Tensor, g: torch.Tensor, lam_eq: torch.Tensor, lam_in: torch.Tensor,
                   rho: torch.Tensor) -> torch.Tensor:
        """The merit ``M (B,)`` from the cost ``(B,)``, defects ``d (B,T-1,nx)``, inequality residuals ``g (B,T,mi)``,
        multipliers of the same shapes and the penalty ``rho (B,)`` (:func:`phr_equality`, :func:`phr_inequality`)."""
        r = rho.view(-1, 1, 1)
        hr = 0.5 * r
        term = phr_inequality(lam_in, g, r, hr)
        return cost + phr_equality(lam_eq, d, r, hr).sum((1, 2)) + term.sum((1, 2))

    def violation(self, x: torch.Tensor, u: torch.Tensor, obs_idx) -> torch.Tensor:
        """``(B,)`` max(|dynamics defect|, max(inequality residual, 0))."""
        g, _ = self.ineq(x, u, obs_idx, jac=False)
        return self.violation_from(self.defects(x, u), g)

    @staticmethod
    def violation_from(d: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        """``(B,)`` max(|d|, max(g, 0)) from defects ``d (B,T-1,nx)`` and inequality residuals ``g (B,T,mi)``."""
        return torch.maximum(d.abs().amax((1, 2)), g.clamp_min(0).amax((1, 2)))

    # ------------------------------------------------------------------ Gauss-Newton model
    def dynamics(self, x: torch.Tensor, u: torch.Tensor):
        """``(f (B,T-1,nx), A (B,T-1,nx,nx), Bu (B,T-1,nx,nu))``: the discrete map of knots ``0..T-2`` and its
        Jacobians at ``(x (B,T,nx), u (B,T,nu))``."""
        b, t, nx, nu = x.shape[0], self.T, self.nx, self.nu
        fx, A, Bu = self.system.step_and_jacobians(x[:, :-1].reshape(-1, nx), u[:, :-1].reshape(-1, nu))
        return fx.reshape(b, t - 1, nx), A.reshape(b, t - 1, nx, nx), Bu.reshape(b, t - 1, nx, nu)

    # Products with the inequality Jacobian G (B,T,mi,n). With the control bounds alone (box_only) G is the constant
    # [I; -I] on the controls and they are elementwise: batched products of tiny matrices cost 10-90 us each on a
    # CPU at B T = 1000, several times the elementwise operations.
    def ineq_jac_t(self, G: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """``G^T v (B,T,n)`` for ``v (B,T,mi)``."""
        if self.box_only:
            nu = self.nu
            w = v[..., :nu] - v[..., nu:]
            return torch.cat([w.new_zeros(*w.shape[:-1], self.nx), w], -1)
        return (G.transpose(-1, -2) @ v[..., None])[..., 0]

    def ineq_jac(self, G: torch.Tensor, dz: torch.Tensor) -> torch.Tensor:
        """``G dz (B,T,mi)`` for ``dz (B,T,n)``."""
        if self.box_only:
            du = dz[..., self.nx:]
            return torch.cat([du, -du], -1)
        return (G @ dz[..., None])[..., 0]

    def ineq_gram(self, G: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """``G_r^T G_r (B,T,n,n)`` over the rows selected by ``rows (B,T,mi) bool`` (a new tensor)."""
        if self.box_only:  # diagonal on the controls: selected upper + selected lower rows
            b, t = rows.shape[:2]
            out = G.new_zeros(b, t, self.n, self.n)
            rf = rows.to(G.dtype)
            out.diagonal(dim1=-2, dim2=-1)[..., self.nx:] += rf[..., :self.nu] + rf[..., self.nu:]
            return out
        Gr = G * rows[..., None].to(G.dtype)
        return Gr.transpose(-1, -2) @ Gr

    def _lagrangian_grad(self, x, u, theta, mu, mu_in, ABt, G):
        """Unpinned ``(grad (B,T,n), cgrad (B,T,n))``: the gradient of ``C + mu^T d + mu_in^T g`` and of ``C``
        alone, for multipliers ``mu (B,T-1,nx)``, ``mu_in (B,T,mi)``, ``ABt = [A B]^T (B,T-1,n,nx)``,
        ``G (B,T,mi,n)``."""
        c = self.consts(x)
        theta, u = self.split_ref(u, theta)
        if c.w_diag is not None:
            cgrad = torch.cat([x - theta, u], -1) * c.w_diag
        else:
            cgrad = torch.cat([(x - theta) @ c.Q, u @ c.R], -1)
        # dynamics part: -[A B]^T mu_t on knot t, +mu_t on the state of knot t+1
        gdyn = x.new_zeros(x.shape[0], self.T, self.n)
        gdyn[:, :-1] = -(ABt @ mu[..., None])[..., 0]
        gdyn[:, 1:, :self.nx] += mu
        return cgrad + gdyn + self.ineq_jac_t(G, mu_in), cgrad

    def lagrangian_curvature(self, x: torch.Tensor, u: torch.Tensor, mu: torch.Tensor, mu_in: torch.Tensor,
                             obs_idx) -> torch.Tensor:
        """Second-order terms of the Lagrangian ``L = C + mu^T d + mu_in^T g`` beyond the cost's ``W``: the
        per-knot blocks ``(B, T, n, n)`` (unpinned; ``x_0`` rows included) of ``-sum_t nabla^2 (mu_t^T f(x_t,
        u_t))`` (the dynamics rows ``d_t = x_{t+1} - f(x_t, u_t)``, multipliers ``mu (B,T-1,nx)``) plus ``sum_i
        mu_in_i nabla^2 g_i`` (``mu_in (B,T,mi)``: obstacle rows ``r^2 - |p - o|^2`` give ``-2 mu_in I`` on the
        position block, user constraints their autograd Hessians; the control bounds are linear). Every term is
        separable over knots, so the Lagrangian Hessian is ``W`` plus these blocks on the block diagonal.

        The dynamics' Hessians are taken by ``nx + nu`` Hessian-vector products through autograd of
        ``system.step`` over all ``B (T-1)`` knots at once (the gradient of ``sum mu_t^T f`` with a graph, then one
        backward pass per coordinate), so any differentiable :class:`~deqmpc_gym.systems.System` works."""
        b, T, nx, nu, n = x.shape[0], self.T, self.nx, self.nu, self.n
        out = x.new_zeros(b, T, n, n)
        with torch.enable_grad():
            z = torch.cat([x[:, :-1], u[:, :-1]], -1).detach().reshape(-1, n).requires_grad_(True)
            f = self.system.step(z[:, :nx], z[:, nx:])
            (gz,) = torch.autograd.grad((f * mu.detach().reshape(-1, nx)).sum(), z, create_graph=True)
            hess = torch.zeros(n, *z.shape, dtype=z.dtype, device=z.device)
            if gz.requires_grad:  # (an affine map has no second-order terms)
                # the n products with the unit vectors in one vectorised backward pass; one pass per product where
                # an operation of the system has no batching rule
                eye = torch.eye(n, dtype=z.dtype, device=z.device)[:, None, :].expand(n, *z.shape)
                try:
                    (h,) = torch.autograd.grad(gz, z, eye, retain_graph=True, allow_unused=True, is_grads_batched=True)
                    hess = hess if h is None else h
                except RuntimeError:
                    for k in range(n):
                        (hk,) = torch.autograd.grad(gz[:, k].sum(), z, retain_graph=True, allow_unused=True)
                        if hk is not None:
                            hess[k] = hk
        out[:, :-1] -= hess.detach().transpose(0, 1).reshape(b, T - 1, n, n)
        if self.k:
            _, _, a0, a1 = self.obstacle_geometry(x)
            w = -2.0 * mu_in[..., 2 * nu:2 * nu + self.k].sum(-1)  # (B,T); knot 0's dummy rows have no multiplier
            w = torch.cat([torch.zeros_like(w[:, :1]), w[:, 1:]], 1)
            idx = torch.arange(a0, a1, device=x.device)
            out[:, :, idx, idx] += w[..., None]
        if self.constraints:
            m0 = 2 * nu + self.k
            nu_user = mu_in[..., m0:].detach()
            with torch.enable_grad():
                xr, ur = x.detach().requires_grad_(True), u.detach().requires_grad_(True)
                hs = torch.cat([h(xr, ur) for h in self.constraints], -1)
                if not hs.requires_grad:  # constant constraints: no curvature
                    return out
                gx, gu = torch.autograd.grad((hs * nu_user).sum(), (xr, ur), create_graph=True, allow_unused=True)
                gx = torch.zeros_like(xr) if gx is None else gx
                gu = torch.zeros_like(ur) if gu is None else gu
                gz = torch.cat([gx, gu], -1)  # (B,T,n)
                for k in range(n):
                    if not gz.requires_grad:
                        break
                    hx, hu = torch.autograd.grad(gz[..., k].sum(), (xr, ur), retain_graph=True, allow_unused=True)
                    hx = torch.zeros_like(xr) if hx is None else hx
                    hu = torch.zeros_like(ur) if hu is None else hu
                    out[:, :, k] += torch.cat([hx, hu], -1).detach()
        return out

    def stationarity(self, x, u, theta, lam_eq, lam_in, obs_idx, dyn=None) -> torch.Tensor:
        """KKT stationarity ``(B,)`` of ``(x (B,T,nx), u (B,T,nu))`` with multipliers ``lam_eq (B,T-1,nx)``,
        ``lam_in (B,T,mi)``: ``||grad_z L||_inf / (1 + max(||grad_z C||_inf, ||lam||_inf))`` over the free
        variables (``x_0`` excluded), ``L = C + lam_eq^T d + lam_in^T g``. After an AL iteration with the dual
        update ``lam <- lam + rho c`` this is the iteration's subproblem stationarity at its returned iterate, the
        measure :class:`~deqmpc_gym.mpc.SolveInfo` reports as ``dual_residual``. ``dyn``: :meth:`dynamics` at
        ``(x, u)`` if known."""
        _, A, Bu = self.dynamics(x, u) if dyn is None else dyn
        _, G = self.ineq(x, u, obs_idx, jac=True)
        grad, cgrad = self._lagrangian_grad(x, u, theta, lam_eq, lam_in, torch.cat([A, Bu], -1).transpose(-1, -2), G)
        pin = self.consts(x).pin
        return self.relative_stationarity(grad * pin, cgrad * pin, self._max_multiplier(lam_eq, lam_in))

    @staticmethod
    def _max_multiplier(mu: torch.Tensor, mu_in: torch.Tensor) -> torch.Tensor:
        """``(B,)`` largest absolute multiplier of ``mu (B,T-1,nx)`` and ``mu_in (B,T,mi)``."""
        return torch.maximum(mu.abs().amax((1, 2)), mu_in.abs().amax((1, 2)))

    @staticmethod
    def relative_stationarity(grad: torch.Tensor, cgrad: torch.Tensor, mult_max: torch.Tensor) -> torch.Tensor:
        """``(B,)`` ``||grad||_inf / (1 + max(||cgrad||_inf, mult_max))`` for the pinned Lagrangian (or merit)
        gradient ``grad (B,T,n)``, the pinned cost gradient ``cgrad (B,T,n)`` and the largest multiplier
        ``mult_max (B,)``: the scaled stationarity that :class:`~deqmpc_gym.mpc.SolveInfo` reports."""
        return grad.abs().amax((1, 2)) / (1.0 + torch.maximum(cgrad.abs().amax((1, 2)), mult_max))

    def linearize(self, x, u, theta, lam_eq, lam_in, rho, obs_idx, dyn=None) -> Linearization:
        """Merit, pinned gradient and pinned Gauss-Newton Hessian blocks at ``(x (B,T,nx), u (B,T,nu))``;
        ``dyn``: :meth:`dynamics` at the same point if already known (e.g. from a line-search trial)."""
        c = self.consts(x)
        b, t, nx, n = x.shape[0], self.T, self.nx, self.n
        fx, A, Bu = self.dynamics(x, u) if dyn is None else dyn
        d = x[:, 1:] - fx
        g, G = self.ineq(x, u, obs_idx, jac=True)
        r = rho.view(-1, 1, 1)
        cost = self.cost(x, u, theta)
        merit = self.merit_from(cost, d, g, lam_eq, lam_in, rho)
        mu = lam_eq + r * d  # (B,T-1,nx)
        s = lam_in + r * g
        act = s > 0
        mu_in = s.clamp_min(0.0)
        AB = torch.cat([A, Bu], -1)  # (B,T-1,nx,n)
        ABt = AB.transpose(-1, -2)
        grad, cgrad = self._lagrangian_grad(x, u, theta, mu, mu_in, ABt, G)
        r4 = rho.view(-1, 1, 1, 1)
        # penalty curvature: active inequalities, [A B]^T [A B] on knot t and the state identity on knot t+1
        curv = self.ineq_gram(G, act)
        curv[:, :-1] += ABt @ AB
        curv[:, 1:] += c.eye_x
        D = c.W + r4 * curv
        L = x.new_zeros(b, t - 1, n, n)  # H[t+1, t]
        L[:, :, :nx] = -r4 * AB
        pin = c.pin
        return Linearization(merit=merit, cost=cost, grad=grad * pin, cgrad=cgrad * pin,
                             D=D * c.pin2 + c.unpin_diag, L=L * pin[:-1, None, :], d=d, g=g, act=act, fx=fx, A=A,
                             Bu=Bu, G=G, D0x=D[:, 0, :, :nx], L0x=L[:, 0, :, :nx], rho=rho, s=s,
                             mu_max=self._max_multiplier(mu, mu_in))
