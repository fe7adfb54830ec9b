"""PPO experts under one name: re-exports the public API of the modules that implement it.

* :mod:`~deqmpc_gym.experts.config`: :class:`ExpertConfig`, :class:`FinetunePhase`;
* :mod:`~deqmpc_gym.experts.recipes`: :data:`EXPERT_DEFAULTS`, :func:`default_expert_config`;
* :mod:`~deqmpc_gym.experts.features`: :func:`obstacle_features`;
* :mod:`~deqmpc_gym.experts.shaping`: :func:`with_reward_shaping`, :func:`with_obstacle_features`;
* :mod:`~deqmpc_gym.experts.loader`: :class:`Expert`, :func:`load_expert`, :func:`pretrained_dir`,
  :func:`pretrained_expert_id`;
* :mod:`~deqmpc_gym.experts.train`: :func:`train_expert`;
* :mod:`~deqmpc_gym.experts.export`: :func:`export_expert`, :class:`RandomPolicy`.
"""

from deqmpc_gym.experts.config import ExpertConfig, FinetunePhase, check_radius
from deqmpc_gym.experts.export import RandomPolicy, export_expert
from deqmpc_gym.experts.features import obstacle_features
from deqmpc_gym.experts.loader import (
           CARD_FORMAT,
           PRETRAINED_DIR,
           Expert,
           load_expert,
           pretrained_dir,
           pretrained_expert_id,
)
from deqmpc_gym.experts.recipes import EXPERT_DEFAULTS, default_expert_config
from deqmpc_gym.experts.shaping import with_obstacle_features, with_reward_shaping
from deqmpc_gym.experts.train import train_expert

__all__ = ["CARD_FORMAT", "EXPERT_DEFAULTS", "PRETRAINED_DIR", "Expert", "ExpertConfig", "FinetunePhase",
           "RandomPolicy", "check_radius", "default_expert_config", "export_expert", "load_expert",
           "obstacle_features", "pretrained_dir", "pretrained_expert_id", "train_expert", "with_obstacle_features",
           "with_reward_shaping"]
