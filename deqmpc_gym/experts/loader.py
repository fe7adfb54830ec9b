"""Loading a PPO expert: :class:`Expert` (a trained actor with its observation normalization; ``predict`` takes
raw observations) from a folder holding ``actor.pt`` + ``card.json`` or the expert shipped with the package
(:func:`load_expert`), without a PPO model or its training env."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from deqmpc_gym.errors import CheckpointError, ShapeError
from deqmpc_gym.experts.features import with_features

PRETRAINED_DIR = Path(__file__).resolve().parent / "pretrained"
CARD_FORMAT = "deqmpc_gym.expert"


def pretrained_dir(env_id: str) -> Path:
    """Directory of the shipped expert of ``env_id`` (e.g. ``.../pretrained/QPole-v0``)."""
    return PRETRAINED_DIR / env_id.split("/")[-1]



def pretrained_expert_id(env_id: str) -> str:
    """``"pretrained:<env_id>@<hash>"``: names the shipped expert of ``env_id`` and its version (the first 12 hex
    digits of the SHA-256 of its ``actor.pt`` and ``card.json``), recorded in the datasets collected from it."""
    import hashlib

    d = pretrained_dir(env_id)
    try:
        digest = hashlib.sha256((d / "actor.pt").read_bytes() + (d / "card.json").read_bytes()).hexdigest()[:12]
    except OSError as exc:
        raise CheckpointError(f"no shipped expert for {env_id!r} at {d} ({exc})") from exc
    return f"pretrained:{env_id}@{digest}"



class Expert:
    """A trained PPO actor with its observation normalization; ``predict`` takes raw observations.

    Attributes:
        card: the expert card (dict) loaded from ``card.json``.
        env_id: the env the expert was trained on.
    """

    def __init__(self, policy: Any, card: dict[str, Any]) -> None:
        self.policy = policy
        self.card = card
        self.env_id: str = card["env_id"]
        norm = card["obs_norm"]
        self._mean = np.asarray(norm["mean"], dtype=np.float64)
        self._var = np.asarray(norm["var"], dtype=np.float64)
        self._clip = float(norm["clip_obs"])
        self._eps = float(norm["epsilon"])
        self._features: dict[str, Any] | None = card.get("obstacle_features")
        #: dimension of the raw observations ``predict`` takes
        self.obs_dim: int = self._mean.shape[0] - (3 * int(self._features["k"]) if self._features else 0)

    def inputs(self, obs: np.ndarray) -> np.ndarray:
        """The actor's inputs ``(n, d)`` float32 for raw observations ``obs: (n, obs_dim)``: the obstacle
        features appended (if any), then normalized."""
        return self.normalize(with_features(np.asarray(obs, dtype=np.float64), self._features))

    def normalize(self, obs: np.ndarray) -> np.ndarray:
        """``clip((obs - mean) / sqrt(var + eps), -clip_obs, clip_obs)`` as float32."""
        with np.errstate(over="ignore"):  # a huge (finite) state saturates at the clip like any other outlier
            z = (obs - self._mean) / np.sqrt(self._var + self._eps)
        return np.clip(z, -self._clip, self._clip).astype(np.float32)

    def predict(self, observation: Any, state: Any = None, episode_start: Any = None,
                deterministic: bool = True) -> tuple[np.ndarray, Any]:
        """SB3 ``PolicyPredictor``: raw ``(n, obs_dim)`` or ``(obs_dim,)`` observations -> normalized actions."""
        obs = np.asarray(observation, dtype=np.float64)
        if obs.ndim not in (1, 2) or obs.shape[-1] != self.obs_dim:
            raise ShapeError(f"observation must have shape ({self.obs_dim},) or (n, {self.obs_dim}), got {obs.shape}")
        if not np.all(np.isfinite(obs)):
            bad = np.flatnonzero(~np.all(np.isfinite(obs.reshape(-1, self.obs_dim)), axis=1)).tolist()
            raise ShapeError(f"observation has non-finite values in rows {bad[:10]}; an expert acts on finite "
                             "states only")
        single = obs.ndim == 1
        inputs = self.inputs(obs[None] if single else obs)
        actions, _ = self.policy.predict(inputs[0] if single else inputs, deterministic=deterministic)
        return np.clip(actions, -1.0, 1.0).astype(np.float32), state


def _build_actor(card: dict[str, Any]) -> Any:
    import gymnasium as gym
    from stable_baselines3.common.policies import ActorCriticPolicy

    obs_dim, act_dim = int(card["obs_dim"]), int(card["act_dim"])
    obs_space = gym.spaces.Box(-np.inf, np.inf, (obs_dim,), np.float32)
    act_space = gym.spaces.Box(-1.0, 1.0, (act_dim,), np.float32)
    arch = list(card["net_arch"])
    return ActorCriticPolicy(obs_space, act_space, lambda _: 0.0, net_arch=dict(pi=arch, vf=arch),
                             activation_fn=torch.nn.Tanh, log_std_init=float(card.get("log_std_init", 0.0)))


def load_expert(source: str | Path, env_id: str | None = None) -> Expert:
    """Load an expert from a directory holding ``actor.pt`` + ``card.json``, or from a registered env id
    (the expert shipped with the package).

    Args:
        source: the expert's directory or a registered env id.
        env_id: the env the expert will act on; the card's env id must equal it. Without it the card's env id
            must be a registered ``DEQMPC/*`` id (:class:`~deqmpc_gym.errors.UntrustedEnvIdError` otherwise).

    Raises:
        CheckpointError: no, a damaged, or another env's expert at ``source``.
    """
    path = Path(source)
    if not (path / "card.json").exists() and isinstance(source, str) and "/" in source and not path.exists():
        path = pretrained_dir(source)
    card_file, actor_file = path / "card.json", path / "actor.pt"
    if not card_file.exists() or not actor_file.exists():
        raise CheckpointError(f"no expert at {path} (need card.json and actor.pt); train one with "
                              "`deqmpc-gym expert train --env ENV_ID --out DIR`")
    try:
        card = json.loads(card_file.read_text())
        state = torch.load(actor_file, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CheckpointError(f"cannot read expert at {path} ({type(exc).__name__}: {exc})") from exc
    if not isinstance(card, dict) or card.get("format") != CARD_FORMAT:
        got = card.get("format") if isinstance(card, dict) else type(card).__name__
        raise CheckpointError(f"{card_file} is not a deqmpc_gym expert card (format {got!r})")
    _check_card_env(card, card_file, env_id)
    try:
        policy = _build_actor(card)
        policy.load_state_dict(state)
        expert = Expert(policy, card)
    except (RuntimeError, KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"expert at {path} is damaged: its weights or card do not fit "
                              f"({type(exc).__name__}: {exc})") from exc
    policy.set_training_mode(False)
    return expert


def _check_card_env(card: dict[str, Any], card_file: Path, env_id: str | None) -> None:
    """The card's env id must be ``env_id`` (if given) and a registered ``DEQMPC/*`` id (or ``env_id``)."""
    from deqmpc_gym.envs.registration import check_env_id_from_file

    stored = card.get("env_id")
    if env_id is not None and stored != env_id:
        raise CheckpointError(f"the expert at {card_file.parent} was trained on {stored!r}, not {env_id!r}; use an "
                              f"expert of {env_id!r}")
    check_env_id_from_file(stored, f"expert card {card_file}", explicit=env_id)


def loaded_actor(card: dict[str, Any], state_dict: dict[str, torch.Tensor]) -> Any:
    """The SB3 actor of ``card`` with the weights ``state_dict``, in evaluation mode."""
    actor = _build_actor(card)
    actor.load_state_dict(state_dict)
    actor.set_training_mode(False)
    return actor

