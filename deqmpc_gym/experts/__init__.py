"""PPO experts (stable-baselines3) and expert-dataset collection.

Modules by job: :mod:`~deqmpc_gym.experts.config` (settings), :mod:`~deqmpc_gym.experts.recipes` (per-env
defaults), :mod:`~deqmpc_gym.experts.features` (obstacle features), :mod:`~deqmpc_gym.experts.shaping` (the
training env's wrappers), :mod:`~deqmpc_gym.experts.train` (the phased PPO loop),
:mod:`~deqmpc_gym.experts.export` (``actor.pt`` + ``card.json``), :mod:`~deqmpc_gym.experts.loader`
(:func:`load_expert`), :mod:`~deqmpc_gym.experts.teacher` (the MPC teacher),
:mod:`~deqmpc_gym.experts.filtered` (the safety-filtered expert of the obstacle tasks) and
:mod:`~deqmpc_gym.experts.collect` (datasets). :mod:`~deqmpc_gym.experts.ppo` re-exports the PPO names.
"""

from deqmpc_gym.experts.collect import (
    DEFAULT_NUM_TRAJECTORIES,
    collect_dataset,
    default_dataset_path,
    load_or_collect_dataset,
)
from deqmpc_gym.experts.config import ExpertConfig, FinetunePhase
from deqmpc_gym.experts.export import RandomPolicy
from deqmpc_gym.experts.filtered import FilterConfig, FilteredExpert
from deqmpc_gym.experts.loader import (
    EXPERT_KINDS,
    Expert,
    dataset_expert_kind,
    load_expert,
    pretrained_dir,
    pretrained_expert_id,
    shipped_experts,
)
from deqmpc_gym.experts.recipes import EXPERT_DEFAULTS, default_expert_config
from deqmpc_gym.experts.train import train_expert

__all__ = ["DEFAULT_NUM_TRAJECTORIES", "collect_dataset", "default_dataset_path", "load_or_collect_dataset",
           "EXPERT_DEFAULTS", "Expert", "ExpertConfig", "FinetunePhase", "RandomPolicy", "default_expert_config",
           "load_expert", "pretrained_dir", "train_expert", "EXPERT_KINDS", "FilterConfig", "FilteredExpert",
           "dataset_expert_kind", "pretrained_expert_id", "shipped_experts"]
