"""Exporting a trained PPO expert: ``actor.pt`` and ``card.json`` with its measured quality
(:func:`export_expert`), and the uniformly random reference policy of the card (:class:`RandomPolicy`)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from deqmpc_gym.experts.config import ExpertConfig
from deqmpc_gym.experts.features import feature_spec
from deqmpc_gym.experts.loader import CARD_FORMAT, Expert, loaded_actor
from deqmpc_gym.experts.teacher import refine_with_teacher
from deqmpc_gym.io import atomic_write, atomic_write_text


def export_expert(model: Any, venv: Any, config: ExpertConfig, out_dir: Path, state: dict[str, Any],
                  log: Any = None) -> dict[str, Any]:
    """Write ``actor.pt`` and ``card.json`` (with 200-episode quality figures) to ``out_dir``; with
    ``config.teacher``, the actor is first refined by the MPC teacher (resumable from
    ``out_dir/checkpoint/teacher.pt``)."""
    from deqmpc_gym.evaluation import EvalConfig, rollout_batched

    rms = venv.obs_rms
    card: dict[str, Any] = {
        "format": CARD_FORMAT, "env_id": config.env_id, "train_steps": int(state["steps_done"]),
        "wall_time_s": round(float(state["wall_time_s"]), 1), "seed": config.seed,
        "obs_dim": int(rms.mean.shape[0]), "act_dim": int(venv.action_space.shape[0]),
        "net_arch": list(config.net_arch), "log_std_init": config.log_std_init,
        "obs_norm": {"mean": rms.mean.tolist(), "var": rms.var.tolist(), "clip_obs": float(venv.clip_obs),
                     "epsilon": float(venv.epsilon)},
        "obstacle_features": feature_spec(venv.unwrapped.env, config.features_after(state.get("phases_started", 0))),
        "config": json.loads(json.dumps(dataclasses.asdict(config))),
        "command": f"deqmpc-gym expert train --env {config.env_id} --seed {config.seed} --steps {config.total_steps}",
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    state_dict = {k: v.detach().cpu() for k, v in model.policy.state_dict().items()}
    expert = Expert(loaded_actor(card, state_dict), card)
    ev = EvalConfig(episodes=config.eval_episodes, max_steps=200, seed=10_000)
    if config.teacher is not None:
        ppo = rollout_batched(expert, config.env_id, ev)
        card["ppo_only"] = {"mean_return": ppo.mean_return, "std_return": ppo.std_return,
                            "success_rate": ppo.success_rate, "collision_rate": ppo.collision_rate}
        card["teacher"] = refine_with_teacher(expert, config.teacher, checkpoint=out_dir / "checkpoint" / "teacher.pt",
                                              log=log)
        state_dict = {k: v.detach().cpu() for k, v in expert.policy.state_dict().items()}
    atomic_write(out_dir / "actor.pt", lambda f: torch.save(state_dict, f))
    res = rollout_batched(expert, config.env_id, ev)
    rnd = rollout_batched(RandomPolicy(card["act_dim"], seed=config.seed), config.env_id, ev)
    card.update(mean_return=res.mean_return, std_return=res.std_return, success_rate=res.success_rate,
                collision_rate=res.collision_rate, random_return=rnd.mean_return,
                random_success_rate=rnd.success_rate, eval_episodes=config.eval_episodes)
    atomic_write_text(out_dir / "card.json", json.dumps(card, indent=2))
    return card



class RandomPolicy:
    """Uniformly random normalized actions (the D4RL "random" reference), seeded."""

    def __init__(self, act_dim: int, seed: int = 0) -> None:
        self.act_dim = act_dim
        self.rng = np.random.default_rng(seed)

    def predict(self, observation: Any, state: Any = None, episode_start: Any = None,
                deterministic: bool = False) -> tuple[np.ndarray, Any]:
        n = np.asarray(observation).shape[0] if np.asarray(observation).ndim == 2 else None
        shape = (n, self.act_dim) if n is not None else (self.act_dim,)
        return self.rng.uniform(-1.0, 1.0, size=shape).astype(np.float32), state
