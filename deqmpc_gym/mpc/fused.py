"""The fused Gauss-Newton loop: the eager Newton loop of :mod:`deqmpc_gym.mpc.solver` compiled, as one call per AL
iteration (:func:`newton_loop`) or, for calls with a fixed number of AL iterations, one call for all of them with
their dual and penalty updates (:func:`al_iterations`).

:mod:`deqmpc_gym.mpc.newton_kernel` holds the per-sample loop; it is appended to the system's generated dynamics
module and compiled with numba (:func:`deqmpc_gym.systems.kernels.load_module`), once per system and machine.
The solver takes this path for calls that need no autograd graph on float64 CPU tensors (the forward of the
implicit and final-implicit gradients, streaming ``act()``, and the implicit gradient's linear solve in the
backward: :func:`implicit_solve`), when compiled kernels are on and the problem has no
user constraints (their Jacobians come from autograd); otherwise, and where compiling fails (one warning), the
batched torch loop runs. Both are the same algorithm: answers agree to round-off.
"""

from __future__ import annotations

import hashlib
import warnings
from pathlib import Path
from types import SimpleNamespace
from typing import Any, NamedTuple

import numpy as np
import torch

from deqmpc_gym.mpc.problem import MPCProblem
from deqmpc_gym.systems import kernels

#: what the fused Newton loop returns: ``(x, u, steps, small_exit, dual_residual, fallback, nonfinite, d, g)``
NewtonArrays = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                     torch.Tensor, torch.Tensor]

_SENTINEL = "# --- kernel source: everything below this line is appended to the generated dynamics module ---\n"
_MODULES: dict[Any, Any] = {}


def _source() -> str:
    """The kernel source appended to a system's generated module, stamped with a digest of the kernels it imports
    (:mod:`deqmpc_gym.mpc.linalg_kernels`): numba's disk cache tracks the source of the module it compiles, not
    of the functions that module calls, so a change there must change the module's name."""
    here = Path(__file__)
    text = here.with_name("newton_kernel.py").read_text()
    stamp = hashlib.sha256(here.with_name("linalg_kernels.py").read_bytes()).hexdigest()[:16]
    return f"\n\n# linalg_kernels {stamp}\n" + text.split(_SENTINEL, 1)[1]


def _module(problem: MPCProblem) -> Any:
    """The compiled kernel module of ``problem.system`` (``al_loop``, ``newton_loop``, ``implicit_solve``,
    ``shooting_kkt``; None if it cannot be built; warned once)."""
    key = kernels.system_key(problem.system)
    if key in _MODULES:
        return _MODULES[key]
    mod = None
    if kernels.kernels_for(problem.system) is not None:  # the dynamics compile and pass their check
        try:
            try:
                mod = _build(problem, fresh=False)
            except (ImportError, OSError, EOFError, AttributeError, TypeError):  # e.g. a stale numba cache
                mod = _build(problem, fresh=True)
        except Exception as exc:  # noqa: BLE001 -- any failure falls back to the torch loop, with a warning
            warnings.warn(f"no fused Newton loop for {type(problem.system).__name__} ({type(exc).__name__}: {exc}); "
                          "using the batched torch loop", RuntimeWarning, stacklevel=3)
    _MODULES[key] = mod
    return mod


def _build(problem: MPCProblem, fresh: bool) -> Any:
    """Import the kernel module and compile (or load from numba's disk cache) its AL loop by one call (the
    per-AL-iteration ``newton_loop`` of ``stop_when_converged`` solves compiles at its first call)."""
    mod, _ = kernels.load_module(problem.system, _source(), tag="newton_", fresh=fresh)
    _warm_up(problem, mod)
    return mod


def _warm_up(problem: MPCProblem, mod: Any) -> None:
    """One AL-loop call on a single all-zero sample with the problem's shapes (compiles it for these types)."""
    t, nx, nu = problem.T, problem.nx, problem.nu
    z = torch.zeros
    f64 = torch.float64
    obs = z(1, t, problem.k, dtype=torch.int64) if problem.k else None
    sub = SimpleNamespace(x=z(1, t, nx, dtype=f64), u=z(1, t, nu, dtype=f64), theta=z(1, t, nx, dtype=f64),
                          lam_eq=z(1, t - 1, nx, dtype=f64), lam_in=z(1, t, problem.n_ineq, dtype=f64),
                          rho=torch.ones(1, dtype=f64), obs=obs)  # the fields of solver.Subproblem
    _al_run(problem, mod, z(1, nx, dtype=f64), sub, 1, False, 0.0, 1e3)


def usable(problem: MPCProblem, x: torch.Tensor, track_grad: bool) -> bool:
    """Whether the fused loop serves a Newton loop on ``x`` (see the module docstring)."""
    return (not track_grad and kernels.enabled() and x.dtype == torch.float64 and x.device.type == "cpu"
            and not problem.constraints and _module(problem) is not None)


def _np(t: torch.Tensor) -> np.ndarray:
    return np.ascontiguousarray(t.detach().numpy())


def newton_loop(problem: MPCProblem, sub: Any, exit_residual: float, reg_growth: float) -> NewtonArrays:
    """The Newton loop of the AL subproblem ``sub`` (a :class:`~deqmpc_gym.mpc.solver.Subproblem`: ``x``, ``u``,
    ``theta``, ``lam_eq``, ``lam_in``, ``rho``, ``obs``) without autograd. Returns the fields of
    :class:`~deqmpc_gym.mpc.solver.NewtonResult` in order, ``(x, u, steps, small_exit, dual_residual, fallback,
    nonfinite, d, g)`` (the dynamics at the new iterate are not computed)."""
    return _run(problem, _module(problem).newton_loop, sub.x, sub.u, sub.theta, sub.lam_eq, sub.lam_in, sub.rho,
                sub.obs, exit_residual, reg_growth)


class ALArrays(NamedTuple):
    """What the fused AL iterations (:func:`al_iterations`) return, per sample: the final iterate ``x``, ``u``,
    multipliers ``lam_eq``, ``lam_in`` and penalty ``rho``; the last subproblem's multipliers and penalty
    (``last_*``: the start's where no iteration ran); ``al_iters``, ``newton_steps`` run; the last Newton loop's
    ``small_exit`` and ``dual_residual``; ``fallback``, ``nonfinite``; the defects ``d`` and residuals ``g`` at the
    final iterate, the violation ``primal_residual`` there and the convergence flag ``converged`` (as
    :class:`~deqmpc_gym.mpc.SolveInfo`'s; these four valid where ``al_iters > 0``)."""

    x: torch.Tensor
    u: torch.Tensor
    lam_eq: torch.Tensor
    lam_in: torch.Tensor
    rho: torch.Tensor
    last_eq: torch.Tensor
    last_in: torch.Tensor
    last_rho: torch.Tensor
    al_iters: torch.Tensor
    newton_steps: torch.Tensor
    small_exit: torch.Tensor
    dual_residual: torch.Tensor
    fallback: torch.Tensor
    nonfinite: torch.Tensor
    d: torch.Tensor
    g: torch.Tensor
    primal_residual: torch.Tensor
    converged: torch.Tensor


def al_iterations(problem: MPCProblem, x0: torch.Tensor, sub: Any, iters: int, stop_at_rho_max: bool,
                  exit_residual: float, reg_growth: float) -> ALArrays:
    """``iters`` AL iterations of the subproblem ``sub`` (as :func:`newton_loop`'s; its multipliers and penalty
    are the start's; its states' knot 0 is replaced by ``x0 (B, nx)``) in one compiled call: each a Newton loop,
    the dual update and the penalty growth
    (:func:`deqmpc_gym.mpc.solver._al_iterations` without autograd and without ``stop_when_converged``; with
    ``stop_at_rho_max`` a sample stops once its penalty exceeds ``rho_max``)."""
    return _al_run(problem, _module(problem), x0, sub, iters, stop_at_rho_max, exit_residual, reg_growth)


def _al_run(problem: MPCProblem, mod: Any, x0: torch.Tensor, sub: Any, iters: int, stop_at_rho_max: bool,
            exit_residual: float, reg_growth: float) -> ALArrays:
    """:func:`al_iterations` with the kernel module ``mod``."""
    cfg = problem.config
    b, t = sub.x.shape[:2]
    nx, mi = problem.nx, problem.n_ineq
    X, U = _np(sub.x), _np(sub.u)
    obs, P = _problem_data(problem, sub.x, sub.obs)
    f64 = np.float64
    outs = (np.empty_like(X), np.empty_like(U), np.empty((b, t - 1, nx)), np.empty((b, t, mi)), np.empty(b),
            np.empty((b, t - 1, nx)), np.empty((b, t, mi)), np.empty(b), np.zeros(b, np.int64), np.zeros(b, np.int64),
            np.zeros(b, np.bool_), np.full(b, np.inf), np.zeros(b, np.bool_), np.zeros(b, np.bool_),
            np.zeros((b, t - 1, nx), f64), np.zeros((b, t, mi), f64), np.full(b, np.inf), np.zeros(b, np.bool_))
    al_settings = (int(iters), bool(stop_at_rho_max), float(cfg.rho_max), float(cfg.rho_growth), float(cfg.rho_cap),
                   float(cfg.tol_primal), float(cfg.tol_dual))
    with np.errstate(all="ignore"):
        mod.al_loop(_np(x0), X, U, _np(sub.theta), _np(sub.lam_eq), _np(sub.lam_in), _np(sub.rho), obs, P,
                    _settings(problem, exit_residual, reg_growth), al_settings, outs)
    return ALArrays(*(torch.from_numpy(a) for a in outs))


def _settings(problem: MPCProblem, exit_residual: float, reg_growth: float) -> tuple:
    """The Newton loop's settings tuple (see ``newton_loop`` in :mod:`deqmpc_gym.mpc.newton_kernel`)."""
    cfg = problem.config
    return (cfg.newton_steps, float(cfg.newton_tol), float(exit_residual), cfg.line_search_steps,
            float(cfg.reg_min), float(reg_growth))


def _problem_data(problem: MPCProblem, x: torch.Tensor, obs_idx: torch.Tensor | None) -> tuple[np.ndarray, tuple]:
    """The kernels' obstacle indices ``OBS (B, T, k)`` and problem tuple ``P`` for ``x (B, T, nx)`` (without
    ``obs_idx``: no obstacle rows)."""
    b, t = x.shape[:2]
    c = problem.consts(x)
    if problem.k and obs_idx is not None:
        obs = _np(obs_idx.to(torch.int64))
        centers_t, radius, pos0, _ = problem.obstacle_geometry(x)
        centers, radius2 = _np(centers_t), float(radius) ** 2
    else:
        obs, centers, radius2, pos0 = np.zeros((b, t, 0), np.int64), np.zeros((0, 3)), 0.0, 0
    return obs, (centers, _np(c.W), c.w_diag is not None, _np(c.u_low), _np(c.u_high), radius2, pos0)


def implicit_solve(problem: MPCProblem, x: torch.Tensor, u: torch.Tensor, ref: torch.Tensor, lam_eq: torch.Tensor,
                   lam_in: torch.Tensor, rho: torch.Tensor, obs_idx: torch.Tensor | None, rhs: torch.Tensor
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The fused linear solve of the implicit gradient at ``x (B,T,nx)``, ``u (B,T,nu)`` (cost reference ``ref``,
    multipliers ``lam_eq (B,T-1,nx)``, ``lam_in (B,T,mi)``, penalty ``rho (B,)``): ``(v (B,T,n), cross (B,nx),
    ok (B,))`` with ``H v = rhs (B,T,n)`` (pinned), ``cross = H_{x0,z} v`` and ``ok`` False where ``H`` does not
    factor or ``v`` is not finite (see ``implicit_solve`` in :mod:`deqmpc_gym.mpc.newton_kernel`)."""
    b, t = x.shape[:2]
    obs, P = _problem_data(problem, x, obs_idx)
    V, cross, ok = np.zeros((b, t, problem.n)), np.zeros((b, problem.nx)), np.zeros(b, np.bool_)
    with np.errstate(all="ignore"):
        _module(problem).implicit_solve(_np(x), _np(u), _np(ref), _np(lam_eq), _np(lam_in), _np(rho), obs, P,
                                        _np(rhs), V, cross, ok)
    return torch.from_numpy(V), torch.from_numpy(cross), torch.from_numpy(ok)


def shooting_kkt(problem: MPCProblem, x0: torch.Tensor, ref: torch.Tensor, u: torch.Tensor
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """The fused :func:`deqmpc_gym.mpc.polish.shooting_kkt` (no graph): ``(violation (B,), stationarity (B,))`` of
    the controls ``u (B,T,nu)`` rolled out from ``x0 (B,nx)``, cost reference ``ref`` (``(B,T,nx)`` or
    ``(B,T,nx+nu)``); the same formulas in one compiled call."""
    b = x0.shape[0]
    _, P = _problem_data(problem, u, None)
    viol, stat = np.empty(b), np.empty(b)
    with np.errstate(all="ignore"):
        _module(problem).shooting_kkt(_np(x0), _np(u), _np(ref), P, viol, stat)
    return torch.from_numpy(viol), torch.from_numpy(stat)


def _run(problem: MPCProblem, fn: Any, x: torch.Tensor, u: torch.Tensor, theta: torch.Tensor, lam_eq: torch.Tensor,
         lam_in: torch.Tensor, rho: torch.Tensor, obs_idx: torch.Tensor | None, exit_residual: float,
         reg_growth: float) -> NewtonArrays:
    b, t = x.shape[:2]
    X, U = _np(x), _np(u)
    obs, P = _problem_data(problem, x, obs_idx)
    XO, UO = np.empty_like(X), np.empty_like(U)
    steps = np.zeros(b, np.int64)
    small, fb, nf = np.zeros(b, np.bool_), np.zeros(b, np.bool_), np.zeros(b, np.bool_)
    dres = np.full(b, np.inf)
    DO = np.empty((b, t - 1, problem.nx))
    GO = np.empty((b, t, problem.n_ineq))
    with np.errstate(all="ignore"):
        fn(X, U, _np(theta), _np(lam_eq), _np(lam_in), _np(rho), obs, P, _settings(problem, exit_residual, reg_growth),
           XO, UO, steps, small, dres, fb, nf, DO, GO)
    f = torch.from_numpy
    return f(XO), f(UO), f(steps), f(small), f(dres), f(fb), f(nf), f(DO), f(GO)

