"""Batched evaluation of policies: returns, normalized scores, success and constraint metrics."""

from deqmpc_gym.evaluation.rollouts import EvalConfig, EvalResult, normalized_score, rollout_batched

__all__ = ["EvalConfig", "EvalResult", "normalized_score", "rollout_batched"]
