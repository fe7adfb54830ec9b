"""PPO experts over seeds, in this process or as Ray tasks (deqmpc-gym expert train --seeds ... --launcher ray)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import deqmpc_gym  # noqa: F401
from deqmpc_gym.cli import main
from deqmpc_gym.errors import ConfigError
from deqmpc_gym.experiments.expert_seeds import train_expert_seeds
from deqmpc_gym.experiments.launch import LaunchConfig
from deqmpc_gym.experts import ExpertConfig, load_expert

PEND = "DEQMPC/Pendulum-v0"


def _tiny(**kw) -> ExpertConfig:  # one slice of one PPO rollout (8 envs x 32 steps), a 2-episode card
    base = dict(total_steps=256, n_envs=8, n_steps=32, batch_size=64, n_epochs=1, slice_steps=256, eval_episodes=2,
                net_arch=(8, 8))
    return ExpertConfig(PEND, **{**base, **kw})



def _records(folder: Path) -> dict[str, dict]:
    data = json.loads((folder / "seeds.json").read_text())
    assert data["env_id"] == PEND
    return data["seeds"]


def test_seeds_train_into_their_folders_and_pause(tmp_path: Path) -> None:
    out = tmp_path / "local"
    recs = train_expert_seeds(_tiny(total_steps=512), [3, 4], out, max_slices=1)
    assert {s: r["status"] for s, r in recs.items()} == {3: "paused", 4: "paused"}
    recs = train_expert_seeds(_tiny(total_steps=512), [3, 4], out)  # each seed resumes from its checkpoint
    assert [r["status"] for r in recs.values()] == ["done", "done"]
    for s in (3, 4):
        card = json.loads((out / f"s{s}" / "card.json").read_text())
        assert card["seed"] == s and card["train_steps"] == 512 and (out / f"s{s}" / "progress.csv").exists()
        assert _records(out)[str(s)]["mean_return"] == card["mean_return"]
    assert load_expert(out / "s3").card["seed"] == 3
    with pytest.raises(ConfigError, match="distinct"):
        train_expert_seeds(_tiny(), [1, 1], out)


def test_ray_launcher_records_what_the_local_launcher_records(tmp_path: Path, ray_session) -> None:
    local = train_expert_seeds(_tiny(), [0, 1], tmp_path / "local")
    remote = train_expert_seeds(_tiny(), [0, 1], tmp_path / "ray", LaunchConfig(launcher="ray", cpus_per_run=1))
    assert set(remote) == {0, 1}
    for s in (0, 1):
        a, b = local[s], remote[s]
        assert b["status"] == "done" and b["out"] == str(tmp_path / "ray" / f"s{s}")
        for k in ("train_steps", "mean_return", "std_return", "success_rate", "random_return"):
            assert a[k] == pytest.approx(b[k], rel=1e-6, abs=1e-9), (s, k)
    assert _records(tmp_path / "ray")["1"]["mean_return"] == remote[1]["mean_return"]


def test_cli_expert_train_seeds_on_ray(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                       capsys: pytest.CaptureFixture) -> None:
    import deqmpc_gym.experiments.expert_seeds as mod

    seen = []

    def fake(cfg, seeds, out, launch, **kw):
        seen.append((cfg.env_id, list(seeds), Path(out), launch, kw))
        return {s: {"status": "done", "out": f"{out}/s{s}", "success_rate": 1.0, "collision_rate": 0.0,
                    "mean_return": 1.0, "train_steps": 5} for s in seeds}

    monkeypatch.setattr(mod, "train_expert_seeds", fake)
    assert main(["expert", "train", "--env", PEND, "--seeds", "0", "1", "2", "--launcher", "ray", "--cpus-per-run",
                 "2", "--address", "auto", "--out", str(tmp_path / "e"), "--slices", "1"]) == 0
    env_id, seeds, out, launch, kw = seen[-1]
    assert (env_id, seeds, out) == (PEND, [0, 1, 2], tmp_path / "e")
    assert launch == LaunchConfig(launcher="ray", address="auto", cpus_per_run=2)
    assert kw == {"resume": True, "max_slices": 1}
    assert "seed 2: success 100.00%" in capsys.readouterr().out
    assert main(["expert", "train", "--env", PEND, "--seeds", "4", "--out", str(tmp_path / "e")]) == 0
    assert seen[-1][1] == [4] and seen[-1][3] == LaunchConfig()
    with pytest.raises(SystemExit):  # --seed and --seeds exclude each other
        main(["expert", "train", "--env", PEND, "--seed", "1", "--seeds", "2"])


def test_cli_expert_train_without_ray_is_a_one_line_error(without_ray, tmp_path: Path,
                                                          capsys: pytest.CaptureFixture) -> None:
    assert main(["expert", "train", "--env", PEND, "--seeds", "0", "--launcher", "ray", "--steps", "256",
                 "--out", str(tmp_path / "e")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "pip install" in err and "ray" in err


def test_cli_expert_train_with_an_unreachable_address_is_a_one_line_error(monkeypatch: pytest.MonkeyPatch,
                                                                          tmp_path: Path,
                                                                          capsys: pytest.CaptureFixture) -> None:
    import socket

    ray = pytest.importorskip("ray")
    monkeypatch.setattr(ray, "is_initialized", lambda: False)  # as in a fresh process
    monkeypatch.setattr(ray, "init", lambda *a, **k: pytest.fail("ray.init called for an unreachable address"))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    assert main(["expert", "train", "--env", PEND, "--seeds", "0", "1", "--launcher", "ray", "--address",
                 f"127.0.0.1:{port}", "--steps", "256", "--out", str(tmp_path / "e")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"cannot reach the Ray cluster at 127.0.0.1:{port}" in err
    assert not (tmp_path / "e" / "s0").exists()
