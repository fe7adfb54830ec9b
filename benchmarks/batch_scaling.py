"""Training windows per second against the batch size, per Table 1 env (hidden 64), to choose a campaign's batch.

For every env, one :class:`ImitationTrainer` per batch size (default 32, 64, 128, 200; streaming L = 2, the
CPU-scale network width 64) takes ``--steps`` training steps per trial; the trials of the batch sizes are
interleaved (round robin) so that a change of machine load affects them alike. Reports the median steps/s and
windows/s (steps/s x batch) and the ratio to the smallest batch. Pendulum and Cartpole train on the shipped
Pendulum dataset / a dataset collected from their shipped expert, the quadrotors on ``--trajectories``
trajectories collected from theirs.

Writes ``benchmarks/results/batch_scaling.json``.
Usage: ``python benchmarks/batch_scaling.py [--variant deq-mpc-nn] [--batches 32 64 128 200] [--envs ...]``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir))  # run from a checkout

import numpy as np
import torch

import deqmpc_gym  # noqa: F401  (registers the env ids)
from deqmpc_gym.data import ExpertDataset, shipped_dataset
from deqmpc_gym.experts import collect_dataset, load_expert
from deqmpc_gym.io import atomic_write_text
from deqmpc_gym.policies import DEQMPCPolicy
from deqmpc_gym.training import ImitationTrainer, TrainConfig

ENVS = ("Pendulum", "Cartpole", "Quadrotor", "QPole", "QPoleObs")
RESULTS = Path(__file__).resolve().parent / "results" / "batch_scaling.json"


def dataset(short: str, trajectories: int) -> ExpertDataset:
    env_id = f"DEQMPC/{short}-v0"
    if short == "Pendulum":
        return ExpertDataset.load(shipped_dataset(env_id), env_id=env_id)
    return collect_dataset(load_expert(env_id), env_id, trajectories, seed=0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--variant", default="deq-mpc-nn")
    ap.add_argument("--hidden", type=int, default=64)
    ap.add_argument("--batches", type=int, nargs="+", default=[32, 64, 128, 200])
    ap.add_argument("--steps", type=int, default=2, help="training steps per trial")
    ap.add_argument("--trials", type=int, default=3)
    ap.add_argument("--envs", nargs="+", default=list(ENVS), choices=ENVS)
    ap.add_argument("--trajectories", type=int, default=30)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for short in args.envs:
            env_id = f"DEQMPC/{short}-v0"
            ds = dataset(short, args.trajectories)
            trainers = {}
            for b in args.batches:
                torch.manual_seed(0)
                policy = DEQMPCPolicy.from_env(env_id, args.variant, hidden=args.hidden)
                cfg = TrainConfig(steps=10**6, batch_size=b, val_batches=1, seed=0)
                trainers[b] = ImitationTrainer(policy, ds, cfg, os.path.join(tmp, f"{short}{b}"), progress=False)
                trainers[b].train_step()  # warm-up
            times: dict[int, list[float]] = {b: [] for b in args.batches}
            for _ in range(args.trials):
                for b, tr in trainers.items():
                    t = time.perf_counter()
                    for _ in range(args.steps):
                        tr.train_step()
                    times[b].append((time.perf_counter() - t) / args.steps)
            base = None
            for b in args.batches:
                rate = 1.0 / float(np.median(times[b]))
                base = base or rate * b
                rows.append({"env": short, "variant": args.variant, "hidden": args.hidden, "batch": b,
                             "steps_per_s": rate, "windows_per_s": rate * b, "vs_smallest_batch": rate * b / base})
                print(f"  {short} batch {b}: {rate * b:.0f} windows/s", file=sys.stderr, flush=True)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(RESULTS, json.dumps({"threads": args.threads, "torch": torch.__version__, "steps": args.steps,
                                           "trials": args.trials, "rows": rows}, indent=2))
    print(f"Training windows/s against the batch size ({args.variant}, hidden {args.hidden}, streaming L = 2, "
          f"{args.threads} thread(s); median of {args.trials} interleaved trials x {args.steps} steps)")
    print()
    print("| env | batch | steps/s | windows/s | vs smallest batch |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['env']} | {r['batch']} | {r['steps_per_s']:.2f} | {r['windows_per_s']:.0f} | "
              f"{r['vs_smallest_batch']:.2f}x |")


if __name__ == "__main__":
    main()
