"""The shooting polish (``MPCConfig.polish_iters``, ``deqmpc_gym.mpc.polish``): its model is the single-shooting
problem's, it only lowers the cost and stays within the bounds, and ``solve`` uses it where the AL iterations stop
short -- never in calls that attach the implicit gradient, never in DEQ-MPC's fixed-iteration calls."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from deqmpc_gym.errors import ConfigError
from deqmpc_gym.mpc import MPCConfig, MPCProblem, shooting_kkt, solve
from deqmpc_gym.mpc.polish import sensitivities, shooting_model, shooting_polish
from deqmpc_gym.systems import Cartpole, Pendulum


def _cartpole(B: int, T: int, seed: int = 0, bound: float = 100.0, **cfg: object):
    system = Cartpole()
    rng = np.random.default_rng(seed)
    x0 = torch.tensor(system.sample_initial_states(rng, B))
    theta = torch.zeros(B, T, system.nx, dtype=torch.float64)
    problem = MPCProblem(system, MPCConfig.standalone(T, **cfg), R=[0.1], u_low=[-bound], u_high=[bound])
    return problem, x0, theta


def test_the_model_is_the_single_shooting_problems():
    """``S = dx/du`` and the gradient of ``J(u) = C(rollout(u), u)`` equal autograd's; ``H`` is ``S^T Q S + R``."""
    problem, x0, theta = _cartpole(3, 6)
    rng = np.random.default_rng(1)
    u = torch.tensor(rng.uniform(-5.0, 5.0, (3, 6, 1)))
    u_ref = torch.full((3, 6, 1), 0.3, dtype=torch.float64)
    ref = torch.cat([theta, u_ref], -1)
    x = problem.rollout(x0, u)
    _, A, Bu = problem.dynamics(x, u)
    S = sensitivities(A, Bu)
    for b in range(3):
        jac = torch.autograd.functional.jacobian(lambda v, b=b: problem.rollout(x0[b:b + 1], v[None])[0], u[b])
        torch.testing.assert_close(S[b], jac, rtol=1e-9, atol=1e-12)
    H, g, _ = shooting_model(problem, x0, ref, u)
    uu = u.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(problem.cost(problem.rollout(x0, uu), uu, ref).sum(), uu)
    torch.testing.assert_close(g, grad.reshape(3, -1), rtol=1e-9, atol=1e-12)
    Sf = S.reshape(3, 6 * problem.nx, 6)
    Q = torch.block_diag(*([problem.consts(u).Q] * 6))
    torch.testing.assert_close(H, Sf.transpose(1, 2) @ Q @ Sf + 0.1 * torch.eye(6, dtype=torch.float64))


def test_the_polish_lowers_the_cost_within_the_bounds_to_a_kkt_point():
    """From controls far off (some beyond the bounds), the polish ends within the bounds at a point that passes
    the shooting test, at a lower cost; the bound multipliers are positive exactly on the active bounds."""
    problem, x0, theta = _cartpole(8, 10, seed=3, bound=1.0)
    rng = np.random.default_rng(3)
    u = torch.tensor(rng.uniform(-150.0, 150.0, (8, 10, 1)))
    res = shooting_polish(problem, x0, theta, u, iters=100)
    c = problem.consts(u)
    assert bool(res.converged.all()), res.stationarity
    assert bool(((res.u >= c.u_low) & (res.u <= c.u_high)).all())
    u0 = u.clamp(c.u_low, c.u_high)
    cost0 = problem.cost(problem.rollout(x0, u0), u0, theta)
    cost = problem.cost(problem.rollout(x0, res.u), res.u, theta)
    assert bool((cost < cost0).all())
    viol, stat = shooting_kkt(problem, x0, theta, res.u)
    torch.testing.assert_close(stat, res.stationarity)
    assert float(viol.max()) == 0.0
    at_hi, at_lo = res.u >= c.u_high, res.u <= c.u_low
    assert bool(at_hi.any() or at_lo.any())  # the bounds are active on this problem
    assert bool(((res.lam_box[..., :1] > 0) <= at_hi).all() and ((res.lam_box[..., 1:] > 0) <= at_lo).all())
    assert bool((res.lam_box >= 0).all())
    # nothing to do at a KKT point: no iteration runs
    again = shooting_polish(problem, x0, theta, res.u, iters=100)
    assert int(again.iters.max()) == 0 and torch.equal(again.u, res.u)


def test_solve_polishes_what_the_al_iterations_leave_unconverged():
    """With too few AL iterations to converge, ``polish_iters`` turns the answers into converged rollouts at a
    lower cost (``info.polished``); samples the AL iterations converged are untouched."""
    problem, x0, theta = _cartpole(12, 20, seed=7, polish_iters=0)
    x_al, u_al, _, info_al = solve(problem, x0, theta, iters=2, stop_when_converged=True)
    assert int(info_al.converged.sum()) < 12 and info_al.polished is None
    polished = MPCProblem(problem.system, MPCConfig.standalone(20), R=[0.1])  # the standalone default polishes
    x, u, state, info = solve(polished, x0, theta, iters=2, stop_when_converged=True)
    assert bool(info.converged.all()) and torch.equal(info.polished, ~info_al.converged)
    assert bool((info.cost <= info_al.cost + 1e-12).all())
    torch.testing.assert_close(x, polished.rollout(x0, u), rtol=0, atol=1e-12)
    keep = info_al.converged
    assert torch.equal(u[keep], u_al[keep]) and torch.equal(state.u, u)


def test_the_polish_is_skipped_where_it_would_change_a_gradient_or_a_deq_mpc_iteration():
    """The implicit gradient differentiates the last AL subproblem: no polish there. The final-implicit one is
    taken at the returned answer: the polish runs and the forward answer is the no-graph call's. DEQ-MPC's fixed
    iteration calls (no ``stop_when_converged``) return the iterate, never polished."""
    problem, x0, theta = _cartpole(6, 12, seed=2, bound=1.0, polish_iters=100)
    _, u_ng, _, info_ng = solve(problem, x0, theta, iters=1, stop_when_converged=True)
    assert bool(info_ng.polished.any())
    th = theta.clone().requires_grad_(True)
    _, u_imp, _, info_imp = solve(problem, x0, th, iters=1, stop_when_converged=True, gradient="implicit")
    assert info_imp.polished is None and not bool(info_imp.converged.all())
    _, u_fi, _, info_fi = solve(problem, x0, th, iters=1, stop_when_converged=True, gradient="final_implicit")
    torch.testing.assert_close(u_fi.detach(), u_ng, rtol=0, atol=0)
    (g,) = torch.autograd.grad(u_fi.sum(), th)
    assert bool(torch.isfinite(g).all())
    _, _, _, info_fixed = solve(problem, x0, theta, iters=1)
    assert info_fixed.polished is None


def test_polish_config_and_unsupported_problems():
    with pytest.raises(ConfigError, match="polish_iters"):
        MPCConfig(polish_iters=-1)
    with pytest.raises(ConfigError, match="rho_progress"):
        MPCConfig(rho_progress=-0.5)
    system = Pendulum()
    problem = MPCProblem(system, MPCConfig(horizon=5), constraints=[lambda x, u: x[..., :1] - 10.0])
    with pytest.raises(ValueError, match="control bounds only"):
        shooting_polish(problem, torch.zeros(1, 2, dtype=torch.float64), torch.zeros(1, 5, 2, dtype=torch.float64),
                        torch.zeros(1, 5, 1, dtype=torch.float64), iters=3)


def test_the_exact_hessian_is_the_shooting_costs_and_speeds_up_slow_samples(monkeypatch: pytest.MonkeyPatch):
    """``shooting_model(..., exact=True)``'s Hessian equals autograd's Hessian of ``J(u)``; on the suite's car
    (waypoints it cannot reach: large residuals, where Gauss-Newton converges linearly) samples that 40
    Gauss-Newton iterations leave unconverged converge once the exact Hessian takes over."""
    import os
    import sys

    from deqmpc_gym.mpc import polish

    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "benchmarks"))
    import solver_suite as suite

    inst = suite.make_instances("car", 20, 200, "tune")
    car = suite.make_problem(inst)
    u = torch.tensor(np.random.default_rng(4).uniform(-0.5, 0.5, (2, 20, 2)))
    H, _, He = shooting_model(car, inst.x0[:2], inst.theta[:2], u, exact=True)
    for b in range(2):
        def cost(v, b=b):
            w = v.view(1, 20, 2)
            return car.cost(car.rollout(inst.x0[b:b + 1], w), w, inst.theta[b:b + 1])[0]

        exact = torch.autograd.functional.hessian(cost, u[b].reshape(-1))
        torch.testing.assert_close(He[b], exact, rtol=1e-9, atol=1e-10)
        assert float((exact - H[b]).abs().max()) > 0.1 * float(exact.abs().max())  # GN drops real curvature
    rows = [31, 59, 109]
    x0c, thc = inst.x0[rows], inst.theta[rows]
    u0 = torch.zeros(3, 20, 2, dtype=torch.float64)
    monkeypatch.setattr(polish, "EXACT_AFTER", None)
    gn = shooting_polish(car, x0c, thc, u0, iters=40)
    monkeypatch.setattr(polish, "EXACT_AFTER", 20)
    ex = shooting_polish(car, x0c, thc, u0, iters=40)
    assert not bool(gn.converged.any()) and bool(ex.converged.all()), (gn.stationarity, ex.stationarity)
    cost = [car.cost(car.rollout(x0c, r.u), r.u, thc) for r in (gn, ex)]
    assert bool((cost[1] <= cost[0] + 1e-9).all())
