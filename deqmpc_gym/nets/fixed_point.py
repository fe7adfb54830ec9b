"""Batched fixed-point solvers: Anderson acceleration and plain iteration.

Both solvers share one contract: ``solver(f, z0, config) -> (z_star, SolverStats)`` where ``z0`` is a
``(B, ...)`` tensor, ``f`` maps such tensors to tensors of the same shape, and the result holds, per
sample, the best (lowest-residual) finite iterate seen. They run under ``torch.no_grad()``, never raise
on non-convergence and never return non-finite values unless ``z0`` itself is non-finite.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from deqmpc_gym.errors import ConfigError, ShapeError

__all__ = [
    "AndersonConfig",
    "SolverStats",
    "Solver",
    "anderson",
    "fixed_point_iter",
    "get_solver",
    "register_solver",
    "solver_names",
]

_STOP_MODES = ("rel", "abs")


@dataclass(frozen=True)
class AndersonConfig:
    """Settings of the fixed-point solvers (also used by :func:`fixed_point_iter`).

    Attributes:
        m: Anderson history size (>= 1).
        max_iter: maximum number of ``f`` evaluations (>= 1).
        tol: stopping tolerance on the per-sample residual (> 0).
        beta: Anderson mixing, ``X = beta*sum(a F) + (1-beta)*sum(a X)``, in (0, 1].
        lam: Tikhonov term added to ``G G^T`` (>= 0); grows x10 per sample when its solve fails.
        stop_mode: ``"rel"`` (``|f(z)-z| / (1e-5 + |f(z)|)``) or ``"abs"`` (``|f(z)-z|``).
    """

    m: int = 5
    max_iter: int = 10
    tol: float = 1e-2
    beta: float = 0.8
    lam: float = 1e-4
    stop_mode: str = "rel"

    def __post_init__(self) -> None:
        if int(self.m) != self.m or self.m < 1:
            raise ConfigError(f"AndersonConfig.m must be an integer >= 1, got {self.m!r}")
        if int(self.max_iter) != self.max_iter or self.max_iter < 1:
            raise ConfigError(f"AndersonConfig.max_iter must be an integer >= 1, got {self.max_iter!r}")
        if not self.tol > 0:
            raise ConfigError(f"AndersonConfig.tol must be > 0, got {self.tol!r}")
        if not 0 < self.beta <= 1:
            raise ConfigError(f"AndersonConfig.beta must be in (0, 1], got {self.beta!r}")
        if not self.lam >= 0:
            raise ConfigError(f"AndersonConfig.lam must be >= 0, got {self.lam!r}")
        if self.stop_mode not in _STOP_MODES:
            raise ConfigError(f"AndersonConfig.stop_mode must be one of {_STOP_MODES}, got {self.stop_mode!r}")


@dataclass
class SolverStats:
    """Per-sample outcome of a fixed-point solve.

    Attributes:
        residual: ``(B,)`` float, residual (per ``stop_mode``) of the returned iterate; ``inf`` if no
            finite iterate was ever evaluated.
        iters: ``(B,)`` int64, number of ``f`` evaluations until the sample first met ``tol``
            (the total number of evaluations if it never did).
        converged: ``(B,)`` bool, ``residual < tol``.
    """

    residual: Tensor
    iters: Tensor
    converged: Tensor


Solver = Callable[[Callable[[Tensor], Tensor], Tensor, AndersonConfig], tuple[Tensor, SolverStats]]


class _Tracker:
    """Per-sample bookkeeping of the best iterate, residual and iteration count (internal)."""

    def __init__(self, z0: Tensor, config: AndersonConfig) -> None:
        bsz = z0.shape[0]
        self.config = config
        self.z0 = z0
        self.best_x = z0.clone()
        self.best_f = z0.clone()
        self.best_res = torch.full((bsz,), float("inf"), dtype=z0.dtype, device=z0.device)
        self.iters = torch.zeros(bsz, dtype=torch.int64, device=z0.device)
        self.done = torch.zeros(bsz, dtype=torch.bool, device=z0.device)
        self.nfe = 0

    def residual(self, x: Tensor, fx: Tensor, g: Tensor | None = None) -> Tensor:
        """Per-sample residual of the pair ``x, fx``, both ``(B, n)`` (``g = fx - x`` if already computed);
        ``inf`` where non-finite."""
        res = (fx - x if g is None else g).norm(dim=1)
        # |fx - x| is finite exactly where x, fx and |fx - x| are (inf - y and nan - y are never finite), and the
        # rel residual divides a finite norm by at least 1e-5: one test covers the pair and the residual
        finite = torch.isfinite(res)
        if self.config.stop_mode == "rel":
            res = res / (1e-5 + fx.norm(dim=1))
        if not bool(finite.all()):
            res = torch.where(finite, res, torch.full_like(res, float("inf")))
        return res

    def update(self, x: Tensor, fx: Tensor, g: Tensor | None = None) -> Tensor:
        """Record one evaluation (``g = fx - x`` if already computed); return the ``(B,)`` bool mask of samples
        with a finite pair."""
        self.nfe += 1
        res = self.residual(x, fx, g)
        better = res < self.best_res
        if bool(better.all()):
            self.best_res, self.best_x, self.best_f = res, x, fx
        else:
            self.best_res = torch.where(better, res, self.best_res)
            self.best_x = torch.where(better[:, None], x, self.best_x)
            self.best_f = torch.where(better[:, None], fx, self.best_f)
        met = res < self.config.tol
        self.iters.masked_fill_(met & ~self.done, self.nfe)
        self.done |= met
        return torch.isfinite(res)

    def all_done(self) -> bool:
        return bool(self.done.all())

    def finish(self, shape: torch.Size) -> tuple[Tensor, SolverStats]:
        iters = torch.where(self.done, self.iters, torch.full_like(self.iters, self.nfe))
        converged = self.best_res < self.config.tol
        stats = SolverStats(residual=self.best_res, iters=iters, converged=converged)
        best = self.best_x.clone() if self.best_x is self.z0 else self.best_x  # never an alias of the input
        return best.reshape(shape), stats


def _flat(f: Callable[[Tensor], Tensor], z0: Tensor) -> Callable[[Tensor], Tensor]:
    """Wrap ``f`` (on ``z0``-shaped tensors) as a map on ``(B, n)`` tensors."""
    shape = z0.shape

    def g(x: Tensor) -> Tensor:
        out = f(x.reshape(shape))
        if out.shape != shape:
            raise ShapeError(f"fixed-point map must return shape {tuple(shape)}, got {tuple(out.shape)}")
        return out.reshape(shape[0], -1)

    return g


def _check_z0(z0: Tensor) -> None:
    if not isinstance(z0, Tensor) or z0.dim() < 1 or z0.shape[0] < 1:
        raise ShapeError(f"z0 must be a torch.Tensor of shape (B, ...) with B >= 1, got {getattr(z0, 'shape', z0)!r}")


def _sanitize(x: Tensor, fx: Tensor, ok: Tensor, tr: _Tracker) -> tuple[Tensor, Tensor]:
    """Replace non-finite samples of ``x, fx`` (``(B, n)``) by the best finite pair seen so far."""
    if bool(ok.all()):
        return x, fx
    return torch.where(ok[:, None], x, tr.best_x), torch.where(ok[:, None], fx, tr.best_f)


def _mixing_weights(g: Tensor, lam: Tensor) -> tuple[Tensor, Tensor]:
    """Solve the bordered Anderson system for each sample.

    Args:
        g: ``(B, k, n)`` residual history ``F - X``.
        lam: ``(B,)`` current Tikhonov weights (grown x10 in place for failed samples).

    Returns:
        ``alpha`` ``(B, k)`` summing to one (plain iteration weights where the solve kept failing), and
        the updated ``lam``.
    """
    bsz, k, _ = g.shape
    eye = torch.eye(k, dtype=g.dtype, device=g.device)
    gg = g @ g.transpose(1, 2)
    rhs = torch.zeros(bsz, k + 1, 1, dtype=g.dtype, device=g.device)
    rhs[:, 0] = 1.0
    fallback = torch.zeros(bsz, k, dtype=g.dtype, device=g.device)
    fallback[:, -1] = 1.0
    alpha, ok = fallback, torch.zeros(bsz, dtype=torch.bool, device=g.device)
    for _ in range(4):
        h = torch.zeros(bsz, k + 1, k + 1, dtype=g.dtype, device=g.device)
        h[:, 0, 1:] = 1.0
        h[:, 1:, 0] = 1.0
        h[:, 1:, 1:] = gg + lam[:, None, None] * eye
        sol, info = torch.linalg.solve_ex(h, rhs)
        a = sol[:, 1:, 0]
        good = (info == 0) & torch.isfinite(a).all(dim=1)
        alpha = torch.where(good[:, None] & ~ok[:, None], a, alpha)
        ok = ok | good
        if bool(ok.all()):
            break
        lam = torch.where(ok, lam, torch.clamp(lam * 10.0, min=1e-8))
    return alpha, lam


def anderson(f: Callable[[Tensor], Tensor], z0: Tensor,
             config: AndersonConfig | None = None) -> tuple[Tensor, SolverStats]:
    """Batched Anderson acceleration for ``z = f(z)``.

    Args:
        f: map from ``(B, ...)`` tensors to tensors of the same shape and dtype.
        z0: ``(B, ...)`` float initial guess (any trailing shape; flattened to ``(B, n)`` internally).
        config: solver settings (default :class:`AndersonConfig`).

    Returns:
        ``z_star`` of ``z0``'s shape and dtype (each sample's best iterate) and :class:`SolverStats`.
    """
    config = config or AndersonConfig()
    _check_z0(z0)
    with torch.no_grad():
        return _anderson(_flat(f, z0), z0.detach().reshape(z0.shape[0], -1), config, z0.shape)


def _anderson(g: Callable[[Tensor], Tensor], x0: Tensor, cfg: AndersonConfig,
              shape: torch.Size) -> tuple[Tensor, SolverStats]:
    bsz, n = x0.shape
    m, beta = cfg.m, cfg.beta
    tr = _Tracker(x0, cfg)
    # history per slot: the residual G = f(x) - x and the mixed iterate Y = beta f(x) + (1 - beta) x, so that an
    # Anderson step is one Gram product, one bordered (k+1)x(k+1) solve and one weighted sum of the Y rows
    gs = x0.new_zeros(bsz, m, n)
    ys = x0.new_zeros(bsz, m, n)
    h = x0.new_zeros(bsz, m + 1, m + 1)  # bordered system [[0, 1^T], [1, G G^T + lam I]]
    h[:, 0, 1:] = 1.0
    h[:, 1:, 0] = 1.0
    rhs = x0.new_zeros(bsz, m + 1, 1)
    rhs[:, 0] = 1.0
    lam = torch.full((bsz,), cfg.lam, dtype=x0.dtype, device=x0.device)
    lam_eye = [cfg.lam * torch.eye(k, dtype=x0.dtype, device=x0.device) for k in range(m + 1)]
    x, fx = x0, x0
    for it in range(cfg.max_iter):
        if it >= 2:
            x = _anderson_step(gs, ys, min(it, m), lam, lam_eye, h, rhs)
        elif it == 1:
            x = fx
        fx = g(x)
        gx = fx - x
        ok = tr.update(x, fx, gx)
        if not bool(ok.all()):
            x, fx = torch.where(ok[:, None], x, tr.best_x), torch.where(ok[:, None], fx, tr.best_f)
            gx = fx - x
        slot = it % m
        gs[:, slot] = gx
        if beta == 1.0:
            ys[:, slot] = fx
        else:
            torch.add(fx * beta, x, alpha=1.0 - beta, out=ys[:, slot])
        if tr.all_done():
            break
    return tr.finish(shape)


def _anderson_step(gs: Tensor, ys: Tensor, k: int, lam: Tensor, lam_eye: list[Tensor], h: Tensor,
                   rhs: Tensor) -> Tensor:
    """One Anderson extrapolation from the first ``k`` history slots ``(B, m, n)``; updates ``lam`` in place
    (and ``lam_eye``, its ``lam I`` blocks, when a sample's solve fails and its ``lam`` grows)."""
    g = gs[:, :k]
    hk = h[:, : k + 1, : k + 1]
    hk[:, 1:, 1:] = torch.baddbmm(lam_eye[k], g, g.transpose(1, 2))
    sol, info = torch.linalg.solve_ex(hk, rhs[:, : k + 1])
    alpha = sol[:, 1:, 0]
    if bool(info.any()) or not bool(torch.isfinite(alpha).all()):  # rare: the Tikhonov retries
        alpha, new_lam = _mixing_weights(g, lam)
        lam.copy_(new_lam)
        for j in range(1, len(lam_eye)):
            lam_eye[j] = lam[:, None, None] * torch.eye(j, dtype=lam.dtype, device=lam.device)
    return torch.bmm(alpha[:, None], ys[:, :k])[:, 0]


def fixed_point_iter(f: Callable[[Tensor], Tensor], z0: Tensor,
                     config: AndersonConfig | None = None) -> tuple[Tensor, SolverStats]:
    """Plain fixed-point iteration ``z <- f(z)`` with the same contract as :func:`anderson`.

    Only ``max_iter``, ``tol`` and ``stop_mode`` of ``config`` are used.

    Args:
        f: map from ``(B, ...)`` tensors to tensors of the same shape and dtype.
        z0: ``(B, ...)`` float initial guess.
        config: solver settings (default :class:`AndersonConfig`).

    Returns:
        ``z_star`` of ``z0``'s shape (each sample's best iterate) and :class:`SolverStats`.
    """
    config = config or AndersonConfig()
    _check_z0(z0)
    with torch.no_grad():
        g = _flat(f, z0)
        x = z0.detach().reshape(z0.shape[0], -1)
        tr = _Tracker(x, config)
        for _ in range(config.max_iter):
            fx = g(x)
            x, fx = _sanitize(x, fx, tr.update(x, fx), tr)
            if tr.all_done():
                break
            x = fx
        return tr.finish(z0.shape)


_SOLVERS: dict[str, Solver] = {"anderson": anderson, "fixed_point_iter": fixed_point_iter}


def register_solver(name: str, fn: Solver) -> None:
    """Register ``fn(f, z0, config) -> (z_star, SolverStats)`` under ``name`` (overwrites)."""
    if not isinstance(name, str) or not name:
        raise ConfigError(f"solver name must be a non-empty string, got {name!r}")
    if not callable(fn):
        raise ConfigError(f"solver {name!r} must be callable, got {type(fn).__name__}")
    _SOLVERS[name] = fn


def solver_names() -> tuple[str, ...]:
    """Names of the registered solvers, sorted."""
    return tuple(sorted(_SOLVERS))


def get_solver(name: str) -> Solver:
    """Return the solver registered under ``name``; raise :class:`ConfigError` listing valid names."""
    if name not in _SOLVERS:
        raise ConfigError(f"unknown fixed-point solver {name!r}; valid names: {', '.join(solver_names())}")
    return _SOLVERS[name]
