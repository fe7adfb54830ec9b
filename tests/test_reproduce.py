"""The Table 1 sweep at the "tiny" scale: runs, records, skips finished runs, aggregates a table and a plot."""

from __future__ import annotations

import json
import operator
import os
import shutil
import signal
import socket
import sys
import time
from pathlib import Path

import pytest
import torch

from deqmpc_gym.errors import ConfigError
from deqmpc_gym.experiments.reproduce import PAPER_TABLE1, SCALES, markdown_table, reproduce, warmstart_ablation

PEND = "DEQMPC/Pendulum-v0"


def test_tiny_sweep_is_resumable_and_aggregates(tmp_path) -> None:
    torch.manual_seed(0)
    root = reproduce("table1", scale="tiny", envs=[PEND], variants=["diff-mpc-nn", "deq-mpc-nn"], out_dir=tmp_path)
    runs = sorted(p.name for p in (root / "runs").glob("*.json"))
    assert runs == ["Pendulum__deq-mpc-nn__s0.json", "Pendulum__diff-mpc-nn__s0.json"]
    rec = json.loads((root / "runs" / runs[0]).read_text())
    for key in ("env_id", "variant", "seed", "normalized_score", "mean_return", "success_rate"):
        assert key in rec
    table = (tmp_path / "table1-tiny.md").read_text()
    assert "deq-mpc-nn" in table and "paper 0.94" in table
    assert (tmp_path / "table1-tiny.png").stat().st_size > 0
    assert (tmp_path / "table1-tiny-curves.png").stat().st_size > 0
    rec = json.loads((root / "runs" / "Pendulum__deq-mpc-nn__s0.json").read_text())
    curve = rec["curve"]  # the learning curve: validation loss and closed-loop score against windows seen
    assert [c["windows"] for c in curve] == [2 * 8, 4 * 8] and all(-1.0 < c["score"] < 2.0 for c in curve)
    header = (root / "train" / "Pendulum__deq-mpc-nn__s0" / "progress.csv").read_text().splitlines()
    assert "eval/score" in header[0] and header[1].count(",") == header[0].count(",")
    before = (root / "runs" / runs[0]).stat().st_mtime_ns
    reproduce("table1", scale="tiny", envs=[PEND], variants=["deq-mpc-nn"], out_dir=tmp_path)  # skipped: done
    assert (root / "runs" / runs[0]).stat().st_mtime_ns == before
    records = json.loads((tmp_path / "table1-tiny.json").read_text())
    assert len(records) == 2  # the aggregate covers every recorded run
    from deqmpc_gym.experts import pretrained_expert_id

    assert (rec["expert_id"], rec["expert_kind"], rec["reference"]) == (pretrained_expert_id(PEND), "ppo", "card")
    # a record normalized by another version of the shipped expert is set aside (kept) and trained again
    stale = {**rec, "expert_id": f"pretrained:{PEND}@0123456789ab", "normalized_score": -5.0}
    (root / "runs" / runs[0]).write_text(json.dumps(stale))
    reproduce("table1", scale="tiny", envs=[PEND], variants=["deq-mpc-nn"], out_dir=tmp_path)
    again = json.loads((root / "runs" / runs[0]).read_text())
    assert again["expert_id"] == rec["expert_id"] and again["normalized_score"] != -5.0
    kept = sorted(p.name.split(".")[0] for p in (root / "stale").iterdir())
    assert kept == ["Pendulum__deq-mpc-nn__s0", "Pendulum__deq-mpc-nn__s0"]  # its record and its training run


def test_markdown_table_and_scales() -> None:
    recs = [{"env_id": PEND, "variant": "deq-mpc-deq", "normalized_score": s} for s in (0.9, 1.0)]
    table = markdown_table(recs, [PEND], ["deq-mpc-deq", "diff-mpc-nn"])
    assert "0.95 (±0.05, n=2)" in table and "| diff-mpc-nn | —" in table
    assert set(SCALES) == {"paper", "paper64", "cpu", "zoo", "tiny"}
    assert SCALES["paper64"].steps["Cartpole"] == 20000 and SCALES["paper64"].batch_size["QPole"] == 200
    assert SCALES["paper"].steps["QPole"] == 20000 and SCALES["paper"].hidden["QPole"] == 1024
    assert PAPER_TABLE1["deq-mpc-deq"]["Cartpole"] == (1.13, 0.01)


# ---------------------------------------------------------------------------------------------- launchers

@pytest.mark.parametrize("launcher", ["local", "ray"])
def test_a_failing_job_is_reported_and_the_others_finish(launcher: str, request) -> None:
    from deqmpc_gym.experiments.launch import Job, LaunchConfig, SweepError, run_jobs

    if launcher == "ray":
        request.getfixturevalue("ray_session")
    done: dict[str, int] = {}
    # importable functions (Ray workers import a job's function by name): int("x") raises ValueError
    jobs = [Job("a", operator.mul, (1, 2)), Job("bad", int, ("x",)), Job("c", operator.mul, (3, 2))]
    with pytest.raises(SweepError, match="bad") as info:
        run_jobs(jobs, LaunchConfig(launcher=launcher), lambda name, r: done.__setitem__(name, r))
    assert done == {"a": 2, "c": 6} and set(info.value.failed) == {"bad"}
    assert info.value.failed["bad"].startswith("ValueError: invalid literal for int()")  # the job's own error


def _stop_at_the_limit(deadline: float) -> None:
    """A job that trains past ``deadline`` and stops there, as a time-limited training does."""
    from deqmpc_gym.errors import TrainingInterrupted

    while time.time() < deadline:
        time.sleep(0.01)
    raise TrainingInterrupted(3, 10, "run", reason="time limit")


def _interrupted() -> None:
    from deqmpc_gym.errors import TrainingInterrupted

    raise TrainingInterrupted(3, 10, "run")


def test_a_deadline_ends_the_slice_and_names_what_is_left(tmp_path) -> None:
    from deqmpc_gym.errors import TimeLimitReached, TrainingInterrupted
    from deqmpc_gym.experiments.launch import Job, LaunchConfig, SweepError, _call, _Unfinished, run_jobs

    done: dict[str, int] = {}
    deadline = time.time() + 0.3
    jobs = [Job("a", operator.mul, (1, 2)), Job("stop", _stop_at_the_limit, (deadline,)),
            Job("c", operator.mul, (3, 2))]
    with pytest.raises(TimeLimitReached) as info:
        run_jobs(jobs, LaunchConfig(deadline=deadline), done.__setitem__)
    assert done == {"a": 2}
    assert info.value.unfinished == {"stop": "stopped at step 3 of 10 (checkpoint in run)", "c": "not started"}
    # a failure outweighs the deadline; Ctrl-C is not a time limit and stops the launch at once
    with pytest.raises(SweepError, match="bad"):
        soon = time.time() + 0.3
        run_jobs([Job("bad", int, ("x",)), Job("stop", _stop_at_the_limit, (soon,)), Job("c", operator.mul, (3, 2))],
                 LaunchConfig(deadline=soon), done.__setitem__)
    with pytest.raises(TrainingInterrupted):
        run_jobs([Job("i", _interrupted), Job("c", operator.mul, (3, 2))], LaunchConfig(deadline=deadline + 60),
                 done.__setitem__)
    # inside a Ray worker: a job after the deadline does not start, one the deadline stopped returns what is left
    assert _call(operator.mul, 1, (1, 2), {}, time.time() - 1) == _Unfinished("not started")
    assert _call(_stop_at_the_limit, 1, (time.time(),), {}, time.time() + 60) == _Unfinished(
        "stopped at step 3 of 10 (checkpoint in run)")
    assert _call(operator.mul, 1, (1, 2), {}, None) == 2
    with pytest.raises(ConfigError, match="deadline"):
        LaunchConfig(deadline=float("inf"))


def test_ray_launch_after_its_deadline_starts_nothing(ray_session) -> None:
    from deqmpc_gym.errors import TimeLimitReached
    from deqmpc_gym.experiments.launch import Job, LaunchConfig, run_jobs

    with pytest.raises(TimeLimitReached) as info:
        run_jobs([Job("a", operator.mul, (1, 2)), Job("b", operator.mul, (3, 2))],
                 LaunchConfig(launcher="ray", deadline=time.time() - 1), lambda *a: None)
    assert info.value.unfinished == {"a": "not started", "b": "not started"}


def test_durations() -> None:
    from deqmpc_gym.experiments.launch import deadline_in, parse_duration

    assert [parse_duration(t) for t in ("90m", "2.5h", "1h30m", "45s", "3600", " 1H ")] == [
        5400.0, 9000.0, 5400.0, 45.0, 3600.0, 3600.0]
    for bad in ("", "soon", "0", "0m", "-5m", "1x", "m"):
        with pytest.raises(ConfigError, match="duration|positive"):
            parse_duration(bad)
    assert 59.0 < deadline_in(60) - time.time() <= 60.0
    with pytest.raises(ConfigError):
        deadline_in(0)


def test_cli_reproduce_with_a_time_limit_exits_75_and_resumes(tmp_path, capsys) -> None:
    from deqmpc_gym.cli import main

    args = ["reproduce", "table1", "--scale", "tiny", "--envs", PEND, "--variants", "deq-mpc-nn", "--out",
            str(tmp_path), "--time-limit", "0.001s"]
    assert main(args) == 75
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err == ("deqmpc-gym: time limit reached, 1 run(s) unfinished (Pendulum__deq-mpc-nn__s0: not started); "
                   f"resume with: deqmpc-gym {' '.join(args)}")
    assert not (tmp_path / "table1-tiny" / "runs" / "Pendulum__deq-mpc-nn__s0.json").exists()
    assert main([*args[:-1], "1h"]) == 0
    assert (tmp_path / "table1-tiny" / "runs" / "Pendulum__deq-mpc-nn__s0.json").exists()


def test_launch_config_and_missing_ray_errors(without_ray) -> None:
    from deqmpc_gym.errors import DependencyNotInstalled
    from deqmpc_gym.experiments.launch import Job, LaunchConfig, run_jobs

    with pytest.raises(ConfigError, match="launcher"):
        LaunchConfig(launcher="slurm")
    with pytest.raises(ConfigError, match="cpus_per_run"):
        LaunchConfig(launcher="ray", cpus_per_run=0)
    with pytest.raises(ConfigError, match="launcher='ray'"):
        LaunchConfig(gpus_per_run=1)
    with pytest.raises(ConfigError, match="max_retries"):
        LaunchConfig(launcher="ray", max_retries=-1)
    with pytest.raises(DependencyNotInstalled, match="pip install"):
        run_jobs([Job("a", operator.mul, (1, 2))], LaunchConfig(launcher="ray"), lambda *a: None)


def test_ray_launcher_gives_the_local_records_and_warmstart(tmp_path, ray_session, monkeypatch) -> None:
    from deqmpc_gym.data import ExpertDataset
    from deqmpc_gym.experiments.launch import LaunchConfig

    saves: list[tuple[Path, int]] = []
    real_save = ExpertDataset.save

    def save(self, path):  # this process's saves; a Ray worker collecting again would rewrite the file
        out = real_save(self, path)
        saves.append((out, out.stat().st_mtime_ns))
        return out

    monkeypatch.setattr(ExpertDataset, "save", save)
    variants = ["diff-mpc-nn", "deq-mpc-nn"]
    local = reproduce("table1", scale="tiny", envs=[PEND], variants=variants, out_dir=tmp_path / "local")
    saves.clear()
    ray_launch = LaunchConfig(launcher="ray", cpus_per_run=1)
    ray_root = reproduce("table1", scale="tiny", envs=[PEND], variants=variants, out_dir=tmp_path / "ray",
                         launch=ray_launch)
    for v in variants:
        a = json.loads((local / "runs" / f"Pendulum__{v}__s0.json").read_text())
        b = json.loads((ray_root / "runs" / f"Pendulum__{v}__s0.json").read_text())
        assert a["normalized_score"] == pytest.approx(b["normalized_score"], abs=1e-9), v
        assert a["best_val_loss"] == pytest.approx(b["best_val_loss"], rel=1e-6), v
    # the dataset: collected once by this process before the tasks, then only read by them
    assert len(saves) == 1 and list((tmp_path / "ray" / "datasets").iterdir()) == [saves[0][0]]
    assert saves[0][0].stat().st_mtime_ns == saves[0][1]
    # the warm-start ablation on the same runs: scored per variant as jobs, the same with either launcher; a run
    # recorded without its policy (a results folder without train/) is trained again
    shutil.rmtree(local / "train" / "Pendulum__diff-mpc-nn__s0")
    kept = {r: (r / "runs" / "Pendulum__deq-mpc-nn__s0.json").stat().st_mtime_ns for r in (local, ray_root)}
    scores = {}
    for root, launch in ((local, None), (ray_root, ray_launch)):
        png = warmstart_ablation(scale="tiny", ks=(1, 2), variants=variants, out_dir=root.parent, launch=launch)
        rec = json.loads(png.with_suffix(".json").read_text())
        assert (rec["env_id"], rec["seed"], rec["episodes"], list(rec["scores"])) == (PEND, 0, 2, variants)
        assert all(len(v) == 2 for v in rec["scores"].values())
        scores[root.parent.name] = rec["scores"]
        assert (root / "runs" / "Pendulum__deq-mpc-nn__s0.json").stat().st_mtime_ns == kept[root]  # not re-run
    assert (local / "train" / "Pendulum__diff-mpc-nn__s0" / "best").is_dir()
    for v in variants:
        assert scores["local"][v] == pytest.approx(scores["ray"][v], abs=1e-9), v
    with pytest.raises(ConfigError, match="one env and one seed"):
        reproduce("warmstart", scale="tiny", seeds=[0, 1], out_dir=tmp_path / "local")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_an_unreachable_address_is_a_one_line_error_before_any_work(tmp_path, monkeypatch, capsys) -> None:
    ray = pytest.importorskip("ray")
    from deqmpc_gym.cli import main
    from deqmpc_gym.experiments.launch import Job, LaunchConfig, run_jobs

    # as in a fresh process (this module may hold a Ray instance); ray.init itself must not be reached: it retries
    # an absent server for minutes and then exits the process
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda *a, **k: pytest.fail("ray.init called for an unreachable address"))
    address = f"127.0.0.1:{_free_port()}"
    for addr in (address, f"ray://{address}"):
        with pytest.raises(ConfigError, match=f"cannot reach the Ray cluster at {addr}"):
            run_jobs([Job("a", operator.mul, (1, 2))], LaunchConfig(launcher="ray", address=addr), lambda *a: None)
    with pytest.raises(ConfigError, match="HOST:PORT"):
        run_jobs([Job("a", operator.mul, (1, 2))], LaunchConfig(launcher="ray", address="head:http"), lambda *a: None)
    assert main(["reproduce", "table1", "--scale", "tiny", "--envs", PEND, "--launcher", "ray", "--address", address,
                 "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"cannot reach the Ray cluster at {address}" in err
    assert not (tmp_path / "datasets").exists()  # refused before collecting data


def test_more_cpus_or_gpus_than_a_node_has_are_refused(tmp_path, ray_session, capsys) -> None:
    from deqmpc_gym.cli import main
    from deqmpc_gym.experiments.launch import Job, LaunchConfig, run_jobs

    job = [Job("a", operator.mul, (1, 2))]
    with pytest.raises(ConfigError, match=r"cpus_per_run=3 but the largest node of the Ray cluster has 2 CPU\(s\)"):
        run_jobs(job, LaunchConfig(launcher="ray", cpus_per_run=3), lambda *a: None)
    with pytest.raises(ConfigError, match=r"gpus_per_run=0.5 but .* has 0 GPU\(s\)"):
        run_jobs(job, LaunchConfig(launcher="ray", gpus_per_run=0.5), lambda *a: None)
    assert main(["reproduce", "table1", "--scale", "tiny", "--envs", PEND, "--launcher", "ray", "--cpus-per-run", "3",
                 "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "cpus_per_run=3" in err and "--cpus-per-run" in err
    assert not (tmp_path / "datasets").exists()


def test_cli_reproduce_without_ray_is_a_one_line_error(tmp_path, without_ray, capsys) -> None:
    from deqmpc_gym.cli import main

    for what in ("table1", "warmstart"):
        assert main(["reproduce", what, "--scale", "tiny", "--launcher", "ray", "--out", str(tmp_path)]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "pip install 'deqmpc_gym[cluster]'" in err


def _train_killed_once(run_dir: str, marker: str) -> dict:
    """A Ray job: a tiny imitation training that kills its own worker right after its first checkpoint (step 2),
    the first time it runs; returns the steps its trainer validated at in the attempt that finished."""
    from deqmpc_gym.data import ExpertDataset, shipped_dataset
    from deqmpc_gym.policies import DEQMPCPolicy
    from deqmpc_gym.training import ImitationTrainer, TrainConfig

    seen: list[int] = []

    def die_once(trainer, step, metrics) -> None:
        seen.append(step)
        if step == 2 and not os.path.exists(marker):
            Path(marker).write_text(str(os.getpid()))
            os.kill(os.getpid(), signal.SIGKILL)

    torch.manual_seed(0)
    ds = ExpertDataset.load(shipped_dataset(PEND), env_id=PEND)
    policy = DEQMPCPolicy.from_env(PEND, "deq-mpc-nn", hidden=8, deq_mpc_iters=2)
    cfg = TrainConfig(steps=6, batch_size=8, val_batches=1, val_every=2, seed=0)
    res = ImitationTrainer(policy, ds, cfg, run_dir, callbacks=[die_once], progress=False).train(resume=True)
    return {"seen": seen, "steps": res.steps, "pid": os.getpid()}


def test_a_job_whose_worker_is_killed_runs_again_and_resumes_from_its_checkpoint(tmp_path, ray_session) -> None:
    from deqmpc_gym.experiments.launch import Job, LaunchConfig, run_jobs

    ray_session.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # this test module is not importable there
    try:
        done: dict[str, dict] = {}
        marker = tmp_path / "killed"
        run_jobs([Job("Pendulum__deq-mpc-nn__s0", _train_killed_once, (str(tmp_path / "run"), str(marker)))],
                 LaunchConfig(launcher="ray"), done.__setitem__)
    finally:
        ray_session.cloudpickle.unregister_pickle_by_value(sys.modules[__name__])
    res = done["Pendulum__deq-mpc-nn__s0"]
    assert int(marker.read_text()) != res["pid"]  # the first worker died; another one ran the job again
    assert res["seen"] == [4, 6] and res["steps"] == 6  # ... from the checkpoint of step 2, not from the start
    rows = (tmp_path / "run" / "progress.csv").read_text().splitlines()[1:]
    assert len(rows) == 3  # one row per validation (2, 4, 6), the one before the kill kept


def _zoo(root: Path) -> Path:
    """A zoo with one shipped Pendulum controller (an untrained tiny policy, as tests/test_pretrained.py builds)."""
    from deqmpc_gym.experiments.reproduce import run_name
    from deqmpc_gym.experiments.zoo import ShipConfig, ship
    from deqmpc_gym.policies import DEQMPCPolicy

    table = root / "table"
    name = run_name(PEND, "deq-mpc-nn", 0)
    DEQMPCPolicy.from_env(PEND, "deq-mpc-nn", hidden=8, deq_mpc_iters=2).save(table / "train" / name / "best")
    (table / "runs").mkdir(parents=True)
    (table / "runs" / f"{name}.json").write_text(json.dumps({
        "env_id": PEND, "variant": "deq-mpc-nn", "seed": 0, "hidden": 8, "train_steps": 4, "wall_time_s": 1.0,
        "best_val_loss": 0.5, "batch_size": 8, "num_trajectories": 4, "commit": "abc123"}))
    ship(table, [PEND], ["deq-mpc-nn"], config=ShipConfig(episodes=2, latency_calls=3), out_root=root / "zoo")
    return root / "zoo"


def test_cli_warmstart_of_the_shipped_controllers(tmp_path, monkeypatch, capsys) -> None:
    from deqmpc_gym.cli import main
    from deqmpc_gym.policies import pretrained

    monkeypatch.setattr(pretrained, "ZOO_DIR", _zoo(tmp_path))
    out = tmp_path / "out"
    assert main(["reproduce", "warmstart", "--pretrained", "--episodes", "2", "--out", str(out)]) == 0  # every env
    rec = json.loads((out / "warmstart-Pendulum-pretrained.json").read_text())
    assert rec["env_id"] == PEND and rec["episodes"] == 2 and rec["ks"] == [1, 2, 3, 4]
    assert list(rec["variants"]) == ["deq-mpc-nn"] and (out / "warmstart-Pendulum-pretrained.png").is_file()
    assert "warmstart-Pendulum-pretrained.png" in capsys.readouterr().out
    for argv, msg in ((["--envs", "DEQMPC/QPole-v0"], "no controller of 'DEQMPC/QPole-v0' ships"),
                      (["--launcher", "ray"], "--pretrained takes --envs"),
                      (["--episodes", "0"], "--episodes must be >= 1")):
        assert main(["reproduce", "warmstart", "--pretrained", *argv, "--out", str(out)]) == 2
        assert msg in capsys.readouterr().err
    assert main(["reproduce", "table1", "--pretrained", "--out", str(out)]) == 2
    assert "--pretrained applies to `reproduce warmstart`" in capsys.readouterr().err


def test_records_normalized_by_another_expert_are_stale() -> None:
    """A record is current when its expert_id names the current dataset expert of its env (the filtered expert on
    the obstacle tasks); an obstacle-task record without one was normalized by the PPO expert: stale."""
    from deqmpc_gym.experiments.reproduce import _made_with_shipped_expert
    from deqmpc_gym.experts import load_expert, pretrained_expert_id

    qpo = "DEQMPC/QPoleObs-v0"
    ppo_card = load_expert(qpo).card
    assert not _made_with_shipped_expert({"env_id": qpo, "expert_return": ppo_card["mean_return"]})
    assert not _made_with_shipped_expert({"env_id": qpo})
    assert not _made_with_shipped_expert({"env_id": qpo, "expert_id": pretrained_expert_id(qpo)})
    assert not _made_with_shipped_expert({"env_id": qpo, "expert_id": f"pretrained:{qpo}:filtered@0123456789ab"})
    assert _made_with_shipped_expert({"env_id": qpo, "expert_id": pretrained_expert_id(qpo, "filtered")})
    pend_return = load_expert(PEND).card["mean_return"]
    assert _made_with_shipped_expert({"env_id": PEND, "expert_return": pend_return})
    assert _made_with_shipped_expert({"env_id": PEND})
    assert not _made_with_shipped_expert({"env_id": PEND, "expert_return": pend_return + 1.0})
    assert _made_with_shipped_expert({"env_id": PEND, "expert_id": pretrained_expert_id(PEND)})


@pytest.mark.slow
def test_obstacle_task_runs_use_the_filtered_expert(tmp_path) -> None:
    """QPoleObs at the tiny scale: the dataset comes from the filtered expert, and the score is normalized by its
    return on the evaluated episodes; the record names it."""
    from deqmpc_gym.data import ExpertDataset
    from deqmpc_gym.experts import pretrained_expert_id
    from deqmpc_gym.experts.reference import reference_returns

    qpo = "DEQMPC/QPoleObs-v0"
    torch.manual_seed(0)
    root = reproduce("table1", scale="tiny", envs=[qpo], variants=["deq-mpc-nn"], out_dir=tmp_path)
    rec = json.loads((root / "runs" / "QPoleObs__deq-mpc-nn__s0.json").read_text())
    fid = pretrained_expert_id(qpo, "filtered")
    assert (rec["expert_id"], rec["expert_kind"], rec["reference"]) == (fid, "filtered", "card_episodes")
    ref = reference_returns(qpo, SCALES["tiny"].eval_episodes["QPoleObs"])
    assert rec["expert_return"] == ref["expert_return"] and rec["random_return"] == ref["random_return"]
    expected = (rec["mean_return"] - ref["random_return"]) / (ref["expert_return"] - ref["random_return"])
    assert rec["normalized_score"] == pytest.approx(expected)
    (data,) = (tmp_path / "datasets").glob("QPoleObs-*.npz")
    assert data.name.endswith("-filtered.npz") and ExpertDataset.load(data).expert_id == fid


def test_git_commit_is_dirty_only_for_changes_of_the_package(tmp_path):
    """A reproduction rewrites tracked result files; the records' commit stays clean unless the code changed."""
    import shutil
    import subprocess

    from deqmpc_gym.experiments.reproduce import git_commit

    if shutil.which("git") is None:
        pytest.skip("git is not installed")
    assert git_commit(tmp_path) is None  # not a checkout
    pkg, res = tmp_path / "pkg", tmp_path / "results"
    pkg.mkdir()
    res.mkdir()
    (pkg / "code.py").write_text("x = 1\n")
    (res / "table.json").write_text("[]\n")

    def git(*args):
        subprocess.run(["git", *args], cwd=tmp_path, check=True, capture_output=True)

    git("init", "-q")
    git("add", "-A")
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "c")
    clean = git_commit(pkg)
    assert clean and not clean.endswith("-dirty")
    (pkg / "card.json").write_text("{}\n")
    git("add", "-A")
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "d")
    clean = git_commit(pkg)
    (res / "table.json").write_text("[1]\n")
    (pkg / "card.json").write_text("{\"x\": 1}\n")  # data written into the package (zoo ship)
    assert git_commit(pkg) == clean
    (pkg / "code.py").write_text("x = 2\n")
    assert git_commit(pkg) == clean + "-dirty"


def test_the_dagger_lineage_follows_the_plateau_restarts() -> None:
    """The rounds a kept DAgger policy was trained through (its training steps and windows): every round before it
    without restarts; with them, a round after one that did not beat the best continues the best policy."""
    from deqmpc_gym.experiments.dagger import lineage

    scores = {-1: 0.5, 0: 0.9, 1: 0.7, 2: 0.95, 3: 0.8, 4: 0.96}
    rounds = [{"round": r, "closed_loop_score": v} for r, v in scores.items()]
    assert [e["round"] for e in lineage(rounds, 4, restarts=True)] == [0, 2, 4]
    assert [e["round"] for e in lineage(rounds, 4, restarts=False)] == [0, 1, 2, 3, 4]
    assert [e["round"] for e in lineage(rounds, 3, restarts=True)] == [0, 2, 3]
    assert lineage(rounds, -1, restarts=True) == []


def test_a_longer_patience_row_continues_copies_of_the_protocol_rows_runs(tmp_path, capsys) -> None:
    """``reproduce dagger --patience N``: a labelled row in ``dagger-<scale>-patience<N>/`` whose runs start from
    copies of the protocol row's runs (their rounds are not trained again), with the patience in each record's
    protocol and command; a patience below 1, or ``--patience`` on another experiment, is refused."""
    from deqmpc_gym.cli import main
    from deqmpc_gym.experiments.dagger_rows import dagger_rows, protocol, row_name

    torch.manual_seed(0)
    name = "Pendulum__deq-mpc-nn__s0"
    sel = ["--scale", "tiny", "--envs", PEND, "--variants", "deq-mpc-nn", "--seeds", "0", "--out", str(tmp_path)]
    reproduce("table1", scale="tiny", envs=[PEND], variants=["deq-mpc-nn"], seeds=[0], out_dir=tmp_path)
    assert main(["reproduce", "dagger", *sel]) == 0
    assert main(["reproduce", "dagger", *sel, "--patience", "1"]) == 0
    base_run, row = tmp_path / "dagger-tiny" / "train" / name, tmp_path / "dagger-tiny-patience1"
    base = json.loads((tmp_path / "dagger-tiny" / "runs" / f"{name}.json").read_text())
    rec = json.loads((row / "runs" / f"{name}.json").read_text())
    rounds = [e["round"] for e in rec["dagger_rounds"] if e["round"] >= 0]
    assert rounds and rec["dagger_rounds"] == base["dagger_rounds"][:len(rounds) + 1]  # the same rounds, a prefix
    for r in rounds:  # copied, not trained again
        assert ((row / "train" / name / f"round_{r}" / "result.json").read_text()
                == (base_run / f"round_{r}" / "result.json").read_text())
    assert "stopping after 1 rounds" in rec["protocol"] and rec["command"].endswith("--seeds 0 --patience 1")
    assert "--patience" not in base["command"] and (tmp_path / "dagger-tiny-patience1.md").is_file()
    # a record the row's protocol would continue (stopped below the cap, its patience unspent) stays out of the table
    from deqmpc_gym.experiments.dagger_rows import _record_is_final
    from deqmpc_gym.experiments.reproduce import _write_table

    stale = {**rec, "seed": 5, "dagger_rounds": [{"round": -1, "closed_loop_score": 0.0},
                                                  {"round": 0, "closed_loop_score": 1.0}]}
    (row / "runs" / "Pendulum__deq-mpc-nn__s5.json").write_text(json.dumps(stale))
    _write_table(row / "runs", tmp_path, "tiny-patience1", (PEND,), ("deq-mpc-nn",), prefix="dagger",
                 final=lambda f: _record_is_final(f, protocol("tiny", 1)))
    assert [r["seed"] for r in json.loads((tmp_path / "dagger-tiny-patience1.json").read_text())] == [0]
    (row / "runs" / "Pendulum__deq-mpc-nn__s5.json").unlink()
    assert row_name("tiny") == row_name("tiny", protocol("tiny").dagger.patience) == "dagger-tiny"
    with pytest.raises(ConfigError, match="patience must be an integer >= 1"):
        dagger_rows(scale="tiny", envs=[PEND], variants=["deq-mpc-nn"], seeds=[0], out_dir=tmp_path, patience=0)
    assert main(["reproduce", "table1", *sel, "--patience", "2"]) != 0
    assert "--patience applies to `reproduce dagger` only" in capsys.readouterr().err


def test_a_longer_patience_raises_the_round_cap_and_reopens_runs_that_stopped_at_the_old_cap(tmp_path) -> None:
    """A longer-patience row caps the rounds in proportion to its patience (``cpu``: 20 at 3, 40 at 6), so the
    patience ends its runs; a run recorded at a lower cap without its patience spent is not final (``dagger_rows``
    goes on with it), while one whose patience was spent, or which reached the cap, is."""
    from deqmpc_gym.experiments.dagger_rows import PROTOCOLS, _record_is_final, protocol

    base = PROTOCOLS["cpu"].dagger
    assert (base.rounds, base.patience) == (20, 3)
    assert protocol("cpu") == protocol("cpu", 3) == PROTOCOLS["cpu"]
    assert (protocol("cpu", 6).dagger.rounds, protocol("cpu", 6).dagger.patience) == (40, 6)
    assert (protocol("cpu", 4).dagger.rounds, protocol("cpu", 2).dagger.rounds) == (27, 20)
    assert protocol("tiny", 1).dagger.rounds == PROTOCOLS["tiny"].dagger.rounds  # no patience to scale from
    six = protocol("cpu", 6)

    def record(scores: list[float]) -> Path:
        f = tmp_path / f"{len(list(tmp_path.iterdir()))}.json"
        rounds = [{"round": r - 1, "closed_loop_score": v} for r, v in enumerate([0.1, *scores])]
        f.write_text(json.dumps({"dagger_rounds": rounds}))
        return f

    climbing = [0.2 + 0.01 * r for r in range(20)]  # best in its last round: stopped by the old cap of 20
    assert not _record_is_final(record(climbing), six) and _record_is_final(record(climbing), PROTOCOLS["cpu"])
    spent = [0.2 + 0.01 * r for r in range(14)] + [0.1] * 6  # 6 rounds without a better score
    assert _record_is_final(record(spent), six)
    assert not _record_is_final(record(spent[:-1]), six)  # 5 without: one more round to run
    assert _record_is_final(record([0.5] * 40), six)  # at the cap
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    assert _record_is_final(bad, six)  # unreadable: left alone


def test_a_longer_patience_run_is_copied_only_with_every_finished_round(tmp_path) -> None:
    """The copy that starts a longer-patience run needs each finished round's policy (a run packed without its
    rounds starts afresh) and leaves out the protocol row's returned policy ``best/``."""
    from deqmpc_gym.experiments.dagger_rows import _seed_from_protocol_row

    src, dst = tmp_path / "row" / "run", tmp_path / "longer" / "run"
    (src / "best").mkdir(parents=True)
    (src / "dagger.json").write_text(json.dumps({"rounds": [{"round": r} for r in (-1, 0, 1)]}))
    for r in (0, 1):
        (src / f"round_{r}" / "best").mkdir(parents=True)
    (src / "round_0" / "best" / "policy.pt").write_bytes(b"0")
    dst.parent.mkdir()
    assert not _seed_from_protocol_row(src, dst) and not dst.exists()  # round 1's policy is missing
    (src / "round_1" / "best" / "policy.pt").write_bytes(b"1")
    assert _seed_from_protocol_row(src, dst)
    assert (dst / "round_1" / "best" / "policy.pt").read_bytes() == b"1" and not (dst / "best").exists()
    assert not _seed_from_protocol_row(src, dst)  # an existing run is never replaced
    (src / "dagger.json").write_text("{not json")
    assert not _seed_from_protocol_row(src, tmp_path / "longer" / "other")  # unreadable: start afresh


def test_dagger_rows_continue_the_table1_runs_and_ship_with_their_seeds(tmp_path, capsys) -> None:
    """``reproduce dagger``: every finished Table 1 run of the scale continued by the DAgger protocol, recorded like a
    Table 1 run (with its protocol, command, rounds and windows), tabulated, and shippable by ``zoo ship``; a run whose
    Table 1 run is missing is named with the command that trains it."""
    from deqmpc_gym.cli import main
    from deqmpc_gym.experiments.dagger_rows import PROTOCOLS, dagger_rows
    from deqmpc_gym.experiments.launch import SweepError
    from deqmpc_gym.experiments.zoo import ShipConfig, ship_cell

    torch.manual_seed(0)
    reproduce("table1", scale="tiny", envs=[PEND], variants=["deq-mpc-nn"], seeds=[0, 1], out_dir=tmp_path)
    assert main(["reproduce", "dagger", "--scale", "tiny", "--envs", PEND, "--variants", "deq-mpc-nn", "--seeds", "0",
                 "1", "--out", str(tmp_path)]) == 0
    root = tmp_path / "dagger-tiny"
    recs = [json.loads((root / "runs" / f"Pendulum__deq-mpc-nn__s{s}.json").read_text()) for s in (0, 1)]
    proto = PROTOCOLS["tiny"]
    for s, rec in enumerate(recs):
        base = json.loads((tmp_path / "table1-tiny" / "runs" / f"Pendulum__deq-mpc-nn__s{s}.json").read_text())
        rounds = rec["dagger_rounds"]
        assert [e["round"] for e in rounds] == list(range(-1, proto.dagger.rounds))
        scores = [e["closed_loop_score"] for e in rounds]
        assert rec["dagger_kept_round"] == scores.index(max(scores)) - 1  # the first best-scoring round
        trained = rec["dagger_kept_round"] + 1
        assert rec["train_steps"] == base["train_steps"] + trained * proto.dagger.train_steps
        assert rec["windows_seen"] == (base["train_steps"] * base["batch_size"]
                                       + trained * proto.dagger.train_steps * proto.batch_size)
        assert rec["base_score"] == base["normalized_score"] and rec["protocol"].startswith("DAgger: the tiny-scale")
        assert rec["command"].endswith(f"reproduce dagger --scale tiny --envs {PEND} --variants deq-mpc-nn --seeds {s}")
        assert -5.0 < rec["normalized_score"] < 5.0 and rec["expert_id"] == base["expert_id"]
        assert [c["windows"] for c in rec["curve"]][-proto.dagger.rounds:] == [
            base["train_steps"] * base["batch_size"] + (r + 1) * proto.dagger.train_steps * proto.batch_size
            for r in range(proto.dagger.rounds)]
    assert (root / "train" / "Pendulum__deq-mpc-nn__s0" / "best" / "policy.pt").is_file()
    assert "n=2" in (tmp_path / "dagger-tiny.md").read_text()
    assert len(json.loads((tmp_path / "dagger-tiny.json").read_text())) == 2
    before = (root / "runs" / "Pendulum__deq-mpc-nn__s0.json").stat().st_mtime_ns
    dagger_rows(scale="tiny", envs=[PEND], variants=["deq-mpc-nn"], seeds=[0], out_dir=tmp_path)  # recorded: skipped
    assert (root / "runs" / "Pendulum__deq-mpc-nn__s0.json").stat().st_mtime_ns == before
    card = ship_cell(root, PEND, "deq-mpc-nn", config=ShipConfig(episodes=2, latency_calls=2), out_root=tmp_path / "z")
    assert card["selection"]["trained_seeds"] == [0, 1] and card["protocol"].startswith("DAgger")
    assert card["windows_seen"] == recs[card["selection"]["chosen_seed"]]["windows_seen"]
    assert card["commit"]["base_trained"] == recs[0]["base_commit"]
    with pytest.raises(SweepError, match="Pendulum__deq-mpc-deq__s0"):
        dagger_rows(scale="tiny", envs=[PEND], variants=["deq-mpc-deq"], seeds=[0], out_dir=tmp_path)
    assert "reproduce table1 --scale tiny" in capsys.readouterr().err
