"""The solver as a general MPC library: control reference, initial control guess, consistent outputs, penalty cap."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from deqmpc_gym.errors import ConfigError, ShapeError
from deqmpc_gym.mpc import MPCConfig, MPCProblem, init_state, solve
from deqmpc_gym.systems import Cartpole, Pendulum, kernels


def _pendulum_batch(B: int, T: int, seed: int = 0):
    system = Pendulum()
    rng = np.random.default_rng(seed)
    x0 = torch.tensor(system.sample_initial_states(rng, B))
    theta = torch.zeros(B, T, 2, dtype=torch.float64)
    return system, x0, theta


def test_u_ref_is_the_cost_reference_on_both_paths():
    """With ``u_ref`` the cost is ``1/2 |u - u_ref|_R^2``: the reported cost is that of the returned controls, the
    compiled Newton loop gives the torch loop's iterates, and controls move toward ``u_ref`` as R grows."""
    system, x0, theta = _pendulum_batch(8, 6)
    u_ref = torch.linspace(-2.0, 2.0, 8, dtype=torch.float64)[:, None, None].expand(8, 6, 1)
    problem = MPCProblem(system, MPCConfig(horizon=6, rho_init=1e5))
    x, u, state, info = solve(problem, x0, theta, iters=15, stop_when_converged=True, u_ref=u_ref)
    assert bool(info.converged.all())
    want = 0.5 * (x * x * torch.tensor([10.0, 1.0])).sum((1, 2)) + 0.5 * 0.01 * ((u - u_ref) ** 2).sum((1, 2))
    torch.testing.assert_close(info.cost, want, rtol=1e-12, atol=1e-12)
    with kernels.disabled():
        xt, ut, _, _ = solve(problem, x0, theta, iters=15, stop_when_converged=True, u_ref=u_ref)
    torch.testing.assert_close(ut, u, rtol=0, atol=1e-9)
    heavy = MPCProblem(system, MPCConfig(horizon=6, rho_init=1e5), R=[1e3])
    _, uh, _, _ = solve(heavy, x0, theta, iters=15, stop_when_converged=True, u_ref=u_ref)
    assert float((uh - u_ref).abs().max()) < 0.1 < float((u - u_ref).abs().max())
    # the last control drives nothing: it settles at u_ref (within the bounds here)
    torch.testing.assert_close(u[:, -1], u_ref[:, -1], rtol=0, atol=1e-6)


def test_u_ref_zero_changes_nothing():
    system, x0, theta = _pendulum_batch(6, 5, seed=1)
    problem = MPCProblem(system, MPCConfig(horizon=5))
    a = solve(problem, x0, theta, iters=3)
    b = solve(problem, x0, theta, iters=3, u_ref=torch.zeros(1, dtype=torch.float64))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_bad_u_ref_and_output_are_rejected():
    system, x0, theta = _pendulum_batch(3, 5)
    problem = MPCProblem(system, MPCConfig(horizon=5))
    with pytest.raises(ShapeError):
        solve(problem, x0, theta, u_ref=torch.zeros(4, 2, dtype=torch.float64))
    with pytest.raises(ShapeError):
        solve(problem, x0, theta, u_ref=torch.tensor([float("nan")], dtype=torch.float64))
    with pytest.raises(ConfigError):
        solve(problem, x0, theta, output="best")


@pytest.mark.parametrize("iters", [1, 12])
def test_returned_states_are_the_rollout_of_the_returned_controls(iters):
    """``output="rollout"`` (the default of a standalone solve): ``x`` equals the rollout of ``u`` to round-off on
    every sample, converged or not; the reported primal residual and cost are the rollout's."""
    system = Cartpole()
    rng = np.random.default_rng(3)
    x0 = torch.tensor(system.sample_initial_states(rng, 16))
    theta = torch.tensor(np.asarray(system.goal), dtype=torch.float64).expand(16, 10, 4).clone()
    problem = MPCProblem(system, MPCConfig(horizon=10))
    x, u, state, info = solve(problem, x0, theta, iters=iters, stop_when_converged=True)
    if iters == 1:
        assert not bool(info.converged.any())
        assert float((state.x - problem.rollout(x0, state.u)).abs().max()) > 1e-3  # the iterate is not feasible
    assert bool(info.rollout.all())
    assert float((x - problem.rollout(x0, u)).abs().max()) <= 1e-12
    torch.testing.assert_close(info.cost, problem.cost(x, u, theta), rtol=1e-14, atol=0)
    torch.testing.assert_close(info.primal_residual, problem.violation(x, u, None), rtol=0, atol=0)
    # a fixed number of AL iterations (a DEQ-MPC step) returns the iterate unless asked otherwise
    xi, ui, si, ii = solve(problem, x0, theta, iters=iters)
    assert not bool(ii.rollout.any()) and torch.equal(xi, si.x)
    xr, ur, _, ir = solve(problem, x0, theta, iters=iters, output="rollout")
    assert bool(ir.rollout.all()) and torch.equal(ur, ui)


def test_rollout_output_is_differentiable():
    """The rollout's gradient (implicit gradient of u, then the dynamics) matches the iterate's at a tight solution
    (up to the O(1 / rho) by which the last AL subproblem's iterate and its sensitivity are not dynamically
    consistent)."""
    system, x0, theta = _pendulum_batch(4, 5, seed=2)
    x0 = 0.1 * x0  # near upright: the torque bound is inactive and the controls respond to theta
    problem = MPCProblem(system, MPCConfig(horizon=5, rho_init=1e5, newton_steps=20, newton_tol=1e-10,
                                           tol_dual=1e-9))
    th = theta.clone().requires_grad_()
    w = torch.randn(4, 5, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    x, u, _, info = solve(problem, x0, th, iters=20, stop_when_converged=True)
    assert bool(info.rollout.all())
    (g_roll,) = torch.autograd.grad((w * x).sum(), th)
    x2, _, _, _ = solve(problem, x0, th, iters=20, stop_when_converged=True, output="iterate")
    (g_it,) = torch.autograd.grad((w * x2).sum(), th)
    assert float(g_it.abs().max()) > 0.1
    torch.testing.assert_close(g_roll, g_it, rtol=0, atol=1e-3 * float(g_it.abs().max()))


def test_u_init_is_rolled_out_for_the_cold_start():
    system, x0, theta = _pendulum_batch(5, 8)
    problem = MPCProblem(system, MPCConfig(horizon=8))
    u_init = torch.full((5, 8, 1), 9.0, dtype=torch.float64)  # beyond the bound 5: clipped
    st = init_state(problem, x0, theta, u_init=u_init)
    assert bool((st.u == 5.0).all())
    torch.testing.assert_close(st.x, problem.rollout(x0, st.u), rtol=0, atol=0)
    _, _, _, info = solve(problem, x0, theta, iters=1, u_init=u_init, output="iterate")
    assert bool(torch.isfinite(info.cost).all())


def test_the_standalone_cold_start_is_the_rollout_of_the_control_reference():
    """``MPCConfig.standalone`` starts cold from the rollout of the clipped control reference (``cold_start =
    "rollout"``): the same start, and so the same answers, as passing that reference as ``u_init``; the DEQ-MPC
    default keeps ``x = theta``; an unknown start is a ConfigError."""
    system, x0, theta = _pendulum_batch(6, 8)
    theta = theta + torch.tensor([3.0, 0.0], dtype=torch.float64)
    u_ref = torch.tensor([0.7], dtype=torch.float64)
    standalone = MPCProblem(system, MPCConfig.standalone(8))
    st = init_state(standalone, x0, theta, u_ref=u_ref.expand(6, 8, 1))
    torch.testing.assert_close(st.x, standalone.rollout(x0, st.u), rtol=0, atol=0)
    assert bool((st.u == 0.7).all())
    assert bool((init_state(MPCProblem(system, MPCConfig(horizon=8)), x0, theta).x[:, 1:] == theta[:, 1:]).all())
    a = solve(standalone, x0, theta, iters=30, stop_when_converged=True, u_ref=u_ref)
    b = solve(standalone, x0, theta, iters=30, stop_when_converged=True, u_ref=u_ref,
              u_init=u_ref.expand(6, 8, 1))
    for p, q in zip(a[:2], b[:2]):
        assert torch.equal(p, q)
    assert bool(a[3].converged.all())
    with pytest.raises(ConfigError, match="cold_start must be one of"):
        MPCConfig(cold_start="zeros")


@pytest.mark.parametrize("stop", [False, True])
def test_the_penalty_is_capped_in_every_mode(stop):
    system = Cartpole()
    rng = np.random.default_rng(4)
    x0 = torch.tensor(system.sample_initial_states(rng, 8))
    theta = torch.zeros(8, 10, 4, dtype=torch.float64)
    problem = MPCProblem(system, MPCConfig(horizon=10, rho_cap=1e9, tol_dual=1e-14, tol_shooting=1e-30))
    _, _, state, info = solve(problem, x0, theta, iters=14, stop_when_converged=stop)
    assert int(info.al_iters.min()) == 14  # the tolerances cannot be met: every sample runs every iteration
    assert float(info.rho.max()) == 1e9 and float(state.rho.max()) == 1e9
    with pytest.raises(ConfigError):
        MPCConfig(rho_cap=1e8)  # not above rho_max


def test_shooting_kkt_vanishes_only_at_the_optimum():
    """The rollout answers' convergence measure: ~0 at a tight solution, not at a perturbed one, and the flag it
    sets agrees with it."""
    from deqmpc_gym.mpc import STANDALONE_ITERS, shooting_kkt

    system = Cartpole()
    rng = np.random.default_rng(5)
    x0 = torch.tensor(system.sample_initial_states(rng, 8))
    theta = torch.zeros(8, 10, 4, dtype=torch.float64)
    problem = MPCProblem(system, MPCConfig.standalone(10))
    x, u, _, info = solve(problem, x0, theta, iters=STANDALONE_ITERS, stop_when_converged=True)
    assert bool(info.converged.all())
    viol, stat = shooting_kkt(problem, x0, theta, u)
    torch.testing.assert_close(stat, info.dual_residual, rtol=0, atol=0)
    assert float(stat.max()) <= problem.config.tol_shooting and float(viol.max()) <= problem.config.tol_primal
    du = 0.05 * torch.tensor(rng.standard_normal(u.shape))
    _, stat2 = shooting_kkt(problem, x0, theta, (u + du).clamp(-10.0, 10.0))
    assert float(stat2.min()) > 10 * problem.config.tol_shooting


def test_the_standalone_first_penalty_is_capped_for_tiny_control_weights():
    """``MPCConfig.standalone`` starts at rho = 1e3 unless R is tiny: ``rho_init_r_ratio`` caps the first penalty
    at 1e8 r_min (never below 1); the cold start takes it; the DEQ-MPC default keeps ``rho_init``."""
    system, x0, theta = _pendulum_batch(3, 5)
    for R, want in ((1e-2, 1e3), (1e-6, 100.0), (1e-10, 1.0)):
        problem = MPCProblem(system, MPCConfig.standalone(5), R=[R])
        assert problem.cold_rho == pytest.approx(want)
        assert init_state(problem, x0, theta).rho.tolist() == pytest.approx([want] * 3)
    assert MPCProblem(system, MPCConfig(rho_init=7.0), R=[1e-10]).cold_rho == 7.0
    with pytest.raises(ConfigError, match="rho_init_r_ratio"):
        MPCConfig(rho_init_r_ratio=-1.0)


def test_compiled_shooting_kkt_equals_the_torch_one():
    """Without a graph the shooting test runs compiled: the same violation and stationarity as the torch formulas
    (waypoints with and without a control reference, bounds violated, a non-finite sample: inf)."""
    from deqmpc_gym.mpc import shooting_kkt

    system = Cartpole()
    rng = np.random.default_rng(2)
    x0 = torch.tensor(system.sample_initial_states(rng, 6))
    theta = torch.tensor(rng.standard_normal((6, 7, 4)))
    u = torch.tensor(rng.standard_normal((6, 7, 1))) * 30.0
    u[0, 1], u[1, 4], u[3, 2] = 150.0, -120.0, float("nan")  # beyond the bounds (|F| <= 100), not finite
    problem = MPCProblem(system, MPCConfig(horizon=7))
    ref = torch.cat([theta, torch.full((6, 7, 1), 0.5, dtype=torch.float64)], -1)
    for r in (theta, ref):
        viol, stat = shooting_kkt(problem, x0, r, u)
        with kernels.disabled():
            viol_t, stat_t = shooting_kkt(problem, x0, r, u)
        torch.testing.assert_close(viol, viol_t, rtol=1e-12, atol=0, equal_nan=True)
        torch.testing.assert_close(stat, stat_t, rtol=1e-10, atol=1e-14)
        assert float(viol.nan_to_num(0).max()) > 0 and stat[3] == float("inf")


@pytest.mark.slow
@pytest.mark.parametrize("name", ["pendulum", "cartpole", "quadrotor"])
def test_the_suite_problems_reach_ipopt_with_honest_flags(name):
    """``benchmarks/solver_suite.py`` (user-defined systems, dynamics only) on 24 tuning instances per horizon:
    every sample within 1e-4 of IPOPT's cost, X the rollout of U, no flag contradicting the cost gap."""
    pytest.importorskip("casadi")
    import os
    import sys

    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "benchmarks"))
    import solver_suite as suite

    for T in suite.HORIZONS:
        inst = suite.make_instances(name, T, 24, "tune")
        ref, _ = suite.ipopt_references(inst, suite.load_cache())
        x, u, info, _ = suite.solve_suite(inst, suite.make_problem(inst), suite.STANDALONE_ITERS)
        m = suite.evaluate(inst, x, u, info.converged, ref)
        assert m["ok"] == m["B"] == 24, (T, m)
        assert m["false_converged"] == 0 and m["false_unconverged"] == 0, (T, m)
        assert m["xu_max"] <= 1e-9, (T, m)


def test_the_one_start_counts_compare_costs_within_the_gap():
    """``solver_suite.one_start_counts``: a cost within 1e-4 (relative) of another counts as reaching it, a failed
    IPOPT start (NaN) reaches nothing, and a sample without a reference counts nowhere."""
    import os
    import sys

    import numpy as np

    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "benchmarks"))
    import solver_suite as suite

    ref = np.array([1.0, 1.0, 1.0, 2.0, np.nan])
    ours = np.array([1.0, 1.5, 1.00005, 2.0, 1.0])
    one = np.array([1.2, 1.0, 1.0, np.nan, 1.0])
    assert suite.one_start_counts(ours, ref, one) == {"ipopt1_ok": 2, "ok_vs_ipopt1": 3, "ipopt1_ok_vs_ours": 2}
