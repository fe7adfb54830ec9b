"""Record rollout videos of a saved DEQ-MPC policy (with its plan overlay) or of an env's shipped PPO expert."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import gymnasium as gym

from deqmpc_gym.errors import ConfigError
from deqmpc_gym.wrappers import RecordVideo

if TYPE_CHECKING:  # pragma: no cover
    import torch


def _check_counts(**counts: int | None) -> None:
    """Raise :class:`ConfigError` unless every given count is None or an integer >= 1."""
    for name, value in counts.items():
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ConfigError(f"{name} must be an integer >= 1, got {value!r}")


def record_rollouts(env_id: str, out_dir: str | Path, *, policy_path: str | Path | None = None, episodes: int = 1,
                    seed: int = 0, overlay: bool = True, max_steps: int | None = None, width: int = 480,
                    height: int = 480, device: str | torch.device = "cpu") -> list[Path]:
    """Record ``episodes`` rollouts of a saved DEQ-MPC policy (or the env's shipped PPO expert).

    Args:
        policy_path: a directory written by ``DEQMPCPolicy.save``; it must have been trained on ``env_id``.
        episodes, max_steps: integers >= 1 (``max_steps=None``: the env's own limit).
        device: torch device of the policy (``"cpu"``, ``"cuda"``, ``"cuda:N"``, ``"auto"``).

    Returns:
        Paths of the written videos.
    """
    import deqmpc_gym  # noqa: F401  (registers the env ids)

    _check_counts(episodes=episodes, max_steps=max_steps)
    kwargs: dict[str, Any] = {"render_mode": "rgb_array", "width": width, "height": height}
    if max_steps is not None:
        kwargs["max_episode_steps"] = max_steps
    if policy_path is not None:
        from deqmpc_gym.policies import DEQMPCPolicy

        policy: Any = DEQMPCPolicy.load(policy_path, env=env_id, device=device)
        act = policy.act
        reset = policy.reset
        prefix = f"{env_id.split('/')[-1]}-{policy.config.variant}"
    else:
        from deqmpc_gym.experts import load_expert

        policy = load_expert(env_id, env_id=env_id)
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
