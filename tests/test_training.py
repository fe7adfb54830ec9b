"""Imitation training: window sampling, loss, a short run that learns, bit-exact resume, errors."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

import deqmpc_gym
from deqmpc_gym.data import ExpertDataset, Trajectory
from deqmpc_gym.envs.core import resolve_system
from deqmpc_gym.errors import CheckpointError, ConfigError, DatasetError
from deqmpc_gym.policies import DEQMPCPolicy, LayerOutput, StreamState
from deqmpc_gym.systems import System
from deqmpc_gym.training import (
    ImitationTrainer,
    TrainConfig,
    WindowSampler,
    batch_loss,
    iterate_loss,
    unwrap_angles,
    validation_loss,
    window_l1,
)
from deqmpc_gym.training.rundir import dataset_fingerprint

PEND = "DEQMPC/Pendulum-v0"
SHIPPED = Path(deqmpc_gym.__file__).parent / "datasets" / "Pendulum-v0-300.npz"


@pytest.fixture(scope="module")
def shipped() -> ExpertDataset:
    return ExpertDataset.load(SHIPPED, env_id=PEND)


@pytest.fixture(scope="module")
def small(shipped: ExpertDataset) -> ExpertDataset:
    return shipped.subset(30)


def _policy(variant: str = "deq-mpc-nn", seed: int = 0, hidden: int = 16) -> DEQMPCPolicy:
    torch.manual_seed(seed)
    return DEQMPCPolicy.from_env(PEND, variant, hidden=hidden)


def _pend() -> System:
    return resolve_system("pendulum")


# ---------------------------------------------------------------------------------------------- windows
def _coded_dataset(lengths: list[int]) -> ExpertDataset:
    """obs[:, 0] (the angle) = 0.01 * t, obs[:, 1] = 1000 * i + t: each knot says where it comes from."""
    trajs = []
    for i, L in enumerate(lengths):
        t = np.arange(L + 1, dtype=np.float64)
        obs = np.stack([0.01 * t, 1000.0 * i + t], axis=1)
        trajs.append(Trajectory(obs=obs, acts=np.zeros((L, 1), np.float32), rews=np.zeros(L), terminal=False))
    return ExpertDataset(PEND, trajs)


def test_window_masks_at_trajectory_ends() -> None:
    lengths = [3, 8, 1, 5]
    window = 6
    sampler = WindowSampler(_coded_dataset(lengths), _pend(), window, seed=0)
    assert len(sampler) == sum(lengths)  # every start with at least one following knot
    b = sampler.sample(3000)
    assert b.states.shape == (3000, window, 2) and b.mask.shape == (3000, window)
    assert b.states.dtype == torch.float64 and b.mask.dtype == torch.float64
    seen = set()
    for states, mask in zip(b.states.numpy(), b.mask.numpy()):
        i, s = divmod(int(round(states[0, 1])), 1000)
        n_knots = lengths[i] + 1
        assert 0 <= s <= n_knots - 2  # a window never starts at the final state
        valid = min(window, n_knots - s)
        np.testing.assert_array_equal(mask, (np.arange(window) < valid).astype(float))
        assert mask[:2].all()  # at least the start and one following knot
        expected_t = np.minimum(s + np.arange(window), n_knots - 1)  # past the end: the last state repeats
        np.testing.assert_allclose(states[:, 1], 1000.0 * i + expected_t)
        np.testing.assert_allclose(states[:, 0], 0.01 * expected_t)
        seen.add((i, s))
    assert len(seen) == len(sampler)  # uniform over all starts: all were drawn


def test_window_sampler_seeded_determinism(small: ExpertDataset) -> None:
    a = WindowSampler(small, _pend(), 7, seed=3)
    b = WindowSampler(small, _pend(), 7, seed=3)
    c = WindowSampler(small, _pend(), 7, seed=4)
    for _ in range(3):
        x, y, z = a.sample(16), b.sample(16), c.sample(16)
        assert torch.equal(x.states, y.states) and torch.equal(x.mask, y.mask)
    assert not torch.equal(x.states, z.states)
    f1 = a.fixed_batches(2, 8, seed=11)
    f2 = c.fixed_batches(2, 8, seed=11)  # fixed batches depend only on their own seed
    for p, q in zip(f1, f2):
        assert torch.equal(p.states, q.states)
    gen = np.random.default_rng(5)
    explicit = a.sample(4, np.random.default_rng(5))
    assert torch.equal(explicit.states, b.sample(4, gen).states)
    assert a.sample(2, dtype=torch.float32).states.dtype == torch.float32


@pytest.mark.parametrize("window", [7, 40])
def test_windows_unwrap_pendulum_angle(shipped: ExpertDataset, window: int) -> None:
    raw_jumps = sum(int((np.abs(np.diff(t.obs[:, 0])) > math.pi).sum()) for t in shipped.trajectories)
    assert raw_jumps > 0  # the wrapped data does cross +-pi, so the check below is not vacuous
    sampler = WindowSampler(shipped, _pend(), window, seed=0)
    b = sampler.sample(4000)
    theta = b.states[..., 0].numpy()
    assert np.abs(np.diff(theta, axis=1)).max() <= math.pi
    assert np.abs(theta).max() > math.pi  # some windows were actually unwrapped past +-pi
    # the first knot of every window is the wrapped dataset state
    assert np.abs(theta[:, 0]).max() <= math.pi + 1e-12
    # the velocity is untouched
    assert np.isfinite(b.states.numpy()).all()


def test_unwrap_angles_unit() -> None:
    x = np.array([[3.0, 1.0], [-3.0, 2.0], [-2.9, 3.0]])
    out = unwrap_angles(x, (0,))
    np.testing.assert_allclose(out[:, 0], [3.0, 2 * math.pi - 3.0, 2 * math.pi - 2.9])
    np.testing.assert_array_equal(out[:, 1], x[:, 1])
    np.testing.assert_array_equal(x[:, 0], [3.0, -3.0, -2.9])  # input untouched
    batched = unwrap_angles(np.stack([x, x]), (0,))
    np.testing.assert_allclose(batched[1], out)
    np.testing.assert_array_equal(unwrap_angles(x, ()), x)


def test_window_sampler_rejects_bad_data() -> None:
    with pytest.raises(DatasetError):
        WindowSampler(ExpertDataset(PEND, []), _pend(), 5)
    ds = _coded_dataset([4])
    with pytest.raises(DatasetError, match="nx"):
        WindowSampler(ds, resolve_system("cartpole"), 5)


# ---------------------------------------------------------------------------------------------- loss
def test_window_l1_masks() -> None:
    pred = torch.ones(2, 3, 2)
    target = torch.zeros(2, 3, 2)
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    # mean_b 1/T sum_t mask_t * sum_d |.| = mean(2*2/3, 2*1/3) = 1
    assert float(window_l1(pred, target, mask)) == pytest.approx(1.0)


def _fake_output(values: list[float], B: int = 4, T: int = 5, nx: int = 2) -> LayerOutput:
    xs = [torch.full((B, T, nx), v, dtype=torch.float64, requires_grad=True) for v in values]
    ths = [torch.full((B, T, nx), 2 * v, dtype=torch.float64, requires_grad=True) for v in values]
    us = [torch.zeros(B, T, 1, dtype=torch.float64) for _ in values]
    state = StreamState(plan=xs[-1].detach(), controls=us[-1])
    return LayerOutput(ths, xs, us, state)


def test_iterate_loss_final_only() -> None:
    out = _fake_output([5.0, 3.0, 1.0])
    target, mask = torch.zeros(4, 5, 2), torch.ones(4, 5)
    all_, end = iterate_loss(out, target, mask, 0.1, final_only=False)
    last, end2 = iterate_loss(out, target, mask, 0.1, final_only=True)
    # per iterate: 2 * v (sum over nx=2) + 0.1 * 2 * 2v
    assert float(all_.detach()) == pytest.approx(sum(2 * v + 0.4 * v for v in (5.0, 3.0, 1.0)))
    assert float(last.detach()) == pytest.approx(2 * 1.0 + 0.4 * 1.0)
    assert float(end) == float(end2) == pytest.approx(2.0)
    assert not end.requires_grad


@pytest.mark.parametrize("variant,final_only", [("diff-mpc-nn", True), ("diff-mpc-deq", True),
                                                ("deq-mpc-nn", False), ("deq-mpc-deq", False)])
def test_batch_loss_uses_final_iterate_for_diff_mpc(variant: str, final_only: bool, monkeypatch, small) -> None:
    p = _policy(variant)
    values = [4.0, 2.0, 0.5]
    monkeypatch.setattr(p.layer, "forward", lambda x0, state=None: _fake_output(values, B=x0.shape[0]))
    batch = WindowSampler(small, p.system, p.config.horizon + 2, seed=0).sample(4)
    batch = batch._replace(states=torch.zeros_like(batch.states))
    cfg = TrainConfig(streaming_steps=2, deq_reg=0.1)
    loss, metrics = batch_loss(p, batch, cfg)
    used = values[-1:] if final_only else values
    expected = sum(2 * v + 0.4 * v for v in used)  # each of the 3 calls gives the same value; divided by 3
    assert float(loss.detach()) == pytest.approx(expected)
    assert metrics["loss"] == pytest.approx(expected) and metrics["loss_end"] == pytest.approx(2 * values[-1])


def test_batch_loss_real_diff_mpc_matches_final_iterate(small) -> None:
    p = _policy("diff-mpc-nn")
    batch = WindowSampler(small, p.system, p.config.horizon, seed=0).sample(8)
    cfg = TrainConfig(streaming_steps=0)
    loss, _ = batch_loss(p, batch, cfg)
    out = p.layer(batch.states[:, 0], None)
    T = p.config.horizon
    manual = window_l1(out.states[-1], batch.states[:, :T], batch.mask[:, :T]) + \
        cfg.deq_reg * window_l1(out.thetas[-1], batch.states[:, :T], batch.mask[:, :T])
    assert float(loss.detach()) == pytest.approx(float(manual.detach()), rel=1e-9)
    loss.backward()
    grads = [q.grad for q in p.layer.net.parameters() if q.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)


# ---------------------------------------------------------------------------------------------- config
@pytest.mark.parametrize("bad", [dict(steps=0), dict(batch_size=0), dict(val_every=0), dict(val_batches=0),
                                 dict(log_every=0), dict(streaming_steps=-1), dict(val_fraction=0.0),
                                 dict(val_fraction=1.0), dict(lr=0.0), dict(lr=float("nan")), dict(grad_clip=-1.0)])
def test_train_config_rejects_bad_values(bad: dict) -> None:
    with pytest.raises(ConfigError):
        TrainConfig(**bad)


def test_train_config_from_dict() -> None:
    assert TrainConfig.from_dict({"steps": 5, "lr": 0.01}) == TrainConfig(steps=5, lr=0.01)
    with pytest.raises(ConfigError, match="unknown TrainConfig keys") as info:
        TrainConfig.from_dict({"steps": 5, "learning_rate": 0.1})
    assert "learning_rate" in str(info.value)


# ---------------------------------------------------------------------------------------------- trainer
def test_dataset_env_mismatch_raises(small: ExpertDataset, tmp_path: Path) -> None:
    other = ExpertDataset("DEQMPC/Cartpole-v0", small.trajectories)
    with pytest.raises(DatasetError) as info:
        ImitationTrainer(_policy(), other, TrainConfig(steps=2, batch_size=4, val_batches=1), tmp_path)
    assert "DEQMPC/Cartpole-v0" in str(info.value) and PEND in str(info.value)


def _cfg(**kw) -> TrainConfig:
    base = dict(steps=20, batch_size=8, val_every=5, val_batches=2, log_every=5)
    base.update(kw)
    return TrainConfig(**base)


def test_short_training_lowers_validation_loss(small: ExpertDataset, tmp_path: Path) -> None:
    p = _policy("deq-mpc-nn")
    cfg = _cfg(steps=30, batch_size=16, val_every=10)
    trainer = ImitationTrainer(p, small, cfg, tmp_path / "run", progress=False)
    initial = validation_loss(p, trainer.val_batches)
    res = trainer.train()
    assert res.steps == 30 and len(res.history) == 3
    first = res.history[0]["val_loss"]
    assert res.best_val_loss < first < initial
    assert res.best_val_loss == min(h["val_loss"] for h in res.history)
    assert res.best_step in (20, 30)
    for name in ("checkpoint.pt", "best/policy.pt", "final/policy.pt", "result.json", "progress.csv"):
        assert (tmp_path / "run" / name).exists(), name
    saved = json.loads((tmp_path / "run" / "result.json").read_text())
    assert saved["best_val_loss"] == pytest.approx(res.best_val_loss)
    best = DEQMPCPolicy.load(tmp_path / "run" / "best")
    assert validation_loss(best, trainer.val_batches) == pytest.approx(res.best_val_loss, rel=1e-9)
    assert not list((tmp_path / "run").glob(".*.tmp"))


class _Interrupt:
    def __init__(self, at: int) -> None:
        self.at = at

    def __call__(self, trainer: ImitationTrainer, step: int, metrics: dict) -> None:
        if step == self.at:
            raise KeyboardInterrupt


def test_resume_after_kill_is_bit_exact(small: ExpertDataset, tmp_path: Path) -> None:
    cfg = _cfg(steps=20, val_every=5)
    a = _policy(seed=0)
    res_a = ImitationTrainer(a, small, cfg, tmp_path / "A", progress=False).train()

    b = _policy(seed=0)
    with pytest.raises(KeyboardInterrupt):
        ImitationTrainer(b, small, cfg, tmp_path / "B", callbacks=(_Interrupt(10),), progress=False).train()
    ck = torch.load(tmp_path / "B" / "checkpoint.pt", weights_only=True)
    assert ck["step"] == 10

    b2 = _policy(seed=123)  # different init: the checkpoint must restore everything
    trainer = ImitationTrainer(b2, small, cfg, tmp_path / "B", progress=False)
    res_b = trainer.train(resume=True)
    assert res_b.steps == 20
    sa, sb = a.layer.state_dict(), b2.layer.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k
    assert [h["val_loss"] for h in res_a.history] == [h["val_loss"] for h in res_b.history]
    assert (res_a.best_val_loss, res_a.best_step) == (res_b.best_val_loss, res_b.best_step)
    # resuming a finished run is a no-op
    again = ImitationTrainer(_policy(seed=7), small, cfg, tmp_path / "B", progress=False).train(resume=True)
    assert again.steps == 20 and again.history == res_b.history


def test_extending_a_finished_run_matches_the_longer_run(small: ExpertDataset, tmp_path: Path) -> None:
    """Only the step budget may change on resume: 10 steps, then resumed to 20, equals 20 steps at once."""
    a = _policy(seed=0)
    ImitationTrainer(a, small, _cfg(steps=20, val_every=5), tmp_path / "A", progress=False).train()
    ImitationTrainer(_policy(seed=0), small, _cfg(steps=10, val_every=5), tmp_path / "B", progress=False).train()
    b = _policy(seed=5)
    res = ImitationTrainer(b, small, _cfg(steps=20, val_every=5), tmp_path / "B", progress=False).train(resume=True)
    assert res.steps == 20
    for k, v in a.layer.state_dict().items():
        assert torch.equal(v, b.layer.state_dict()[k]), k


def test_resume_with_other_config_raises(small: ExpertDataset, tmp_path: Path) -> None:
    ImitationTrainer(_policy(), small, _cfg(steps=5, val_every=5), tmp_path, progress=False).train()
    with pytest.raises(CheckpointError, match="TrainConfig"):
        ImitationTrainer(_policy(), small, _cfg(steps=5, val_every=5, lr=0.5), tmp_path,
                         progress=False).train(resume=True)


@pytest.mark.parametrize("content", [b"garbage, not a torch file", b""])
def test_corrupt_checkpoint_raises(small: ExpertDataset, tmp_path: Path, content: bytes) -> None:
    (tmp_path / "checkpoint.pt").write_bytes(content)
    trainer = ImitationTrainer(_policy(), small, _cfg(steps=2), tmp_path, progress=False)
    with pytest.raises(CheckpointError) as info:
        trainer.train(resume=True)
    msg = str(info.value)
    assert "checkpoint.pt" in msg and "delete it" in msg


def test_foreign_checkpoint_raises(small: ExpertDataset, tmp_path: Path) -> None:
    torch.save({"format": "something-else", "step": 3}, tmp_path / "checkpoint.pt")
    with pytest.raises(CheckpointError, match="not a deqmpc_gym training checkpoint"):
        ImitationTrainer(_policy(), small, _cfg(steps=2), tmp_path, progress=False).train(resume=True)


def test_checkpoint_of_other_architecture_raises(small: ExpertDataset, tmp_path: Path) -> None:
    cfg = _cfg(steps=5, val_every=5)
    ImitationTrainer(_policy(hidden=16), small, cfg, tmp_path, progress=False).train()
    with pytest.raises(CheckpointError, match="policy.hidden: 16 -> 32"):
        ImitationTrainer(_policy(hidden=32), small, cfg, tmp_path, progress=False).train(resume=True)


def test_overwrite_starts_over(small: ExpertDataset, tmp_path: Path) -> None:
    cfg = _cfg(steps=5, val_every=5)
    ImitationTrainer(_policy(), small, cfg, tmp_path, progress=False).train()
    (tmp_path / "checkpoint.pt").write_bytes(b"corrupt")  # deleted by overwrite=True
    res = ImitationTrainer(_policy(), small, cfg, tmp_path, progress=False).train(overwrite=True)
    assert res.steps == 5


# ---------------------------------------------------------------------------------------------- state noise
def test_state_noise_perturbs_the_inputs_not_the_targets(small: ExpertDataset, tmp_path: Path, monkeypatch) -> None:
    seen: list[tuple[torch.Tensor, torch.Tensor | None]] = []
    import deqmpc_gym.training.trainer as trainer_mod

    real = trainer_mod.batch_loss

    def spy(policy, batch, config, inputs=None):
        seen.append((batch.states.clone(), None if inputs is None else inputs.clone()))
        return real(policy, batch, config, inputs)

    monkeypatch.setattr(trainer_mod, "batch_loss", spy)
    cfg = TrainConfig(steps=2, batch_size=4, val_batches=1, val_every=2, state_noise=0.1)
    ImitationTrainer(_policy(), small, cfg, tmp_path / "a", progress=False).train()
    states, inputs = seen[0]
    assert inputs is not None and inputs.shape == states.shape
    std = np.concatenate([t.obs for t in small.trajectories]).std(0)
    rel = ((inputs - states).abs() / torch.as_tensor(std)).mean().item()
    assert 0.03 < rel < 0.2  # mean |N(0, 0.1)| = 0.08 of a coordinate's spread
    seen.clear()
    ImitationTrainer(_policy(), small, TrainConfig(steps=1, batch_size=4, val_batches=1, val_every=1), tmp_path / "b",
                     progress=False).train()
    assert seen[0][1] is None  # off by default (the paper's protocol)
    with pytest.raises(ConfigError, match="state_noise"):
        TrainConfig(state_noise=-0.1)


def test_a_checkpoint_from_before_state_noise_resumes(small: ExpertDataset, tmp_path: Path) -> None:
    """Run definitions written without ``train.state_noise`` resume as state_noise = 0."""
    cfg = TrainConfig(steps=2, batch_size=4, val_batches=1, val_every=2)
    ImitationTrainer(_policy(), small, cfg, tmp_path, progress=False).train()
    ckpt = tmp_path / "checkpoint.pt"
    payload = torch.load(ckpt, weights_only=True)
    run = json.loads(payload["run_json"])
    del run["train.state_noise"]
    payload["run_json"] = json.dumps(run)
    torch.save(payload, ckpt)
    res = ImitationTrainer(_policy(), small, TrainConfig(steps=4, batch_size=4, val_batches=1, val_every=2), tmp_path,
                           progress=False).train(resume=True)
    assert res.steps == 4
    with pytest.raises(CheckpointError, match="state_noise"):
        ImitationTrainer(_policy(), small, TrainConfig(steps=6, batch_size=4, val_batches=1, val_every=2,
                                                       state_noise=0.05), tmp_path, progress=False).train(resume=True)


def test_the_evaluator_records_a_learning_curve(small: ExpertDataset, tmp_path: Path) -> None:
    calls: list[int] = []

    def evaluator(policy: DEQMPCPolicy) -> dict[str, float]:
        calls.append(1)
        return {"score": 0.5 * len(calls), "success_rate": 0.25}

    cfg = TrainConfig(steps=6, batch_size=4, val_batches=1, val_every=2, eval_every=4)
    trainer = ImitationTrainer(_policy(), small, cfg, tmp_path, progress=False, evaluator=evaluator)
    res = trainer.train()
    assert len(calls) == 1 and res.history[1]["eval_score"] == 0.5 and "eval_score" not in res.history[0]
    rows = (tmp_path / "progress.csv").read_text().splitlines()
    cols = rows[0].split(",")
    assert rows[2].split(",")[cols.index("eval/score")] == "0.5" and rows[1].split(",")[cols.index("eval/score")] == ""
    with pytest.raises(ConfigError, match="eval_every"):
        TrainConfig(val_every=100, eval_every=150)


def test_dagger_adds_expert_labels_from_the_policys_own_states(small: ExpertDataset, tmp_path: Path) -> None:
    from deqmpc_gym.experiments.dagger import DaggerConfig, dagger, visited_states
    from deqmpc_gym.experts import load_expert

    policy = _policy()
    seqs = visited_states(policy, PEND, episodes=2, seed=0, max_steps=10)  # round 0 of the config below
    assert [s.shape for s in seqs] == [(10, 2), (10, 2)]
    cfg = DaggerConfig(rounds=1, episodes=2, states_per_episode=3, label_steps=5, train_steps=2, max_steps=10)
    tcfg = TrainConfig(batch_size=4, val_batches=1, val_every=2)
    tuned, ds = dagger(policy, load_expert(PEND), small, PEND, tmp_path, cfg, tcfg)
    new = ds.trajectories[len(small):]
    assert len(new) == 6 and all(len(t) == 5 for t in new)
    starts = np.stack([t.obs[0] for t in new])
    visited = np.concatenate(seqs)
    assert all(np.abs(visited - s).max(1).min() < 1e-9 for s in starts)  # each label starts at a visited state
    log = json.loads((tmp_path / "dagger.json").read_text())
    assert log["rounds"][0]["dataset_trajectories"] == len(small) + 6
    assert (tmp_path / "round_0" / "best" / "policy.pt").exists() and tuned is not policy
    with pytest.raises(ConfigError, match="rounds"):
        DaggerConfig(rounds=0)


def test_dagger_keeps_the_round_that_scores_best_in_closed_loop(small: ExpertDataset, tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """With ``select_episodes`` every round and the starting policy are scored on validation episodes (a real
    rollout against the expert on the same episodes) and the best-scoring policy is returned; a validation seed
    range that overlaps the evaluation seeds is refused."""
    import deqmpc_gym.experiments.dagger as dg
    from deqmpc_gym.experts import load_expert

    policy = _policy()
    cfg = dg.DaggerConfig(rounds=2, episodes=2, states_per_episode=2, label_steps=5, train_steps=2, max_steps=10,
                          select_episodes=2)
    real = dg._closed_loop_score(policy, load_expert(PEND), PEND, cfg)
    assert np.isfinite(real)
    scores = iter([0.5, 0.9, 0.7])  # start, round 0, round 1: round 0 is the best
    seen = []

    def fake(p, expert, env_id, config, expert_return=None):
        seen.append(p)
        return next(scores)

    monkeypatch.setattr(dg, "_closed_loop_score", fake)
    references = []
    monkeypatch.setattr(dg, "_expert_return", lambda *a: references.append(a) or 1.0)
    tuned, _ = dg.dagger(policy, load_expert(PEND), small, PEND, tmp_path, cfg,
                         TrainConfig(batch_size=4, val_batches=1, val_every=2))
    assert tuned is not policy and tuned is not seen[2]
    assert len(references) == 1  # the expert's validation return: once per call, not once per score

    def weights(p) -> list[torch.Tensor]:
        return [t.detach().clone() for t in p.layer.state_dict().values()]

    # the kept round's weights as saved, not those the later rounds trained further in place
    saved = weights(DEQMPCPolicy.load(tmp_path / "round_0" / "best"))
    assert all(torch.equal(a, b) for a, b in zip(weights(tuned), saved, strict=True))
    assert not all(torch.equal(a, b) for a, b in zip(weights(seen[2]), saved, strict=True))
    log = json.loads((tmp_path / "dagger.json").read_text())["rounds"]
    assert [r["closed_loop_score"] for r in log] == [0.5, 0.9, 0.7] and log[0]["round"] == -1
    # the starting policy scores best: its weights as they were, although round 0 trained it in place
    policy2, scores = _policy(), iter([0.9, 0.5, 0.7])
    start = weights(policy2)
    tuned, _ = dg.dagger(policy2, load_expert(PEND), small, PEND, tmp_path / "again", cfg,
                         TrainConfig(batch_size=4, val_batches=1, val_every=2))
    assert all(torch.equal(a, b) for a, b in zip(weights(tuned), start, strict=True))
    assert not all(torch.equal(a, b) for a, b in zip(weights(policy2), start, strict=True))  # trained in place
    # patience 1: round 0 does not beat the start (0.9), so the rounds stop there
    scores = iter([0.9, 0.5, 0.7])
    tuned, _ = dg.dagger(_policy(), load_expert(PEND), small, PEND, tmp_path / "patience",
                         dataclasses.replace(cfg, patience=1), TrainConfig(batch_size=4, val_batches=1, val_every=2))
    log = json.loads((tmp_path / "patience" / "dagger.json").read_text())["rounds"]
    assert [r["round"] for r in log] == [-1, 0] and not (tmp_path / "patience" / "round_1").exists()
    with pytest.raises(ConfigError, match="patience"):
        dg.DaggerConfig(patience=2)  # without select_episodes
    for seed in (10_100, 9_950):
        with pytest.raises(ConfigError, match="overlaps the evaluation seeds"):
            dg.DaggerConfig(select_episodes=100, select_seed=seed)
    dg.DaggerConfig(select_episodes=100, select_seed=9_900)  # ends at 9999


def test_dagger_on_a_plateau_goes_back_to_the_best_policy_at_a_lower_rate(
        small: ExpertDataset, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """With ``plateau_lr_factor`` a round without a better score sends the next round back to the best policy at the
    rate times the factor (compounding); a later call replays the finished rounds into the same schedule; the
    factor needs validation episodes and must be in (0, 1]."""
    import deqmpc_gym.experiments.dagger as dg
    from deqmpc_gym.experts import load_expert

    cfg = dg.DaggerConfig(rounds=3, episodes=2, states_per_episode=2, label_steps=5, train_steps=2, max_steps=10,
                          select_episodes=2, plateau_lr_factor=0.3)
    tcfg = TrainConfig(batch_size=4, val_batches=1, val_every=2, lr=1e-3)
    scores = iter([0.5, 0.9, 0.7])  # start, round 0, round 1: round 1 does not beat round 0
    monkeypatch.setattr(dg, "_expert_return", lambda *a: 1.0)
    monkeypatch.setattr(dg, "_closed_loop_score", lambda *a: next(scores))
    starts: list[list[torch.Tensor]] = []
    real = dg.visited_states

    def visited(p, *a):
        starts.append([t.detach().clone() for t in p.layer.state_dict().values()])
        return real(p, *a)

    monkeypatch.setattr(dg, "visited_states", visited)
    dg.dagger(_policy(), load_expert(PEND), small, PEND, tmp_path, dataclasses.replace(cfg, rounds=2), tcfg)
    scores = iter([0.95])
    dg.dagger(_policy(), load_expert(PEND), small, PEND, tmp_path, cfg, tcfg)  # replays rounds 0, 1; runs round 2
    assert len(starts) == 3
    log = json.loads((tmp_path / "dagger.json").read_text())["rounds"]
    assert [e["round"] for e in log] == [-1, 0, 1, 2]
    assert [e["lr"] for e in log[1:]] == pytest.approx([1e-3, 1e-3, 3e-4])
    round0 = DEQMPCPolicy.load(tmp_path / "round_0" / "best").layer.state_dict().values()
    assert all(torch.equal(a, b) for a, b in zip(starts[-1], round0, strict=True))  # round 2 starts from round 0
    assert [e["round"] for e in dg.lineage(log, 2, restarts=True)] == [0, 2]  # the records' account of that chain
    with pytest.raises(ConfigError, match="plateau_lr_factor"):
        dg.DaggerConfig(plateau_lr_factor=0.5)  # without select_episodes
    with pytest.raises(ConfigError, match=r"\(0, 1\]"):
        dg.DaggerConfig(select_episodes=2, plateau_lr_factor=0.0)


def test_dagger_min_lr_floors_the_plateau_schedule_and_a_changed_schedule_is_refused_on_resume(
        small: ExpertDataset, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``min_lr`` stops the plateau schedule from lowering the rate further (1e-3, 3e-4, then 3e-4 again where the
    factor alone would give 9e-5); a later call whose schedule gives a finished round another rate (the floor
    changed) raises a ConfigError naming the round and what to delete, and leaves the folder as it was; the floor
    needs the plateau factor and is not negative."""
    import deqmpc_gym.experiments.dagger as dg
    from deqmpc_gym.experts import load_expert

    cfg = dg.DaggerConfig(rounds=3, episodes=2, states_per_episode=2, label_steps=5, train_steps=2, max_steps=10,
                          select_episodes=2, plateau_lr_factor=0.3, min_lr=3e-4)
    tcfg = TrainConfig(batch_size=4, val_batches=1, val_every=2, lr=1e-3)
    scores = iter([0.5, 0.4, 0.3, 0.2])  # no round beats the starting policy: the rate drops after each
    monkeypatch.setattr(dg, "_expert_return", lambda *a: 1.0)
    monkeypatch.setattr(dg, "_closed_loop_score", lambda *a: next(scores))
    dg.dagger(_policy(), load_expert(PEND), small, PEND, tmp_path, cfg, tcfg)
    record = (tmp_path / "dagger.json").read_text()
    assert [e["lr"] for e in json.loads(record)["rounds"][1:]] == pytest.approx([1e-3, 3e-4, 3e-4])
    with pytest.raises(ConfigError, match=r"round_2 was trained at lr 0.0003.*gives it 9e-05.*delete round_2"):
        dg.dagger(_policy(), load_expert(PEND), small, PEND, tmp_path, dataclasses.replace(cfg, min_lr=0.0), tcfg)
    assert (tmp_path / "dagger.json").read_text() == record
    with pytest.raises(ConfigError, match="min_lr"):
        dg.DaggerConfig(select_episodes=2, min_lr=1e-4)  # without plateau_lr_factor < 1
    with pytest.raises(ConfigError, match=">= 0"):
        dg.DaggerConfig(select_episodes=2, plateau_lr_factor=0.3, min_lr=-1.0)


def test_a_repeated_dagger_call_continues_from_the_folder_without_rolling_out_again(
        small: ExpertDataset, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A second call of the same run reads each round's labels, training and score from the folder (no rollout,
    no labelling, no closed-loop evaluation) and returns the same policy and dataset; more rounds continue after
    the finished ones; another run's settings or starting policy in the same folder are refused."""
    import deqmpc_gym.experiments.dagger as dg
    from deqmpc_gym.experts import load_expert

    cfg = dg.DaggerConfig(rounds=2, episodes=2, states_per_episode=2, label_steps=5, train_steps=2, max_steps=10,
                          select_episodes=2)
    tcfg = TrainConfig(batch_size=4, val_batches=1, val_every=2)
    expert = load_expert(PEND)
    first, data = dg.dagger(_policy(), expert, small, PEND, tmp_path, cfg, tcfg)
    log = json.loads((tmp_path / "dagger.json").read_text())
    assert (tmp_path / "round_1" / "labels.npz").is_file() and len(log["run"]) == 16

    def refuse(*args, **kwargs):
        raise AssertionError("rolled out again")

    for name in ("visited_states", "_closed_loop_score", "_expert_return"):
        monkeypatch.setattr(dg, name, refuse)
    monkeypatch.setattr("deqmpc_gym.experts.collect.collect_from_states", refuse)
    again, data2 = dg.dagger(_policy(), expert, small, PEND, tmp_path, cfg, tcfg)
    assert json.loads((tmp_path / "dagger.json").read_text()) == log
    assert dataset_fingerprint(data2) == dataset_fingerprint(data)
    for a, b in zip(first.layer.state_dict().values(), again.layer.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    # one more round: only round 2 rolls out (the random picks continue from the saved state)
    monkeypatch.undo()
    seen = []
    real = dg.visited_states
    monkeypatch.setattr(dg, "visited_states", lambda p, e, n, seed, m: seen.append(seed) or real(p, e, n, seed, m))
    dg.dagger(_policy(), expert, small, PEND, tmp_path, dataclasses.replace(cfg, rounds=3), tcfg)
    assert seen == [2000] and len(json.loads((tmp_path / "dagger.json").read_text())["rounds"]) == 4
    # a kept run without its label files (they are the bulk of a run's state): the finished rounds roll out and
    # label again, from the same policies and random picks, into the same dataset, and are not trained again
    labels = {r: ExpertDataset.load(tmp_path / f"round_{r}" / "labels.npz") for r in range(3)}
    for r in range(3):
        (tmp_path / f"round_{r}" / "labels.npz").unlink()
    trained = [(tmp_path / f"round_{r}" / "best" / "policy.pt").stat().st_mtime_ns for r in range(3)]
    seen.clear()
    _, data3 = dg.dagger(_policy(), expert, small, PEND, tmp_path, dataclasses.replace(cfg, rounds=3), tcfg)
    assert seen == [0, 1000, 2000] and len(json.loads((tmp_path / "dagger.json").read_text())["rounds"]) == 4
    for r in range(3):
        again = ExpertDataset.load(tmp_path / f"round_{r}" / "labels.npz")
        assert dataset_fingerprint(again) == dataset_fingerprint(labels[r])
    assert trained == [(tmp_path / f"round_{r}" / "best" / "policy.pt").stat().st_mtime_ns for r in range(3)]
    with pytest.raises(ConfigError, match="another DAgger run"):
        dg.dagger(_policy(), expert, small, PEND, tmp_path, dataclasses.replace(cfg, states_per_episode=3), tcfg)
    with pytest.raises(ConfigError, match="another DAgger run"):
        dg.dagger(_policy(seed=1), expert, small, PEND, tmp_path, cfg, tcfg)


# ---------------------------------------------------------------------------------------------- SB3 callbacks
def test_an_sb3_eval_callback_runs_at_validations_and_can_stop_training(small: ExpertDataset, tmp_path: Path) -> None:
    """An SB3 ``EvalCallback`` is passed as it is: it evaluates the policy (closed loop, through its ``predict``)
    at every validation with ``num_timesteps`` = the step, saves the best model, and ``False`` from a callback
    stops training after that validation; plain callables keep working beside it."""
    import gymnasium as gym
    from stable_baselines3.common.callbacks import BaseCallback, EvalCallback

    class StopAt(BaseCallback):
        def __init__(self, n: int) -> None:
            super().__init__()
            self.n, self.seen, self.started, self.ended = n, [], False, False

        def _on_training_start(self) -> None:
            self.started = True

        def _on_step(self) -> bool:
            self.seen.append((self.num_timesteps, self.locals["step"], self.locals["windows_seen"],
                              self.locals["metrics"]["val_loss"]))
            return self.n_calls < self.n

        def _on_training_end(self) -> None:
            self.ended = True

    env = gym.make(PEND, max_episode_steps=5)
    ev = EvalCallback(env, eval_freq=1, n_eval_episodes=2, best_model_save_path=str(tmp_path / "cb"),
                      log_path=str(tmp_path / "cb"), verbose=0, warn=False)
    stop, plain = StopAt(2), []
    res = ImitationTrainer(_policy(), small, _cfg(steps=20, val_every=5), tmp_path / "run",
                           callbacks=[ev, stop, lambda t, step, m: plain.append(step)], progress=False).train()
    assert res.steps == 10 and plain == [5, 10]  # stopped at the 2nd validation; the run ends there as finished
    assert stop.started and stop.ended
    assert [s[:3] for s in stop.seen] == [(5, 5, 40), (10, 10, 80)]
    assert [s[3] for s in stop.seen] == [h["val_loss"] for h in res.history]
    assert ev.n_calls == 2 and ev.evaluations_timesteps == [5, 10]
    assert np.asarray(ev.evaluations_results).shape == (2, 2) and np.isfinite(ev.last_mean_reward)
    assert (tmp_path / "cb" / "best_model" / "policy.pt").exists() and (tmp_path / "cb" / "evaluations.npz").exists()
    assert (tmp_path / "run" / "final").exists() and (tmp_path / "run" / "result.json").exists()
    # a single callback is accepted as it is, and resume continues a stopped run
    res2 = ImitationTrainer(_policy(), small, _cfg(steps=15, val_every=5), tmp_path / "run",
                            callbacks=StopAt(5), progress=False).train(resume=True)
    assert res2.steps == 15
    with pytest.raises(ConfigError, match="callbacks"):
        ImitationTrainer(_policy(), small, _cfg(), tmp_path / "bad", callbacks=(3,), progress=False)
    with pytest.raises(ConfigError, match="callbacks"):
        ImitationTrainer(_policy(), small, _cfg(), tmp_path / "bad", callbacks=3, progress=False)
