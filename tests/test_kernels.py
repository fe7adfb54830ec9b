"""Compiled kernels (numba): generated dynamics kernels and the block Cholesky give the eager path's answers,
fall back with a warning where they cannot run, and a training step / run through them equals the eager one."""

from __future__ import annotations

import math
import warnings
from typing import Any

import numpy as np
import pytest
import torch

from deqmpc_gym.mpc import linalg
from deqmpc_gym.policies import DEQMPCPolicy
from deqmpc_gym.systems import SYSTEMS, System, get_system, kernels

ENVS = ("Pendulum", "Cartpole", "Quadrotor", "QPole", "QPoleObs")
VARIANTS = ("deq-mpc-deq", "deq-mpc-nn", "diff-mpc-deq", "diff-mpc-nn")


def _xu(system: System, n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    rng = np.random.default_rng(seed)
    x = system.sample_initial_states(rng, n)
    u = rng.uniform(system.u_low, system.u_high, (n, system.nu))
    return torch.from_numpy(x), torch.from_numpy(u)


@pytest.mark.parametrize("name", sorted(SYSTEMS))
def test_kernel_matches_the_eager_dynamics(name: str) -> None:
    system = get_system(name)
    assert kernels.kernels_for(system) is not None, "every shipped system compiles"
    x, u = _xu(system, 33, seed=1)
    y, A, B = system.step_and_jacobians(x, u)
    y_step = system.step(x, u)
    with kernels.disabled():
        y0, A0, B0 = system.step_and_jacobians(x, u)
        y0_step = system.step(x, u)
    assert torch.equal(y, y_step), "x_next of step_and_jacobians is bit-identical to step"
    for got, want in ((y, y0), (A, A0), (B, B0), (y_step, y0_step)):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    # leading dimensions are kept, and a step of one state works
    torch.testing.assert_close(system.step(x.view(3, 11, -1), u.view(3, 11, -1)).view(33, -1), y_step,
                               rtol=0, atol=0)
    assert torch.equal(system.step(x[0], u[0]), y_step[0])


def test_kernels_only_serve_plain_float64_cpu_calls() -> None:
    """float32 and autograd calls keep the torch path (same answers), kernels can be switched off."""
    system = get_system("qpole")
    x, u = _xu(system, 8)
    y32 = system.step(x.float(), u.float())
    assert y32.dtype == torch.float32
    xg = x.clone().requires_grad_(True)
    yg, Ag, _ = system.step_and_jacobians(xg, u)
    assert yg.requires_grad and Ag.requires_grad
    torch.testing.assert_close(yg.detach(), system.step(x, u), rtol=1e-13, atol=1e-13)
    prev = kernels.set_enabled(False)
    try:
        assert kernels.kernels_for(system) is None and not kernels.enabled()
    finally:
        kernels.set_enabled(prev)
    assert kernels.kernels_for(system) is not None


class _DoubleIntegrator(System):
    """The module docstring's example system: a discrete map (no ``_deriv``)."""

    name = "double_integrator"
    nx, nu, nq, dt = 2, 1, 1, 0.1
    u_low, u_high = (-1.0,), (1.0,)
    Q_diag, R_diag = (10.0, 1.0), (1e-3,)
    goal = (0.0, 0.0)
    init_low, init_high = (-2.0, -1.0), (2.0, 1.0)
    reward_weights, effort_weights = (1.0, 0.1), (0.01,)
    success_tolerance = (0.05, 0.1)

    def _step(self, x: Any, u: Any, ops: Any) -> Any:
        v = x[..., 1] + self.dt * ops.tanh(u[..., 0])
        return ops.stack([x[..., 0] + self.dt * v, v])


class _Branchy(_DoubleIntegrator):
    """A python branch on a state value cannot be traced symbolically."""

    def _step(self, x: Any, u: Any, ops: Any) -> Any:
        if float(np.asarray(x[..., 0]).reshape(-1)[0]) > 0:  # deliberately untraceable
            return ops.stack([x[..., 0], x[..., 1] + u[..., 0]])
        return ops.stack([x[..., 0] + self.dt * x[..., 1], x[..., 1] + u[..., 0]])


def test_a_user_system_gets_a_kernel_with_its_autodiff_jacobians() -> None:
    system = _DoubleIntegrator()
    k = kernels.kernels_for(system)
    assert k is not None and k.source.exists()
    x, u = _xu(system, 16, seed=3)
    y, A, B = system.step_and_jacobians(x, u)
    with kernels.disabled():
        y0, A0, B0 = system.step_and_jacobians(x, u)
    for got, want in ((y, y0), (A, A0), (B, B0)):
        torch.testing.assert_close(got, want, rtol=1e-13, atol=1e-13)


def test_an_untraceable_system_falls_back_with_one_warning() -> None:
    system = _Branchy()
    with pytest.warns(RuntimeWarning, match="no compiled dynamics kernel for _Branchy"):
        assert kernels.kernels_for(system) is None
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # warned once: later calls are silent
        assert kernels.kernels_for(_Branchy()) is None
        x, u = _xu(system, 4)
        y = system.step(x, u)
    with kernels.disabled():
        torch.testing.assert_close(system.step(x, u), y, rtol=0, atol=0)


def test_kernel_nan_inputs_give_nan_rows_only() -> None:
    system = get_system("quadrotor")
    x, u = _xu(system, 6)
    x[2, 4] = math.nan
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        y, A, _ = system.step_and_jacobians(x, u)
    assert torch.isnan(y[2]).any() and torch.isfinite(y[[0, 1, 3, 4, 5]]).all()
    assert torch.isfinite(A[[0, 1, 3, 4, 5]]).all()


# ---------------------------------------------------------------------------------------------- block Cholesky
def _spd_blocks(b: int, t: int, n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A random positive-definite block-tridiagonal ``H = C C^T`` (``C`` lower block-bidiagonal)."""
    g = torch.Generator().manual_seed(seed)
    C = torch.randn(b, t, n, n, generator=g, dtype=torch.float64).tril()
    C = 0.3 * C
    C.diagonal(dim1=-2, dim2=-1).abs_().add_(1.0)
    Y = 0.3 * torch.randn(b, max(t - 1, 0), n, n, generator=g, dtype=torch.float64)
    D = C @ C.transpose(-1, -2)
    D[:, 1:] += Y @ Y.transpose(-1, -2)
    L = Y @ C[:, :-1].transpose(-1, -2)  # H[t+1, t] = Y_t C_t^T
    return D.contiguous(), L.contiguous()


@pytest.mark.parametrize(("t", "n"), [(5, 18), (1, 3), (4, 5)])
def test_compiled_block_cholesky_matches_the_batched_one(t: int, n: int) -> None:
    D, L = _spd_blocks(7, t, n)
    D[3] = -D[3]  # not positive definite: only this sample fails
    rhs = torch.randn(7, t, n, dtype=torch.float64)
    F = linalg.factor(D, L, "banded")
    assert F.blocks is not None
    with kernels.disabled():
        F0 = linalg.factor(D, L, "banded")
        F1 = linalg.factor(D, L, "dense")
        want = linalg.solve(F0, rhs)
    assert F.ok.tolist() == F0.ok.tolist() == F1.ok.tolist() == [True, True, True, False, True, True, True]
    got = linalg.solve(F, rhs)
    ok = F.ok
    torch.testing.assert_close(got[ok], want[ok], rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(linalg.block_matvec(D[ok], L[ok], got[ok]), rhs[ok], rtol=1e-9, atol=1e-9)
    for a, b in zip(F.C, F0.C):
        torch.testing.assert_close(a[ok], b[ok], rtol=1e-10, atol=1e-12)


def test_block_cholesky_keeps_autograd_on_the_torch_path() -> None:
    D, L = _spd_blocks(2, 3, 4)
    D.requires_grad_(True)
    F = linalg.factor(D, L, "banded")
    assert F.blocks is None
    linalg.solve(F, torch.ones(2, 3, 4, dtype=torch.float64)).sum().backward()
    assert D.grad is not None and torch.isfinite(D.grad).all()


# ---------------------------------------------------------------------------------------------- training
def _layer_step(env: str, variant: str, x0: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    torch.manual_seed(0)
    policy = DEQMPCPolicy.from_env(f"DEQMPC/{env}-v0", variant, hidden=16)
    policy.layer.net.double()  # float64 end to end, so that the comparison is not float32 round-off
    out = policy.layer(x0, None)
    out2 = policy.layer(x0, out.state)  # one warm-started (streaming) call as in training
    loss = sum(s.abs().mean() + th.abs().mean() for s, th in zip(out.states + out2.states, out.thetas + out2.thetas))
    loss.backward()  # type: ignore[union-attr]
    grads = [p.grad.detach().clone() for p in policy.layer.net.parameters() if p.grad is not None]
    return [s.detach() for s in out.states + out2.states] + [c.detach() for c in out.controls], grads


def _rel(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    return max(float((x - y).abs().max()) / (float(y.abs().max()) + 1e-12) for x, y in zip(a, b))


@pytest.mark.parametrize("env", ENVS)
@pytest.mark.parametrize("variant", VARIANTS)
def test_a_training_step_equals_the_eager_path(env: str, variant: str) -> None:
    """Per-iterate states and controls and the parameter gradients of a cold plus a warm layer call (float64 end to
    end) agree with the eager path to 1e-6 relative -- or, where the eager path itself is more sensitive than that
    to round-off (its answers move by more when x0 moves by a few 1e-15 relative: the partly converged DEQ-MPC
    iterates of the untrained quadrotors, whose exit tests and line searches flip), to within 20x that
    sensitivity."""
    system = get_system(env.replace("Obs", "").lower())
    x0, _ = _xu(system, 3, seed=11)
    iterates, grads = _layer_step(env, variant, x0)
    with kernels.disabled():
        iterates0, grads0 = _layer_step(env, variant, x0)
        noise = [_layer_step(env, variant, x0 * (1.0 + eps)) for eps in (1e-15, -1e-15, 3e-15, -3e-15)]
    assert len(iterates) == len(iterates0) and len(grads) == len(grads0) > 0
    sens_it = max(_rel(it, iterates0) for it, _ in noise)
    sens_gr = max(_rel(gr, grads0) for _, gr in noise)
    assert _rel(iterates, iterates0) <= max(1e-6, 20 * sens_it)
    assert _rel(grads, grads0) <= max(1e-6, 20 * sens_gr)


def test_a_short_training_run_gives_the_eager_weights(tmp_path) -> None:
    import deqmpc_gym
    from deqmpc_gym.data import ExpertDataset
    from deqmpc_gym.training import ImitationTrainer, TrainConfig

    path = f"{deqmpc_gym.__path__[0]}/datasets/Pendulum-v0-300.npz"
    ds = ExpertDataset.load(path, env_id="DEQMPC/Pendulum-v0").subset(20)
    weights = []
    for on in (True, False):
        prev = kernels.set_enabled(on)
        try:
            torch.manual_seed(0)
            policy = DEQMPCPolicy.from_env("DEQMPC/Pendulum-v0", "deq-mpc-nn", hidden=16)
            cfg = TrainConfig(steps=24, batch_size=8, val_batches=1, val_every=12, seed=0)
            ImitationTrainer(policy, ds, cfg, tmp_path / f"run-{on}", progress=False).train()
            weights.append([p.detach().clone() for p in policy.layer.net.parameters()])
        finally:
            kernels.set_enabled(prev)
    for a, b in zip(*weights):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_a_corrupt_numba_cache_is_rebuilt(tmp_path, monkeypatch) -> None:
    """A kernel module whose numba cache cannot be loaded is compiled afresh (no fallback, no warning)."""
    import sys

    monkeypatch.setenv("DEQMPC_GYM_CACHE", str(tmp_path))
    system = _DoubleIntegrator()
    k = kernels._load(system)
    for f in (k.source.parent / "__pycache__").glob(f"{k.source.stem}.*"):
        f.write_bytes(b"not a numba cache")
    sys.modules.pop(k.source.stem)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        k2 = kernels._checked(system)
    x, u = _xu(system, 4)
    np.testing.assert_array_equal(k2.step(x.numpy(), u.numpy()), k.step(x.numpy(), u.numpy()))


# ---------------------------------------------------------------------------------------------- fused Newton loop
def _solve_both(problem: Any, x0: torch.Tensor, theta: torch.Tensor) -> tuple[Any, Any]:
    from deqmpc_gym.mpc import solve

    out = solve(problem, x0, theta)
    with kernels.disabled():
        ref = solve(problem, x0, theta)
    return out, ref


@pytest.mark.parametrize("name", ["pendulum", "cartpole", "quadrotor", "qpole", "qpole-obstacles"])
def test_the_fused_newton_loop_gives_the_eager_solve(name: str) -> None:
    from deqmpc_gym.mpc import MPCConfig, MPCProblem, fused
    from deqmpc_gym.systems import OBSTACLE_CENTERS

    system = get_system(name.split("-")[0])
    kw: dict[str, Any] = {}
    if name.endswith("obstacles"):  # spheres on the straight path to the goal: obstacle rows become active
        kw = {"obstacle_centers": OBSTACLE_CENTERS, "obstacle_radius": 1.5}
    problem = MPCProblem(system, MPCConfig(), **kw)
    x0, _ = _xu(system, 12, seed=4)
    theta = torch.as_tensor(np.asarray(system.goal)).expand(12, 5, -1).clone()
    theta[:, 0] = x0
    assert fused.usable(problem, x0, track_grad=False)
    out, ref = _solve_both(problem, x0, theta)
    x, u, info, info0 = out[0], out[1], out[3], ref[3]
    torch.testing.assert_close(x, ref[0], rtol=1e-8, atol=1e-8)
    torch.testing.assert_close(u, ref[1], rtol=1e-8, atol=1e-8)
    assert torch.equal(info.newton_steps, info0.newton_steps) and torch.equal(info.converged, info0.converged)
    if kw:
        g, _ = problem.ineq(x, u, out[2].obstacle_idx, jac=False)
        assert bool((g[:, 1:, 2 * system.nu:] > -0.5).any()), "the obstacle rows matter in this test"


def test_the_fused_al_loop_streams_as_the_eager_loop() -> None:
    """A streaming call (``stop_at_rho_max``) whose samples run 3, 2, 1 and 0 AL iterations, one of them from a
    non-finite warm start: the fused AL loop (all iterations in one compiled call) gives the eager loop's iterates,
    multipliers, penalties, counts and flags."""
    from dataclasses import replace

    from deqmpc_gym.mpc import MPCConfig, MPCProblem, solve

    system = get_system("cartpole")
    problem = MPCProblem(system, MPCConfig())
    x0, _ = _xu(system, 5, seed=3)
    theta = torch.as_tensor(np.asarray(system.goal)).expand(5, 5, -1).clone()
    theta[:, 0] = x0
    _, _, st, _ = solve(problem, x0, theta, iters=2)  # penalty 100
    lam = st.lam_eq.clone()
    lam[4, 0, 0] = float("nan")  # restarted cold
    st = replace(st, rho=st.rho * torch.tensor([1.0, 1e5, 1e6, 1e7, 1.0], dtype=st.rho.dtype), lam_eq=lam)
    out = solve(problem, x0, theta, state=st, iters=3, stop_at_rho_max=True)
    with kernels.disabled():
        ref = solve(problem, x0, theta, state=st, iters=3, stop_at_rho_max=True)
    assert out[3].al_iters.tolist() == ref[3].al_iters.tolist() == [3, 2, 1, 0, 3]
    for a, b in ((out[0], ref[0]), (out[1], ref[1]), (out[2].rho, ref[2].rho)):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)  # round-off, amplified at a penalty of 1e8
    for a, b in ((out[2].lam_eq, ref[2].lam_eq), (out[2].lam_ineq, ref[2].lam_ineq)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)  # lam + rho d: the defects' round-off times 1e8
    for field in ("newton_steps", "converged", "fallback", "nonfinite"):
        assert torch.equal(getattr(out[3], field), getattr(ref[3], field)), field
    torch.testing.assert_close(out[3].primal_residual, ref[3].primal_residual, rtol=1e-6, atol=1e-12)


def test_the_fused_loop_contains_a_nan_sample_and_skips_user_constraints() -> None:
    from deqmpc_gym.mpc import MPCConfig, MPCProblem, fused

    system = get_system("quadrotor")
    problem = MPCProblem(system, MPCConfig())
    x0, _ = _xu(system, 5, seed=2)
    theta = torch.as_tensor(np.asarray(system.goal)).expand(5, 5, -1).clone()
    theta[1, 2:, 0] = 1e300  # finite input whose cost overflows: the sample's merit is not finite
    out, ref = _solve_both(problem, x0, theta)
    info = out[3]
    assert bool(info.nonfinite[1]) and not bool(info.nonfinite[[0, 2, 3, 4]].any())
    keep = [0, 2, 3, 4]
    torch.testing.assert_close(out[0][keep], ref[0][keep], rtol=1e-8, atol=1e-8)
    assert torch.isfinite(out[1][keep]).all()
    # a user constraint's Jacobian comes from autograd: the batched torch loop runs
    limited = MPCProblem(system, MPCConfig(), constraints=[lambda x, u: x[..., 2:3] - 10.0])
    assert not fused.usable(limited, x0, track_grad=False)
    assert not fused.usable(problem, x0, track_grad=True)
    assert not fused.usable(problem, x0.float(), track_grad=False)


def test_a_fused_loop_that_cannot_compile_falls_back_with_a_warning(monkeypatch) -> None:
    from deqmpc_gym.mpc import MPCConfig, MPCProblem, fused

    system = _DoubleIntegrator()
    problem = MPCProblem(system, MPCConfig())
    monkeypatch.setattr(fused, "_source", lambda: "\n\ndef newton_loop(:\n")  # a broken kernel source
    monkeypatch.setattr(fused, "_MODULES", {})
    x0, _ = _xu(system, 3)
    with pytest.warns(RuntimeWarning, match="no fused Newton loop for _DoubleIntegrator"):
        assert not fused.usable(problem, x0, track_grad=False)
    theta = torch.zeros(3, 5, 2, dtype=torch.float64)
    out, ref = _solve_both(problem, x0, theta)
    torch.testing.assert_close(out[0], ref[0], rtol=1e-12, atol=1e-12)


def test_the_fused_kernel_source_names_the_linear_algebra_it_compiles_in():
    """numba's disk cache keys a module on its own source: the fused Newton loop's source carries a digest of
    ``linalg_kernels.py`` (whose factorisation it calls), so editing that file compiles the loop afresh instead of
    loading stale machine code."""
    import hashlib
    from pathlib import Path

    from deqmpc_gym.mpc import fused, linalg_kernels

    digest = hashlib.sha256(Path(linalg_kernels.__file__).read_bytes()).hexdigest()[:16]
    assert f"# linalg_kernels {digest}" in fused._source()
