"""A training run owns its output folder: lock (kill -9 takes over), resume checks, overwrite, progress.csv, Ctrl-C,
SIGTERM and time-limited slices."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import deqmpc_gym
from deqmpc_gym.cli import main, resume_command
from deqmpc_gym.data import ExpertDataset
from deqmpc_gym.errors import ConfigError, ResumeMismatchError, RunDirError, TrainingInterrupted
from deqmpc_gym.policies import DEQMPCPolicy
from deqmpc_gym.training import ImitationTrainer, TrainConfig
from deqmpc_gym.training.rundir import LOCK_NAME, PROGRESS_COLUMNS

PEND = "DEQMPC/Pendulum-v0"
ROOT = Path(deqmpc_gym.__file__).resolve().parent.parent
SHIPPED = ROOT / "deqmpc_gym" / "datasets" / "Pendulum-v0-300.npz"


@pytest.fixture(scope="module")
def small() -> ExpertDataset:
    return ExpertDataset.load(SHIPPED, env_id=PEND).subset(20)


def _policy(variant: str = "deq-mpc-nn", hidden: int = 8) -> DEQMPCPolicy:
    torch.manual_seed(0)
    return DEQMPCPolicy.from_env(PEND, variant, hidden=hidden)


def _cfg(**kw: object) -> TrainConfig:
    base: dict = dict(steps=4, batch_size=4, val_every=2, val_batches=1, log_every=1)
    base.update(kw)
    return TrainConfig(**base)


def _trainer(data: ExpertDataset, out: Path, variant: str = "deq-mpc-nn", **kw: object) -> ImitationTrainer:
    return ImitationTrainer(_policy(variant), data, _cfg(**kw), out, progress=False)


def _rows(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        return list(reader.fieldnames or []), list(reader)


def _cli_args(dataset: Path, out: Path, *extra: str, steps: int = 4) -> list[str]:
    return ["train", "--env", PEND, "--variant", "deq-mpc-nn", "--dataset", str(dataset), "--out", str(out),
            "--steps", str(steps), "--hidden", "8", "--batch-size", "4", "--val-every", "2", "--val-batches", "1",
            *extra]


def _subprocess_env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep))
    return env


def _start_cli(args: list[str], log: Path) -> subprocess.Popen:
    with open(log, "w") as f:
        return subprocess.Popen([sys.executable, "-m", "deqmpc_gym.cli", *args], stdout=subprocess.DEVNULL,
                                stderr=f, env=_subprocess_env(), cwd=ROOT)


def _wait_for(path: Path, proc: subprocess.Popen, timeout: float = 120.0) -> None:
    t0 = time.monotonic()
    while not path.exists():
        if proc.poll() is not None:
            raise AssertionError(f"the training process exited early with {proc.returncode}")
        if time.monotonic() - t0 > timeout:
            raise AssertionError(f"{path} did not appear within {timeout} s")
        time.sleep(0.05)


# ---------------------------------------------------------------------------------------------- resume checks
@pytest.mark.parametrize("change", ["variant", "lr", "dataset"])
def test_resume_with_another_run_definition_names_the_fields(small: ExpertDataset, tmp_path: Path,
                                                             change: str) -> None:
    _trainer(small, tmp_path).train()
    before = (tmp_path / "best" / "policy.pt").read_bytes()
    if change == "variant":  # same network weights: only the stored definition tells the runs apart
        trainer, field = _trainer(small, tmp_path, "diff-mpc-nn"), "policy.variant"
    elif change == "lr":
        trainer, field = _trainer(small, tmp_path, lr=0.5), "train.lr"
    else:
        trainer, field = _trainer(small.subset(19), tmp_path), "dataset.sha256"
    with pytest.raises(ResumeMismatchError) as info:
        trainer.train(resume=True)
    assert field in info.value.fields and field in str(info.value)
    # the fix, as for every resumable loop (deqmpc_gym.checkpoint): the saved settings, or a new run
    assert "run with the saved settings" in str(info.value) and "overwrite=True" in str(info.value)
    assert (tmp_path / "best" / "policy.pt").read_bytes() == before
    # only the step budget may grow
    assert _trainer(small, tmp_path, steps=6).train(resume=True).steps == 6


def test_cli_resume_with_another_variant_refuses(tmp_path: Path, tiny_pendulum_dataset_file: Path,
                                                 capsys: pytest.CaptureFixture) -> None:
    assert main(_cli_args(tiny_pendulum_dataset_file, tmp_path / "run")) == 0
    args = _cli_args(tiny_pendulum_dataset_file, tmp_path / "run", "--resume")
    args[args.index("deq-mpc-nn")] = "diff-mpc-nn"
    capsys.readouterr()
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "policy.variant: 'deq-mpc-nn' -> 'diff-mpc-nn'" in err and err.count("\n") == 1


# ---------------------------------------------------------------------------------------------- reuse of a folder
def test_finished_run_is_not_overwritten_without_resume(small: ExpertDataset, tmp_path: Path,
                                                        tiny_pendulum_dataset_file: Path,
                                                        capsys: pytest.CaptureFixture) -> None:
    _trainer(small, tmp_path).train()
    best = (tmp_path / "best" / "policy.pt").read_bytes()
    with pytest.raises(RunDirError, match="resume=True .*overwrite=True"):
        _trainer(small, tmp_path).train()
    assert (tmp_path / "best" / "policy.pt").read_bytes() == best
    out = tmp_path / "cli"
    assert main(_cli_args(tiny_pendulum_dataset_file, out)) == 0
    capsys.readouterr()
    assert main(_cli_args(tiny_pendulum_dataset_file, out)) == 2
    err = capsys.readouterr().err
    assert "--resume" in err and "--overwrite" in err and err.count("\n") == 1
    assert main(_cli_args(tiny_pendulum_dataset_file, out, "--overwrite")) == 0
    _, rows = _rows(out / "progress.csv")
    assert [r["time/steps"] for r in rows] == ["2", "4"]  # started over


def test_two_trainers_in_one_folder_in_one_process(small: ExpertDataset, tmp_path: Path) -> None:
    seen: list[str] = []

    def second_trainer(trainer: ImitationTrainer, step: int, metrics: dict) -> None:
        with pytest.raises(RunDirError, match=f"pid {os.getpid()}"):
            _trainer(small, tmp_path).train(resume=True)
        seen.append("refused")

    ImitationTrainer(_policy(), small, _cfg(steps=2), tmp_path, callbacks=(second_trainer,), progress=False).train()
    assert seen == ["refused"] and not (tmp_path / LOCK_NAME).exists()


# ---------------------------------------------------------------------------------------------- progress.csv
def test_progress_csv_keeps_every_row_across_resumes(small: ExpertDataset, tmp_path: Path) -> None:
    _trainer(small, tmp_path, steps=4).train()
    _trainer(small, tmp_path, steps=8).train(resume=True)
    header, rows = _rows(tmp_path / "progress.csv")
    assert header == list(PROGRESS_COLUMNS)
    assert [r["time/steps"] for r in rows] == ["2", "4", "6", "8"]
    assert all(r["val/loss_end"] and r["train/loss"] and r["train/grad_norm"] for r in rows)
    _trainer(small, tmp_path, steps=8).train(resume=True)  # an already finished run keeps its rows
    assert _rows(tmp_path / "progress.csv") == (header, rows)
    # the same columns, in the same order, whatever was logged (here: no train metrics in the rows)
    _trainer(small, tmp_path / "b", log_every=100).train()
    header_b, rows_b = _rows(tmp_path / "b" / "progress.csv")
    assert header_b == header and rows_b[0]["train/loss"] == ""


def test_interrupt_from_a_callback_checkpoints_and_resumes_bit_exact(small: ExpertDataset, tmp_path: Path) -> None:
    full = _trainer(small, tmp_path / "a", steps=6)
    res_full = full.train()

    def stop(trainer: ImitationTrainer, step: int, metrics: dict) -> None:
        if step == 4:
            raise KeyboardInterrupt

    part = ImitationTrainer(_policy(), small, _cfg(steps=6), tmp_path / "b", callbacks=(stop,), progress=False)
    with pytest.raises(TrainingInterrupted) as info:
        part.train()
    assert (info.value.step, info.value.total) == (4, 6)
    res = _trainer(small, tmp_path / "b", steps=6).train(resume=True)
    assert [h["val_loss"] for h in res.history] == [h["val_loss"] for h in res_full.history]
    assert _rows(tmp_path / "b" / "progress.csv")[1][-1]["time/steps"] == "6"


# ---------------------------------------------------------------------------------------------- other processes
def test_folder_of_a_live_run_is_refused_and_a_killed_runs_lock_taken_over(tmp_path: Path,
                                                                          tiny_pendulum_dataset_file: Path,
                                                                          capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "run"
    proc = _start_cli(_cli_args(tiny_pendulum_dataset_file, out, steps=100000), tmp_path / "log.txt")
    try:
        _wait_for(out / "checkpoint.pt", proc)
        owner = json.loads((out / LOCK_NAME).read_text())
        assert owner["pid"] == proc.pid
        assert main(_cli_args(tiny_pendulum_dataset_file, out, "--resume", steps=100000)) == 2
        err = capsys.readouterr().err
        assert f"in use by a running training (pid {proc.pid}" in err
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    assert json.loads((out / LOCK_NAME).read_text())["pid"] == proc.pid  # kill -9 left its lock behind
    step = int(torch.load(out / "checkpoint.pt", weights_only=True)["step"])
    assert main(_cli_args(tiny_pendulum_dataset_file, out, "--resume", steps=step + 2)) == 0  # stale: taken over
    assert not (out / LOCK_NAME).exists()
    _, rows = _rows(out / "progress.csv")
    assert [int(r["time/steps"]) for r in rows] == list(range(2, step + 3, 2))


@pytest.mark.parametrize(("sig", "code", "why"), [(signal.SIGINT, 130, ""), (signal.SIGTERM, 143, "SIGTERM; ")],
                         ids=["ctrl-c", "sigterm"])
def test_a_signal_checkpoints_the_current_step_and_prints_the_resume_command(
        sig: signal.Signals, code: int, why: str, tmp_path: Path, tiny_pendulum_dataset_file: Path) -> None:
    out = tmp_path / "run"
    args = _cli_args(tiny_pendulum_dataset_file, out, steps=100000)
    args[args.index("--val-every") + 1] = "50000"  # no validation checkpoint before the interrupt
    proc = _start_cli(args, tmp_path / "err.txt")
    try:
        _wait_for(out / "progress.csv", proc)  # written just before the loop starts
        time.sleep(2.0)
        proc.send_signal(sig)
        assert proc.wait(timeout=60) == code
    finally:
        if proc.poll() is None:
            proc.kill()
    err = (tmp_path / "err.txt").read_text()
    assert "Traceback" not in err
    last = err.replace("\r", "\n").strip().splitlines()[-1]
    step = int(torch.load(out / "checkpoint.pt", weights_only=True)["step"])
    assert 0 < step < 50000  # the step it was at, not the last validation
    assert last == (f"deqmpc-gym: training stopped at step {step} of 100000 ({why}checkpoint in {out}); "
                    f"resume with: {resume_command(args)}")
    assert resume_command(args).endswith("--val-batches 1 --resume")
    assert not (out / LOCK_NAME).exists()
    args[args.index("--steps") + 1] = str(step + 1)
    assert main([*args, "--resume"]) == 0
    assert json.loads((out / "result.json").read_text())["steps"] == step + 1


# ---------------------------------------------------------------------------------------------- slices of wall time
class _Clock:
    """``time`` for the trainer module with a settable ``time()`` (the deadline's clock)."""

    def __init__(self, now: float) -> None:
        self.now = now
        self.perf_counter = time.perf_counter

    def time(self) -> float:
        return self.now


def test_a_deadline_stops_at_a_checkpoint_and_the_slices_give_the_uninterrupted_run(
        small: ExpertDataset, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from deqmpc_gym.training import trainer as trainer_mod

    res_full = _trainer(small, tmp_path / "a", steps=6).train()
    clock = _Clock(1000.0)
    monkeypatch.setattr(trainer_mod, "time", clock)

    def late(trainer: ImitationTrainer, step: int, metrics: dict) -> None:
        if step == 2:
            clock.now = 2000.0  # the deadline (1500) passes during step 2's validation

    part = ImitationTrainer(_policy(), small, _cfg(steps=6), tmp_path / "b", callbacks=(late,), progress=False)
    with pytest.raises(TrainingInterrupted) as info:
        part.train(deadline=1500.0)
    assert (info.value.step, info.value.total, info.value.reason) == (2, 6, "time limit")
    assert "stopped (time limit) at step 2 of 6" in str(info.value)
    assert int(torch.load(tmp_path / "b" / "checkpoint.pt", weights_only=True)["step"]) == 2
    assert not (tmp_path / "b" / LOCK_NAME).exists()
    # a slice that starts after its deadline trains nothing and keeps the checkpoint
    with pytest.raises(TrainingInterrupted) as info:
        _trainer(small, tmp_path / "b", steps=6).train(resume=True, deadline=1500.0)
    assert info.value.step == 2
    res = _trainer(small, tmp_path / "b", steps=6).train(resume=True, deadline=3000.0)
    assert res.steps == 6
    assert [h["val_loss"] for h in res.history] == [h["val_loss"] for h in res_full.history]
    with pytest.raises(ConfigError, match="deadline must be a time.time"):
        _trainer(small, tmp_path / "c").train(deadline=float("nan"))


def test_cli_time_limit_exits_75_with_the_resume_command(tmp_path: Path, tiny_pendulum_dataset_file: Path,
                                                         capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "run"
    args = _cli_args(tiny_pendulum_dataset_file, out, "--time-limit", "0.001s", steps=4)
    time.sleep(0.01)
    assert main(args) == 75
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last == (f"deqmpc-gym: training stopped at step 0 of 4 (time limit; checkpoint in {out}); "
                    f"resume with: {resume_command(args)}")
    assert main(_cli_args(tiny_pendulum_dataset_file, out, "--resume", "--time-limit", "1h")) == 0
    assert json.loads((out / "result.json").read_text())["steps"] == 4
    for bad in ("soon", "0", "-5m", "1x"):
        with pytest.raises(SystemExit) as exc:
            main(_cli_args(tiny_pendulum_dataset_file, tmp_path / "x", "--time-limit", bad))
        assert exc.value.code == 2
        assert "--time-limit" in capsys.readouterr().err

