"""The reference returns of normalized scores: the expert that made an env's datasets and a random policy.

Scores are normalized D4RL-style, ``(R - R_random) / (R_expert - R_random)``, against the shipped expert of
:func:`~deqmpc_gym.experts.loader.dataset_expert_kind` (the expert whose demonstrations the policies imitate):
the PPO expert's card return on the pendulum, cart-pole and quadrotor tasks; on the obstacle tasks the
safety-filtered expert's return **on exactly the evaluated episodes** (the card's per-episode returns when the
episodes are among the card's, a rollout otherwise).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from deqmpc_gym.errors import ConfigError


def reference_returns(env_id: str, episodes: int = 200, seed: int = 10_000, max_steps: int = 200,
                      kind: str | None = None) -> dict[str, Any]:
    """The normalization reference of evaluations of ``env_id`` on ``episodes`` episodes from env seed ``seed``.

    Args:
        kind: the shipped expert (default: :func:`~deqmpc_gym.experts.loader.dataset_expert_kind` of ``env_id``).

    Returns:
        ``{"random_return", "expert_return", "expert_id", "expert_kind", "episodes", "seed", "measured"}``:
        ``measured`` is ``"card"`` (the PPO card's 200-episode mean), ``"card_episodes"`` (the mean of the
        filtered card's returns on the same episodes) or ``"rollout"``; ``random_return`` is the card's (a
        uniformly random policy on the card's 200 episodes).

    Raises:
        ConfigError: ``episodes``, ``max_steps`` < 1, or no expert of ``kind`` ships for ``env_id``.
    """
    from deqmpc_gym.experts.loader import dataset_expert_kind, load_expert

    for name, value in (("episodes", episodes), ("max_steps", max_steps)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"{name} must be an integer >= 1, got {value!r}")
    kind = dataset_expert_kind(env_id) if kind is None else kind
    expert = load_expert(env_id, kind=kind)
    card = expert.card
    out: dict[str, Any] = {"random_return": float(card["random_return"]), "expert_id": expert.expert_id,
                           "expert_kind": kind, "episodes": episodes, "seed": seed}
    if kind == "ppo":
        return {**out, "expert_return": float(card["mean_return"]), "measured": "card"}
    returns = card.get("returns") or []
    first = seed - int(card.get("eval_seed", -1))
    if max_steps == 200 and 0 <= first and first + episodes <= len(returns):
        return {**out, "expert_return": float(np.mean(returns[first:first + episodes])), "measured": "card_episodes"}
    from deqmpc_gym.evaluation import EvalConfig, rollout_batched

    ev = rollout_batched(expert, env_id, EvalConfig(episodes=episodes, max_steps=max_steps, seed=seed))
    return {**out, "expert_return": ev.mean_return, "measured": "rollout"}
