"""A natively batched torch twin of :class:`~deqmpc_gym.envs.core.SystemEnv`.

:class:`BatchedSystemEnv` steps ``num_envs`` copies of a system with one ``system.step`` call on a ``(N, nx)``
torch tensor, with the same action map, reward, terminations and info as the single env, its own
``TimeLimit`` counter and same-step autoreset. Sub-env ``i`` owns a numpy generator seeded ``seed + i``, so
its initial states (and every later autoreset state) equal those of ``SystemEnv`` reset with ``seed + i``.
With the default float64 dtype the trajectories are bit-identical to the single env's (float32 obs equal).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import gymnasium as gym
import numpy as np
import torch
from gymnasium.utils import seeding
from gymnasium.vector import AutoresetMode, VectorEnv
from gymnasium.vector.utils import batch_space

from deqmpc_gym._device import resolve_device
from deqmpc_gym.envs.core import (
    check_kwargs,
    check_obstacle_config,
    check_render_size,
    check_reset_options,
    check_seed,
    observation_bounds,
    resolve_system,
    sample_initial_state,
)
from deqmpc_gym.errors import ConfigError, ResetNeeded, ShapeError
from deqmpc_gym.systems import System
from deqmpc_gym.systems.task import Task

VALID_VECTOR_KWARGS: tuple[str, ...] = (
    "system", "num_envs", "obstacles", "obstacle_radius", "max_episode_steps", "device", "dtype",
    "return_tensors", "render_mode", "width", "height",
)


#: integer action dtypes accepted besides the floating ones (converted to the env's dtype).
_INT_DTYPES = (torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8)


@dataclass
class StepArrays:
    """Raw batched results of one step (torch tensors on the env's device; ``N = num_envs``).

    ``obs``: ``(N, nx)`` float32 observation after autoreset; ``reward``: ``(N,)`` float64; ``terminated``,
    ``truncated``, ``done``: ``(N,)`` bool; ``cost``, ``is_success``, ``min_obstacle_distance``: ``(N,)`` *step*
    values (before autoreset); ``final_obs``: ``(N, nx)`` float32 observation reached by the step (before
    autoreset; equals ``obs`` where ``done`` is False); ``reset_cost``/``reset_is_success``/``reset_min_dist``:
    reset-info values of the autoreset rows (``None`` when nothing was done).
    """

    obs: torch.Tensor
    reward: torch.Tensor
    terminated: torch.Tensor
    truncated: torch.Tensor
    done: torch.Tensor
    cost: torch.Tensor
    is_success: torch.Tensor
    min_obstacle_distance: torch.Tensor | None
    final_obs: torch.Tensor
    any_done: bool
    reset_cost: torch.Tensor | None = None
    reset_is_success: torch.Tensor | None = None
    reset_min_dist: torch.Tensor | None = None


class BatchedSystemEnv(VectorEnv):
    """``num_envs`` copies of a system stepped together in torch (Gymnasium ``VectorEnv``).

    Semantics equal :class:`~deqmpc_gym.envs.core.SystemEnv` under ``TimeLimit(max_episode_steps)``:
    actions ``(N, nu)`` in ``[-1, 1]`` (clipped; wrong shape/non-finite raise
    :class:`~deqmpc_gym.errors.ShapeError`), observations ``(N, nx)`` float32, rewards ``(N,)`` float64,
    ``terminated``/``truncated`` ``(N,)`` bool.

    Autoreset: ``AutoresetMode.SAME_STEP``. When sub-env ``i`` ends, the returned ``obs[i]`` already is the
    first observation of its next episode and ``infos[i]`` the reset info; the observation that ended the
    episode is in ``infos["final_obs"][i]`` (object array, ``None`` elsewhere, mask ``infos["_final_obs"]``) and
    its step info in ``infos["final_info"]`` (batched dict with ``_key`` masks), as in ``SyncVectorEnv``.

    Infos (batched numpy arrays with Gymnasium ``_key`` masks): ``cost`` (float64), ``is_success`` (bool) and
    for obstacle variants ``min_obstacle_distance`` (float64 [m]).

    Args:
        system: a system name, class or instance. num_envs: ``N >= 1``.
        obstacles, obstacle_radius: as in ``SystemEnv``. max_episode_steps: truncation length (``None``/``<= 0``:
            never truncate). device, dtype: torch device (``"cpu"``, ``"cuda"``, ``"cuda:N"``, ``"auto"``; an
            unavailable one raises ``DeviceError``) and dtype of the state (float64 for bit-identity).
        return_tensors: return torch tensors on ``device`` instead of numpy arrays (obs/rewards/flags).
        render_mode, width, height: accepted for ``gym.make_vec`` compatibility; only ``None`` is supported.
    """

    metadata: dict[str, Any] = {"render_modes": [], "autoreset_mode": AutoresetMode.SAME_STEP}

    def __init__(
        self,
        system: str | System | type[System] = "pendulum",
        num_envs: int = 1,
        obstacles: bool = False,
        obstacle_radius: float = 0.5,
        max_episode_steps: int | None = 200,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float64,
        return_tensors: bool = False,
        render_mode: str | None = None,
        width: int = 480,
        height: int = 480,
        **kwargs: Any,
    ) -> None:
        check_kwargs(kwargs, VALID_VECTOR_KWARGS, "BatchedSystemEnv")
        if isinstance(num_envs, bool) or not isinstance(num_envs, (int, np.integer)) or num_envs < 1:
            raise ConfigError(f"num_envs must be a positive int, got {num_envs!r}")
        if render_mode is not None:
            raise ConfigError("BatchedSystemEnv does not render; use SystemEnv(render_mode='rgb_array')")
        check_render_size(width, height)
        if dtype not in (torch.float32, torch.float64):
            raise ConfigError(f"dtype must be torch.float32 or torch.float64, got {dtype!r}")
        self.system: System = resolve_system(system)
        sys_ = self.system
        self.num_envs = int(num_envs)
        self.device = resolve_device(device)
        self.dtype = dtype
        self.return_tensors = bool(return_tensors)
        self.render_mode = None
        self.max_episode_steps = None if max_episode_steps is None or max_episode_steps <= 0 else int(max_episode_steps)
        self.metadata = {**type(self).metadata, "render_fps": max(1, int(round(1.0 / sys_.dt)))}

        centers = check_obstacle_config(sys_, obstacles, obstacle_radius)
        self.obstacle_centers: np.ndarray = centers
        self.obstacle_radius = float(obstacle_radius)
        self.obstacles = bool(obstacles)

        nx, nu = sys_.nx, sys_.nu
        u_low = np.asarray(sys_.u_low, dtype=np.float64)
        u_high = np.asarray(sys_.u_high, dtype=np.float64)
        self.action_scale: np.ndarray = 0.5 * (u_high - u_low)
        self.action_offset: np.ndarray = 0.5 * (u_high + u_low)
        self.single_action_space = gym.spaces.Box(-1.0, 1.0, shape=(nu,), dtype=np.float32)
        low, high = observation_bounds(sys_)
        self.single_observation_space = gym.spaces.Box(low, high, dtype=np.float32)
        self.action_space = batch_space(self.single_action_space, self.num_envs)
        self.observation_space = batch_space(self.single_observation_space, self.num_envs)

        def t(v: Any) -> torch.Tensor:
            return torch.as_tensor(np.asarray(v, dtype=np.float64), dtype=dtype, device=self.device)

        self._scale, self._offset = t(self.action_scale), t(self.action_offset)
        #: the task (reward, success, termination, obstacle distance) on ``dtype`` tensors on ``device``.
        self.task: Task = Task.of(sys_, centers, self.obstacle_radius, dtype=dtype, device=self.device)
        self._np_task = Task.of(sys_, centers, self.obstacle_radius)  # the start-state rejection (numpy)
        self._act_shape = (self.num_envs, nu)
        self._x = self.task.goal.expand(self.num_envs, nx).clone()
        self._elapsed = torch.zeros(self.num_envs, dtype=torch.int64, device=self.device)
        self._rngs: list[np.random.Generator] = [seeding.np_random(None)[0] for _ in range(self.num_envs)]
        self._needs_reset = True

    # ------------------------------------------------------------------ helpers
    @property
    def state(self) -> torch.Tensor:
        """A copy of the current wrapped states ``(N, nx)`` (torch, ``dtype`` on ``device``)."""
        return self._x.clone()

    @property
    def np_randoms(self) -> list[np.random.Generator]:
        """The per-sub-env numpy generators (sub-env ``i`` seeded ``seed + i``)."""
        return self._rngs

    def set_obstacle_radius(self, radius: float) -> None:
        """Change the obstacle radius [m] (collisions and the start rejection use it from the next step/reset on);
        e.g. a curriculum of obstacle size during training. Raises ``ConfigError`` for a non-positive radius."""
        check_obstacle_config(self.system, self.obstacles, radius)
        self.obstacle_radius = float(radius)
        self.task, self._np_task = self.task.with_radius(radius), self._np_task.with_radius(radius)

    def to_physical(self, action: Any) -> np.ndarray:
        """Normalized action ``(..., nu)`` -> physical control (float64 numpy, no clipping)."""
        return self.action_offset + self.action_scale * np.asarray(action, dtype=np.float64)

    def to_normalized(self, u: Any) -> np.ndarray:
        """Physical control ``(..., nu)`` -> normalized action (float64 numpy, no clipping)."""
        return (np.asarray(u, dtype=np.float64) - self.action_offset) / self.action_scale

    def _sample(self, idx: Sequence[int]) -> torch.Tensor:
        xs = [sample_initial_state(self.system, self._rngs[i], self._np_task) for i in idx]
        return torch.as_tensor(np.stack(xs), dtype=self.dtype, device=self.device)

    def _out(self, v: torch.Tensor) -> Any:
        return v if self.return_tensors else v.cpu().numpy()

    # ------------------------------------------------------------------ API
    def reset(self, *, seed: int | Sequence[int | None] | None = None,
              options: dict[str, Any] | None = None) -> tuple[Any, dict[str, Any]]:
        """Reset every sub-env.

        Args:
            seed: ``int`` (sub-env ``i`` gets ``seed + i``), a list of ``N`` seeds/``None``, or ``None``
                (continue each generator).
            options: ``{"state": (N, nx) or (nx,)}`` sets explicit initial states.

        Returns:
            ``(obs (N, nx) float32, infos)``.
        """
        n = self.num_envs
        options = check_reset_options(options)
        for i, s in enumerate(self._seeds(seed)):
            if s is not None:
                self._rngs[i] = seeding.np_random(s)[0]
        if options.get("state") is not None:
            xs = torch.as_tensor(self._state_option(options["state"]), dtype=self.dtype, device=self.device)
            if xs.shape == (self.system.nx,):
                xs = xs.expand(n, -1)
            if xs.shape != (n, self.system.nx) or not torch.isfinite(xs.to(torch.float32)).all():
                raise ShapeError(f"options['state'] must be finite with shape ({n}, {self.system.nx}) or "
                                 f"({self.system.nx},), got {tuple(xs.shape)}")
            self._x = self.system.wrap(xs)
        else:
            self._x = self._sample(range(n))
        self._elapsed.zero_()
        self._needs_reset = False
        viol, mind = self.task.violation(self._x)
        infos = self._infos(viol.to(torch.float64), self.task.success(self._x), mind)
        return self._out(self._x.to(torch.float32)), infos

    def _seeds(self, seed: Any) -> list[int | None]:
        """Per-sub-env seeds of ``reset(seed=...)`` (validated; ``None`` entries keep a generator going)."""
        n = self.num_envs
        if seed is None:
            return [None] * n
        if isinstance(seed, (int, np.integer)) and not isinstance(seed, (bool, np.bool_)):
            return [check_seed(seed + i) for i in range(n)]
        if isinstance(seed, (str, bytes)) or not hasattr(seed, "__len__"):
            raise ConfigError(f"seed must be None, an integer >= 0 or a list of {n} of them, got {seed!r}")
        seeds = list(seed)
        if len(seeds) != n:
            raise ConfigError(f"seed must be an int or a list of {n} seeds, got {len(seeds)}")
        return [check_seed(s, f"seed[{i}]") for i, s in enumerate(seeds)]

    @staticmethod
    def _state_option(value: Any) -> np.ndarray:
        """``options["state"]`` as float64 numpy (a :class:`ShapeError` for non-numeric values)."""
        try:
            return np.asarray(value, dtype=np.float64)
        except (TypeError, ValueError) as exc:
            raise ShapeError(f"options['state'] must be a numeric array: {exc}") from None

    def _infos(self, cost: torch.Tensor, success: torch.Tensor, mind: torch.Tensor | None) -> dict[str, Any]:
        mask = np.ones(self.num_envs, dtype=bool)
        infos: dict[str, Any] = {"cost": cost.cpu().numpy(), "_cost": mask,
                                 "is_success": success.cpu().numpy(), "_is_success": mask.copy()}
        if mind is not None:
            infos["min_obstacle_distance"] = mind.to(torch.float64).cpu().numpy()
            infos["_min_obstacle_distance"] = mask.copy()
        return infos

    def step_arrays(self, actions: Any) -> StepArrays:
        """One batched step returning raw torch results (see :class:`StepArrays`); used by the SB3 adapter."""
        if self._needs_reset:
            raise ResetNeeded("BatchedSystemEnv.step() called before reset(); call env.reset() first")
        try:
            a = torch.as_tensor(np.asarray(actions) if not isinstance(actions, torch.Tensor) else actions,
                                device=self.device)
        except (TypeError, ValueError, RuntimeError) as exc:
            raise ShapeError(f"actions must be a numeric array of shape {self._act_shape}: {exc}") from None
        if tuple(a.shape) != self._act_shape or not (a.is_floating_point() or a.dtype in _INT_DTYPES):
            raise ShapeError(f"actions must be numeric with shape {self._act_shape} = (num_envs, nu), normalized "
                             f"to [-1, 1]; got {tuple(a.shape)} {a.dtype}")
        a = a.to(self.dtype)
        if not bool(torch.isfinite(a).all()):
            raise ShapeError(f"actions of shape {self._act_shape} must be finite")
        a = a.clamp(-1.0, 1.0)
        u = self._offset + self._scale * a
        x = self.system.wrap(self.system.step(self._x, u))
        out = self.task.outcome(x, a)
        final_obs, terminated, viol, mind = out.obs, out.terminated, out.violated, out.distance
        self._elapsed += 1
        if self.max_episode_steps is not None:
            truncated = self._elapsed >= self.max_episode_steps
        else:
            truncated = torch.zeros_like(terminated)
        done = terminated | truncated
        res = StepArrays(obs=final_obs, reward=out.reward.to(torch.float64), terminated=terminated,
                         truncated=truncated, done=done, cost=viol.to(torch.float64), is_success=out.success,
                         min_obstacle_distance=mind,
                         final_obs=final_obs, any_done=bool(done.any()))
        if res.any_done:
            idx = done.nonzero().flatten()
            x = x.clone()
            x[idx] = self._sample(idx.tolist())
            self._elapsed[idx] = 0
            rviol, rmind = self.task.violation(x[idx])
            res.reset_cost = rviol.to(torch.float64)
            res.reset_is_success = self.task.success(x[idx])
            res.reset_min_dist = rmind
            res.obs = x.to(torch.float32)
        self._x = x
        return res

    def step(self, actions: Any) -> tuple[Any, Any, Any, Any, dict[str, Any]]:
        """Step every sub-env with ``actions (N, nu)``; returns ``(obs, rewards, terminated, truncated, infos)``."""
        r = self.step_arrays(actions)
        infos = self._infos(r.cost, r.is_success, r.min_obstacle_distance)
        if r.any_done:
            done_np = r.done.cpu().numpy()
            idx = np.flatnonzero(done_np)
            final_info = {k: v.copy() for k, v in infos.items()}
            for k in list(final_info):
                if k.startswith("_"):
                    final_info[k] = done_np.copy()
            fo = np.full(self.num_envs, None, dtype=object)
            fobs = r.final_obs.cpu().numpy()
            for i in idx:
                fo[i] = fobs[i].copy()
            infos["cost"][idx] = r.reset_cost.cpu().numpy()
            infos["is_success"][idx] = r.reset_is_success.cpu().numpy()
            if r.reset_min_dist is not None:
                infos["min_obstacle_distance"][idx] = r.reset_min_dist.cpu().numpy()
            infos["final_obs"], infos["_final_obs"] = fo, done_np.copy()
            infos["final_info"], infos["_final_info"] = final_info, done_np.copy()
        return (self._out(r.obs), self._out(r.reward), self._out(r.terminated), self._out(r.truncated), infos)

    def close_extras(self, **kwargs: Any) -> None:
        """Nothing to release (no renderer)."""


def make_batched_env(env_id: str, num_envs: int, seed: int | None = None, device: str | torch.device = "cpu",
                     **env_kwargs: Any) -> BatchedSystemEnv:
    """Build the :class:`BatchedSystemEnv` of a registered ``DEQMPC/*`` id (``max_episode_steps`` from the
    registration unless given) and reset it with ``seed`` (sub-env ``i`` gets ``seed + i``) if ``seed`` is not
    ``None``."""
    from deqmpc_gym.envs.registration import MAX_EPISODE_STEPS
    from deqmpc_gym.envs.registration import env_kwargs as spec_kwargs

    kw = spec_kwargs(env_id)
    kw.update(env_kwargs)
    kw.setdefault("max_episode_steps", MAX_EPISODE_STEPS)
    env = BatchedSystemEnv(num_envs=num_envs, device=device, **kw)
    if seed is not None:
        env.reset(seed=seed)
    return env
