"""Tests of the DEQMPC Gymnasium environments (single, batched, SB3 adapter, rendering)."""

from __future__ import annotations

import math
import os
import subprocess
import sys

import gymnasium as gym
import numpy as np
import pytest
from gymnasium.utils.env_checker import check_env

import deqmpc_gym
from deqmpc_gym.envs import ENV_IDS, register_envs
from deqmpc_gym.envs.core import START_MARGIN, SystemEnv
from deqmpc_gym.errors import ConfigError, ShapeError

os.environ.setdefault("MUJOCO_GL", "egl")


def test_registered_ids() -> None:
    register_envs()  # idempotent
    register_envs()
    assert set(ENV_IDS) == {
        "DEQMPC/Pendulum-v0", "DEQMPC/Cartpole-v0", "DEQMPC/Quadrotor-v0", "DEQMPC/QPole-v0",
        "DEQMPC/QuadrotorObs-v0", "DEQMPC/QPoleObs-v0",
    }
    for env_id in ENV_IDS:
        spec = gym.spec(env_id)
        assert spec.max_episode_steps == 200
        assert spec.vector_entry_point is not None
    assert deqmpc_gym.__version__ == "0.1.0"


def test_import_is_cheap() -> None:
    code = "import sys, deqmpc_gym; print('torch' in sys.modules, 'mujoco' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["False", "False"]


@pytest.mark.parametrize("env_id", ENV_IDS)
def test_check_env(env_id: str) -> None:
    env = gym.make(env_id)
    check_env(env.unwrapped, skip_render_check=True)
    env.close()


@pytest.mark.parametrize("env_id", ENV_IDS)
def test_seeded_reset_and_random_rollout(env_id: str) -> None:
    env = gym.make(env_id)
    o1, i1 = env.reset(seed=123)
    o2, i2 = env.reset(seed=123)
    np.testing.assert_array_equal(o1, o2)
    assert i1 == i2 and i1 is not i2
    o3, _ = env.reset(seed=124)
    assert not np.array_equal(o1, o3)
    env.action_space.seed(0)
    prev_obs, prev_info = o2, i2
    for _ in range(200):
        obs, r, term, trunc, info = env.step(env.action_space.sample())
        assert obs.dtype == np.float32 and obs in env.observation_space
        assert 0.0 <= r <= 1.0 and isinstance(r, float)
        assert isinstance(info["is_success"], bool) and info["cost"] in (0.0, 1.0)
        assert obs is not prev_obs and info is not prev_info
        if env.unwrapped.obstacles:
            assert isinstance(info["min_obstacle_distance"], float)
        prev_obs, prev_info = obs, info
        if term or trunc:
            prev_obs, prev_info = env.reset()
    env.close()


def test_spaces_and_action_map() -> None:
    env = gym.make("DEQMPC/Quadrotor-v0").unwrapped
    sys_ = env.system
    assert env.action_space.shape == (4,) and env.action_space.dtype == np.float32
    np.testing.assert_allclose(env.to_physical(-np.ones(4)), sys_.u_low)
    np.testing.assert_allclose(env.to_physical(np.ones(4)), sys_.u_high)
    u = np.array([12.0, 13.0, 14.0, 15.0])
    np.testing.assert_allclose(env.to_physical(env.to_normalized(u)), u)
    assert env.action_scale.dtype == np.float64 and env.action_offset.shape == (4,)
    assert env.obstacle_centers.shape == (0, 3)
    obs_env = gym.make("DEQMPC/QPoleObs-v0").unwrapped
    assert obs_env.obstacle_centers.shape == (40, 3) and obs_env.obstacle_radius == 0.5


def test_bad_actions_raise() -> None:
    env = gym.make("DEQMPC/Quadrotor-v0")
    env.reset(seed=0)
    with pytest.raises(ValueError, match=r"\(4,\)"):
        env.step(np.zeros(3, dtype=np.float32))
    with pytest.raises(ShapeError, match=r"\(4,\)"):
        env.step(np.zeros((1, 4), dtype=np.float32))
    with pytest.raises(ValueError, match=r"\(4,\)"):
        env.step(np.array([0.0, np.nan, 0.0, 0.0], dtype=np.float32))
    with pytest.raises(ValueError):
        env.step(np.array([0.0, np.inf, 0.0, 0.0], dtype=np.float32))
    # finite out-of-range actions are clipped
    e2 = gym.make("DEQMPC/Pendulum-v0").unwrapped
    e2.reset(seed=1)
    x0 = e2.state
    o_big = e2.step(np.array([7.0], dtype=np.float32))[0]
    e2.reset(options={"state": x0})
    o_one = e2.step(np.array([1.0], dtype=np.float32))[0]
    np.testing.assert_array_equal(o_big, o_one)


def test_config_errors() -> None:
    with pytest.raises(ConfigError, match="valid keyword arguments"):
        gym.make("DEQMPC/Pendulum-v0", bogus=1)
    with pytest.raises(ValueError, match="multiple of 16"):
        gym.make("DEQMPC/Pendulum-v0", width=100)
    with pytest.raises(ConfigError, match="position"):
        SystemEnv("pendulum", obstacles=True)
    with pytest.raises(ConfigError):
        SystemEnv("nonexistent")
    with pytest.raises(ConfigError):
        SystemEnv("qpole", obstacles=True, obstacle_radius=-1.0)
    env = SystemEnv("cartpole")
    with pytest.raises(ShapeError):
        env.reset(options={"state": np.zeros(3)})


@pytest.mark.parametrize("env_id", ["DEQMPC/QuadrotorObs-v0", "DEQMPC/QPoleObs-v0"])
def test_obstacle_variants_never_start_in_collision(env_id: str) -> None:
    env = gym.make(env_id)
    u = env.unwrapped
    for k in range(300):
        obs, info = env.reset(seed=k)
        d = np.linalg.norm(obs[:3].astype(np.float64) - u.obstacle_centers, axis=1).min()
        assert d >= u.obstacle_radius + START_MARGIN - 1e-5
        assert info["cost"] == 0.0 and info["min_obstacle_distance"] >= START_MARGIN - 1e-5


def test_collision_terminates_with_cost() -> None:
    env = gym.make("DEQMPC/QPoleObs-v0").unwrapped
    c = env.obstacle_centers[0]
    x = np.array(env.system.goal, dtype=np.float64)
    x[:3] = c + np.array([0.52, 0.0, 0.0])
    x[7] = -2.0  # body velocity towards the sphere (attitude is identity)
    env.reset(options={"state": x})
    _, _, term, _, info = env.step(np.zeros(4, dtype=np.float32))
    assert term and info["cost"] == 1.0 and info["min_obstacle_distance"] < 0.0


def test_flight_volume_terminates() -> None:
    env = gym.make("DEQMPC/Quadrotor-v0").unwrapped
    x = np.zeros(12)
    x[0], x[6] = 14.99, 5.0
    env.reset(options={"state": x})
    _, _, term, trunc, info = env.step(env.to_normalized(env.system.nominal_control).astype(np.float32))
    assert term and not trunc and info["cost"] == 1.0


def test_truncation_only_from_time_limit() -> None:
    env = gym.make("DEQMPC/Pendulum-v0")
    env.reset(seed=0)
    for t in range(200):
        _, _, term, trunc, _ = env.step(np.zeros(1, dtype=np.float32))
        assert not term
        assert trunc == (t == 199)


@pytest.mark.render
@pytest.mark.parametrize("env_id", ["DEQMPC/Pendulum-v0", "DEQMPC/Cartpole-v0", "DEQMPC/Quadrotor-v0",
                                    "DEQMPC/QPoleObs-v0"])
def test_render_rgb_array(env_id: str) -> None:
    env = gym.make(env_id, render_mode="rgb_array", width=160, height=128)
    u = env.unwrapped
    env.reset(seed=0)
    f1 = env.render()
    assert f1.dtype == np.uint8 and f1.shape == (128, 160, 3)
    assert f1.std() > 5.0
    x = u.state
    x[u.system.angle_indices[0] if u.system.angle_indices else 0] += 1.0
    if u.system.mrp_slice is not None:
        x[3:6] = [0.3, 0.0, 0.0]
    env.reset(options={"state": x})
    f2 = env.render()
    assert np.abs(f1.astype(int) - f2.astype(int)).sum() > 0
    # plan overlay: only the overlay pixels change
    plan = np.stack([u.state] * 2)
    plan_pts = u.system.position(plan) if u.system.position_slice else plan
    if u.system.position_slice is not None:
        plan_pts = plan_pts + np.array([[0.3, 0.0, 0.0], [0.6, 0.0, 0.2]])
    else:
        plan_pts = plan.copy()
        plan_pts[1, u.system.angle_indices[0]] += 0.5
    u.set_plan_overlay(plan_pts, None, [0] if u.obstacles else None)
    f3 = env.render()
    changed = (f3 != f2).any(-1).mean()
    assert 0.0 < changed < 0.3
    u.set_plan_overlay(None)
    np.testing.assert_array_equal(env.render(), f2)
    assert env.render() is not env.render()
    env.close()
    env.close()


def _rollout_compare(env_id: str, n: int, steps: int, seed: int) -> int:
    from deqmpc_gym.envs.vector import make_batched_env

    venv = make_batched_env(env_id, n)
    obs_b, info_b = venv.reset(seed=seed)
    envs = [gym.make(env_id) for _ in range(n)]
    obs = np.stack([e.reset(seed=seed + i)[0] for i, e in enumerate(envs)])
    np.testing.assert_array_equal(obs, obs_b)
    rng = np.random.default_rng(seed)
    dones = 0
    for _ in range(steps):
        acts = rng.uniform(-1.3, 1.3, (n, venv.system.nu)).astype(np.float32)
        ob, rb, tb, trb, ib = venv.step(acts)
        for i, e in enumerate(envs):
            o, r, te, tr, info = e.step(acts[i])
            if te or tr:
                dones += 1
                np.testing.assert_array_equal(o, ib["final_obs"][i])
                assert info["is_success"] == ib["final_info"]["is_success"][i]
                assert info["cost"] == ib["final_info"]["cost"][i]
                o, info = e.reset()
            np.testing.assert_array_equal(o, ob[i])
            assert te == tb[i] and tr == trb[i]
            assert math.isclose(r, rb[i], rel_tol=1e-12, abs_tol=1e-300) or (te and not math.isfinite(rb[i]))
            assert info["cost"] == ib["cost"][i] and info["is_success"] == ib["is_success"][i]
            if "min_obstacle_distance" in info:
                assert math.isclose(info["min_obstacle_distance"], ib["min_obstacle_distance"][i], abs_tol=1e-12)
    return dones


@pytest.mark.parametrize("env_id", ENV_IDS)
def test_batched_matches_single(env_id: str) -> None:
    dones = _rollout_compare(env_id, n=3, steps=50, seed=7)
    if "Quad" in env_id or "QPole" in env_id:
        assert dones > 0  # random quadrotors leave the flight volume, so autoreset is exercised


def test_batched_truncation_and_make_vec() -> None:
    venv = gym.make_vec("DEQMPC/Pendulum-v0", num_envs=4)
    assert venv.metadata["autoreset_mode"] == gym.vector.AutoresetMode.SAME_STEP
    obs, infos = venv.reset(seed=0)
    assert obs.shape == (4, 2) and obs.dtype == np.float32 and obs in venv.observation_space
    for _ in range(200):
        obs, r, term, trunc, infos = venv.step(np.zeros((4, 1), dtype=np.float32))
    assert trunc.all() and "final_obs" in infos and infos["_final_obs"].all()
    with pytest.raises(ShapeError, match=r"\(4, 1\)"):
        venv.step(np.zeros((3, 1), dtype=np.float32))
    with pytest.raises(ConfigError):
        gym.make_vec("DEQMPC/Pendulum-v0", num_envs=2, bogus=3)


def test_sb3_adapter_ppo_and_evaluate() -> None:
    from stable_baselines3 import PPO
    from stable_baselines3.common.evaluation import evaluate_policy
    from stable_baselines3.common.vec_env import VecMonitor, VecNormalize

    from deqmpc_gym.envs.sb3 import make_sb3_vec_env

    venv = make_sb3_vec_env("DEQMPC/QPole-v0", 4, seed=0)
    model = PPO("MlpPolicy", VecNormalize(venv), n_steps=64, batch_size=64, n_epochs=1, seed=0, device="cpu")
    model.learn(128)
    ev = VecMonitor(make_sb3_vec_env("DEQMPC/QPole-v0", 2, seed=1))
    rewards, lengths = evaluate_policy(model.policy, ev, n_eval_episodes=2, return_episode_rewards=True,
                                       warn=False)
    assert len(rewards) == 2 and all(1 <= n <= 200 for n in lengths)
    assert all(0.0 < r <= n for r, n in zip(rewards, lengths))


def test_sb3_adapter_semantics() -> None:
    from deqmpc_gym.envs.sb3 import make_sb3_vec_env

    venv = make_sb3_vec_env("DEQMPC/Pendulum-v0", 3, seed=5)
    obs = venv.reset()
    single = np.stack([gym.make("DEQMPC/Pendulum-v0").reset(seed=5 + i)[0] for i in range(3)])
    np.testing.assert_array_equal(obs, single)
    for _ in range(200):
        obs, rew, dones, infos = venv.step(np.zeros((3, 1), dtype=np.float32))
        assert rew.dtype == np.float32 and len({id(i) for i in infos}) == 3
    assert dones.all()
    for info in infos:
        assert info["TimeLimit.truncated"] is True and info["terminal_observation"].shape == (2,)
        assert isinstance(info["is_success"], bool)
    assert venv.get_attr("system")[0].name == "pendulum"
    assert venv.env_is_wrapped(gym.Wrapper) == [False] * 3


def test_user_defined_system_plugs_in() -> None:
    from deqmpc_gym.systems import System

    class DoubleIntegrator(System):
        name = "double_integrator"
        nx, nu, nq, dt = 2, 1, 1, 0.1
        u_low, u_high = (-1.0,), (1.0,)
        Q_diag, R_diag = (10.0, 1.0), (1e-3,)
        goal = (0.0, 0.0)
        init_low, init_high = (-2.0, -1.0), (2.0, 1.0)
        reward_weights, effort_weights = (1.0, 0.1), (0.01,)
        success_tolerance = (0.05, 0.1)

        def _step(self, x, u, ops):
            v = x[..., 1] + self.dt * u[..., 0]
            return ops.stack([x[..., 0] + self.dt * v, v])

    env = SystemEnv(DoubleIntegrator())
    check_env(env, skip_render_check=True)


# ---------------------------------------------------------------------------- physics sanity
def test_pendulum_energy_conserved_without_torque() -> None:
    env = SystemEnv("pendulum")
    env.reset(options={"state": np.array([2.0, 0.0])})
    energies = []
    for _ in range(2000):
        env.step(np.zeros(1, dtype=np.float32))
        th, thd = env.state
        energies.append(0.5 * thd**2 + 10.0 * math.cos(th))
    e = np.asarray(energies)
    e0 = 10.0 * math.cos(2.0)
    assert np.all(np.abs(e - e0) < 0.05 * 20.0)  # bounded oscillation of semi-implicit Euler
    assert abs(e[:200].mean() - e[-200:].mean()) < 0.1  # no drift


def test_quadrotor_hovers() -> None:
    env = SystemEnv("quadrotor")
    env.reset(options={"state": np.zeros(12)})
    a = env.to_normalized(env.system.nominal_control).astype(np.float32)
    for _ in range(200):
        obs, r, term, _, info = env.step(a)
        assert not term
    assert np.abs(obs[:3]).max() < 1e-3 and info["is_success"] and r > 0.999


def test_qpole_pole_falls_without_control() -> None:
    env = SystemEnv("qpole")
    x = np.array(env.system.goal, dtype=np.float64)
    x[6] = math.pi + 0.05
    env.reset(options={"state": x})
    a = env.to_normalized(env.system.nominal_control).astype(np.float32)
    dev = []
    for _ in range(60):
        obs, _, term, _, _ = env.step(a)
        assert not term
        dev.append(abs(float(obs[6]) - math.pi))
    assert dev[0] < 0.1 and max(dev) > 2.5  # swings down through hanging (|theta - pi| ~ pi)
    assert np.abs(obs[:3]).max() < 1e-3  # the free pole does not push the hovering quadrotor


def test_random_policy_far_below_good_policy() -> None:
    env = gym.make("DEQMPC/Pendulum-v0")
    env.reset(seed=0, options={"state": np.zeros(2)})
    good = sum(env.step(np.zeros(1, dtype=np.float32))[1] for _ in range(200))
    assert good > 199.0
    env.action_space.seed(0)
    returns = []
    for k in range(5):
        env.reset(seed=100 + k)
        returns.append(sum(env.step(env.action_space.sample())[1] for _ in range(200)))
    assert np.mean(returns) < 0.3 * good
