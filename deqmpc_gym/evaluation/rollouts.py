"""Batched receding-horizon evaluation with normalized returns (D4RL convention).

All episodes run side by side in the natively batched env; the policy is called once per control step on
the whole batch (streaming warm start: cold solve at each episode's first step, then warm-started solves).
An episode that terminates early keeps its return so far (later rewards count as 0).

Normalized score (D4RL): ``score = (R - R_random) / (R_expert - R_random)``, with ``R_random`` and
``R_expert`` from the expert card of the env (``random_return`` and ``mean_return``).
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from deqmpc_gym._config import check_field_types
from deqmpc_gym.errors import ConfigError


@dataclass(frozen=True)
class EvalConfig:
    """Evaluation settings.

    Attributes:
        episodes: number of rollouts (paper: 200), all run as one batch.
        max_steps: steps per rollout (paper: 200).
        seed: seed of the initial states (episode ``i`` uses the env seeded with ``seed + i``).
        stream_iters: DEQ-MPC iterations per warm-started step (None: the policy's own ``stream_iters``;
            paper: 1, QPoleObs 2). For Diff-MPC the AL iterations are ``2 * stream_iters``.
    """

    episodes: int = 200
    max_steps: int = 200
    seed: int = 10_000
    stream_iters: int | None = None

    def __post_init__(self) -> None:
        check_field_types(self)
        if self.episodes < 1 or self.max_steps < 1:
            raise ConfigError(f"EvalConfig needs episodes >= 1 and max_steps >= 1, "
                              f"got {self.episodes}, {self.max_steps}")


@dataclass
class EvalResult:
    """Metrics of an evaluation (returns are sums of per-step rewards in (0, 1]).

    Attributes:
        returns: ``(episodes,)`` episode returns.
        mean_return, std_return: their mean and standard deviation.
        normalized_score: D4RL-normalized mean return (None without reference returns).
        success_rate: share of episodes whose last state satisfies the env's goal tolerance.
        cost_rate: share of steps with ``info["cost"] > 0`` (constraint violations).
        collision_rate: share of episodes that ended by a collision or leaving the flight volume.
        mean_solver_iters: mean Newton steps per control step and env (None for non-MPC policies).
        act_latency_ms: median wall time of one batched policy call [ms].
    """

    env_id: str
    returns: np.ndarray
    mean_return: float
    std_return: float
    normalized_score: float | None
    success_rate: float
    cost_rate: float
    collision_rate: float
    mean_solver_iters: float | None
    act_latency_ms: float
    episodes: int
    max_steps: int

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["returns"] = [float(r) for r in self.returns]
        return d


def normalized_score(mean_return: float, random_return: float, expert_return: float) -> float:
    """D4RL normalization ``(R - R_random) / (R_expert - R_random)``."""
    denom = expert_return - random_return
    if not np.isfinite(denom) or abs(denom) < 1e-9:
        raise ConfigError(f"expert return {expert_return} and random return {random_return} are too close to normalize")
    return float((mean_return - random_return) / denom)


def protocol_stream_iters(env_id: str) -> int:
    """Warm DEQ-MPC iterations per control step with which the run records and the shipped cards evaluate
    ``env_id``: 2 on QPoleObs (the paper's setting there), 1 elsewhere."""
    return 2 if env_id.split("/")[-1].startswith("QPoleObs") else 1


def set_stream_iters(policy: Any, k: int | None) -> Any:
    """Set a DEQMPCPolicy's warm-started iterations per control step to ``k`` (DEQ-MPC: ``k`` iterations,
    Diff-MPC: ``2 k`` AL iterations); returns the previous config to restore, or None when nothing changed."""
    if k is None or not hasattr(policy, "config") or not hasattr(policy, "layer"):
        return None
    old = policy.config
    # the layer restarts the penalty so that the last of the K * m warm AL iterations runs at rho_max
    new = old.replace(stream_iters=k, stream_al_iters=2 * k)
    policy.config = new
    policy.layer.config = new
    return old


def check_policy_env(policy: Any, env_id: str) -> None:
    """Raise :class:`ConfigError` naming both ids when ``policy`` (a DEQ-MPC policy or an expert, anything with
    an ``env_id``) was made for another env than ``env_id``; policies without an env id are not checked."""
    own = getattr(policy, "env_id", None)
    if isinstance(own, str) and own != env_id:
        raise ConfigError(f"the {type(policy).__name__} was made for {own!r} and cannot act on {env_id!r}; use a "
                          f"policy or expert of {env_id!r}")


def rollout_batched(policy: Any, env_id: str, config: EvalConfig = EvalConfig(), *,
                    env_kwargs: dict[str, Any] | None = None, reference: tuple[float, float] | None = None,
                    device: str = "cpu") -> EvalResult:
    """Evaluate ``policy`` (anything with SB3's ``predict``) on ``config.episodes`` batched rollouts.

    Args:
        policy: a :class:`~deqmpc_gym.policies.DEQMPCPolicy`, a loaded expert, or any ``PolicyPredictor``.
        env_id: registered env id.
        reference: ``(random_return, expert_return)`` for the normalized score, or None.

    Returns:
        :class:`EvalResult`.
    """
    from deqmpc_gym.envs import make_batched_env

    check_policy_env(policy, env_id)
    n, steps = config.episodes, config.max_steps
    env = make_batched_env(env_id, n, seed=config.seed, device=device, max_episode_steps=steps,
                           **(env_kwargs or {}))
    old_cfg = set_stream_iters(policy, config.stream_iters)
    try:
        obs, _ = env.reset(seed=config.seed)
        alive = np.ones(n, bool)
        returns = np.zeros(n)
        success = np.zeros(n, bool)
        crashed = np.zeros(n, bool)
        cost_steps, iters, latencies, state = 0.0, [], [], None
        starts = np.ones(n, bool)
        for _ in range(steps):
            t = time.perf_counter()
            actions, state = policy.predict(obs, state=state, episode_start=starts, deterministic=True)
            latencies.append(time.perf_counter() - t)
            out = getattr(policy, "last_output", None)
            if out is not None and getattr(out, "solver_iters", None) is not None:
                iters.append(float(out.solver_iters.float().mean()))
            r = env.step_arrays(np.asarray(actions, dtype=np.float32))
            reward, terminated = r.reward.cpu().numpy(), r.terminated.cpu().numpy()
            done = r.done.cpu().numpy()
            obs = r.obs.cpu().numpy()
            returns += np.where(alive, reward, 0.0)
            cost_steps += float(np.sum(alive & (r.cost.cpu().numpy() > 0)))
            success = np.where(alive, r.is_success.cpu().numpy(), success)
            crashed |= alive & terminated
            starts = np.zeros(n, bool)
            alive &= ~done
            if not alive.any():
                break
    finally:
        if old_cfg is not None:
            policy.config = old_cfg
            policy.layer.config = old_cfg
        env.close()
    mean_r = float(returns.mean())
    score = normalized_score(mean_r, *reference) if reference is not None else None
    return EvalResult(env_id=env_id, returns=returns, mean_return=mean_r, std_return=float(returns.std()),
                      normalized_score=score, success_rate=float(success.mean()), cost_rate=cost_steps / (n * steps),
                      collision_rate=float(crashed.mean()), mean_solver_iters=float(np.mean(iters)) if iters else None,
                      act_latency_ms=float(np.median(latencies) * 1e3), episodes=n, max_steps=steps)
