"""Benchmark of imitation training on Pendulum (shipped dataset); prints markdown tables.

1. Training steps/s of :meth:`ImitationTrainer.train_step` per variant at a small CPU scale (hidden 64, batch 64,
   streaming L = 2: one cold and two warm-started layer calls per window), median over ``--trials`` chunks of
   ``--steps`` steps (validation and checkpoints excluded).
2. Time-share profile of the same steps, with wall-clock timers wrapped (in this script only) around
   ``WindowSampler.sample`` (data), the network's ``forward`` (network fwd, incl. DEQ fixed-point solves),
   ``deqmpc_gym.policies.layer.solve`` (MPC solver fwd), the solver's implicit-gradient ``backward``
   (solver bwd), ``loss.backward`` minus solver bwd (network bwd + autograd glue), the optimizer step with
   gradient clipping, and the rest (loss arithmetic, state shifting, Python overhead).

Usage: ``python benchmarks/training.py [--threads 1] [--steps 10] [--trials 3] [--hidden 64] [--batch 64]``.
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
import time
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir))  # run from a checkout

import numpy as np
import torch

import deqmpc_gym
import deqmpc_gym.policies.layer as layer_mod
from deqmpc_gym.data import ExpertDataset
from deqmpc_gym.mpc import solver as solver_mod
from deqmpc_gym.policies import DEQMPCPolicy
from deqmpc_gym.training import ImitationTrainer, TrainConfig, WindowSampler

PEND = "DEQMPC/Pendulum-v0"
VARIANTS = ("diff-mpc-nn", "diff-mpc-deq", "deq-mpc-nn", "deq-mpc-deq")
DATASET = Path(deqmpc_gym.__file__).parent / "datasets" / "Pendulum-v0-300.npz"

TIMES: dict[str, float] = defaultdict(float)
ENABLED = [False]


def timed(name: str, fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        if not ENABLED[0]:
            return fn(*args, **kwargs)
        t = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            TIMES[name] += time.perf_counter() - t
    return wrapper


def install_timers() -> None:
    WindowSampler.sample = timed("data", WindowSampler.sample)
    layer_mod.solve = timed("solver fwd", layer_mod.solve)
    for cls in (solver_mod._ImplicitFn, solver_mod._FinalImplicitFn):
        cls.backward = staticmethod(timed("solver bwd", cls.backward))
    torch.Tensor.backward = timed("backward (total)", torch.Tensor.backward)


def make_trainer(variant: str, ds: ExpertDataset, hidden: int, batch: int, out: str) -> ImitationTrainer:
    torch.manual_seed(0)
    policy = DEQMPCPolicy.from_env(PEND, variant, hidden=hidden)
    cfg = TrainConfig(steps=10**6, batch_size=batch, val_batches=1, seed=0)
    trainer = ImitationTrainer(policy, ds, cfg, out, progress=False)
    net = policy.layer.net
    net.forward = timed("network fwd", net.forward)
    opt = trainer.optimizer
    opt.step = timed("optimizer", opt.step)
    return trainer


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--trials", type=int, default=3)
    ap.add_argument("--hidden", type=int, default=64)
    ap.add_argument("--batch", type=int, default=64)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    install_timers()
    torch.nn.utils.clip_grad_norm_ = timed("optimizer", torch.nn.utils.clip_grad_norm_)  # looked up per call
    ds = ExpertDataset.load(DATASET, env_id=PEND)
    import tempfile

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for variant in VARIANTS:
            trainer = make_trainer(variant, ds, args.hidden, args.batch, os.path.join(tmp, variant))
            trainer.train_step()  # warm-up
            rates, total = [], 0.0
            TIMES.clear()
            ENABLED[0] = True
            for _ in range(args.trials):
                t = time.perf_counter()
                for _ in range(args.steps):
                    trainer.train_step()
                dt = time.perf_counter() - t
                total += dt
                rates.append(args.steps / dt)
            ENABLED[0] = False
            shares = dict(TIMES)
            shares["network bwd"] = shares.pop("backward (total)", 0.0) - shares.get("solver bwd", 0.0)
            shares["other"] = total - sum(shares.values())
            rows.append((variant, float(np.median(rates)), {k: v / total for k, v in shares.items()}))
            print(f"  {variant}: {rows[-1][1]:.2f} steps/s", file=sys.stderr, flush=True)
    print(f"Imitation training on {PEND} (shipped dataset), hidden {args.hidden}, batch {args.batch}, streaming L = 2, "
          f"{args.threads} torch thread(s); median of {args.trials} x {args.steps} steps")
    print()
    print("| variant | steps/s | ms/step | windows/s |")
    print("|---|---|---|---|")
    for v, rate, _ in rows:
        print(f"| {v} | {rate:.2f} | {1e3 / rate:.0f} | {rate * args.batch:.0f} |")
    cols = ["data", "network fwd", "solver fwd", "network bwd", "solver bwd", "optimizer", "other"]
    print()
    print("Time share per training step (manual timers around the library calls):")
    print()
    print("| variant | " + " | ".join(cols) + " |")
    print("|---|" + "---|" * len(cols))
    for v, _, sh in rows:
        print(f"| {v} | " + " | ".join(f"{100 * sh.get(c, 0.0):.1f}%" for c in cols) + " |")


if __name__ == "__main__":
    main()
