"""Exporting a trained PPO expert: ``actor.pt`` and ``card.json`` with its measured quality
(:func:`export_expert`), and the uniformly random reference policy of the card (:class:`RandomPolicy`); the
card of a safety-filtered expert around a PPO expert (:func:`export_filtered`, its settings tuned by
:func:`tune_filter`)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from deqmpc_gym.experts.config import ExpertConfig
from deqmpc_gym.experts.features import feature_spec
from deqmpc_gym.experts.filtered import (
    CARD_EPISODES,
    CARD_SEED,
    FilterConfig,
    FilteredExpert,
    evaluate_filtered,
    filtered_card,
)
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


#: the settings :func:`tune_filter` tries by default (the first is :class:`FilterConfig`'s defaults)
FILTER_CANDIDATES: tuple[FilterConfig, ...] = (
    FilterConfig(), FilterConfig(trigger=0.5), FilterConfig(margin=0.3), FilterConfig(horizon=15),
    FilterConfig(iters=20), FilterConfig(margin=0.3, trigger=0.5))
#: validation episodes of the filter's settings and the confirmation episodes, apart from the card's 10000-10199
#: and the teacher's DAgger rounds (20000-33199)
VALIDATION_SEED = 40_000
CONFIRMATION_SEED = 60_000


def _summary(evaluation: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in evaluation.items() if k != "returns"}


def tune_filter(base: Any, candidates: tuple[FilterConfig, ...] = FILTER_CANDIDATES, *,
                seed: int = VALIDATION_SEED, episodes: int = CARD_EPISODES,
                log: Any = None) -> tuple[FilterConfig, list[dict[str, Any]]]:
    """Pick the filter settings around the PPO expert ``base`` on validation episodes (seeds ``seed``+, never
    the card's): the highest success rate minus collision rate, then the highest mean return; ties keep the
    earlier candidate.

    Returns:
        ``(the chosen FilterConfig, one record per candidate: its settings and evaluate_filtered's figures)``.
    """
    records, best, best_key = [], candidates[0], None
    for cfg in candidates:
        ev = _summary(evaluate_filtered(FilteredExpert(base, cfg), episodes, seed))
        records.append({"filter": dataclasses.asdict(cfg), **ev})
        key = (round(ev["success_rate"] - ev["collision_rate"], 9), ev["mean_return"])
        if best_key is None or key > best_key:
            best, best_key = cfg, key
        if log is not None:
            log(f"filter {dataclasses.asdict(cfg)}: success {ev['success_rate']:.1%}, collisions "
                f"{ev['collision_rate']:.1%}, return {ev['mean_return']:.1f}")
    return best, records


def export_filtered(source: Any, out_dir: Any, config: FilterConfig | None = None, *, episodes: int = CARD_EPISODES,
                    validation_seed: int = VALIDATION_SEED, confirmation_seed: int = CONFIRMATION_SEED,
                    log: Any = None) -> dict[str, Any]:
    """Measure the safety-filtered expert around a PPO expert and write its ``card.json`` to ``out_dir``.

    Args:
        source: the PPO expert: a registered env id (its shipped PPO expert) or an expert directory.
        config: the filter settings; None: chosen by :func:`tune_filter` on the validation episodes.
        episodes: episodes of the validation and confirmation runs (the card's are always its 200).
        validation_seed, confirmation_seed: first env seeds of those runs.

    Returns:
        The card (also written to ``out_dir/card.json``; ``base`` is the PPO expert's folder relative to it).
    """
    import os

    from deqmpc_gym.experts.loader import _digest, load_expert, pretrained_dir

    src = Path(source)
    base_dir = src if (src / "card.json").exists() else pretrained_dir(str(source))
    base = load_expert(base_dir, kind="ppo")
    tuning: list[dict[str, Any]] = []
    if config is None:
        config, tuning = tune_filter(base, seed=validation_seed, episodes=episodes, log=log)
    expert = FilteredExpert(base, config)
    card_eval = evaluate_filtered(expert, CARD_EPISODES, CARD_SEED)
    extra: dict[str, Any] = {
        "validation": tuning or [{"filter": dataclasses.asdict(config),
                                  **_summary(evaluate_filtered(expert, episodes, validation_seed))}],
        "confirmation": _summary(evaluate_filtered(expert, episodes, confirmation_seed)),
        "ppo_confirmation": _summary(evaluate_filtered(base, episodes, confirmation_seed)),
        "command": f"deqmpc-gym expert filter --env {base.env_id}{' --tune' if tuning else ''} --out {out_dir}"}
    card = filtered_card(expert, card_eval, f"{base.env_id}@{_digest(base_dir)}", extra)
    # the PPO expert alone on the card's episodes, counted the same way (its own card's collision rate counts
    # every early end)
    ppo = _summary(evaluate_filtered(base, CARD_EPISODES, CARD_SEED))
    card["ppo"] = {k: ppo[k] for k in ("mean_return", "std_return", "success_rate", "collision_rate",
                                       "early_end_rate")}
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    card["base"] = os.path.relpath(base_dir.resolve(), out.resolve())
    atomic_write_text(out / "card.json", json.dumps(card, indent=2))
    return card
