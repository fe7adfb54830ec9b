"""Imitation training of DEQ-MPC policies on expert trajectories."""

from deqmpc_gym.training.trainer import (
    ImitationTrainer,
    TrainConfig,
    TrainResult,
    batch_loss,
    iterate_loss,
    validation_loss,
    window_l1,
)
from deqmpc_gym.training.windows import WindowBatch, WindowSampler, unwrap_angles

__all__ = ["ImitationTrainer", "TrainConfig", "TrainResult", "batch_loss", "iterate_loss", "validation_loss",
           "window_l1", "WindowBatch", "WindowSampler", "unwrap_angles"]
