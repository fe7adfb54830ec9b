"""Benchmark of video recording cost; prints a markdown table.

A fixed 100-step action sequence (the nominal action plus a small seeded perturbation) is rolled out at
480x480 on Pendulum and QPole, side by side in one run:

* ``plain``: ``gym.make(env_id, render_mode="rgb_array")`` stepped without rendering;
* ``render``: the same env, ``render()`` after reset and every step (MuJoCo offscreen, no encoding);
* ``RecordVideo``: :class:`deqmpc_gym.wrappers.RecordVideo` writing an mp4 (render + imageio-ffmpeg encode);
* ``policy`` / ``policy + RecordVideo``: the same episode driven by a DEQ-MPC policy (``deq-mpc-nn``, hidden 64,
  streaming ``act()``), without recording and with ``RecordVideo`` drawing its plan overlay -- the ratio of these
  two is the cost of recording a DEQ-MPC rollout.

Times are medians over ``--repeats`` rollouts; ratios are relative to ``plain`` and ``render``.
Usage: ``python benchmarks/video.py [--repeats 3] [--size 480] [--threads 1]``.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir))  # run from a checkout
os.environ.setdefault("MUJOCO_GL", "egl")

import gymnasium as gym  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

import deqmpc_gym  # noqa: E402,F401  (registers the ids)
from deqmpc_gym.wrappers import RecordVideo  # noqa: E402

ENVS = ("DEQMPC/Pendulum-v0", "DEQMPC/QPole-v0")
STEPS = 100


def actions(env: gym.Env, n: int) -> list[np.ndarray]:
    base = env.unwrapped
    nominal = base.to_normalized(base.system.nominal_control).astype(np.float32)
    rng = np.random.default_rng(0)
    return [np.clip(nominal + 0.05 * rng.standard_normal(nominal.shape), -1, 1).astype(np.float32) for _ in range(n)]


def rollout(env: gym.Env, acts: list[np.ndarray], render: bool) -> tuple[float, int]:
    t = time.perf_counter()
    env.reset(seed=0)
    if render:
        env.render()
    resets = 0
    for i, a in enumerate(acts):
        _, _, term, trunc, _ = env.step(a)
        if render:
            env.render()
        if (term or trunc) and i < len(acts) - 1:
            env.reset(seed=resets + 1)
            resets += 1
    if isinstance(env, RecordVideo):
        env.close()  # finishes the mp4
    return time.perf_counter() - t, resets


def policy_rollout(env: gym.Env, policy, steps: int) -> float:
    t = time.perf_counter()
    obs, _ = env.reset(seed=0)
    policy.reset()
    for _ in range(steps):
        obs, _, term, trunc, _ = env.step(policy.act(obs))
        if term or trunc:
            obs, _ = env.reset(seed=1)
            policy.reset()
    if isinstance(env, RecordVideo):
        env.close()
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--size", type=int, default=480)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    kw = dict(render_mode="rgb_array", width=args.size, height=args.size, max_episode_steps=STEPS)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for env_id in ENVS:
            plain_env = gym.make(env_id, **kw)
            acts = actions(plain_env, STEPS)
            rollout(plain_env, acts, render=True)  # warm-up: renderer and GL context
            times: dict[str, list[float]] = {"plain": [], "render": [], "record": []}
            resets = 0
            for k in range(args.repeats):
                times["plain"].append(rollout(plain_env, acts, render=False)[0])
                times["render"].append(rollout(plain_env, acts, render=True)[0])
                rec = RecordVideo(gym.make(env_id, **kw), os.path.join(tmp, f"{k}"), episode_trigger=lambda e: True)
                dt, resets = rollout(rec, acts, render=False)
                times["record"].append(dt)
                size = sum(os.path.getsize(p) for p in rec.videos)
            from deqmpc_gym import DEQMPCPolicy

            torch.manual_seed(0)
            policy = DEQMPCPolicy.from_env(plain_env, "deq-mpc-nn", hidden=64)
            times["policy"], times["policy_rec"] = [], []
            for k in range(args.repeats):
                times["policy"].append(policy_rollout(plain_env, policy, STEPS))
                rec = RecordVideo(gym.make(env_id, **kw), os.path.join(tmp, f"p{k}"), episode_trigger=lambda e: True,
                                  plan_source=policy)
                times["policy_rec"].append(policy_rollout(rec, policy, STEPS))
            plain_env.close()
            med = {k: float(np.median(v)) for k, v in times.items()}
            rows.append((env_id.split("/")[-1], med, resets, size))
    print(f"Video recording cost, {STEPS}-step fixed action sequence at {args.size}x{args.size}, "
          f"median of {args.repeats} rollouts, {args.threads} torch thread(s)")
    print()
    print("| env | plain [ms] | render only [ms] | RecordVideo [ms] | RecordVideo / plain | RecordVideo / render "
          "| per frame [ms] | mp4 size [kB] | DEQ-MPC rollout [ms] | DEQ-MPC + RecordVideo [ms] | ratio |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for name, m, resets, size in rows:
        note = f" ({resets} resets)" if resets else ""
        print(f"| {name}{note} | {m['plain'] * 1e3:.1f} | {m['render'] * 1e3:.1f} | {m['record'] * 1e3:.1f} | "
              f"{m['record'] / m['plain']:.0f}x | {m['record'] / m['render']:.2f}x | "
              f"{m['record'] / (STEPS + 1) * 1e3:.2f} | {size / 1e3:.0f} | {m['policy'] * 1e3:.0f} | "
              f"{m['policy_rec'] * 1e3:.0f} | {m['policy_rec'] / m['policy']:.2f}x |")


if __name__ == "__main__":
    main()
