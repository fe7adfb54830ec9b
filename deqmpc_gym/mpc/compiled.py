"""A compiled, branch-free MPC-m call for small box-constrained problems (:class:`CompiledSolver`).

:func:`~deqmpc_gym.mpc.solve` is eager PyTorch: each AL iteration is a few hundred small kernels, and on a CPU
at ``B = 200, T = 5`` their per-call overhead, not arithmetic, sets its time (``benchmarks/al_floor.py``).
:class:`CompiledSolver` runs the same algorithm -- the same Newton steps, active-set prediction, line search (the
largest of ``1, 1/2, ..., 2^-12`` with a strict decrease), exit tests and dual updates, per sample -- as three
functions (prepare, Newton step with the dual update, finish) that ``torch.compile`` turns into a few fused C++
loops over the batch:

* every quantity is a list of per-sample *scalars* (``(B,)`` tensors, stored batch-last so that the loops
  vectorise), one per entry of a knot's state, control, Jacobian or Hessian block
  (:mod:`deqmpc_gym.systems.components` evaluates the system's dynamics and their forward-mode Jacobians that way);
* the Gauss-Newton system is block-tridiagonal; its Cholesky factorisation and the two substitutions are
  written out entry by entry over the knots (the graph grows as ``T (nx + nu)^3``, so this suits small
  problems: :attr:`CompiledSolver.max_unrolled_work`), with structural zeros folded away at trace time;
* data-dependent branches become masks: a sample that has finished its Newton loop keeps its values. The rare
  paths -- regularisation after a failed factorisation, the active-set re-solve, step lengths below the first
  ``line_search_trials`` -- are further calls of the same compiled step, made only when some sample needs them
  and merged per sample (``CompiledSolver._step``). The loop exits (all samples done) are decided in Python.

Scope: control bounds only (no obstacles or user constraints), any :class:`~deqmpc_gym.systems.System` whose
``_step`` uses the ``ops`` namespace (the Pendulum and the Cart-pole are tested), fixed numbers of AL iterations
(``stop_at_rho_max`` streaming included, ``stop_when_converged`` not), gradients ``"implicit"`` and
``"final_implicit"`` (their backward is the eager solver's). Results equal :func:`~deqmpc_gym.mpc.solve`'s to
round-off (tested). Compiling costs 30-150 s per batch size and needs a C++ compiler; without one the
functions run eagerly (slower than :func:`solve`) after a :class:`RuntimeWarning`. If the vectorised kernels
fail to build (GCC 12 meets an internal compiler error on the Cart-pole's Newton step with AVX-512, hence
256-bit vectors by default), the functions are compiled again without SIMD code (``compile_options``).

Where it differs from :func:`solve` on purpose is listed in one place, :class:`~deqmpc_gym.mpc.MPCSolver` (the
interface both satisfy). What the two share -- input checks, cold start, constants, the gradients' backward -- is
in :mod:`deqmpc_gym.mpc._common`; the merit's terms are :func:`~deqmpc_gym.mpc.problem.phr_equality` and
:func:`~deqmpc_gym.mpc.problem.phr_inequality`. The Newton step mirrors the eager one's parts: :meth:`CompiledSolver.
_linearize`, ``_direction``, ``_line_search``, ``_exit_test`` and ``_commit``, traced into one function
(``_newton``, whose flat arguments and results are the fields of ``_NewtonIn`` and ``_NewtonOut``).
"""

from __future__ import annotations

import functools
import math
import types
import warnings
from collections.abc import Callable
from typing import Any, NamedTuple

import torch

from deqmpc_gym.errors import ConfigError
from deqmpc_gym.mpc._common import (
    REG_GROWTH,
    LastSubproblem,
    SolveInfo,
    SolverState,
    attach_gradient,
    check_gradient,
    check_hessian,
    check_inputs,
    check_iters,
    check_state,
    exit_residual_of,
    init_state,
)
from deqmpc_gym.mpc.problem import MPCProblem, phr_equality, phr_inequality
from deqmpc_gym.systems.components import sadd, smul, ssub, ssum, step_and_jacobian_components, step_components

Sc = Any  # a per-sample scalar: python float or (B,) / (K, B) tensor


# ====================================================================== scalar-list linear algebra
def _rsqrt_pivot(p: Sc, ok: Any) -> tuple[Sc, Any]:
    """``1 / sqrt(p)`` of a Cholesky pivot; a non-positive or NaN pivot clears ``ok`` and yields 1."""
    if type(p) is float:
        if not p > 0:
            raise ConfigError(f"constant Cholesky pivot {p} <= 0: the problem's weights are not positive definite")
        return 1.0 / math.sqrt(p), ok
    good = p > 0
    ok = good if ok is None else ok & good
    return torch.rsqrt(torch.where(good, p, torch.ones_like(p))), ok


def _chol(S: list[list[Sc]], ok: Any) -> tuple[list[list[Sc]], list[Sc], Any]:
    """Lower Cholesky factor of the symmetric ``S`` (lower triangle read): ``(C, 1/diag(C), ok)``."""
    n = len(S)
    C: list[list[Sc]] = [[0.0] * n for _ in range(n)]
    inv: list[Sc] = [0.0] * n
    for j in range(n):
        p = ssub(S[j][j], ssum([smul(C[j][k], C[j][k]) for k in range(j)]))
        inv[j], ok = _rsqrt_pivot(p, ok)
        for i in range(j + 1, n):
            C[i][j] = smul(ssub(S[i][j], ssum([smul(C[i][k], C[j][k]) for k in range(j)])), inv[j])
    return C, inv, ok


def _fwd(C: list[list[Sc]], inv: list[Sc], b: list[Sc]) -> list[Sc]:
    """Solve ``C y = b`` (``C`` lower triangular)."""
    y: list[Sc] = []
    for i in range(len(b)):
        y.append(smul(ssub(b[i], ssum([smul(C[i][k], y[k]) for k in range(i)])), inv[i]))
    return y


def _bwd(C: list[list[Sc]], inv: list[Sc], b: list[Sc]) -> list[Sc]:
    """Solve ``C^T z = b``."""
    n = len(b)
    z: list[Sc] = [0.0] * n
    for i in reversed(range(n)):
        z[i] = smul(ssub(b[i], ssum([smul(C[k][i], z[k]) for k in range(i + 1, n)])), inv[i])
    return z


def _btri_solve(D: list, L: list, g: list) -> tuple[list[list[Sc]], Any]:
    """Solve ``H z = g`` for the symmetric block-tridiagonal ``H`` (diagonal blocks ``D[t]``, sub-diagonal blocks
    ``L[t] = H[t+1, t]``) by the block Cholesky factorisation. Returns ``(z, ok)``: ``ok (B,)`` is False where a
    pivot was not positive (``z`` is then meaningless for that sample)."""
    T = len(D)
    ok = None
    Cs, invs, Es = [], [], []
    S = D[0]
    for t in range(T):
        C, inv, ok = _chol(S, ok)
        Cs.append(C)
        invs.append(inv)
        if t < T - 1:
            E = [_fwd(C, inv, row) for row in L[t]]  # E = L_t C_t^{-T}, row by row
            Es.append(E)
            n = len(E)
            Dn = D[t + 1]
            S = [[ssub(Dn[i][j], ssum([smul(E[i][k], E[j][k]) for k in range(n)])) for j in range(n)]
                 for i in range(n)]
    ys: list[list[Sc]] = []
    for t in range(T):
        b = g[t]
        if t > 0:
            E, yp = Es[t - 1], ys[t - 1]
            b = [ssub(b[i], ssum([smul(E[i][k], yp[k]) for k in range(len(yp))])) for i in range(len(b))]
        ys.append(_fwd(Cs[t], invs[t], b))
    zs: list[list[Sc]] = [[]] * T
    for t in reversed(range(T)):
        b = ys[t]
        if t < T - 1:
            E, zn = Es[t], zs[t + 1]
            b = [ssub(b[i], ssum([smul(E[k][i], zn[k]) for k in range(len(zn))])) for i in range(len(b))]
        zs[t] = _bwd(Cs[t], invs[t], b)
    return zs, ok


def _vmax(xs: list[torch.Tensor]) -> torch.Tensor:
    """Elementwise maximum of ``(B,)`` tensors."""
    return functools.reduce(torch.maximum, xs)


def _absmax(xs: list[Sc], like: torch.Tensor) -> torch.Tensor:
    """``(B,)`` max of ``|x|`` over the tensor scalars of ``xs`` (python floats are ignored)."""
    ts = [v.abs() for v in xs if isinstance(v, torch.Tensor)]
    return _vmax(ts) if ts else torch.zeros_like(like)


def _full(v: Sc, like: torch.Tensor) -> torch.Tensor:
    return v if isinstance(v, torch.Tensor) else torch.full_like(like, v)


def _cols(a: torch.Tensor) -> list[list[torch.Tensor]]:
    """Batch-last ``(T, m, B) -> [[a[t, i] for i] for t]`` (contiguous ``(B,)`` rows: the compiled loops over
    the batch vectorise; strided ``(B, T, m)`` reads do not)."""
    return [[a[t, i] for i in range(a.shape[1])] for t in range(a.shape[0])]


def _stack(rows: list[list[Sc]], like: torch.Tensor) -> torch.Tensor:
    """``[[(B,) scalar] * m] * T -> (T, m, B)``."""
    return torch.stack([torch.stack([_full(v, like) for v in r], 0) for r in rows], 0)


def _batch_last(a: torch.Tensor) -> torch.Tensor:
    """``(B, T, m) -> (T, m, B)`` contiguous."""
    return a.permute(1, 2, 0).contiguous()


def _batch_first(a: torch.Tensor) -> torch.Tensor:
    """``(T, m, B) -> (B, T, m)`` contiguous."""
    return a.permute(2, 0, 1).contiguous()


# ====================================================================== the compiled MPC-m call
class CompiledSolver:
    """Fixed-iteration AL MPC calls of one box-constrained :class:`MPCProblem`, compiled by ``torch.compile``.

    Call it like :func:`~deqmpc_gym.mpc.solve` (same arguments and returns, except ``stop_when_converged`` and
    ``gradient="unroll"``, which it does not support)::

        fast = CompiledSolver(MPCProblem(Pendulum(), MPCConfig(horizon=5)))
        x, u, state, info = fast(x0, theta, state=warm, iters=2, stop_at_rho_max=True, exit_residual=1e-3)

    The first call with a new batch size compiles (30-120 s on 2 cores; torch's disk cache makes later processes
    faster); later calls take a fraction of :func:`solve`'s time (``benchmarks/solver.py``: the Pendulum's
    streaming call at ``B = 200`` in about a third). Compiled graphs are kept per solver and batch size.

    Args:
        problem: an :class:`MPCProblem` with control bounds only (no obstacles, no user constraints).
        compile: ``False`` runs the same functions eagerly (for testing; slower than :func:`solve`).
        max_unrolled_work: refuse problems with ``T (nx + nu)^3`` above this (their unrolled factorisation makes
            the compiled graph, and its compile time, too large; use :func:`solve`). The default admits the
            Pendulum up to ``T = 55`` and the Cart-pole up to ``T = 12``.
        line_search_trials: step lengths tried per compiled Newton step (``1, 1/2, ...``); samples without a
            decrease among them try the next ones in a further call (the accepted step is the same either way).
            Fewer is faster where the full step is almost always accepted (warm and streaming calls).
        pad_batches: solve a batch of ``B`` problems as one of the next power of two (padded with copies of the
            first problem, dropped from the results), so that varying batch sizes -- e.g. the sub-batches of
            ``DEQMPCPolicy.predict`` when some envs reset -- compile at most ``log2(B_max) + 1`` times.

    Raises:
        ConfigError: a problem with obstacle or user constraints, one above ``max_unrolled_work``, or one with
            ``MPCConfig.starts > 1``.
    """

    def __init__(self, problem: MPCProblem, *, compile: bool = True, max_unrolled_work: int = 1500,
                 line_search_trials: int = 2, pad_batches: bool = False) -> None:
        if not isinstance(problem, MPCProblem):
            raise ConfigError(f"problem must be an MPCProblem, got {type(problem).__name__}")
        if not problem.box_only:
            raise ConfigError("CompiledSolver supports problems constrained by the control bounds only; this one has "
                              f"{problem.k} obstacle rows and {len(problem.constraints)} user constraints per knot -- "
                              "use deqmpc_gym.mpc.solve")
        if problem.config.starts > 1:
            raise ConfigError(f"CompiledSolver runs single-start calls; this problem's MPCConfig.starts is "
                              f"{problem.config.starts} -- use deqmpc_gym.mpc.solve for multi-start cold solves (or "
                              "MPCConfig(starts=1))")
        work = problem.T * problem.n ** 3
        if work > max_unrolled_work:
            raise ConfigError(f"T (nx + nu)^3 = {problem.T} * {problem.n}^3 = {work} exceeds max_unrolled_work = "
                              f"{max_unrolled_work}: the unrolled factorisation would make a very large compiled "
                              "graph; use deqmpc_gym.mpc.solve (or raise max_unrolled_work)")
        self.problem = problem
        self.max_unrolled_work = max_unrolled_work
        cfg = problem.config
        self._T, self._nx, self._nu, self._n = problem.T, problem.nx, problem.nu, problem.n
        self._Q = [[float(v) for v in row] for row in problem.Q.tolist()]
        self._R = [[float(v) for v in row] for row in problem.R.tolist()]
        self._lo = [float(v) for v in problem.u_low]
        self._hi = [float(v) for v in problem.u_high]
        unom = [float(v) for v in problem.system.nominal_control]
        self._u_init = [min(max(v, lo), hi) for v, lo, hi in zip(unom, self._lo, self._hi)]
        if not isinstance(line_search_trials, int) or line_search_trials < 1:
            raise ConfigError(f"line_search_trials must be an int >= 1, got {line_search_trials!r}")
        self._K = min(line_search_trials, cfg.line_search_steps + 1)
        self._cfg = cfg
        self.compile = bool(compile)
        self.pad_batches = bool(pad_batches)
        #: None: not (fully) compiled yet; True: every function compiled; False: compilation failed, running eagerly
        self.compiled_ok: bool | None = None
        self._fns: dict[str, Callable] = {"prepare": self._prepare, "newton": self._newton, "finish": self._finish}
        self._compiled: dict[str, Callable] = {}
        self._const_cache: dict = {}
        #: inductor options of the compiled functions (``"cpp.simdlen": 1`` if vectorised code fails to build)
        self.compile_options: dict = _default_compile_options()

    # ------------------------------------------------------------------ model pieces on scalar lists
    def _cost(self, X: list, U: list, TH: list) -> Sc:
        """``1/2 sum_t e_t^T Q e_t + u_t^T R u_t`` on scalar lists (``X[t][i]`` etc.)."""
        Q, R = self._Q, self._R
        c: Sc = 0.0
        for t in range(self._T):
            e = [X[t][i] - TH[t][i] for i in range(self._nx)]
            for M, v in ((Q, e), (R, U[t])):
                m = len(v)
                for i in range(m):
                    qi = ssum([smul(M[i][j], v[j]) for j in range(m) if M[i][j] != 0.0])
                    c = sadd(c, smul(0.5, smul(v[i], qi)))
        return c

    def _g(self, U: list) -> list[list[Sc]]:
        """Inequality residuals per knot ``[u - hi, lo - u]``."""
        return [[U[t][j] - self._hi[j] for j in range(self._nu)] + [self._lo[j] - U[t][j] for j in range(self._nu)]
                for t in range(self._T)]

    def _defects(self, X: list, U: list) -> list[list[Sc]]:
        sysm = self.problem.system
        out = []
        for t in range(self._T - 1):
            f = step_components(sysm, X[t], U[t])
            out.append([ssub(X[t + 1][i], f[i]) for i in range(self._nx)])
        return out

    @staticmethod
    def _merit_from(cost: Sc, d: list, g: list, LE: list, LI: list, rho: torch.Tensor) -> Sc:
        """The PHR merit (:meth:`MPCProblem.merit_from`, the same terms) on scalar lists."""
        hr = 0.5 * rho
        m = cost
        for t in range(len(d)):
            for i in range(len(d[t])):
                m = m + phr_equality(LE[t][i], d[t][i], rho, hr)
        for t in range(len(g)):
            for r in range(len(g[t])):
                m = m + phr_inequality(LI[t][r], g[t][r], rho, hr)
        return m

    def _linearize(self, X: list, U: list, TH: list, LE: list, LI: list, rho: torch.Tensor) -> _Model:
        """Residuals, merit, multiplier estimates, gradient and Hessian blocks at ``(X, U)``."""
        T, nx, nu = self._T, self._nx, self._nu
        sysm = self.problem.system
        fJ = [step_and_jacobian_components(sysm, X[t], U[t]) for t in range(T - 1)]
        d = [[X[t + 1][i] - fJ[t][0][i] for i in range(nx)] for t in range(T - 1)]
        g = self._g(U)
        m0 = self._merit_from(self._cost(X, U, TH), d, g, LE, LI, rho)
        mu = [[LE[t][i] + rho * d[t][i] for i in range(nx)] for t in range(T - 1)]
        s = [[LI[t][r] + rho * g[t][r] for r in range(2 * nu)] for t in range(T)]
        act = [[(v > 0).to(rho.dtype) for v in s[t]] for t in range(T)]
        mu_in = [[v.clamp_min(0.0) for v in s[t]] for t in range(T)]
        grad, cgrad = self._gradient(X, U, TH, fJ, mu, mu_in)
        D, L = self._hessian(fJ, act, rho)
        return _Model(m0, mu, s, act, mu_in, grad, cgrad, D, L)

    def _gradient(self, X: list, U: list, TH: list, fJ: list, mu: list, mu_in: list) -> tuple[list, list]:
        """The merit's gradient and the cost's, per knot ``[x_t, u_t]`` (``x_0``'s entries: the cost's are 0)."""
        T, nx, nu, n = self._T, self._nx, self._nu, self._n
        Q, R = self._Q, self._R
        grad, cgrad = [], []
        for t in range(T):
            e = [X[t][i] - TH[t][i] for i in range(nx)]
            cg = ([ssum([smul(Q[i][j], e[j]) for j in range(nx)]) for i in range(nx)] if t > 0 else [0.0] * nx) + \
                 [ssum([smul(R[i][j], U[t][j]) for j in range(nu)]) for i in range(nu)]
            gr = list(cg)
            if t > 0:
                gr[:nx] = [sadd(gr[i], mu[t - 1][i]) for i in range(nx)]
            if t < T - 1:
                J = fJ[t][1]
                for k in range(nx if t == 0 else 0, n):
                    gr[k] = ssub(gr[k], ssum([smul(J[i][k], mu[t][i]) for i in range(nx)]))
            for j in range(nu):
                gr[nx + j] = sadd(gr[nx + j], mu_in[t][j] - mu_in[t][nu + j])
            grad.append(gr)
            cgrad.append(cg)
        return grad, cgrad

    def _hessian(self, fJ: list, act: list, rho: torch.Tensor) -> tuple[list, list]:
        """The Gauss-Newton Hessian's blocks: ``D_t = W + rho (J^T J + I_x [t >= 1] + diag_u(active rows))`` with the
        ``x_0`` rows and columns the identity, and ``L_t = H[t+1, t] = -rho [J_t; 0]``."""
        T, nx, nu, n = self._T, self._nx, self._nu, self._n
        Q, R = self._Q, self._R
        D, L = [], []
        for t in range(T):
            Dt = [[0.0] * n for _ in range(n)]
            for k in range(n):
                for l in range(n):
                    if t == 0 and (k < nx or l < nx):
                        Dt[k][l] = 1.0 if k == l else 0.0
                        continue
                    c: Sc = 0.0
                    if t < T - 1:
                        J = fJ[t][1]
                        c = ssum([smul(J[i][k], J[i][l]) for i in range(nx)])
                    if k == l and k < nx and t > 0:
                        c = sadd(c, 1.0)
                    if k == l and k >= nx:
                        c = sadd(c, act[t][k - nx] + act[t][nu + k - nx])
                    w = Q[k][l] if (k < nx and l < nx) else (R[k - nx][l - nx] if (k >= nx and l >= nx) else 0.0)
                    Dt[k][l] = sadd(w, smul(rho, c))
            D.append(Dt)
            if t < T - 1:
                J = fJ[t][1]
                L.append([[0.0 if (t == 0 and l < nx) else smul(-1.0, smul(rho, J[k][l])) for l in range(n)]
                          for k in range(nx)] + [[0.0] * n for _ in range(nu)])
        return D, L

    def _direction(self, m: _Model, a: _NewtonIn) -> _Direction:
        """The Newton direction by the block-tridiagonal Cholesky (a failed or non-finite one is zeroed), with the
        rare-path inputs of ``a`` (zero on a first attempt, see :meth:`_step`): the regularisation ``H + reg max|diag
        H| I`` after a failed factorisation, and the extra active rows ``extra0`` of the active-set prediction (their
        PHR quadratic added to the model, as the eager re-solve); then the rows this step would make active."""
        T, nx, nu, n = self._T, self._nx, self._nu, self._n
        rho = a.rho
        scale = _absmax([m.D[t][k][k] for t in range(T) for k in range(n)], rho).clamp_min(1.0)
        rs = a.reg * scale
        EX = _cols(a.extra0)
        D = [[[sadd(m.D[t][k][l], rs + rho * (EX[t][k - nx] + EX[t][nu + k - nx])) if (k == l and k >= nx)
               else (sadd(m.D[t][k][l], rs) if (k == l and not (t == 0 and k < nx)) else m.D[t][k][l])
               for l in range(n)] for k in range(n)] for t in range(T)]
        ge = [[sadd(m.grad[t][k], m.s[t][k - nx] * EX[t][k - nx] - m.s[t][nu + k - nx] * EX[t][nu + k - nx])
               if k >= nx else m.grad[t][k] for k in range(n)] for t in range(T)]
        z, fok = _btri_solve(D, m.L, ge)
        fin = functools.reduce(torch.logical_and, [torch.isfinite(v) for row in z for v in row
                                                   if isinstance(v, torch.Tensor)])
        good = fok & fin
        zero = torch.zeros_like(rho)
        dz = [[0.0 if type(v) is float else torch.where(good, -v, zero) for v in z[t]] for t in range(T)]
        # active-set prediction: inactive rows that this step would make active (lam + rho (g + G dz) > 0)
        new_rows = [[((m.s[t][r] + rho * (dz[t][nx + r % nu] if r < nu else -dz[t][nx + r % nu])) > 0)
                     & (m.act[t][r] == 0) & (EX[t][r] == 0) for r in range(2 * nu)] for t in range(T)]
        redo = a.active & good & functools.reduce(torch.logical_or, [v for row in new_rows for v in row])
        extra = torch.maximum(a.extra0, _stack([[v.to(a.x.dtype) for v in row] for row in new_rows], rho))
        return _Direction(dz, good, ~fok | ~good | (a.reg > 0), redo, extra)

    def _line_search(self, X: list, U: list, TH: list, LE: list, LI: list, a: _NewtonIn, m0: torch.Tensor,
                     dz: list, good: torch.Tensor) -> _Trial:
        """``alpha = alpha0 (1, 1/2, ..., 2^-(K-1))`` down to ``2^-line_search_steps``: the largest with a strict
        merit decrease; ``ls_more``: none of the ``K`` has one (the caller continues with smaller ``alpha0``)."""
        T, nx, nu = self._T, self._nx, self._nu
        rho = a.rho
        amin = 0.5 ** self._cfg.line_search_steps
        al = a.alpha0 * (0.5 ** torch.arange(self._K, dtype=rho.dtype, device=rho.device))[:, None]  # (K, B)
        Xk = [[X[t][i] if type(dz[t][i]) is float else X[t][i] + al * dz[t][i] for i in range(nx)] for t in range(T)]
        Uk = [[U[t][j] + al * dz[t][nx + j] for j in range(nu)] for t in range(T)]
        mk = self._merit_from(self._cost(Xk, Uk, TH), self._defects(Xk, Uk), self._g(Uk), LE, LI, rho)
        okk = (mk < m0) & torch.isfinite(mk) & (al >= amin)
        ok = okk.any(0)
        alpha = torch.where(okk, al, torch.zeros_like(al)).amax(0)
        ls_more = a.active & good & ~ok & (a.alpha0 * 0.5 ** self._K >= amin)
        Xn = [[X[t][i] if type(dz[t][i]) is float else X[t][i] + alpha * dz[t][i] for i in range(nx)]
              for t in range(T)]
        Un = [[U[t][j] + alpha * dz[t][nx + j] for j in range(nu)] for t in range(T)]
        return _Trial(alpha, ok, ls_more, Xn, Un, self._defects(Xn, Un), self._g(Un))

    def _newton(self, *args):
        """One Gauss-Newton step of the AL subproblem for the ``active (B,)`` samples (others keep every value): the
        eager loop's step (linearisation, direction, line search, exit test) without branches, followed by the dual
        update :meth:`_dual` of the ``run`` samples (used by the caller after the AL iteration's last Newton step).

        The compiled boundary: it takes the fields of :class:`_NewtonIn` and returns those of :class:`_NewtonOut`,
        flat, batch-last."""
        a = _NewtonIn(*args)
        X, U, TH, LE, LI = _cols(a.x), _cols(a.u), _cols(a.theta), _cols(a.lam_eq), _cols(a.lam_in)
        m = self._linearize(X, U, TH, LE, LI, a.rho)
        dr = self._direction(m, a)
        ls = self._line_search(X, U, TH, LE, LI, a, m.m0, dr.dz, dr.good)
        return tuple(self._commit(a, m, dr, ls, self._exit_test(a, m, dr.dz, ls)))

    def _exit_test(self, a: _NewtonIn, m: _Model, dz: list, ls: _Trial) -> _Exit:
        """The eager loop's exit test (a small step or predicted decrease, the contraction estimate, the constraint
        residual below ``exit_residual``) and the stationarity at the linearisation point."""
        T, n = self._T, self._n
        rho = a.rho
        dres = _absmax([v for r in m.grad for v in r], rho) / (
            1.0 + torch.maximum(_absmax([v for r in m.cgrad for v in r], rho),
                                torch.maximum(_absmax([v for r in m.mu for v in r], rho),
                                              _absmax([v for r in m.mu_in for v in r], rho))))
        tol_s = self._cfg.newton_tol * (1.0 + torch.maximum(a.x.abs().amax((0, 1)), a.u.abs().amax((0, 1))))
        step_norm = _absmax([v for r in dz for v in r], rho)
        gdz = ssum([smul(m.grad[t][k], dz[t][k]) for t in range(T) for k in range(n)])
        small = (step_norm <= tol_s) | (_full(gdz, rho).abs() <= 1e-13 * (1.0 + m.m0.abs()))
        rate = step_norm / a.prev
        small = small | ((ls.alpha == 1.0) & torch.isfinite(a.prev) & (rate < 1.0)
                         & (rate / (1.0 - rate) * step_norm <= tol_s))
        res = torch.sqrt(ssum([v * v for r in ls.d for v in r])
                         + ssum([v.clamp_min(0.0) ** 2 for r in ls.g for v in r]))
        small = small | ((a.exit_residual > 0) & ls.ok & (res <= a.exit_residual))
        return _Exit(small, dres, step_norm)

    def _commit(self, a: _NewtonIn, m: _Model, dr: _Direction, ls: _Trial, ex: _Exit) -> _NewtonOut:
        """The step taken by the ``active`` samples (the others keep every value), and the dual update the AL
        iteration makes if this was its last Newton step."""
        active, rho = a.active, a.rho
        done = ex.small | ~ls.ok
        nf = a.nf | (active & ~torch.isfinite(m.m0))
        d = torch.where(active, _stack(ls.d, rho), a.d_cur)
        g = torch.where(active, _stack(ls.g, rho), a.g_cur)
        dual = self._dual(a.lam_eq, a.lam_in, rho, d, g, a.run, nf, a.al_iters, a.last_eq, a.last_in, a.last_rho,
                          a.rho_cap)
        return _NewtonOut(
            torch.where(active, _stack(ls.x, rho), a.x), torch.where(active, _stack(ls.u, rho), a.u),
            a.steps + (active & ls.ok).long(), torch.where(active, ex.small, a.small_exit),
            torch.where(active, ex.dres, a.dres), a.fb | (active & dr.fallback), nf,
            torch.where(active, ls.alpha * ex.step_norm, a.prev), d, g, active & ~done, active & ~dr.good, dr.redo,
            dr.extra, ls.ls_more, *dual)


    # ------------------------------------------------------------------ the four compiled functions
    def _prepare(self, x0, theta, x, u, lam_eq, lam_in, rho, rho_cap):
        """Reset non-finite samples of the warm start (as :func:`init_state`), pin ``x_0 = x0``, go batch-last;
        which samples run the first AL iteration."""
        b = x0.shape[0]

        def fin(a):
            return torch.isfinite(a).reshape(b, -1).all(1)

        bad = ~(fin(x) & fin(u) & fin(lam_eq) & fin(lam_in) & torch.isfinite(rho))
        m3 = bad[:, None, None]
        x = torch.cat([x0[:, None], torch.where(m3, theta, x)[:, 1:]], 1)
        u_init = torch.tensor(self._u_init, dtype=x.dtype, device=x.device)
        u = torch.where(m3, u_init, u)
        lam_eq = torch.where(m3, torch.zeros_like(lam_eq), lam_eq)
        lam_in = torch.where(m3, torch.zeros_like(lam_in), lam_in)
        rho = torch.where(bad, torch.full_like(rho, self.problem.cold_rho), rho)
        return tuple(_batch_last(a) for a in (x, u, theta, lam_eq, lam_in)) + (rho, rho <= rho_cap)

    def _constants(self, b: int, dtype: torch.dtype, device: torch.device) -> dict[str, torch.Tensor]:
        """Per-call starting values of the accumulators and constant inputs for batch size ``b`` (cached: the
        compiled functions never write to their inputs). Distinct tensors: aliased inputs would recompile."""
        key = (b, dtype, device)
        c = self._const_cache.get(key)
        if c is None:
            T, nx, m = self._T, self._nx, 2 * self._nu
            f: dict[str, Any] = {"dtype": dtype, "device": device}
            c = {"steps": torch.zeros(b, dtype=torch.long, device=device),
                 "al_iters": torch.zeros(b, dtype=torch.long, device=device),
                 **{k: torch.zeros(b, dtype=torch.bool, device=device) for k in ("small_exit", "fb", "nf")},
                 "dres": torch.full((b,), math.inf, **f), "inf": torch.full((b,), math.inf, **f),
                 "d_cur": torch.zeros(T - 1, nx, b, **f), "g_cur": torch.zeros(T, m, b, **f),
                 "last_eq": torch.zeros(T - 1, nx, b, **f), "last_in": torch.zeros(T, m, b, **f),
                 "last_rho": torch.zeros(b, **f), "zero": torch.zeros(b, **f), "one": torch.ones(b, **f),
                 "no_extra": torch.zeros(T, m, b, **f)}
            self._const_cache[key] = c
        return c

    def _dual(self, lam_eq, lam_in, rho, d_cur, g_cur, run, nf, al_iters, last_eq, last_in, last_rho, rho_cap):
        """Dual and penalty update of the ``run (B,)`` samples; which samples run the next AL iteration."""
        leq = lam_eq + rho * d_cur
        lin = (lam_in + rho * g_cur).clamp_min(0.0)
        b = rho.shape[0]
        okm = torch.isfinite(leq).reshape(-1, b).all(0) & torch.isfinite(lin).reshape(-1, b).all(0)
        take = run & okm
        rho_n = torch.where(run, torch.clamp(rho * self._cfg.rho_growth, max=self._cfg.rho_cap), rho)
        return (torch.where(take, leq, lam_eq), torch.where(take, lin, lam_in), rho_n, nf | (run & ~okm),
                al_iters + run.long(), torch.where(run, lam_eq, last_eq), torch.where(run, lam_in, last_in),
                torch.where(run, rho, last_rho), rho_n <= rho_cap)

    def _finish(self, x, u, theta, lam_eq, lam_in, last_eq, last_in, small_exit, dres, nf, al_iters):
        """``(primal residual, cost, converged, dual residual)`` at the returned iterate, and the batch-first ``x, u,
        lam_eq, lam_in, last_eq, last_in``. Both residuals are measured at the returned iterate, the dual one with
        the returned (updated) multipliers -- :func:`~deqmpc_gym.mpc.solve`'s test of ``stop_when_converged``
        (:meth:`MPCProblem.stationarity`), not the Newton loop's stationarity before its final step; a sample that
        ran no AL iteration keeps ``dres``."""
        cfg = self._cfg
        X, U, TH, LE, LI = _cols(x), _cols(u), _cols(theta), _cols(lam_eq), _cols(lam_in)
        T, nx, nu, n = self._T, self._nx, self._nu, self._n
        sysm = self.problem.system
        fJ = [step_and_jacobian_components(sysm, X[t], U[t]) for t in range(T - 1)]
        d = [[ssub(X[t + 1][i], fJ[t][0][i]) for i in range(nx)] for t in range(T - 1)]
        g = self._g(U)
        pres = torch.maximum(_absmax([v for r in d for v in r], dres),
                             _vmax([v.clamp_min(0.0) for r in g for v in r]))
        cost = _full(self._cost(X, U, TH), dres)
        # KKT stationarity of L = C + lam_eq^T d + lam_in^T g over the free variables (x_0 excluded)
        Q, R = self._Q, self._R
        grad, cgrad = [], []
        for t in range(T):
            e = [X[t][i] - TH[t][i] for i in range(nx)]
            cg = ([ssum([smul(Q[i][j], e[j]) for j in range(nx)]) for i in range(nx)] if t > 0 else []) + \
                 [ssum([smul(R[i][j], U[t][j]) for j in range(nu)]) for i in range(nu)]
            off = nx if t > 0 else 0  # the entries of knot t's free variables in z_t = [x_t, u_t]
            gr = list(cg)
            if t > 0:
                gr[:nx] = [sadd(gr[i], LE[t - 1][i]) for i in range(nx)]
            if t < T - 1:
                J = fJ[t][1]
                for k in range(nx - off, n):
                    gr[k - nx + off] = ssub(gr[k - nx + off], ssum([smul(J[i][k], LE[t][i]) for i in range(nx)]))
            for j in range(nu):
                gr[off + j] = sadd(gr[off + j], LI[t][j] - LI[t][nu + j])
            grad += gr
            cgrad += cg
        mult = torch.maximum(_absmax([v for r in LE for v in r], dres), _absmax([v for r in LI for v in r], dres))
        stat = _absmax(grad, dres) / (1.0 + torch.maximum(_absmax(cgrad, dres), mult))
        stat = torch.where(al_iters > 0, stat, dres)
        return ((pres, cost, (pres <= cfg.tol_primal) & (stat <= cfg.tol_dual) & small_exit & ~nf, stat)
                + tuple(_batch_first(a) for a in (x, u, lam_eq, lam_in, last_eq, last_in)))

    def _scalar(self, v: float, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """A cached 0-d tensor (an input of the compiled functions: a python float would be baked in)."""
        key = (v, dtype, device)
        t = self._const_cache.get(key)
        if t is None:
            t = self._const_cache[key] = torch.tensor(v, dtype=dtype, device=device)
        return t

    # ------------------------------------------------------------------ dispatch
    def _fn(self, name: str) -> Callable:
        if not self.compile or self.compiled_ok is False:
            return self._fns[name]
        f = self._compiled.get(name)
        if f is None:
            f = self._compiled[name] = torch.compile(_fresh(self._fns[name]), fullgraph=True, dynamic=False,
                                                     options=dict(self.compile_options))
        return f

    def _call(self, name: str, *args):
        """Run one of the functions, compiled unless compilation failed (then, after a retry without SIMD code and a
        :class:`RuntimeWarning`, eagerly from now on)."""
        while True:
            try:
                fn = self._fn(name)
            except Exception as err:  # torch.compile is unavailable here (e.g. on an unsupported Python)
                self._give_up(err)
                fn = self._fns[name]
            try:
                out = fn(*args)
                if self.compile and self.compiled_ok is None and len(self._compiled) == len(self._fns):
                    self.compiled_ok = True
                return out
            except Exception as err:
                if not self.compile or self.compiled_ok is False or not _is_compile_error(err):
                    raise
                if self.compile_options.get("cpp.simdlen") != 1:
                    # a compiler that fails on the vectorised kernels (GCC 12 on the cart-pole's Newton step with
                    # AVX-512): compile every function again without SIMD code
                    self.compile_options = {**self.compile_options, "cpp.simdlen": 1}
                    self._compiled.clear()
                    continue
                self._give_up(err)
                return self._fns[name](*args)

    def _give_up(self, err: BaseException) -> None:
        self.compiled_ok = False
        warnings.warn(f"CompiledSolver: torch.compile failed ({type(err).__name__}: {str(err)[:300]}); running its "
                      "functions eagerly, which is slower than deqmpc_gym.mpc.solve -- install a C++ compiler (e.g. "
                      "g++) for the compiled path, or use solve()", RuntimeWarning, stacklevel=4)

    # ------------------------------------------------------------------ public call
    def __call__(self, x0: torch.Tensor, theta: torch.Tensor, state: SolverState | None = None, iters: int = 2,
                 gradient: str | None = None, stop_at_rho_max: bool = False, exit_residual: float | None = None, *,
                 hessian: str | None = None):
        """Run ``iters`` AL iterations, as :func:`deqmpc_gym.mpc.solve` with the same arguments.

        Args:
            x0: ``(B, nx)`` current states; theta: ``(B, T, nx)`` waypoints; state: warm start or ``None`` (cold);
            iters: AL iterations; gradient: ``"implicit"`` or ``"final_implicit"`` (default the config's);
            stop_at_rho_max: streaming mode; exit_residual: Newton exit on the constraint residual;
            hessian: the ``"final_implicit"`` backward's Hessian (``"gauss_newton"`` or ``"exact"``, as
            :func:`solve`).

        Returns:
            ``(x (B,T,nx), u (B,T,nu), state, info)`` as :func:`solve`.

        Raises:
            ShapeError: bad shapes or non-finite inputs. ConfigError: ``gradient="unroll"`` (needs autograd
            through the iterations: use :func:`solve`), bad ``iters`` / ``exit_residual``.
        """
        problem, cfg = self.problem, self._cfg
        check_inputs(problem, x0, theta)
        gradient = check_gradient(cfg, gradient, ("implicit", "final_implicit"))
        hessian = check_hessian(cfg, hessian, gradient)
        check_iters(iters)
        exit_residual = exit_residual_of(cfg, exit_residual)
        needs_grad = torch.is_grad_enabled() and (x0.requires_grad or theta.requires_grad)
        if needs_grad and gradient == "unroll":
            raise ConfigError("CompiledSolver does not support gradient='unroll' (autograd through the "
                              "iterations); use deqmpc_gym.mpc.solve, or gradient='implicit' / 'final_implicit'")
        x0c, thc = x0.to(cfg.dtype), theta.to(cfg.dtype)
        state = self._start_state(x0c.detach(), thc.detach(), state)
        with torch.no_grad():
            loop, consts, settings = self._begin(x0c.detach(), thc.detach(), state, stop_at_rho_max, exit_residual)
            loop = self._iterate(loop, iters, settings, consts)
            fin = self._call("finish", loop.x, loop.u, loop.theta, loop.lam_eq, loop.lam_in, loop.last_eq,
                             loop.last_in, loop.small_exit, loop.dres, loop.nf, loop.al_iters)
        x, u, new_state, info, last = self._answer(loop, consts, fin, x0.shape[0])
        if needs_grad:
            x, u = attach_gradient(problem, gradient, hessian, x0c, thc, thc, x, u, last, new_state.lam_ineq, None)
        return x, u, new_state, info

    def _start_state(self, x0: torch.Tensor, theta: torch.Tensor, state: SolverState | None) -> SolverState:
        """The call's first state: a cold start, or ``state`` checked (control-bound rows only)."""
        if state is None:
            return init_state(self.problem, x0, theta)
        check_state(self.problem, state, x0.shape[0])
        if state.lam_ineq.shape[2] != 2 * self._nu:
            raise ConfigError(f"state.lam_ineq has {state.lam_ineq.shape[2]} rows per knot; this problem has "
                              f"{2 * self._nu} (control bounds)")
        return state

    def _begin(self, x0: torch.Tensor, theta: torch.Tensor, state: SolverState, stop_at_rho_max: bool,
               exit_residual: float) -> tuple[_Loop, dict, _Settings]:
        """The loop state of the call's start (batch-last; padded to the compiled batch size), the cached starting
        values it holds, and the call's settings as tensors."""
        b = x0.shape[0]
        bp = 1 << (b - 1).bit_length() if self.pad_batches else b  # the compiled batch size
        dt, dev = self._cfg.dtype, x0.device
        # contiguous inputs: the compiled functions are specialised to their inputs' strides
        st = [v.detach().to(x0).contiguous() for v in (state.x, state.u, state.lam_eq, state.lam_ineq, state.rho)]
        x0, theta = x0.contiguous(), theta.contiguous()
        if bp != b:  # pad with copies of sample 0 (dropped again by _answer)
            x0, theta, *st = (torch.cat([v, v[:1].expand(bp - b, *v.shape[1:])]) for v in (x0, theta, *st))
        settings = _Settings(self._scalar(exit_residual, dt, dev),
                             self._scalar(self._cfg.rho_max if stop_at_rho_max else math.inf, dt, dev))
        consts = self._constants(bp, dt, dev)
        x, u, th, lam_eq, lam_in, rho, run = self._call("prepare", x0, theta, *st, settings.rho_cap)
        loop = _Loop(x, u, th, lam_eq, lam_in, rho, run, run, consts["inf"], consts["steps"], consts["small_exit"],
                     consts["dres"], consts["fb"], consts["nf"], consts["d_cur"], consts["g_cur"], consts["al_iters"],
                     consts["last_eq"], consts["last_in"], consts["last_rho"])
        return loop, consts, settings

    def _iterate(self, loop: _Loop, iters: int, settings: _Settings, consts: dict) -> _Loop:
        """``iters`` AL iterations of the running samples: Newton steps (:meth:`_step`) until none is active, then
        the dual update of the last step's output."""
        for _ in range(iters):
            if not bool(loop.run.any()):
                break
            loop = loop._replace(active=loop.run.clone(), prev=consts["inf"])  # (aliased inputs would recompile)
            for _ in range(self._cfg.newton_steps):
                out = self._step(loop, settings, consts)
                loop = loop._replace(**{k: getattr(out, k) for k in _CARRY})
                if not bool(loop.active.any()):
                    break
            loop = loop._replace(lam_eq=out.lam_eq, lam_in=out.lam_in, rho=out.rho, nf=out.al_nf,
                                 al_iters=out.al_iters, last_eq=out.last_eq, last_in=out.last_in,
                                 last_rho=out.last_rho, run=out.run)
        return loop

    def _answer(self, loop: _Loop, consts: dict, fin: tuple, b_in: int):
        """``(x, u, state, info, last)`` of the caller's samples (batch-first) from the final loop state and the
        outputs of ``finish``."""
        pres, cost, converged, dres, x, u, lam_eq, lam_in, last_eq, last_in = fin

        def own(v: torch.Tensor, k: str = "") -> torch.Tensor:
            """The caller's samples of ``v``, never a cached starting value (when no AL iteration ran)."""
            v = v if v.shape[0] == b_in else v[:b_in]
            return v.clone() if k and getattr(loop, k) is consts.get(k) else v

        x, u, lam_eq, lam_in, last_eq, last_in, pres, cost, converged, dres = (
            own(v) for v in (x, u, lam_eq, lam_in, last_eq, last_in, pres, cost, converged, dres))
        rho, last_rho, al_iters = own(loop.rho), own(loop.last_rho), own(loop.al_iters, "al_iters")
        new_state = SolverState(x, u, lam_eq, lam_in, rho, None)
        info = SolveInfo(converged, pres, dres, al_iters, own(loop.steps, "steps"), rho, cost,
                         own(loop.fb, "fb"), own(loop.nf, "nf"), torch.zeros_like(converged))  # x: the iterate
        return x, u, new_state, info, LastSubproblem(last_eq, last_in, last_rho, al_iters > 0)

    def _step(self, loop: _Loop, settings: _Settings, consts: dict) -> _NewtonOut:
        """One Newton step of the ``loop.active`` samples (one compiled call), then -- only for the samples that
        need it -- the rare paths of the eager direction and line search as further calls of the same function,
        merged per sample:

        1. a failed factorisation: ``H + mu max|diag H| I`` with ``mu = reg_min``, grown by 1e3 up to twice;
        2. the active-set prediction: re-solve with the predicted rows added (at most twice);
        3. no decrease among the first ``K`` line-search trials: the next ``K`` smaller step lengths, down to
           ``2^-line_search_steps``.
        """
        zero = consts["zero"]

        def newton(active, reg, extra0, alpha0) -> _NewtonOut:
            args = _NewtonIn(loop.x, loop.u, loop.theta, loop.lam_eq, loop.lam_in, loop.rho, active, loop.prev, reg,
                             extra0, alpha0, loop.steps, loop.small_exit, loop.dres, loop.fb, loop.nf, loop.d_cur,
                             loop.g_cur, settings.exit_residual, loop.run, loop.al_iters, loop.last_eq, loop.last_in,
                             loop.last_rho, settings.rho_cap)
            return _NewtonOut(*self._call("newton", *args))

        def merge(take, new: _NewtonOut, old: _NewtonOut) -> _NewtonOut:
            return _NewtonOut(*(torch.where(take, a, c) for a, c in zip(new, old)))  # batch-last: (B,) broadcasts

        reg, extra0, alpha0 = zero, consts["no_extra"], consts["one"]
        out = newton(loop.active, reg, extra0, alpha0)
        if not bool((out.bad | out.redo | out.ls_more).any()):
            return out
        mu = self._cfg.reg_min
        for _ in range(3):  # 1. regularise failed factorisations
            fail = out.bad
            if not bool(fail.any()):
                break
            reg = torch.where(fail, torch.full_like(zero, mu), reg)
            new = newton(fail, reg, extra0, alpha0)
            out = merge(fail & ~new.bad, new, out)
            mu *= REG_GROWTH
        for _ in range(2):  # 2. active-set re-solves
            redo = out.redo
            if not bool(redo.any()):
                break
            ex = torch.where(redo, out.extra, extra0)
            new = newton(redo, reg, ex, alpha0)
            take = redo & ~new.bad
            out = merge(take, new, out)._replace(redo=take & new.redo)  # a failed re-solve stops re-solving
            extra0 = torch.where(take, ex, extra0)
        scale = 1.0
        while True:  # 3. smaller step lengths
            more = out.ls_more
            if not bool(more.any()):
                break
            scale *= 0.5 ** self._K
            alpha0 = torch.where(more, torch.full_like(zero, scale), alpha0)
            out = merge(more, newton(more, reg, extra0, alpha0), out)
        return out


class _Settings(NamedTuple):
    """A call's settings as 0-d tensors (inputs of the compiled functions: python floats would be baked in)."""

    exit_residual: torch.Tensor
    rho_cap: torch.Tensor  #: ``rho_max`` in streaming calls (samples above it stop), else ``inf``


class _Loop(NamedTuple):
    """The state of a call between compiled calls, batch-last (``(T, m, B)`` and ``(B,)``): the AL subproblem
    (``x``, ``u``, ``theta``, ``lam_eq``, ``lam_in``, ``rho``), ``run``: the samples running this AL iteration,
    ``active``: those still in its Newton loop, ``prev``: ``|alpha dz|_inf`` of their last step; the accumulators
    of :class:`SolveInfo`; ``d_cur``, ``g_cur``: the residuals at the iterate; ``last_*``: the last subproblem."""

    x: torch.Tensor
    u: torch.Tensor
    theta: torch.Tensor
    lam_eq: torch.Tensor
    lam_in: torch.Tensor
    rho: torch.Tensor
    run: torch.Tensor
    active: torch.Tensor
    prev: torch.Tensor
    steps: torch.Tensor
    small_exit: torch.Tensor
    dres: torch.Tensor
    fb: torch.Tensor
    nf: torch.Tensor
    d_cur: torch.Tensor
    g_cur: torch.Tensor
    al_iters: torch.Tensor
    last_eq: torch.Tensor
    last_in: torch.Tensor
    last_rho: torch.Tensor


class _NewtonIn(NamedTuple):
    """The inputs of the compiled Newton step, in the order the compiled function takes them: the subproblem,
    the samples stepping and their last step, the rare-path inputs (``reg``, ``extra0``, ``alpha0``: zero, no
    extra rows and 1 on a first attempt), the Newton loop's accumulators, the AL loop's state, the settings."""

    x: torch.Tensor
    u: torch.Tensor
    theta: torch.Tensor
    lam_eq: torch.Tensor
    lam_in: torch.Tensor
    rho: torch.Tensor
    active: torch.Tensor
    prev: torch.Tensor
    reg: torch.Tensor
    extra0: torch.Tensor
    alpha0: torch.Tensor
    steps: torch.Tensor
    small_exit: torch.Tensor
    dres: torch.Tensor
    fb: torch.Tensor
    nf: torch.Tensor
    d_cur: torch.Tensor
    g_cur: torch.Tensor
    exit_residual: torch.Tensor
    run: torch.Tensor
    al_iters: torch.Tensor
    last_eq: torch.Tensor
    last_in: torch.Tensor
    last_rho: torch.Tensor
    rho_cap: torch.Tensor


class _NewtonOut(NamedTuple):
    """The outputs of the compiled Newton step: the Newton loop's state after the step (``x`` .. ``active``), the
    rare-path flags (``bad``: the factorisation failed; ``redo``: the active-set prediction asks for a re-solve with
    the rows ``extra``; ``ls_more``: no decrease among the step lengths tried), and the AL state after the dual
    update (``lam_eq`` .. ``run``; ``al_nf``: the non-finite flag with the update's)."""

    x: torch.Tensor
    u: torch.Tensor
    steps: torch.Tensor
    small_exit: torch.Tensor
    dres: torch.Tensor
    fb: torch.Tensor
    nf: torch.Tensor
    prev: torch.Tensor
    d_cur: torch.Tensor
    g_cur: torch.Tensor
    active: torch.Tensor
    bad: torch.Tensor
    redo: torch.Tensor
    extra: torch.Tensor
    ls_more: torch.Tensor
    lam_eq: torch.Tensor
    lam_in: torch.Tensor
    rho: torch.Tensor
    al_nf: torch.Tensor
    al_iters: torch.Tensor
    last_eq: torch.Tensor
    last_in: torch.Tensor
    last_rho: torch.Tensor
    run: torch.Tensor


class _Model(NamedTuple):
    """The Gauss-Newton model at the iterate, on scalar lists: the merit ``m0``, the multiplier estimates ``mu``
    (dynamics), ``s = lam + rho g`` and its active rows ``act`` and positive part ``mu_in`` (inequalities), the
    merit's and the cost's gradients, the Hessian's diagonal and sub-diagonal blocks."""

    m0: torch.Tensor
    mu: list
    s: list
    act: list
    mu_in: list
    grad: list
    cgrad: list
    D: list
    L: list


class _Direction(NamedTuple):
    """The Newton direction ``dz`` (zero where not ``good``), the fallback flag, and the active-set prediction:
    ``redo`` with the rows ``extra``."""

    dz: list
    good: torch.Tensor
    fallback: torch.Tensor
    redo: torch.Tensor
    extra: torch.Tensor


class _Trial(NamedTuple):
    """The line search: the step length ``alpha`` (0 without a decrease, ``ok`` False), ``ls_more``, the new
    iterate ``x``, ``u`` and its residuals ``d``, ``g`` (scalar lists)."""

    alpha: torch.Tensor
    ok: torch.Tensor
    ls_more: torch.Tensor
    x: list
    u: list
    d: list
    g: list


class _Exit(NamedTuple):
    """The exit test of a Newton step: ``small`` (the step test passed), the stationarity at the linearisation
    point and ``|dz|_inf``."""

    small: torch.Tensor
    dres: torch.Tensor
    step_norm: torch.Tensor


#: the Newton loop's outputs of the compiled step (test hooks read them by name)
_CARRY = _NewtonOut._fields[:11]
_I_BAD = _NewtonOut._fields.index("bad")


def _default_compile_options() -> dict:
    """Inductor options of the compiled functions.

    * ``cpp_wrapper``: a C++ wrapper around the fused kernels (the Python wrapper's ~100 buffer allocations per
      call cost as much as the Pendulum's arithmetic at B = 200; measured 0.58 vs 0.63 ms per streaming call);
    * ``cpp.simdlen = 256`` on x86 CPUs with AVX2 or AVX-512: as fast as AVX-512 on the Pendulum (0.59 vs 0.58 ms),
      and GCC 12 builds the Cart-pole's Newton kernel with it (with AVX-512 it stops with an internal compiler
      error).
    """
    opts: dict = {"cpp_wrapper": True}
    if torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512"):
        opts["cpp.simdlen"] = 256
    return opts


def _fresh(method: Callable) -> Callable:
    """``method`` rebound to a copy of its function with its own code object. ``torch.compile`` caches compiled
    graphs -- and counts them against its recompile limit -- per code object, so every solver (and each of its
    batch sizes) gets its own entries instead of sharing the limit with other solvers."""
    f = method.__func__  # type: ignore[attr-defined]
    g = types.FunctionType(f.__code__.replace(), f.__globals__, f.__name__, f.__defaults__, f.__closure__)
    return types.MethodType(g, method.__self__)  # type: ignore[attr-defined]


def _is_compile_error(err: BaseException) -> bool:
    """Whether ``err`` came from torch's compiler stack (dynamo / inductor / the C++ toolchain)."""
    mod = type(err).__module__ or ""
    return mod.startswith("torch._dynamo") or mod.startswith("torch._inductor") or "Compile" in type(err).__name__
