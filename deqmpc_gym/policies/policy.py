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

Fallback: if the layer cannot produce a finite control for an env of the batch (a non-finite control, a layer
call that fails for that env, or a finite but absurd observation -- more than ``ABSURD_FACTOR`` times beyond the
env's loose observation bounds, e.g. 1e20 -- which is not solved at all), that env gets the system's nominal
control (zero torque / force, hover thrust for quadrotors), clipped to the bounds, and its warm start is dropped
so the next call solves it cold; the other envs are unaffected (the rows that fail are isolated by re-solving
halves of the batch). ``last_fallback`` reports which.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np
import torch
from torch import Tensor, nn

from deqmpc_gym._device import resolve_device
from deqmpc_gym.envs.core import observation_bounds
from deqmpc_gym.envs.registration import check_env_id_from_file
from deqmpc_gym.errors import CheckpointError, ConfigError, DeqmpcError, ShapeError
from deqmpc_gym.io import atomic_write, atomic_write_text
from deqmpc_gym.policies.config import PolicyConfig, Variant
from deqmpc_gym.policies.layer import DEQMPCLayer, LayerOutput, StreamState, scatter_state, select_state
from deqmpc_gym.systems import System

CHECKPOINT_FORMAT = "deqmpc_gym.policy"
CHECKPOINT_VERSION = 1

#: ``SystemEnv`` keyword arguments a checkpoint may carry (anything else in a file is refused).
FILE_ENV_KWARGS: frozenset[str] = frozenset({"system", "obstacles", "obstacle_radius", "width", "height"})

#: observations beyond ``ABSURD_FACTOR`` times the env's loose observation bounds (at least 1) are absurd: no
#: physical state gets there, and the network's float32 arithmetic overflows on them.
ABSURD_FACTOR: float = 1e6

#: errors of one layer call that :meth:`DEQMPCPolicy.predict` isolates per env (typed errors of the solver and
#: network, e.g. waypoints that overflowed for an absurd state, and singular linear solves).
_ROW_ERRORS: tuple[type[BaseException], ...] = (DeqmpcError, torch.linalg.LinAlgError)


def _unwrap_env(env: gym.Env | str, env_kwargs: dict[str, Any] | None) -> tuple[gym.Env, str | None, dict[str, Any]]:
    """``(unwrapped env, its registered id or None, its make kwargs)`` of an env or an id (made here)."""
    if isinstance(env, str):
        from deqmpc_gym.envs.registration import register_envs

        register_envs()  # the DEQMPC/* ids (idempotent)

        kwargs = dict(env_kwargs or {})
        try:
            made = gym.make(env, **kwargs)
        except gym.error.Error as exc:  # unknown id / namespace / version
            raise ConfigError(f"cannot make env {env!r}: {exc}") from exc
        return made.unwrapped, env, kwargs
    if not isinstance(env, gym.Env):
        raise ConfigError(f"env must be a gymnasium.Env or a registered env id, got {type(env).__name__}")
    base = env.unwrapped
    spec = getattr(base, "spec", None) or getattr(env, "spec", None)
    env_id = spec.id if spec is not None else None
    kwargs = dict(spec.kwargs) if spec is not None else {}
    kwargs = {k: v for k, v in kwargs.items() if k not in ("render_mode",)}
    kwargs.update(env_kwargs or {})
    return base, env_id, kwargs


def _merge_config(variant: str | None, config: PolicyConfig | None, overrides: dict[str, Any]) -> PolicyConfig:
    """The :class:`PolicyConfig` of :meth:`DEQMPCPolicy.from_env`: ``config`` (default: paper defaults) with
    ``variant`` and ``overrides`` applied; a ``variant`` that contradicts ``config`` raises ``ConfigError``."""
    if config is not None and not isinstance(config, PolicyConfig):
        raise ConfigError(f"config must be a PolicyConfig, got {type(config).__name__}")
    if config is None:
        config = PolicyConfig()
    elif variant is not None and Variant.resolve(variant).value != config.variant:
        raise ConfigError(f"variant={variant!r} contradicts config.variant={config.variant!r}; pass one of them "
                          "(or make them agree)")
    if variant is not None:
        overrides = {**overrides, "variant": variant}
    return config.replace(**overrides) if overrides else config


def _dropped_rows(state: StreamState) -> np.ndarray:
    """Rows of ``state`` whose warm start was dropped (non-finite plan): they are solved cold."""
    plan = state.plan.detach().reshape(state.batch_size, -1)
    return ~torch.isfinite(plan).all(dim=1).cpu().numpy()


def _drop_rows(state: StreamState, rows: np.ndarray) -> StreamState:
    """``state`` with the plan of ``rows`` set to NaN, so that the next :meth:`DEQMPCPolicy.predict` call solves
    those rows cold."""
    plan = state.plan.clone()
    plan[torch.as_tensor(rows, device=plan.device)] = float("nan")
    return dataclasses.replace(state, plan=plan)


def _base_state(results: list[tuple[np.ndarray, LayerOutput]], n: int, horizon: int, system: System,
                device: torch.device) -> StreamState:
    """A state of batch ``n`` with the structure of the layer's outputs, to scatter the row groups into (every
    row is overwritten or dropped afterwards); all-NaN plans on ``device`` when no row could be solved."""
    if results:
        return select_state(results[0][1].state, torch.zeros(n, dtype=torch.long,
                                                            device=results[0][1].state.plan.device))
    nan = float("nan")
    return StreamState(plan=torch.full((n, horizon, system.nx), nan, dtype=torch.float64, device=device),
                       controls=torch.full((n, horizon, system.nu), nan, dtype=torch.float64, device=device))


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
        self.device = resolve_device(device)
        self.obs_dim = system.nx
        has_obstacles = obstacle_centers is not None and len(obstacle_centers) > 0
        self.layer = DEQMPCLayer(system, config, obstacle_centers=obstacle_centers if has_obstacles else None,
                                 obstacle_radius=obstacle_radius if has_obstacles else None, device=self.device)
        self.action_scale = np.asarray(action_scale, dtype=np.float64).reshape(system.nu)
        self.action_offset = np.asarray(action_offset, dtype=np.float64).reshape(system.nu)
        nominal = (system.nominal_control - self.action_offset) / self.action_scale
        self._safe_action = np.clip(nominal, -1.0, 1.0).astype(np.float32)
        low, high = observation_bounds(system)
        self._absurd_obs = ABSURD_FACTOR * np.maximum(1.0, np.maximum(np.abs(low), np.abs(high))).astype(np.float64)
        self._state: StreamState | None = None
        self.last_plan: dict[str, np.ndarray] | None = None
        self.last_output: LayerOutput | None = None
        self.last_fallback: np.ndarray = np.zeros(0, dtype=bool)

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_env(cls, env: gym.Env | str, variant: str | None = None, *, device: torch.device | str = "cpu",
                 env_kwargs: dict[str, Any] | None = None, config: PolicyConfig | None = None,
                 **config_overrides: Any) -> DEQMPCPolicy:
        """Build a policy for ``env`` (an env or a registered id such as ``"DEQMPC/QPole-v0"``).

        Args:
            variant: the :class:`~deqmpc_gym.policies.Variant`; default: ``config``'s variant, or
                ``"deq-mpc-deq"`` without a config. Giving both a variant and a config of another variant raises
                :class:`~deqmpc_gym.errors.ConfigError`.
            device: ``"cpu"``, ``"cuda"``, ``"cuda:N"``, ``"mps"`` or ``"auto"``.
            config: a :class:`PolicyConfig` to start from.
            config_overrides: :class:`PolicyConfig` fields (``hidden=256``, ``deq_mpc_iters=6``, ...); unknown
                names raise :class:`~deqmpc_gym.errors.ConfigError`.
        """
        cfg = _merge_config(variant, config, config_overrides)
        device = resolve_device(device)
        base, env_id, kwargs = _unwrap_env(env, env_kwargs)
        system = getattr(base, "system", None)
        if not isinstance(system, System):
            raise ConfigError(
                f"environment {type(base).__name__} has no `system` attribute (a deqmpc_gym.systems.System); "
                "DEQMPCPolicy needs the env's dynamics model — use a DEQMPC/* env or a SystemEnv over your System"
            )
        return cls(system, cfg, action_scale=base.action_scale, action_offset=base.action_offset,
                   obstacle_centers=getattr(base, "obstacle_centers", None),
                   obstacle_radius=getattr(base, "obstacle_radius", None), env_id=env_id, env_kwargs=kwargs,
                   device=device)

    # ------------------------------------------------------------------ inference
    def _check_obs(self, observation: Any) -> tuple[np.ndarray, bool]:
        want = f"({self.obs_dim},) or (n_envs, {self.obs_dim}) with n_envs >= 1"
        try:
            obs = np.asarray(observation)
        except (ValueError, TypeError) as exc:  # ragged nested lists
            raise ShapeError(f"observation must be a float array of shape {want}: {exc}") from None
        if obs.dtype.kind not in "fiu":
            raise ShapeError(f"observation must be a float array of shape {want}, got dtype {obs.dtype}")
        single = obs.ndim == 1
        if single:
            obs = obs[None]
        if obs.ndim != 2 or obs.shape[1] != self.obs_dim or obs.shape[0] == 0:
            raise ShapeError(f"observation must have shape {want}, got {np.asarray(observation).shape}")
        if not np.all(np.isfinite(obs)):
            bad = np.where(~np.all(np.isfinite(obs), axis=1))[0].tolist()
            raise ShapeError(f"observation contains NaN or inf (rows {bad}); the policy needs finite states")
        return obs.astype(np.float64), single

    @staticmethod
    def _check_starts(episode_start: Any, n: int) -> np.ndarray:
        """``episode_start`` as an ``(n,)`` bool array (None: all True)."""
        if episode_start is None:
            return np.ones(n, bool)
        try:
            starts = np.asarray(episode_start, dtype=bool).reshape(-1)
        except (ValueError, TypeError) as exc:
            raise ShapeError(f"episode_start must be an ({n},) bool array: {exc}") from None
        if starts.shape[0] != n:
            raise ShapeError(f"episode_start must have shape ({n},), got {np.asarray(episode_start).shape}")
        return starts

    @torch.no_grad()
    def predict(self, observation: Any, state: StreamState | None = None, episode_start: Any = None,
                deterministic: bool = False) -> tuple[np.ndarray, StreamState]:
        """SB3 ``PolicyPredictor.predict``.

        Args:
            observation: ``(n_envs, nx)`` or ``(nx,)`` physical states (float32/float64), ``n_envs >= 1``.
            state: the state returned by the previous call (None: cold start for every env).
            episode_start: ``(n_envs,)`` bool; envs where True are cold-started.
            deterministic: accepted for compatibility; DEQ-MPC is deterministic.

        Returns:
            ``(actions, state)``: normalized actions ``(n_envs, nu)`` float32 in ``[-1, 1]`` (``(nu,)`` for a
            single observation) and the new warm-start state. Envs that got the fallback action (see the module
            docstring) are listed in :attr:`last_fallback` and solved cold at the next call.
        """
        obs, single = self._check_obs(observation)
        n = obs.shape[0]
        starts = self._check_starts(episode_start, n)
        if state is not None and (not isinstance(state, StreamState) or state.batch_size != n):
            state = None
        starts = np.ones(n, bool) if state is None else starts | _dropped_rows(state)
        absurd = np.any(np.abs(obs) > self._absurd_obs, axis=1)
        was_training = self.layer.training
        self.layer.eval()
        try:
            u, new_state, failed = self._run(torch.as_tensor(obs, device=self.device), state, starts, absurd)
        finally:
            self.layer.train(was_training)
        actions = self._to_actions(u, failed)
        if self.last_fallback.any():
            new_state = _drop_rows(new_state, np.flatnonzero(self.last_fallback))
        return (actions[0] if single else actions), new_state

    def _run(self, x0: Tensor, state: StreamState | None, starts: np.ndarray,
             skip: np.ndarray) -> tuple[np.ndarray, StreamState, np.ndarray]:
        """Cold-start rows with ``starts``, warm-start the others, leave out the ``skip`` rows, merge the results.

        Returns ``(u (n, nu), merged state, failed (n,) bool)``; ``failed`` rows (the skipped ones and those the
        layer could not solve) have ``u`` NaN.
        """
        n = x0.shape[0]
        results: list[tuple[np.ndarray, LayerOutput]] = []
        failed: list[np.ndarray] = [np.flatnonzero(skip)]
        for rows, st in ((np.flatnonzero(starts & ~skip), None), (np.flatnonzero(~starts & ~skip), state)):
            if len(rows):
                self._solve_rows(x0, rows, st, results, failed)
        bad = np.zeros(n, bool)
        for rows in failed:
            bad[rows] = True
        if len(results) == 1 and len(results[0][0]) == n:
            out = results[0][1]
            merged, u = out.state, out.action.detach().cpu().numpy()
        else:
            merged = _base_state(results, n, self.config.horizon, self.system, self.device)
            u = np.full((n, self.system.nu), np.nan)
            for rows, out in results:
                merged = scatter_state(merged, torch.as_tensor(rows, device=self.device), out.state)
                u[rows] = out.action.detach().cpu().numpy()
        self.last_output = results[-1][1] if results else None
        self._record_plan(results)
        return u, merged, bad

    def _solve_rows(self, x0: Tensor, rows: np.ndarray, state: StreamState | None,
                    results: list[tuple[np.ndarray, LayerOutput]], failed: list[np.ndarray]) -> None:
        """Run the layer on ``rows`` (warm-started from their rows of ``state`` unless None); when the call fails,
        solve both halves separately so that only the rows that fail on their own end up in ``failed``."""
        sub = None if state is None else select_state(state, torch.as_tensor(rows, device=self.device))
        try:
            results.append((rows, self.layer(x0[rows], sub)))
        except _ROW_ERRORS:
            if len(rows) == 1:
                failed.append(rows)
                return
            half = len(rows) // 2
            self._solve_rows(x0, rows[:half], state, results, failed)
            self._solve_rows(x0, rows[half:], state, results, failed)

    def _record_plan(self, results: list[tuple[np.ndarray, LayerOutput]]) -> None:
        """Keep the plan of env 0 of the batch (None when env 0 could not be solved)."""
        found = next(((r, o) for r, o in results if 0 in r), None)
        if found is None:
            self.last_plan = None
            return
        rows, out = found
        i = int(np.flatnonzero(rows == 0)[0])
        self.last_plan = {
            "states": out.states[-1][i].detach().cpu().numpy(),
            "waypoints": out.thetas[-1][i].detach().cpu().numpy(),
            "controls": out.controls[-1][i].detach().cpu().numpy(),
        }

    def _to_actions(self, u: np.ndarray, failed: np.ndarray) -> np.ndarray:
        """Normalized, clipped float32 actions; rows that failed or are non-finite get the fallback action."""
        with np.errstate(invalid="ignore", over="ignore"):
            a = (u - self.action_offset) / self.action_scale
        bad = failed | ~np.all(np.isfinite(a), axis=1)
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
             device: torch.device | str = "cpu") -> DEQMPCPolicy:
        """Load a policy saved by :meth:`save` (``torch.load(weights_only=True)``: no arbitrary pickle).

        The env id stored in the file is only used when it is a registered ``DEQMPC/*`` id (or equals ``env``);
        anything else raises :class:`~deqmpc_gym.errors.UntrustedEnvIdError` without importing anything.

        Args:
            path: the directory written by :meth:`save` (or its ``policy.pt``).
            env: optional env or id to bind to; must match the checkpoint's env id.
            device: ``"cpu"``, ``"cuda"``, ``"cuda:N"``, ``"mps"`` or ``"auto"``.
        """
        device = resolve_device(device)
        file = _checkpoint_file(path)
        payload, meta = _read_checkpoint(file)
        env_id = meta.get("env_id")
        given = _env_id_of(env)
        if env is not None and env_id is not None and given is not None and given != env_id:
            raise CheckpointError(f"checkpoint {file} was trained on {env_id!r}, not {given!r}; use a policy "
                                  f"trained on {given!r} (or run it on {env_id!r})")
        if env is None:
            if env_id is None:
                raise CheckpointError(f"checkpoint {file} names no env id; pass env= to DEQMPCPolicy.load")
            env_id = check_env_id_from_file(env_id, f"checkpoint {file}")
        target = env if env is not None else env_id
        try:
            config = PolicyConfig.from_dict(meta.get("config"))
        except ConfigError as exc:
            raise CheckpointError(f"{file} holds an invalid policy config: {exc}") from exc
        env_kwargs = _file_env_kwargs(meta.get("env_kwargs"), file) if isinstance(target, str) else None
        try:
            policy = cls.from_env(target, device=device, env_kwargs=env_kwargs, config=config)
        except ConfigError as exc:
            raise CheckpointError(f"cannot build the policy stored in {file}: {exc}") from exc
        _load_weights(policy, payload.get("state_dict"), file)
        return policy

    @classmethod
    def from_pretrained(cls, env_id: str, variant: str = "deq-mpc-deq",
                        device: torch.device | str = "cpu") -> DEQMPCPolicy:
        """A trained controller shipped with the package (see ``deqmpc_gym.policies.pretrained.available()``).

        Its ``card.json`` (:func:`deqmpc_gym.policies.pretrained.card`) says how it was trained and how well it
        does. ``DEQMPCPolicy.from_pretrained("DEQMPC/Pendulum-v0").act(obs)`` drives the env.

        Raises:
            ConfigError: no controller ships for ``(env_id, variant)``; the message lists what ships.
        """
        from deqmpc_gym.policies.pretrained import pretrained_dir

        return cls.load(pretrained_dir(env_id, variant), device=device)


def _checkpoint_file(path: Any) -> Path:
    """``path/policy.pt`` for a directory, else ``path``; raises :class:`CheckpointError` when missing."""
    if not isinstance(path, (str, os.PathLike)):
        raise CheckpointError(f"path must be a str or os.PathLike, got {type(path).__name__}")
    root = Path(path)
    file = root / "policy.pt" if root.is_dir() else root
    if not file.is_file():
        raise CheckpointError(f"no policy checkpoint at {file}; expected a directory written by DEQMPCPolicy.save")
    return file


def _read_checkpoint(file: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(payload, meta)`` of a policy checkpoint, validated as far as their types and format go."""
    try:
        payload = torch.load(file, map_location="cpu", weights_only=True)
        meta = json.loads(payload["meta_json"])
    except Exception as exc:  # corrupt archive, wrong pickle, missing keys
        raise CheckpointError(f"{file} is not a readable DEQMPCPolicy checkpoint "
                              f"({type(exc).__name__}: {exc})") from exc
    if not isinstance(payload, dict) or not isinstance(meta, dict):
        raise CheckpointError(f"{file} is not a DEQMPCPolicy checkpoint (its payload or metadata is not a dict)")
    if payload.get("format") != CHECKPOINT_FORMAT or meta.get("version") != CHECKPOINT_VERSION:
        raise CheckpointError(f"{file} has format {payload.get('format')!r} v{meta.get('version')}; "
                              f"expected {CHECKPOINT_FORMAT!r} v{CHECKPOINT_VERSION}")
    if meta.get("env_id") is not None and not isinstance(meta.get("env_id"), str):
        raise CheckpointError(f"{file}: env_id must be a string, got {meta.get('env_id')!r}")
    return payload, meta


def _env_id_of(env: Any) -> str | None:
    """The registered id of ``env`` (an id string, a made env, or None)."""
    if env is None or isinstance(env, str):
        return env
    if not isinstance(env, gym.Env):
        raise ConfigError(f"env must be a gymnasium.Env or a registered env id, got {type(env).__name__}")
    spec = getattr(env.unwrapped, "spec", None) or getattr(env, "spec", None)
    return getattr(spec, "id", None)


def _file_env_kwargs(kwargs: Any, file: Path) -> dict[str, Any]:
    """Env kwargs stored in a checkpoint, limited to :data:`FILE_ENV_KWARGS` with scalar values."""
    if kwargs is None:
        return {}
    if not isinstance(kwargs, dict):
        raise CheckpointError(f"{file}: env_kwargs must be a dict, got {type(kwargs).__name__}")
    unknown = sorted(str(k) for k in kwargs if k not in FILE_ENV_KWARGS)
    if unknown:
        raise CheckpointError(f"{file}: env_kwargs {unknown} are not accepted from a file; allowed: "
                              f"{sorted(FILE_ENV_KWARGS)}")
    for k, v in kwargs.items():
        if not isinstance(v, (str, bool, int, float)):
            raise CheckpointError(f"{file}: env_kwargs[{k!r}] must be a string, bool or number, got {v!r}")
    return dict(kwargs)


def _load_weights(policy: DEQMPCPolicy, state_dict: Any, file: Path) -> None:
    """Load and check the stored weights (a dict of finite floating tensors that fits ``policy``)."""
    if not isinstance(state_dict, dict) or not all(isinstance(v, torch.Tensor) for v in state_dict.values()):
        raise CheckpointError(f"{file}: state_dict must be a dict of tensors")
    expected = policy.layer.state_dict()
    for k, v in state_dict.items():
        want = expected.get(k)
        if want is not None and want.is_floating_point() and not v.is_floating_point():  # ints, bools, complex
            raise CheckpointError(f"{file}: weight {k!r} has dtype {v.dtype}, expected {want.dtype}; the "
                                  "checkpoint is damaged")
        if v.is_floating_point() and not bool(torch.isfinite(v).all()):
            raise CheckpointError(f"{file}: weight {k!r} has NaN or inf values; the checkpoint is damaged")
    try:
        policy.layer.load_state_dict(state_dict)
    except (RuntimeError, TypeError, KeyError) as exc:
        raise CheckpointError(f"weights in {file} do not fit the policy built from its config: {exc}") from exc
