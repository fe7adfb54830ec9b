"""The DEQ-MPC layer: the joint fixed point of a network and an augmented-Lagrangian MPC solver.

For ``i = 1..N`` (paper, Alg. 1 and eq. 9)::

    theta^i = NN(x0, tau^{i-1})                      # waypoints (B, T, nx)
    tau^i   = MPC-m(theta^i, warm start tau^{i-1})   # m AL iterations from the previous iterate

Every iterate is returned so that training can put a loss on each of them. Diff-MPC runs the network once
and then the solver alone; the network-only baselines iterate the network on its own output.

Streaming (paper section 4.2.3): a call with the previous :class:`StreamState` warm-starts from the previous
solution shifted one knot (last knot re-seeded with the network's new last waypoint, duals reset, penalty
restarted so that the last warm AL iteration runs at ``rho_max``, the paper's
``rho = rho_max / 10^(remaining iterations)``) and runs ``K`` DEQ-MPC iterations (Diff-MPC: a few AL
iterations).

Shapes: ``B`` batch, ``T`` horizon (knots incl. the current state), ``nx``/``nu`` state/control sizes.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from deqmpc_gym.errors import ConfigError
from deqmpc_gym.mpc import CompiledSolver, MPCProblem, SolveInfo, SolverState, init_state, solve
from deqmpc_gym.nets import NetConfig, SolverStats, build_network, shift_latent
from deqmpc_gym.policies.config import PolicyConfig
from deqmpc_gym.systems import System


@dataclass
class StreamState:
    """Warm-start state carried between control steps (all tensors batched on dim 0, detached).

    Attributes:
        plan: ``(B, T, nx)`` solver dtype, the last returned state trajectory.
        controls: ``(B, T, nu)`` solver dtype, the last returned controls.
        z: ``(B, h, T-1)`` network latent, or None.
        solver: the MPC solver state (primal, duals, penalty, obstacle sets), or None for network-only variants.
    """

    plan: Tensor
    controls: Tensor
    z: Tensor | None = None
    solver: SolverState | None = None

    @property
    def batch_size(self) -> int:
        return int(self.plan.shape[0])


@dataclass
class LayerOutput:
    """Result of one :class:`DEQMPCLayer` call.

    Attributes:
        thetas: list of ``(B, T, nx)`` network waypoints, one per iterate (solver dtype).
        states: list of ``(B, T, nx)`` MPC state trajectories, one per iterate (== thetas for network-only).
        controls: list of ``(B, T, nu)`` MPC controls, one per iterate (physical units).
        state: the :class:`StreamState` to warm-start the next call (detached).
        solve_info: :class:`~deqmpc_gym.mpc.SolveInfo` of the last solver call, or None.
        net_stats: DEQ fixed-point statistics of the last network call, or None.
    """

    thetas: list[Tensor]
    states: list[Tensor]
    controls: list[Tensor]
    state: StreamState
    solve_info: SolveInfo | None = None
    net_stats: SolverStats | None = None
    solver_iters: Tensor | None = None

    @property
    def action(self) -> Tensor:
        """``(B, nu)`` physical control to apply now: ``u_0`` of the final iterate."""
        return self.controls[-1][:, 0]


def _map_tensors(obj: Any, fn: Any) -> Any:
    """Apply ``fn`` to every batched tensor field of a (nested) dataclass; other fields are kept."""
    if isinstance(obj, Tensor):
        return fn(obj)
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        changes = {f.name: _map_tensors(getattr(obj, f.name), fn) for f in dataclasses.fields(obj)}
        return dataclasses.replace(obj, **changes)
    return obj


def select_state(state: StreamState, index: Tensor) -> StreamState:
    """Rows ``index: (k,) long`` of every batched tensor of ``state``."""
    b = state.batch_size
    return _map_tensors(state, lambda t: t[index] if t.dim() > 0 and t.shape[0] == b else t)


def scatter_state(full: StreamState, index: Tensor, part: StreamState) -> StreamState:
    """``full`` with rows ``index`` replaced by ``part`` (tensors matched field by field)."""
    b = full.batch_size

    def merge(a: Any, p: Any) -> Any:
        if isinstance(a, Tensor) and isinstance(p, Tensor) and a.dim() > 0 and a.shape[0] == b:
            out = a.clone()
            out[index] = p.to(out.dtype)
            return out
        if dataclasses.is_dataclass(a) and dataclasses.is_dataclass(p) and not isinstance(a, type):
            return dataclasses.replace(a, **{f.name: merge(getattr(a, f.name), getattr(p, f.name))
                                             for f in dataclasses.fields(a)})
        return a

    return merge(full, part)


def detach_state(state: StreamState) -> StreamState:
    """A copy of ``state`` with every tensor detached."""
    return _map_tensors(state, lambda t: t.detach())


class DEQMPCLayer(nn.Module):
    """Network + MPC as one ``nn.Module`` (see the module docstring).

    Args:
        system: the controlled :class:`~deqmpc_gym.systems.System`.
        config: :class:`PolicyConfig`.
        obstacle_centers: ``(K, 3)`` obstacle centres [m] or None; obstacle_radius: their radius [m].
        device: where parameters and solver tensors live.
    """

    _u_nominal: Tensor  # buffers (registered in __init__)
    _u_low: Tensor
    _u_high: Tensor

    def __init__(self, system: System, config: PolicyConfig, *, obstacle_centers: np.ndarray | None = None,
                 obstacle_radius: float | None = None, device: torch.device | str = "cpu") -> None:
        super().__init__()
        self.system = system
        self.config = config
        self.variant = config.variant_enum
        self.solver_dtype = config.mpc.dtype
        net_cfg = NetConfig(nx=system.nx, nq=system.nq, dt=system.dt, T=config.horizon, hidden=config.net.hidden,
                            kind=self.variant.net_kind, deq_grad=config.net.deq_grad.value,
                            anderson=config.net.anderson)
        self.net = build_network(net_cfg).to(device)
        self.problem: MPCProblem | None = None
        if self.variant.uses_mpc:
            self.problem = MPCProblem(system, config.mpc, obstacle_centers=obstacle_centers,
                                      obstacle_radius=obstacle_radius, device=device)
        self._fast: CompiledSolver | None = None
        if config.compiled_solver:
            if self.problem is None:
                raise ConfigError(f"PolicyConfig.compiled_solver needs an MPC variant; {self.variant.value!r} has no "
                                  "MPC solver")
            # padded batches: predict()'s sub-batches (envs that reset) vary in size; each new size would compile
            self._fast = CompiledSolver(self.problem, pad_batches=True)  # ConfigError for unsupported problems
        self.register_buffer("_u_nominal", system.tensor("u_nominal", dtype=self.solver_dtype, device=device),
                             persistent=False)
        self.register_buffer("_u_low", system.tensor("u_low", dtype=self.solver_dtype, device=device),
                             persistent=False)
        self.register_buffer("_u_high", system.tensor("u_high", dtype=self.solver_dtype, device=device),
                             persistent=False)

    # ------------------------------------------------------------------ public
    def forward(self, x0: Tensor, state: StreamState | None = None) -> LayerOutput:
        """Run the layer cold (``state is None``: N iterations) or warm-started (K iterations).

        Args:
            x0: ``(B, nx)`` current states (any float dtype; converted to the solver dtype).
            state: the previous call's :attr:`LayerOutput.state`, or None for a cold start.

        Returns:
            :class:`LayerOutput` with every iterate.
        """
        x0 = x0.to(self._u_low.device, self.solver_dtype)
        if self.variant.joint_fixed_point:
            return self._deq_mpc(x0, state)
        if self.variant.diff_mpc:
            return self._diff_mpc(x0, state)
        return self._network_only(x0, state)

    # ------------------------------------------------------------------ variants
    def _solve(self, x0: Tensor, theta: Tensor, state: SolverState | None, **kw: Any):
        """:func:`~deqmpc_gym.mpc.solve` on :attr:`problem`, or -- with ``PolicyConfig.compiled_solver`` and no
        gradient needed -- the same call through :class:`~deqmpc_gym.mpc.CompiledSolver`."""
        if self._fast is not None and not (torch.is_grad_enabled() and (x0.requires_grad or theta.requires_grad)):
            kw.pop("hessian", None)  # no backward: the Hessian of the gradient plays no part
            return self._fast(x0, theta, state, **kw)
        return solve(self.problem, x0, theta, state, **kw)

    def _net(self, x0: Tensor, x_prev: Tensor, z: Tensor | None) -> tuple[Tensor, Tensor, SolverStats | None]:
        out = self.net(x0, x_prev, z)
        return out.theta.to(self.solver_dtype), out.z, out.stats

    def _repeat(self, x0: Tensor) -> Tensor:
        return x0.unsqueeze(1).expand(-1, self.config.horizon, -1)

    def _warm_inputs(self, x0: Tensor, state: StreamState) -> tuple[Tensor, Tensor | None]:
        """Previous plan shifted one knot (last knot duplicated), with knot 0 replaced by the measured x0."""
        plan = torch.cat([state.plan[:, 1:], state.plan[:, -1:]], dim=1)
        plan = torch.cat([x0.unsqueeze(1), plan[:, 1:]], dim=1)
        z = shift_latent(state.z) if state.z is not None else None
        return plan, z

    def _deq_mpc(self, x0: Tensor, state: StreamState | None) -> LayerOutput:
        cfg, problem = self.config, self.problem
        assert problem is not None  # internal invariant: DEQ-MPC variants always build a problem
        if state is None:
            x_prev, z, solver_state, n_iter, stream = self._repeat(x0), None, None, cfg.deq_mpc_iters, False
        else:
            (x_prev, z), solver_state = self._warm_inputs(x0, state), state.solver
            n_iter, stream = cfg.stream_iters, True
        thetas, xs, us = [], [], []
        info, stats, iters = None, None, torch.zeros(x0.shape[0], dtype=torch.long, device=x0.device)
        for i in range(n_iter):
            theta, z, stats = self._net(x0, x_prev, z)
            if i == 0:
                if solver_state is None:
                    solver_state = init_state(problem, x0, theta.detach())
                else:
                    solver_state = solver_state.shift(problem, x_last=theta[:, -1].detach(),
                                                      iters_remaining=n_iter * cfg.al_iters)
            x, u, solver_state, info = self._solve(x0, theta, solver_state, iters=cfg.al_iters,
                                                   gradient=cfg.mpc.gradient, stop_at_rho_max=stream,
                                                   exit_residual=cfg.stream_exit_residual if stream else None)
            iters = iters + info.newton_steps.to(iters.dtype)
            thetas.append(theta)
            xs.append(x)
            us.append(u)
            x_prev = x
        new_state = detach_state(StreamState(plan=xs[-1], controls=us[-1], z=z, solver=solver_state))
        return LayerOutput(thetas, xs, us, new_state, info, stats, iters)

    def _diff_mpc(self, x0: Tensor, state: StreamState | None) -> LayerOutput:
        cfg, problem = self.config, self.problem
        assert problem is not None  # internal invariant
        z = shift_latent(state.z) if (state is not None and state.z is not None) else None
        theta, z, stats = self._net(x0, self._repeat(x0), z)
        if state is None:
            solver_state, iters, stream = init_state(problem, x0, theta.detach()), cfg.diff_mpc_al_iters, False
        else:
            iters, stream = cfg.stream_al_iters, True
            solver_state = state.solver.shift(problem, x_last=theta[:, -1].detach(), iters_remaining=iters)
        x, u, solver_state, info = self._solve(x0, theta, solver_state, iters=iters,
                                               gradient="final_implicit", stop_at_rho_max=stream,
                                               exit_residual=cfg.stream_exit_residual if stream else None,
                                               hessian=cfg.diff_mpc_hessian)
        new_state = detach_state(StreamState(plan=x, controls=u, z=z, solver=solver_state))
        return LayerOutput([theta], [x], [u], new_state, info, stats, info.newton_steps)

    def _network_only(self, x0: Tensor, state: StreamState | None) -> LayerOutput:
        cfg = self.config
        if state is None:
            x_prev, z, n_iter = self._repeat(x0), None, cfg.deq_mpc_iters
        else:
            (x_prev, z), n_iter = self._warm_inputs(x0, state), cfg.stream_iters
        thetas, us, stats = [], [], None
        for _ in range(n_iter):
            theta, z, stats = self._net(x0, x_prev, z)
            thetas.append(theta)
            x_prev = theta
        u0 = self._track_first_waypoint(x0, thetas[-1][:, 1].detach())
        u = torch.cat([u0.unsqueeze(1), self._u_nominal.expand(x0.shape[0], cfg.horizon - 1, -1)], dim=1)
        us = [u] * len(thetas)
        new_state = detach_state(StreamState(plan=thetas[-1], controls=u, z=z, solver=None))
        return LayerOutput(thetas, thetas, us, new_state, None, stats, None)

    def _track_first_waypoint(self, x0: Tensor, target: Tensor, steps: int = 5) -> Tensor:
        """Box-constrained Gauss-Newton inverse dynamics ``argmin_u |f(x0, u) - target|^2`` -> ``(B, nu)``.

        Used only by the network-only baselines, which predict states but no controls.
        """
        u = self._u_nominal.expand(x0.shape[0], -1).clone()
        eye = 1e-6 * torch.eye(self.system.nu, dtype=x0.dtype, device=x0.device)
        with torch.no_grad():
            for _ in range(steps):
                xn, _, B = self.system.step_and_jacobians(x0.detach(), u)
                r = xn - target
                du = torch.linalg.solve(B.transpose(1, 2) @ B + eye, -(B.transpose(1, 2) @ r.unsqueeze(-1)))
                u = torch.minimum(torch.maximum(u + du.squeeze(-1), self._u_low), self._u_high)
        return u


__all__ = ["DEQMPCLayer", "LayerOutput", "StreamState", "select_state", "scatter_state", "detach_state"]
