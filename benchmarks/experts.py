"""Benchmark of expert training and dataset collection; prints markdown tables.

1. PPO env-steps/s of a short ``learn()`` (``n_envs`` envs, ``n_steps`` per env and update, a small MLP) on the
   natively batched SB3 adapter (:func:`deqmpc_gym.envs.make_sb3_vec_env`) vs SB3's
   ``make_vec_env`` of single ``gym.make`` envs (``DummyVecEnv``), same PPO settings, measured side by side
   (alternating trials); also the raw ``VecEnv.step`` rate of both with random actions (no learning).
2. Dataset collection throughput (trajectories/s, 200-step episodes) with the shipped Pendulum expert,
   for a few batch sizes.

Medians over ``--trials``. Usage: ``python benchmarks/experts.py [--trials 3] [--n-envs 16] [--threads 1]``.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir))  # run from a checkout

import gymnasium as gym
import numpy as np
import torch

import deqmpc_gym  # noqa: F401  (registers the ids)
from deqmpc_gym.envs import make_sb3_vec_env

PEND = "DEQMPC/Pendulum-v0"


def make_venv(kind: str, env_id: str, n_envs: int):
    if kind == "batched":
        return make_sb3_vec_env(env_id, n_envs, seed=0)
    from stable_baselines3.common.env_util import make_vec_env

    return make_vec_env(lambda: gym.make(env_id), n_envs=n_envs, seed=0)


def ppo_steps_per_s(kind: str, env_id: str, n_envs: int, n_steps: int, updates: int) -> float:
    from stable_baselines3 import PPO

    venv = make_venv(kind, env_id, n_envs)
    model = PPO("MlpPolicy", venv, n_steps=n_steps, batch_size=n_envs * n_steps // 4, n_epochs=2, seed=0,
                device="cpu", verbose=0, policy_kwargs=dict(net_arch=[64, 64]))
    total = n_envs * n_steps * updates
    t = time.perf_counter()
    model.learn(total)
    dt = time.perf_counter() - t
    venv.close()
    return model.num_timesteps / dt


def vec_steps_per_s(kind: str, env_id: str, n_envs: int, n: int) -> float:
    venv = make_venv(kind, env_id, n_envs)
    venv.reset()
    rng = np.random.default_rng(0)
    acts = [rng.uniform(-1, 1, (n_envs,) + venv.action_space.shape).astype(np.float32) for _ in range(n)]
    t = time.perf_counter()
    for a in acts:
        venv.step(a)
    dt = time.perf_counter() - t
    venv.close()
    return n_envs * n / dt


def collect_per_s(expert, n: int, batch_size: int) -> float:
    from deqmpc_gym.experts import collect_dataset

    t = time.perf_counter()
    ds = collect_dataset(expert, PEND, n, seed=0, batch_size=batch_size)
    dt = time.perf_counter() - t
    assert len(ds) == n
    return n / dt


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--trials", type=int, default=3)
    ap.add_argument("--n-envs", type=int, default=16)
    ap.add_argument("--n-steps", type=int, default=128)
    ap.add_argument("--updates", type=int, default=2, help="PPO rollouts+updates per learn()")
    ap.add_argument("--collect", type=int, default=100, help="trajectories per collection trial")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    kinds = ("batched", "dummy")
    ppo = {k: [] for k in kinds}
    raw = {k: [] for k in kinds}
    for k in kinds:  # warm-up (imports, first allocation)
        vec_steps_per_s(k, PEND, args.n_envs, 20)
    for _ in range(args.trials):
        for k in kinds:
            ppo[k].append(ppo_steps_per_s(k, PEND, args.n_envs, args.n_steps, args.updates))
            raw[k].append(vec_steps_per_s(k, PEND, args.n_envs, 500))
    med_ppo = {k: float(np.median(v)) for k, v in ppo.items()}
    med_raw = {k: float(np.median(v)) for k, v in raw.items()}
    print(f"PPO on {PEND}: {args.n_envs} envs x {args.n_steps} steps, {args.updates} updates per learn(), MLP 64x64, "
          f"n_epochs 2; {args.threads} torch thread(s); median of {args.trials} trials")
    print()
    print("| vec env | PPO learn() [env-steps/s] | VecEnv.step only [env-steps/s] |")
    print("|---|---|---|")
    names = {"batched": "make_sb3_vec_env (batched torch)", "dummy": "make_vec_env (DummyVecEnv of gym.make)"}
    for k in kinds:
        print(f"| {names[k]} | {med_ppo[k]:.0f} | {med_raw[k]:.0f} |")
    print(f"| ratio batched / DummyVecEnv | {med_ppo['batched'] / med_ppo['dummy']:.2f}x | "
          f"{med_raw['batched'] / med_raw['dummy']:.2f}x |")

    from deqmpc_gym.experts import load_expert

    expert = load_expert(PEND)
    collect_per_s(expert, 4, 4)  # warm-up
    print()
    print(f"Dataset collection with the shipped Pendulum expert ({args.collect} trajectories x 200 steps, "
          f"median of {args.trials})")
    print()
    print("| batch size | trajectories/s | env-steps/s |")
    print("|---|---|---|")
    for bs in (1, 10, 100):
        rate = float(np.median([collect_per_s(expert, args.collect, bs) for _ in range(args.trials)]))
        print(f"| {bs} | {rate:.1f} | {rate * 200:.0f} |")


if __name__ == "__main__":
    main()
