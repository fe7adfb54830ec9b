"""The Table 1 sweep at the "tiny" scale: runs, records, skips finished runs, aggregates a table and a plot."""

from __future__ import annotations

import json
import operator

import pytest
import torch

from deqmpc_gym.experiments.reproduce import PAPER_TABLE1, SCALES, markdown_table, reproduce

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
    # a record normalized by another version of the shipped expert is set aside (kept) and trained again
    stale = {**rec, "expert_return": rec["expert_return"] + 1.0, "normalized_score": -5.0}
    (root / "runs" / runs[0]).write_text(json.dumps(stale))
    reproduce("table1", scale="tiny", envs=[PEND], variants=["deq-mpc-nn"], out_dir=tmp_path)
    again = json.loads((root / "runs" / runs[0]).read_text())
    assert again["expert_return"] == rec["expert_return"] and again["normalized_score"] != -5.0
    kept = sorted(p.name.split(".")[0] for p in (root / "stale").iterdir())
    assert kept == ["Pendulum__deq-mpc-nn__s0", "Pendulum__deq-mpc-nn__s0"]  # its record and its training run


def test_markdown_table_and_scales() -> None:
    recs = [{"env_id": PEND, "variant": "deq-mpc-deq", "normalized_score": s} for s in (0.9, 1.0)]
    table = markdown_table(recs, [PEND], ["deq-mpc-deq", "diff-mpc-nn"])
    assert "0.95 (±0.05, n=2)" in table and "| diff-mpc-nn | —" in table
    assert set(SCALES) == {"paper", "cpu", "zoo", "tiny"}
    assert SCALES["paper"].steps["QPole"] == 20000 and SCALES["paper"].hidden["QPole"] == 1024
    assert PAPER_TABLE1["deq-mpc-deq"]["Cartpole"] == (1.13, 0.01)


# ---------------------------------------------------------------------------------------------- launchers
@pytest.fixture(scope="module")
def ray_session():
    """One local 2-CPU Ray instance for this module's Ray tests (the launcher joins a running instance)."""
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"OMP_NUM_THREADS": "1"}})
    yield ray
    ray.shutdown()


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


def test_launch_config_and_missing_ray_errors(monkeypatch) -> None:
    import builtins

    from deqmpc_gym.errors import ConfigError, DependencyNotInstalled
    from deqmpc_gym.experiments.launch import Job, LaunchConfig, run_jobs

    with pytest.raises(ConfigError, match="launcher"):
        LaunchConfig(launcher="slurm")
    with pytest.raises(ConfigError, match="cpus_per_run"):
        LaunchConfig(launcher="ray", cpus_per_run=0)
    with pytest.raises(ConfigError, match="launcher='ray'"):
        LaunchConfig(gpus_per_run=1)
    real_import = builtins.__import__

    def no_ray(name, *args, **kwargs):
        if name == "ray":
            raise ImportError("No module named 'ray'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_ray)
    with pytest.raises(DependencyNotInstalled, match="pip install"):
        run_jobs([Job("a", operator.mul, (1, 2))], LaunchConfig(launcher="ray"), lambda *a: None)


def test_ray_launcher_gives_the_local_records_and_refuses_missing_gpus(tmp_path, ray_session) -> None:
    from deqmpc_gym.errors import ConfigError
    from deqmpc_gym.experiments.launch import LaunchConfig

    variants = ["diff-mpc-nn", "deq-mpc-nn"]
    local = reproduce("table1", scale="tiny", envs=[PEND], variants=variants, out_dir=tmp_path / "local")
    ray_root = reproduce("table1", scale="tiny", envs=[PEND], variants=variants, out_dir=tmp_path / "ray",
                         launch=LaunchConfig(launcher="ray", cpus_per_run=1))
    for v in variants:
        a = json.loads((local / "runs" / f"Pendulum__{v}__s0.json").read_text())
        b = json.loads((ray_root / "runs" / f"Pendulum__{v}__s0.json").read_text())
        assert a["normalized_score"] == pytest.approx(b["normalized_score"], abs=1e-9), v
        assert a["best_val_loss"] == pytest.approx(b["best_val_loss"], rel=1e-6), v
    with pytest.raises(ConfigError, match="GPU"):
        reproduce("table1", scale="tiny", envs=[PEND], variants=["deq-mpc-deq"], out_dir=tmp_path / "gpu",
                  launch=LaunchConfig(launcher="ray", gpus_per_run=1))
