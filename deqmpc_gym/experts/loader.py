"""Loading an expert: :class:`Expert` (a trained PPO actor with its observation normalization; ``predict`` takes
raw observations) from a folder holding ``actor.pt`` + ``card.json`` or from the experts shipped with the package
(:func:`load_expert`), without a PPO model or its training env; and the safety-filtered expert
(:class:`~deqmpc_gym.experts.filtered.FilteredExpert`, ``kind="filtered"``) shipped for the obstacle tasks."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from deqmpc_gym.errors import CheckpointError, ConfigError, ShapeError
from deqmpc_gym.experts.features import with_features

PRETRAINED_DIR = Path(__file__).resolve().parent / "pretrained"
CARD_FORMAT = "deqmpc_gym.expert"
#: the kinds of shipped experts: ``"ppo"`` (the PPO actor, in ``pretrained/<Env>/``) and ``"filtered"`` (the PPO
#: actor with the MPC safety filter, in ``pretrained/<Env>/filtered/``)
EXPERT_KINDS: tuple[str, ...] = ("ppo", "filtered")
#: the kind of expert whose demonstrations (and reference return) an env's datasets use; ``"ppo"`` elsewhere
DATASET_EXPERT_KIND: dict[str, str] = {"DEQMPC/QuadrotorObs-v0": "filtered", "DEQMPC/QPoleObs-v0": "filtered"}


def dataset_expert_kind(env_id: str) -> str:
    """The kind of shipped expert that collects the datasets of ``env_id`` and whose return normalizes its
    scores: ``"filtered"`` on the obstacle tasks, ``"ppo"`` elsewhere."""
    return DATASET_EXPERT_KIND.get(env_id, "ppo")


def shipped_experts() -> dict[str, tuple[str, ...]]:
    """``{env_id: kinds}`` of the experts shipped with the package (e.g. ``{"DEQMPC/QPoleObs-v0": ("ppo",
    "filtered"), ...}``)."""
    out: dict[str, tuple[str, ...]] = {}
    for d in sorted(PRETRAINED_DIR.iterdir()) if PRETRAINED_DIR.is_dir() else ():
        if (d / "card.json").is_file():
            out[f"DEQMPC/{d.name}"] = tuple(k for k in EXPERT_KINDS if (_kind_dir(d, k) / "card.json").is_file())
    return out


def _kind_dir(env_dir: Path, kind: str) -> Path:
    return env_dir if kind == "ppo" else env_dir / kind


def _check_kind(env_id: str, kind: str) -> None:
    """Raise :class:`ConfigError` listing what ships unless an expert of ``kind`` ships for ``env_id``."""
    ships = shipped_experts()
    if kind in ships.get(env_id, ()):
        return
    listing = "; ".join(f"{e}: {', '.join(k)}" for e, k in ships.items())
    what = f"unknown expert kind {kind!r} (kinds: {list(EXPERT_KINDS)})" if kind not in EXPERT_KINDS else \
        f"no {kind!r} expert ships for {env_id!r}"
    raise ConfigError(f"{what}; shipped experts: {listing}")


def pretrained_dir(env_id: str, kind: str = "ppo") -> Path:
    """Directory of the shipped expert of ``env_id`` and ``kind`` (e.g. ``.../pretrained/QPole-v0``,
    ``.../pretrained/QPoleObs-v0/filtered``)."""
    return _kind_dir(PRETRAINED_DIR / env_id.split("/")[-1], kind)


def _digest(path: Path) -> str:
    """First 12 hex digits of the SHA-256 of the files that define the expert at ``path``: ``actor.pt`` and
    ``card.json``; a filtered expert adds its own ``card.json`` to those of the PPO expert it wraps."""
    card = json.loads((path / "card.json").read_text())
    if isinstance(card, dict) and card.get("format") == _filtered_format():
        return hashlib.sha256(_digest(path / str(card.get("base", ".."))).encode()
                              + (path / "card.json").read_bytes()).hexdigest()[:12]
    return hashlib.sha256((path / "actor.pt").read_bytes() + (path / "card.json").read_bytes()).hexdigest()[:12]


def _filtered_format() -> str:
    from deqmpc_gym.experts.filtered import FILTERED_CARD_FORMAT

    return FILTERED_CARD_FORMAT


def pretrained_expert_id(env_id: str, kind: str = "ppo") -> str:
    """``"pretrained:<env_id>@<hash>"`` (``kind="ppo"``) or ``"pretrained:<env_id>:<kind>@<hash>"``: names the
    shipped expert of ``env_id`` and ``kind`` and its version (the first 12 hex digits of the SHA-256 of its
    ``actor.pt`` and ``card.json``, and for a filtered expert of its own card), recorded in the datasets collected
    from it and in the run records normalized by it.

    Raises:
        ConfigError: no expert of ``kind`` ships for ``env_id`` (the message lists what ships).
        CheckpointError: its files cannot be read.
    """
    if kind != "ppo":
        _check_kind(env_id, kind)
    d = pretrained_dir(env_id, kind)
    try:
        digest = _digest(d)
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"no shipped {kind} expert for {env_id!r} at {d} ({exc})") from exc
    return f"pretrained:{env_id}@{digest}" if kind == "ppo" else f"pretrained:{env_id}:{kind}@{digest}"


class Expert:
    """A trained PPO actor with its observation normalization; ``predict`` takes raw observations.

    Attributes:
        card: the expert card (dict) loaded from ``card.json``.
        env_id: the env the expert was trained on.
        kind: ``"ppo"``.
        expert_id: the id recorded in the datasets it collects (:func:`pretrained_expert_id` for a shipped
            expert, ``"<folder>@<hash>"`` for one loaded from a folder, ``""`` for one built in code).
    """

    kind = "ppo"

    def __init__(self, policy: Any, card: dict[str, Any]) -> None:
        self.policy = policy
        self.expert_id: str = ""
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


def load_expert(source: str | Path, env_id: str | None = None, kind: str | None = None) -> Any:
    """Load an expert from a directory holding its ``card.json`` (a PPO expert: and ``actor.pt``), or from a
    registered env id (the expert of ``kind`` shipped with the package).

    Args:
        source: the expert's directory or a registered env id.
        env_id: the env the expert will act on; the card's env id must equal it. Without it the card's env id
            must be a registered ``DEQMPC/*`` id (:class:`~deqmpc_gym.errors.UntrustedEnvIdError` otherwise).
        kind: ``"ppo"`` (the default for an env id) or ``"filtered"`` (the PPO actor with the MPC safety filter,
            shipped for ``DEQMPC/QuadrotorObs-v0`` and ``DEQMPC/QPoleObs-v0``); for a directory, None takes the
            kind its card names and another kind is refused.

    Returns:
        An :class:`Expert` (``kind="ppo"``) or a :class:`~deqmpc_gym.experts.filtered.FilteredExpert`; both have
        ``predict(obs)`` on raw observations, ``card``, ``env_id``, ``kind`` and ``expert_id``.

    Raises:
        ConfigError: an unknown ``kind``, or none of that kind ships for the env id (the message lists what
            ships), or a directory of another kind.
        CheckpointError: no, a damaged, or another env's expert at ``source``; a filtered card measured around
            another PPO actor than the one it names.
    """
    if kind is not None and kind not in EXPERT_KINDS:
        _check_kind(str(env_id or source), kind)
    path = Path(source)
    shipped = not (path / "card.json").exists() and isinstance(source, str) and "/" in source and not path.exists()
    if shipped:
        if (kind or "ppo") != "ppo":
            _check_kind(str(source), str(kind))
        path = pretrained_dir(str(source), kind or "ppo")
    card_file = path / "card.json"
    if not card_file.exists():
        raise CheckpointError(f"no expert at {path} (need card.json and actor.pt); train one with "
                              "`deqmpc-gym expert train --env ENV_ID --out DIR`")
    try:
        card = json.loads(card_file.read_text())
    except Exception as exc:
        raise CheckpointError(f"cannot read expert at {path} ({type(exc).__name__}: {exc})") from exc
    found = "filtered" if isinstance(card, dict) and card.get("format") == _filtered_format() else "ppo"
    if kind is not None and kind != found:
        raise ConfigError(f"the expert at {path} is a {found!r} expert, not {kind!r}")
    expert = _load_filtered(path, card, env_id) if found == "filtered" else _load_ppo(path, card, env_id)
    expert.expert_id = pretrained_expert_id(str(source), found) if shipped else f"{path}@{_digest(path)}"
    return expert


def _load_ppo(path: Path, card: Any, env_id: str | None) -> Expert:
    card_file, actor_file = path / "card.json", path / "actor.pt"
    if not actor_file.exists():
        raise CheckpointError(f"no expert at {path} (need card.json and actor.pt); train one with "
                              "`deqmpc-gym expert train --env ENV_ID --out DIR`")
    try:
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


def _load_filtered(path: Path, card: dict[str, Any], env_id: str | None) -> Any:
    """The filtered expert whose card is at ``path``: the PPO expert of ``card["base"]`` (a folder relative to
    ``path``) with the card's filter settings; the PPO expert must be the one the card was measured with."""
    from deqmpc_gym._config import config_from_dict
    from deqmpc_gym.experts.filtered import FilterConfig, FilteredExpert

    card_file = path / "card.json"
    _check_card_env(card, card_file, env_id)
    base_dir = path / str(card.get("base", ".."))
    base = load_expert(base_dir, env_id=card["env_id"], kind="ppo")
    want = str(card.get("base_expert_id", ""))
    got = _digest(base_dir)
    if want.rsplit("@", 1)[-1] != got:
        raise CheckpointError(f"{card_file} was measured around another PPO expert ({want!r}) than the one at "
                              f"{base_dir.resolve()} (version {got}); measure it again with `deqmpc-gym expert filter "
                              f"--env {card['env_id']} --out {path}`")
    try:
        config = config_from_dict(FilterConfig, dict(card["filter"]))
    except (KeyError, TypeError) as exc:
        raise CheckpointError(f"{card_file} holds no valid filter settings ({exc})") from exc
    return FilteredExpert(base, config, card)


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

