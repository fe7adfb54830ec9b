"""The KKT system of the constrained MPC problem at an iterate, solved for the ``"final_implicit"`` gradient.

At ``z* = (x, u)`` the system is ``[[W, J^T, G_a^T], [J, 0, 0], [G_a, 0, E]] [v; mu; nu] = [r; 0; 0]`` with ``W`` the
block-diagonal cost Hessian, ``J`` the linearised equality rows (``x_0 = x0``, then the dynamics defects
``x_{t+1} - A_t x_t - B_t u_t``), ``G_a`` the inequality rows active at ``z*`` (``lam > 0``; inactive rows get
``E = I`` so their multiplier is 0) and ``r`` the incoming gradient of ``(x, u)``.

:func:`kkt_solve` eliminates the equality rows by condensing: every ``v`` with ``J v = 0`` is ``v = S w`` for the
controls' part ``w (B, T nu)`` (``S``: the linearised rollout from a fixed ``x_0``), so the system reduces to the
``T (nu + mi)`` square ``[[S^T W S, (G S)^T], [G S, E]] [w; nu] = [S^T r; 0]``, and ``mu`` follows from the
stationarity in ``x`` by one backward recursion. On the quadrotors (``T (nu + mi)`` = 60 against ``T (2 nx + nu +
mi)`` = 190) that is ~30x fewer flops than the dense solve of :func:`kkt_matrix`, which stays as the reference
and as the fallback for samples whose reduced system is singular.

``W`` is the Gauss-Newton choice (``hessian="gauss_newton"``, the default: the cost's Hessian alone, as mpc.pytorch
/ Diff-MPC). ``hessian="exact"`` replaces it by the Lagrangian Hessian ``W + sum_t nabla^2 (mu_t^T d_t) + sum_i
nu_i nabla^2 g_i`` (:func:`lagrangian_hessian`), block-diagonal over the knots like ``W``, so the same condensed
solve applies; the gradient is then the exact sensitivity of the constrained optimum (with the active set held).
"""

from __future__ import annotations

import torch

from deqmpc_gym.errors import ConfigError
from deqmpc_gym.mpc.problem import MPCProblem


def _finite(t: torch.Tensor) -> torch.Tensor:
    return torch.isfinite(t.reshape(t.shape[0], -1)).all(1)


def _parts(problem: MPCProblem, x: torch.Tensor, u: torch.Tensor, lam_in: torch.Tensor, obs):
    """Jacobians ``A (B,T-1,nx,nx)``, ``Bu (B,T-1,nx,nu)`` at ``(x, u)`` and the masked active rows
    ``Ga (B,T,mi,n)`` with the active mask ``act (B,T,mi)``."""
    b, T, nx, nu = x.shape[0], problem.T, problem.nx, problem.nu
    _, A, Bu = problem.system.step_and_jacobians(x[:, :-1].reshape(-1, nx), u[:, :-1].reshape(-1, nu))
    _, G = problem.ineq(x, u, obs, jac=True)
    act = lam_in > 0
    return A.reshape(b, T - 1, nx, nx), Bu.reshape(b, T - 1, nx, nu), G * act[..., None].to(G.dtype), act


def _condense(A: torch.Tensor, Bu: torch.Tensor, T: int, nx: int, nu: int) -> torch.Tensor:
    """``S (B,T,n,T nu)``: the knot-t block of the linearised rollout ``v = S w`` from a fixed ``x_0`` (``w``: the
    controls' part), for ``A (B,T-1,nx,nx)``, ``Bu (B,T-1,nx,nu)``."""
    b, m = A.shape[0], T * nu
    S = A.new_zeros(b, T, nx + nu, m)
    eye_u = torch.eye(nu, dtype=A.dtype, device=A.device)
    for t in range(T):
        S[:, t, nx:, t * nu:(t + 1) * nu] = eye_u
        if t + 1 < T:
            S[:, t + 1, :nx] = A[:, t] @ S[:, t, :nx]
            S[:, t + 1, :nx, t * nu:(t + 1) * nu] += Bu[:, t]
    return S


def _costates(A: torch.Tensor, res: torch.Tensor, nx: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The equality multipliers from the stationarity in the states, ``res_t + m_t - A_t^T m_{t+1} = 0`` (``res
    (B,T,n)``: every other term of the state rows; no ``m_T``), by one backward recursion. Returns ``(m_0 (B,nx):
    the ``x_0 = x0`` row's, m (B,T-1,nx): the dynamics rows')``."""
    T = res.shape[1]
    ms = [-res[:, T - 1, :nx]]
    for t in range(T - 2, -1, -1):
        ms.append((A[:, t].transpose(-1, -2) @ ms[-1][..., None])[..., 0] - res[:, t, :nx])
    ms.reverse()
    return ms[0], torch.stack(ms[1:], 1)


def multipliers(problem: MPCProblem, x: torch.Tensor, u: torch.Tensor, ref: torch.Tensor, lam_in: torch.Tensor, obs
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """The KKT multipliers of the constrained problem at ``x (B,T,nx)``, ``u (B,T,nu)`` (cost reference ``ref``:
    ``theta (B,T,nx)`` or ``[theta | u_ref] (B,T,nx+nu)``) for the active set ``lam_in (B,T,mi) > 0``: ``(mu
    (B,T-1,nx), nu (B,T,mi))`` of the dynamics rows and the inequality rows (0 on inactive rows).

    They are derived from the KKT stationarity ``grad C + J^T mu + G_a^T nu = 0`` at the point itself rather than
    taken from the solver: its multipliers satisfy the stationarity only to ``tol_dual`` (and lag the primal in
    a rollout answer), which the second-order terms would carry into the gradient. Condensed onto the controls
    (``S``: the linearised rollout), ``nu`` is the least-squares solution of ``(G_a S)^T nu = -S^T grad C`` (the
    reduced gradient carried by the active rows; exact at a KKT point), then ``mu`` follows from the stationarity
    in the states by one backward recursion."""
    A, Bu, Ga, act = _parts(problem, x, u, lam_in, obs)
    return _multipliers(problem, x, u, ref, A, Ga, act, _condense(A, Bu, problem.T, problem.nx, problem.nu))


def _multipliers(problem: MPCProblem, x, u, ref, A, Ga, act, S) -> tuple[torch.Tensor, torch.Tensor]:
    c = problem.consts(x)
    b, T, mi = x.shape[0], problem.T, Ga.shape[2]
    th, du = problem.split_ref(u, ref)
    cg = torch.cat([(x - th) @ c.Q, du @ c.R], -1)  # (B,T,n) cost gradient
    sg = torch.einsum("btnm,btn->bm", S, cg)  # reduced cost gradient
    C = (Ga @ S).reshape(b, T * mi, -1)
    M = C @ C.transpose(-1, -2) + torch.diag_embed((~act).reshape(b, T * mi).to(x.dtype))
    nu_, info = torch.linalg.solve_ex(M, -(C @ sg[..., None]))
    bad = (info != 0) | ~_finite(nu_)
    if bool(bad.any()):  # dependent active rows: the least-squares solution of least norm
        nu_ = nu_.clone()
        nu_[bad] = torch.linalg.pinv(C[bad].transpose(-1, -2)) @ (-sg[bad][..., None])
    nu_ = nu_.reshape(b, T, mi)
    res = cg + (Ga.transpose(-1, -2) @ nu_[..., None])[..., 0]
    return _costates(A, res, problem.nx)[1], nu_


def lagrangian_hessian(problem: MPCProblem, x: torch.Tensor, u: torch.Tensor, ref: torch.Tensor,
                       lam_in: torch.Tensor, obs) -> torch.Tensor:
    """Per-knot blocks ``(B,T,n,n)`` of the Lagrangian Hessian at ``x (B,T,nx)``, ``u (B,T,nu)``: ``W`` plus
    :meth:`MPCProblem.lagrangian_curvature` with the multipliers of :func:`multipliers` (active set ``lam_in >
    0``, cost reference ``ref``)."""
    mu, nu_ = multipliers(problem, x, u, ref, lam_in, obs)
    return problem.consts(x).W + problem.lagrangian_curvature(x, u, mu, nu_, obs)


def kkt_matrix(problem: MPCProblem, x: torch.Tensor, u: torch.Tensor, lam_in: torch.Tensor, obs,
               hess: torch.Tensor | None = None) -> tuple[torch.Tensor, int]:
    """Dense KKT matrix ``K (B, N, N)``, ``N = T (n + nx + mi)``, at ``x (B,T,nx)``, ``u (B,T,nu)`` with the active
    set ``lam_in (B,T,mi) > 0``; rows: ``x_0 = x0``, dynamics, inequalities. ``hess``: the per-knot Hessian blocks
    ``(B,T,n,n)`` (:func:`lagrangian_hessian`), default the cost's ``W``. Returns ``(K, n_z = T n)``."""
    A, Bu, Ga, act = _parts(problem, x, u, lam_in, obs)
    c = problem.consts(x)
    b, T, nx, n = x.shape[0], problem.T, problem.nx, problem.n
    mi = Ga.shape[2]
    nz, neq, nin = T * n, T * nx, T * mi
    K = x.new_zeros(b, nz + neq + nin, nz + neq + nin)
    idx = torch.arange(T, device=x.device)
    eye = torch.eye(nx, dtype=x.dtype, device=x.device)
    Wb = x.new_zeros(b, T, n, T, n)
    Wb[:, idx, :, idx, :] = c.W.expand(T, b, n, n) if hess is None else hess.transpose(0, 1)
    J = x.new_zeros(b, T, nx, T, n)  # equality rows: block 0: x_0; block t+1: d_t
    J[:, 0, :, 0, :nx] = eye
    J[:, idx[1:], :, idx[:-1], :] = -torch.cat([A, Bu], -1).transpose(0, 1)
    J[:, idx[1:], :, idx[1:], :nx] = eye.expand(T - 1, b, nx, nx)
    Gi = x.new_zeros(b, T, mi, T, n)
    Gi[:, idx, :, idx, :] = Ga.transpose(0, 1)
    J, Gi = J.reshape(b, neq, nz), Gi.reshape(b, nin, nz)
    K[:, :nz, :nz] = Wb.reshape(b, nz, nz)
    K[:, nz:nz + neq, :nz] = J
    K[:, :nz, nz:nz + neq] = J.transpose(-1, -2)
    K[:, nz + neq:, :nz] = Gi
    K[:, :nz, nz + neq:] = Gi.transpose(-1, -2)
    K[:, nz + neq:, nz + neq:] = torch.diag_embed((~act).reshape(b, nin).to(x.dtype))
    return K, nz


def _dense_solve(problem: MPCProblem, x, u, lam_in, obs, r: torch.Tensor, hess: torch.Tensor | None = None):
    """``(v (B,T,n), mu_0 (B,nx), ok (B,))`` by the dense system of :func:`kkt_matrix`."""
    K, nz = kkt_matrix(problem, x, u, lam_in, obs, hess)
    b = x.shape[0]
    rhs = torch.cat([r.reshape(b, nz), x.new_zeros(b, K.shape[1] - nz)], 1)
    sol, info = torch.linalg.solve_ex(K, rhs[..., None])
    sol = sol[..., 0]
    return sol[:, :nz].reshape(b, problem.T, problem.n), sol[:, nz:nz + problem.nx], (info == 0) & _finite(sol)


def kkt_solve(problem: MPCProblem, x: torch.Tensor, u: torch.Tensor, lam_in: torch.Tensor, obs, r: torch.Tensor,
              ref: torch.Tensor | None = None, hessian: str = "gauss_newton"
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Solve the KKT system at ``x (B,T,nx)``, ``u (B,T,nu)`` (active set ``lam_in (B,T,mi) > 0``, obstacle indices
    ``obs``) for the right-hand side ``r (B,T,n)`` on the primal rows and 0 on the constraint rows.

    ``hessian``: ``"gauss_newton"`` (the cost's ``W``) or ``"exact"`` (:func:`lagrangian_hessian`, which needs the
    cost reference ``ref``: ``theta (B,T,nx)`` or ``[theta | u_ref] (B,T,nx+nu)``).

    Returns ``v (B,T,n)`` (primal part), ``mu_0 (B,nx)`` (multiplier of the ``x_0 = x0`` row) and ``ok (B,)``:
    False where both the reduced and the dense system are singular or give non-finite values (``v`` and ``mu_0``
    are then 0 there). Same answers as the dense solve of :func:`kkt_matrix` up to round-off."""
    A, Bu, Ga, act = _parts(problem, x, u, lam_in, obs)
    b, T, nx, nu = x.shape[0], problem.T, problem.nx, problem.nu
    mi = Ga.shape[2]
    m = T * nu
    S = _condense(A, Bu, T, nx, nu)  # (B,T,n,m)
    hess = None
    if hessian == "exact":
        if ref is None:
            raise ConfigError("kkt_solve(hessian='exact') needs the cost reference ref")
        mu_dyn, nu_in = _multipliers(problem, x, u, ref, A, Ga, act, S)
        hess = problem.consts(x).W + problem.lagrangian_curvature(x, u, mu_dyn, nu_in, obs)
        WS = hess @ S  # (B,T,n,m)
    else:
        WS = problem.consts(x).W @ S
    H = torch.einsum("btnm,btnk->bmk", S, WS)
    C = (Ga @ S).reshape(b, T * mi, m)  # active rows in w
    Kr = x.new_zeros(b, m + T * mi, m + T * mi)
    Kr[:, :m, :m] = H
    Kr[:, m:, :m] = C
    Kr[:, :m, m:] = C.transpose(-1, -2)
    Kr[:, m:, m:] = torch.diag_embed((~act).reshape(b, T * mi).to(x.dtype))
    rhs = x.new_zeros(b, m + T * mi)
    rhs[:, :m] = torch.einsum("btnm,btn->bm", S, r)
    sol, info = torch.linalg.solve_ex(Kr, rhs[..., None])
    sol = sol[..., 0]
    w, nu_ = sol[:, :m], sol[:, m:].reshape(b, T, mi)
    v = (S @ w[:, None, :, None])[..., 0]  # (B,T,n)
    # stationarity in x_t: (H v - r)_x + mu_t - A_t^T mu_{t+1} + G_x^T nu_t = 0, with no mu_T
    res = (WS @ w[:, None, :, None])[..., 0] - r + (Ga.transpose(-1, -2) @ nu_[..., None])[..., 0]
    mu = _costates(A, res, nx)[0]
    ok = (info == 0) & _finite(sol) & _finite(mu)
    if not bool(ok.all()):
        bad = (~ok).nonzero()[:, 0]
        vd, mud, okd = _dense_solve(problem, x[bad], u[bad], lam_in[bad], None if obs is None else obs[bad], r[bad],
                                    None if hess is None else hess[bad])
        v, mu = v.clone(), mu.clone()
        v[bad], mu[bad] = vd, mud
        ok = ok.clone()
        ok[bad] = okd
    zero = ~ok
    if bool(zero.any()):
        v = torch.where(zero[:, None, None], torch.zeros_like(v), v)
        mu = torch.where(zero[:, None], torch.zeros_like(mu), mu)
    return v, mu, ok
