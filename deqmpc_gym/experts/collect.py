"""Roll out an expert deterministically in the batched env and record a dataset of physical trajectories."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from deqmpc_gym.data import ExpertDataset, Trajectory
from deqmpc_gym.errors import ConfigError, DatasetError
from deqmpc_gym.evaluation.rollouts import check_policy_env

#: Paper dataset sizes (number of trajectories) per env.
DEFAULT_NUM_TRAJECTORIES: dict[str, int] = {
    "DEQMPC/Pendulum-v0": 300, "DEQMPC/Cartpole-v0": 300, "DEQMPC/Quadrotor-v0": 2000,
    "DEQMPC/QPole-v0": 2000, "DEQMPC/QuadrotorObs-v0": 2000, "DEQMPC/QPoleObs-v0": 2000,
}


def collect_dataset(expert: Any, env_id: str, num_trajectories: int | None = None, *, seed: int = 0,
                    max_steps: int = 200, batch_size: int = 500, expert_id: str = "",
                    progress: Callable[[int], None] | None = None) -> ExpertDataset:
    """Roll out ``expert`` (``predict(obs, state, episode_start, deterministic=True)``) for whole episodes.

    Episode ``i`` starts from the env seeded with ``seed + i`` and ends at termination or after ``max_steps``
    steps. States are recorded in float64 physical units (the env's internal state, not the float32 obs). An
    episode that ends early (an obstacle hit, or leaving the state envelope) is kept up to and including the
    state that ended it, with ``terminal=True``; ``extra["early_ends"]`` counts them.

    Args:
        num_trajectories: number of episodes (default: the paper's size for ``env_id``).
        batch_size: episodes simulated side by side.
        expert_id: the id recorded in the dataset (default: the expert's own ``expert_id``, e.g.
            ``"pretrained:DEQMPC/QPoleObs-v0:filtered@<hash>"`` for a shipped expert).
        progress: called with the number of finished trajectories after each batch.

    Returns:
        :class:`~deqmpc_gym.data.ExpertDataset` (deterministic for a given seed).
    """
    n_total = _num_trajectories(env_id, num_trajectories)
    for name, value in (("max_steps", max_steps), ("batch_size", batch_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"{name} must be an integer >= 1, got {value!r}")
    check_policy_env(expert, env_id)
    trajectories: list[Trajectory] = []
    for start in range(0, n_total, batch_size):
        n = min(batch_size, n_total - start)
        trajectories.extend(_collect_batch(expert, env_id, n, seed + start, max_steps))
        if progress is not None:
            progress(len(trajectories))
    extra: dict[str, Any] = {"max_steps": max_steps, "collected_at": time.strftime("%Y-%m-%d"),
                             "early_ends": sum(bool(t.terminal) for t in trajectories)}
    kind = getattr(expert, "kind", None)
    if isinstance(kind, str):
        extra["expert_kind"] = kind
    return ExpertDataset(env_id, trajectories, expert_id=expert_id or str(getattr(expert, "expert_id", "") or ""),
                         seed=seed, extra=extra)


def _num_trajectories(env_id: str, num_trajectories: int | None) -> int:
    """``num_trajectories`` validated (an integer >= 1), or the paper's size for ``env_id`` when None."""
    if num_trajectories is None:
        return int(DEFAULT_NUM_TRAJECTORIES.get(env_id, 300))
    if isinstance(num_trajectories, bool) or not isinstance(num_trajectories, int) or num_trajectories < 1:
        raise ConfigError(f"num_trajectories must be an integer >= 1, got {num_trajectories!r}")
    return num_trajectories


def collect_from_states(expert: Any, env_id: str, states: np.ndarray, *, max_steps: int = 200,
                        batch_size: int = 500) -> list[Trajectory]:
    """Expert trajectories that start at given states (e.g. states a learned policy visited: DAgger labels).

    Args:
        states: ``(N, nx)`` float64 physical initial states.
        max_steps: steps per trajectory (fewer where the episode terminates).

    Returns:
        ``N`` :class:`~deqmpc_gym.data.Trajectory` in the order of ``states``.
    """
    states = np.asarray(states, dtype=np.float64)
    if states.ndim != 2 or not np.isfinite(states).all():
        raise ConfigError(f"states must be a finite (N, nx) array, got shape {states.shape}")
    check_policy_env(expert, env_id)
    out: list[Trajectory] = []
    for start in range(0, len(states), batch_size):
        chunk = states[start:start + batch_size]
        out.extend(_collect_batch(expert, env_id, len(chunk), start, max_steps, init_states=chunk))
    return out


def _collect_batch(expert: Any, env_id: str, n: int, seed: int, max_steps: int,
                   init_states: np.ndarray | None = None) -> list[Trajectory]:
    from deqmpc_gym.envs import make_batched_env

    env = make_batched_env(env_id, n, seed=seed, max_episode_steps=max_steps)
    system = env.system
    try:
        obs, _ = env.reset(seed=seed, options=None if init_states is None else {"state": init_states})
        states = [env.state.cpu().numpy().copy()]
        acts, ctrls, rews = [], [], []
        alive = np.ones(n, bool)
        length = np.full(n, max_steps)
        terminal = np.zeros(n, bool)
        starts = np.ones(n, bool)
        for t in range(max_steps):
            a, _ = expert.predict(obs, state=None, episode_start=starts, deterministic=True)
            a = np.clip(np.asarray(a, dtype=np.float32), -1.0, 1.0)
            x_prev = env.state.cpu().numpy().copy()
            r = env.step_arrays(a)
            u = env.to_physical(a)
            x_next = system.wrap(system.step(x_prev, u))
            states.append(x_next)
            acts.append(a)
            ctrls.append(u)
            rews.append(r.reward.cpu().numpy())
            done = r.done.cpu().numpy() & alive
            term = r.terminated.cpu().numpy() & alive
            length[done] = t + 1
            terminal |= term
            alive &= ~done
            obs = r.obs.cpu().numpy()
            starts = np.zeros(n, bool)
            if not alive.any():
                break
    finally:
        env.close()
    S, A, U, R = np.stack(states, 1), np.stack(acts, 1), np.stack(ctrls, 1), np.stack(rews, 1)
    out = []
    for i in range(n):
        L = int(length[i])
        if not np.isfinite(S[i, : L + 1]).all():
            raise DatasetError(f"expert produced a non-finite state in episode seed {seed + i}")
        out.append(Trajectory(obs=S[i, : L + 1], acts=A[i, :L], rews=R[i, :L], terminal=bool(terminal[i]),
                              controls=U[i, :L]))
    return out


def default_dataset_path(env_id: str, cache_dir: str | Path | None = None, num_trajectories: int | None = None,
                         seed: int = 0, kind: str = "ppo") -> Path:
    """Cache location of a dataset of ``env_id`` collected by the shipped expert of ``kind``
    (``~/.cache/deqmpc_gym/datasets`` by default; e.g. ``QPoleObs-1000-s0-filtered.npz``)."""
    root = Path(cache_dir) if cache_dir is not None else Path.home() / ".cache" / "deqmpc_gym" / "datasets"
    n = _num_trajectories(env_id, num_trajectories)
    return root / f"{env_id.split('/')[-1]}-{n}-s{seed}{'' if kind == 'ppo' else '-' + kind}.npz"


def load_or_collect_dataset(env_id: str, num_trajectories: int | None = None, *, seed: int = 0,
                            cache_dir: str | Path | None = None, kind: str | None = None) -> ExpertDataset:
    """The dataset of ``env_id`` collected from a shipped expert: read from the cache, or collected
    (deterministically for ``seed``) and cached on first use. A cached file collected from another version of the
    expert (its ``expert_id``, see :func:`~deqmpc_gym.experts.loader.pretrained_expert_id`) is collected again
    and replaced.

    Args:
        num_trajectories: number of episodes (default: the paper's size for ``env_id``).
        cache_dir: cache directory (default ``~/.cache/deqmpc_gym/datasets``).
        kind: the shipped expert that collects it (default
            :func:`~deqmpc_gym.experts.loader.dataset_expert_kind`: ``"filtered"``, the PPO actor with the MPC
            safety filter, on ``DEQMPC/QuadrotorObs-v0`` and ``DEQMPC/QPoleObs-v0``; ``"ppo"`` elsewhere).

    Raises:
        ConfigError: no expert of ``kind`` ships for ``env_id`` (the message lists what ships).
    """
    from deqmpc_gym.experts.loader import dataset_expert_kind, load_expert, pretrained_expert_id

    kind = dataset_expert_kind(env_id) if kind is None else kind
    path = default_dataset_path(env_id, cache_dir, num_trajectories, seed, kind)
    expert_id = pretrained_expert_id(env_id, kind)
    if path.exists():
        cached = ExpertDataset.load(path, env_id=env_id)
        if cached.expert_id == expert_id:
            return cached
    ds = collect_dataset(load_expert(env_id, kind=kind), env_id, num_trajectories, seed=seed, expert_id=expert_id)
    ds.save(path)
    return ds
