"""Source of the fused Gauss-Newton loop: one AL subproblem of every sample in one compiled call.

This file is not imported to run. :mod:`deqmpc_gym.mpc.fused` appends its text to a system's generated dynamics
module (:mod:`deqmpc_gym.systems.kernels`, which defines ``step_into(X, U, Y, ws)`` and ``step_jac_into(X, U, Y, J,
ws)`` on rows, with the work space ``ws = workspace()`` allocated once per call of the loop)
and compiles the result with numba, so that numba's disk cache holds one module per system.

The loop is the algorithm of the eager Newton loop of :mod:`deqmpc_gym.mpc.solver` (its steps: the linearisation
:meth:`~deqmpc_gym.mpc.MPCProblem.linearize`, the direction, the line search, the exit test) written per sample
instead of per batch: the same merit, Gauss-Newton model, regularisation fallback, active-set
prediction, backtracking and exit tests, on float64 numpy arrays. Inequality rows per knot: the ``2 nu`` control
bounds, then ``k`` obstacle rows (nearest obstacles ``obs``; knot 0 holds inactive dummies).

The steps that unpack work-space tuples (linearisation, direction, line search, merit) are inlined into the loop:
a call would take and release a reference to every array of the tuple (7 % of the Pendulum's stream call).
The state and control sizes are the generated module's constants ``NX``, ``NU`` (and ``N = NX + NU``), not the
arrays' shapes: numba compiles them as constants, so the loops over them have known trip counts that LLVM unrolls
and vectorises (the same operations in the same order: bit-identical results, 1.2-1.3x faster loops on the
Pendulum and the quadrotors). The entry points check the arrays against them (``_check_sizes``); the horizon and
the number of inequality rows stay run-time sizes.
"""
# ruff: noqa: N803, N806 -- the maths' matrix names (A, D, G, ...)

from __future__ import annotations

NX, NU = 0, 0  # placeholders: the generated dynamics module defines the system's sizes


def workspace():  # placeholder: the generated dynamics module defines the compiled one
    raise NotImplementedError("newton_kernel.py is kernel source, appended to a generated dynamics module")


def step_into(X, U, Y, ws):  # placeholder (see workspace)
    raise NotImplementedError("newton_kernel.py is kernel source, appended to a generated dynamics module")


def step_jac_into(X, U, Y, J, ws):  # placeholder (see workspace)
    raise NotImplementedError("newton_kernel.py is kernel source, appended to a generated dynamics module")


# --- kernel source: everything below this line is appended to the generated dynamics module ---
import math  # noqa: E402
from typing import Any  # noqa: E402

import numpy as np  # noqa: E402
from numba import njit  # noqa: E402

from deqmpc_gym.mpc.linalg_kernels import factor_one, solve_one  # noqa: E402

_NOPTS: dict[str, Any] = {"cache": True, "error_model": "numpy", "nogil": True}
N = NX + NU


@njit(**_NOPTS)
def _check_sizes(nx, nu):  # pragma: no cover - compiled
    """Raise ValueError unless the arrays' state / control sizes are the module's ``NX`` / ``NU``."""
    if nx != NX or nu != NU:
        raise ValueError("kernel arrays do not match the system's state / control sizes (NX, NU)")


@njit(**_NOPTS)
def _factor(D, L, C, Y, S):  # pragma: no cover - compiled
    """:func:`~deqmpc_gym.mpc.linalg_kernels.factor_one` at the system's sizes (``L_t``'s non-zero rows: the
    ``NX`` state rows)."""
    return factor_one(D, L, C, Y, S, NX, N)


@njit(**_NOPTS)
def _solve(C, Y, rhs, out, z):  # pragma: no cover - compiled
    """:func:`~deqmpc_gym.mpc.linalg_kernels.solve_one` at the system's sizes."""
    solve_one(C, Y, rhs, out, z, NX, N)


@njit(**_NOPTS)
def _nmax(a, b):  # pragma: no cover - compiled
    """``max`` that propagates NaN (as torch's ``amax``)."""
    if a != a or b != b:
        return np.nan
    return a if a >= b else b


@njit(**_NOPTS)
def _ineq(x, u, obs, centers, u_low, u_high, radius2, pos0, g, G, jac):  # pragma: no cover - compiled
    """Residuals ``g (T, mi)`` (feasible <= 0) and, if ``jac``, Jacobians ``G (T, mi, n)``."""
    T, nx, nu = x.shape[0], NX, NU
    k = obs.shape[1]
    for t in range(T):
        for j in range(nu):
            g[t, j] = u[t, j] - u_high[j]
            g[t, nu + j] = u_low[j] - u[t, j]
        for q in range(k):
            c = obs[t, q]
            s = 0.0
            for a in range(3):
                dd = x[t, pos0 + a] - centers[c, a]
                s += dd * dd
            go = radius2 - s
            g[t, 2 * nu + q] = go * 0.0 - 1.0 if t == 0 else go
        if jac:
            G[t, :, :] = 0.0
            for j in range(nu):
                G[t, j, nx + j] = 1.0
                G[t, nu + j, nx + j] = -1.0
            if t > 0:
                for q in range(k):
                    c = obs[t, q]
                    for a in range(3):
                        G[t, 2 * nu + q, pos0 + a] = -2.0 * (x[t, pos0 + a] - centers[c, a])


@njit(inline='always', **_NOPTS)
def _du(u, th, t, j, nx):  # pragma: no cover - compiled
    """``u[t, j] - u_ref[t, j]``: ``th (T, nx)`` holds waypoints only (``u_ref = 0``), ``th (T, nx + nu)`` also
    the control reference."""
    if th.shape[1] > nx:
        return u[t, j] - th[t, nx + j]
    return u[t, j]


@njit(**_NOPTS)
def _cost(x, u, th, W, wdiag):  # pragma: no cover - compiled
    T, nx, nu = x.shape[0], NX, NU
    if wdiag:
        a = 0.0
        for t in range(T):
            for i in range(nx):
                e = x[t, i] - th[t, i]
                a += e * e * (0.5 * W[i, i])
        b = 0.0
        for t in range(T):
            for j in range(nu):
                b += _du(u, th, t, j, nx) * _du(u, th, t, j, nx) * (0.5 * W[nx + j, nx + j])
        return a + b
    a = 0.0
    for t in range(T):
        for i in range(nx):
            s = 0.0
            for j in range(nx):
                s += (x[t, j] - th[t, j]) * W[j, i]
            a += s * (x[t, i] - th[t, i])
    b = 0.0
    for t in range(T):
        for i in range(nu):
            s = 0.0
            for j in range(nu):
                s += _du(u, th, t, j, nx) * W[nx + j, nx + i]
            b += s * _du(u, th, t, i, nx)
    return 0.5 * a + 0.5 * b


@njit(**_NOPTS)
def _merit(cost, d, g, leq, lin, rho):  # pragma: no cover - compiled
    hr = 0.5 * rho
    a = 0.0
    for t in range(d.shape[0]):
        for i in range(NX):
            a += (leq[t, i] + hr * d[t, i]) * d[t, i]
    b = 0.0
    for t in range(g.shape[0]):
        for i in range(g.shape[1]):
            if lin[t, i] + rho * g[t, i] > 0:
                b += (lin[t, i] + hr * g[t, i]) * g[t, i]
            else:
                b += lin[t, i] * lin[t, i] * (-0.5 / rho)
    return cost + a + b


@njit(inline="always", **_NOPTS)
def _merit_at(x, u, th, leq, lin, rho, obs, centers, u_low, u_high, radius2, pos0, W, wdiag, fx, d, g,
              G, sw):  # pragma: no cover - compiled
    """Merit at ``(x, u)``; fills the defects ``d`` and residuals ``g`` (``fx``, ``G``, ``sw``: work space)."""
    T = x.shape[0]
    step_into(x[: T - 1], u[: T - 1], fx, sw)
    for t in range(T - 1):
        for i in range(NX):
            d[t, i] = x[t + 1, i] - fx[t, i]
    _ineq(x, u, obs, centers, u_low, u_high, radius2, pos0, g, G, False)
    return _merit(_cost(x, u, th, W, wdiag), d, g, leq, lin, rho)


@njit(**_NOPTS)
def _add_gram(D, G, rows):  # pragma: no cover - compiled
    """``D_t += G_r^T G_r`` over the rows selected by ``rows (T, mi)``."""
    T, mi, n = G.shape[0], G.shape[1], N
    for t in range(T):
        for r in range(mi):
            if rows[t, r]:
                for i in range(n):
                    gi = G[t, r, i]
                    if gi != 0.0:
                        for j in range(n):
                            D[t, i, j] += gi * G[t, r, j]


@njit(**_NOPTS)
def _cost_grad(x, u, th, W, wdiag, grad):  # pragma: no cover - compiled
    """Cost gradient ``[(x - theta) Q, (u - u_ref) R]`` into ``grad (T, n)``; returns its inf-norm without x_0."""
    T, nx, nu = x.shape[0], NX, NU
    for t in range(T):
        for i in range(nx):
            s = 0.0
            if wdiag:
                s = (x[t, i] - th[t, i]) * W[i, i]
            else:
                for j in range(nx):
                    s += (x[t, j] - th[t, j]) * W[j, i]
            grad[t, i] = s
        for i in range(nu):
            s = 0.0
            if wdiag:
                s = _du(u, th, t, i, nx) * W[nx + i, nx + i]
            else:
                for j in range(nu):
                    s += _du(u, th, t, j, nx) * W[nx + j, nx + i]
            grad[t, nx + i] = s
    cnorm = 0.0
    for t in range(T):
        for i in range(nx + nu):
            if t > 0 or i >= nx:
                cnorm = _nmax(cnorm, abs(grad[t, i]))
    return cnorm


@njit(**_NOPTS)
def _merit_grad(J, d, G, g, leq, lin, rho, grad, gd, sv, act):  # pragma: no cover - compiled
    """Adds the constraint terms to ``grad`` (``(cgrad + gdyn) + G^T mu_in``, pinned at x_0); fills the shifted
    residuals ``sv = lam_in + rho g`` and the active set; returns the largest multiplier."""
    T, mi, n = G.shape[0], G.shape[1], N
    nx = NX
    mu_max = 0.0
    gd[:, :] = 0.0  # dynamics: -[A B]^T mu_t on knot t, +mu_t on x_{t+1}
    for t in range(T - 1):
        for j in range(n):
            s = 0.0
            for i in range(nx):
                s += J[t, i, j] * (leq[t, i] + rho * d[t, i])
            gd[t, j] = -s
    for t in range(T - 1):
        for i in range(nx):
            mu = leq[t, i] + rho * d[t, i]
            gd[t + 1, i] += mu
            mu_max = _nmax(mu_max, abs(mu))
    for t in range(T):
        for r in range(mi):
            sv[t, r] = lin[t, r] + rho * g[t, r]
            act[t, r] = sv[t, r] > 0
            mu_max = _nmax(mu_max, abs(max(sv[t, r], 0.0)))
        for j in range(n):
            s = 0.0
            for r in range(mi):
                s += G[t, r, j] * max(sv[t, r], 0.0)
            grad[t, j] = (grad[t, j] + gd[t, j]) + s
    for i in range(nx):
        grad[0, i] = 0.0
    return mu_max


@njit(**_NOPTS)
def _add_jtj(D, J, t):  # pragma: no cover - compiled
    """``D_t += [A B]^T [A B]`` for ``J[t] = [A B] (nx, n)``, each symmetric pair once (the same products in the same
    order as entry by entry)."""
    n, nx = N, NX
    for i in range(n):
        for j in range(i + 1):
            s = 0.0
            for q in range(nx):
                s += J[t, q, i] * J[t, q, j]
            D[t, i, j] += s
            if j < i:
                D[t, j, i] += s


@njit(**_NOPTS)
def _hessian(J, G, act, W, rho, D, L):  # pragma: no cover - compiled
    """Pinned Gauss-Newton blocks: ``D_t = W + rho (active G^T G + [A B]^T [A B] (t < T-1) + I_x (t >= 1))`` and
    ``L_t = H[t+1, t] = -rho [A B]`` on the state rows; knot 0's x_0 rows / columns pinned (unit diagonal)."""
    T, n = D.shape[0], N
    nx = NX
    D[:, :, :] = 0.0
    _add_gram(D, G, act)
    for t in range(T - 1):
        _add_jtj(D, J, t)
        for i in range(nx):
            D[t + 1, i, i] += 1.0
            for j in range(n):
                L[t, i, j] = -rho * J[t, i, j]
    for t in range(T):
        for i in range(n):
            for j in range(n):
                D[t, i, j] = W[i, j] + rho * D[t, i, j]
    for i in range(n):
        for j in range(n):
            if i < nx or j < nx:
                D[0, i, j] = 1.0 if i == j else 0.0
    for i in range(nx):
        for j in range(nx):
            L[0, i, j] = 0.0


@njit(**_NOPTS)
def _factor_regularised(D, L, C, Y, S, D2, reg_min, reg_growth):  # pragma: no cover - compiled
    """Factor; on failure retry with ``mu max|diag D| I`` added, ``mu = reg_min`` grown by ``reg_growth`` (3
    tries). Returns ``(ok, fell_back)``."""
    if _factor(D, L, C, Y, S):
        return True, False
    T, n = D.shape[0], N
    scale = 1.0
    for t in range(T):
        for i in range(n):
            scale = _nmax(scale, abs(D[t, i, i]))
    mu = reg_min
    for _ in range(3):
        D2[:, :, :] = D
        for t in range(T):
            for i in range(n):
                D2[t, i, i] = D[t, i, i] + mu * scale
        if _factor(D2, L, C, Y, S):
            return True, True
        mu *= reg_growth
    return False, True


@njit(**_NOPTS)
def _solve_neg(C, Y, rhs, out, zw):  # pragma: no cover - compiled
    """``out = -H^{-1} rhs``; returns whether every entry is finite."""
    _solve(C, Y, rhs, out, zw)
    fin = True
    for t in range(out.shape[0]):
        for i in range(N):
            out[t, i] = -out[t, i]
            fin = fin and math.isfinite(out[t, i])
    return fin


@njit(**_NOPTS)
def _predict_new_rows(G, dz, sv, act, extra, rho, new_rows):  # pragma: no cover - compiled
    """Inactive rows that the step would make active (``sv + rho G dz > 0``), not yet added; returns any."""
    T, mi, n = G.shape[0], G.shape[1], N
    redo = False
    for t in range(T):
        for r in range(mi):
            s = 0.0
            for j in range(n):
                s += G[t, r, j] * dz[t, j]
            new_rows[t, r] = (sv[t, r] + rho * s > 0) and not act[t, r] and not extra[t, r]
            redo = redo or new_rows[t, r]
    return redo


@njit(**_NOPTS)
def _with_extra_rows(D, grad, G, sv, extra, rho, nx, D2, ge):  # pragma: no cover - compiled
    """The local model with the ``extra`` rows' full PHR quadratic: ``D2 = D + rho G_e^T G_e`` (pinned) and
    ``ge = grad + G_e^T sv_e`` (pinned)."""
    T, mi, n = G.shape[0], G.shape[1], N
    D2[:, :, :] = 0.0
    _add_gram(D2, G, extra)
    for t in range(T):
        for i in range(n):
            pi = 0.0 if (t == 0 and i < nx) else 1.0
            for j in range(n):
                pj = 0.0 if (t == 0 and j < nx) else 1.0
                D2[t, i, j] = D[t, i, j] + rho * D2[t, i, j] * (pi * pj)
        for j in range(n):
            s = 0.0
            for r in range(mi):
                if extra[t, r]:
                    s += G[t, r, j] * sv[t, r]
            ge[t, j] = grad[t, j] + s * (0.0 if (t == 0 and j < nx) else 1.0)


@njit(inline="always", **_NOPTS)
def _direction(D, L, G, grad, sv, act, rho, nx, reg_min, reg_growth, ws, dz):  # pragma: no cover - compiled
    """Newton direction ``dz = -H^{-1} grad`` with the regularisation fallback and up to two active-set
    predictions (as :func:`deqmpc_gym.mpc.solver._newton_direction`); returns the fallback flag."""
    C, Y, C2, Y2, S, D2, ge, dz2, zw, extra, new_rows = ws
    ok_f, fbs = _factor_regularised(D, L, C, Y, S, D2, reg_min, reg_growth)
    _solve_neg(C, Y, grad, dz, zw)
    extra[:, :] = False
    for _ in range(2):
        if not (_predict_new_rows(G, dz, sv, act, extra, rho, new_rows) and ok_f):
            break
        for t in range(extra.shape[0]):
            for r in range(extra.shape[1]):
                extra[t, r] = extra[t, r] or new_rows[t, r]
        _with_extra_rows(D, grad, G, sv, extra, rho, nx, D2, ge)
        if _factor(D2, L, C2, Y2, S) and _solve_neg(C2, Y2, ge, dz2, zw):
            dz[:, :] = dz2
    good = ok_f
    for t in range(dz.shape[0]):
        for i in range(N):
            good = good and math.isfinite(dz[t, i])
    if not good:
        dz[:, :] = 0.0
    return fbs or not good


@njit(inline="always", **_NOPTS)
def _line_search(x, u, dz, m0, ls_steps, th, leq, lin, rho, obs, P, xt, ut, fx, dn, gn, Gw,
                 sw):  # pragma: no cover - compiled
    """Largest ``alpha = 1, 1/2, ..., 2^-ls_steps`` with a strict finite decrease of the merit below ``m0``
    (``dn``, ``gn``: the residuals there); returns ``(alpha, ok)``, ``(0, False)`` when none."""
    centers, W, wdiag, u_low, u_high, radius2, pos0 = P
    T, nx, nu = x.shape[0], NX, NU
    alpha = 1.0
    for j in range(ls_steps + 1):
        for t in range(T):
            for i in range(nx):
                xt[t, i] = x[t, i] + alpha * dz[t, i]
            for i in range(nu):
                ut[t, i] = u[t, i] + alpha * dz[t, nx + i]
        m1 = _merit_at(xt, ut, th, leq, lin, rho, obs, centers, u_low, u_high, radius2, pos0, W, wdiag, fx, dn, gn,
                       Gw, sw)
        if m1 < m0 and math.isfinite(m1):
            return alpha, True
        if j < ls_steps:
            alpha *= 0.5
    return 0.0, False


@njit(**_NOPTS)
def _norms(grad, dz, x, u):  # pragma: no cover - compiled
    """``(||grad||_inf, ||dz||_inf, grad . dz, max(||x||_inf, ||u||_inf))`` (NaN-propagating)."""
    gnorm, snorm, gdz, xnorm = 0.0, 0.0, 0.0, 0.0
    for t in range(grad.shape[0]):
        for i in range(N):
            gnorm = _nmax(gnorm, abs(grad[t, i]))
            snorm = _nmax(snorm, abs(dz[t, i]))
            gdz += grad[t, i] * dz[t, i]
        for i in range(NX):
            xnorm = _nmax(xnorm, abs(x[t, i]))
        for i in range(NU):
            xnorm = _nmax(xnorm, abs(u[t, i]))
    return gnorm, snorm, gdz, xnorm


@njit(**_NOPTS)
def _residual_norm(dn, gn):  # pragma: no cover - compiled
    """``||[d; max(g, 0)]||_2``."""
    res = 0.0
    for t in range(dn.shape[0]):
        for i in range(NX):
            res += dn[t, i] * dn[t, i]
    for t in range(gn.shape[0]):
        for r in range(gn.shape[1]):
            v = max(gn[t, r], 0.0)
            res += v * v
    return math.sqrt(res)


@njit(inline="always", **_NOPTS)
def _linearize(x, u, th, leq, lin, rho, obs, P, ws):  # pragma: no cover - compiled
    """Merit, pinned gradient and Hessian blocks at ``(x, u)`` into the work arrays ``ws``; returns
    ``(merit, ||cost grad||_inf, largest multiplier)``."""
    centers, W, wdiag, u_low, u_high, radius2, pos0 = P
    fx, J, d, g, G, gd, grad, sv, act, D, L, sw = ws
    T, nx = x.shape[0], NX
    step_jac_into(x[: T - 1], u[: T - 1], fx, J, sw)
    for t in range(T - 1):
        for i in range(nx):
            d[t, i] = x[t + 1, i] - fx[t, i]
    _ineq(x, u, obs, centers, u_low, u_high, radius2, pos0, g, G, True)
    m0 = _merit(_cost(x, u, th, W, wdiag), d, g, leq, lin, rho)
    cnorm = _cost_grad(x, u, th, W, wdiag, grad)
    mu_max = _merit_grad(J, d, G, g, leq, lin, rho, grad, gd, sv, act)
    _hessian(J, G, act, W, rho, D, L)
    return m0, cnorm, mu_max


@njit(**_NOPTS)
def _workspace(T, nx, nu, mi):  # pragma: no cover - compiled
    n = nx + nu
    lin_ws = (np.empty((T - 1, nx)), np.empty((T - 1, nx, n)), np.empty((T - 1, nx)), np.empty((T, mi)),
              np.empty((T, mi, n)), np.empty((T, n)), np.empty((T, n)), np.empty((T, mi)),
              np.empty((T, mi), dtype=np.bool_), np.empty((T, n, n)), np.zeros((T - 1, n, n)), workspace())
    dir_ws = (np.empty((T, n, n)), np.empty((max(T - 1, 0), n, n)), np.empty((T, n, n)),
              np.empty((max(T - 1, 0), n, n)), np.empty((n, n)), np.empty((T, n, n)), np.empty((T, n)),
              np.empty((T, n)), np.empty((T, n)), np.empty((T, mi), dtype=np.bool_),
              np.empty((T, mi), dtype=np.bool_))
    ls_ws = (np.empty((T, nx)), np.empty((T, nu)), np.empty((T - 1, nx)), np.empty((T - 1, nx)), np.empty((T, mi)),
             np.empty((T, mi, n)), lin_ws[11])
    return lin_ws, dir_ws, ls_ws, np.empty((T, n))


@njit(inline="always", **_NOPTS)
def _newton_one(x, u, th, leq, lin, rho, obs, P, settings, ws, dout, gout):  # pragma: no cover - compiled
    """The Newton loop of one sample from ``(x (T, nx), u (T, nu))``, updated in place (inputs as one sample of
    :func:`newton_loop`; ``ws = _workspace(...)``); fills the defects ``dout`` and residuals ``gout`` at the new
    iterate. Returns ``(steps, small_exit, dual_residual, fallback, nonfinite)``."""
    newton_steps, newton_tol, exit_residual, ls_steps, reg_min, reg_growth = settings
    lin_ws, dir_ws, ls_ws, dz = ws
    nx = NX
    d, g, grad, sv, act, D, L, G = lin_ws[2], lin_ws[3], lin_ws[6], lin_ws[7], lin_ws[8], lin_ws[9], lin_ws[10], \
        lin_ws[4]
    xt, ut, fx2, dn, gn, Gw, sw = ls_ws
    steps, small_exit, dres, fb, nf = 0, False, np.inf, False, False
    prev_step = np.inf
    for _ in range(newton_steps):
        m0, cnorm, mu_max = _linearize(x, u, th, leq, lin, rho, obs, P, lin_ws)
        fbs = _direction(D, L, G, grad, sv, act, rho, nx, reg_min, reg_growth, dir_ws, dz)
        gnorm, snorm, gdz, xnorm = _norms(grad, dz, x, u)
        tol_s = newton_tol * (1.0 + xnorm)
        small = snorm <= tol_s or abs(gdz) <= 1e-13 * (1.0 + abs(m0))
        alpha, ok = _line_search(x, u, dz, m0, ls_steps, th, leq, lin, rho, obs, P, xt, ut, fx2, dn, gn, Gw, sw)
        if not ok:
            dn[:, :] = d
            gn[:, :] = g
        rate = snorm / prev_step  # contraction estimate: the confirming step would be below tolerance
        small = small or (alpha == 1.0 and math.isfinite(prev_step) and rate < 1.0
                          and rate / (1.0 - rate) * snorm <= tol_s)
        if exit_residual > 0.0:
            small = small or (ok and _residual_norm(dn, gn) <= exit_residual)
        for t in range(x.shape[0]):
            for i in range(nx):
                x[t, i] += alpha * dz[t, i]
            for i in range(NU):
                u[t, i] += alpha * dz[t, nx + i]
        steps += 1 if ok else 0
        small_exit, dres = small, gnorm / (1.0 + _nmax(cnorm, mu_max))
        fb, nf = fb or fbs, nf or not math.isfinite(m0)
        prev_step = alpha * snorm
        dout[:, :] = dn
        gout[:, :] = gn
        if small or not ok:
            break
    return steps, small_exit, dres, fb, nf


@njit(**_NOPTS)
def newton_loop(X, U, TH, LEQ, LIN, RHO, OBS, P, settings, XO, UO, STEPS, SMALL, DRES, FB, NF, DO,
                GO):  # pragma: no cover - compiled
    """Gauss-Newton on the AL merit of every sample (see the module docstring).

    Inputs ``X (B, T, nx)``, ``U (B, T, nu)``, ``TH (B, T, nx)`` (``(B, T, nx + nu)``: ``[theta | u_ref]``),
    ``LEQ (B, T-1, nx)``, ``LIN (B, T, mi)``,
    ``RHO (B,)``, ``OBS (B, T, k)`` int64; ``P = (centers (K, 3), W (n, n), W is diagonal, u_low, u_high,
    radius^2, first position index)``; ``settings = (newton_steps, newton_tol, exit_residual, line_search_steps,
    reg_min, reg_growth)``. Outputs ``XO``, ``UO`` (the new iterate), ``STEPS``, ``SMALL`` (exited by the step
    test), ``DRES`` (stationarity before the last step), ``FB`` (factorisation fallback), ``NF`` (non-finite
    merit), ``DO``, ``GO`` (defects and residuals at the new iterate).
    """
    _check_sizes(X.shape[2], U.shape[2])
    ws = _workspace(X.shape[1], NX, NU, LIN.shape[2])
    for b in range(X.shape[0]):
        XO[b, :, :] = X[b]
        UO[b, :, :] = U[b]
        STEPS[b], SMALL[b], DRES[b], FB[b], NF[b] = _newton_one(XO[b], UO[b], TH[b], LEQ[b], LIN[b], RHO[b], OBS[b],
                                                                P, settings, ws, DO[b], GO[b])


@njit(**_NOPTS)
def _dual_update(leq, lin, d, g, rho, leq_new, lin_new):  # pragma: no cover - compiled
    """``leq_new = leq + rho d``, ``lin_new = max(lin + rho g, 0)`` (NaN kept); returns whether all are finite."""
    fin = True
    for t in range(d.shape[0]):
        for i in range(NX):
            v = leq[t, i] + rho * d[t, i]
            leq_new[t, i] = v
            fin = fin and math.isfinite(v)
    for t in range(g.shape[0]):
        for r in range(g.shape[1]):
            v = lin[t, r] + rho * g[t, r]
            v = 0.0 if v < 0.0 else v
            lin_new[t, r] = v
            fin = fin and math.isfinite(v)
    return fin


@njit(**_NOPTS)
def _violation(d, g):  # pragma: no cover - compiled
    """``max(|d|, max(g, 0))`` (NaN-propagating, as :meth:`~deqmpc_gym.mpc.MPCProblem.violation_from`)."""
    v = 0.0
    for t in range(d.shape[0]):
        for i in range(NX):
            v = _nmax(v, abs(d[t, i]))
    for t in range(g.shape[0]):
        for r in range(g.shape[1]):
            v = _nmax(v, g[t, r] if not g[t, r] < 0.0 else 0.0)
    return v


@njit(**_NOPTS)
def al_loop(X0, X, U, TH, LEQ, LIN, RHO, OBS, P, settings, al_settings, outs):  # pragma: no cover - compiled
    """``iters`` AL iterations of every sample (:func:`deqmpc_gym.mpc.solver._al_iterations` without autograd
    and without ``stop_when_converged``): per iteration the Newton loop (:func:`_newton_one`), the dual update
    (a non-finite one keeps the multipliers and is flagged) and the penalty growth.

    Inputs as :func:`newton_loop` (``X``: the start's states, whose knot 0 is replaced by ``X0 (B, nx)``;
    ``LEQ``, ``LIN``, ``RHO``: the start's multipliers and penalty);
    ``al_settings = (iters, stop_at_rho_max, rho_max, rho_growth, rho_cap, tol_primal, tol_dual)``: with
    ``stop_at_rho_max`` a sample runs no further iteration once its penalty exceeds ``rho_max``. ``outs = (XO, UO,
    LEQO, LINO, RHOO, LEQL, LINL, RHOL, ITERS, STEPS, SMALL, DRES, FB, NF, DO, GO, PRES, CONV)``: the final
    iterate, multipliers and penalty; those of the last subproblem (the start's where none ran); AL iterations and
    Newton steps run; the last Newton loop's exit test and stationarity; the fallback and non-finite flags; the
    defects and residuals at the final iterate, their largest violation ``max(|d|, max(g, 0))`` and the convergence
    flag (``PRES <= tol_primal``, ``DRES <= tol_dual``, exited by the step test, all finite) -- these four valid
    where ``ITERS > 0``."""
    iters, stop_at_rho_max, rho_max, rho_growth, rho_cap, tol_primal, tol_dual = al_settings
    XO, UO, LEQO, LINO, RHOO, LEQL, LINL, RHOL, ITERS, STEPS, SMALL, DRES, FB, NF, DO, GO, PRES, CONV = outs
    _check_sizes(X.shape[2], U.shape[2])
    T, mi = X.shape[1], LIN.shape[2]
    ws = _workspace(T, NX, NU, mi)
    leq_new, lin_new = np.empty((T - 1, NX)), np.empty((T, mi))
    for b in range(X.shape[0]):
        x, u, leq, lin = XO[b], UO[b], LEQO[b], LINO[b]
        x[:, :] = X[b]
        x[0, :] = X0[b]
        u[:, :] = U[b]
        leq[:, :] = LEQ[b]
        lin[:, :] = LIN[b]
        rho = RHO[b]
        LEQL[b, :, :] = leq
        LINL[b, :, :] = lin
        RHOL[b] = rho
        ITERS[b], STEPS[b], SMALL[b], DRES[b], FB[b], NF[b] = 0, 0, False, np.inf, False, False
        for _ in range(iters):
            if stop_at_rho_max and not rho <= rho_max:
                break
            steps, small, dres, fb, nf = _newton_one(x, u, TH[b], leq, lin, rho, OBS[b], P, settings, ws, DO[b],
                                                     GO[b])
            fin = _dual_update(leq, lin, DO[b], GO[b], rho, leq_new, lin_new)
            LEQL[b, :, :] = leq
            LINL[b, :, :] = lin
            RHOL[b] = rho
            if fin:
                leq[:, :] = leq_new
                lin[:, :] = lin_new
            rho = rho * rho_growth
            rho = rho_cap if rho > rho_cap else rho
            ITERS[b] += 1
            STEPS[b] += steps
            SMALL[b], DRES[b], FB[b], NF[b] = small, dres, FB[b] or fb, NF[b] or nf or not fin
        RHOO[b] = rho
        pres = _violation(DO[b], GO[b])
        PRES[b] = pres
        CONV[b] = pres <= tol_primal and DRES[b] <= tol_dual and SMALL[b] and not NF[b]


@njit(**_NOPTS)
def implicit_solve(X, U, TH, LEQ, LIN, RHO, OBS, P, RHS, V, CROSS, OK):  # pragma: no cover - compiled
    """The implicit gradient's linear solve (:class:`deqmpc_gym.mpc.solver._ImplicitFn`) of every sample:
    linearise the AL merit at ``(X, U)`` (inputs as in :func:`newton_loop`), factor the pinned Gauss-Newton
    ``H`` (no regularisation) and solve ``H V = RHS`` (``RHS (B, T, n)`` pinned); ``CROSS (B, nx)`` is
    ``H_{x0, z} V`` with the unpinned couplings of ``x_0`` with knots 0 and 1 (for ``d/dx0``); ``OK (B,)`` is
    whether the factorisation succeeded and ``V`` is finite."""
    _check_sizes(X.shape[2], U.shape[2])
    T, nx = X.shape[1], NX
    n = N
    W = P[1]
    lin_ws, dir_ws, _, _ = _workspace(T, nx, NU, LIN.shape[2])
    J, G, act, D, L = lin_ws[1], lin_ws[4], lin_ws[8], lin_ws[9], lin_ws[10]
    C, Y, S, zw = dir_ws[0], dir_ws[1], dir_ws[4], dir_ws[8]
    for b in range(X.shape[0]):
        rho = RHO[b]
        _linearize(X[b], U[b], TH[b], LEQ[b], LIN[b], rho, OBS[b], P, lin_ws)
        ok = _factor(D, L, C, Y, S)
        v = V[b]
        if ok:
            _solve(C, Y, RHS[b], v, zw)
            for t in range(T):
                for i in range(n):
                    ok = ok and math.isfinite(v[t, i])
        OK[b] = ok
        for j in range(nx):  # unpinned D_0[:, j] . v_0 + L_0[:, j] . v_1
            s = 0.0
            for i in range(n):
                h = 0.0
                for q in range(nx):
                    h += J[0, q, i] * J[0, q, j]
                for r in range(G.shape[1]):
                    if act[0, r]:
                        h += G[0, r, i] * G[0, r, j]
                s += (W[i, j] + rho * h) * v[0, i]
            if T > 1:
                for i in range(nx):
                    s -= rho * J[0, i, j] * v[1, i]
            CROSS[b, j] = s


@njit(**_NOPTS)
def _costates(x, th, J, W, qe, lam):  # pragma: no cover - compiled
    """The shooting costates of the rollout ``x (T, nx)`` with Jacobians ``J (T-1, nx, n)``: ``qe = (x - theta)
    Q``, ``lam_{T-2} = -qe_{T-1}``, ``lam_{t-1} = A_t^T lam_t - qe_t``; returns ``(all finite, max |lam|)``."""
    T, nx = x.shape[0], NX
    for t in range(T):
        for i in range(nx):
            s = 0.0
            for j in range(nx):
                s += (x[t, j] - th[t, j]) * W[j, i]
            qe[t, i] = s
    for i in range(nx):
        lam[T - 2, i] = -qe[T - 1, i]
    for t in range(T - 2, 0, -1):
        for i in range(nx):
            s = 0.0
            for q in range(nx):
                s += J[t, q, i] * lam[t, q]
            lam[t - 1, i] = s - qe[t, i]
    fin, lmax = True, 0.0
    for t in range(T - 1):
        for i in range(nx):
            fin = fin and math.isfinite(lam[t, i])
            lmax = _nmax(lmax, abs(lam[t, i]))
    return fin, lmax


@njit(**_NOPTS)
def _projected_gradient(u, th, J, lam, W, u_low, u_high):  # pragma: no cover - compiled
    """``(all finite, max |pg|, max |R (u - u_ref)|, bound violation)`` of the projected reduced gradient
    ``pg = u - clip(u - grad_u J, u_low, u_high)``, ``grad_u J = R (u - u_ref) - B^T lam``."""
    T, nu = u.shape[0], NU
    nx = NX
    fin, pmax, rmax, viol = True, 0.0, 0.0, 0.0
    for t in range(T):
        for j in range(nu):
            r = 0.0
            for k in range(nu):
                r += _du(u, th, t, k, nx) * W[nx + k, nx + j]
            rmax = _nmax(rmax, abs(r))
            gr = r
            if t < T - 1:
                s = 0.0
                for q in range(nx):
                    s += J[t, q, nx + j] * lam[t, q]
                gr -= s
            pg = u[t, j] - _nmax(min(u[t, j] - gr, u_high[j]), u_low[j])
            fin = fin and math.isfinite(pg)
            pmax = _nmax(pmax, abs(pg))
            viol = _nmax(viol, _nmax(_nmax(u[t, j] - u_high[j], 0.0), _nmax(u_low[j] - u[t, j], 0.0)))
    return fin, pmax, rmax, viol


@njit(**_NOPTS)
def shooting_kkt(X0, U, TH, P, VIOL, STAT):  # pragma: no cover - compiled
    """:func:`deqmpc_gym.mpc.polish.shooting_kkt` of every sample: the rollout of ``U (B, T, nu)`` from
    ``X0 (B, nx)``, its Jacobians, the costates by one backward pass and the projected reduced gradient of the
    cost (``TH``: ``(B, T, nx)`` waypoints or ``(B, T, nx + nu)`` with the control reference; ``P`` as in
    :func:`newton_loop`). Outputs ``VIOL (B,)`` (largest control-bound violation) and ``STAT (B,)`` (relative
    stationarity; inf where the costates or the projected gradient are not finite)."""
    W, u_low, u_high = P[1], P[3], P[4]
    _check_sizes(X0.shape[1], U.shape[2])
    T, nu = U.shape[1], NU
    nx = NX
    x, fx = np.empty((T, nx)), np.empty((1, nx))
    J, lam, qe = np.empty((T - 1, nx, nx + nu)), np.empty((T - 1, nx)), np.empty((T, nx))
    sw = workspace()
    for b in range(X0.shape[0]):
        u, th = U[b], TH[b]
        for i in range(nx):
            x[0, i] = X0[b, i]
        for t in range(T - 1):
            step_jac_into(x[t:t + 1], u[t:t + 1], fx, J[t:t + 1], sw)
            for i in range(nx):
                x[t + 1, i] = fx[0, i]
        fin_l, lmax = _costates(x, th, J, W, qe, lam)
        fin_p, pmax, rmax, viol = _projected_gradient(u, th, J, lam, W, u_low, u_high)
        VIOL[b] = viol
        STAT[b] = pmax / (1.0 + _nmax(rmax, lmax)) if (fin_l and fin_p) else np.inf
