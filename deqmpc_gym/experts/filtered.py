"""The safety-filtered expert: a PPO expert with the MPC safety filter of :mod:`deqmpc_gym.experts.teacher` in
the loop, the expert whose demonstrations train the obstacle tasks.

At every step the filter rolls the PPO actor's own policy ``horizon`` steps through the model; where that plan
comes within ``trigger`` of the obstacles enlarged by ``margin``, it returns the first control of an MPC that
tracks the plan under the sphere constraints (a cold solve per state), elsewhere the PPO action. Nothing is
trained: a :class:`FilteredExpert` is the PPO actor plus the :class:`FilterConfig`, and its card
(``pretrained/<Env>/filtered/card.json``) holds the settings and the figures measured on the card's 200 episodes
(:func:`evaluate_filtered`, :func:`filtered_card`; written by
:func:`~deqmpc_gym.experts.export.export_filtered`).
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from deqmpc_gym._config import check_field_types
from deqmpc_gym.errors import ShapeError
from deqmpc_gym.experts.teacher import SafetyFilterTeacher, TeacherConfig

#: the ``format`` of a filtered expert's ``card.json``
FILTERED_CARD_FORMAT = "deqmpc_gym.filtered_expert"
#: the episodes of every expert card: seeds ``CARD_SEED`` .. ``CARD_SEED + CARD_EPISODES - 1``, 200 steps each
CARD_SEED = 10_000
CARD_EPISODES = 200


@dataclass(frozen=True)
class FilterConfig:
    """Settings of the MPC safety filter (the filter fields of :class:`~deqmpc_gym.experts.teacher.TeacherConfig`).

    Attributes:
        horizon: lookahead steps ``H`` of the PPO plan (the MPC has ``H + 1`` knots).
        margin: [m] added to the env's obstacle radius in the MPC's sphere constraints.
        trigger: [m] the MPC acts where the plan's clearance to the enlarged spheres is below this.
        rho_init: first augmented-Lagrangian penalty of the MPC's solves.
        iters: at most this many AL iterations per solve.
    """

    horizon: int = 10
    margin: float = 0.2
    trigger: float = 0.3
    rho_init: float = 10.0
    iters: int = 10

    def __post_init__(self) -> None:
        check_field_types(self)
        self.teacher_config()  # the teacher's range checks (ConfigError)

    def teacher_config(self) -> TeacherConfig:
        """The :class:`TeacherConfig` with these filter settings (its DAgger fields unused)."""
        return TeacherConfig(**dataclasses.asdict(self))


class FilteredExpert:
    """A PPO :class:`~deqmpc_gym.experts.Expert` with the MPC safety filter; ``predict`` takes raw observations
    (``(n, nx)`` states of an obstacle env) like the PPO expert's.

    Args:
        base: the PPO expert (kept frozen; its observations must be the env's states).
        config: :class:`FilterConfig`.
        card: the filtered expert's card (``{}`` for one built in code).

    Attributes:
        kind: ``"filtered"``. env_id, obs_dim: those of ``base``.
        expert_id: the id recorded in datasets it collects (set by the loader for a shipped expert).
        states, mpc_states: counters of the rows ``predict``/``act`` saw and of those the MPC acted on.

    Raises:
        ConfigError: ``base`` acts on an env without obstacles, or its observations are not the states.
    """

    kind = "filtered"

    def __init__(self, base: Any, config: FilterConfig = FilterConfig(), card: dict[str, Any] | None = None) -> None:
        from deqmpc_gym.envs import make_batched_env

        self.base, self.config = base, config
        self.card: dict[str, Any] = dict(card or {})
        self.env_id: str = base.env_id
        self.obs_dim: int = base.obs_dim
        self.expert_id: str = ""
        env = make_batched_env(self.env_id, 1)  # the system, obstacles and action scaling of the env
        self._teacher = SafetyFilterTeacher(base, env, config.teacher_config())
        self.states = 0
        self.mpc_states = 0

    def act(self, obs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Filtered actions for raw observations ``obs: (n, nx)`` [physical units].

        Returns:
            ``(actions (n, nu) float32 normalized to [-1, 1], by_mpc (n,) bool)``: ``by_mpc`` marks the rows whose
            action is the MPC's (the others carry the PPO action).
        """
        x = torch.as_tensor(np.asarray(obs, dtype=np.float64))
        actions, by_mpc, _ = self._teacher.act(x)
        self.states += int(by_mpc.size)
        self.mpc_states += int(by_mpc.sum())
        return actions, by_mpc

    def predict(self, observation: Any, state: Any = None, episode_start: Any = None,
                deterministic: bool = True) -> tuple[np.ndarray, Any]:
        """SB3 ``PolicyPredictor``: raw ``(n, obs_dim)`` or ``(obs_dim,)`` observations -> normalized actions
        (deterministic; ``state`` is passed through)."""
        obs = np.asarray(observation, dtype=np.float64)
        if obs.ndim not in (1, 2) or obs.shape[-1] != self.obs_dim:
            raise ShapeError(f"observation must have shape ({self.obs_dim},) or (n, {self.obs_dim}), got {obs.shape}")
        if not np.all(np.isfinite(obs)):
            raise ShapeError("observation has non-finite values; the filtered expert acts on finite states only")
        actions, _ = self.act(obs.reshape(-1, self.obs_dim))
        return (actions[0] if obs.ndim == 1 else actions), state


def evaluate_filtered(expert: Any, episodes: int = CARD_EPISODES, seed: int = CARD_SEED,
                      max_steps: int = 200) -> dict[str, Any]:
    """Roll out ``expert`` on ``episodes`` batched episodes (episode ``i``: env seed ``seed + i``), exactly as
    :func:`~deqmpc_gym.evaluation.rollout_batched` does (same returns), and count what a card reports.

    ``expert`` is a :class:`FilteredExpert` or any expert with ``predict`` (then no state counts as MPC-labelled).

    Returns:
        ``mean_return``, ``std_return``, ``returns`` (per episode), ``success_rate`` (last state within the goal
        tolerance), ``collision_rate`` (ended by hitting an obstacle), ``early_end_rate`` (ended before
        ``max_steps``: a collision or leaving the state envelope), ``mpc_label_fraction`` (share of the live
        states whose action came from the MPC), ``states``, ``wall_time_s`` and ``wall_time_per_episode_s`` (the
        batch's wall time over ``episodes``), ``episodes``, ``seed``, ``max_steps``, ``torch_threads``.
    """
    from deqmpc_gym.envs import make_batched_env

    env = make_batched_env(expert.env_id, episodes, seed=seed, max_episode_steps=max_steps)
    t0 = time.perf_counter()
    try:
        obs, _ = env.reset(seed=seed)
        alive = np.ones(episodes, bool)
        returns = np.zeros(episodes)
        success = np.zeros(episodes, bool)
        ended = np.zeros(episodes, bool)
        hit = np.zeros(episodes, bool)
        states = labels = 0
        for _ in range(max_steps):
            if isinstance(expert, FilteredExpert):
                actions, by_mpc = expert.act(obs)
            else:
                actions, _ = expert.predict(obs, deterministic=True)
                by_mpc = np.zeros(episodes, bool)
            states += int(alive.sum())
            labels += int((by_mpc & alive).sum())
            r = env.step_arrays(np.asarray(actions, dtype=np.float32))
            term = r.terminated.cpu().numpy()
            returns += np.where(alive, r.reward.cpu().numpy(), 0.0)
            success = np.where(alive, r.is_success.cpu().numpy(), success)
            if r.min_obstacle_distance is not None:
                hit |= alive & term & (r.min_obstacle_distance.cpu().numpy() < 0.0)
            ended |= alive & term
            alive &= ~r.done.cpu().numpy()
            obs = r.obs.cpu().numpy()
            if not alive.any():
                break
    finally:
        env.close()
    wall = time.perf_counter() - t0
    return {"mean_return": float(returns.mean()), "std_return": float(returns.std()),
            "success_rate": float(success.mean()), "collision_rate": float(hit.mean()),
            "early_end_rate": float(ended.mean()), "mpc_label_fraction": labels / max(states, 1), "states": states,
            "wall_time_s": round(wall, 1), "wall_time_per_episode_s": round(wall / episodes, 3),
            "episodes": episodes, "seed": seed, "max_steps": max_steps, "torch_threads": torch.get_num_threads(),
            "returns": [float(v) for v in returns]}


def filtered_card(expert: FilteredExpert, evaluation: dict[str, Any], base_expert_id: str,
                  extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """The ``card.json`` of a filtered expert from its :func:`evaluate_filtered` on the card's episodes.

    Args:
        base_expert_id: the id of the PPO expert it wraps (checked when the card is loaded).
        extra: more entries (e.g. the ``validation`` and ``confirmation`` runs on other seeds).
    """
    base = expert.base.card
    return {"format": FILTERED_CARD_FORMAT, "kind": FilteredExpert.kind, "env_id": expert.env_id,
            "base": "..", "base_expert_id": base_expert_id, "filter": dataclasses.asdict(expert.config),
            "mean_return": evaluation["mean_return"], "std_return": evaluation["std_return"],
            "success_rate": evaluation["success_rate"], "collision_rate": evaluation["collision_rate"],
            "early_end_rate": evaluation["early_end_rate"], "mpc_label_fraction": evaluation["mpc_label_fraction"],
            "wall_time_per_episode_s": evaluation["wall_time_per_episode_s"],
            "eval_episodes": evaluation["episodes"], "eval_seed": evaluation["seed"],
            # the random policy of the PPO card, on the same 200 episodes
            "random_return": float(base["random_return"]), "random_success_rate": base.get("random_success_rate"),
            "ppo": {k: base.get(k) for k in ("mean_return", "std_return", "success_rate", "collision_rate")},
            "evaluation": {k: v for k, v in evaluation.items() if k != "returns"},
            "returns": evaluation["returns"], **(extra or {})}

