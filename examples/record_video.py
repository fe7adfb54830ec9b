"""Record a rollout video with the MPC plan drawn into every frame.

``RecordVideo`` (``deqmpc_gym.wrappers``) is a drop-in for Gymnasium's wrapper that streams frames to
imageio (mp4, GIF when ffmpeg is missing). With ``plan_source=policy`` every frame also shows the DEQ-MPC
policy's current plan: the MPC's predicted trajectory (blue) and the network's waypoints (orange).
Rendering is headless MuJoCo: set ``MUJOCO_GL=egl`` (or ``osmesa``) on a machine without a display.

Run::

    MUJOCO_GL=egl python examples/record_video.py --policy runs/train_deqmpc/best   # a trained policy
    MUJOCO_GL=egl python examples/record_video.py                                   # untrained policy
    MUJOCO_GL=egl python examples/record_video.py --quick                           # tiny smoke run (tests)
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import gymnasium as gym
import torch

import deqmpc_gym  # noqa: F401  (registers the DEQMPC/* ids)
from deqmpc_gym.policies import DEQMPCPolicy
from deqmpc_gym.wrappers import RecordVideo


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--env-id", default="DEQMPC/Pendulum-v0")
    p.add_argument("--policy", default=None, help="directory written by DEQMPCPolicy.save (default: fresh policy)")
    p.add_argument("--hidden", type=int, default=128, help="network width of a fresh policy")
    p.add_argument("--out", default="runs/videos", help="video folder")
    p.add_argument("--episodes", type=int, default=1)
    p.add_argument("--max-steps", type=int, default=200, help="episode length")
    p.add_argument("--size", type=int, default=480, help="frame width and height (multiple of 16)")
    p.add_argument("--no-overlay", action="store_true", help="do not draw the plan")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    p.add_argument("--quick", action="store_true", help="tiny budget: 10 steps at 128x128, small network")
    args = p.parse_args()
    if args.quick:
        args.max_steps, args.size, args.hidden, args.episodes = 10, 128, 32, 1
    return args


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    os.environ.setdefault("MUJOCO_GL", "egl")  # headless rendering (must be set before MuJoCo is imported)

    # 1. an rgb_array env wrapped for recording; plan_source makes the wrapper draw policy.last_plan
    env = gym.make(args.env_id, render_mode="rgb_array", width=args.size, height=args.size,
                   max_episode_steps=args.max_steps)
    if args.policy is not None:
        policy = DEQMPCPolicy.load(args.policy, env=args.env_id)
    else:
        policy = DEQMPCPolicy.from_env(env, hidden=args.hidden)
    prefix = f"{args.env_id.split('/')[-1]}-{policy.config.variant}"
    env = RecordVideo(env, args.out, episode_trigger=lambda episode: True, name_prefix=prefix,
                      plan_source=policy, overlay=not args.no_overlay)

    # 2. the usual loop; every step renders one frame (with the plan computed by that step's act())
    for ep in range(args.episodes):
        obs, _ = env.reset(seed=args.seed + ep)
        policy.reset()
        ep_return, done = 0.0, False
        while not done:
            obs, reward, terminated, truncated, info = env.step(policy.act(obs))
            ep_return += float(reward)
            done = terminated or truncated
        print(f"episode {ep}: return {ep_return:.2f}, success={info.get('is_success')}")
    env.close()  # finishes and verifies the last file

    # 3. the written files (mp4 with ffmpeg, else gif)
    for path in env.videos:
        print(f"video: {path} ({Path(path).stat().st_size / 1024:.0f} KiB)")
    assert env.videos, "no video was written"


if __name__ == "__main__":
    main()
