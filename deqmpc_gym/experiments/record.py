"""Record rollout videos of a saved DEQ-MPC policy (with its plan overlay) or of an env's shipped PPO expert."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import gymnasium as gym

from deqmpc_gym.wrappers import RecordVideo



def record_rollouts(env_id: str, out_dir: str | Path, *, policy_path: str | Path | None = None, episodes: int = 1,
                    seed: int = 0, overlay: bool = True, max_steps: int | None = None, width: int = 480,
                    height: int = 480) -> list[Path]:
    """Record ``episodes`` rollouts of a saved DEQ-MPC policy (or the env's shipped PPO expert).

    Returns:
        Paths of the written videos.
    """
    import deqmpc_gym  # noqa: F401  (registers the env ids)

    kwargs: dict[str, Any] = {"render_mode": "rgb_array", "width": width, "height": height}
    if max_steps is not None:
        kwargs["max_episode_steps"] = max_steps
    if policy_path is not None:
        from deqmpc_gym.policies import DEQMPCPolicy

        policy: Any = DEQMPCPolicy.load(policy_path)
        act = policy.act
        reset = policy.reset
        prefix = f"{env_id.split('/')[-1]}-{policy.config.variant}"
    else:
        from deqmpc_gym.experts import load_expert

        policy = load_expert(env_id)
        act = lambda o: policy.predict(o, deterministic=True)[0]  # noqa: E731
        reset = lambda: None  # noqa: E731
        prefix = f"{env_id.split('/')[-1]}-expert"
        overlay = False
    env = RecordVideo(gym.make(env_id, **kwargs), out_dir, episode_trigger=lambda _: True, name_prefix=prefix,
                      plan_source=policy if overlay else None, overlay=overlay)
    try:
        for ep in range(episodes):
            obs, _ = env.reset(seed=seed + ep)
            reset()
            done = False
            while not done:
                obs, _, terminated, truncated, _ = env.step(act(obs))
                done = terminated or truncated
    finally:
        env.close()
    return env.videos
