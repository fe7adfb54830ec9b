"""PPO experts (stable-baselines3) trained on the natively batched envs, and a dependency-light loader.

Training runs PPO with ``VecNormalize`` on :func:`deqmpc_gym.envs.make_sb3_vec_env` in slices of
``slice_steps`` environment steps; after every slice the model, the optimizer and the normalization
statistics are checkpointed atomically to ``out_dir/checkpoint/``, so an interrupted run resumes where it
stopped (``resume=True``). The finished expert is exported as

* ``actor.pt``: the ``ActorCriticPolicy`` state dict (loadable with ``torch.load(weights_only=True)``),
* ``card.json``: architecture, observation-normalization statistics, training budget and the measured
  quality (200 evaluation episodes): ``mean_return``, ``std_return``, ``success_rate``, ``collision_rate``,
  ``random_return`` (a uniformly random policy over the same episodes).

:func:`load_expert` rebuilds the policy from those two files; its ``predict`` takes raw observations.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from deqmpc_gym._config import config_from_dict, require_at_least_one
from deqmpc_gym.errors import CheckpointError, ConfigError, ShapeError
from deqmpc_gym.experts.teacher import TeacherConfig, refine_with_teacher
from deqmpc_gym.io import atomic_write, atomic_write_text

PRETRAINED_DIR = Path(__file__).resolve().parent / "pretrained"
CARD_FORMAT = "deqmpc_gym.expert"


def check_radius(name: str, value: float | None) -> None:
    """Raise :class:`ConfigError` unless ``value`` is ``None`` or a positive finite radius [m]."""
    if value is not None and not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0.0):
        raise ConfigError(f"{name} must be a positive finite radius in metres or None, got {value!r}")


@dataclass(frozen=True)
class FinetunePhase:
    """Settings that take over from the first checkpoint at or after ``start_step`` env steps (a later phase of
    the same PPO run, e.g. a narrower goal bonus once the policy has found the goal region). Phases apply in
    order; a later phase's settings add to (and override) the earlier ones'.

    Attributes:
        start_step: env steps after which the phase starts (>= 1).
        goal_bonus, goal_bonus_width: replace :class:`ExpertConfig`'s (``None``: keep).
        learning_rate: replaces the PPO learning rate (``None``: keep).
        log_std: the policy's log standard deviation is reset to this value once, when the phase starts
            (``None``: keep); restores exploration that has collapsed.
        freeze_normalization: stop updating the ``VecNormalize`` observation and return statistics, so that the
            policy's inputs keep their meaning while it moves.
        collision_penalty: replaces :class:`ExpertConfig`'s (``None``: keep).
        obstacle_radius: replaces :class:`ExpertConfig`'s ``train_obstacle_radius`` [m] (``None``: keep): a
            curriculum step of the training env's obstacle size.
        clearance_penalty: replaces :class:`ExpertConfig`'s (``None``: keep).
        obstacle_features: ``k`` (obstacle variants; ``None``: keep): from this phase on the policy's input also
            holds the offsets to the ``k`` nearest obstacles (as :attr:`ExpertConfig.obstacle_features`). Their
            input weights start at zero and their normalization statistics at mean 0, variance 1 m^2, so the
            policy and value function are unchanged at the switch; PPO then learns to use them. This teaches a
            policy that already balances and reaches the goal where the obstacles are, instead of training with
            the offsets from scratch.
    """

    start_step: int
    goal_bonus: float | None = None
    goal_bonus_width: float | None = None
    learning_rate: float | None = None
    log_std: float | None = None
    freeze_normalization: bool = False
    collision_penalty: float | None = None
    obstacle_radius: float | None = None
    clearance_penalty: float | None = None
    obstacle_features: int | None = None

    def __post_init__(self) -> None:
        require_at_least_one(self, ("start_step",))
        check_radius("FinetunePhase.obstacle_radius", self.obstacle_radius)
        k = self.obstacle_features
        if k is not None and (isinstance(k, bool) or not isinstance(k, int) or k < 1):
            raise ConfigError(f"FinetunePhase.obstacle_features must be an int >= 1 or None, got {k!r}")
        for name in ("goal_bonus", "learning_rate", "collision_penalty", "clearance_penalty"):
            v = getattr(self, name)
            if v is not None and not v >= 0.0:
                raise ConfigError(f"FinetunePhase.{name} must be >= 0, got {v!r}")
        if self.goal_bonus_width is not None and not self.goal_bonus_width > 0.0:
            raise ConfigError(f"FinetunePhase.goal_bonus_width must be > 0, got {self.goal_bonus_width!r}")


@dataclass(frozen=True)
class ExpertConfig:
    """PPO expert settings (per-env defaults in :data:`EXPERT_DEFAULTS`).

    Attributes:
        env_id: registered env id.
        total_steps: environment steps of PPO training.
        n_envs: batched envs per rollout.
        n_steps: rollout length per env and update.
        batch_size, n_epochs, learning_rate, gamma, gae_lambda, clip_range, ent_coef: PPO hyperparameters.
        net_arch: hidden sizes of the policy and value MLPs.
        log_std_init: initial log standard deviation of the Gaussian policy.
        seed: seed of PPO and the envs.
        slice_steps: checkpoint every this many env steps.
        eval_episodes: episodes of the final quality measurement (the card).
        goal_bonus, goal_bonus_width: training-only reward shaping: PPO sees
            ``reward + goal_bonus * exp(-0.5 * sum_i ((x_i - g_i) / (goal_bonus_width * tol_i))**2)`` with the
            env's goal ``g`` and success tolerance ``tol`` (the exported card and every evaluation use the env's
            own reward). The env's Gaussian reward is nearly flat near the goal, so without the bonus PPO can
            settle into a small oscillation around the goal (Cartpole) or a hover away from it (QPole) that
            misses the success tolerance; a width of a few tolerances gives the bonus a wider basin.
        collision_penalty: training-only shaping: PPO sees ``reward - collision_penalty`` on a step that ends its
            episode with ``info["cost"] == 1`` (an obstacle collision or a state-envelope exit). Termination alone
            only forfeits the remaining reward, which is small while the vehicle is still far from the goal.
        clearance_penalty, clearance_margin: training-only shaping for the obstacle variants: PPO sees
            ``reward - clearance_penalty * clip(1 - d / clearance_margin, 0, 1)`` with ``d`` the step's
            ``info["min_obstacle_distance"]`` [m] (signed clearance to the nearest sphere): a dense signal that
            grows from 0 at ``clearance_margin`` to ``clearance_penalty`` at contact.
        obstacle_features: ``k``; for the obstacle variants, the policy's input is the observation followed by the
            offsets ``(3 k)`` [m] from the vehicle's position to the ``k`` nearest obstacle centres (nearest first;
            :func:`obstacle_features`). The env observes only the state, so without them the policy must learn
            where 40 fixed spheres are from the state alone. 0: the observation only. The loaded
            :class:`Expert` computes them itself (its ``predict`` still takes raw observations).
        train_obstacle_radius: training-only, obstacle variants: the radius [m] of the spheres in PPO's training env
            (``None``: the env's own, 0.5 m). A larger radius is a safety margin: PPO learns to keep clear of
            spheres larger than the ones it is evaluated on (the card and every evaluation use the env's own).
        finetune: an optional :class:`FinetunePhase`, or a sequence of them with increasing ``start_step`` (dicts
            are converted); a phase may be added to or changed in a checkpoint whose training has not reached its
            ``start_step`` yet. :attr:`phases` is the sequence in either case.
        teacher: an optional :class:`~deqmpc_gym.experts.teacher.TeacherConfig` (a dict is converted; obstacle
            variants only): after PPO, an obstacle-aware MPC safety filter around the PPO expert is distilled into
            its actor by DAgger (:func:`~deqmpc_gym.experts.teacher.refine_with_teacher`); the card records the
            PPO-only figures under ``ppo_only`` and the rounds under ``teacher``. It may be added to a finished
            checkpoint.
    """

    env_id: str
    total_steps: int = 2_000_000
    n_envs: int = 64
    n_steps: int = 128
    batch_size: int = 2048
    n_epochs: int = 10
    learning_rate: float = 3e-4
    gamma: float = 0.99
    gae_lambda: float = 0.95
    clip_range: float = 0.2
    ent_coef: float = 0.0
    net_arch: tuple[int, ...] = (128, 128)
    log_std_init: float = -0.5
    seed: int = 0
    slice_steps: int = 250_000
    eval_episodes: int = 200
    goal_bonus: float = 0.0
    goal_bonus_width: float = 1.0
    collision_penalty: float = 0.0
    clearance_penalty: float = 0.0
    clearance_margin: float = 0.5
    obstacle_features: int = 0
    train_obstacle_radius: float | None = None
    finetune: FinetunePhase | tuple[FinetunePhase, ...] | None = None
    teacher: TeacherConfig | None = None

    def __post_init__(self) -> None:
        def phase(p: Any) -> FinetunePhase:
            p = config_from_dict(FinetunePhase, p) if isinstance(p, dict) else p
            if not isinstance(p, FinetunePhase):
                raise ConfigError(f"ExpertConfig.finetune must be a FinetunePhase, a dict or a sequence of them, "
                                  f"got {self.finetune!r}")
            return p

        if isinstance(self.finetune, (list, tuple)):
            object.__setattr__(self, "finetune", tuple(phase(p) for p in self.finetune) or None)
        elif self.finetune is not None:
            object.__setattr__(self, "finetune", phase(self.finetune))
        starts = [p.start_step for p in self.phases]
        if any(b <= a for a, b in zip(starts, starts[1:])):
            raise ConfigError(f"ExpertConfig.finetune phases need increasing start_step, got {starts}")
        feature_phases = [p.obstacle_features for p in self.phases if p.obstacle_features is not None]
        if feature_phases and (self.obstacle_features or len(feature_phases) > 1):
            raise ConfigError("obstacle features can be added once: either ExpertConfig.obstacle_features (from the "
                              f"start) or one FinetunePhase.obstacle_features, got {self.obstacle_features} and "
                              f"{feature_phases}")
        if isinstance(self.teacher, dict):
            object.__setattr__(self, "teacher", config_from_dict(TeacherConfig, self.teacher))
        if self.teacher is not None and not isinstance(self.teacher, TeacherConfig):
            raise ConfigError(f"ExpertConfig.teacher must be a TeacherConfig or dict, got {self.teacher!r}")
        obstacle_only = [name for name, set_ in (
            ("teacher", self.teacher is not None),
            ("train_obstacle_radius", self.train_obstacle_radius is not None),
            ("finetune.obstacle_radius", any(p.obstacle_radius is not None for p in self.phases)),
            ("finetune.obstacle_features", any(p.obstacle_features is not None for p in self.phases)))
            if set_]
        if obstacle_only:
            from deqmpc_gym.envs.registration import env_kwargs

            if not env_kwargs(self.env_id).get("obstacles", False):
                raise ConfigError(f"ExpertConfig.{', '.join(obstacle_only)} need(s) an obstacle variant (e.g. "
                                  f"DEQMPC/QuadrotorObs-v0); {self.env_id} has no obstacles")
        if not (self.goal_bonus >= 0.0 and self.goal_bonus_width > 0.0 and self.collision_penalty >= 0.0):
            raise ConfigError(f"ExpertConfig needs goal_bonus >= 0, goal_bonus_width > 0 and collision_penalty >= 0, "
                              f"got {self.goal_bonus}, {self.goal_bonus_width} and {self.collision_penalty}")
        require_at_least_one(self, ("total_steps", "n_envs", "n_steps", "batch_size", "n_epochs", "slice_steps",
                                    "eval_episodes"))
        if not (self.clearance_penalty >= 0.0 and self.clearance_margin > 0.0):
            raise ConfigError(f"ExpertConfig needs clearance_penalty >= 0 and clearance_margin > 0, got "
                              f"{self.clearance_penalty} and {self.clearance_margin}")
        if not (isinstance(self.obstacle_features, int) and self.obstacle_features >= 0):
            raise ConfigError(f"ExpertConfig.obstacle_features must be an int >= 0, got {self.obstacle_features!r}")
        check_radius("ExpertConfig.train_obstacle_radius", self.train_obstacle_radius)
        object.__setattr__(self, "net_arch", tuple(int(h) for h in self.net_arch))

    @property
    def phases(self) -> tuple[FinetunePhase, ...]:
        """The fine-tune phases in order (``()`` without :attr:`finetune`)."""
        if self.finetune is None:
            return ()
        return self.finetune if isinstance(self.finetune, tuple) else (self.finetune,)

    def features_after(self, n_phases: int) -> int:
        """Obstacle features ``k`` of the policy's input once the first ``n_phases`` phases have started."""
        added = [p.obstacle_features for p in self.phases[:n_phases] if p.obstacle_features is not None]
        return added[-1] if added else self.obstacle_features


#: Per-env overrides of :class:`ExpertConfig` (budgets measured on a 2-core CPU).
EXPERT_DEFAULTS: dict[str, dict[str, Any]] = {
    "DEQMPC/Pendulum-v0": {"total_steps": 1_000_000},
    "DEQMPC/Cartpole-v0": {"total_steps": 10_000_000, "goal_bonus": 1.0},
    "DEQMPC/Quadrotor-v0": {"total_steps": 5_000_000},
    # QPole (and QPoleObs): with the width-3 bonus PPO finds the goal region but hovers 0.66 m above it (0 % at 10 M
    # steps, exploration collapsed to sigma ~ 0.03); a phase with a 1-tolerance bonus, renewed exploration,
    # frozen observation statistics and a larger step size removes the offset (98 % / 88.5 % success at 14.5 M).
    "DEQMPC/QPole-v0": {"total_steps": 14_500_000, "net_arch": (256, 256), "goal_bonus": 1.0,
                        "goal_bonus_width": 3.0,
                        "finetune": FinetunePhase(start_step=10_000_000, goal_bonus=2.0, goal_bonus_width=1.0,
                                                  learning_rate=1e-3, log_std=-2.0, freeze_normalization=True)},
    # QuadrotorObs: PPO with the offsets to the 3 nearest obstacles in its input, then the MPC teacher (DAgger):
    # 93 % / 7 % (success / collisions) after PPO, 96 % / 4 % after the teacher.
    "DEQMPC/QuadrotorObs-v0": {"total_steps": 6_000_000, "obstacle_features": 3, "teacher": TeacherConfig()},
    # QPoleObs: the QPole recipe to 14.5 M steps (88.5 % / 11 %), then a phase that adds the offsets to the 3
    # nearest obstacles to the policy's input (zero weights: the policy is unchanged at the switch), renews
    # exploration and penalises collisions and clearance below 0.5 m (4 M steps).
    "DEQMPC/QPoleObs-v0": {"total_steps": 18_500_000, "net_arch": (256, 256), "goal_bonus": 1.0,
                           "goal_bonus_width": 3.0,
                           "finetune": (FinetunePhase(start_step=10_000_000, goal_bonus=2.0, goal_bonus_width=1.0,
                                                      learning_rate=1e-3, log_std=-2.0, freeze_normalization=True),
                                        FinetunePhase(start_step=14_500_000, obstacle_features=3, learning_rate=3e-4,
                                                      log_std=-1.0, collision_penalty=20.0, clearance_penalty=1.0))},
}


def default_expert_config(env_id: str, **overrides: Any) -> ExpertConfig:
    """:class:`ExpertConfig` with the per-env defaults and ``overrides`` applied."""
    return config_from_dict(ExpertConfig, {"env_id": env_id, **EXPERT_DEFAULTS.get(env_id, {}), **overrides})


def pretrained_dir(env_id: str) -> Path:
    """Directory of the shipped expert of ``env_id`` (e.g. ``.../pretrained/QPole-v0``)."""
    return PRETRAINED_DIR / env_id.split("/")[-1]


# ---------------------------------------------------------------------------------------------- features
def obstacle_features(obs: np.ndarray, centers: np.ndarray, position_slice: tuple[int, int], k: int) -> np.ndarray:
    """Offsets ``(n, 3 k)`` [m] from the position ``obs[:, a:b]`` to the ``k`` nearest of ``centers (K, 3)``,
    nearest first (``obs: (n, obs_dim)``; ``k <= K``)."""
    a, b = position_slice
    diff = np.asarray(centers, dtype=np.float64)[None] - np.asarray(obs, dtype=np.float64)[:, None, a:b]
    nearest = np.argsort((diff * diff).sum(-1), axis=1, kind="stable")[:, :k]
    return np.take_along_axis(diff, nearest[..., None], axis=1).reshape(obs.shape[0], 3 * k)


def _feature_spec(env: Any, k: int) -> dict[str, Any] | None:
    """The card entry describing the policy's obstacle features on ``env`` (a batched env), or None for ``k = 0``."""
    if k == 0:
        return None
    centers = np.asarray(env.obstacle_centers, dtype=np.float64)
    if centers.shape[0] < k or env.system.position_slice is None:
        raise ConfigError(f"obstacle_features = {k} needs an env with at least {k} obstacles (e.g. "
                          f"DEQMPC/QuadrotorObs-v0); this one has {centers.shape[0]}")
    return {"k": int(k), "position_slice": list(env.system.position_slice), "centers": centers.tolist()}


def _with_features(obs: np.ndarray, spec: dict[str, Any] | None) -> np.ndarray:
    """``obs (n, obs_dim)`` followed by the obstacle features of ``spec`` (unchanged without a spec)."""
    if spec is None:
        return obs
    feats = obstacle_features(obs, np.asarray(spec["centers"]), tuple(spec["position_slice"]), int(spec["k"]))
    return np.concatenate([obs, feats.astype(obs.dtype, copy=False)], axis=-1)


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


# ---------------------------------------------------------------------------------------------- loading
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
        return self.normalize(_with_features(np.asarray(obs, dtype=np.float64), self._features))

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


# ---------------------------------------------------------------------------------------------- training
@dataclass
class _Paths:
    root: Path
    ckpt: Path = field(init=False)

    def __post_init__(self) -> None:
        self.ckpt = self.root / "checkpoint"

    @property
    def model(self) -> Path:
        return self.ckpt / "model.zip"

    @property
    def norm(self) -> Path:
        return self.ckpt / "vecnormalize.pkl"

    @property
    def progress(self) -> Path:
        return self.ckpt / "progress.json"


def with_reward_shaping(venv: Any, bonus: float, width: float, collision_penalty: float = 0.0,
                        clearance_penalty: float = 0.0, clearance_margin: float = 0.5) -> Any:
    """Wrap an :class:`~deqmpc_gym.envs.SB3VecEnvAdapter` so that every step's reward gets
    ``+ bonus * exp(-0.5 * sum_i ((x_i - g_i) / (width * tol_i))**2) - collision_penalty * cost
    - clearance_penalty * clip(1 - d / clearance_margin, 0, 1)`` (``x``: the state the step reached -- the
    terminal observation for a finished sub-env --, ``g``/``tol``: the system's goal and success tolerance,
    ``cost``: the step's ``info["cost"]`` (1 on a collision or envelope exit) on a step that ends the episode,
    ``d``: the step's ``info["min_obstacle_distance"]``, obstacle variants only). Training only (see
    :class:`ExpertConfig`)."""
    from stable_baselines3.common.vec_env import VecEnvWrapper

    system = venv.env.system
    goal = np.asarray(system.goal, dtype=np.float64)
    tol = np.asarray(system.success_tolerance, dtype=np.float64)
    nx = goal.shape[0]

    class RewardShaping(VecEnvWrapper):
        def set_shaping(self, bonus: float, width: float, collision_penalty: float,
                        clearance_penalty: float | None = None) -> None:
            """Change the shaping (e.g. when a :class:`FinetunePhase` starts; ``clearance_penalty`` None: keep)."""
            self.bonus, self.width, self.scale = float(bonus), float(width), 1.0 / (float(width) * tol)
            self.collision_penalty = float(collision_penalty)
            if clearance_penalty is not None:
                self.clearance_penalty = float(clearance_penalty)

        def reset(self) -> np.ndarray:
            return self.venv.reset()

        def step_wait(self) -> Any:
            obs, rewards, dones, infos = self.venv.step_wait()
            x = obs[:, :nx].astype(np.float64)
            done_idx = np.flatnonzero(dones).tolist()
            for i in done_idx:
                x[i] = infos[i]["terminal_observation"][:nx]
            z = (x - goal) * self.scale
            shaped = rewards + self.bonus * np.exp(-0.5 * (z * z).sum(-1))
            if self.collision_penalty:
                for i in done_idx:
                    shaped[i] -= self.collision_penalty * float(infos[i]["cost"])
            if self.clearance_penalty > 0.0 and infos and "min_obstacle_distance" in infos[0]:
                d = np.array([info["min_obstacle_distance"] for info in infos], dtype=np.float64)
                d = np.nan_to_num(d, nan=0.0)  # a non-finite state (its episode ends) counts as contact
                shaped -= self.clearance_penalty * np.clip(1.0 - d / clearance_margin, 0.0, 1.0)
            return obs, shaped.astype(np.float32), dones, infos

    wrapped = RewardShaping(venv)
    wrapped.set_shaping(bonus, width, collision_penalty, clearance_penalty)
    return wrapped


def with_obstacle_features(venv: Any, k: int) -> Any:
    """Wrap an :class:`~deqmpc_gym.envs.SB3VecEnvAdapter` of an obstacle env so that observations (and terminal
    observations) are followed by :func:`obstacle_features` of its ``k`` nearest obstacles."""
    import gymnasium as gym
    from stable_baselines3.common.vec_env import VecEnvWrapper

    spec = _feature_spec(venv.env, k)
    space = venv.observation_space
    low = np.concatenate([space.low, np.full(3 * k, -np.inf, dtype=space.dtype)])
    high = np.concatenate([space.high, np.full(3 * k, np.inf, dtype=space.dtype)])

    class ObstacleFeatures(VecEnvWrapper):
        def reset(self) -> np.ndarray:
            return _with_features(self.venv.reset(), spec)

        def step_wait(self) -> Any:
            obs, rewards, dones, infos = self.venv.step_wait()
            for i in np.flatnonzero(dones).tolist():
                infos[i]["terminal_observation"] = _with_features(infos[i]["terminal_observation"][None], spec)[0]
            return _with_features(obs, spec), rewards, dones, infos

    return ObstacleFeatures(venv, observation_space=gym.spaces.Box(low, high, dtype=space.dtype))


def _make_venv(config: ExpertConfig, seed: int, training: bool, features: int | None = None) -> Any:
    """The ``VecNormalize``-wrapped training (or evaluation) env of ``config``; ``features``: the obstacle features
    ``k`` of the policy's input (default ``config.obstacle_features``)."""
    from stable_baselines3.common.vec_env import VecNormalize

    from deqmpc_gym.envs import make_sb3_vec_env

    kw = {} if not training or config.train_obstacle_radius is None else \
        {"obstacle_radius": float(config.train_obstacle_radius)}
    venv = make_sb3_vec_env(config.env_id, config.n_envs, seed=seed, **kw)
    k = config.obstacle_features if features is None else features
    if k:
        venv = with_obstacle_features(venv, k)
    if training and (config.goal_bonus > 0.0 or config.collision_penalty > 0.0 or config.clearance_penalty > 0.0
                     or any(p.goal_bonus or p.collision_penalty or p.clearance_penalty for p in config.phases)):
        venv = with_reward_shaping(venv, config.goal_bonus, config.goal_bonus_width, config.collision_penalty,
                                   config.clearance_penalty, config.clearance_margin)
    return VecNormalize(venv, norm_obs=True, norm_reward=training, clip_obs=10.0, gamma=config.gamma,
                        training=training)


def _new_model(config: ExpertConfig, venv: Any) -> Any:
    from stable_baselines3 import PPO

    arch = list(config.net_arch)
    return PPO("MlpPolicy", venv, n_steps=config.n_steps, batch_size=config.batch_size, n_epochs=config.n_epochs,
               learning_rate=config.learning_rate, gamma=config.gamma, gae_lambda=config.gae_lambda,
               clip_range=config.clip_range, ent_coef=config.ent_coef, seed=config.seed, device="cpu", verbose=0,
               policy_kwargs=dict(net_arch=dict(pi=arch, vf=arch), activation_fn=torch.nn.Tanh,
                                  log_std_init=config.log_std_init))


def _save_checkpoint(model: Any, venv: Any, paths: _Paths, progress: dict[str, Any]) -> None:
    paths.ckpt.mkdir(parents=True, exist_ok=True)
    tmp_model = paths.ckpt / ".model.tmp.zip"
    model.save(tmp_model)
    tmp_model.replace(paths.model)
    tmp_norm = paths.ckpt / ".vecnormalize.tmp.pkl"
    venv.save(tmp_norm)
    tmp_norm.replace(paths.norm)
    atomic_write_text(paths.progress, json.dumps(progress, indent=2))


def train_expert(config: ExpertConfig, out_dir: str | Path, *, resume: bool = True, progress: bool = True,
                 max_slices: int | None = None) -> dict[str, Any] | None:
    """Train (or resume) a PPO expert and export it with its card.

    Args:
        config: :class:`ExpertConfig`.
        out_dir: output directory (``checkpoint/`` inside it holds the resumable state).
        resume: continue from ``out_dir/checkpoint`` if present (its config must match).
        max_slices: stop after this many slices (for running long trainings in pieces); returns None if the
            budget is not yet exhausted, otherwise the card.

    Returns:
        The expert card (dict), also written to ``out_dir/card.json``.
    """
    from stable_baselines3 import PPO
    from stable_baselines3.common.vec_env import VecNormalize

    paths = _Paths(Path(out_dir))
    cfg_dict = json.loads(json.dumps(dataclasses.asdict(config)))
    state: dict[str, Any] = {"steps_done": 0, "wall_time_s": 0.0, "config": cfg_dict, "phases_started": 0}
    phases = config.phases
    if resume and paths.progress.exists():
        state = json.loads(paths.progress.read_text())
        # checkpoints written before multi-phase runs record ``finetune_started`` (the only phase)
        state.setdefault("phases_started", int(bool(state.get("finetune_started"))))
        _check_resumable(config, cfg_dict, state, paths)
        state["config"] = cfg_dict
        venv = _make_venv(config, config.seed, training=True, features=config.features_after(state["phases_started"]))
        venv = VecNormalize.load(str(paths.norm), venv.venv)
        venv.training, venv.norm_reward = True, True
        model = PPO.load(paths.model, env=venv, device="cpu")
        for phase in phases[:state["phases_started"]]:
            _start_finetune(model, venv, phase, reset_log_std=False)
    else:
        venv = _make_venv(config, config.seed, training=True)
        model = _new_model(config, venv)
    slices = 0
    while state["steps_done"] < config.total_steps and (max_slices is None or slices < max_slices):
        n = state["phases_started"]
        if n < len(phases) and state["steps_done"] >= phases[n].start_step:
            if phases[n].obstacle_features is not None:
                model, venv = _add_obstacle_features(model, venv, config, phases[:n], phases[n].obstacle_features)
            _start_finetune(model, venv, phases[n], reset_log_std=True)
            state["phases_started"] = n = n + 1
            state["finetune_started"] = True
        chunk = min(config.slice_steps, config.total_steps - state["steps_done"])
        if n < len(phases):
            chunk = min(chunk, max(1, phases[n].start_step - state["steps_done"]))
        t0 = time.perf_counter()
        model.learn(chunk, reset_num_timesteps=False, progress_bar=progress)
        state["steps_done"] = int(model.num_timesteps)
        state["wall_time_s"] += time.perf_counter() - t0
        _save_checkpoint(model, venv, paths, state)
        slices += 1
    if state["steps_done"] < config.total_steps:
        return None
    return export_expert(model, venv, config, paths.root, state, log=print if progress else None)


def _check_resumable(config: ExpertConfig, cfg_dict: dict[str, Any], state: dict[str, Any], paths: _Paths) -> None:
    """Raise :class:`CheckpointError` unless the checkpoint with progress ``state`` may continue as ``config``:
    the same settings except the budget, the teacher, and fine-tune phases that have not started (nor would an
    uninterrupted run have started them before this checkpoint: a phase starts at the first checkpoint at or
    after its ``start_step``)."""
    budget_keys = ("total_steps", "slice_steps", "eval_episodes")  # may change between resumed runs
    defaults = {f.name: f.default for f in dataclasses.fields(ExpertConfig)
                if f.default is not dataclasses.MISSING}  # keys added after the checkpoint was written
    saved = {**json.loads(json.dumps(defaults)), **(state.get("config") or {})}
    fixed = budget_keys + ("finetune", "teacher")  # the teacher runs after PPO: it may be added or changed
    same = {k: v for k, v in saved.items() if k not in fixed} == {k: v for k, v in cfg_dict.items() if k not in fixed}
    phase_defaults = {f.name: f.default for f in dataclasses.fields(FinetunePhase)
                      if f.default is not dataclasses.MISSING}  # fields added after the checkpoint was written

    def phase_list(d: Any) -> list[dict[str, Any]]:
        items = [] if d is None else (d if isinstance(d, list) else [d])
        return [{**phase_defaults, **p} for p in items]

    old, new = phase_list(saved.get("finetune")), phase_list(cfg_dict.get("finetune"))
    started = state["phases_started"]
    # the started phases must be the same; the first differing phase of either list must not be due yet
    same = same and old[:started] == new[:started]
    diff = next((i for i in range(max(len(old), len(new))) if i >= len(old) or i >= len(new) or old[i] != new[i]),
                None)
    if diff is not None:
        due = [lst[diff]["start_step"] for lst in (old, new) if diff < len(lst)]
        same = same and diff >= started and state["steps_done"] - config.slice_steps < min(due)
    if not same:
        raise CheckpointError(f"{paths.progress} was written for another ExpertConfig; use another --out "
                              f"or the same settings (saved: {saved})")


def _add_obstacle_features(model: Any, venv: Any, config: ExpertConfig, earlier: tuple[FinetunePhase, ...],
                           k: int) -> tuple[Any, Any]:
    """A PPO model and training env whose observations also hold the offsets to the ``k`` nearest obstacles:
    the same weights with zero input weights for the new inputs, the same normalization statistics with mean 0
    and variance 1 for them, and the settings of the ``earlier`` phases applied (the caller then starts the phase
    that adds the features)."""
    # another seed than the run's first envs, so that the new envs do not replay the initial states of step 0
    new_venv = _make_venv(config, config.seed + 1, training=True, features=k)
    n = venv.obs_rms.mean.shape[0]
    rms = new_venv.obs_rms
    rms.mean[:n], rms.var[:n], rms.count = venv.obs_rms.mean, venv.obs_rms.var, venv.obs_rms.count
    rms.mean[n:], rms.var[n:] = 0.0, 1.0
    new_venv.ret_rms = copy.deepcopy(venv.ret_rms)
    new_model = _new_model(config, new_venv)
    widened = new_model.policy.state_dict()
    for name, value in model.policy.state_dict().items():
        if widened[name].shape == value.shape:
            widened[name] = value.clone()
        else:  # the first layers of the policy and value networks: (hidden, n) -> (hidden, n + 3k)
            widened[name] = torch.cat([value, value.new_zeros(value.shape[0], widened[name].shape[1] - n)], 1)
    new_model.policy.load_state_dict(widened)
    new_model.num_timesteps = model.num_timesteps
    for phase in earlier:
        _start_finetune(new_model, new_venv, phase, reset_log_std=False)
    venv.close()
    return new_model, new_venv


def _start_finetune(model: Any, venv: Any, phase: FinetunePhase, *, reset_log_std: bool) -> None:
    """Switch a PPO run to the settings of ``phase`` (``venv``: the training ``VecNormalize``)."""
    try:
        from stable_baselines3.common.utils import ConstantSchedule as constant  # SB3 >= 2.6
    except ImportError:  # pragma: no cover - older SB3
        from stable_baselines3.common.utils import constant_fn as constant

    wrapper = venv.venv  # the RewardShaping wrapper when shaping is configured (see _make_venv)
    if hasattr(wrapper, "set_shaping"):
        wrapper.set_shaping(wrapper.bonus if phase.goal_bonus is None else phase.goal_bonus,
                            wrapper.width if phase.goal_bonus_width is None else phase.goal_bonus_width,
                            wrapper.collision_penalty if phase.collision_penalty is None else phase.collision_penalty,
                            phase.clearance_penalty)
    if phase.obstacle_radius is not None:
        venv.unwrapped.env.set_obstacle_radius(phase.obstacle_radius)
    if phase.learning_rate is not None:
        model.learning_rate = phase.learning_rate
        model.lr_schedule = constant(phase.learning_rate)
    if reset_log_std and phase.log_std is not None:
        with torch.no_grad():
            model.policy.log_std.fill_(phase.log_std)
    if phase.freeze_normalization:
        venv.training = False


def export_expert(model: Any, venv: Any, config: ExpertConfig, out_dir: Path, state: dict[str, Any],
                  log: Any = None) -> dict[str, Any]:
    """Write ``actor.pt`` and ``card.json`` (with 200-episode quality figures) to ``out_dir``; with
    ``config.teacher``, the actor is first refined by the MPC teacher (resumable from
    ``out_dir/checkpoint/teacher.pt``)."""
    from deqmpc_gym.evaluation import EvalConfig, rollout_batched

    rms = venv.obs_rms
    card: dict[str, Any] = {
        "format": CARD_FORMAT, "env_id": config.env_id, "train_steps": int(state["steps_done"]),
        "wall_time_s": round(float(state["wall_time_s"]), 1), "seed": config.seed,
        "obs_dim": int(rms.mean.shape[0]), "act_dim": int(venv.action_space.shape[0]),
        "net_arch": list(config.net_arch), "log_std_init": config.log_std_init,
        "obs_norm": {"mean": rms.mean.tolist(), "var": rms.var.tolist(), "clip_obs": float(venv.clip_obs),
                     "epsilon": float(venv.epsilon)},
        "obstacle_features": _feature_spec(venv.unwrapped.env, config.features_after(state.get("phases_started", 0))),
        "config": json.loads(json.dumps(dataclasses.asdict(config))),
        "command": f"deqmpc-gym expert train --env {config.env_id} --seed {config.seed} --steps {config.total_steps}",
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    state_dict = {k: v.detach().cpu() for k, v in model.policy.state_dict().items()}
    expert = Expert(_loaded_actor(card, state_dict), card)
    ev = EvalConfig(episodes=config.eval_episodes, max_steps=200, seed=10_000)
    if config.teacher is not None:
        ppo = rollout_batched(expert, config.env_id, ev)
        card["ppo_only"] = {"mean_return": ppo.mean_return, "std_return": ppo.std_return,
                            "success_rate": ppo.success_rate, "collision_rate": ppo.collision_rate}
        card["teacher"] = refine_with_teacher(expert, config.teacher, checkpoint=out_dir / "checkpoint" / "teacher.pt",
                                              log=log)
        state_dict = {k: v.detach().cpu() for k, v in expert.policy.state_dict().items()}
    atomic_write(out_dir / "actor.pt", lambda f: torch.save(state_dict, f))
    res = rollout_batched(expert, config.env_id, ev)
    rnd = rollout_batched(RandomPolicy(card["act_dim"], seed=config.seed), config.env_id, ev)
    card.update(mean_return=res.mean_return, std_return=res.std_return, success_rate=res.success_rate,
                collision_rate=res.collision_rate, random_return=rnd.mean_return,
                random_success_rate=rnd.success_rate, eval_episodes=config.eval_episodes)
    atomic_write_text(out_dir / "card.json", json.dumps(card, indent=2))
    return card


def _loaded_actor(card: dict[str, Any], state_dict: dict[str, torch.Tensor]) -> Any:
    actor = _build_actor(card)
    actor.load_state_dict(state_dict)
    actor.set_training_mode(False)
    return actor


class RandomPolicy:
    """Uniformly random normalized actions (the D4RL "random" reference), seeded."""

    def __init__(self, act_dim: int, seed: int = 0) -> None:
        self.act_dim = act_dim
        self.rng = np.random.default_rng(seed)

    def predict(self, observation: Any, state: Any = None, episode_start: Any = None,
                deterministic: bool = False) -> tuple[np.ndarray, Any]:
        n = np.asarray(observation).shape[0] if np.asarray(observation).ndim == 2 else None
        shape = (n, self.act_dim) if n is not None else (self.act_dim,)
        return self.rng.uniform(-1.0, 1.0, size=shape).astype(np.float32), state
