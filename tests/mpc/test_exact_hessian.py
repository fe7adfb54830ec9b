"""Tests of the exact-Hessian final-implicit gradient (``hessian="exact"``): finite differences of tight solves,
the condensed against the dense KKT system, the curvature blocks against autograd, typed errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from deqmpc_gym.errors import ConfigError
from deqmpc_gym.mpc import MPCConfig, MPCProblem, kkt, solve
from deqmpc_gym.systems import Cartpole, Pendulum, Quadrotor

from test_solver import COLD_ITERS, SYSTEMS, make_batch

# a standalone solve tighter than the default: the FD reference below polishes it further
TIGHT = dict(newton_steps=40, newton_tol=1e-13, tol_primal=1e-11, tol_shooting=1e-10, gradient="final_implicit")


def _instances(name: str, B: int, T: int, seed: int = 0):
    """``(problem, x0 (B,nx), theta (B,T,nx))``: the Pendulum from any state towards half its angle (the torque
    bound active on some samples), the Cart-pole (control weight 0.1, |F| <= 4 N) to the origin from a wide set
    of states."""
    rng = np.random.default_rng(seed)
    if name == "pendulum":
        system = Pendulum()
        x0 = torch.tensor(system.sample_initial_states(rng, B))
        theta = (0.5 * x0)[:, None].expand(B, T, 2).clone()
        return MPCProblem(system, MPCConfig.standalone(T, **TIGHT), R=(0.1,), u_low=(-2.0,), u_high=(2.0,)), x0, theta
    system = Cartpole()
    x0 = torch.tensor(rng.uniform([-1.0, -0.6, -1.0, -1.0], [1.0, 0.6, 1.0, 1.0], (B, 4)))
    theta = torch.zeros(B, T, 4, dtype=torch.float64)
    problem = MPCProblem(system, MPCConfig.standalone(T, **TIGHT), R=(0.1,), u_low=(-4.0,), u_high=(4.0,))
    return problem, x0, theta


def _polish(problem: MPCProblem, x0, theta, u, free, steps: int = 12):
    """Newton's method on the shooting problem ``min_u C(rollout(x0, u), u)`` over the ``free (B,T,nu)`` controls
    (the others held at their bounds), with the autograd Hessian: converges quadratically from the AL solution, so
    its finite differences are accurate to ~1e-10. Returns ``(u, largest free gradient entry)``."""
    B = u.shape[0]
    f = free.reshape(B, -1).to(u.dtype)
    for _ in range(steps):
        with torch.enable_grad():
            uu = u.detach().requires_grad_(True)
            J = problem.cost(problem.rollout(x0, uu), uu, theta).sum()
            (g,) = torch.autograd.grad(J, uu, create_graph=True)
            g = g.reshape(B, -1)
            m = g.shape[1]
            eye = torch.eye(m, dtype=u.dtype)[:, None, :].expand(m, B, m)
            (H,) = torch.autograd.grad(g, uu, eye, is_grads_batched=True)  # (m, B, T, nu): row k of each Hessian
            H = H.reshape(m, B, m).transpose(0, 1)
        Hf = H * f[:, :, None] * f[:, None, :] + torch.diag_embed(1.0 - f)
        du = -torch.linalg.solve(Hf, (g.detach() * f)[..., None])[..., 0]
        u = u + du.reshape(u.shape)
        if float(du.abs().max()) < 1e-15:
            break
    return u, float((g.detach() * f).abs().max())


@pytest.mark.parametrize("name,T", [("pendulum", 5), ("pendulum", 10), ("cartpole", 5), ("cartpole", 10)])
def test_exact_gradient_matches_finite_differences(name, T):
    """d <w, u*> / d(theta, x0) along a random direction: the exact-Hessian gradient equals Richardson-extrapolated
    central differences of tightly polished solves to 1e-6 relative on every converged sample; the Gauss-Newton
    gradient (the default) does not."""
    B = 8
    problem, x0, theta = _instances(name, B, T)
    with torch.no_grad():
        _, u, st, info = solve(problem, x0, theta, iters=60, stop_when_converged=True)
    nu = problem.nu
    free = ~((st.lam_ineq[..., :nu] > 0) | (st.lam_ineq[..., nu:2 * nu] > 0))
    if name == "pendulum":
        assert int((~free).sum()) > 0, "the test needs active torque bounds"
    u_star, gres = _polish(problem, x0, theta, u, free)
    assert gres < 1e-12
    g = torch.Generator().manual_seed(1)
    w = torch.randn(B, T, nu, generator=g, dtype=torch.float64)
    dth = torch.randn(B, T, problem.nx, generator=g, dtype=torch.float64)
    dx0 = 0.1 * torch.randn(B, problem.nx, generator=g, dtype=torch.float64)
    grads = {}
    for hessian in ("gauss_newton", "exact"):
        th, xi = theta.clone().requires_grad_(True), x0.clone().requires_grad_(True)
        _, uu, _, _ = solve(problem, xi, th, iters=60, stop_when_converged=True, hessian=hessian)
        (uu * w).sum().backward()
        grads[hessian] = (th.grad * dth).sum((1, 2)) + (xi.grad * dx0).sum(1)
    fd = []
    for h in (5e-4, 2.5e-4):
        up = _polish(problem, x0 + h * dx0, theta + h * dth, u_star, free)[0]
        um = _polish(problem, x0 - h * dx0, theta - h * dth, u_star, free)[0]
        fd.append(((up - um) * w).sum((1, 2)) / (2 * h))
    ref = (4 * fd[1] - fd[0]) / 3
    ok = info.converged & (ref.abs() > 1e-6)  # (all of a sample's controls at their bounds: no sensitivity)
    assert int(ok.sum()) >= B // 2
    err = {k: ((v - ref).abs() / ref.abs())[ok] for k, v in grads.items()}
    assert float(err["exact"].max()) <= 1e-6, err["exact"]
    assert float(err["gauss_newton"].max()) > 1e-6  # the Gauss-Newton gradient would fail this test


@pytest.mark.parametrize("name,obstacles", [("cartpole", False), ("quadrotor", True)])
def test_exact_condensed_solve_equals_the_dense_system(name, obstacles):
    """With the Lagrangian Hessian the condensed KKT solve still gives the dense system's answers (primal part and
    x_0 multiplier), with active bounds and active obstacle rows."""
    system = SYSTEMS[name]()
    T = 6
    x0, theta = make_batch(system, 12, T, noise=0.1 if obstacles else 1.0)
    kw: dict = {"R": (0.1,)} if name == "cartpole" else {}  # (R = 1e-10 makes the last control's entry 1e10)
    if obstacles:
        a0, a1 = system.position_slice
        kw = dict(obstacle_centers=(theta[:, 3, a0:a1] + 0.2).numpy(), obstacle_radius=0.5)
    problem = MPCProblem(system, MPCConfig(horizon=T, newton_steps=20, newton_tol=1e-10), **kw)
    x, u, st, _ = solve(problem, x0, theta, iters=COLD_ITERS)
    lam = st.lam_ineq
    assert not obstacles or int((lam[..., 2 * problem.nu:] > 0).sum()) > 0, "the test needs active obstacle rows"
    r = torch.randn(x.shape[0], T, problem.n, dtype=x.dtype, generator=torch.Generator().manual_seed(3))
    v, mu, ok = kkt.kkt_solve(problem, x, u, lam, st.obstacle_idx, r, ref=theta, hessian="exact")
    hess = kkt.lagrangian_hessian(problem, x, u, theta, lam, st.obstacle_idx)
    assert float((hess - hess.transpose(-1, -2)).abs().max()) <= 1e-10 * float(hess.abs().max())
    vd, mud, okd = kkt._dense_solve(problem, x, u, lam, st.obstacle_idx, r, hess)
    assert bool(ok.all()) and bool(okd.all())
    assert float((v - vd).abs().max()) <= 1e-9 * float(vd.abs().max())
    well = torch.linalg.cond(kkt.kkt_matrix(problem, x, u, lam, st.obstacle_idx, hess)[0]) < 1e12
    assert int(well.sum()) >= 3
    assert float((mu - mud)[well].abs().max()) <= 1e-6 * float(mud[well].abs().max())
    # the Gauss-Newton solve is a different system: the second-order terms are not negligible here
    v_gn = kkt.kkt_solve(problem, x, u, lam, st.obstacle_idx, r)[0]
    assert float((v - v_gn).abs().max()) > 1e-6 * float(v.abs().max())


def test_lagrangian_curvature_matches_autograd():
    """The curvature blocks equal autograd's Hessian of ``mu^T d + nu^T g`` (dynamics, obstacle rows and a user
    constraint) over the free variables, knot by knot."""
    system = Quadrotor()
    T, B = 3, 2
    g = torch.Generator().manual_seed(0)
    centers = torch.randn(5, 3, generator=g, dtype=torch.float64)

    def user(x, u):  # a nonlinear constraint of each knot
        return (x[..., :1] * u[..., :1]) ** 2 + torch.sin(x[..., 3:4]) * u[..., 1:2] - 1.0

    problem = MPCProblem(system, MPCConfig(horizon=T, n_obstacle_constraints=2), obstacle_centers=centers,
                         obstacle_radius=0.3, constraints=(user,))
    x = 0.3 * torch.randn(B, T, system.nx, generator=g, dtype=torch.float64)
    u = 1.0 + 0.2 * torch.randn(B, T, system.nu, generator=g, dtype=torch.float64)
    obs = problem.select_obstacles(x)
    problem.ineq(x, u, obs, jac=False)  # sets the number of user rows
    mu = torch.randn(B, T - 1, system.nx, generator=g, dtype=torch.float64)
    nu = torch.rand(B, T, problem.n_ineq, generator=g, dtype=torch.float64)
    curv = problem.lagrangian_curvature(x, u, mu, nu, obs)
    for b in range(B):
        def lag(z, b=b):
            xz, uz = z[:, :system.nx][None], z[:, system.nx:][None]
            gz, _ = problem.ineq(xz, uz, obs[b:b + 1], jac=False)
            return (mu[b] * problem.defects(xz, uz)[0]).sum() + (nu[b] * gz[0]).sum()

        H = torch.autograd.functional.hessian(lag, torch.cat([x[b], u[b]], -1))  # (T, n, T, n)
        for t in range(T):
            assert torch.allclose(curv[b, t], H[t, :, t, :], rtol=1e-9, atol=1e-9)


def test_multipliers_satisfy_stationarity_at_a_converged_solution():
    """The KKT multipliers derived at a converged solution agree with the solver's final ones (to its dual
    tolerance) and satisfy the stationarity far more tightly."""
    problem, x0, theta = _instances("pendulum", 8, 10)
    with torch.no_grad():
        x, u, st, info = solve(problem, x0, theta, iters=60, stop_when_converged=True, output="iterate")
    assert bool(info.converged.all())
    mu, nu = kkt.multipliers(problem, x, u, theta, st.lam_ineq, None)
    scale = float(st.lam_eq.abs().max())
    assert float((mu - st.lam_eq).abs().max()) <= 1e-3 * scale
    assert float((nu - st.lam_ineq).abs().max()) <= 1e-3 * scale
    assert bool((problem.stationarity(x, u, theta, mu, nu, None) <= 1e-9).all())


def test_hessian_option_errors():
    """Unknown values and combinations the option does not apply to are ConfigErrors; the default is
    Gauss-Newton."""
    assert MPCConfig().hessian == "gauss_newton"
    with pytest.raises(ConfigError, match="hessian"):
        MPCConfig(hessian="newton")
    with pytest.raises(ConfigError, match="final_implicit"):
        MPCConfig(hessian="exact")  # the default gradient is "implicit"
    MPCConfig(hessian="exact", gradient="final_implicit")
    problem, x0, theta = _instances("pendulum", 2, 5)
    with pytest.raises(ConfigError, match="hessian"):
        solve(problem, x0, theta, hessian="newton")
    for gradient in ("implicit", "unroll"):
        with pytest.raises(ConfigError, match="final_implicit"):
            solve(problem, x0, theta, gradient=gradient, hessian="exact")
