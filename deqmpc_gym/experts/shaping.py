"""The VecEnv wrappers of PPO's training env: reward shaping (:class:`RewardShaping`) and the obstacle features
of the policy's input (:class:`ObstacleFeatures`). Both wrap an :class:`~deqmpc_gym.envs.SB3VecEnvAdapter`; the
shaping is training-only (every evaluation uses the env's own reward, see
:class:`~deqmpc_gym.experts.ExpertConfig`)."""

from __future__ import annotations

from typing import Any

import gymnasium as gym
import numpy as np
from stable_baselines3.common.vec_env import VecEnv, VecEnvWrapper

from deqmpc_gym.experts.features import feature_spec, with_features


class RewardShaping(VecEnvWrapper):
    """Every step's reward gets ``+ bonus * exp(-0.5 * sum_i ((x_i - g_i) / (width * tol_i))**2)
    - collision_penalty * cost - clearance_penalty * clip(1 - d / clearance_margin, 0, 1)`` (``x``: the state the
    step reached -- the terminal observation for a finished sub-env --, ``g``/``tol``: the system's goal and
    success tolerance, ``cost``: the step's ``info["cost"]`` (1 on a collision or envelope exit) on a step that
    ends the episode, ``d``: the step's ``info["min_obstacle_distance"]`` [m], obstacle variants only).

    Args:
        venv: the wrapped env; ``venv.env.system`` supplies the goal and the success tolerance.
        bonus, width, collision_penalty, clearance_penalty: the initial shaping (see :meth:`set_shaping`).
        clearance_margin: [m] distance at which the clearance penalty starts.
    """

    def __init__(self, venv: VecEnv, bonus: float, width: float, collision_penalty: float = 0.0,
                 clearance_penalty: float = 0.0, clearance_margin: float = 0.5) -> None:
        super().__init__(venv)
        system = venv.env.system  # type: ignore[attr-defined]
        self.goal = np.asarray(system.goal, dtype=np.float64)
        self.tol = np.asarray(system.success_tolerance, dtype=np.float64)
        self.clearance_margin = float(clearance_margin)
        self.clearance_penalty = 0.0
        self.set_shaping(bonus, width, collision_penalty, clearance_penalty)

    def set_shaping(self, bonus: float, width: float, collision_penalty: float,
                    clearance_penalty: float | None = None) -> None:
        """Change the shaping (e.g. when a :class:`FinetunePhase` starts; ``clearance_penalty`` None: keep)."""
        self.bonus, self.width, self.scale = float(bonus), float(width), 1.0 / (float(width) * self.tol)
        self.collision_penalty = float(collision_penalty)
        if clearance_penalty is not None:
            self.clearance_penalty = float(clearance_penalty)

    def reset(self) -> np.ndarray:
        return self.venv.reset()  # type: ignore[return-value]

    def step_wait(self) -> Any:
        obs, rewards, dones, infos = self.venv.step_wait()
        nx = self.goal.shape[0]
        x = np.array(obs, dtype=np.float64)[:, :nx]
        done_idx = np.flatnonzero(dones).tolist()
        for i in done_idx:
            x[i] = infos[i]["terminal_observation"][:nx]
        z = (x - self.goal) * self.scale
        shaped = rewards + self.bonus * np.exp(-0.5 * (z * z).sum(-1))
        if self.collision_penalty:
            for i in done_idx:
                shaped[i] -= self.collision_penalty * float(infos[i]["cost"])
        if self.clearance_penalty > 0.0 and infos and "min_obstacle_distance" in infos[0]:
            d = np.array([info["min_obstacle_distance"] for info in infos], dtype=np.float64)
            d = np.nan_to_num(d, nan=0.0)  # a non-finite state (its episode ends) counts as contact
            shaped -= self.clearance_penalty * np.clip(1.0 - d / self.clearance_margin, 0.0, 1.0)
        return obs, shaped.astype(np.float32), dones, infos


class ObstacleFeatures(VecEnvWrapper):
    """Observations (and terminal observations) followed by the offsets ``(3 k)`` [m] to the ``k`` nearest
    obstacles (:func:`~deqmpc_gym.experts.features.obstacle_features`) of an obstacle env.

    Raises:
        ConfigError: the env has fewer than ``k`` obstacles.
    """

    def __init__(self, venv: VecEnv, k: int) -> None:
        self.spec = feature_spec(venv.env, k)  # type: ignore[attr-defined]
        space = venv.observation_space
        low = np.concatenate([space.low, np.full(3 * k, -np.inf, dtype=space.dtype)])  # type: ignore[attr-defined]
        high = np.concatenate([space.high, np.full(3 * k, np.inf, dtype=space.dtype)])  # type: ignore[attr-defined]
        super().__init__(venv, observation_space=gym.spaces.Box(low, high, dtype=space.dtype))  # type: ignore

    def reset(self) -> np.ndarray:
        return with_features(self.venv.reset(), self.spec)  # type: ignore[arg-type]

    def step_wait(self) -> Any:
        obs, rewards, dones, infos = self.venv.step_wait()
        for i in np.flatnonzero(dones).tolist():
            infos[i]["terminal_observation"] = with_features(infos[i]["terminal_observation"][None], self.spec)[0]
        return with_features(obs, self.spec), rewards, dones, infos  # type: ignore[arg-type]


def with_reward_shaping(venv: Any, bonus: float, width: float, collision_penalty: float = 0.0,
                        clearance_penalty: float = 0.0, clearance_margin: float = 0.5) -> RewardShaping:
    """``venv`` wrapped in :class:`RewardShaping` (training only)."""
    return RewardShaping(venv, bonus, width, collision_penalty, clearance_penalty, clearance_margin)


def with_obstacle_features(venv: Any, k: int) -> ObstacleFeatures:
    """``venv`` (an obstacle env) wrapped in :class:`ObstacleFeatures` with its ``k`` nearest obstacles."""
    return ObstacleFeatures(venv, k)
