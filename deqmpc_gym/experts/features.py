"""Obstacle features of a PPO expert's input: the offsets from the vehicle to the nearest obstacle centres.

An obstacle env observes only the state; an expert with ``obstacle_features = k`` sees the observation followed
by the offsets ``(3 k)`` [m] to the ``k`` nearest obstacles (:func:`obstacle_features`). The card records the
obstacles (:func:`feature_spec`) so that a loaded expert computes the features itself (:func:`with_features`).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from deqmpc_gym.errors import ConfigError


def obstacle_features(obs: np.ndarray, centers: np.ndarray, position_slice: tuple[int, int], k: int) -> np.ndarray:
    """Offsets ``(n, 3 k)`` [m] from the position ``obs[:, a:b]`` to the ``k`` nearest of ``centers (K, 3)``,
    nearest first (``obs: (n, obs_dim)``; ``k <= K``)."""
    a, b = position_slice
    diff = np.asarray(centers, dtype=np.float64)[None] - np.asarray(obs, dtype=np.float64)[:, None, a:b]
    nearest = np.argsort((diff * diff).sum(-1), axis=1, kind="stable")[:, :k]
    return np.take_along_axis(diff, nearest[..., None], axis=1).reshape(obs.shape[0], 3 * k)


def feature_spec(env: Any, k: int) -> dict[str, Any] | None:
    """The card entry describing the policy's obstacle features on ``env`` (a batched env), or None for ``k = 0``.

    Raises:
        ConfigError: ``env`` has fewer than ``k`` obstacles (or none)."""
    if k == 0:
        return None
    centers = np.asarray(env.obstacle_centers, dtype=np.float64)
    if centers.shape[0] < k or env.system.position_slice is None:
        raise ConfigError(f"obstacle_features = {k} needs an env with at least {k} obstacles (e.g. "
                          f"DEQMPC/QuadrotorObs-v0); this one has {centers.shape[0]}")
    return {"k": int(k), "position_slice": list(env.system.position_slice), "centers": centers.tolist()}


def with_features(obs: np.ndarray, spec: dict[str, Any] | None) -> np.ndarray:
    """``obs (n, obs_dim)`` followed by the obstacle features ``(n, 3 k)`` of ``spec`` (unchanged without a
    spec)."""
    if spec is None:
        return obs
    feats = obstacle_features(obs, np.asarray(spec["centers"]), tuple(spec["position_slice"]), int(spec["k"]))
    return np.concatenate([obs, feats.astype(obs.dtype, copy=False)], axis=-1)
