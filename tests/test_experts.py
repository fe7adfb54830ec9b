"""PPO experts: loading and acting, dataset collection, a tiny resumable training run, corrupt expert dirs."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import gymnasium as gym
import numpy as np
import pytest
import torch

import deqmpc_gym  # noqa: F401
from deqmpc_gym.errors import CheckpointError, ConfigError, ShapeError
from deqmpc_gym.experts import (
    DEFAULT_NUM_TRAJECTORIES,
    Expert,
    ExpertConfig,
    FinetunePhase,
    collect_dataset,
    default_dataset_path,
    default_expert_config,
    load_expert,
    pretrained_dir,
    train_expert,
)

PEND = "DEQMPC/Pendulum-v0"
CARD_KEYS = ("env_id", "train_steps", "wall_time_s", "seed", "mean_return", "std_return", "success_rate",
             "collision_rate", "random_return")


# ---------------------------------------------------------------------------------------------- loading / acting
def test_shipped_expert_loads(pendulum_expert: Expert) -> None:
    assert pendulum_expert.env_id == PEND
    for k in CARD_KEYS:
        assert k in pendulum_expert.card
    assert pretrained_dir(PEND).name == "Pendulum-v0"
    again = load_expert(pretrained_dir(PEND))  # by directory too
    assert again.card == pendulum_expert.card
    assert load_expert(str(pretrained_dir(PEND))).env_id == PEND


def test_expert_acts_shape_and_bounds(pendulum_expert: Expert, rng: np.random.Generator) -> None:
    obs = rng.uniform([-np.pi, -8.0], [np.pi, 8.0], size=(64, 2)).astype(np.float32)
    a, state = pendulum_expert.predict(obs, state="keep", deterministic=True)
    assert a.shape == (64, 1) and a.dtype == np.float32
    assert np.all(a >= -1.0) and np.all(a <= 1.0)
    assert state == "keep"  # the recurrent state is passed through
    single, _ = pendulum_expert.predict(obs[0])
    assert single.shape == (1,)
    np.testing.assert_allclose(single, a[0], atol=1e-6)
    # deterministic: same obs -> same action
    np.testing.assert_array_equal(pendulum_expert.predict(obs)[0], a)


def test_expert_normalizes_raw_observations(pendulum_expert: Expert, rng: np.random.Generator) -> None:
    norm = pendulum_expert.card["obs_norm"]
    obs = rng.normal(size=(8, 2)) * 3
    expected = np.clip((obs - np.array(norm["mean"])) / np.sqrt(np.array(norm["var"]) + norm["epsilon"]),
                       -norm["clip_obs"], norm["clip_obs"]).astype(np.float32)
    np.testing.assert_allclose(pendulum_expert.normalize(obs), expected, rtol=1e-6)
    huge = np.array([[1e6, -1e6]])
    assert np.all(np.abs(pendulum_expert.normalize(huge)) == norm["clip_obs"])
    raw_actions, _ = pendulum_expert.predict(obs)
    inner, _ = pendulum_expert.policy.predict(expected, deterministic=True)
    np.testing.assert_allclose(raw_actions, np.clip(inner, -1, 1), atol=1e-6)


@pytest.mark.parametrize("shape", [(3,), (4, 3), (2, 2, 2)])
def test_expert_rejects_wrong_obs_shape(pendulum_expert: Expert, shape: tuple) -> None:
    with pytest.raises(ShapeError):
        pendulum_expert.predict(np.zeros(shape))


def test_expert_swings_up_in_single_env(pendulum_expert: Expert) -> None:
    env = gym.make(PEND)
    obs, _ = env.reset(seed=10_000)
    total, info = 0.0, {}
    for _ in range(200):
        obs, r, term, trunc, info = env.step(pendulum_expert.predict(obs)[0])
        total += r
        if term or trunc:
            break
    assert info.get("is_success", False)
    assert total > 0.8 * pendulum_expert.card["mean_return"]


# ---------------------------------------------------------------------------------------------- corrupt dirs
def _copy_expert(tmp_path: Path) -> Path:
    d = tmp_path / "expert"
    shutil.copytree(pretrained_dir(PEND), d)
    return d


def test_load_expert_missing(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="no expert"):
        load_expert(tmp_path / "nothing")
    with pytest.raises(CheckpointError, match="no expert"):
        load_expert("DEQMPC/NoSuchEnv-v0")


@pytest.mark.parametrize("what", ["card_json", "actor_bytes", "card_format", "arch_mismatch", "actor_empty"])
def test_load_expert_corrupt(tmp_path: Path, what: str) -> None:
    d = _copy_expert(tmp_path)
    if what == "card_json":
        (d / "card.json").write_text("{not json")
    elif what == "actor_bytes":
        (d / "actor.pt").write_bytes(b"\x00garbage" * 10)
    elif what == "actor_empty":
        (d / "actor.pt").write_bytes(b"")
    elif what == "card_format":
        card = json.loads((d / "card.json").read_text())
        card["format"] = "other"
        (d / "card.json").write_text(json.dumps(card))
    elif what == "arch_mismatch":
        card = json.loads((d / "card.json").read_text())
        card["net_arch"] = [32, 32]
        (d / "card.json").write_text(json.dumps(card))
    with pytest.raises(CheckpointError) as info:
        load_expert(d)
    assert str(d) in str(info.value)


def test_expert_config_validation() -> None:
    with pytest.raises(ConfigError):
        ExpertConfig(PEND, total_steps=0)
    with pytest.raises(ConfigError, match="unknown ExpertConfig keys"):
        default_expert_config(PEND, total_step=5)
    cfg = default_expert_config("DEQMPC/QPole-v0", seed=3)
    assert cfg.net_arch == (256, 256) and cfg.seed == 3 and cfg.total_steps == 14_500_000
    assert cfg.finetune is not None and cfg.finetune.start_step == 10_000_000
    phase = ExpertConfig(PEND, finetune={"start_step": 5, "goal_bonus_width": 2.0}).finetune
    assert phase == FinetunePhase(5, None, 2.0)
    with pytest.raises(ConfigError, match="goal_bonus_width"):
        FinetunePhase(5, goal_bonus_width=0.0)
    with pytest.raises(ConfigError, match="unknown FinetunePhase keys"):
        ExpertConfig(PEND, finetune={"start": 5})
    with pytest.raises(ConfigError, match="goal_bonus"):
        ExpertConfig(PEND, goal_bonus=-1.0)
    with pytest.raises(ConfigError, match="goal_bonus"):
        ExpertConfig(PEND, goal_bonus_width=0.0)


def test_goal_bonus_shapes_only_the_training_reward() -> None:
    """The bonus is ``b * exp(-0.5 |(x - g) / (w tol)|^2)`` of the state each step reached (the terminal
    observation for a finished sub-env), added on top of the env's reward."""
    from stable_baselines3.common.vec_env import VecEnvWrapper

    from deqmpc_gym.envs import make_sb3_vec_env
    from deqmpc_gym.experts.ppo import with_reward_shaping
    from deqmpc_gym.experts.train import _make_venv

    plain, shaped = make_sb3_vec_env(PEND, 4, seed=0), with_reward_shaping(make_sb3_vec_env(PEND, 4, seed=0), 2.0, 3.0)
    plain.reset(), shaped.reset()
    system = plain.env.system
    goal, tol = np.asarray(system.goal), np.asarray(system.success_tolerance)
    for _ in range(3):
        a = np.random.default_rng(0).uniform(-1, 1, (4, 1)).astype(np.float32)
        o1, r1, _, _ = plain.step(a)
        o2, r2, _, _ = shaped.step(a)
        np.testing.assert_array_equal(o1, o2)
        z = (o1.astype(np.float64) - goal) / (3.0 * tol)
        np.testing.assert_allclose(r2, r1 + 2.0 * np.exp(-0.5 * (z * z).sum(-1)), rtol=1e-6)
    # only the training env is shaped
    cfg = default_expert_config("DEQMPC/Cartpole-v0", n_envs=2)
    assert cfg.goal_bonus > 0
    assert isinstance(_make_venv(cfg, 0, training=True).venv, VecEnvWrapper)
    assert not isinstance(_make_venv(cfg, 0, training=False).venv, VecEnvWrapper)


def test_collision_and_clearance_penalties() -> None:
    """``reward - collision_penalty`` on a done step whose ``info["cost"]`` is 1 (other steps unchanged), and the
    dense clearance penalty on every step near an obstacle."""
    import gymnasium as gym
    from stable_baselines3.common.vec_env import VecEnv

    from deqmpc_gym.experts.ppo import with_reward_shaping
    from deqmpc_gym.systems import Pendulum

    class Scripted(VecEnv):  # two sub-envs: 0 ends with a collision on the 2nd step, 1 never ends
        def __init__(self) -> None:
            box = gym.spaces.Box(-np.inf, np.inf, (2,), np.float32)
            super().__init__(2, box, gym.spaces.Box(-1.0, 1.0, (1,), np.float32))
            self.env = type("E", (), {"system": Pendulum()})()
            self.t = 0

        def reset(self):
            return np.zeros((2, 2), np.float32)

        def step_async(self, actions):
            pass

        def step_wait(self):
            self.t += 1
            done = np.array([self.t == 2, False])
            infos = [{"cost": float(self.t == 2), "min_obstacle_distance": 0.1},
                     {"cost": 0.0, "min_obstacle_distance": 2.0}]
            if done[0]:
                infos[0]["terminal_observation"] = np.zeros(2, np.float32)
            return np.zeros((2, 2), np.float32), np.full(2, 0.5, np.float32), done, infos

        def close(self): pass
        def get_attr(self, *a, **k): return [None, None]
        def set_attr(self, *a, **k): pass
        def env_method(self, *a, **k): return [None, None]
        def env_is_wrapped(self, *a, **k): return [False, False]

    shaped = with_reward_shaping(Scripted(), 0.0, 1.0, collision_penalty=7.0)
    shaped.reset()
    r1 = shaped.step(np.zeros((2, 1), np.float32))[1]
    r2 = shaped.step(np.zeros((2, 1), np.float32))[1]
    np.testing.assert_allclose(r1, [0.5, 0.5])
    np.testing.assert_allclose(r2, [0.5 - 7.0, 0.5])
    # the clearance penalty: p * clip(1 - d / margin, 0, 1) on every step (d = 0.1 m, margin 0.5 m -> 0.8 p)
    dense = with_reward_shaping(Scripted(), 0.0, 1.0, clearance_penalty=2.0, clearance_margin=0.5)
    dense.reset()
    np.testing.assert_allclose(dense.step(np.zeros((2, 1), np.float32))[1], [0.5 - 1.6, 0.5], rtol=1e-6)
    with pytest.raises(ConfigError, match="clearance"):
        ExpertConfig(PEND, clearance_margin=0.0)
    with pytest.raises(ConfigError, match="collision_penalty"):
        ExpertConfig(PEND, collision_penalty=-1.0)
    with pytest.raises(ConfigError, match="collision_penalty"):
        FinetunePhase(5, collision_penalty=-1.0)


# ---------------------------------------------------------------------------------------------- collection
def test_collect_dataset_deterministic_and_sized(pendulum_expert: Expert) -> None:
    a = collect_dataset(pendulum_expert, PEND, 5, seed=7, max_steps=25, batch_size=2, expert_id="x")
    a2 = collect_dataset(pendulum_expert, PEND, 5, seed=7, max_steps=25, batch_size=2, expert_id="x")
    b = collect_dataset(pendulum_expert, PEND, 5, seed=7, max_steps=25, batch_size=5)
    assert len(a) == len(a2) == len(b) == 5
    for x, y in zip(a.trajectories, a2.trajectories):  # same settings: bit-identical
        np.testing.assert_array_equal(x.obs, y.obs)
        np.testing.assert_array_equal(x.acts, y.acts)
        np.testing.assert_array_equal(x.rews, y.rews)
        np.testing.assert_array_equal(x.controls, y.controls)
    for x, y in zip(a.trajectories, b.trajectories):
        # another batch size changes the float32 MLP's summation order: equal up to rounding only
        np.testing.assert_allclose(x.obs, y.obs, atol=1e-5)
        np.testing.assert_allclose(x.acts, y.acts, atol=1e-5)
    assert all(len(t) == 25 for t in a.trajectories)  # the pendulum never terminates early
    assert a.env_id == PEND and a.seed == 7 and a.expert_id == "x" and a.extra["max_steps"] == 25
    c = collect_dataset(pendulum_expert, PEND, 2, seed=8, max_steps=25)
    assert not np.array_equal(c.trajectories[0].obs, a.trajectories[0].obs)
    np.testing.assert_allclose(c.trajectories[0].obs, a.trajectories[1].obs, atol=1e-5)  # episode i: seed + i
    np.testing.assert_array_equal(c.trajectories[0].obs[0], a.trajectories[1].obs[0])


def test_collected_states_match_single_env(pendulum_expert: Expert) -> None:
    ds = collect_dataset(pendulum_expert, PEND, 2, seed=3, max_steps=10)
    env = gym.make(PEND)
    for i, t in enumerate(ds.trajectories):
        obs, _ = env.reset(seed=3 + i)
        np.testing.assert_allclose(t.obs[0], env.unwrapped.state, rtol=0, atol=1e-12)
        for k in range(len(t)):
            obs, r, *_ = env.step(t.acts[k])
            np.testing.assert_allclose(t.obs[k + 1], env.unwrapped.state, atol=1e-9)
            assert t.rews[k] == pytest.approx(r, rel=1e-9)
        np.testing.assert_allclose(t.controls, env.unwrapped.to_physical(t.acts), atol=1e-12)
        assert t.obs.dtype == np.float64


def test_collect_progress_and_errors(pendulum_expert: Expert, tmp_path: Path) -> None:
    seen: list[int] = []
    collect_dataset(pendulum_expert, PEND, 3, max_steps=4, batch_size=2, progress=seen.append)
    assert seen == [2, 3]
    with pytest.raises(ConfigError):
        collect_dataset(pendulum_expert, PEND, 1, max_steps=0)
    assert DEFAULT_NUM_TRAJECTORIES[PEND] == 300
    assert default_dataset_path(PEND, tmp_path) == tmp_path / "Pendulum-v0-300-s0.npz"
    assert default_dataset_path(PEND, tmp_path, 5, seed=2) == tmp_path / "Pendulum-v0-5-s2.npz"


def test_load_or_collect_dataset_caches(tmp_path) -> None:
    from deqmpc_gym.experts import load_or_collect_dataset

    first = load_or_collect_dataset(PEND, 3, cache_dir=tmp_path)
    assert (tmp_path / "Pendulum-v0-3-s0.npz").exists()
    again = load_or_collect_dataset(PEND, 3, cache_dir=tmp_path)
    assert len(first) == len(again) == 3
    for a, b in zip(first.trajectories, again.trajectories):
        np.testing.assert_array_equal(a.obs, b.obs)
    # a cache written from another version of the shipped expert is collected again, not silently reused
    from deqmpc_gym.data import ExpertDataset
    from deqmpc_gym.experts.ppo import pretrained_expert_id

    assert first.expert_id == pretrained_expert_id(PEND) and "@" in first.expert_id
    path = tmp_path / "Pendulum-v0-3-s0.npz"
    ExpertDataset(PEND, first.trajectories[:1], expert_id="pretrained:DEQMPC/Pendulum-v0@old").save(path)
    fresh = load_or_collect_dataset(PEND, 3, cache_dir=tmp_path)
    assert len(fresh) == 3 and fresh.expert_id == first.expert_id
    assert ExpertDataset.load(path).expert_id == first.expert_id


def test_collect_terminating_env_lengths() -> None:
    """Episodes that terminate early get their true length and terminal=True."""
    from deqmpc_gym.experts import RandomPolicy

    ds = collect_dataset(RandomPolicy(4, seed=0), "DEQMPC/QuadrotorObs-v0", 6, seed=0, max_steps=80)
    assert any(t.terminal for t in ds.trajectories)
    for t in ds.trajectories:
        assert 1 <= len(t) <= 80
        if len(t) < 80:
            assert t.terminal  # ended early only by termination
        assert t.obs.shape == (len(t) + 1, 12) and np.isfinite(t.obs).all()


# ---------------------------------------------------------------------------------------------- PPO training
def _tiny_config(**kw) -> ExpertConfig:
    # one PPO rollout = n_envs * n_steps = 256 env steps = one slice
    base = dict(total_steps=512, n_envs=8, n_steps=32, batch_size=64, n_epochs=2, slice_steps=256, eval_episodes=4,
                net_arch=(16, 16))
    base.update(kw)
    return ExpertConfig(PEND, **base)


def test_tiny_ppo_training_is_resumable(tmp_path: Path) -> None:
    cfg = _tiny_config()
    out = tmp_path / "expert"
    first = train_expert(cfg, out, progress=False, max_slices=1)
    assert first is None
    progress = json.loads((out / "checkpoint" / "progress.json").read_text())
    assert progress["steps_done"] == 256
    assert not (out / "card.json").exists()
    card = train_expert(cfg, out, progress=False)
    assert card is not None
    for k in CARD_KEYS:
        assert k in card, k
    assert card["env_id"] == PEND and card["train_steps"] == 512 and card["seed"] == 0
    assert card["wall_time_s"] >= 0 and card["eval_episodes"] == 4
    assert 0.0 <= card["success_rate"] <= 1.0 and card["collision_rate"] == 0.0
    assert 0 < card["random_return"] < 200 and 0 < card["mean_return"] <= 200
    assert (out / "actor.pt").exists()
    on_disk = json.loads((out / "card.json").read_text())
    assert on_disk == json.loads(json.dumps(card))
    state = torch.load(out / "actor.pt", weights_only=True)
    assert isinstance(state, dict) and all(isinstance(v, torch.Tensor) for v in state.values())
    expert = load_expert(out)
    a, _ = expert.predict(np.zeros((3, 2), np.float32))
    assert a.shape == (3, 1) and np.all(np.abs(a) <= 1)
    assert not list(out.rglob("*.tmp*"))
    # the checkpoint of another config is refused
    with pytest.raises(CheckpointError):
        train_expert(_tiny_config(learning_rate=1e-2), out, progress=False, max_slices=1)


def test_ppo_training_logs_through_sb3s_logger(tmp_path: Path) -> None:
    """progress.csv: one row per PPO iteration with SB3's keys; the rows of a slice before a resume are kept."""
    import csv

    out = tmp_path / "expert"
    assert train_expert(_tiny_config(total_steps=768), out, progress=False, max_slices=1) is None
    train_expert(_tiny_config(total_steps=768), out, progress=False)
    with open(out / "progress.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    columns = set(rows[0])
    assert {"time/total_timesteps", "time/fps", "train/loss", "train/value_loss", "train/policy_gradient_loss",
            "train/approx_kl", "train/entropy_loss", "train/learning_rate", "train/std"} <= columns
    steps = [int(r["time/total_timesteps"]) for r in rows]  # every row has its env steps
    assert steps[0] == 256 and steps[-1] == 768 and 512 in steps  # the first (resumed) slice's rows are kept
    losses = [float(r["train/loss"]) for r in rows if r["train/loss"]]
    assert len(losses) == 3 and all(np.isfinite(losses))  # every iteration's update, the last one included
    with pytest.raises(ConfigError, match="log_formats"):
        train_expert(_tiny_config(), tmp_path / "x", progress=False, log_formats=("json",))


def test_a_checkpoint_of_another_config_names_the_fields(tmp_path: Path) -> None:
    """The resume rule of :mod:`deqmpc_gym.checkpoint`: a mismatching checkpoint raises ResumeMismatchError naming
    each field (saved -> requested) and how to go on; the budget may change; an unreadable one is refused."""
    from deqmpc_gym.errors import ResumeMismatchError

    cfg = _tiny_config()
    progress = tmp_path / "checkpoint" / "progress.json"
    progress.parent.mkdir()
    state = {"steps_done": 512, "wall_time_s": 1.0, "phases_started": 0,
             "config": json.loads(json.dumps(dataclasses.asdict(cfg)))}
    progress.write_text(json.dumps(state))  # written without a "format" (as before checkpoints named theirs)
    other = _tiny_config(learning_rate=1e-2, gamma=0.9, total_steps=4096)
    with pytest.raises(ResumeMismatchError, match=r"expert.gamma: 0.99 -> 0.9; expert.learning_rate: 0.0003 -> "
                                                  r"0.01.*saved settings.*--no-resume.*--out") as info:
        train_expert(other, tmp_path, progress=False, max_slices=1)
    assert info.value.fields == ("expert.gamma", "expert.learning_rate")  # total_steps may change
    # a phase an uninterrupted run would have started before this checkpoint (at 256 steps) cannot be added
    phase = _tiny_config(finetune=FinetunePhase(start_step=256, learning_rate=1e-2))
    with pytest.raises(ResumeMismatchError) as info:
        train_expert(phase, tmp_path, progress=False, max_slices=1)
    assert info.value.fields == ("expert.finetune[0]",)
    progress.write_text("{torn")
    with pytest.raises(CheckpointError, match="delete it"):
        train_expert(cfg, tmp_path, progress=False, max_slices=1)


def test_finetune_phase_switches_settings_and_resumes(tmp_path: Path) -> None:
    """A fine-tune phase starts at its step (bonus, learning rate, exploration, frozen normalisation), may be
    added to a checkpoint that has not reached it, and is re-applied (without a second log-std reset) on resume."""
    out = tmp_path / "expert"
    assert train_expert(_tiny_config(total_steps=768), out, progress=False, max_slices=1) is None  # 256 steps
    phase = FinetunePhase(start_step=512, goal_bonus=2.0, goal_bonus_width=0.5, learning_rate=1e-2, log_std=-3.0,
                          freeze_normalization=True)
    cfg = _tiny_config(total_steps=768, finetune=phase)
    assert train_expert(cfg, out, progress=False, max_slices=1) is None  # 512: the phase starts next slice
    progress = json.loads((out / "checkpoint" / "progress.json").read_text())
    assert progress["steps_done"] == 512 and not progress.get("finetune_started")
    import deqmpc_gym.experts.train as train_mod

    seen = []
    orig = train_mod._start_finetune

    def spy(model, venv, ph, *, reset_log_std):
        orig(model, venv, ph, reset_log_std=reset_log_std)
        seen.append((model.lr_schedule(1.0), venv.training, venv.venv.bonus, venv.venv.width,
                     float(model.policy.log_std.detach().mean()), reset_log_std))

    train_mod._start_finetune = spy
    try:
        card = train_expert(cfg, out, progress=False)
    finally:
        train_mod._start_finetune = orig
    assert card is not None and card["train_steps"] == 768 and card["config"]["finetune"]["start_step"] == 512
    assert seen == [(1e-2, False, 2.0, 0.5, -3.0, True)]
    assert json.loads((out / "checkpoint" / "progress.json").read_text())["finetune_started"]
    # once started, the phase can no longer change
    with pytest.raises(CheckpointError):
        train_expert(_tiny_config(total_steps=1024, finetune={**phase.__dict__, "learning_rate": 1e-3}), out,
                     progress=False, max_slices=1)


def test_obstacle_features_expert_trains_exports_and_acts_on_raw_observations(tmp_path: Path) -> None:
    """With ``obstacle_features = k`` the policy sees the observation followed by the offsets to the k nearest
    obstacles; the exported card records them and the loaded expert computes them from raw observations."""
    from deqmpc_gym.envs import make_sb3_vec_env
    from deqmpc_gym.experts.ppo import obstacle_features, with_obstacle_features
    from deqmpc_gym.systems import OBSTACLE_CENTERS

    obs = np.zeros((2, 12))
    obs[1, :3] = OBSTACLE_CENTERS[7] + 0.1
    f = obstacle_features(obs, OBSTACLE_CENTERS, (0, 3), 2)
    d = np.linalg.norm(OBSTACLE_CENTERS[None] - obs[:, None, :3], axis=-1)
    assert f.shape == (2, 6)
    np.testing.assert_allclose(np.linalg.norm(f.reshape(2, 2, 3), axis=-1), np.sort(d, axis=1)[:, :2])
    np.testing.assert_allclose(f[1, :3], -0.1)

    env_id = "DEQMPC/QuadrotorObs-v0"
    venv = with_obstacle_features(make_sb3_vec_env(env_id, 2, seed=0), 3)
    o = venv.reset()
    assert o.shape == (2, 21) and venv.observation_space.shape == (21,)
    np.testing.assert_allclose(o[:, 12:], obstacle_features(o[:, :12], OBSTACLE_CENTERS, (0, 3), 3), rtol=1e-6)
    with pytest.raises(ConfigError, match="obstacle_features"):
        with_obstacle_features(make_sb3_vec_env(PEND, 2, seed=0), 3)
    with pytest.raises(ConfigError, match="obstacle_features"):
        ExpertConfig(env_id, obstacle_features=-1)

    cfg = ExpertConfig(env_id, total_steps=256, n_envs=8, n_steps=32, batch_size=64, n_epochs=1, slice_steps=256,
                       eval_episodes=2, net_arch=(8, 8), obstacle_features=3)
    card = train_expert(cfg, tmp_path / "obs", progress=False)
    assert card["obs_dim"] == 21 and card["obstacle_features"]["k"] == 3
    expert = load_expert(tmp_path / "obs")
    assert expert.obs_dim == 12
    raw = np.random.default_rng(0).normal(size=(3, 12))
    a, _ = expert.predict(raw)
    a1, _ = expert.predict(raw[0])
    assert a.shape == (3, 4) and np.all(np.abs(a) <= 1.0)
    np.testing.assert_allclose(a1, a[0], rtol=1e-6, atol=1e-6)
    with pytest.raises(ShapeError, match=r"\(12,\)"):
        expert.predict(np.zeros((3, 21)))


def test_train_obstacle_radius_is_training_only_and_a_phase_can_change_it(tmp_path: Path) -> None:
    """``train_obstacle_radius`` enlarges the spheres of PPO's training env only (evaluation keeps 0.5 m); a
    fine-tune phase can change it mid-run (a curriculum); both are refused on envs without obstacles."""
    from deqmpc_gym.envs import make_batched_env
    from deqmpc_gym.experts.train import _make_venv

    env_id = "DEQMPC/QuadrotorObs-v0"
    cfg = ExpertConfig(env_id, total_steps=512, n_envs=8, n_steps=32, batch_size=64, n_epochs=1, slice_steps=256,
                       eval_episodes=2, net_arch=(8, 8), train_obstacle_radius=0.7,
                       finetune=FinetunePhase(start_step=256, obstacle_radius=0.6))
    assert _make_venv(cfg, 0, training=True).unwrapped.env.obstacle_radius == 0.7
    assert _make_venv(cfg, 0, training=False).unwrapped.env.obstacle_radius == 0.5
    import deqmpc_gym.experts.train as train_mod

    radii = []
    orig = train_mod._start_finetune

    def spy(model, venv, ph, *, reset_log_std):
        orig(model, venv, ph, reset_log_std=reset_log_std)
        radii.append(venv.unwrapped.env.obstacle_radius)

    train_mod._start_finetune = spy
    try:
        card = train_expert(cfg, tmp_path / "r", progress=False)
    finally:
        train_mod._start_finetune = orig
    assert radii == [0.6] and card["config"]["train_obstacle_radius"] == 0.7
    # a larger training radius really changes collisions: a position 0.55 m from a centre collides at 0.6 m only
    from deqmpc_gym.systems import OBSTACLE_CENTERS

    env = make_batched_env(env_id, 1, seed=0)
    x = np.zeros((1, 12))
    x[0, :3] = OBSTACLE_CENTERS[0] + np.array([0.55, 0.0, 0.0])
    for radius, hit in ((0.5, False), (0.6, True)):
        env.set_obstacle_radius(radius)
        env.reset(seed=0, options={"state": x})
        _, _, term, _, info = env.step(np.zeros((1, 4), dtype=np.float32))
        final = info["final_info"] if hit else info  # a collision ends the episode (same-step autoreset)
        assert bool(term[0]) == hit and (final["min_obstacle_distance"][0] < 0) == hit
    with pytest.raises(ConfigError, match="obstacle_radius"):
        env.set_obstacle_radius(-1.0)
    with pytest.raises(ConfigError, match="train_obstacle_radius"):
        ExpertConfig(env_id, train_obstacle_radius=0.0)
    with pytest.raises(ConfigError, match="FinetunePhase.obstacle_radius"):
        FinetunePhase(5, obstacle_radius=float("nan"))
    with pytest.raises(ConfigError, match="train_obstacle_radius need.*no obstacles"):
        ExpertConfig(PEND, train_obstacle_radius=0.6)
    with pytest.raises(ConfigError, match="finetune.obstacle_radius need.*no obstacles"):
        ExpertConfig(PEND, finetune=FinetunePhase(5, obstacle_radius=0.6))


def test_expert_rejects_non_finite_observations(pendulum_expert: Expert) -> None:
    obs = np.zeros((3, pendulum_expert.obs_dim))
    obs[1, 0] = np.nan
    with pytest.raises(ShapeError, match=r"non-finite values in rows \[1\]"):
        pendulum_expert.predict(obs)


def test_a_phase_adds_obstacle_features_without_changing_the_policy(tmp_path: Path) -> None:
    """A fine-tune phase with ``obstacle_features`` widens the policy's input at its start: the new inputs get zero
    weights and unit normalization, so actions and values are unchanged at the switch; the earlier phases' settings
    carry over, the checkpoint resumes with the wider input, and the card and loaded expert use the features."""
    import deqmpc_gym.experts.train as train_mod
    from deqmpc_gym.experts.features import feature_spec, with_features

    env_id = "DEQMPC/QuadrotorObs-v0"
    phases = (FinetunePhase(start_step=256, learning_rate=1e-2),
              FinetunePhase(start_step=512, obstacle_features=2, clearance_penalty=0.5, log_std=-1.0))
    cfg = ExpertConfig(env_id, total_steps=768, n_envs=8, n_steps=32, batch_size=64, n_epochs=1, slice_steps=256,
                       eval_episodes=2, net_arch=(8, 8), finetune=phases)
    assert cfg.phases == phases and cfg.features_after(1) == 0 and cfg.features_after(2) == 2
    out = tmp_path / "e"
    assert train_expert(cfg, out, progress=False, max_slices=2) is None
    progress = json.loads((out / "checkpoint" / "progress.json").read_text())
    assert progress["steps_done"] == 512 and progress["phases_started"] == 1
    # a checkpoint written before multi-phase runs (no "phases_started") resumes as well
    del progress["phases_started"]
    (out / "checkpoint" / "progress.json").write_text(json.dumps(progress))

    raw = np.random.default_rng(0).normal(size=(5, 12)).astype(np.float32)
    seen: dict = {}
    orig_add, orig_start = train_mod._add_obstacle_features, train_mod._start_finetune

    def add_spy(model, venv, config, earlier, k):
        before = model.policy.predict(venv.normalize_obs(raw), deterministic=True)[0]
        v_before = model.policy.predict_values(torch.as_tensor(venv.normalize_obs(raw))).detach()
        new_model, new_venv = orig_add(model, venv, config, earlier, k)
        spec = feature_spec(new_venv.unwrapped.env, k)
        wide = new_venv.normalize_obs(with_features(raw.astype(np.float64), spec).astype(np.float32))
        seen["same_action"] = np.allclose(new_model.policy.predict(wide, deterministic=True)[0], before, atol=1e-6)
        seen["same_value"] = torch.allclose(new_model.policy.predict_values(torch.as_tensor(wide)), v_before,
                                            atol=1e-6)
        seen["lr_after_earlier_phases"] = new_model.lr_schedule(1.0)
        return new_model, new_venv

    def start_spy(model, venv, ph, *, reset_log_std):
        orig_start(model, venv, ph, reset_log_std=reset_log_std)
        seen.setdefault("starts", []).append((ph.start_step, reset_log_std, venv.venv.clearance_penalty,
                                              model.lr_schedule(1.0)))

    train_mod._add_obstacle_features, train_mod._start_finetune = add_spy, start_spy
    try:
        card = train_expert(cfg, out, progress=False)
    finally:
        train_mod._add_obstacle_features, train_mod._start_finetune = orig_add, orig_start
    assert seen["same_action"] and seen["same_value"] and seen["lr_after_earlier_phases"] == 1e-2
    # resume re-applies phase 1 (no log-std reset); phase 2 starts with its reset and the new clearance penalty
    assert seen["starts"][0][:2] == (256, False) and seen["starts"][-1] == (512, True, 0.5, 1e-2)
    assert card["obs_dim"] == 18 and card["obstacle_features"]["k"] == 2
    assert [p["start_step"] for p in card["config"]["finetune"]] == [256, 512]
    expert = load_expert(out)
    a, _ = expert.predict(raw)
    assert expert.obs_dim == 12 and a.shape == (5, 4)
    # the finished run resumes with the wider input when its budget grows
    assert train_expert(dataclasses.replace(cfg, total_steps=1024), out, progress=False, max_slices=1) is not None


def test_phase_sequences_are_validated() -> None:
    env_id = "DEQMPC/QuadrotorObs-v0"
    with pytest.raises(ConfigError, match="obstacle_features must be an int >= 1"):
        FinetunePhase(5, obstacle_features=0)
    with pytest.raises(ConfigError, match="clearance_penalty"):
        FinetunePhase(5, clearance_penalty=-1.0)
    with pytest.raises(ConfigError, match="increasing start_step"):
        ExpertConfig(env_id, finetune=(FinetunePhase(10), FinetunePhase(10)))
    with pytest.raises(ConfigError, match="added once"):
        ExpertConfig(env_id, obstacle_features=3, finetune=FinetunePhase(5, obstacle_features=2))
    with pytest.raises(ConfigError, match="finetune.obstacle_features need.*no obstacles"):
        ExpertConfig(PEND, finetune=[{"start_step": 5}, {"start_step": 6, "obstacle_features": 2}])
    with pytest.raises(ConfigError, match="sequence of them"):
        ExpertConfig(env_id, finetune=[FinetunePhase(5), 3])
    cfg = ExpertConfig(env_id, finetune=[{"start_step": 5}, {"start_step": 6, "obstacle_features": 2}])
    assert isinstance(cfg.finetune, tuple) and cfg.features_after(2) == 2


# ---------------------------------------------------------------------------------------------- expert kinds

QOBS = "DEQMPC/QuadrotorObs-v0"


def test_expert_kinds_and_the_typed_error(tmp_path: Path) -> None:
    """Which experts ship; an unknown kind, or a kind that does not ship for the env, raises a ConfigError that
    lists what ships; a directory of one kind is refused as another."""
    from deqmpc_gym.experts import EXPERT_KINDS, dataset_expert_kind, shipped_experts

    ships = shipped_experts()
    assert EXPERT_KINDS == ("ppo", "filtered")
    assert ships[QOBS] == ships["DEQMPC/QPoleObs-v0"] == ("ppo", "filtered") and ships[PEND] == ("ppo",)
    assert len(ships) == 6
    assert [dataset_expert_kind(e) for e in (PEND, QOBS, "DEQMPC/QPoleObs-v0")] == ["ppo", "filtered", "filtered"]
    assert load_expert(PEND, kind="ppo").kind == "ppo"
    with pytest.raises(ConfigError, match=r"unknown expert kind 'safe'.*QuadrotorObs-v0: ppo, filtered"):
        load_expert(QOBS, kind="safe")
    with pytest.raises(ConfigError, match=r"no 'filtered' expert ships for 'DEQMPC/Pendulum-v0'.*QPoleObs-v0: ppo, "):
        load_expert(PEND, kind="filtered")
    with pytest.raises(ConfigError, match="is a 'ppo' expert, not 'filtered'"):
        load_expert(pretrained_dir(QOBS), kind="filtered")
    with pytest.raises(ConfigError, match="is a 'filtered' expert, not 'ppo'"):
        load_expert(pretrained_dir(QOBS, "filtered"), kind="ppo")


def test_filtered_expert_from_a_folder_checks_its_ppo_expert(tmp_path: Path) -> None:
    """A copied filtered expert loads from its folder (its card names the PPO folder); a card measured around
    another PPO actor is refused with a CheckpointError that names the command re-measuring it."""
    from deqmpc_gym.experts import FilteredExpert

    src = pretrained_dir(QOBS)
    shutil.copytree(src, tmp_path / "e")
    fe = load_expert(tmp_path / "e" / "filtered")
    assert isinstance(fe, FilteredExpert) and fe.expert_id.startswith(str(tmp_path / "e" / "filtered"))
    card = json.loads((tmp_path / "e" / "card.json").read_text())
    card["mean_return"] += 1.0  # another version of the PPO expert
    (tmp_path / "e" / "card.json").write_text(json.dumps(card))
    with pytest.raises(CheckpointError, match="measured around another PPO expert.*expert filter"):
        load_expert(tmp_path / "e" / "filtered")


def test_a_dataset_of_the_filtered_expert_records_it(tmp_path: Path) -> None:
    """The obstacle tasks' datasets come from the filtered expert by default (their own cache file); the dataset
    records the expert's id and kind and counts the episodes that ended early."""
    from deqmpc_gym.data import ExpertDataset
    from deqmpc_gym.experts import load_or_collect_dataset, pretrained_expert_id

    fe = load_expert(QOBS, kind="filtered")
    ds = collect_dataset(fe, QOBS, 2, seed=10_000, max_steps=15)
    fid = pretrained_expert_id(QOBS, "filtered")
    assert fid.startswith(f"pretrained:{QOBS}:filtered@") and fid != pretrained_expert_id(QOBS)
    assert ds.expert_id == fid and ds.extra["expert_kind"] == "filtered" and ds.extra["early_ends"] == 0
    assert collect_dataset(fe, QOBS, 1, max_steps=2, expert_id="mine").expert_id == "mine"
    cached = load_or_collect_dataset(QOBS, 2, cache_dir=tmp_path, seed=10_000)
    path = default_dataset_path(QOBS, tmp_path, 2, seed=10_000, kind="filtered")
    assert path.name == "QuadrotorObs-v0-2-s10000-filtered.npz" and path.exists()
    back = ExpertDataset.load(path)
    assert back.expert_id == cached.expert_id == fid and back.extra["expert_kind"] == "filtered"
    np.testing.assert_array_equal(back.trajectories[0].obs[:16], ds.trajectories[0].obs)
    ppo = load_or_collect_dataset(QOBS, 1, cache_dir=tmp_path, kind="ppo")
    assert ppo.expert_id == pretrained_expert_id(QOBS) and ppo.extra["expert_kind"] == "ppo"
    with pytest.raises(ConfigError, match="shipped experts"):
        load_or_collect_dataset(PEND, 1, cache_dir=tmp_path, kind="filtered")


def test_the_normalization_reference_is_the_dataset_expert_on_the_same_episodes() -> None:
    """Obstacle tasks: the filtered expert's return on exactly the evaluated episodes (its card's per-episode
    returns, which a rollout of the same episodes reproduces; a rollout for other episodes); elsewhere the PPO card."""
    from deqmpc_gym.evaluation import EvalConfig, rollout_batched
    from deqmpc_gym.experts import pretrained_expert_id
    from deqmpc_gym.experts.reference import reference_returns

    fe = load_expert(QOBS, kind="filtered")
    ref = reference_returns(QOBS, 3, 10_000)
    assert ref["measured"] == "card_episodes" and ref["expert_id"] == pretrained_expert_id(QOBS, "filtered")
    assert ref["expert_return"] == pytest.approx(np.mean(fe.card["returns"][:3]))
    assert ref["random_return"] == load_expert(QOBS).card["random_return"]
    same = rollout_batched(fe, QOBS, EvalConfig(episodes=3, seed=10_000))
    np.testing.assert_allclose(same.returns, fe.card["returns"][:3], rtol=1e-6)
    off = reference_returns(QOBS, 2, 10_199, max_steps=20)  # past the card's episodes: rolled out
    assert off["measured"] == "rollout"
    assert off["expert_return"] == rollout_batched(fe, QOBS, EvalConfig(2, 20, 10_199)).mean_return
    assert reference_returns(QOBS, 3, 10_000, kind="ppo")["expert_return"] == load_expert(QOBS).card["mean_return"]
    pend = reference_returns(PEND, 50)
    assert pend["measured"] == "card" and pend["expert_return"] == load_expert(PEND).card["mean_return"]
    with pytest.raises(ConfigError):
        reference_returns(PEND, 0)
