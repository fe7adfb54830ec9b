"""Benchmark of DEQMPCPolicy inference; prints a markdown table and writes ``benchmarks/results/policy.json``.

For each of the four main variants on Pendulum and QPole at hidden 128 and 256 (and the Pendulum's DEQ-MPC variants
again with ``PolicyConfig(compiled_solver=True)``):

* ``act()`` latency at batch 1 [ms] (median over ``--repeats`` calls along a real rollout);
* batched ``predict`` throughput at batch 64 [env-steps/s] (median over ``--batch-repeats`` calls);

each streaming (warm: the previous solution shifted, ``stream_iters = 1`` DEQ-MPC iteration; Diff-MPC its
streaming AL iterations) and cold (no warm start: ``deq_mpc_iters = 6`` DEQ-MPC iterations; Diff-MPC its full
AL budget). Warm and cold are measured side by side on the same policy; ``speedup = cold / warm``.

Usage: ``python benchmarks/policy.py [--threads 1] [--repeats 7] [--batch-repeats 3] [--quick]``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir))  # run from a checkout

import gymnasium as gym
import numpy as np
import torch

import deqmpc_gym  # noqa: F401  (registers the ids)
from deqmpc_gym.io import atomic_write_text
from deqmpc_gym.policies import DEQMPCPolicy

VARIANTS = ("diff-mpc-nn", "diff-mpc-deq", "deq-mpc-nn", "deq-mpc-deq")
ENVS = ("DEQMPC/Pendulum-v0", "DEQMPC/QPole-v0")
COMPILED_VARIANTS = ("deq-mpc-nn", "deq-mpc-deq")
COMPILED_ENVS = ("DEQMPC/Pendulum-v0",)
RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "policy.json")


def act_latency_ms(policy: DEQMPCPolicy, env_id: str, repeats: int) -> tuple[float, float]:
    """Median ``act()`` latency (warm, cold) in ms along one rollout (the warm start is kept / dropped)."""
    env = gym.make(env_id)
    obs, _ = env.reset(seed=0)
    policy.reset()
    policy.act(obs)  # warm-up + first (cold) solve
    warm, cold = [], []
    for _ in range(repeats):
        t = time.perf_counter()
        a = policy.act(obs)
        warm.append(time.perf_counter() - t)
        saved = policy._state
        policy.reset()
        t = time.perf_counter()
        policy.act(obs)
        cold.append(time.perf_counter() - t)
        policy._state = saved  # continue the warm-started stream
        obs, _, term, trunc, _ = env.step(a)
        if term or trunc:
            obs, _ = env.reset()
            policy.reset()
            policy.act(obs)
    env.close()
    return float(np.median(warm) * 1e3), float(np.median(cold) * 1e3)


def predict_throughput(policy: DEQMPCPolicy, env_id: str, batch: int, repeats: int) -> tuple[float, float]:
    """Median batched ``predict`` throughput (warm, cold) in env-steps/s."""
    from deqmpc_gym.envs import make_batched_env

    env = make_batched_env(env_id, batch, seed=0)
    obs, _ = env.reset(seed=0)
    _, state = policy.predict(obs)  # cold start of the stream (and warm-up)
    starts = np.zeros(batch, bool)
    warm, cold = [], []
    for _ in range(repeats):
        t = time.perf_counter()
        actions, new_state = policy.predict(obs, state, starts)
        warm.append(time.perf_counter() - t)
        t = time.perf_counter()
        policy.predict(obs)
        cold.append(time.perf_counter() - t)
        state = new_state
        obs = env.step_arrays(actions).obs.cpu().numpy()
    env.close()
    return float(batch / np.median(warm)), float(batch / np.median(cold))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--batch-repeats", type=int, default=3)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--hidden", type=int, nargs="+", default=[128, 256])
    ap.add_argument("--quick", action="store_true", help="3 latency repeats, 2 batch repeats")
    ap.add_argument("--json", default=RESULTS)
    args = ap.parse_args()
    if args.quick:
        args.repeats, args.batch_repeats = 3, 2
    torch.set_num_threads(args.threads)
    rows = []
    t_start = time.perf_counter()
    for env_id in ENVS:
        for hidden in args.hidden:
            # the Pendulum's DEQ-MPC variants also with PolicyConfig(compiled_solver=True) (CompiledSolver; the
            # QPole's problem is above its size limit); the first act()/predict() per batch size compiles
            runs = [(v, False) for v in VARIANTS] + [(v, True) for v in COMPILED_VARIANTS if env_id in COMPILED_ENVS]
            for variant, compiled in runs:
                torch.manual_seed(0)
                policy = DEQMPCPolicy.from_env(env_id, variant, hidden=hidden, compiled_solver=compiled)
                lw, lc = act_latency_ms(policy, env_id, args.repeats)
                tw, tc = predict_throughput(policy, env_id, args.batch, args.batch_repeats)
                if compiled:
                    variant = f"{variant} (compiled solver)"
                rows.append({"env": env_id.split("/")[-1], "variant": variant, "hidden": hidden,
                             "act_ms_warm": lw, "act_ms_cold": lc, "act_speedup": lc / lw,
                             "predict_per_s_warm": tw, "predict_per_s_cold": tc, "predict_speedup": tw / tc})
                r = rows[-1]
                print(f"  {r['env']} {variant} h{hidden}: act {lw:.1f}/{lc:.1f} ms, "
                      f"predict {tw:.0f}/{tc:.0f} /s", file=sys.stderr, flush=True)
    print(f"DEQMPCPolicy inference, torch {torch.__version__}, {args.threads} thread(s), "
          f"{platform.processor() or platform.machine()}; warm = streaming (1 DEQ-MPC iteration), "
          f"cold = N = 6 iterations; medians over {args.repeats} act / {args.batch_repeats} predict calls")
    print()
    print(f"| env | variant | hidden | act warm [ms] | act cold [ms] | cold/warm "
          f"| predict warm [env/s, B={args.batch}] | predict cold [env/s] | warm/cold |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['env']} | {r['variant']} | {r['hidden']} | {r['act_ms_warm']:.2f} | {r['act_ms_cold']:.2f} | "
              f"{r['act_speedup']:.2f}x | {r['predict_per_s_warm']:.0f} | {r['predict_per_s_cold']:.0f} | "
              f"{r['predict_speedup']:.2f}x |")
    meta = {"torch": torch.__version__, "threads": args.threads, "batch": args.batch, "repeats": args.repeats,
            "batch_repeats": args.batch_repeats, "wall_time_s": time.perf_counter() - t_start}
    atomic_write_text(args.json, json.dumps({"meta": meta, "rows": rows}, indent=2))
    print(f"\n(written to {os.path.relpath(args.json)}; total {meta['wall_time_s']:.0f} s)")


if __name__ == "__main__":
    main()
