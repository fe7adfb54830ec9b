"""PPO experts (stable-baselines3) and expert-dataset collection."""

from deqmpc_gym.experts.collect import (
    DEFAULT_NUM_TRAJECTORIES,
    collect_dataset,
    default_dataset_path,
    load_or_collect_dataset,
)
from deqmpc_gym.experts.ppo import (
    EXPERT_DEFAULTS,
    Expert,
    ExpertConfig,
    FinetunePhase,
    RandomPolicy,
    default_expert_config,
    load_expert,
    pretrained_dir,
    train_expert,
)

__all__ = ["DEFAULT_NUM_TRAJECTORIES", "collect_dataset", "default_dataset_path", "load_or_collect_dataset",
           "EXPERT_DEFAULTS", "Expert", "ExpertConfig", "FinetunePhase", "RandomPolicy", "default_expert_config",
           "load_expert", "pretrained_dir", "train_expert"]
