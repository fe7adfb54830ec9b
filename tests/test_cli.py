"""The ``deqmpc-gym`` command line: help texts, collect -> train -> evaluate -> record, error exit codes."""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

import deqmpc_gym
from deqmpc_gym.cli import build_parser, main, version
from deqmpc_gym.data import ExpertDataset
from deqmpc_gym.experts import pretrained_expert_id

PEND = "DEQMPC/Pendulum-v0"
ROOT = Path(deqmpc_gym.__file__).resolve().parent.parent


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", MUJOCO_GL=env.get("MUJOCO_GL", "egl"),
               PYTHONPATH=os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep))
    return env


def _cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "deqmpc_gym.cli", *args], capture_output=True, text=True,
                          env=_env(), timeout=timeout, cwd=ROOT)


# ---------------------------------------------------------------------------------------------- help
SUBCOMMANDS = [["expert"], ["expert", "train"], ["expert", "collect"], ["expert", "filter"], ["train"], ["evaluate"],
               ["record"], ["reproduce"], ["plot"], ["demo"]]


def test_top_level_help_subprocess() -> None:
    r = _cli("--help")
    assert r.returncode == 0, r.stderr
    for name in ("expert", "train", "evaluate", "record", "reproduce", "demo"):
        assert name in r.stdout


@pytest.mark.parametrize("cmd", SUBCOMMANDS, ids=lambda c: "-".join(c))
def test_subcommand_help(cmd: list[str], capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as info:
        main([*cmd, "--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert "usage: deqmpc-gym" in out


def test_subcommand_help_subprocess() -> None:
    r = _cli("record", "--help")
    assert r.returncode == 0, r.stderr
    assert "--max-steps" in r.stdout


@pytest.mark.parametrize("cmd", [[], ["expert"], ["zoo"]], ids=lambda c: "-".join(c) or "bare")
def test_missing_subcommand_prints_the_help(cmd: list[str], capsys: pytest.CaptureFixture) -> None:
    assert main(cmd) == 0
    out = capsys.readouterr().out
    assert out.startswith(" ".join(["usage: deqmpc-gym", *cmd]))
    names = {(): ("expert", "train", "evaluate", "record", "reproduce", "plot", "zoo", "demo"),
             ("expert",): ("train", "collect", "filter"), ("zoo",): ("list", "ship")}[tuple(cmd)]
    assert all(name in out for name in names)


def test_bare_command_subprocess() -> None:
    r = _cli()
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("usage: deqmpc-gym") and "COMMAND --help" in r.stdout and not r.stderr


def test_version(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as info:
        main(["--version"])
    assert info.value.code == 0
    assert capsys.readouterr().out == f"deqmpc-gym {version()}\n"
    try:
        installed = importlib.metadata.version("deqmpc-gym")
    except importlib.metadata.PackageNotFoundError:
        installed = deqmpc_gym.__version__
    assert version() == installed


def test_version_without_installed_metadata(monkeypatch: pytest.MonkeyPatch) -> None:
    def not_installed(name: str) -> str:
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "version", not_installed)
    assert version() == deqmpc_gym.__version__


def test_python_m_deqmpc_gym() -> None:
    r = subprocess.run([sys.executable, "-m", "deqmpc_gym", "--version"], capture_output=True, text=True, env=_env(),
                       timeout=120, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    assert r.stdout == f"deqmpc-gym {version()}\n"
    r = subprocess.run([sys.executable, "-m", "deqmpc_gym", "train", "--help"], capture_output=True, text=True,
                       env=_env(), timeout=120, cwd=ROOT)
    assert r.returncode == 0 and r.stdout.startswith("usage: deqmpc-gym train"), r.stderr


def _all_parsers(parser: argparse.ArgumentParser) -> list[argparse.ArgumentParser]:
    out = [parser]
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in dict.fromkeys(action.choices.values()):
                out += _all_parsers(sub)
    return out


def test_every_option_has_help() -> None:
    parsers = _all_parsers(build_parser())
    assert len(parsers) == 16  # deqmpc-gym, its 9 commands, expert train/collect/filter and zoo list/ship/refresh
    for parser in parsers:
        for action in parser._actions:
            if not isinstance(action, (argparse._HelpAction, argparse._SubParsersAction)):
                assert action.help, (parser.prog, action.dest)


def test_parser_defaults_are_the_library_defaults() -> None:
    from deqmpc_gym.evaluation import EvalConfig
    from deqmpc_gym.experiments.zoo import ShipConfig
    from deqmpc_gym.policies import PolicyConfig
    from deqmpc_gym.training import TrainConfig

    parser = build_parser()
    args = parser.parse_args(["train", "--env", PEND, "--dataset", "d.npz", "--out", "o"])
    train, policy = TrainConfig(), PolicyConfig()
    assert (args.steps, args.batch_size, args.val_every, args.val_batches, args.seed) == (
        train.steps, train.batch_size, train.val_every, train.val_batches, train.seed)
    assert (args.variant, args.hidden) == (policy.variant, policy.hidden)
    args = parser.parse_args(["evaluate", "--policy", "p"])
    ev = EvalConfig()
    assert (args.episodes, args.steps, args.seed, args.stream_iters) == (ev.episodes, ev.max_steps, ev.seed,
                                                                        ev.stream_iters)
    args = parser.parse_args(["zoo", "ship", "--from", "t", "--envs", PEND])
    assert args.episodes == ShipConfig().episodes


def test_help_shows_defaults_and_choices(capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COLUMNS", "300")  # no line breaks inside the variant names
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "(default: 20000)" in out and "(default: deq-mpc-deq)" in out
    assert "one of deq-mpc-deq, deq-mpc-nn, diff-mpc-deq, diff-mpc-nn, deq, nn" in out
    with pytest.raises(SystemExit):
        main(["reproduce", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "{table1,dagger,warmstart,sweep}" in out and "--scale {cpu,paper,paper64,tiny,zoo}" in out
    assert "(default: cpu)" in out


def test_parser_defaults() -> None:
    args = build_parser().parse_args(["train", "--env", PEND, "--dataset", "d.npz", "--out", "o"])
    assert args.variant == "deq-mpc-deq" and args.steps == 20000 and args.hidden == 128 and not args.resume


# ---------------------------------------------------------------------------------------------- workflow
def test_expert_collect_subprocess(tmp_path: Path) -> None:
    out = tmp_path / "pend3.npz"
    r = _cli("expert", "collect", "--env", PEND, "--out", str(out), "--num-trajectories", "3", "--seed", "4")
    assert r.returncode == 0, r.stderr
    assert "collected 3 trajectories" in r.stdout
    ds = ExpertDataset.load(out, env_id=PEND)
    assert len(ds) == 3 and ds.seed == 4 and ds.expert_id == pretrained_expert_id(PEND)  # the shipped expert's version
    assert all(len(t) == 200 for t in ds.trajectories)


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory, tiny_pendulum_dataset_file: Path) -> Path:
    out = tmp_path_factory.mktemp("cli") / "run"
    code = main(["train", "--env", PEND, "--variant", "deq-mpc-nn", "--dataset", str(tiny_pendulum_dataset_file),
                 "--out", str(out), "--steps", "4", "--hidden", "16", "--batch-size", "8", "--val-every", "2",
                 "--val-batches", "1"])
    assert code == 0
    return out


def test_train(trained: Path, capsys: pytest.CaptureFixture) -> None:
    for name in ("best/policy.pt", "final/policy.pt", "checkpoint.pt", "result.json", "progress.csv"):
        assert (trained / name).exists(), name
    res = json.loads((trained / "result.json").read_text())
    assert res["steps"] == 4 and len(res["history"]) == 2
    cfg = json.loads((trained / "final" / "config.json").read_text())
    assert cfg["env_id"] == PEND and cfg["config"]["hidden"] == 16 and cfg["config"]["variant"] == "deq-mpc-nn"


def test_train_fine_tunes_from_a_saved_policy_with_state_noise(trained: Path, tiny_pendulum_dataset_file: Path,
                                                                tmp_path: Path, capsys) -> None:
    import torch

    from deqmpc_gym.policies import DEQMPCPolicy

    base = ["train", "--env", PEND, "--variant", "deq-mpc-nn", "--dataset", str(tiny_pendulum_dataset_file),
            "--steps", "2", "--batch-size", "8", "--val-every", "2", "--val-batches", "1", "--init",
            str(trained / "best")]
    assert main([*base, "--hidden", "16", "--state-noise", "0.05", "--out", str(tmp_path / "ft")]) == 0
    run = json.loads((tmp_path / "ft" / "result.json").read_text())
    assert run["steps"] == 2
    start = DEQMPCPolicy.load(trained / "best")
    tuned = DEQMPCPolicy.load(tmp_path / "ft" / "final")
    changed = [not torch.equal(a, b) for a, b in zip(start.layer.net.parameters(), tuned.layer.net.parameters())]
    assert any(changed)  # trained on from the saved weights (same shapes: the config came from --init)
    capsys.readouterr()
    assert main([*base, "--hidden", "32", "--out", str(tmp_path / "bad")]) != 0
    assert "--hidden 16" in capsys.readouterr().err


def test_dagger_continues_a_saved_policy_on_its_own_states(trained: Path, tiny_pendulum_dataset_file: Path,
                                                           tmp_path: Path, capsys) -> None:
    from deqmpc_gym.policies import DEQMPCPolicy

    out = tmp_path / "dagger"
    args = ["dagger", "--policy", str(trained / "best"), "--env", PEND, "--dataset", str(tiny_pendulum_dataset_file),
            "--out", str(out), "--rounds", "1", "--episodes", "2", "--states-per-episode", "2", "--label-steps", "5",
            "--train-steps", "2", "--batch-size", "8", "--select-episodes", "2"]
    assert main(args) == 0
    log = json.loads((out / "dagger.json").read_text())["rounds"]
    assert [r["round"] for r in log] == [-1, 0] and all(math.isfinite(r["closed_loop_score"]) for r in log)
    assert DEQMPCPolicy.load(out / "best").config.hidden == 16
    assert len(ExpertDataset.load(out / "data.npz", env_id=PEND)) == len(ExpertDataset.load(
        tiny_pendulum_dataset_file, env_id=PEND)) + 4
    assert "DAgger on DEQMPC/Pendulum-v0: 1 of 1 rounds" in capsys.readouterr().out
    # in two slices: the first stops at its time limit (exit 75), the same command then gives the same rounds
    sliced = [*args[:args.index("--out")], "--out", str(tmp_path / "sliced"), *args[args.index("--out") + 2:]]
    time.sleep(0.01)
    assert main([*sliced, "--time-limit", "0.001s"]) == 75
    assert "(time limit; checkpoint in" in capsys.readouterr().err
    assert main(sliced) == 0
    assert json.loads((tmp_path / "sliced" / "dagger.json").read_text())["rounds"] == log
    assert main([*args[:-2], "--select-episodes", "1", "--seed", "-1", "--out", str(tmp_path / "bad")]) != 0
    assert "seed" in capsys.readouterr().err


def test_plot_draws_a_run_and_refuses_other_folders(trained: Path, tmp_path: Path, capsys) -> None:
    assert main(["plot", str(trained), "--out", str(tmp_path / "c.png")]) == 0
    assert (tmp_path / "c.png").stat().st_size > 0 and "c.png" in capsys.readouterr().out
    assert main(["plot", str(tmp_path)]) != 0
    assert "progress.csv" in capsys.readouterr().err


def test_train_resume_finished(trained: Path, tiny_pendulum_dataset_file: Path, capsys) -> None:
    code = main(["train", "--env", PEND, "--variant", "deq-mpc-nn", "--dataset", str(tiny_pendulum_dataset_file),
                 "--out", str(trained), "--steps", "4", "--hidden", "16", "--batch-size", "8", "--val-every", "2",
                 "--val-batches", "1", "--resume"])
    assert code == 0
    assert "at step" in capsys.readouterr().out


def test_evaluate(trained: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    js = tmp_path / "eval.json"
    code = main(["evaluate", "--policy", str(trained / "best"), "--episodes", "2", "--steps", "10",
                 "--json", str(js)])
    assert code == 0
    out = capsys.readouterr().out
    assert "normalized score" in out
    res = json.loads(js.read_text())
    assert res["episodes"] == 2 and res["max_steps"] == 10 and len(res["returns"]) == 2
    assert res["normalized_score"] is not None and res["mean_solver_iters"] is not None


def test_evaluate_names_the_stream_iters_of_the_records(trained: Path, tmp_path: Path, capsys) -> None:
    """A policy acting with other warm iterations per step than the env's run records and cards is evaluated as it
    acts, with a note naming the ``--stream-iters`` that compares with them (QPoleObs: 2, else 1)."""
    from deqmpc_gym.evaluation.rollouts import protocol_stream_iters, set_stream_iters
    from deqmpc_gym.policies import DEQMPCPolicy

    assert [protocol_stream_iters(e) for e in ("DEQMPC/QPoleObs-v0", "QPoleObs-v0", PEND, "DEQMPC/QPole-v0")] == [
        2, 2, 1, 1]
    policy = DEQMPCPolicy.load(trained / "best")
    set_stream_iters(policy, 2)
    policy.save(tmp_path / "k2")
    args = ["evaluate", "--policy", str(tmp_path / "k2"), "--episodes", "1", "--steps", "3"]
    assert main(args) == 0
    assert "pass --stream-iters 1 to compare" in capsys.readouterr().err
    assert main([*args, "--stream-iters", "1"]) == 0
    assert "--stream-iters" not in capsys.readouterr().err


@pytest.mark.render
def test_record_policy(trained: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    import imageio.v3 as iio

    out = tmp_path / "videos"
    code = main(["record", "--env", PEND, "--policy", str(trained / "best"), "--episodes", "1", "--out", str(out),
                 "--max-steps", "4"])
    assert code == 0
    videos = sorted(out.glob("*.mp4"))
    assert [v.name for v in videos] == ["Pendulum-v0-deq-mpc-nn-episode-0.mp4"]
    assert str(videos[0]) in capsys.readouterr().out
    assert sum(1 for _ in iio.imiter(videos[0])) == 5  # reset frame + 4 steps


@pytest.mark.render
def test_record_expert(tmp_path: Path) -> None:
    code = main(["record", "--env", PEND, "--episodes", "1", "--out", str(tmp_path), "--max-steps", "3"])
    assert code == 0
    assert [p.name for p in tmp_path.glob("*.mp4")] == ["Pendulum-v0-expert-episode-0.mp4"]


# ---------------------------------------------------------------------------------------------- errors
def test_missing_dataset_subprocess(tmp_path: Path) -> None:
    r = _cli("train", "--env", PEND, "--dataset", str(tmp_path / "missing.npz"), "--out", str(tmp_path / "o"),
             "--steps", "1")
    assert r.returncode == 2
    assert "deqmpc-gym: error:" in r.stderr and "missing.npz" in r.stderr
    assert "Traceback" not in r.stderr


def test_error_exit_codes(tmp_path: Path, tiny_pendulum_dataset_file: Path, capsys: pytest.CaptureFixture) -> None:
    # dataset of another env
    assert main(["train", "--env", "DEQMPC/Cartpole-v0", "--dataset", str(tiny_pendulum_dataset_file),
                 "--out", str(tmp_path / "o"), "--steps", "1"]) == 2
    err = capsys.readouterr().err
    assert "deqmpc-gym: error:" in err and PEND in err
    # unknown variant
    assert main(["train", "--env", PEND, "--variant", "nope", "--dataset", str(tiny_pendulum_dataset_file),
                 "--out", str(tmp_path / "o"), "--steps", "1"]) == 2
    assert "nope" in capsys.readouterr().err
    # missing policy
    assert main(["evaluate", "--policy", str(tmp_path / "no-policy")]) == 2
    assert "no policy checkpoint" in capsys.readouterr().err
    # missing expert
    assert main(["expert", "collect", "--env", PEND, "--out", str(tmp_path / "x.npz"), "--num-trajectories", "1",
                 "--expert", str(tmp_path / "no-expert")]) == 2
    assert "no expert" in capsys.readouterr().err
    # argparse usage errors also exit 2
    with pytest.raises(SystemExit) as info:
        main(["train", "--env", PEND])
    assert info.value.code == 2


def test_invalid_eval_config_exit_code(trained: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["evaluate", "--policy", str(trained / "best"), "--episodes", "0"]) == 2
    assert "episodes >= 1" in capsys.readouterr().err


def test_expert_train_flags_reach_the_config(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    """``--no-teacher`` drops the obstacle variants' default MPC teacher; ``--train-obstacle-radius`` is passed on."""
    import deqmpc_gym.experts as experts

    seen = []
    monkeypatch.setattr(experts, "train_expert", lambda cfg, out, **kw: seen.append(cfg))
    assert main(["expert", "train", "--env", "DEQMPC/QuadrotorObs-v0", "--out", "x"]) == 0
    assert main(["expert", "train", "--env", "DEQMPC/QuadrotorObs-v0", "--out", "x", "--no-teacher",
                 "--train-obstacle-radius", "0.6"]) == 0
    assert seen[0].teacher is not None and seen[0].obstacle_features == 3
    assert seen[1].teacher is None and seen[1].train_obstacle_radius == 0.6
    assert "paused" in capsys.readouterr().out


def test_the_resume_hint_is_a_valid_command() -> None:
    from deqmpc_gym.cli import resume_command

    train = ["train", "--env", PEND, "--dataset", "d.npz", "--out", "o", "--overwrite"]
    assert resume_command(train) == f"deqmpc-gym train --env {PEND} --dataset d.npz --out o --resume"
    rep = ["reproduce", "table1", "--scale", "zoo", "--envs", "DEQMPC/QPole-v0"]
    assert resume_command(rep) == "deqmpc-gym " + " ".join(rep)
    for argv in (train, rep):
        build_parser().parse_args(resume_command(argv).split()[1:])  # parses (argparse exits on an unknown flag)


def test_the_packages_info_messages_reach_stderr(capsys) -> None:
    """A command shows the package's INFO log records (a system's first kernel compile) on stderr, once each, and
    follows a replaced stderr."""
    import logging

    assert main(["zoo", "list"]) == 0
    assert main(["zoo", "list"]) == 0  # a second call adds no second handler
    capsys.readouterr()
    logging.getLogger("deqmpc_gym.systems.kernels").info("compiling the kernels of X")
    assert capsys.readouterr().err == "deqmpc-gym: compiling the kernels of X\n"
