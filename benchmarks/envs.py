"""Benchmark of the DEQMPC environments; prints a markdown table.

* single env: median step time [us] through ``gym.make`` (all wrappers) for every ``DEQMPC/*`` id and for
  Gymnasium's ``Pendulum-v1``, measured side by side in one run (ratio = time / ``Pendulum-v1`` time);
* batched env: env-steps/s of :class:`~deqmpc_gym.envs.vector.BatchedSystemEnv` through the SB3 adapter
  (numpy in/out, info dicts) and raw (``step_arrays``) at 1, 64 and 1024 envs (default torch threads).

Medians over repeated trials. Usage: ``python benchmarks/envs.py [--trials 5] [--quick]``.
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
from deqmpc_gym.envs import ENV_IDS
from deqmpc_gym.envs.sb3 import make_sb3_vec_env


def single_step_us(env_id: str, trials: int, n: int) -> float:
    env = gym.make(env_id)
    env.reset(seed=0)
    env.action_space.seed(0)
    acts = [env.action_space.sample() * 0.1 for _ in range(n)]  # small actions: long episodes
    def run() -> float:
        t = time.perf_counter()
        for a in acts:
            _, _, term, trunc, _ = env.step(a)
            if term or trunc:
                env.reset()
        return (time.perf_counter() - t) / n * 1e6
    run()
    return float(np.median([run() for _ in range(trials)]))


def batched_steps_per_s(env_id: str, num_envs: int, trials: int, n: int, raw: bool) -> float:
    venv = make_sb3_vec_env(env_id, num_envs, seed=0)
    venv.reset()
    rng = np.random.default_rng(0)
    acts = [(0.1 * rng.uniform(-1, 1, (num_envs, venv.action_space.shape[0]))).astype(np.float32) for _ in range(n)]
    step = venv.env.step_arrays if raw else venv.step
    def run() -> float:
        t = time.perf_counter()
        for a in acts:
            step(a)
        return num_envs * n / (time.perf_counter() - t)
    run()
    return float(np.median([run() for _ in range(trials)]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--trials", type=int, default=5)
    ap.add_argument("--quick", action="store_true", help="fewer steps per trial")
    args = ap.parse_args()
    k = 4 if args.quick else 1
    print(f"torch {torch.__version__}, default threads={torch.get_num_threads()}, trials={args.trials} (median), "
          f"load average at start={os.getloadavg()[0]:.2f}\n")
    print("| env id | single step [us] | ratio vs Pendulum-v1 |")
    print("|---|---:|---:|")
    ref = single_step_us("Pendulum-v1", args.trials, 20000 // k)
    print(f"| Pendulum-v1 (Gymnasium) | {ref:.1f} | 1.00 |")
    for env_id in ENV_IDS:
        n = 20000 if "Pendulum" in env_id or "Cartpole" in env_id else 2000
        t = single_step_us(env_id, args.trials, n // k)
        print(f"| {env_id} | {t:.1f} | {t / ref:.2f} |")
    sizes = (1, 64, 1024)
    print("\n| env id | " + " | ".join(f"SB3 adapter N={s} [steps/s]" for s in sizes)
          + " | raw N=1024 [steps/s] | SB3 N=1024, 1 thread [steps/s] |")
    print("|---|" + "---:|" * (len(sizes) + 2))
    for env_id in ENV_IDS:
        cells = []
        for s in sizes:
            n = {1: 200, 64: 100, 1024: 40}[s] // k
            cells.append(f"{batched_steps_per_s(env_id, s, args.trials, n, raw=False):,.0f}")
        raw = batched_steps_per_s(env_id, 1024, args.trials, 40 // k, raw=True)
        nthreads = torch.get_num_threads()
        torch.set_num_threads(1)
        one = batched_steps_per_s(env_id, 1024, args.trials, 40 // k, raw=False)
        torch.set_num_threads(nthreads)
        print(f"| {env_id} | " + " | ".join(cells) + f" | {raw:,.0f} | {one:,.0f} |")


if __name__ == "__main__":
    main()
