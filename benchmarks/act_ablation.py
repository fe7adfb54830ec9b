"""Ablation of the solver's savings on warm ``act()`` latency (paired, one process).

Replays one recorded observation sequence through ``DEQMPCPolicy.act`` with the compiled kernels (the default,
``deqmpc_gym.systems.kernels``) and, on the batched torch loop (kernels off), with each combination of
* the full-step Jacobians of the line search (``MPCProblem.trial_dynamics``; off: a merit evaluation per trial and
  a separate Jacobian evaluation per linearisation), and
* the complex-step RK4 Jacobians of small rigid-body batches (``complex_step_max_batch``; off: the analytic chain
  rule),
interleaving the five settings ``--rounds`` times, and prints the median latency of each and its speed-up over the
torch loop with neither saving.

Usage: ``python benchmarks/act_ablation.py [--env DEQMPC/QPole-v0] [--variant deq-mpc-nn] [--hidden 256]``.
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
from deqmpc_gym.mpc import MPCProblem
from deqmpc_gym.policies import DEQMPCPolicy
from deqmpc_gym.systems import kernels


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--env", default="DEQMPC/QPole-v0")
    ap.add_argument("--variant", default="deq-mpc-nn")
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    torch.set_num_threads(1)
    policy = DEQMPCPolicy.from_env(args.env, variant=args.variant, hidden=args.hidden)
    system_cls = type(policy.layer.problem.system)
    env = gym.make(args.env)
    obs, _ = env.reset(seed=0)
    seq = [obs]
    for _ in range(args.steps):
        obs, *_ = env.step(policy.act(obs))
        seq.append(obs)
    trial, cstep = MPCProblem.trial_dynamics, system_cls.complex_step_max_batch
    settings = {"neither": (False, 0), "complex step": (False, cstep), "full-step Jacobians": (True, 0),
                "both (torch loop)": (True, cstep), "compiled kernels (default)": None}
    times: dict[str, list[float]] = {k: [] for k in settings}
    try:
        for _ in range(args.rounds):
            for name, setting in settings.items():
                use_trial, limit = setting if setting is not None else (True, cstep)
                MPCProblem.trial_dynamics = trial if use_trial else (lambda self, batch: False)
                system_cls.complex_step_max_batch = limit
                prev = kernels.set_enabled(setting is None)
                try:
                    policy.reset()
                    policy.act(seq[0])
                    for o in seq[1:]:
                        t0 = time.perf_counter()
                        policy.act(o)
                        times[name].append(time.perf_counter() - t0)
                finally:
                    kernels.set_enabled(prev)
    finally:
        MPCProblem.trial_dynamics, system_cls.complex_step_max_batch = trial, cstep
    base = float(np.median(times["neither"]))
    print(f"warm act() on {args.env}, {args.variant}, hidden {args.hidden}; median of {len(times['neither'])} calls")
    print("| setting | act [ms] | speed-up |\n|---|---|---|")
    for name, ts in times.items():
        m = float(np.median(ts))
        print(f"| {name} | {1e3 * m:.2f} | {base / m:.2f}x |")


if __name__ == "__main__":
    main()
