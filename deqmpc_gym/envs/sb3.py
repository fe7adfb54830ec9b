"""Stable-Baselines3 ``VecEnv`` adapter over :class:`~deqmpc_gym.envs.vector.BatchedSystemEnv`.

SB3 2.x does not accept a ``gymnasium.vector.VectorEnv``; :class:`SB3VecEnvAdapter` gives the batched torch env
SB3's ``VecEnv`` semantics (numpy in/out, auto-reset on done, ``terminal_observation`` and
``TimeLimit.truncated`` in the info dict of each finished sub-env), so ``PPO``, ``VecNormalize``,
``VecMonitor``, ``EvalCallback`` and ``evaluate_policy`` work with it.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import gymnasium as gym
import numpy as np
import torch
from stable_baselines3.common.vec_env.base_vec_env import VecEnv, VecEnvIndices

from deqmpc_gym.envs.vector import BatchedSystemEnv, make_batched_env


class SB3VecEnvAdapter(VecEnv):
    """SB3 ``VecEnv`` view of a :class:`BatchedSystemEnv` (``N = num_envs``).

    * ``reset() -> obs (N, nx) float32``; pending ``seed()``/``set_options()`` values are applied
      (sub-env ``i`` seeded ``seed + i``, as ``make_vec_env`` does); ``reset_infos`` holds the reset infos.
    * ``step(actions (N, nu)) -> (obs, rewards (N,) float32, dones (N,) bool, infos: list[dict])``. Each info
      dict is fresh and holds ``cost`` (float), ``is_success`` (bool) and, for obstacle variants,
      ``min_obstacle_distance``; for a finished sub-env it is the info of the final step plus
      ``terminal_observation`` (``(nx,)`` float32) and ``TimeLimit.truncated`` (bool), and ``obs[i]`` is the first
      observation of the next episode.
    * ``get_attr``/``set_attr``/``env_method`` act on the single underlying batched env (attribute values are
      returned once per requested index); ``env_is_wrapped`` is always ``False``; ``render`` is unsupported.
    """

    def __init__(self, env: BatchedSystemEnv) -> None:
        if not isinstance(env, BatchedSystemEnv):
            raise TypeError(f"SB3VecEnvAdapter wraps a BatchedSystemEnv, got {type(env).__name__}")
        self.env = env
        super().__init__(env.num_envs, env.single_observation_space, env.single_action_space)
        self.render_mode = None
        self._actions: Any = None
        self._has_obstacles = env.task.has_obstacles

    # ------------------------------------------------------------------ core
    def reset(self) -> np.ndarray:
        """Reset every sub-env and return ``obs (N, nx) float32``."""
        seeds = list(self._seeds) if any(s is not None for s in self._seeds) else None
        options = None
        if self._options and all(o and o.get("state") is not None for o in self._options):
            options = {"state": np.stack([np.asarray(o["state"], dtype=np.float64) for o in self._options])}
        obs, infos = self.env.reset(seed=seeds, options=options)
        self._reset_seeds()
        self._reset_options()
        self.reset_infos = self._info_dicts(infos["cost"], infos["is_success"], infos.get("min_obstacle_distance"))
        return np.asarray(obs, dtype=np.float32)

    def _info_dicts(self, cost: Any, success: Any, mind: Any) -> list[dict[str, Any]]:
        cl, sl = np.asarray(cost).tolist(), np.asarray(success).tolist()
        if mind is None:
            return [{"cost": c, "is_success": s} for c, s in zip(cl, sl)]
        return [{"cost": c, "is_success": s, "min_obstacle_distance": m}
                for c, s, m in zip(cl, sl, np.asarray(mind).tolist())]

    def step_async(self, actions: np.ndarray) -> None:
        self._actions = actions

    def step_wait(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[dict[str, Any]]]:
        r = self.env.step_arrays(self._actions)
        self._actions = None
        obs = r.obs.cpu().numpy()
        rewards = r.reward.to(torch.float32).cpu().numpy()
        dones = r.done.cpu().numpy()
        mind = None if r.min_obstacle_distance is None else r.min_obstacle_distance.cpu().numpy()
        infos = self._info_dicts(r.cost.cpu().numpy(), r.is_success.cpu().numpy(), mind)
        if r.any_done:
            fobs = r.final_obs.cpu().numpy()
            term = r.terminated.cpu().numpy()
            trunc = r.truncated.cpu().numpy()
            for i in np.flatnonzero(dones).tolist():
                info = infos[i]
                info["terminal_observation"] = fobs[i].copy()
                info["TimeLimit.truncated"] = bool(trunc[i] and not term[i])
            reset = self._info_dicts(r.reset_cost.cpu().numpy(), r.reset_is_success.cpu().numpy(),
                                     None if r.reset_min_dist is None else r.reset_min_dist.cpu().numpy())
            for j, i in enumerate(np.flatnonzero(dones).tolist()):
                self.reset_infos[i] = reset[j]
        return obs, rewards, dones, infos

    def close(self) -> None:
        self.env.close()

    # ------------------------------------------------------------------ attribute plumbing
    def _n(self, indices: VecEnvIndices) -> int:
        return len(list(self._get_indices(indices)))

    def get_attr(self, attr_name: str, indices: VecEnvIndices = None) -> list[Any]:
        """``getattr(batched_env, attr_name)`` repeated once per requested index."""
        value = getattr(self.env, attr_name)
        return [value] * self._n(indices)

    def set_attr(self, attr_name: str, value: Any, indices: VecEnvIndices = None) -> None:
        """``setattr(batched_env, attr_name, value)`` (shared by every sub-env)."""
        setattr(self.env, attr_name, value)

    def env_method(self, method_name: str, *method_args: Any, indices: VecEnvIndices = None,
                   **method_kwargs: Any) -> list[Any]:
        """Call ``batched_env.method_name(*args, **kwargs)`` once; the result is repeated per index."""
        out = getattr(self.env, method_name)(*method_args, **method_kwargs)
        return [out] * self._n(indices)

    def env_is_wrapped(self, wrapper_class: type[gym.Wrapper], indices: VecEnvIndices = None) -> list[bool]:
        return [False] * self._n(indices)

    def get_images(self) -> list[np.ndarray | None]:
        return [None] * self.num_envs

    def render(self, mode: str | None = None) -> np.ndarray | None:
        """Unsupported (the batched env does not render); returns ``None``."""
        return None

    def _get_indices(self, indices: VecEnvIndices) -> Iterable[int]:
        if indices is None:
            return range(self.num_envs)
        if isinstance(indices, (int, np.integer)):
            return [int(indices)]
        return indices


def make_sb3_vec_env(env_id: str, num_envs: int, seed: int | None = None, **kw: Any) -> SB3VecEnvAdapter:
    """An :class:`SB3VecEnvAdapter` over ``make_batched_env(env_id, num_envs, **kw)``; ``seed`` is applied at the
    first ``reset()`` (sub-env ``i`` gets ``seed + i``, like SB3's ``make_vec_env``)."""
    venv = SB3VecEnvAdapter(make_batched_env(env_id, num_envs, **kw))
    if seed is not None:
        venv.seed(seed)
    return venv
