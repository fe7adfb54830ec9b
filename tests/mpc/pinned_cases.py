"""Solver calls whose every output is pinned bit for bit in ``tests/data/solver_pinned_<cpu>.pt`` (see
``test_solver_pinned.py``): the eager torch loop, the fused (numba) Newton loop, ``CompiledSolver``'s functions run
eagerly, every gradient and the rare paths (sub-batches, regularised factorisations, active-set re-solves,
non-finite warm starts, user constraints, obstacles, float32).

Bit-level results hold for the same libraries on the same kind of CPU, so there is one recording per CPU kind (its
vector extensions, ``torch.backends.cpu.get_cpu_capability()``), each with a ``.json`` of where it was made.
``python tests/mpc/pinned_cases.py`` records this machine's file (again only after a deliberate change of the
numerics, on every CPU kind recorded; a new CPU kind only at a commit whose numerics reproduce another kind's
recording where both can run).
"""

from __future__ import annotations

import json
import platform
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from deqmpc_gym.mpc import CompiledSolver, MPCConfig, MPCProblem, SolveInfo, SolverState, solve
from deqmpc_gym.systems import OBSTACLE_CENTERS, Cartpole, Pendulum, QPole, Quadrotor, kernels

DATA = Path(__file__).resolve().parents[1] / "data"


def pinned_file(cpu: str) -> Path:
    """The recording of CPU kind ``cpu`` (e.g. ``"AVX2"``); its ``.with_suffix(".json")`` says where it was made."""
    return DATA / f"solver_pinned_{cpu.lower()}.pt"


def environment() -> dict[str, str]:
    """What bit-identical results depend on besides the code: the libraries and the CPU's vector extensions."""
    import numba

    return {"torch": torch.__version__, "numpy": np.__version__, "numba": numba.__version__,
            "cpu": torch.backends.cpu.get_cpu_capability(), "machine": platform.machine()}


def _batch(system, B: int, T: int, seed: int = 0, noise: float = 0.1) -> tuple[torch.Tensor, torch.Tensor]:
    """``x0 (B, nx)`` and waypoints ``theta (B, T, nx)``: a rollout of random in-bounds controls plus noise."""
    rng = np.random.default_rng(seed)
    x0 = torch.tensor(system.sample_initial_states(rng, B))
    lo, hi = np.asarray(system.u_low), np.asarray(system.u_high)
    u = torch.tensor((lo + hi) / 2 + (hi - lo) * (rng.random((B, T, system.nu)) - 0.5))
    xs = [x0]
    with kernels.disabled():
        for t in range(T - 1):
            xs.append(system.step(xs[-1], u[:, t]))
    return x0, torch.stack(xs, 1) + noise * torch.tensor(rng.standard_normal((B, T, system.nx)))


def _flat(prefix: str, out) -> dict[str, torch.Tensor]:
    """Every tensor of a ``(x, u, state, info)`` result, by name."""
    x, u, state, info = out
    res = {f"{prefix}.x": x.detach(), f"{prefix}.u": u.detach()}
    for obj, name in ((state, "state"), (info, "info")):
        assert isinstance(obj, (SolverState, SolveInfo))
        for k, v in vars(obj).items():
            if isinstance(v, torch.Tensor):
                res[f"{prefix}.{name}.{k}"] = v.detach()
    return res


def _with_grads(prefix: str, call: Callable, x0: torch.Tensor, theta: torch.Tensor) -> dict[str, torch.Tensor]:
    """``call(x0, theta)`` with both inputs requiring grad, and the gradients of a fixed weighting of ``(x, u)``."""
    x0 = x0.clone().requires_grad_(True)
    theta = theta.clone().requires_grad_(True)
    out = call(x0, theta)
    x, u = out[0], out[1]
    gen = torch.Generator().manual_seed(7)
    wx = torch.randn(x.shape, generator=gen, dtype=x.dtype)
    wu = torch.randn(u.shape, generator=gen, dtype=u.dtype)
    ((x * wx).sum() + (u * wu).sum()).backward()
    res = _flat(prefix, out)
    res[f"{prefix}.grad_x0"], res[f"{prefix}.grad_theta"] = x0.grad, theta.grad
    return res


def _eager_and_fused(prefix: str, fn: Callable[[], dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """``fn()`` once on the torch loop (kernels off) and once with the compiled kernels (the fused loop)."""
    with kernels.disabled():
        res = {k.replace("@", f"{prefix}.torch"): v for k, v in fn().items()}
    res.update({k.replace("@", f"{prefix}.fused"): v for k, v in fn().items()})
    return res


def case_pendulum() -> dict[str, torch.Tensor]:
    system = Pendulum()
    problem = MPCProblem(system, MPCConfig(horizon=5))
    x0, theta = _batch(system, 12, 6)
    th0, th1 = theta[:, :5], theta[:, 1:]

    def run() -> dict[str, torch.Tensor]:
        res = {}
        res.update(_with_grads("@.implicit", lambda a, b: solve(problem, a, b, iters=4), x0, th0))
        res.update(_with_grads("@.final", lambda a, b: solve(problem, a, b, iters=3, gradient="final_implicit"),
                               x0, th0))
        cold = solve(problem, x0, th0, iters=3)
        warm = cold[2].shift(problem, x_last=th1[:, -1], iters_remaining=2)
        res.update(_flat("@.stream", solve(problem, cold[0][:, 1], th1, state=warm, iters=2, stop_at_rho_max=True,
                                           exit_residual=1e-3)))
        res.update(_flat("@.warm", solve(problem, cold[0][:, 1], th1, state=warm, iters=2)))
        res.update(_with_grads("@.unroll", lambda a, b: solve(problem, a, b, iters=2, gradient="unroll"), x0, th0))
        return res

    return _eager_and_fused("pendulum", run)


def case_standalone() -> dict[str, torch.Tensor]:
    """Cold solves to convergence (``stop_when_converged``: sub-batches of the AL loop, rollout answers)."""
    res = {}
    for name, system, T in (("pendulum", Pendulum(), 10), ("cartpole", Cartpole(), 8)):
        # the start of the pinned iterates: x = theta (the standalone configuration's default is the rollout); the
        # recording predates the shooting polish (polish_iters), which runs on unconverged samples only
        problem = MPCProblem(system, MPCConfig.standalone(horizon=T, rho_init=1.0, cold_start="theta",
                                                          polish_iters=0))
        x0, theta = _batch(system, 10, T, seed=3)
        u_ref = torch.linspace(-0.5, 0.5, 10, dtype=torch.float64)[:, None].expand(10, system.nu)

        def run(problem=problem, x0=x0, theta=theta, u_ref=u_ref) -> dict[str, torch.Tensor]:
            out = {}
            out.update(_flat("@.rollout", solve(problem, x0, theta, iters=30, stop_when_converged=True, u_ref=u_ref)))
            out.update(_flat("@.iterate", solve(problem, x0, theta, iters=30, stop_when_converged=True,
                                                output="iterate")))
            def exact(a, b):
                return solve(problem, a, b, iters=30, stop_when_converged=True, gradient="final_implicit",
                             hessian="exact")

            out.update(_with_grads("@.exact", exact, x0, theta))
            return out

        res.update(_eager_and_fused(f"standalone.{name}", run))
    return res


def case_cartpole_stream() -> dict[str, torch.Tensor]:
    """Streaming (samples stop at rho_max at different iterations), a non-finite warm start, float32."""
    system = Cartpole()
    problem = MPCProblem(system, MPCConfig(horizon=6))
    x0, theta = _batch(system, 16, 7, seed=1)
    th0, th1 = theta[:, :6], theta[:, 1:]

    def run() -> dict[str, torch.Tensor]:
        res = {}
        cold = solve(problem, x0, th0, iters=4)
        res.update(_flat("@.cold", cold))
        warm = cold[2].shift(problem, x_last=th1[:, -1])
        warm.rho[::3] = 1e6  # samples reach rho_max after different numbers of AL iterations
        warm.x[2, 3, 0] = float("nan")
        res.update(_flat("@.stream", solve(problem, cold[0][:, 1], th1, state=warm, iters=4, stop_at_rho_max=True)))
        return res

    res = _eager_and_fused("cartpole", run)
    p32 = MPCProblem(system, MPCConfig(horizon=6, dtype=torch.float32))
    res.update(_with_grads("cartpole.float32", lambda a, b: solve(p32, a, b, iters=3), x0.float(), th0.float()))
    return res


def case_qpole() -> dict[str, torch.Tensor]:
    """A tiny control weight and the largest penalty: regularised factorisations (Cholesky fails at rho = 1e12)."""
    system = QPole()
    problem = MPCProblem(system, MPCConfig(horizon=8, rho_init=1e12))
    x0, theta = _batch(system, 8, 8, seed=2, noise=0.5)

    def run() -> dict[str, torch.Tensor]:
        return _with_grads("@.cold", lambda a, b: solve(problem, a, b, iters=4), x0, theta)

    return _eager_and_fused("qpole", run)


def case_quadrotor_obstacles() -> dict[str, torch.Tensor]:
    system = Quadrotor()
    problem = MPCProblem(system, MPCConfig(horizon=5), obstacle_centers=OBSTACLE_CENTERS, obstacle_radius=0.5)
    x0, theta = _batch(system, 6, 5, seed=4)

    def run() -> dict[str, torch.Tensor]:
        res = _with_grads("@.implicit", lambda a, b: solve(problem, a, b, iters=2), x0, theta)
        res.update(_with_grads("@.final", lambda a, b: solve(problem, a, b, iters=2, gradient="final_implicit"),
                               x0, theta))
        return res

    return _eager_and_fused("quadrotor", run)


def case_user_constraints() -> dict[str, torch.Tensor]:
    system = Cartpole()
    problem = MPCProblem(system, MPCConfig(horizon=5), constraints=[lambda x, u: x[..., 2:3] - 0.5])
    x0, theta = _batch(system, 6, 5, seed=5)
    return _with_grads("user.implicit", lambda a, b: solve(problem, a, b, iters=3), x0, theta)


def case_compiled() -> dict[str, torch.Tensor]:
    """``CompiledSolver``'s functions run eagerly (``compile=False``): cold, streaming, padded batches, gradients."""
    res = {}
    for name, system in (("pendulum", Pendulum()), ("cartpole", Cartpole())):
        problem = MPCProblem(system, MPCConfig(horizon=5))
        x0, theta = _batch(system, 10, 6, seed=6)
        th0, th1 = theta[:, :5], theta[:, 1:]
        fast = CompiledSolver(problem, compile=False, pad_batches=True)
        cold = fast(x0, th0, iters=6)
        res.update(_flat(f"compiled.{name}.cold", cold))
        warm = cold[2].shift(problem, x_last=th1[:, -1], iters_remaining=2)
        warm.lam_eq[4, 0, 0] = float("inf")
        res.update(_flat(f"compiled.{name}.stream", fast(cold[0][:, 1], th1, state=warm, iters=2,
                                                          stop_at_rho_max=True, exit_residual=1e-3)))
        res.update(_with_grads(f"compiled.{name}.implicit", lambda a, b, f=fast: f(a, b, iters=3), x0, th0))
        res.update(_with_grads(f"compiled.{name}.final",
                               lambda a, b, f=fast: f(a, b, iters=3, gradient="final_implicit"), x0, th0))
    return res


CASES = (case_pendulum, case_standalone, case_cartpole_stream, case_qpole, case_quadrotor_obstacles,
         case_user_constraints, case_compiled)


def compute(case: Callable[[], dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    torch.set_num_threads(1)  # as the test suite (tests/conftest.py)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        return {k: v.detach().clone() for k, v in case().items()}


if __name__ == "__main__":
    allres: dict[str, torch.Tensor] = {}
    for case in CASES:
        allres.update(compute(case))
    env = environment()
    path = pinned_file(env["cpu"])
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(allres, path)
    path.with_suffix(".json").write_text(json.dumps(env, indent=1) + "\n")
    print(f"{len(allres)} tensors -> {path}", file=sys.stderr)
