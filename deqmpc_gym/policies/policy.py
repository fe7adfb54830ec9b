"""``DEQMPCPolicy``: a DEQ-MPC controller for any Gymnasium loop and a stable-baselines3 ``PolicyPredictor``.

Usage::

    import gymnasium as gym, deqmpc_gym
    from deqmpc_gym import DEQMPCPolicy

    env = gym.make("DEQMPC/Pendulum-v0")
    policy = DEQMPCPolicy.from_env(env, variant="deq-mpc-deq", hidden=128)
    obs, _ = env.reset(seed=0)
    policy.reset()
    for _ in range(200):
        obs, reward, terminated, truncated, info = env.step(policy.act(obs))

``predict(observation, state, episode_start, deterministic)`` follows SB3's ``PolicyPredictor`` protocol so
``stable_baselines3.common.evaluation.evaluate_policy(policy, vec_env)`` works; the warm start is carried in
``state`` (an opaque :class:`~deqmpc_gym.policies.layer.StreamState`) and reset per env on ``episode_start``.

Fallback: if the solver returns a non-finite control for an env of the batch, that env gets the system's
nominal control (zero torque / force, hover thrust for quadrotors), clipped to the bounds, and its warm start
is dropped so the next call solves cold; the other envs are unaffected. ``last_fallback`` reports which.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np
import torch
from torch import Tensor, nn

from deqmpc_gym.errors import CheckpointError, ConfigError, ShapeError
from deqmpc_gym.io import atomic_write, atomic_write_text
from deqmpc_gym.policies.config import PolicyConfig
from deqmpc_gym.policies.layer import DEQMPCLayer, LayerOutput, StreamState, scatter_state, select_state
from deqmpc_gym.systems import System

CHECKPOINT_FORMAT = "deqmpc_gym.policy"
CHECKPOINT_VERSION = 1


def _unwrap_env(env: gym.Env | str, env_kwargs: dict[str, Any] | None) -> tuple[gym.Env, str | None, dict[str, Any]]:
    if isinstance(env, str):
        import deqmpc_gym  # noqa: F401  (registers the ids)

        kwargs = dict(env_kwargs or {})
        made = gym.make(env, **kwargs)
        return made.unwrapped, env, kwargs
    base = env.unwrapped
    spec = getattr(base, "spec", None) or getattr(env, "spec", None)
    env_id = spec.id if spec is not None else None
    kwargs = dict(spec.kwargs) if spec is not None else {}
    kwargs = {k: v for k, v in kwargs.items() if k not in ("render_mode",)}
    kwargs.update(env_kwargs or {})
    return base, env_id, kwargs


class DEQMPCPolicy(nn.Module):
    """A DEQ-MPC policy bound to an environment's system, action scaling and obstacles.

    Args:
        system: the controlled system.
        config: :class:`PolicyConfig` (variant, sizes, iterations).
        action_scale, action_offset: ``(nu,)`` affine map of the env: ``u = offset + scale * a``.
        obstacle_centers: ``(K, 3)`` [m] or None; obstacle_radius: [m] or None.
        env_id: registered id of the env (stored in checkpoints); env_kwargs: its ``gym.make`` kwargs.
        device: torch device of the network and solver.
    """

    def __init__(self, system: System, config: PolicyConfig, *, action_scale: np.ndarray, action_offset: np.ndarray,
                 obstacle_centers: np.ndarray | None = None, obstacle_radius: float | None = None,
                 env_id: str | None = None, env_kwargs: dict[str, Any] | None = None,
                 device: torch.device | str = "cpu") -> None:
        super().__init__()
        self.system = system
        self.config = config
        self.env_id = env_id
        self.env_kwargs = dict(env_kwargs or {})
        self.device = torch.device(device)
        self.obs_dim = system.nx
        has_obstacles = obstacle_centers is not None and len(obstacle_centers) > 0
        self.layer = DEQMPCLayer(system, config, obstacle_centers=obstacle_centers if has_obstacles else None,
                                 obstacle_radius=obstacle_radius if has_obstacles else None, device=self.device)
        self.action_scale = np.asarray(action_scale, dtype=np.float64).reshape(system.nu)
        self.action_offset = np.asarray(action_offset, dtype=np.float64).reshape(system.nu)
        nominal = (system.nominal_control - self.action_offset) / self.action_scale
        self._safe_action = np.clip(nominal, -1.0, 1.0).astype(np.float32)
        self._state: StreamState | None = None
        self.last_plan: dict[str, np.ndarray] | None = None
        self.last_output: LayerOutput | None = None
        self.last_fallback: np.ndarray = np.zeros(0, dtype=bool)

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_env(cls, env: gym.Env | str, variant: str = "deq-mpc-deq", *, device: torch.device | str = "cpu",
                 env_kwargs: dict[str, Any] | None = None, config: PolicyConfig | None = None,
                 **config_overrides: Any) -> "DEQMPCPolicy":
        """Build a policy for ``env`` (an env or a registered id such as ``"DEQMPC/QPole-v0"``).

        ``config_overrides`` are :class:`PolicyConfig` fields (``hidden=256``, ``deq_mpc_iters=6``, ...);
        unknown names raise :class:`~deqmpc_gym.errors.ConfigError`.
        """
        base, env_id, kwargs = _unwrap_env(env, env_kwargs)
        system = getattr(base, "system", None)
        if not isinstance(system, System):
            raise ConfigError(
                f"environment {type(base).__name__} has no `system` attribute (a deqmpc_gym.systems.System); "
                "DEQMPCPolicy needs the env's dynamics model — use a DEQMPC/* env or a SystemEnv over your System"
            )
        cfg = (config or PolicyConfig()).replace(variant=variant, **config_overrides)
        return cls(system, cfg, action_scale=base.action_scale, action_offset=base.action_offset,
                   obstacle_centers=getattr(base, "obstacle_centers", None),
                   obstacle_radius=getattr(base, "obstacle_radius", None), env_id=env_id, env_kwargs=kwargs,
                   device=device)

    # ------------------------------------------------------------------ inference
    def _check_obs(self, observation: Any) -> tuple[np.ndarray, bool]:
        obs = np.asarray(observation)
        if obs.dtype.kind not in "fiu":
            raise ShapeError(f"observation must be a float array of shape ({self.obs_dim},) or (n_envs, {self.obs_dim}),"
                             f" got dtype {obs.dtype}")
        single = obs.ndim == 1
        if single:
            obs = obs[None]
        if obs.ndim != 2 or obs.shape[1] != self.obs_dim:
            raise ShapeError(f"observation must have shape ({self.obs_dim},) or (n_envs, {self.obs_dim}), "
                             f"got {np.asarray(observation).shape}")
        if not np.all(np.isfinite(obs)):
            bad = np.where(~np.all(np.isfinite(obs), axis=1))[0].tolist()
            raise ShapeError(f"observation contains NaN or inf (rows {bad}); the policy needs finite states")
        return obs.astype(np.float64), single

    @torch.no_grad()
    def predict(self, observation: Any, state: StreamState | None = None, episode_start: Any = None,
                deterministic: bool = False) -> tuple[np.ndarray, StreamState]:
        """SB3 ``PolicyPredictor.predict``.

        Args:
            observation: ``(n_envs, nx)`` or ``(nx,)`` physical states (float32/float64).
            state: the state returned by the previous call (None: cold start for every env).
            episode_start: ``(n_envs,)`` bool; envs where True are cold-started.
            deterministic: accepted for compatibility; DEQ-MPC is deterministic.

        Returns:
            ``(actions, state)``: normalized actions ``(n_envs, nu)`` float32 in ``[-1, 1]`` (``(nu,)`` for a
            single observation) and the new warm-start state.
        """
        obs, single = self._check_obs(observation)
        n = obs.shape[0]
        starts = np.ones(n, bool) if episode_start is None else np.asarray(episode_start, dtype=bool).reshape(-1)
        if starts.shape[0] != n:
            raise ShapeError(f"episode_start must have shape ({n},), got {np.asarray(episode_start).shape}")
        if state is not None and (not isinstance(state, StreamState) or state.batch_size != n):
            state = None
        if state is None:
            starts = np.ones(n, bool)
        was_training = self.layer.training
        self.layer.eval()
        try:
            u, new_state = self._run(torch.as_tensor(obs, device=self.device), state, starts)
        finally:
            self.layer.train(was_training)
        actions = self._to_actions(u)
        return (actions[0] if single else actions), new_state

    def _run(self, x0: Tensor, state: StreamState | None, starts: np.ndarray) -> tuple[np.ndarray, StreamState]:
        """Cold-start rows with ``starts``, warm-start the others, and merge the results."""
        cold = np.where(starts)[0]
        warm = np.where(~starts)[0]
        outputs: list[tuple[np.ndarray, LayerOutput]] = []
        if len(cold):
            outputs.append((cold, self.layer(x0[cold], None)))
        if len(warm):
            idx = torch.as_tensor(warm, device=self.device)
            outputs.append((warm, self.layer(x0[warm], select_state(state, idx))))  # type: ignore[arg-type]
        if len(outputs) == 1 and len(outputs[0][0]) == x0.shape[0]:
            out = outputs[0][1]
            merged = out.state
            u = out.action.detach().cpu().numpy()
        else:
            merged = state  # type: ignore[assignment]
            u = np.zeros((x0.shape[0], self.system.nu))
            for rows, out in outputs:
                merged = scatter_state(merged, torch.as_tensor(rows, device=self.device), out.state)
                u[rows] = out.action.detach().cpu().numpy()
        self.last_output = outputs[-1][1]
        self._record_plan(outputs)
        return u, merged

    def _record_plan(self, outputs: list[tuple[np.ndarray, LayerOutput]]) -> None:
        """Keep the plan of env 0 of the batch (the cold or the warm group, whichever holds it)."""
        rows, out = next((r, o) for r, o in outputs if r[0] == 0)
        self.last_plan = {
            "states": out.states[-1][0].detach().cpu().numpy(),
            "waypoints": out.thetas[-1][0].detach().cpu().numpy(),
            "controls": out.controls[-1][0].detach().cpu().numpy(),
        }

    def _to_actions(self, u: np.ndarray) -> np.ndarray:
        a = (u - self.action_offset) / self.action_scale
        bad = ~np.all(np.isfinite(a), axis=1)
        self.last_fallback = bad
        a = np.where(bad[:, None], self._safe_action, a)
        return np.clip(a, -1.0, 1.0).astype(np.float32)

    def act(self, obs: Any) -> np.ndarray:
        """Normalized action ``(nu,)`` float32 for one observation ``(nx,)``; keeps the warm start across calls.

        Call :meth:`reset` at the start of every episode.
        """
        obs_arr = np.asarray(obs)
        if obs_arr.ndim != 1:
            raise ShapeError(f"act() takes one observation of shape ({self.obs_dim},), got {obs_arr.shape}; "
                             "use predict() for batches")
        start = np.array([self._state is None])
        actions, self._state = self.predict(obs_arr[None], self._state, start)
        if self.last_fallback.any():
            self._state = None
        return actions[0]

    def reset(self) -> None:
        """Forget the warm start: the next :meth:`act` solves cold (start of an episode)."""
        self._state = None

    # ------------------------------------------------------------------ persistence
    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write ``path/policy.pt`` (weights) and ``path/config.json`` (env id, env kwargs, config) atomically."""
        out = Path(path)
        out.mkdir(parents=True, exist_ok=True)
        meta = {"format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, "env_id": self.env_id,
                "env_kwargs": self.env_kwargs, "system": self.system.name, "config": self.config.to_dict()}
        payload = {"format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, "meta_json": json.dumps(meta),
                   "state_dict": {k: v.detach().cpu() for k, v in self.layer.state_dict().items()}}
        atomic_write(out / "policy.pt", lambda f: torch.save(payload, f))
        atomic_write_text(out / "config.json", json.dumps(meta, indent=2, sort_keys=True))
        return out

    @classmethod
    def load(cls, path: str | os.PathLike[str], env: gym.Env | str | None = None,
             device: torch.device | str = "cpu") -> "DEQMPCPolicy":
        """Load a policy saved by :meth:`save` (``torch.load(weights_only=True)``: no arbitrary pickle).

        Args:
            path: the directory written by :meth:`save` (or its ``policy.pt``).
            env: optional env or id to bind to; must match the checkpoint's env id.
        """
        root = Path(path)
        file = root / "policy.pt" if root.is_dir() else root
        if not file.exists():
            raise CheckpointError(f"no policy checkpoint at {file}; expected a directory written by DEQMPCPolicy.save")
        try:
            payload = torch.load(file, map_location="cpu", weights_only=True)
            meta = json.loads(payload["meta_json"])
        except Exception as exc:  # corrupt archive, wrong pickle, missing keys
            raise CheckpointError(f"{file} is not a readable DEQMPCPolicy checkpoint ({type(exc).__name__}: {exc})") from exc
        if payload.get("format") != CHECKPOINT_FORMAT or meta.get("version") != CHECKPOINT_VERSION:
            raise CheckpointError(f"{file} has format {payload.get('format')!r} v{meta.get('version')}; "
                                  f"expected {CHECKPOINT_FORMAT!r} v{CHECKPOINT_VERSION}")
        env_id = meta.get("env_id")
        if env is not None:
            given = env if isinstance(env, str) else getattr(getattr(env.unwrapped, "spec", None) or env.spec, "id", None)
            if env_id is not None and given is not None and given != env_id:
                raise CheckpointError(f"checkpoint {file} was trained on {env_id!r}, not {given!r}")
        target = env if env is not None else env_id
        if target is None:
            raise CheckpointError(f"checkpoint {file} names no env id; pass env= to DEQMPCPolicy.load")
        config = PolicyConfig.from_dict(meta["config"])
        env_kwargs = meta.get("env_kwargs") if isinstance(target, str) else None
        policy = cls.from_env(target, config.variant, device=device, env_kwargs=env_kwargs, config=config)
        try:
            policy.layer.load_state_dict(payload["state_dict"])
        except RuntimeError as exc:
            raise CheckpointError(f"weights in {file} do not fit the policy built from its config: {exc}") from exc
        return policy

