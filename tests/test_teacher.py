"""The MPC safety-filter teacher of the obstacle experts and its DAgger refinement."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

import deqmpc_gym  # noqa: F401
from deqmpc_gym.envs import make_batched_env
from deqmpc_gym.errors import CheckpointError, ConfigError, ResumeMismatchError
from deqmpc_gym.experts import ExpertConfig, load_expert, train_expert
from deqmpc_gym.experts.teacher import SafetyFilterTeacher, TeacherConfig, refine_with_teacher
from deqmpc_gym.systems import OBSTACLE_CENTERS

QOBS = "DEQMPC/QuadrotorObs-v0"
TINY = dict(rounds=2, episodes=4, steps=12, epochs=2, val_episodes=4, batch_size=64)


def test_teacher_config_validation() -> None:
    for bad in (dict(horizon=0), dict(rounds=0), dict(margin=-0.1), dict(trigger=float("nan")),
                dict(learning_rate=0.0), dict(episodes=True)):
        with pytest.raises(ConfigError, match="TeacherConfig"):
            TeacherConfig(**bad)
    with pytest.raises(ConfigError, match="obstacle variant"):
        ExpertConfig("DEQMPC/Quadrotor-v0", teacher=TeacherConfig())
    cfg = ExpertConfig(QOBS, teacher={"horizon": 6})
    assert isinstance(cfg.teacher, TeacherConfig) and cfg.teacher.horizon == 6


def test_teacher_intervenes_only_near_obstacles() -> None:
    """Far from every sphere the teacher returns the PPO expert's action; heading into a sphere its MPC acts,
    and the plan it tracks then keeps clear of the sphere where the expert's own plan enters it."""
    expert = load_expert(QOBS)
    env = make_batched_env(QOBS, 2, max_episode_steps=None)
    teacher = SafetyFilterTeacher(expert, env, TeacherConfig())
    x = np.zeros((2, 12))
    x[0, :3] = (0.0, 0.0, 0.05)  # at the goal: the nearest sphere is > 0.8 m away and the expert hovers
    c = OBSTACLE_CENTERS[0]
    x[1, :3] = c + np.array([0.0, 0.0, 0.9])  # 0.4 m above a sphere, falling onto it
    x[1, 8] = -3.0
    xt = torch.tensor(x)
    a, used, a_expert = teacher.act(xt)
    a0, _ = expert.predict(x)
    np.testing.assert_array_equal(a_expert, a0)
    assert a.shape == (2, 4) and a.dtype == np.float32 and np.all(np.abs(a) <= 1.0)
    assert not used[0] and np.array_equal(a[0], a0[0])
    assert used[1] and not np.allclose(a[1], a0[1])
    # it intervened because the expert's own plan from the falling state comes within the trigger distance of
    # the enlarged sphere; from the hover at the goal it stays clear
    plan = teacher.plan(xt).numpy()
    cfg = TeacherConfig()
    reach = env.obstacle_radius + cfg.margin + cfg.trigger
    assert np.linalg.norm(plan[1, 1:, :3] - c, axis=-1).min() < reach
    assert np.linalg.norm(plan[0, 1:, None, :3] - OBSTACLE_CENTERS[None], axis=-1).min() >= reach
    with pytest.raises(ConfigError, match="obstacle variant"):
        SafetyFilterTeacher(load_expert("DEQMPC/Quadrotor-v0"), make_batched_env("DEQMPC/Quadrotor-v0", 2),
                            TeacherConfig())


def test_refine_with_teacher_records_rounds_and_resumes(tmp_path: Path) -> None:
    expert = load_expert(QOBS)
    ckpt = tmp_path / "teacher.pt"
    before = {k: v.clone() for k, v in expert.policy.state_dict().items()}
    lines: list[str] = []
    rec = refine_with_teacher(expert, TeacherConfig(**TINY), checkpoint=ckpt, log=lines.append)
    assert [r["round"] for r in rec["rounds"]] == [-1, 0, 1] and rec["rounds"][1]["driver"] == "teacher"
    assert rec["labelled_states"] == sum(r["rollout_states"] for r in rec["rounds"][1:]) > 0
    assert rec["kept_round"] in (-1, 0, 1) and len(lines) == 3 and ckpt.exists()
    kept = {k: v.clone() for k, v in expert.policy.state_dict().items()}
    if rec["kept_round"] == -1:
        assert all(torch.equal(before[k], kept[k]) for k in before)
    # the value network is never touched
    value_keys = [k for k in before if k.startswith(("mlp_extractor.value_net", "value_net"))]
    assert all(torch.equal(before[k], kept[k]) for k in value_keys)
    # a second call resumes after the last finished round: no new rollouts, the same kept weights
    again = load_expert(QOBS)
    lines2: list[str] = []
    rec2 = refine_with_teacher(again, TeacherConfig(**TINY), checkpoint=ckpt, log=lines2.append)
    assert rec2["rounds"] == rec["rounds"] and lines2 == [f"teacher: resumed after round 1 from {ckpt}"]
    assert all(torch.equal(kept[k], again.policy.state_dict()[k]) for k in kept)
    # a checkpoint of other settings, another PPO actor or more rounds is refused, naming the fields
    with pytest.raises(ResumeMismatchError, match=r"teacher.rounds: 2 -> 1.*delete") as info:
        refine_with_teacher(load_expert(QOBS), TeacherConfig(**{**TINY, "rounds": 1}), checkpoint=ckpt)
    assert info.value.fields == ("teacher.rounds",)
    with pytest.raises(ResumeMismatchError, match=r"teacher.margin: 0.2 -> 0.3") as info:
        refine_with_teacher(load_expert(QOBS), TeacherConfig(**{**TINY, "margin": 0.3}), checkpoint=ckpt)
    assert info.value.fields == ("teacher.margin",)
    other = load_expert(QOBS)
    with torch.no_grad():
        other.policy.action_net.bias.add_(0.01)
    with pytest.raises(ResumeMismatchError, match="teacher.ppo_actor") as info:
        refine_with_teacher(other, TeacherConfig(**TINY), checkpoint=ckpt)
    assert info.value.fields == ("teacher.ppo_actor",)
    # a checkpoint of another layout version is refused too
    blob = torch.load(ckpt, weights_only=True)
    torch.save({**blob, "version": 1}, ckpt)
    with pytest.raises(CheckpointError, match="another version"):
        refine_with_teacher(load_expert(QOBS), TeacherConfig(**TINY), checkpoint=ckpt)


def test_train_expert_with_teacher_writes_ppo_only_and_teacher_records(tmp_path: Path) -> None:
    cfg = ExpertConfig(QOBS, total_steps=256, n_envs=8, n_steps=32, batch_size=64, n_epochs=1, slice_steps=256,
                       eval_episodes=2, net_arch=(8, 8), teacher=TeacherConfig(**{**TINY, "rounds": 1}))
    card = train_expert(cfg, tmp_path / "e", progress=False)
    assert set(card["ppo_only"]) == {"mean_return", "std_return", "success_rate", "collision_rate"}
    assert card["teacher"]["config"]["rounds"] == 1 and card["teacher"]["wall_time_s"] >= 0
    assert card["config"]["teacher"]["horizon"] == TeacherConfig().horizon
    on_disk = json.loads((tmp_path / "e" / "card.json").read_text())
    assert on_disk["teacher"]["kept_round"] == card["teacher"]["kept_round"]
    expert = load_expert(tmp_path / "e")
    a, _ = expert.predict(np.zeros((3, 12)))
    assert a.shape == (3, 4) and np.all(np.isfinite(a))
    # the teacher may be added to (or changed in) a finished checkpoint: only the refinement reruns
    cfg2 = ExpertConfig(**{**cfg.__dict__, "teacher": TeacherConfig(**{**TINY, "rounds": 2})})
    card2 = train_expert(cfg2, tmp_path / "e", progress=False)
    assert card2["train_steps"] == card["train_steps"] and len(card2["teacher"]["rounds"]) == 3


# ---------------------------------------------------------------------------------------------- the filtered expert

QPOBS = "DEQMPC/QPoleObs-v0"


def test_filter_config_validation() -> None:
    from deqmpc_gym.experts import FilterConfig

    for bad in (dict(horizon=0), dict(margin=-0.1), dict(trigger=float("nan")), dict(iters=1.5), dict(rho_init=0.0)):
        with pytest.raises(ConfigError):
            FilterConfig(**bad)
    assert FilterConfig().teacher_config().horizon == TeacherConfig().horizon


def test_filtered_expert_acts_like_the_teacher() -> None:
    """The filtered expert's action is the teacher's: the PPO action away from the spheres, the MPC's heading
    into one; single observations and batches; non-finite or wrong-width observations are refused."""
    from deqmpc_gym.errors import ShapeError
    from deqmpc_gym.experts import FilterConfig, FilteredExpert

    ppo = load_expert(QOBS)
    fe = FilteredExpert(ppo, FilterConfig())
    x = np.zeros((2, 12))
    x[0, :3] = (0.0, 0.0, 0.05)
    x[1, :3] = OBSTACLE_CENTERS[0] + np.array([0.0, 0.0, 0.9])
    x[1, 8] = -3.0
    a, by_mpc = fe.act(x)
    assert a.shape == (2, 4) and a.dtype == np.float32 and np.all(np.abs(a) <= 1.0)
    assert by_mpc.tolist() == [False, True] and (fe.states, fe.mpc_states) == (2, 1)
    np.testing.assert_array_equal(a[0], ppo.predict(x)[0][0])
    teacher = SafetyFilterTeacher(ppo, make_batched_env(QOBS, 1), TeacherConfig())
    np.testing.assert_allclose(a, teacher.act(torch.tensor(x))[0], atol=1e-6)
    single, _ = fe.predict(x[1])
    assert single.shape == (4,)
    np.testing.assert_allclose(single, a[1], atol=1e-6)
    with pytest.raises(ShapeError):
        fe.predict(np.zeros((2, 11)))
    with pytest.raises(ShapeError, match="non-finite"):
        fe.predict(np.full((1, 12), np.nan))
    with pytest.raises(ConfigError, match="obstacle variant"):
        FilteredExpert(load_expert("DEQMPC/Quadrotor-v0"))


def test_evaluate_filtered_matches_rollout_batched() -> None:
    """evaluate_filtered's returns are rollout_batched's on the same episodes, and it counts MPC labels and
    collisions (a collision is an early end)."""
    from deqmpc_gym.evaluation import EvalConfig, rollout_batched
    from deqmpc_gym.experts import FilterConfig, FilteredExpert
    from deqmpc_gym.experts.filtered import evaluate_filtered

    fe = FilteredExpert(load_expert(QOBS), FilterConfig())
    ev = evaluate_filtered(fe, episodes=3, seed=40_000, max_steps=30)
    ref = rollout_batched(fe, QOBS, EvalConfig(episodes=3, max_steps=30, seed=40_000))
    np.testing.assert_allclose(ev["returns"], ref.returns, rtol=1e-12)
    assert ev["early_end_rate"] == ref.collision_rate and ev["collision_rate"] <= ev["early_end_rate"]
    assert 0.0 <= ev["mpc_label_fraction"] <= 1.0 and ev["states"] > 0 and ev["wall_time_per_episode_s"] > 0


@pytest.mark.parametrize("env_id", [QOBS, QPOBS])
def test_shipped_filtered_expert_card(env_id: str) -> None:
    """The card of each shipped filtered expert: the figures over the card's 200 episodes (seeds 10000-10199)
    agree with its per-episode returns, at most 5 % collisions, the filter's settings, the share of MPC labels
    and the wall time; validation and confirmation on other seeds; measured around the shipped PPO actor."""
    from deqmpc_gym.experts import FilterConfig, FilteredExpert, pretrained_dir, pretrained_expert_id
    from deqmpc_gym.experts.filtered import FILTERED_CARD_FORMAT

    fe = load_expert(env_id, kind="filtered")
    assert isinstance(fe, FilteredExpert) and fe.kind == "filtered" and fe.env_id == env_id
    card = json.loads((pretrained_dir(env_id, "filtered") / "card.json").read_text())
    assert card == fe.card and card["format"] == FILTERED_CARD_FORMAT and card["env_id"] == env_id
    assert FilterConfig(**card["filter"]) == fe.config
    assert (card["eval_episodes"], card["eval_seed"], len(card["returns"])) == (200, 10_000, 200)
    assert card["mean_return"] == pytest.approx(np.mean(card["returns"]))
    assert card["std_return"] == pytest.approx(np.std(card["returns"]))
    for key in ("success_rate", "collision_rate", "early_end_rate", "mpc_label_fraction"):
        assert 0.0 <= card[key] <= 1.0, key
    assert card["collision_rate"] <= 0.05 and card["collision_rate"] <= card["early_end_rate"]
    assert card["collision_rate"] < card["ppo"]["collision_rate"]
    assert 0.0 < card["mpc_label_fraction"] < 0.5 and card["wall_time_per_episode_s"] > 0
    assert card["random_return"] == load_expert(env_id).card["random_return"]
    seeds = {card["eval_seed"], card["confirmation"]["seed"]} | {v["seed"] for v in card["validation"]}
    assert len(seeds) == 3 and all(s >= 40_000 for s in seeds - {10_000})  # tuned and confirmed off the card
    # the card was measured around the PPO expert that ships
    assert card["base_expert_id"].rsplit("@", 1)[1] == pretrained_expert_id(env_id).rsplit("@", 1)[1]
    assert fe.expert_id.startswith(f"pretrained:{env_id}:filtered@")
