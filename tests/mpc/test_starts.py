"""Multi-start cold solves (``MPCConfig.starts``, :mod:`deqmpc_gym.mpc.starts`): each sample's answer is that of its
best start, exactly as a single-start solve from that start gives it, gradients included."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch

from deqmpc_gym.errors import ConfigError
from deqmpc_gym.mpc import STANDALONE_ITERS, CompiledSolver, MPCConfig, MPCProblem, solve
from deqmpc_gym.mpc.starts import screen, start_states, take_rows
from deqmpc_gym.systems import Pendulum

B, T = 12, 15


def _swing_up(seed: int = 3):
    """Pendulum swing-ups from near the bottom (the torque bound makes them swing; left and right are two local
    solutions), waypoints at the top."""
    system = Pendulum()
    rng = np.random.default_rng(seed)
    x0 = torch.tensor(np.stack([math.pi + rng.uniform(-0.6, 0.6, B), rng.uniform(-1.0, 1.0, B)], 1))
    theta = torch.zeros(B, T, 2, dtype=torch.float64)
    return system, x0, theta


def _single_starts(system, x0, theta, k: int):
    """The single-start solves from each of the ``k`` starts of a multi-start call."""
    base = MPCProblem(system, MPCConfig.standalone(T))
    out = [solve(base, x0, theta, iters=STANDALONE_ITERS, stop_when_converged=True),
           solve(MPCProblem(system, MPCConfig.standalone(T, cold_start="theta")), x0, theta, iters=STANDALONE_ITERS,
                 stop_when_converged=True)]
    u_starts = start_states(base, x0, theta, k).u
    for j in range(2, k):
        out.append(solve(base, x0, theta, iters=STANDALONE_ITERS, stop_when_converged=True,
                         u_init=u_starts[j * B:(j + 1) * B]))
    return out


def test_each_sample_gets_the_answer_of_its_best_start():
    """The answer of every sample is the single-start answer of its winning start, and that start is the converged
    one of the lowest cost (the first on ties; start 0 when none converged)."""
    system, x0, theta = _swing_up()
    k = 4
    x, u, state, info = solve(MPCProblem(system, MPCConfig.standalone(T, starts=k, screen_iters=0)), x0, theta,
                              iters=STANDALONE_ITERS, stop_when_converged=True)
    singles = _single_starts(system, x0, theta, k)
    cost = torch.stack([torch.where(s[3].converged, s[3].cost, torch.full_like(s[3].cost, math.inf)) for s in singles])
    want = torch.where(torch.isinf(cost.min(0).values), 0, cost.argmin(0))
    assert torch.equal(info.start, want)
    assert len(set(want.tolist())) > 1  # the starts really differ on these swing-ups
    for b in range(B):
        xs, us, ss, infos = singles[int(want[b])]
        torch.testing.assert_close(x[b], xs[b], rtol=0, atol=1e-9)
        torch.testing.assert_close(u[b], us[b], rtol=0, atol=1e-9)
        torch.testing.assert_close(state.lam_eq[b], ss.lam_eq[b], rtol=0, atol=1e-7)
        assert bool(info.converged[b]) == bool(infos.converged[b])
        assert float(info.cost[b]) == pytest.approx(float(infos.cost[b]), rel=1e-12, abs=1e-12)
    # never worse than the single start: every sample it converges stays converged, at a cost no higher
    single = singles[0][3]
    assert bool((info.converged | ~single.converged).all())
    assert bool((info.cost <= single.cost + 1e-12)[single.converged].all())
    assert bool((info.cost < single.cost - 1e-6).any())  # and better on some of them
    assert info.rollout is not None and bool(info.rollout.all())
    torch.testing.assert_close(x, MPCProblem(system, MPCConfig.standalone(T)).rollout(x0, u), rtol=0, atol=1e-12)


def test_the_gradient_of_a_sample_is_that_of_its_winning_start():
    system, x0, theta = _swing_up(5)
    k = 3
    th = theta.clone().requires_grad_()
    x0g = x0.clone().requires_grad_()
    x, u, _, info = solve(MPCProblem(system, MPCConfig.standalone(T, starts=k, screen_iters=0)), x0g, th,
                          iters=STANDALONE_ITERS, stop_when_converged=True)
    w = torch.linspace(0.5, 1.5, T, dtype=torch.float64)[None, :, None]
    gth, gx0 = torch.autograd.grad((u * w).sum() + x.pow(2).sum(), (th, x0g))
    base = MPCProblem(system, MPCConfig.standalone(T))
    u_starts = start_states(base, x0, theta, k).u
    kinds = [{}, {"cold_start": "theta"}, {}]
    for j in range(k):
        rows = info.start == j
        if not bool(rows.any()):
            continue
        th1, x01 = theta.clone().requires_grad_(), x0.clone().requires_grad_()
        kw = {"u_init": u_starts[j * B:(j + 1) * B]} if j >= 2 else {}
        xs, us, _, _ = solve(MPCProblem(system, MPCConfig.standalone(T, **kinds[j])), x01, th1,
                             iters=STANDALONE_ITERS, stop_when_converged=True, **kw)
        g1, g0 = torch.autograd.grad((us * w).sum() + xs.pow(2).sum(), (th1, x01))
        torch.testing.assert_close(gth[rows], g1[rows], rtol=1e-7, atol=1e-9)
        torch.testing.assert_close(gx0[rows], g0[rows], rtol=1e-7, atol=1e-9)


def test_starts_apply_to_cold_calls_only_and_bad_values_are_config_errors():
    system, x0, theta = _swing_up()
    problem = MPCProblem(system, MPCConfig.standalone(T, starts=3))
    _, _, state, info = solve(problem, x0, theta, iters=3)
    assert info.start is not None and info.start.shape == (B,)
    _, _, _, warm = solve(problem, x0, theta, state=state, iters=2)  # a warm call runs from its state alone
    assert warm.start is None
    assert solve(MPCProblem(system, MPCConfig.standalone(T)), x0, theta, iters=2)[3].start is None
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ConfigError, match="starts must be an int >= 1"):
            MPCConfig(starts=bad)
    with pytest.raises(ConfigError, match="single-start"):
        CompiledSolver(MPCProblem(system, MPCConfig(horizon=5, starts=2)))


def test_screening_continues_each_sample_from_its_best_start_alone():
    """With ``screen_iters = j`` the K starts run j AL iterations together, and each sample continues from the start of
    the lowest merit at its clipped rollout: exactly the single-start solve from that start's iterate, gradients
    included, with the screening's iterations counted in ``info``."""
    system, x0, theta = _swing_up(7)
    k, j = 4, 2
    problem = MPCProblem(system, MPCConfig.standalone(T, starts=k, screen_iters=j))
    th, x0g = theta.clone().requires_grad_(), x0.clone().requires_grad_()
    x, u, state, info = solve(problem, x0g, th, iters=STANDALONE_ITERS, stop_when_converged=True)
    w = torch.linspace(0.5, 1.5, T, dtype=torch.float64)[None, :, None]
    gth, gx0 = torch.autograd.grad((u * w).sum() + x.pow(2).sum(), (th, x0g))

    base = MPCProblem(system, MPCConfig.standalone(T))
    first = start_states(base, x0, theta, k)
    with torch.no_grad():
        _, _, sk, ik = solve(base, x0.repeat(k, 1), theta.repeat(k, 1, 1), first, iters=j, stop_when_converged=True,
                             output="iterate")
    rows, win = screen(base, x0.repeat(k, 1), theta.repeat(k, 1, 1), sk, k)
    assert torch.equal(info.start, win) and len(set(win.tolist())) > 1
    th1, x01 = theta.clone().requires_grad_(), x0.clone().requires_grad_()
    xs, us, ss, infos = solve(base, x01, th1, take_rows(sk, rows), iters=STANDALONE_ITERS - j,
                              stop_when_converged=True)
    g1, g0 = torch.autograd.grad((us * w).sum() + xs.pow(2).sum(), (th1, x01))
    torch.testing.assert_close(u, us, rtol=0, atol=1e-12)
    torch.testing.assert_close(x, xs, rtol=0, atol=1e-12)
    torch.testing.assert_close(gth, g1, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(gx0, g0, rtol=1e-9, atol=1e-12)
    assert torch.equal(info.al_iters, infos.al_iters + ik.al_iters[rows])
    assert torch.equal(info.newton_steps, infos.newton_steps + ik.newton_steps[rows])
    assert bool(info.converged.all()) and info.rollout is not None and bool(info.rollout.all())
    # the pick is the lowest merit at the clipped rollout of each start's controls
    lo, hi = float(base.u_low[0]), float(base.u_high[0])
    uc = sk.u.clamp(lo, hi)
    merit = base.merit(base.rollout(x0.repeat(k, 1), uc), uc, theta.repeat(k, 1, 1), sk.lam_eq, sk.lam_ineq, sk.rho,
                       None).reshape(k, B)
    assert torch.equal(win, merit.argmin(0))
    # a call of at most j iterations runs every start to its end
    full = solve(MPCProblem(system, MPCConfig.standalone(T, starts=k, screen_iters=0)), x0, theta, iters=j)
    short = solve(problem, x0, theta, iters=j)
    assert torch.equal(full[1], short[1]) and torch.equal(full[3].start, short[3].start)


def test_screening_never_picks_a_non_finite_start():
    system, x0, theta = _swing_up()
    problem = MPCProblem(system, MPCConfig.standalone(T))
    k = 3
    state = start_states(problem, x0, theta, k)
    u = state.u.clone()
    u[:B] = float("nan")  # start 0 of every sample is broken
    u[B + 1] = float("nan")
    u[2 * B + 1] = float("nan")  # sample 1: every start is broken
    state = dataclasses.replace(state, u=u)
    rows, win = screen(problem, x0.repeat(k, 1), theta.repeat(k, 1, 1), state, k)
    assert int(win[1]) == 0
    others = torch.arange(B) != 1
    assert bool((win[others] > 0).all())
    assert torch.equal(rows, win * B + torch.arange(B))
    for bad in (-1, 1.5, True):
        with pytest.raises(ConfigError, match="screen_iters must be an int >= 0"):
            MPCConfig(screen_iters=bad)


def test_random_starts_are_seeded_and_within_the_bounds():
    system, x0, theta = _swing_up()
    problem = MPCProblem(system, MPCConfig.standalone(T))
    a, b = start_states(problem, x0, theta, 5), start_states(problem, x0, theta, 5)
    assert torch.equal(a.u, b.u) and torch.equal(a.x, b.x)
    lo, hi = float(problem.u_low[0]), float(problem.u_high[0])
    extra = a.u[2 * B:]
    assert bool(((extra >= lo) & (extra <= hi)).all())
    assert bool((extra == extra[:, :1]).all())  # constant over the horizon
    torch.testing.assert_close(a.x[2 * B:], problem.rollout(x0.repeat(3, 1), extra), rtol=0, atol=0)
    torch.testing.assert_close(a.x[B:2 * B, 1:], theta[:, 1:], rtol=0, atol=0)  # start 1: x = theta


def test_obstacle_problems_keep_each_starts_obstacle_sets():
    """With obstacle constraints every start carries its own nearest-obstacle sets through the batch of ``K B``; the
    answers are feasible where converged and the winner's sets come back with them."""
    from deqmpc_gym.systems import OBSTACLE_CENTERS, Quadrotor

    system = Quadrotor()
    rng = np.random.default_rng(0)
    b, t = 4, 5
    x0 = torch.tensor(system.sample_initial_states(rng, b))
    theta = x0[:, None].expand(b, t, system.nx).clone()
    theta[..., :3] *= 0.5
    problem = MPCProblem(system, MPCConfig(horizon=t, starts=3), obstacle_centers=OBSTACLE_CENTERS,
                         obstacle_radius=0.5)
    x, u, state, info = solve(problem, x0, theta, iters=6)
    assert x.shape == (b, t, system.nx) and info.start.shape == (b,)
    assert state.obstacle_idx is not None and state.obstacle_idx.shape[0] == b
    k_state = start_states(problem, x0.double(), theta.double(), 3)
    rows = info.start * b + torch.arange(b)
    assert torch.equal(state.obstacle_idx, k_state.obstacle_idx[rows])  # fixed-iteration calls keep the sets
    assert bool(torch.isfinite(x).all() and torch.isfinite(u).all())
