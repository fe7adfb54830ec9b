"""Train a PPO expert and collect an imitation dataset with it.

DEQ-MPC is trained by imitation of expert trajectories. This script produces both ingredients for any
registered env: a PPO expert (stable-baselines3 on the natively batched env, ``default_expert_config`` +
``train_expert``; the result is an ``actor.pt`` + ``card.json`` directory with measured expert and random
returns) and a dataset of its deterministic rollouts (``collect_dataset`` -> ``ExpertDataset.save``).
Training is checkpointed in slices, so re-running the same command resumes an interrupted run.

The Pendulum expert and dataset used by the other examples ship with the package; use this script for
other envs or to reproduce them. Budgets of the per-env defaults are listed in ``EXPERT_DEFAULTS``
(Pendulum: 1M steps, ~12 min on 2 CPU cores).

Run::

    python examples/train_expert_and_collect.py --env-id DEQMPC/Pendulum-v0 --out runs/expert
    python examples/train_expert_and_collect.py --env-id DEQMPC/Cartpole-v0 --steps 500000
    python examples/train_expert_and_collect.py --quick      # tiny smoke run (used by the tests)

Then train DEQ-MPC on the dataset: ``python examples/train_deqmpc.py --dataset runs/expert/dataset.npz
--expert runs/expert``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

import deqmpc_gym  # noqa: F401  (registers the DEQMPC/* ids)
from deqmpc_gym.data import ExpertDataset
from deqmpc_gym.experts import (
    DEFAULT_NUM_TRAJECTORIES,
    collect_dataset,
    default_expert_config,
    load_expert,
    train_expert,
)


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--env-id", default="DEQMPC/Pendulum-v0")
    p.add_argument("--out", default="runs/expert", help="expert directory (actor.pt, card.json, checkpoint/)")
    p.add_argument("--steps", type=int, default=None, help="PPO env steps (default: EXPERT_DEFAULTS of the env)")
    p.add_argument("--trajectories", type=int, default=None, help="dataset size (default: the paper's)")
    p.add_argument("--max-steps", type=int, default=200, help="steps per collected trajectory")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    p.add_argument("--quick", action="store_true", help="tiny budget: 256 PPO steps, 4 short trajectories")
    return p.parse_args()


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    out = Path(args.out)

    # 1. the PPO configuration: per-env defaults, optionally overridden
    overrides: dict = {"seed": args.seed}
    if args.steps is not None:
        overrides["total_steps"] = args.steps
    if args.quick:  # one tiny PPO update; the exported card is measured on 4 episodes only
        overrides.update(total_steps=256, n_envs=8, n_steps=32, batch_size=64, n_epochs=1, slice_steps=256,
                         eval_episodes=4)
    config = default_expert_config(args.env_id, **overrides)
    print(f"PPO on {config.env_id}: {config.total_steps:,} steps, {config.n_envs} envs, net {config.net_arch}")

    # 2. train (resumes from out/checkpoint when the settings match) and export actor.pt + card.json
    t0 = time.perf_counter()
    card = train_expert(config, out, resume=True, progress=not args.quick)
    assert card is not None  # None only when stopped early with max_slices
    print(f"expert trained in {time.perf_counter() - t0:.1f} s: return {card['mean_return']:.1f} "
          f"+- {card['std_return']:.1f} (random policy: {card['random_return']:.1f}), "
          f"success {card['success_rate']:.0%} over {card['eval_episodes']} episodes")

    # 3. reload it like any shipped expert: predict() takes raw observations
    expert = load_expert(out)

    # 4. collect a dataset of its deterministic rollouts (episode i starts from the env seeded seed + i)
    n = 4 if args.quick else (args.trajectories or DEFAULT_NUM_TRAJECTORIES.get(args.env_id, 300))
    max_steps = 20 if args.quick else args.max_steps
    t0 = time.perf_counter()
    dataset = collect_dataset(expert, args.env_id, n, seed=args.seed, max_steps=max_steps,
                              expert_id=str(out), progress=lambda k: print(f"  collected {k}/{n}"))
    path = dataset.save(out / "dataset.npz")
    lengths = [len(t) for t in dataset.trajectories]
    returns = [float(t.rews.sum()) for t in dataset.trajectories]
    print(f"dataset: {len(dataset)} trajectories (nx={dataset.nx}, nu={dataset.nu}), lengths {min(lengths)}-"
          f"{max(lengths)}, mean return {np.mean(returns):.1f}, {time.perf_counter() - t0:.1f} s -> {path}")

    # 5. the file round-trips (the format other tools read)
    again = ExpertDataset.load(path, env_id=args.env_id)
    assert len(again) == len(dataset)
    print(json.dumps({"expert": str(out), "dataset": str(path), "env_id": args.env_id}))


if __name__ == "__main__":
    main()
