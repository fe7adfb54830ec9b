"""Define your own system and use it with the env, the MPC solver and a DEQ-MPC policy.

A ``deqmpc_gym.systems.System`` subclass is the single source of truth for a task: dynamics (written once
with the ``ops`` namespace so they run on numpy for the Gymnasium env and on torch for the batched MPC),
control bounds, MPC weights, goal, initial-state distribution, reward weights and success tolerance. This
script defines a double integrator (position ``p``, velocity ``v``, acceleration input ``u``) and

1. wraps it in a Gymnasium env: ``SystemEnv(system=DoubleIntegrator())``;
2. controls it with the MPC solver alone (``MPCProblem`` + ``solve``, tracking the goal as waypoints);
3. builds a ``DEQMPCPolicy`` for it and runs a few ``act()`` steps (untrained: train it by imitation with
   ``ImitationTrainer`` on trajectories of any expert, e.g. the MPC of step 2, via ``deqmpc_gym.data``).

Run::

    python examples/custom_system.py
    python examples/custom_system.py --quick      # tiny smoke run (used by the tests)
"""

from __future__ import annotations

import argparse

import numpy as np
import torch

from deqmpc_gym.envs import SystemEnv
from deqmpc_gym.mpc import MPCConfig, MPCProblem, solve
from deqmpc_gym.policies import DEQMPCPolicy, PolicyConfig
from deqmpc_gym.systems import System


class DoubleIntegrator(System):
    """``p+ = p + dt v+``, ``v+ = v + dt u`` (semi-implicit Euler), ``|u| <= 1``; drive ``(p, v)`` to 0."""

    name = "double_integrator"
    nx, nu, nq, dt = 2, 1, 1, 0.1  # state (p [m], v [m/s]); control u [m/s^2]; p is the configuration
    state_names = ("p", "v")
    control_names = ("u",)
    u_low, u_high = (-1.0,), (1.0,)  # physical control bounds
    Q_diag, R_diag = (10.0, 1.0), (1e-3,)  # MPC tracking weights
    goal = (0.0, 0.0)
    init_low, init_high = (-2.0, -1.0), (2.0, 1.0)  # p ~ U(-2, 2), v ~ U(-1, 1)
    reward_weights, effort_weights = (1.0, 0.1), (0.01,)  # r = exp(-1/2 (w.(x-g)^2 + e.a^2))
    success_tolerance = (0.05, 0.1)  # |p| <= 5 cm and |v| <= 10 cm/s

    def _step(self, x, u, ops):  # x: (..., 2), u: (..., 1), numpy or torch
        v = x[..., 1] + self.dt * u[..., 0]
        return ops.stack([x[..., 0] + self.dt * v, v])


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--horizon", type=int, default=10, help="MPC horizon in knots")
    p.add_argument("--mpc-steps", type=int, default=100, help="closed-loop steps of the plain MPC controller")
    p.add_argument("--policy-steps", type=int, default=20, help="act() steps of the (untrained) DEQ-MPC policy")
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    p.add_argument("--quick", action="store_true", help="tiny budget: 30 MPC steps, 5 policy steps")
    args = p.parse_args()
    if args.quick:
        args.mpc_steps, args.policy_steps, args.hidden = 30, 5, 32
    return args


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    system = DoubleIntegrator()

    # 0. the same dynamics on numpy and torch, with autodiff Jacobians for the solver
    x, u = np.array([1.0, 0.5]), np.array([-1.0])
    xt, ut = torch.tensor(x[None]), torch.tensor(u[None])
    _, A, B = system.step_and_jacobians(xt, ut)
    print(f"{system}: step({x}, {u}) = {system.step(x, u)}; A = {A[0].tolist()}, B = {B[0].tolist()}")

    # 1. a Gymnasium env over the system (normalized actions in [-1, 1], reward in (0, 1])
    env = SystemEnv(system=system)
    print(f"env: obs {env.observation_space}, action {env.action_space}, "
          f"u = {env.action_offset} + {env.action_scale} * a")

    # 2. plain MPC: track the goal (theta = goal at every knot) from the current state, apply u_0
    problem = MPCProblem(system, MPCConfig(horizon=args.horizon))
    goal = torch.as_tensor(system.goal, dtype=torch.float64).expand(1, args.horizon, system.nx)
    obs, info = env.reset(seed=args.seed)
    print(f"plain MPC from x0 = {np.round(obs, 3)}:")
    ret = 0.0
    for t in range(args.mpc_steps):
        x0 = torch.as_tensor(env.unwrapped.state[None])  # (1, nx) float64 physical state
        xs, us, _, sinfo = solve(problem, x0, goal, iters=4)
        action = env.to_normalized(us[0, 0].numpy())  # physical u_0 -> normalized action
        obs, reward, terminated, truncated, info = env.step(action.astype(np.float32))
        ret += reward
        if t % 10 == 0:
            print(f"  t={t:3d}: x = {np.round(obs, 3)}, u0 = {float(us[0, 0, 0]):+.3f}, "
                  f"newton steps {int(sinfo.newton_steps[0])}, primal residual {float(sinfo.primal_residual[0]):.1e}")
        if terminated or truncated:
            break
    print(f"  after {t + 1} steps: x = {np.round(obs, 3)}, return {ret:.2f}, success={info['is_success']}")

    # 3. a DEQ-MPC policy bound to the custom system (no registered env id needed)
    config = PolicyConfig(variant="deq-mpc-deq", hidden=args.hidden, horizon=args.horizon)
    policy = DEQMPCPolicy(system, config, action_scale=env.action_scale, action_offset=env.action_offset)
    obs, _ = env.reset(seed=args.seed)
    policy.reset()
    print(f"untrained DEQ-MPC policy ({config.variant}, hidden={config.hidden}):")
    for t in range(args.policy_steps):
        action = policy.act(obs)
        obs, reward, terminated, truncated, info = env.step(action)
        plan = policy.last_plan
        print(f"  t={t}: a = {action[0]:+.3f}, x = {np.round(obs, 3)}, reward {reward:.3f}, "
              f"planned p: {np.round(plan['states'][:4, 0], 2)}")
        if terminated or truncated:
            break
    # batched inference works the same way (SB3's predict protocol)
    actions, _ = policy.predict(system.sample_initial_states(np.random.default_rng(args.seed), 3))
    print(f"predict on a batch of 3 states -> actions {np.round(actions[:, 0], 3)}")


if __name__ == "__main__":
    main()
