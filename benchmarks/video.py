"""Benchmark of video recording cost; prints a markdown table.

A fixed 100-step action sequence (the nominal action plus a small seeded perturbation) is rolled out at
480x480 on Pendulum and QPole, side by side in one run:

* ``plain``: ``gym.make(env_id, render_mode="rgb_array")`` stepped without rendering;
* ``render``: the same env, ``render()`` after reset and every step (MuJoCo offscreen, no encoding);
* ``RecordVideo``: :class:`deqmpc_gym.wrappers.RecordVideo` writing an mp4 (render + imageio-ffmpeg encode);
* ``policy`` / ``policy + RecordVideo``: the same episode driven by a DEQ-MPC policy (``deq-mpc-nn``, hidden 64,
  streaming ``act()``), without recording and with ``RecordVideo`` drawing its plan overlay -- the ratio of these
  two is the cost of recording a DEQ-MPC rollout.

Times are medians over ``--repeats`` rollouts; ratios are relative to ``plain`` and ``render``. The DEQ-MPC
ratio is given both as the ratio of the two medians and as the median of the per-repeat ratios (each repeat runs
the two rollouts back to back, so the latter is less sensitive to load drifting on a shared machine).
``RecordVideo`` times include finishing and checking the mp4 (``close()``). The first ``RecordVideo`` of each env
also creates the GL context of its scene in the render server (later ones reuse it), and the very first one starts
the server process; that rollout is reported separately as "cold" (it is one of the repeats).
The table is also written to ``benchmarks/results/video.json`` (``--json``).
Usage: ``python benchmarks/video.py [--repeats 3] [--size 480] [--threads 1]``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir))  # run from a checkout
os.environ.setdefault("MUJOCO_GL", "egl")

import gymnasium as gym  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

import deqmpc_gym  # noqa: E402,F401  (registers the ids)
from deqmpc_gym.io import atomic_write_text  # noqa: E402
from deqmpc_gym.wrappers import RecordVideo  # noqa: E402

ENVS = ("DEQMPC/Pendulum-v0", "DEQMPC/QPole-v0")
STEPS = 100
RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "video.json")


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
    for i in range(steps):
        obs, _, term, trunc, _ = env.step(policy.act(obs))
        if (term or trunc) and i < steps - 1:  # (as in rollout(): no extra episode after the last step)
            obs, _ = env.reset(seed=1)
            policy.reset()
    if isinstance(env, RecordVideo):
        env.close()
    return time.perf_counter() - t


def _autogroup() -> str | None:
    """This process's scheduler autogroup and its nice value (Linux), e.g. ``"/autogroup-10 nice -20"``: on a
    shared machine, CPU is split between autogroups (sessions) first, so this says how loaded the run really was."""
    try:
        with open("/proc/self/autogroup") as f:
            return f.read().strip()
    except OSError:
        return None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--size", type=int, default=480)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", default=RESULTS, help="where to write the results (JSON)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    kw = dict(render_mode="rgb_array", width=args.size, height=args.size, max_episode_steps=STEPS)
    rows = []
    t_start, load_start = time.perf_counter(), os.getloadavg()
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
            paired = [r / p for r, p in zip(times["policy_rec"], times["policy"])]
            rows.append({"env": env_id.split("/")[-1], "resets": resets, "mp4_bytes": size,
                         "plain_ms": med["plain"] * 1e3, "render_ms": med["render"] * 1e3,
                         "record_ms": med["record"] * 1e3, "record_cold_ms": times["record"][0] * 1e3,
                         "record_per_frame_ms": med["record"] / (STEPS + 1) * 1e3,
                         "policy_ms": med["policy"] * 1e3, "policy_record_ms": med["policy_rec"] * 1e3,
                         "ratio": med["policy_rec"] / med["policy"], "ratio_paired_median": float(np.median(paired)),
                         "ratios_paired": paired,
                         "raw_ms": {k: [t * 1e3 for t in v] for k, v in times.items()}})
    print(f"Video recording cost, {STEPS}-step fixed action sequence at {args.size}x{args.size}, "
          f"median of {args.repeats} rollouts, {args.threads} torch thread(s)")
    print()
    print("| env | plain [ms] | render only [ms] | RecordVideo [ms] | RecordVideo cold [ms] | RecordVideo / plain "
          "| RecordVideo / render | per frame [ms] | mp4 size [kB] | DEQ-MPC rollout [ms] | DEQ-MPC + RecordVideo [ms] "
          "| ratio | paired ratio |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        note = f" ({r['resets']} resets)" if r["resets"] else ""
        print(f"| {r['env']}{note} | {r['plain_ms']:.1f} | {r['render_ms']:.1f} | {r['record_ms']:.1f} | "
              f"{r['record_cold_ms']:.1f} | {r['record_ms'] / r['plain_ms']:.0f}x | "
              f"{r['record_ms'] / r['render_ms']:.2f}x | {r['record_per_frame_ms']:.2f} | {r['mp4_bytes'] / 1e3:.0f} | "
              f"{r['policy_ms']:.0f} | {r['policy_record_ms']:.0f} | {r['ratio']:.2f}x | "
              f"{r['ratio_paired_median']:.2f}x |")
    meta = {"steps": STEPS, "size": args.size, "repeats": args.repeats, "threads": args.threads,
            "torch": torch.__version__, "python": platform.python_version(), "cpus": os.cpu_count(),
            "loadavg_start": list(load_start), "loadavg_end": list(os.getloadavg()), "nice": os.nice(0),
            "autogroup": _autogroup(), "wall_time_s": time.perf_counter() - t_start}
    atomic_write_text(args.json, json.dumps({"meta": meta, "rows": rows}, indent=2))
    print(f"\n(written to {os.path.relpath(args.json)}; load average {load_start[0]:.1f} -> "
          f"{meta['loadavg_end'][0]:.1f} on {meta['cpus']} CPUs)")


if __name__ == "__main__":
    main()
