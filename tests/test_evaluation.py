"""Batched evaluation: normalized scores against the shipped expert card, random baseline, DEQ-MPC metrics."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from deqmpc_gym.errors import ConfigError
from deqmpc_gym.evaluation import EvalConfig, EvalResult, normalized_score, rollout_batched
from deqmpc_gym.experts import RandomPolicy
from deqmpc_gym.policies import DEQMPCPolicy

PEND = "DEQMPC/Pendulum-v0"


def _reference(expert) -> tuple[float, float]:
    return expert.card["random_return"], expert.card["mean_return"]


# ---------------------------------------------------------------------------------------------- formula
def test_normalized_score_formula() -> None:
    assert normalized_score(10.0, 10.0, 110.0) == 0.0
    assert normalized_score(110.0, 10.0, 110.0) == 1.0
    assert normalized_score(60.0, 10.0, 110.0) == pytest.approx(0.5)
    assert normalized_score(160.0, 10.0, 110.0) == pytest.approx(1.5)
    assert normalized_score(0.0, 10.0, 110.0) == pytest.approx(-0.1)
    assert normalized_score(-5.0, -10.0, -20.0) == pytest.approx(-0.5)  # works for negative returns too
    assert isinstance(normalized_score(1, 0, 2), float)


@pytest.mark.parametrize("ref", [(5.0, 5.0), (5.0, 5.0 + 1e-12), (0.0, float("nan")), (0.0, float("inf"))])
def test_normalized_score_rejects_degenerate_reference(ref: tuple[float, float]) -> None:
    with pytest.raises(ConfigError, match="too close"):
        normalized_score(1.0, *ref)


def test_eval_config_validation() -> None:
    with pytest.raises(ConfigError):
        EvalConfig(episodes=0)
    with pytest.raises(ConfigError):
        EvalConfig(max_steps=0)
    assert EvalConfig() == EvalConfig(200, 200, 10_000, None)


# ---------------------------------------------------------------------------------------------- expert / random
def test_expert_reproduces_its_card(pendulum_expert) -> None:
    card = pendulum_expert.card
    assert card["eval_episodes"] == 200
    res = rollout_batched(pendulum_expert, PEND, EvalConfig(episodes=200, seed=10_000),
                          reference=_reference(pendulum_expert))
    assert isinstance(res, EvalResult)
    assert res.normalized_score == pytest.approx(1.0, abs=1e-6)
    assert res.mean_return == pytest.approx(card["mean_return"], rel=1e-6)
    assert res.std_return == pytest.approx(card["std_return"], rel=1e-6)
    assert res.success_rate == pytest.approx(card["success_rate"])
    assert res.collision_rate == pytest.approx(card["collision_rate"])
    assert res.returns.shape == (200,) and res.episodes == 200 and res.max_steps == 200
    assert res.mean_solver_iters is None  # not an MPC policy
    assert res.act_latency_ms > 0
    d = res.to_dict()
    json.dumps(d)  # serializable
    assert len(d["returns"]) == 200


@pytest.mark.parametrize("episodes,seed", [(50, 10_000), (60, 123)])
def test_expert_smaller_sample_scores_about_one(pendulum_expert, episodes: int, seed: int) -> None:
    res = rollout_batched(pendulum_expert, PEND, EvalConfig(episodes=episodes, seed=seed),
                          reference=_reference(pendulum_expert))
    assert abs(res.normalized_score - 1.0) <= 0.15
    assert res.success_rate >= 0.9


def test_random_policy_scores_about_zero(pendulum_expert) -> None:
    ref = _reference(pendulum_expert)
    # the card's random reference: RandomPolicy(seed=card seed) on the card's 200 episodes
    exact = rollout_batched(RandomPolicy(1, seed=pendulum_expert.card["seed"]), PEND, EvalConfig(episodes=200),
                            reference=ref)
    assert exact.normalized_score == pytest.approx(0.0, abs=1e-6)
    other = rollout_batched(RandomPolicy(1, seed=5), PEND, EvalConfig(episodes=50, seed=3), reference=ref)
    assert abs(other.normalized_score) <= 0.1
    assert other.success_rate <= 0.1


def test_without_reference_score_is_none() -> None:
    res = rollout_batched(RandomPolicy(1), PEND, EvalConfig(episodes=3, max_steps=5))
    assert res.normalized_score is None
    assert res.returns.shape == (3,)
    assert np.all((res.returns > 0) & (res.returns <= 5.0))  # per-step rewards are in (0, 1]


def test_evaluation_is_deterministic(pendulum_expert) -> None:
    cfg = EvalConfig(episodes=8, max_steps=30, seed=42)
    a = rollout_batched(pendulum_expert, PEND, cfg)
    b = rollout_batched(pendulum_expert, PEND, cfg)
    np.testing.assert_array_equal(a.returns, b.returns)


def test_terminating_env_metrics() -> None:
    """On an obstacle env a random policy crashes: collision and cost rates are consistent shares."""
    res = rollout_batched(RandomPolicy(4, seed=0), "DEQMPC/QuadrotorObs-v0", EvalConfig(episodes=8, max_steps=60))
    assert 0.0 <= res.cost_rate <= res.collision_rate <= 1.0
    assert 0.0 <= res.success_rate <= 1.0
    assert res.collision_rate > 0


# ---------------------------------------------------------------------------------------------- DEQ-MPC
@pytest.mark.parametrize("variant", ["deq-mpc-nn", "diff-mpc-nn"])
def test_deqmpc_policy_evaluates(pendulum_expert, variant: str) -> None:
    torch.manual_seed(0)
    policy = DEQMPCPolicy.from_env(PEND, variant, hidden=16)
    before = policy.config
    res = rollout_batched(policy, PEND, EvalConfig(episodes=4, max_steps=12, stream_iters=2),
                          reference=_reference(pendulum_expert))
    assert res.returns.shape == (4,) and np.isfinite(res.returns).all()
    assert res.mean_solver_iters is not None and res.mean_solver_iters > 0
    assert res.act_latency_ms > 0
    assert res.normalized_score is not None and np.isfinite(res.normalized_score)
    assert policy.config == before and policy.layer.config == before  # stream_iters override is undone


@pytest.mark.parametrize("variant", ["deq-mpc-nn", "diff-mpc-nn"])
def test_stream_iters_changes_solver_work(variant: str) -> None:
    torch.manual_seed(0)
    policy = DEQMPCPolicy.from_env(PEND, variant, hidden=16)
    r1 = rollout_batched(policy, PEND, EvalConfig(episodes=3, max_steps=8, stream_iters=1))
    r3 = rollout_batched(policy, PEND, EvalConfig(episodes=3, max_steps=8, stream_iters=3))
    assert r3.mean_solver_iters > r1.mean_solver_iters


def test_policy_config_restored_after_error() -> None:
    torch.manual_seed(0)
    policy = DEQMPCPolicy.from_env(PEND, "deq-mpc-nn", hidden=16)
    before = policy.config
    with pytest.raises(Exception):  # noqa: B017 - any error: the test is about the config being restored
        rollout_batched(policy, "DEQMPC/Cartpole-v0", EvalConfig(episodes=2, max_steps=3, stream_iters=3))
    assert policy.config == before and policy.layer.config == before
