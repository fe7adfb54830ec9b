"""The settings of a PPO expert run: :class:`ExpertConfig` and its fine-tune phases (:class:`FinetunePhase`).

The per-env recipes (budgets, shaping, phases) are in :mod:`deqmpc_gym.experts.recipes`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from deqmpc_gym._config import config_from_dict, require_at_least_one
from deqmpc_gym.errors import ConfigError
from deqmpc_gym.experts.teacher import TeacherConfig


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
            checkpoint; the refinement's own checkpoint (``checkpoint/teacher.pt``) continues with more ``rounds``
            only, other teacher settings or another PPO actor need it deleted (:mod:`deqmpc_gym.checkpoint`).
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
