"""DEQ-MPC layer and DEQMPCPolicy: variants, gradients, warm starts, SB3 drop-in, persistence, bad input."""

from __future__ import annotations

import json

import gymnasium as gym
import numpy as np
import pytest
import torch

import deqmpc_gym  # noqa: F401
from deqmpc_gym import DEQMPCPolicy
from deqmpc_gym.errors import CheckpointError, ConfigError
from deqmpc_gym.policies import PolicyConfig, Variant

PEND = "DEQMPC/Pendulum-v0"
VARIANTS = [v.value for v in Variant]


def _policy(variant: str = "deq-mpc-deq", env: str = PEND, **kw) -> DEQMPCPolicy:
    torch.manual_seed(0)
    return DEQMPCPolicy.from_env(env, variant, hidden=kw.pop("hidden", 16), **kw)


@pytest.mark.parametrize("variant", VARIANTS)
def test_forward_iterates_and_gradients(variant: str) -> None:
    p = _policy(variant)
    x0 = torch.tensor([[0.5, 0.1], [-2.0, 0.3], [3.0, -0.5]], dtype=torch.float64)
    out = p.layer(x0)
    v = Variant.resolve(variant)
    n_expected = p.config.deq_mpc_iters if not v.diff_mpc else 1
    assert len(out.states) == len(out.thetas) == n_expected
    for x, th, u in zip(out.states, out.thetas, out.controls):
        assert x.shape == th.shape == (3, 5, 2)
        assert u.shape == (3, 5, 1)
        assert torch.isfinite(x).all() and torch.isfinite(u).all()
    target = torch.zeros(3, 5, 2, dtype=torch.float64)
    loss = sum((x - target).abs().mean() + 0.1 * (th - target).abs().mean() for x, th in zip(out.states, out.thetas))
    loss.backward()
    missing = [n for n, q in p.layer.net.named_parameters() if q.grad is None or not torch.isfinite(q.grad).all()
               or q.grad.abs().sum() == 0]
    assert not missing, f"no gradient reached {missing}"


def test_mpc_iterates_respect_control_bounds() -> None:
    p = _policy("deq-mpc-nn")
    out = p.layer(torch.tensor([[3.0, 0.0]], dtype=torch.float64))
    u = out.controls[-1]
    assert (u.abs() <= 5.0 + 1e-6).all()


def test_anderson_converges_at_init_and_after_training() -> None:
    p = _policy("deq-mpc-deq", hidden=32)
    x0 = torch.randn(16, 2, dtype=torch.float64)
    p.layer.eval()
    with torch.no_grad():
        out = p.layer(x0)
    assert out.net_stats is not None
    assert bool(out.net_stats.converged.all()), f"residual {out.net_stats.residual.max():.3g}"
    opt = torch.optim.Adam(p.layer.net.parameters(), lr=1e-3)
    p.layer.train()
    for _ in range(5):
        out = p.layer(x0)
        loss = sum(x.abs().mean() for x in out.states)
        opt.zero_grad()
        loss.backward()
        opt.step()
    p.layer.eval()
    with torch.no_grad():
        out = p.layer(x0)
    assert bool(out.net_stats.converged.all())


def test_act_is_finite_in_bounds_and_warm_start_is_cheaper() -> None:
    env = gym.make(PEND)
    p = _policy("deq-mpc-deq", env=env)
    obs, _ = env.reset(seed=3)
    p.reset()
    iters = []
    for _ in range(5):
        a = p.act(obs)
        assert a.shape == (1,) and a.dtype == np.float32 and np.all(np.abs(a) <= 1.0) and np.isfinite(a).all()
        iters.append(int(p.last_output.solver_iters.sum()))
        obs, *_ = env.step(a)
    assert max(iters[1:]) < iters[0], f"warm-started solves should need fewer Newton steps: {iters}"
    assert p.last_plan is not None and p.last_plan["states"].shape == (5, 2)


def test_predict_batched_and_episode_start_resets_rows() -> None:
    p = _policy("deq-mpc-nn")
    obs = np.array([[0.1, 0.0], [2.0, 0.5]], dtype=np.float32)
    a, state = p.predict(obs)
    assert a.shape == (2, 1)
    a2, state2 = p.predict(obs, state, episode_start=np.array([True, False]))
    cold, _ = p.predict(obs[:1])
    np.testing.assert_allclose(a2[0], cold[0], atol=1e-6)
    single, _ = p.predict(obs[0])
    assert single.shape == (1,)


def test_evaluate_policy_resets_warm_start_exactly_at_episode_starts() -> None:
    from stable_baselines3.common.env_util import make_vec_env
    from stable_baselines3.common.evaluation import evaluate_policy

    p = _policy("deq-mpc-nn")
    cold_rows: list[int] = []
    original = p.layer.forward

    def spy(x0, state=None):
        cold_rows.append(int(x0.shape[0]) if state is None else 0)
        return original(x0, state)

    p.layer.forward = spy  # type: ignore[method-assign]
    venv = make_vec_env(PEND, n_envs=2, seed=0, env_kwargs={"max_episode_steps": 10})
    mean, _ = evaluate_policy(p, venv, n_eval_episodes=4, warn=False)
    assert np.isfinite(mean)
    # 2 envs x 2 episodes of 10 steps: cold starts for both envs at steps 0 and 10, warm starts otherwise
    assert sum(cold_rows) == 4
    cold_steps = [i for i, c in enumerate(cold_rows) if c]
    assert cold_steps == [0, 10], cold_steps  # one layer call per control step


def test_save_load_roundtrip_bit_exact(tmp_path) -> None:
    p = _policy("diff-mpc-deq")
    path = p.save(tmp_path / "pol")
    meta = json.loads((path / "config.json").read_text())
    assert meta["env_id"] == PEND and meta["config"]["variant"] == "diff-mpc-deq"
    q = DEQMPCPolicy.load(path)
    for (k, a), (_, b) in zip(p.layer.state_dict().items(), q.layer.state_dict().items()):
        assert torch.equal(a, b), k
    obs = np.array([[1.0, 0.0]], dtype=np.float32)
    np.testing.assert_array_equal(p.predict(obs)[0], q.predict(obs)[0])


def test_load_rejects_corrupt_and_other_env(tmp_path) -> None:
    p = _policy("nn")
    path = p.save(tmp_path / "pol")
    with pytest.raises(CheckpointError, match="trained on"):
        DEQMPCPolicy.load(path, env="DEQMPC/Cartpole-v0")
    (path / "policy.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError):
        DEQMPCPolicy.load(path)
    with pytest.raises(CheckpointError):
        DEQMPCPolicy.load(tmp_path / "missing")


def test_eval_callback_end_to_end(tmp_path) -> None:
    from stable_baselines3.common.callbacks import EvalCallback
    from stable_baselines3.common.env_util import make_vec_env

    from deqmpc_gym.policies import attach_eval_callback

    p = _policy("deq-mpc-nn")
    eval_env = make_vec_env(PEND, n_envs=1, seed=1, env_kwargs={"max_episode_steps": 5})
    cb = EvalCallback(eval_env, eval_freq=1, n_eval_episodes=2, best_model_save_path=str(tmp_path / "best"),
                      log_path=str(tmp_path), verbose=0, warn=False)
    shim = attach_eval_callback(cb, p)
    shim.num_timesteps = 1
    assert cb.on_step()
    assert np.isfinite(cb.last_mean_reward)
    assert (tmp_path / "evaluations.npz").exists()
    assert (tmp_path / "best" / "best_model" / "policy.pt").exists()


@pytest.mark.parametrize("bad", [np.zeros(3), np.zeros((2, 3)), np.array([np.nan, 0.0]), np.array(["a", "b"])])
def test_bad_observations_raise(bad) -> None:
    p = _policy("nn")
    with pytest.raises(ValueError):
        p.predict(bad)


def test_env_without_system_and_bad_config_raise() -> None:
    with pytest.raises(ConfigError, match="system"):
        DEQMPCPolicy.from_env(gym.make("Pendulum-v1"))
    with pytest.raises(ConfigError):
        PolicyConfig(variant="bogus")
    with pytest.raises(ConfigError):
        _policy("nn", not_a_field=3)


def test_diverged_sample_gets_safe_action_others_unaffected() -> None:
    p = _policy("deq-mpc-nn")
    obs = np.array([[0.3, 0.0], [1.0, 0.2]], dtype=np.float32)
    ref, _ = p.predict(obs)
    original = p.layer.forward

    def poisoned(x0, state=None):
        out = original(x0, state)
        out.controls[-1][1] = float("nan")
        return out

    p.layer.forward = poisoned  # type: ignore[method-assign]
    a, _ = p.predict(obs)
    assert np.isfinite(a).all()
    assert p.last_fallback.tolist() == [False, True]
    np.testing.assert_allclose(a[0], ref[0], atol=1e-6)
    np.testing.assert_allclose(a[1], p._safe_action)


def test_obstacle_policy_builds_constraints() -> None:
    p = _policy("deq-mpc-nn", env="DEQMPC/QuadrotorObs-v0")
    assert p.layer.problem is not None
    assert p.layer.problem.n_ineq > 2 * 4


def test_config_from_dict_drops_retired_keys_and_rejects_unknown_ones() -> None:
    """A policy saved by an earlier version (with ``rho_init_max``) still loads; a typo still raises."""
    d = PolicyConfig(hidden=32).to_dict()
    assert PolicyConfig.from_dict({**d, "rho_init_max": 1e7}) == PolicyConfig(hidden=32)
    with pytest.raises(ConfigError, match="hiden"):
        PolicyConfig.from_dict({**d, "hiden": 3})


@pytest.mark.parametrize("variant", ["deq-mpc-deq", "diff-mpc-nn"])
def test_compiled_solver_option_gives_the_same_actions(variant: str) -> None:
    """PolicyConfig(compiled_solver=True) routes act()/predict() through CompiledSolver (its functions run
    eagerly here: the compiled path itself is tested in tests/mpc/test_compiled.py) with the same actions, and
    keeps the eager solver where a gradient is needed."""
    env = gym.make(PEND)
    ref, fast = _policy(variant, env=env), _policy(variant, env=env, compiled_solver=True)
    assert fast.layer._fast is not None and ref.layer._fast is None
    fast.layer._fast.compile = False
    calls = []
    inner = fast.layer._fast.__call__
    fast.layer._fast = type("Spy", (), {"__call__": lambda self, *a, **k: calls.append(1) or inner(*a, **k)})()
    obs, _ = env.reset(seed=5)
    ref.reset()
    fast.reset()
    for _ in range(4):
        a_ref, a_fast = ref.act(obs), fast.act(obs)
        np.testing.assert_allclose(a_fast, a_ref, atol=1e-6)
        obs, *_ = env.step(a_ref)
    n = len(calls)
    assert n >= 4
    out = fast.layer(torch.tensor([[0.5, 0.1]], dtype=torch.float64))  # training: gradients flow, eager solver
    out.controls[-1].sum().backward()
    assert len(calls) == n
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in fast.parameters())


def test_compiled_solver_option_rejects_unsupported_problems() -> None:
    with pytest.raises(ConfigError, match="control bounds only"):
        _policy("deq-mpc-nn", env="DEQMPC/QuadrotorObs-v0", compiled_solver=True)
    with pytest.raises(ConfigError, match="needs an MPC variant"):
        _policy("nn", compiled_solver=True)
    with pytest.raises(ConfigError, match="compiled_solver"):
        PolicyConfig(compiled_solver="yes")
