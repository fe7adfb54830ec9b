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
"""

from __future__ import annotations

import torch

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


def kkt_matrix(problem: MPCProblem, x: torch.Tensor, u: torch.Tensor, lam_in: torch.Tensor, obs
               ) -> tuple[torch.Tensor, int]:
    """Dense KKT matrix ``K (B, N, N)``, ``N = T (n + nx + mi)``, at ``x (B,T,nx)``, ``u (B,T,nu)`` with the active
    set ``lam_in (B,T,mi) > 0``; rows: ``x_0 = x0``, dynamics, inequalities. Returns ``(K, n_z = T n)``."""
    A, Bu, Ga, act = _parts(problem, x, u, lam_in, obs)
    c = problem.consts(x)
    b, T, nx, n = x.shape[0], problem.T, problem.nx, problem.n
    mi = Ga.shape[2]
    nz, neq, nin = T * n, T * nx, T * mi
    K = x.new_zeros(b, nz + neq + nin, nz + neq + nin)
    idx = torch.arange(T, device=x.device)
    eye = torch.eye(nx, dtype=x.dtype, device=x.device)
    Wb = x.new_zeros(b, T, n, T, n)
    Wb[:, idx, :, idx, :] = c.W.expand(T, b, n, n)
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


def _dense_solve(problem: MPCProblem, x, u, lam_in, obs, r: torch.Tensor):
    """``(v (B,T,n), mu_0 (B,nx), ok (B,))`` by the dense system of :func:`kkt_matrix`."""
    K, nz = kkt_matrix(problem, x, u, lam_in, obs)
    b = x.shape[0]
    rhs = torch.cat([r.reshape(b, nz), x.new_zeros(b, K.shape[1] - nz)], 1)
    sol, info = torch.linalg.solve_ex(K, rhs[..., None])
    sol = sol[..., 0]
    return sol[:, :nz].reshape(b, problem.T, problem.n), sol[:, nz:nz + problem.nx], (info == 0) & _finite(sol)


def kkt_solve(problem: MPCProblem, x: torch.Tensor, u: torch.Tensor, lam_in: torch.Tensor, obs, r: torch.Tensor
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Solve the KKT system at ``x (B,T,nx)``, ``u (B,T,nu)`` (active set ``lam_in (B,T,mi) > 0``, obstacle indices
    ``obs``) for the right-hand side ``r (B,T,n)`` on the primal rows and 0 on the constraint rows.

    Returns ``v (B,T,n)`` (primal part), ``mu_0 (B,nx)`` (multiplier of the ``x_0 = x0`` row) and ``ok (B,)``:
    False where both the reduced and the dense system are singular or give non-finite values (``v`` and ``mu_0``
    are then 0 there). Same answers as the dense solve of :func:`kkt_matrix` up to round-off."""
    A, Bu, Ga, act = _parts(problem, x, u, lam_in, obs)
    W = problem.consts(x).W
    b, T, nx, nu, n = x.shape[0], problem.T, problem.nx, problem.nu, problem.n
    mi = Ga.shape[2]
    m = T * nu
    # S (B,T,n,m): the knot-t block of the linearised rollout v = S w (x_0 fixed)
    S = x.new_zeros(b, T, n, m)
    eye_u = torch.eye(nu, dtype=x.dtype, device=x.device)
    for t in range(T):
        S[:, t, nx:, t * nu:(t + 1) * nu] = eye_u
        if t + 1 < T:
            S[:, t + 1, :nx] = A[:, t] @ S[:, t, :nx]
            S[:, t + 1, :nx, t * nu:(t + 1) * nu] += Bu[:, t]
    WS = W @ S  # (B,T,n,m)
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
    # stationarity in x_t: (W v - r)_x + mu_t - A_t^T mu_{t+1} + G_x^T nu_t = 0, with no mu_T
    res = (WS @ w[:, None, :, None])[..., 0] - r + (Ga.transpose(-1, -2) @ nu_[..., None])[..., 0]
    mu = -res[:, T - 1, :nx]
    for t in range(T - 2, -1, -1):
        mu = (A[:, t].transpose(-1, -2) @ mu[..., None])[..., 0] - res[:, t, :nx]
    ok = (info == 0) & _finite(sol) & _finite(mu)
    if not bool(ok.all()):
        bad = (~ok).nonzero()[:, 0]
        vd, mud, okd = _dense_solve(problem, x[bad], u[bad], lam_in[bad], None if obs is None else obs[bad], r[bad])
        v, mu = v.clone(), mu.clone()
        v[bad], mu[bad] = vd, mud
        ok = ok.clone()
        ok[bad] = okd
    zero = ~ok
    if bool(zero.any()):
        v = torch.where(zero[:, None, None], torch.zeros_like(v), v)
        mu = torch.where(zero[:, None], torch.zeros_like(mu), mu)
    return v, mu, ok
