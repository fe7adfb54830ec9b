"""A plain Gymnasium loop driven by a DEQ-MPC policy.

Shows the smallest useful integration: build a ``DEQMPCPolicy`` for a registered env (or load a trained one
with ``--policy DIR``), call ``policy.reset()`` at the start of every episode and ``policy.act(obs)`` at every
step (the warm start between steps is kept inside the policy), then print the episode return and the
solver statistics of the last control step.

An untrained policy (the default) tracks random waypoints, so expect a low return; train one with
``examples/train_deqmpc.py`` and pass its ``best/`` directory with ``--policy``.

Run::

    python examples/gym_loop.py                                  # untrained policy, 2 episodes
    python examples/gym_loop.py --policy runs/train_deqmpc/best  # a trained policy
    python examples/gym_loop.py --quick                          # tiny smoke run (used by the tests)
"""

from __future__ import annotations

import argparse
import time

import gymnasium as gym
import numpy as np
import torch

import deqmpc_gym  # noqa: F401  (registers the DEQMPC/* ids)
from deqmpc_gym.policies import DEQMPCPolicy


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--env-id", default="DEQMPC/Pendulum-v0")
    p.add_argument("--policy", default=None, help="directory written by DEQMPCPolicy.save (e.g. runs/.../best)")
    p.add_argument("--variant", default="deq-mpc-deq", help="variant of a fresh (untrained) policy")
    p.add_argument("--hidden", type=int, default=128, help="network width of a fresh policy")
    p.add_argument("--episodes", type=int, default=2)
    p.add_argument("--max-steps", type=int, default=200)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    p.add_argument("--quick", action="store_true", help="tiny budget: 1 episode of 10 steps, small network")
    args = p.parse_args()
    if args.quick:
        args.episodes, args.max_steps, args.hidden = 1, 10, 32
    return args


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)

    # 1. the environment: a standard Gymnasium env (TimeLimit of 200 steps; we may stop earlier)
    env = gym.make(args.env_id)

    # 2. the policy: fresh from the env (reads its System, action scaling and obstacles), or loaded
    if args.policy is not None:
        policy = DEQMPCPolicy.load(args.policy, env=env)
        print(f"loaded {policy.config.variant} policy for {policy.env_id} from {args.policy}")
    else:
        policy = DEQMPCPolicy.from_env(env, variant=args.variant, hidden=args.hidden)
        print(f"fresh (untrained) {policy.config.variant} policy, hidden={policy.config.hidden}")

    # 3. the loop: reset the policy with the env, then act on every observation
    returns = []
    for ep in range(args.episodes):
        obs, info = env.reset(seed=args.seed + ep)
        policy.reset()  # drop the warm start of the previous episode
        ep_return, steps, t0 = 0.0, 0, time.perf_counter()
        for _ in range(args.max_steps):
            action = policy.act(obs)  # normalized action in [-1, 1], shape (nu,)
            obs, reward, terminated, truncated, info = env.step(action)
            ep_return += float(reward)
            steps += 1
            if terminated or truncated:
                break
        returns.append(ep_return)
        ms = 1e3 * (time.perf_counter() - t0) / steps
        print(f"episode {ep}: return {ep_return:.2f} over {steps} steps ({ms:.1f} ms/step), "
              f"success={info.get('is_success')}, final state={np.round(obs, 3)}")

        # 4. solver statistics of the last control step (a warm-started streaming solve)
        out = policy.last_output
        if out is not None and out.solve_info is not None:
            si = out.solve_info
            print(f"  MPC: newton steps={int(si.newton_steps[0])}, AL iters={int(si.al_iters[0])}, "
                  f"primal residual={float(si.primal_residual[0]):.2e}, rho={float(si.rho[0]):.0e}, "
                  f"converged={bool(si.converged[0])}")
        if out is not None and out.net_stats is not None:
            ns = out.net_stats
            print(f"  DEQ: fixed-point iters={int(ns.iters[0])}, residual={float(ns.residual[0]):.2e}")
        if policy.last_fallback.any():
            print("  (the solver returned a non-finite control; the nominal control was applied)")
        if policy.last_plan is not None:
            print(f"  planned horizon: {policy.last_plan['states'].shape[0]} knots, "
                  f"first planned control u0={np.round(policy.last_plan['controls'][0], 3)}")
    print(f"mean return over {len(returns)} episode(s): {np.mean(returns):.2f}")
    env.close()


if __name__ == "__main__":
    main()
