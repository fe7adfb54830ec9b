"""The learning-curve sweep (hidden x dataset size): one run per grid point, resumable, a record and a plot."""

from __future__ import annotations

import json

import pytest
import torch

from deqmpc_gym.cli import main
from deqmpc_gym.errors import ConfigError
from deqmpc_gym.experiments.sweep import SweepConfig, learning_curve_sweep

PEND = "DEQMPC/Pendulum-v0"


def _tiny(**kw) -> SweepConfig:
    return SweepConfig(**{"env_id": PEND, "variant": "deq-mpc-nn", "hidden": (8, 16), "trajectories": (4,),
                          "steps": 4, "batch_size": 8, "curve_every": 2, "curve_episodes": 2, "eval_episodes": 2,
                          "base_scale": "tiny", **kw})


def test_every_point_trains_with_its_width_and_data_and_the_sweep_resumes(tmp_path) -> None:
    torch.manual_seed(0)
    png = learning_curve_sweep(_tiny(), out_dir=tmp_path)
    assert png == tmp_path / "sweep-Pendulum-deq-mpc-nn.png" and png.stat().st_size > 0
    records = json.loads((tmp_path / "sweep-Pendulum-deq-mpc-nn.json").read_text())
    assert [(r["hidden"], r["num_trajectories"], r["train_steps"]) for r in records] == [(16, 4, 4), (8, 4, 4)]
    assert all([c["windows"] for c in r["curve"]] == [16, 32] and "score" in r["curve"][-1] for r in records)
    runs = tmp_path / "sweep-Pendulum-deq-mpc-nn" / "runs"
    stamp = (runs / "h8-n4.json").stat().st_mtime_ns
    learning_curve_sweep(_tiny(hidden=(8, 12)), out_dir=tmp_path)  # h8 is done: only h12 trains
    assert (runs / "h8-n4.json").stat().st_mtime_ns == stamp
    assert sorted(p.name for p in runs.glob("*.json")) == ["h12-n4.json", "h16-n4.json", "h8-n4.json"]


@pytest.mark.parametrize("kw, match", [({"hidden": (30,)}, "divisible by 4"), ({"trajectories": ()}, "non-empty"),
                                       ({"hidden": (8, 8)}, "repeats"), ({"steps": 0}, "steps"),
                                       ({"env_id": "DEQMPC/Acrobot-v0"}, "unknown Table 1 env"),
                                       ({"variant": "mpc"}, "unknown variant"), ({"base_scale": "huge"}, "base_scale")])
def test_bad_sweeps_are_refused(kw, match) -> None:
    with pytest.raises(ConfigError, match=match):
        _tiny(**kw)


def test_cli_refuses_sweep_options_elsewhere_and_several_envs(tmp_path, capsys) -> None:
    assert main(["reproduce", "table1", "--hidden", "64", "--out", str(tmp_path)]) != 0
    assert "apply to `reproduce sweep` only" in capsys.readouterr().err
    assert main(["reproduce", "sweep", "--envs", PEND, "DEQMPC/Cartpole-v0", "--out", str(tmp_path)]) != 0
    assert "one value of --envs" in capsys.readouterr().err
