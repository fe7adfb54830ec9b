"""Tampered files, absurd inputs, bad data, devices, CLI argument errors and API misuse get typed errors.

Training-folder behaviour (locks, resume checks, Ctrl-C, progress.csv) is in ``test_run_folder.py``.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

import deqmpc_gym
from deqmpc_gym import DEQMPCPolicy
from deqmpc_gym.cli import main
from deqmpc_gym.data import SCHEMA, SCHEMA_VERSION, ExpertDataset, Trajectory
from deqmpc_gym.envs import SystemEnv, make_batched_env
from deqmpc_gym.errors import (
    CheckpointError,
    ConfigError,
    DatasetError,
    DeviceError,
    OutputPathError,
    ResetNeeded,
    ShapeError,
    UntrustedEnvIdError,
)
from deqmpc_gym.policies import PolicyConfig

PEND = "DEQMPC/Pendulum-v0"
ROOT = Path(deqmpc_gym.__file__).resolve().parent.parent
CUDA = torch.cuda.is_available()


def _policy(variant: str = "deq-mpc-nn", env: str = PEND, hidden: int = 8) -> DEQMPCPolicy:
    torch.manual_seed(0)
    return DEQMPCPolicy.from_env(env, variant, hidden=hidden)


def _subprocess_env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep))
    return env


# ---------------------------------------------------------------------------------------------- security
EVIL_MODULE = "deqmpc_evil_probe"


@pytest.fixture
def evil_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An importable module that leaves a marker file when imported (as an attacker's code would run)."""
    marker = tmp_path / "imported.txt"
    (tmp_path / f"{EVIL_MODULE}.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, EVIL_MODULE, raising=False)
    return marker


def _rewrite_policy_meta(path: Path, **changes: object) -> None:
    payload = torch.load(path / "policy.pt", weights_only=True)
    meta = json.loads(payload["meta_json"])
    meta.update(changes)
    payload["meta_json"] = json.dumps(meta)
    torch.save(payload, path / "policy.pt")


def test_policy_load_never_imports_the_module_of_a_stored_env_id(tmp_path: Path, evil_module: Path) -> None:
    path = _policy().save(tmp_path / "pol")
    _rewrite_policy_meta(path, env_id=f"{EVIL_MODULE}:Evil-v0")
    with pytest.raises(UntrustedEnvIdError, match="not a registered DEQMPC"):
        DEQMPCPolicy.load(path)
    assert not evil_module.exists() and EVIL_MODULE not in sys.modules
    # an id the caller names explicitly is the caller's decision; a different one is refused without importing
    with pytest.raises(CheckpointError, match=f"{EVIL_MODULE}:Evil-v0"):
        DEQMPCPolicy.load(path, env=PEND)
    assert not evil_module.exists()


def test_policy_load_refuses_unregistered_ids_and_file_env_kwargs(tmp_path: Path) -> None:
    path = _policy().save(tmp_path / "pol")
    _rewrite_policy_meta(path, env_id="Pendulum-v1")  # registered, but not a DEQMPC/* id
    with pytest.raises(UntrustedEnvIdError):
        DEQMPCPolicy.load(path)
    path = _policy().save(tmp_path / "pol2")
    _rewrite_policy_meta(path, env_kwargs={"entry_point": "os:system"})
    with pytest.raises(CheckpointError, match="entry_point"):
        DEQMPCPolicy.load(path)


def test_dataset_and_expert_card_env_ids_are_checked(tmp_path: Path, evil_module: Path) -> None:
    rng = np.random.default_rng(0)
    trajs = [Trajectory(obs=rng.normal(size=(4, 2)), acts=np.zeros((3, 1), np.float32), rews=np.zeros(3),
                        terminal=False) for _ in range(2)]
    path = ExpertDataset(f"{EVIL_MODULE}:Evil-v0", trajs).save(tmp_path / "d.npz")
    with pytest.raises(UntrustedEnvIdError):
        ExpertDataset.load(path)
    assert len(ExpertDataset.load(path, env_id=f"{EVIL_MODULE}:Evil-v0")) == 2  # explicit: the caller's choice
    expert = tmp_path / "expert"
    src = ROOT / "deqmpc_gym" / "experts" / "pretrained" / "Pendulum-v0"
    expert.mkdir()
    (expert / "actor.pt").write_bytes((src / "actor.pt").read_bytes())
    card = json.loads((src / "card.json").read_text())
    card["env_id"] = f"{EVIL_MODULE}:Evil-v0"
    (expert / "card.json").write_text(json.dumps(card))
    from deqmpc_gym.experts import load_expert

    with pytest.raises(UntrustedEnvIdError):
        load_expert(expert)
    with pytest.raises(CheckpointError, match=PEND):
        load_expert(expert, env_id=PEND)
    assert not evil_module.exists()


# ---------------------------------------------------------------------------------------------- policy
@pytest.mark.parametrize("variant", ["deq-mpc-nn", "deq-mpc-deq", "nn"])
def test_absurd_observation_gets_the_fallback_others_unaffected(variant: str) -> None:
    p = _policy(variant)
    obs = np.array([[0.3, 0.0], [1e20, 1e20], [1.0, 0.2]])
    a, state = p.predict(obs)
    assert np.isfinite(a).all() and a.dtype == np.float32
    assert p.last_fallback.tolist() == [False, True, False]
    np.testing.assert_array_equal(a[1], p._safe_action)
    ref, _ = p.predict(obs[[0, 2]])
    np.testing.assert_allclose(a[[0, 2]], ref, atol=1e-6)
    # the next (warm-started) call solves the fallback env cold and still acts for everybody
    b, _ = p.predict(np.array([[0.3, 0.0], [0.5, 0.0], [1.0, 0.2]]), state, np.zeros(3, bool))
    assert np.isfinite(b).all() and not p.last_fallback.any()


def test_a_row_the_layer_rejects_is_isolated(monkeypatch: pytest.MonkeyPatch) -> None:
    p = _policy("deq-mpc-nn")
    original = p.layer.forward

    def picky(x0, state=None):
        if bool((x0.abs() > 50).any()):
            raise ShapeError("theta has non-finite values in samples [..]")
        return original(x0, state)

    monkeypatch.setattr(p.layer, "forward", picky)
    obs = np.array([[0.1, 0.0], [0.2, 0.0], [0.0, 60.0], [0.3, 0.0], [0.4, 0.0]])
    a, _ = p.predict(obs)
    assert p.last_fallback.tolist() == [False, False, True, False, False]
    ref, _ = p.predict(obs[[0, 1, 3, 4]])
    np.testing.assert_allclose(a[[0, 1, 3, 4]], ref, atol=1e-6)


def test_predict_empty_batch_and_ragged_input_raise_shape_errors() -> None:
    p = _policy("nn")
    with pytest.raises(ShapeError, match="n_envs >= 1"):
        p.predict(np.zeros((0, 2)))
    with pytest.raises(ShapeError):
        p.predict([[0.0, 1.0], [2.0]])
    with pytest.raises(ShapeError):
        p.predict(np.zeros((2, 2)), episode_start=["x", "y", "z"])


# ---------------------------------------------------------------------------------------------- data
def _write_dataset(path: Path, *, nx: int = 2, nu: int = 1, env_id: str = PEND, **overrides: np.ndarray) -> Path:
    lengths = np.array([3, 2])
    arrays = {"states": np.zeros((7, nx)), "controls": np.zeros((5, nu)), "actions": np.zeros((5, nu), np.float32),
              "rewards": np.zeros(5), "lengths": lengths, "terminal": np.zeros(2, bool),
              "meta": np.array(json.dumps({"schema": SCHEMA, "version": SCHEMA_VERSION, "env_id": env_id,
                                           "expert_id": "", "seed": 0, "nx": nx, "nu": nu, "extra": {}}))}
    arrays.update(overrides)
    np.savez(path, **arrays)
    return path


def test_valid_handwritten_dataset_loads(tmp_path: Path) -> None:
    ds = ExpertDataset.load(_write_dataset(tmp_path / "ok.npz"), env_id=PEND)
    assert len(ds) == 2 and ds.nx == 2 and ds.nu == 1


@pytest.mark.parametrize("case", ["nan_states", "inf_actions", "nan_rewards", "width", "int_actions", "str_actions",
                                  "int_states", "partial_nan_controls", "zero_length"])
def test_dataset_load_validates_values_widths_and_dtypes(tmp_path: Path, case: str) -> None:
    states = np.zeros((7, 2))
    kw: dict = {}
    if case == "nan_states":
        states[3, 1] = np.nan
        kw = {"states": states}
    elif case == "inf_actions":
        kw = {"actions": np.array([[0.0], [np.inf], [0.0], [0.0], [0.0]], np.float32)}
    elif case == "nan_rewards":
        kw = {"rewards": np.array([0.0, np.nan, 0.0, 0.0, 0.0])}
    elif case == "width":  # 3 states wide: not the pendulum's
        path = _write_dataset(tmp_path / "d.npz", nx=3)
    elif case == "int_actions":
        kw = {"actions": np.zeros((5, 1), np.int64)}
    elif case == "str_actions":
        kw = {"actions": np.full((5, 1), "a")}
    elif case == "int_states":
        kw = {"states": np.zeros((7, 2), np.int32)}
    elif case == "partial_nan_controls":
        kw = {"controls": np.array([[0.0], [np.nan], [0.0], [0.0], [0.0]])}
    elif case == "zero_length":
        kw = {"lengths": np.array([5, 0]), "states": np.zeros((7, 2))}
    if case != "width":
        path = _write_dataset(tmp_path / "d.npz", **kw)
    with pytest.raises(DatasetError):
        ExpertDataset.load(path)


# ---------------------------------------------------------------------------------------------- devices
@pytest.mark.skipif(CUDA, reason="needs a machine without CUDA")
def test_unavailable_device_is_a_one_line_typed_error(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    for device in ("cuda", "cuda:0", "cuda:3"):
        with pytest.raises(DeviceError, match="CUDA is not available"):
            DEQMPCPolicy.from_env(PEND, "nn", hidden=8, device=device)
    with pytest.raises(DeviceError, match="valid devices"):
        DEQMPCPolicy.from_env(PEND, "nn", hidden=8, device="gpu")
    path = _policy("nn").save(tmp_path / "pol")
    with pytest.raises(DeviceError):
        DEQMPCPolicy.load(path, device="cuda")
    with pytest.raises(DeviceError):
        make_batched_env(PEND, 2, device="cuda")
    assert main(["evaluate", "--policy", str(path), "--device", "cuda"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "CUDA is not available" in err


def test_auto_device_resolves_to_what_exists(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from deqmpc_gym._device import resolve_device

    want = "cuda" if CUDA else "cpu"
    assert resolve_device("auto").type == want
    p = DEQMPCPolicy.from_env(PEND, "nn", hidden=8, device="auto")
    assert p.device.type == want and next(p.layer.parameters()).device.type == want
    path = p.save(tmp_path / "pol")
    assert DEQMPCPolicy.load(path, device="auto").device.type == want
    assert main(["evaluate", "--policy", str(path), "--episodes", "1", "--steps", "2", "--device", "auto"]) == 0
    assert "normalized score" in capsys.readouterr().out


# ---------------------------------------------------------------------------------------------- CLI
def test_unwritable_outputs_are_refused_before_any_work(tmp_path: Path, capsys: pytest.CaptureFixture,
                                                        monkeypatch: pytest.MonkeyPatch,
                                                        tiny_pendulum_dataset_file: Path) -> None:
    import deqmpc_gym.evaluation as evaluation
    import deqmpc_gym.experts as experts
    from deqmpc_gym.training import ImitationTrainer

    def no_work(*args: object, **kwargs: object) -> None:
        raise AssertionError("work started before the output path was checked")

    monkeypatch.setattr(evaluation, "rollout_batched", no_work)
    monkeypatch.setattr(experts, "collect_dataset", no_work)
    monkeypatch.setattr(ImitationTrainer, "train", no_work)
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    policy = _policy("nn").save(tmp_path / "pol")
    commands = [
        ["expert", "collect", "--env", PEND, "--out", str(blocker / "d.npz"), "--num-trajectories", "2"],
        ["evaluate", "--policy", str(policy), "--json", str(blocker / "eval.json")],
        ["evaluate", "--policy", str(policy), "--json", str(tmp_path)],  # a folder where a file is needed
        ["train", "--env", PEND, "--dataset", str(tiny_pendulum_dataset_file), "--out", str(blocker / "run")],
        ["train", "--env", PEND, "--dataset", str(tiny_pendulum_dataset_file), "--out", str(blocker)],
        ["record", "--env", PEND, "--out", str(blocker / "videos")],
    ]
    for argv in commands:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert err.startswith("deqmpc-gym: error: cannot") and err.count("\n") == 1, (argv, err)
    from deqmpc_gym.io import check_writable

    with pytest.raises(OutputPathError):
        check_writable(blocker / "x", kind="dir")


@pytest.mark.parametrize("argv,needle", [
    (["record", "--env", PEND, "--out", "{tmp}/v", "--max-steps", "0"], "max_steps must be an integer >= 1"),
    (["record", "--env", PEND, "--out", "{tmp}/v", "--episodes", "0"], "episodes must be an integer >= 1"),
    (["reproduce", "table1", "--envs", "DEQMPC/Foo-v0", "--out", "{tmp}/r"], "DEQMPC/Foo-v0"),
    (["reproduce", "table1", "--variants", "bogus", "--out", "{tmp}/r"], "bogus"),
    (["expert", "collect", "--env", PEND, "--out", "{tmp}/d.npz", "--num-trajectories", "0"],
     "num_trajectories must be an integer >= 1"),
])
def test_bad_counts_and_ids_are_one_line_errors(argv: list[str], needle: str, tmp_path: Path,
                                                capsys: pytest.CaptureFixture) -> None:
    assert main([a.format(tmp=tmp_path) for a in argv]) == 2
    err = capsys.readouterr().err
    assert needle in err and err.count("\n") == 1
    assert not (tmp_path / "d.npz").exists() and not list(tmp_path.rglob("*.mp4"))


def test_cli_errors_print_no_traceback_subprocess(tmp_path: Path) -> None:
    r = subprocess.run([sys.executable, "-m", "deqmpc_gym.cli", "record", "--env", PEND, "--out", str(tmp_path),
                        "--max-steps", "0"], capture_output=True, text=True, env=_subprocess_env(), timeout=120)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines() == ["deqmpc-gym: error: max_steps must be an integer >= 1, got 0"]


def test_policy_or_expert_of_another_env_names_both_ids(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    pend = _policy("nn").save(tmp_path / "pend")
    assert main(["record", "--env", "DEQMPC/QPole-v0", "--policy", str(pend), "--out", str(tmp_path / "v")]) == 2
    err = capsys.readouterr().err
    assert PEND in err and "DEQMPC/QPole-v0" in err and err.count("\n") == 1
    qpole = _policy("nn", env="DEQMPC/QPole-v0").save(tmp_path / "qpole")
    assert main(["record", "--env", "DEQMPC/QPoleObs-v0", "--policy", str(qpole), "--out", str(tmp_path / "v")]) == 2
    err = capsys.readouterr().err
    assert "DEQMPC/QPole-v0" in err and "DEQMPC/QPoleObs-v0" in err
    expert = ROOT / "deqmpc_gym" / "experts" / "pretrained" / "Pendulum-v0"
    assert main(["expert", "collect", "--env", "DEQMPC/QPole-v0", "--expert", str(expert), "--out",
                 str(tmp_path / "d.npz"), "--num-trajectories", "1"]) == 2
    err = capsys.readouterr().err
    assert PEND in err and "DEQMPC/QPole-v0" in err
    # the library entry points check it too
    from deqmpc_gym.evaluation import EvalConfig, rollout_batched
    from deqmpc_gym.experts import collect_dataset, load_expert

    with pytest.raises(ConfigError, match="DEQMPC/QPoleObs-v0"):
        rollout_batched(DEQMPCPolicy.load(qpole), "DEQMPC/QPoleObs-v0", EvalConfig(episodes=1, max_steps=1))
    with pytest.raises(ConfigError, match="DEQMPC/Cartpole-v0"):
        collect_dataset(load_expert(PEND), "DEQMPC/Cartpole-v0", 1, max_steps=1)
    assert not list(tmp_path.rglob("*.mp4")) and not (tmp_path / "d.npz").exists()


# ---------------------------------------------------------------------------------------------- API
def test_from_env_keeps_the_config_variant() -> None:
    cfg = PolicyConfig(variant="nn", hidden=8)
    p = DEQMPCPolicy.from_env(PEND, config=cfg)
    assert p.config.variant == "nn" and p.layer.problem is None
    assert DEQMPCPolicy.from_env(PEND, "nn", config=cfg).config == cfg  # agreeing is fine
    with pytest.raises(ConfigError, match="contradicts"):
        DEQMPCPolicy.from_env(PEND, "deq-mpc-deq", config=cfg)
    assert DEQMPCPolicy.from_env(PEND, hidden=8).config.variant == "deq-mpc-deq"  # the documented default
    with pytest.raises(ConfigError):
        DEQMPCPolicy.from_env(PEND, config={"variant": "nn"})  # type: ignore[arg-type]


def test_reset_arguments_are_validated() -> None:
    env = SystemEnv()
    with pytest.raises(ConfigError, match="options"):
        env.reset(options="x")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="unknown reset option"):
        env.reset(options={"stat": [0.0, 0.0]})
    with pytest.raises(ConfigError, match="seed"):
        env.reset(seed=1.5)  # type: ignore[arg-type]
    batched = make_batched_env(PEND, 3)
    for seed in (1.5, "abc", [1, 2], [1, None, 2.5], -1):
        with pytest.raises(ConfigError, match="seed"):
            batched.reset(seed=seed)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="options"):
        batched.reset(options="x")  # type: ignore[arg-type]
    obs, _ = batched.reset(seed=[1, None, np.int64(2)])
    assert obs.shape == (3, 2)


def test_checkpoint_config_with_wrong_types_is_a_checkpoint_error(tmp_path: Path) -> None:
    path = _policy("nn").save(tmp_path / "pol")
    for field, value in (("hidden", "8"), ("horizon", 5.0), ("compiled_solver", "no"), ("anderson_tol", None)):
        payload = torch.load(path / "policy.pt", weights_only=True)
        meta = json.loads(payload["meta_json"])
        meta["config"][field] = value
        payload["meta_json"] = json.dumps(meta)
        torch.save(payload, tmp_path / "bad.pt")
        with pytest.raises(CheckpointError, match=field):
            DEQMPCPolicy.load(tmp_path / "bad.pt")
    for meta_json in ("[1, 2]", json.dumps({"format": "deqmpc_gym.policy", "version": 1, "env_id": PEND,
                                             "config": [1]})):
        payload = torch.load(path / "policy.pt", weights_only=True)
        payload["meta_json"] = meta_json
        torch.save(payload, tmp_path / "bad.pt")
        with pytest.raises(CheckpointError):
            DEQMPCPolicy.load(tmp_path / "bad.pt")
    payload = torch.load(path / "policy.pt", weights_only=True)
    key = next(iter(payload["state_dict"]))
    payload["state_dict"][key] = torch.full_like(payload["state_dict"][key], float("nan"))
    torch.save(payload, tmp_path / "nan.pt")
    with pytest.raises(CheckpointError, match="NaN"):
        DEQMPCPolicy.load(tmp_path / "nan.pt")


def test_raw_env_step_before_reset_raises() -> None:
    import gymnasium as gym

    env = SystemEnv()
    with pytest.raises(ResetNeeded, match="reset"):
        env.step(np.zeros(1, np.float32))
    with pytest.raises(gym.error.ResetNeeded):  # also Gymnasium's own error class
        SystemEnv(system="cartpole").step(np.zeros(1, np.float32))
    env.reset(seed=0)
    obs, reward, *_ = env.step(np.zeros(1, np.float32))
    assert obs.shape == (2,) and 0.0 < reward <= 1.0


# ---------------------------------------------------------------------------------------------- io
KILLED_WRITER = textwrap.dedent("""
    import sys, time
    import numpy as np
    from deqmpc_gym.data import ExpertDataset

    ds = ExpertDataset.load(sys.argv[1])

    def slow(*args, **kwargs):
        print("saving", flush=True)
        time.sleep(120)

    np.savez_compressed = slow
    ds.save(sys.argv[1])
""")


def test_kill_9_during_a_dataset_save_leaves_no_temp_file_behind(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    target = ExpertDataset(PEND, [Trajectory(obs=rng.normal(size=(4, 2)), acts=np.zeros((3, 1), np.float32),
                                             rews=np.zeros(3), terminal=False) for _ in range(3)]).save(
        tmp_path / "d.npz")
    before = target.read_bytes()
    proc = subprocess.Popen([sys.executable, "-c", KILLED_WRITER, str(target)], stdout=subprocess.PIPE, text=True,
                            env=_subprocess_env())
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "saving"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    leftovers = [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
    assert len(leftovers) == 1 and str(proc.pid) in leftovers[0]  # what kill -9 leaves: the writer's temp file
    assert target.read_bytes() == before  # the old file survived
    ExpertDataset.load(target).save(target)  # the next write of the target removes it
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d.npz"]
    assert len(ExpertDataset.load(target)) == 3
