"""Evaluate a DEQ-MPC policy with stable-baselines3's ``evaluate_policy`` on a vectorized env.

``DEQMPCPolicy.predict`` follows SB3's ``PolicyPredictor`` protocol (the solver warm start travels in the
recurrent ``state`` and is reset per env on ``episode_start``), so SB3's own evaluation utilities work on it
unchanged. For comparison the shipped PPO expert (``load_expert("DEQMPC/Pendulum-v0")``) is evaluated the
same way; both are also reported as D4RL-normalized scores using the expert card's reference returns.

Run::

    python examples/sb3_evaluate.py                                   # untrained DEQ-MPC vs. the expert
    python examples/sb3_evaluate.py --policy runs/train_deqmpc/best   # a trained DEQ-MPC policy
    python examples/sb3_evaluate.py --quick                           # tiny smoke run (used by the tests)
"""

from __future__ import annotations

import argparse
import time

import torch
from stable_baselines3.common.env_util import make_vec_env
from stable_baselines3.common.evaluation import evaluate_policy

import deqmpc_gym  # noqa: F401  (registers the DEQMPC/* ids so make_vec_env can gym.make them)
from deqmpc_gym.evaluation import normalized_score
from deqmpc_gym.experts import load_expert
from deqmpc_gym.policies import DEQMPCPolicy


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--env-id", default="DEQMPC/Pendulum-v0", help="an env with a shipped expert")
    p.add_argument("--policy", default=None, help="directory written by DEQMPCPolicy.save (default: fresh policy)")
    p.add_argument("--hidden", type=int, default=128, help="network width of a fresh policy")
    p.add_argument("--n-envs", type=int, default=2)
    p.add_argument("--episodes", type=int, default=10)
    p.add_argument("--max-steps", type=int, default=200, help="episode length (TimeLimit)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    p.add_argument("--quick", action="store_true", help="tiny budget: 2 episodes of 10 steps, small network")
    args = p.parse_args()
    if args.quick:
        args.episodes, args.max_steps, args.hidden = 2, 10, 32
    return args


def evaluate(name: str, model, env_id: str, args: argparse.Namespace) -> float:
    """SB3 evaluate_policy on a fresh ``n_envs`` DummyVecEnv (Monitor-wrapped by make_vec_env)."""
    vec_env = make_vec_env(env_id, n_envs=args.n_envs, seed=args.seed,
                           env_kwargs={"max_episode_steps": args.max_steps})
    t0 = time.perf_counter()
    mean, std = evaluate_policy(model, vec_env, n_eval_episodes=args.episodes, deterministic=True)
    vec_env.close()
    print(f"{name:>10}: return {mean:7.2f} +- {std:6.2f} over {args.episodes} episodes "
          f"({time.perf_counter() - t0:.1f} s)")
    return float(mean)


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)

    # 1. the DEQ-MPC policy: loaded, or fresh from the env id
    if args.policy is not None:
        policy = DEQMPCPolicy.load(args.policy, env=args.env_id)
    else:
        policy = DEQMPCPolicy.from_env(args.env_id, hidden=args.hidden)

    # 2. the shipped PPO expert; its predict() takes raw observations, like the DEQ-MPC policy
    expert = load_expert(args.env_id)
    card = expert.card

    # 3. SB3's evaluate_policy on a vectorized env, once per policy
    print(f"{args.env_id}: {args.n_envs} envs, {args.max_steps} steps per episode")
    results = {"deq-mpc": evaluate("deq-mpc", policy, args.env_id, args),
               "expert": evaluate("expert", expert, args.env_id, args)}

    # 4. D4RL-normalized scores from the card's reference returns (measured over 200 full-length episodes,
    #    so they are only meaningful with the default --max-steps 200)
    if args.max_steps != 200:
        print("(normalized scores skipped: the card's references are for 200-step episodes)")
        return
    for name, mean in results.items():
        score = normalized_score(mean, card["random_return"], card["mean_return"])
        print(f"{name:>10}: normalized score {score:6.3f} (expert card: return {card['mean_return']:.1f}, "
              f"random {card['random_return']:.1f})")


if __name__ == "__main__":
    main()
