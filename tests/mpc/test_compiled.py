"""Tests of deqmpc_gym.mpc.CompiledSolver (the compiled, branch-free MPC-m call) and of the component-list
dynamics with forward-mode Jacobians it is built on (deqmpc_gym.systems.components)."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

from deqmpc_gym.errors import ConfigError, ShapeError
from deqmpc_gym.mpc import CompiledSolver, MPCConfig, MPCProblem, solve
from deqmpc_gym.mpc import compiled as compiled_mod
from deqmpc_gym.systems import OBSTACLE_CENTERS, Cartpole, Pendulum, QPole, Quadrotor
from deqmpc_gym.systems.components import COMPONENT_OPS, Vec, step_and_jacobian_components

from test_solver import make_batch

SYSTEMS = {"pendulum": Pendulum, "cartpole": Cartpole}


# ---------------------------------------------------------------------------------------------- components
@pytest.mark.parametrize("system_cls", [Pendulum, Cartpole, Quadrotor, QPole])
def test_component_jacobians_match_the_systems(system_cls):
    system = system_cls()
    rng = np.random.default_rng(0)
    x = torch.tensor(system.sample_initial_states(rng, 6))
    u = torch.tensor(rng.uniform(system.u_low, system.u_high, (6, system.nu)))
    f, J = step_and_jacobian_components(system, list(x.T), list(u.T))

    def full(v):
        return v if isinstance(v, torch.Tensor) else torch.full((6,), float(v), dtype=torch.float64)

    fx, A, B = system.step_and_jacobians(x, u)
    F = torch.stack([full(v) for v in f], -1)
    JJ = torch.stack([torch.stack([full(v) for v in row], -1) for row in J], -2)
    scale = 1.0 + JJ.abs().max()
    assert torch.allclose(F, fx, rtol=0, atol=1e-12)
    assert (JJ[..., :system.nx] - A).abs().max() <= 1e-12 * scale
    assert (JJ[..., system.nx:] - B).abs().max() <= 1e-12 * scale
    # structurally constant entries stay python floats (the pendulum's d f / d u, the kinematic rows)
    assert sum(type(v) is float for row in J for v in row) >= 4


def test_component_ops_reject_unsupported_operations():
    with pytest.raises(TypeError, match="zeros_like"):
        COMPONENT_OPS.zeros_like(torch.zeros(3), (3, 2))
    with pytest.raises(TypeError, match="indexing"):
        Vec([1.0, 2.0])[0, 1]


# ---------------------------------------------------------------------------------------------- helpers
def _problems(name, B=24, T=5, noise=0.1, seed=0):
    system = SYSTEMS[name]()
    problem = MPCProblem(system, MPCConfig(horizon=T))
    x0, theta = make_batch(system, B, T + 1, seed=seed, noise=noise)
    return problem, x0, theta[:, :T], theta[:, 1:]


def _calls(problem, x0, th0, th1):
    """``{mode: (args, kwargs)}``: a cold fixed-iteration call, a warm MPC-m call and a streaming call."""
    _, _, st, _ = solve(problem, x0, th0, iters=12, stop_when_converged=True)
    x1 = st.x[:, 1].clone()
    warm = st.shift(problem, x_last=th1[:, -1])
    stream = st.shift(problem, x_last=th1[:, -1], iters_remaining=2)
    return {"cold": ((x0, th0), dict(iters=6)),
            "warm": ((x1, th1), dict(state=warm, iters=2)),
            "stream": ((x1, th1), dict(state=stream, iters=2, stop_at_rho_max=True, exit_residual=1e-3))}


def _assert_same(a, b, problem, theta, exact_counts=True):
    (x1, u1, s1, i1), (x2, u2, s2, i2) = a, b
    # round-off only (summation order); the cart-pole's R = 1e-10 leaves its controls ill-determined (~1e-9 relative)
    scale = 1.0 + max(float(x1.abs().max()), float(u1.abs().max()))
    assert (x1 - x2).abs().max() <= 1e-8 * scale
    assert (u1 - u2).abs().max() <= 1e-8 * scale
    # lam <- lam + rho d: a round-off difference of the defects d is amplified by rho (up to 1e8)
    lam_tol = 1e-7 * (1.0 + float(s1.lam_eq.abs().max()) + float(s1.lam_ineq.abs().max())) \
        + 1e-12 * float(s1.rho.max()) * scale
    assert (s1.lam_eq - s2.lam_eq).abs().max() <= lam_tol
    assert (s1.lam_ineq - s2.lam_ineq).abs().max() <= lam_tol
    assert torch.equal(s1.rho, s2.rho)
    assert torch.allclose(i1.cost, i2.cost, rtol=1e-9, atol=1e-12)
    assert torch.allclose(i1.primal_residual, i2.primal_residual, rtol=1e-6, atol=1e-10)
    if exact_counts:
        for f in ("al_iters", "newton_steps", "fallback", "nonfinite"):
            assert torch.equal(getattr(i1, f), getattr(i2, f)), f
    # CompiledSolver's dual residual is the KKT stationarity at its returned iterate with its returned multipliers
    # (solve's stop_when_converged test; solve's fixed-iteration calls report the Newton loop's, before its last
    # step), and its converged flag uses it
    ran = i2.al_iters > 0
    stat = problem.stationarity(x2, u2, theta.to(x2), s2.lam_eq, s2.lam_ineq, None)
    assert torch.allclose(i2.dual_residual[ran], stat[ran], rtol=1e-8, atol=1e-13)
    cfg = problem.config
    ok = (i2.primal_residual <= cfg.tol_primal) & (stat <= cfg.tol_dual) & ~i2.nonfinite & ran
    assert not bool((i2.converged & ~ok).any())


def _count_newton(fast):
    """Wrap the solver's Newton function (eager) to record each call's active count and extra rows."""
    log = []
    inner = fast._fns["newton"]

    def wrapped(*args):
        log.append((int(args[6].sum()), bool(args[9].any()), float(args[10].min())))
        return inner(*args)

    fast._fns["newton"] = wrapped
    return log


# ---------------------------------------------------------------------------------------------- equality
@pytest.mark.parametrize("name", sorted(SYSTEMS))
@pytest.mark.parametrize("trials", [1, 2, 13])
def test_same_iterates_as_solve(name, trials):
    """The branch-free functions (run eagerly here) take the same steps as the eager solver, per sample."""
    problem, x0, th0, th1 = _problems(name)
    fast = CompiledSolver(problem, compile=False, line_search_trials=trials)
    for args, kw in _calls(problem, x0, th0, th1).values():
        _assert_same(solve(problem, *args, **kw), fast(*args, **kw), problem, args[1])


@pytest.mark.parametrize("name", sorted(SYSTEMS))
def test_converged_flags_agree_with_solve(name):
    """A cold fixed-iteration CompiledSolver call that reaches the optimum flags every sample converged, as the
    eager solve to convergence (stop_when_converged) does: both measure the residuals at the returned iterate.
    (Measured before the final Newton step, the compiled call flagged only some of them.)"""
    problem0, x0, th0, _ = _problems(name, B=24)
    problem = MPCProblem(problem0.system, MPCConfig.standalone(5))
    ref = solve(problem, x0, th0, iters=30, stop_when_converged=True, output="iterate")
    assert bool(ref[3].converged.all())
    fast = CompiledSolver(problem, compile=False)
    got = fast(x0, th0, iters=int(ref[3].al_iters.max()))
    assert torch.equal(got[3].converged, ref[3].converged)
    assert float((got[1] - ref[1]).abs().max()) <= 1e-4  # (solve stopped each sample at its own tol_dual)
    assert bool((got[3].dual_residual <= problem.config.tol_dual).all())
    # the same iterate one Newton step short of the optimum is not flagged converged
    short = fast(x0, th0, iters=1)
    assert not bool(short[3].converged.any())


@pytest.mark.parametrize("name", sorted(SYSTEMS))
def test_rare_paths_are_taken_and_agree(name):
    """Hard cold problems (waypoints with 0.5 of noise): steps shorter than the first trials and active-set
    re-solves both occur, through further calls of the Newton function, and the iterates still match."""
    problem, x0, th0, _ = _problems(name, B=32, noise=0.5, seed=3)
    fast = CompiledSolver(problem, compile=False, line_search_trials=1)
    log = _count_newton(fast)
    ref, got = solve(problem, x0, th0, iters=8), fast(x0, th0, iters=8)
    # near convergence (rho up to 1e7) the exit tests and the strict merit decrease compare quantities at round-off
    # level, so a sample may take one Newton step more or less; the solutions agree all the same
    _assert_same(ref, got, problem, th0, exact_counts=False)
    assert torch.equal(ref[3].al_iters, got[3].al_iters)
    assert (ref[3].newton_steps - got[3].newton_steps).abs().max() <= 2
    assert any(a0 < 1.0 for _, _, a0 in log), "no line-search continuation was exercised"
    if name == "cartpole":
        assert any(ex for _, ex, _ in log), "no active-set re-solve was exercised"


def test_failed_factorisation_is_regularised_for_that_sample_only(monkeypatch):
    """A sample whose factorisation fails takes its step again with the regularisation (reg > 0) and is flagged
    as a fallback; the other samples are untouched."""
    problem, x0, th0, _ = _problems("pendulum", B=6)
    fast = CompiledSolver(problem, compile=False)
    inner = fast._fns["newton"]
    regs = []

    def failing(*args):
        out = list(inner(*args))
        reg = args[8]
        regs.append(reg.clone())
        bad = compiled_mod._I_BAD
        if float(reg[2]) == 0.0 and bool(args[6][2]):  # sample 2 fails without regularisation: no step
            for i, name in enumerate(compiled_mod._CARRY):
                if name not in ("active",):
                    out[i] = torch.where(torch.arange(6) == 2, args[{"x": 0, "u": 1, "steps": 11, "small_exit": 12,
                                                                     "dres": 13, "fb": 14, "nf": 15, "prev": 7,
                                                                     "d_cur": 16, "g_cur": 17}[name]], out[i])
            out[bad] = out[bad] | (torch.arange(6) == 2)
        return tuple(out)

    fast._fns["newton"] = failing
    ref = solve(problem, x0, th0, iters=3)
    got = fast(x0, th0, iters=3)
    assert any(float(r[2]) == problem.config.reg_min for r in regs)
    assert all(float(r[k]) == 0.0 for r in regs for k in (0, 1, 3, 4, 5))
    assert bool(got[3].fallback[2]) and not bool(got[3].fallback[[0, 1, 3, 4, 5]].any())
    # the regularisation is tiny: the retried sample ends where the unregularised solve does
    assert torch.allclose(got[0], ref[0], atol=1e-6)


def test_nonfinite_warm_start_is_reset_like_solve():
    problem, x0, th0, th1 = _problems("pendulum", B=8)
    (args, kw) = _calls(problem, x0, th0, th1)["stream"]
    kw["state"].x[3, 2, 0] = float("nan")
    kw["state"].lam_eq[5, 0, 1] = float("inf")
    fast = CompiledSolver(problem, compile=False)
    ref, got = solve(problem, *args, **kw), fast(*args, **kw)
    _assert_same(ref, got, problem, args[1])
    assert torch.isfinite(got[0]).all() and torch.isfinite(got[1]).all()


@pytest.mark.parametrize("gradient,hessian", [("implicit", None), ("final_implicit", None),
                                              ("final_implicit", "exact")])
def test_gradients_match_solve(gradient, hessian):
    problem, x0, th0, th1 = _problems("cartpole", B=5)
    fast = CompiledSolver(problem, compile=False)
    grads = []
    for fn in (solve, fast):
        th = th0.clone().requires_grad_()
        x, u, _, _ = fn(problem, x0, th, iters=6, gradient=gradient, hessian=hessian) if fn is solve else \
            fn(x0, th, iters=6, gradient=gradient, hessian=hessian)
        (g,) = torch.autograd.grad((x ** 2).sum() + u.sum(), th)
        grads.append(g)
    assert torch.allclose(grads[0], grads[1], rtol=1e-6, atol=1e-9)
    assert grads[0].abs().max() > 0


# ---------------------------------------------------------------------------------------------- compiled
def test_compiled_path_matches_solve_and_does_not_recompile():
    """The real torch.compile path (one compilation, ~1 min on 2 cores the first time; torch caches it on disk)."""
    problem, x0, th0, th1 = _problems("pendulum", B=8)  # the README's example compiles the same graphs
    calls = _calls(problem, x0, th0, th1)
    fast = CompiledSolver(problem)
    args, kw = calls["stream"]
    _assert_same(solve(problem, *args, **kw), fast(*args, **kw), problem, args[1])
    assert fast.compiled_ok is not False and set(fast._compiled) == {"prepare", "newton", "finish"}
    from torch._dynamo.utils import counters
    before = dict(counters["stats"])
    for mode in ("warm", "cold"):  # same batch size: no new graph
        args, kw = calls[mode]
        _assert_same(solve(problem, *args, **kw), fast(*args, **kw), problem, args[1])
    assert dict(counters["stats"]).get("unique_graphs") == before.get("unique_graphs")


def _broken_at_build(fn, **kw):
    """torch.compile whose compiled function fails to build (as without a C++ compiler)."""
    import torch._inductor.exc as iexc

    def run(*a):
        raise iexc.InvalidCxxCompiler()
    return run


def _unavailable(fn, **kw):
    """torch.compile itself unavailable (as on a Python that dynamo does not support)."""
    raise RuntimeError("Dynamo is not supported on this Python")


@pytest.mark.parametrize("fake_compile, message", [(_broken_at_build, "C\\+\\+ compiler"),
                                                   (_unavailable, "not supported")])
def test_compile_failure_falls_back_to_eager_with_a_warning(monkeypatch, fake_compile, message):
    monkeypatch.setattr(compiled_mod.torch, "compile", fake_compile)
    problem, x0, th0, _ = _problems("pendulum", B=4)
    fast = CompiledSolver(problem)
    with pytest.warns(RuntimeWarning, match=message):
        got = fast(x0, th0, iters=3)
    assert fast.compiled_ok is False
    _assert_same(solve(problem, x0, th0, iters=3), got, problem, th0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # warned once
        fast(x0, th0, iters=3)


# ---------------------------------------------------------------------------------------------- bad input
def test_unsupported_problems_and_arguments_raise_config_errors():
    with pytest.raises(ConfigError, match="control bounds only"):
        CompiledSolver(MPCProblem(QPole(), MPCConfig(horizon=5), obstacle_centers=OBSTACLE_CENTERS,
                                  obstacle_radius=0.5))
    with pytest.raises(ConfigError, match="max_unrolled_work"):
        CompiledSolver(MPCProblem(Quadrotor(), MPCConfig(horizon=5)))
    with pytest.raises(ConfigError, match="line_search_trials"):
        CompiledSolver(MPCProblem(Pendulum()), line_search_trials=0)
    with pytest.raises(ConfigError, match="MPCProblem"):
        CompiledSolver("pendulum")
    problem, x0, th0, _ = _problems("pendulum", B=4)
    fast = CompiledSolver(problem, compile=False)
    with pytest.raises(ConfigError, match="unroll"):
        fast(x0, th0.clone().requires_grad_(), gradient="unroll")
    with pytest.raises(ConfigError, match="iters"):
        fast(x0, th0, iters=-1)
    with pytest.raises(ConfigError, match="exit_residual"):
        fast(x0, th0, exit_residual=-1.0)


def test_bad_shapes_and_nan_inputs_raise_shape_errors():
    problem, x0, th0, _ = _problems("pendulum", B=4)
    fast = CompiledSolver(problem, compile=False)
    with pytest.raises(ShapeError, match=r"theta must have shape"):
        fast(x0, th0[:, :3])
    bad = th0.clone()
    bad[1, 2, 0] = float("nan")
    with pytest.raises(ShapeError, match="non-finite"):
        fast(x0, bad)
    _, _, st, _ = fast(x0, th0, iters=1)
    st.lam_ineq = st.lam_ineq[..., :1]
    with pytest.raises(ConfigError, match="rows per knot"):
        fast(x0, th0, state=st)


def test_no_iteration_returns_fresh_tensors():
    """A call in which no sample runs (iters = 0) returns the warm start and info tensors the caller owns."""
    problem, x0, th0, _ = _problems("pendulum", B=4)
    fast = CompiledSolver(problem, compile=False)
    x, u, st, info = fast(x0, th0, iters=0)
    ref = solve(problem, x0, th0, iters=0)
    assert torch.equal(x, ref[0]) and torch.equal(info.al_iters, ref[3].al_iters)
    info.fallback[0] = True
    info.newton_steps += 5
    _, _, _, info2 = fast(x0, th0, iters=0)
    assert not bool(info2.fallback.any()) and int(info2.newton_steps.sum()) == 0


@pytest.mark.parametrize("gradient", [None, "implicit"])
def test_padded_batches_give_the_callers_samples(gradient):
    """pad_batches=True solves 5 problems as 8 (copies of the first) and returns exactly the 5 solutions."""
    problem, x0, th0, th1 = _problems("cartpole", B=5)
    fast = CompiledSolver(problem, compile=False, pad_batches=True)
    seen = []
    inner = fast._fns["prepare"]
    fast._fns["prepare"] = lambda *a: seen.append(a[0].shape[0]) or inner(*a)
    for args, kw in _calls(problem, x0, th0, th1).values():
        ref, got = solve(problem, *args, **kw), fast(*args, **kw)
        _assert_same(ref, got, problem, args[1])
        assert got[0].shape[0] == 5 and got[2].rho.shape == (5,) and got[3].converged.shape == (5,)
    assert set(seen) == {8}
    if gradient:
        grads = []
        for fn in (lambda th: solve(problem, x0, th, iters=4), lambda th: fast(x0, th, iters=4)):
            th = th0.clone().requires_grad_()
            x, u, _, _ = fn(th)
            grads.append(torch.autograd.grad((x ** 2).sum() + u.sum(), th)[0])
        assert torch.allclose(grads[0], grads[1], rtol=1e-6, atol=1e-9)
