"""The model zoo: shipped controllers, their cards, and packaging trained runs (deqmpc_gym.experiments.zoo)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from deqmpc_gym.errors import ConfigError
from deqmpc_gym.experiments.reproduce import run_name
from deqmpc_gym.experiments.zoo import ShipConfig, refresh_card, ship, ship_cell, warmstart_pretrained
from deqmpc_gym.policies import DEQMPCPolicy, pretrained

PEND = "DEQMPC/Pendulum-v0"


def _fake_table(root, variant: str, seeds=(0, 1)):
    """A ``reproduce table1`` output with untrained tiny policies (records as run_one writes them)."""
    for seed in seeds:
        name = run_name(PEND, variant, seed)
        DEQMPCPolicy.from_env(PEND, variant, hidden=8, deq_mpc_iters=2).save(root / "train" / name / "best")
        (root / "runs").mkdir(parents=True, exist_ok=True)
        rec = {"env_id": PEND, "variant": variant, "seed": seed, "hidden": 8, "train_steps": 4, "wall_time_s": 1.0,
               "best_val_loss": 0.5, "batch_size": 8, "num_trajectories": 4, "commit": "abc123"}
        (root / "runs" / f"{name}.json").write_text(json.dumps(rec))
    return root


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    """A zoo with one packaged Pendulum cell (two trained seeds, the better one shipped)."""
    table = _fake_table(tmp_path_factory.mktemp("table"), "deq-mpc-nn")
    out = tmp_path_factory.mktemp("zoo")
    cards = ship(table, [PEND], ["deq-mpc-nn", "diff-mpc-nn"], config=ShipConfig(episodes=3, latency_calls=3),
                 out_root=out)
    return out, cards


def test_ship_writes_the_best_seed_with_a_complete_card(zoo):
    out, cards = zoo
    assert len(cards) == 1  # diff-mpc-nn has no run: skipped
    card = cards[0]
    assert card == json.loads((out / "Pendulum-v0" / "deq-mpc-nn" / "card.json").read_text())
    ev, sel = card["evaluation"], card["selection"]
    assert sel["trained_seeds"] == [0, 1]
    assert ev["normalized_score"] == max(sel["seed_scores"])
    assert sel["seed_scores"][sel["trained_seeds"].index(sel["chosen_seed"])] == ev["normalized_score"]
    assert card["windows_seen"] == card["train_steps"] * card["batch_size"] == 32
    assert card["dataset"]["num_trajectories"] == 4 and card["commit"]["trained"] == "abc123"
    for key in ("success_rate", "early_end_rate", "normalized_std", "expert_return", "random_return"):
        assert np.isfinite(ev[key])
    assert ev["episodes"] == 3 and card["warm_act_latency_ms"] > 0


def test_the_score_is_normalized_by_the_expert_on_the_same_episodes(zoo):
    from deqmpc_gym.evaluation.rollouts import EvalConfig, rollout_batched
    from deqmpc_gym.experts import load_expert

    card = zoo[1][0]["evaluation"]
    expert = rollout_batched(load_expert(PEND), PEND, EvalConfig(episodes=3, seed=10_000))
    assert card["expert_return"] == pytest.approx(expert.mean_return)
    score = (card["mean_return"] - card["random_return"]) / (card["expert_return"] - card["random_return"])
    assert card["normalized_score"] == pytest.approx(score)


@pytest.mark.parametrize("env_id", [PEND, "DEQMPC/QPoleObs-v0"])
def test_on_the_card_episodes_the_reference_is_the_experts_card(env_id, monkeypatch):
    """On the expert card's own 200 episodes a card is normalized as the run records and ``evaluate`` are (the
    expert card's return there, no rollout: a rollout of the filtered expert differs between CPU kinds)."""
    from deqmpc_gym.experiments import zoo as zoo_mod
    from deqmpc_gym.experts import dataset_expert_kind, load_expert
    from deqmpc_gym.experts.reference import reference_returns

    def no_rollout(*args, **kwargs):
        raise AssertionError("the expert was rolled out")

    monkeypatch.setattr(zoo_mod, "rollout_batched", no_rollout)
    ref = zoo_mod._expert_reference(env_id, ShipConfig())
    card = load_expert(env_id, kind=dataset_expert_kind(env_id)).card
    assert ref["expert_return"] == reference_returns(env_id, 200, 10_000)["expert_return"]
    assert ref["expert_return"] == pytest.approx(card["mean_return"], rel=1e-12)
    assert ref["expert_success_rate"] == card["success_rate"] and ref["random_return"] == card["random_return"]
    assert ref["expert_early_end_rate"] == card.get("early_end_rate", card["collision_rate"])
    assert ref["expert_measured"] in ("card", "card_episodes")


def test_available_and_lookup(zoo, monkeypatch):
    out, _ = zoo
    assert pretrained.available(out) == [(PEND, "deq-mpc-nn")]
    assert pretrained.pretrained_dir(PEND, "DEQ_MPC_NN", root=out) == out / "Pendulum-v0" / "deq-mpc-nn"
    assert pretrained.card(PEND, "deq-mpc-nn", root=out)["variant"] == "deq-mpc-nn"
    for env_id, variant in ((PEND, "deq-mpc-deq"), ("DEQMPC/QPole-v0", "deq-mpc-nn")):
        with pytest.raises(ConfigError, match="shipped: DEQMPC/Pendulum-v0: deq-mpc-nn"):
            pretrained.pretrained_dir(env_id, variant, root=out)
    with pytest.raises(ConfigError, match="unknown variant"):
        pretrained.pretrained_dir(PEND, "mpc", root=out)
    with pytest.raises(ConfigError, match="string"):
        pretrained.pretrained_dir(3, root=out)  # type: ignore[arg-type]


def test_warmstart_ablation_of_the_shipped_controllers(zoo, tmp_path):
    out, cards = zoo
    png = warmstart_pretrained(PEND, ks=(1, 2), config=ShipConfig(episodes=2, latency_calls=3), out_dir=tmp_path,
                               root=out)
    rec = json.loads((tmp_path / "warmstart-Pendulum-pretrained.json").read_text())
    assert png.is_file() and rec["ks"] == [1, 2] and list(rec["variants"]) == ["deq-mpc-nn"]
    rows = rec["variants"]["deq-mpc-nn"]
    assert [r["k"] for r in rows] == [1, 2]
    assert all(np.isfinite(r["normalized_score"]) and r["warm_act_latency_ms"] > 0 for r in rows)
    with pytest.raises(ConfigError, match="no controller of 'DEQMPC/QPoleObs-v0' ships"):
        warmstart_pretrained("DEQMPC/QPoleObs-v0", root=out, out_dir=tmp_path)


def test_a_run_beyond_the_papers_protocol_says_so_on_its_card(tmp_path):
    """A record with ``protocol`` / ``command`` (e.g. DAgger after imitation) ships with them on its card, and the
    README table marks the row."""
    from deqmpc_gym.experiments.zoo import markdown_table

    table = _fake_table(tmp_path / "table", "deq-mpc-nn", seeds=(0,))
    f = table / "runs" / f"{run_name(PEND, 'deq-mpc-nn', 0)}.json"
    rec = json.loads(f.read_text())
    f.write_text(json.dumps({**rec, "protocol": "DAgger: 3 rounds after imitation", "command": "python dagger.py"}))
    card = ship_cell(table, PEND, "deq-mpc-nn", config=ShipConfig(episodes=2, latency_calls=2), out_root=tmp_path / "z")
    assert card["protocol"] == "DAgger: 3 rounds after imitation"
    assert card["command"].startswith("python dagger.py; deqmpc-gym zoo ship --from")
    assert "| Pendulum-v0 | deq-mpc-nn + DAgger |" in markdown_table(tmp_path / "z")


def test_refresh_re_measures_a_card_on_its_own_episodes(zoo, tmp_path, capsys):
    """``zoo refresh`` re-evaluates a shipped controller on its card's episodes with the running code and keeps
    the training fields and the selection (whose commit stays as ``commit.selected``)."""
    import shutil

    from deqmpc_gym.cli import main

    out, cards = zoo
    root = tmp_path / "zoo"
    shutil.copytree(out, root)
    before = cards[0]
    card = refresh_card(PEND, "deq-mpc-nn", config=ShipConfig(latency_calls=3), root=root)
    assert card == json.loads((root / "Pendulum-v0" / "deq-mpc-nn" / "card.json").read_text())
    # same weights, same code, same episodes: the same evaluation
    for key in ("normalized_score", "normalized_std", "success_rate", "expert_return", "random_return"):
        assert card["evaluation"][key] == pytest.approx(before["evaluation"][key], rel=1e-12)
    assert card["evaluation"]["episodes"] == 3 and card["evaluation"]["seeds"] == before["evaluation"]["seeds"]
    assert card["selection"] == before["selection"] and card["train_steps"] == before["train_steps"]
    assert card["commit"]["selected"] == before["commit"]["evaluated"]
    assert card["commit"]["trained"] == before["commit"]["trained"] and card["warm_act_latency_ms"] > 0
    with pytest.raises(ConfigError, match="shipped: DEQMPC/Pendulum-v0: deq-mpc-nn"):
        refresh_card(PEND, "deq-mpc-deq", root=root)
    assert main(["zoo", "refresh", "--envs", PEND, "--root", str(root)]) == 0
    printed = capsys.readouterr().out
    assert "DEQMPC/Pendulum-v0 deq-mpc-nn:" in printed and "deq-mpc-deq does not ship" in printed
    assert main(["zoo", "refresh", "--envs", "DEQMPC/Nope-v0"]) == 2
    assert "unknown Table 1 env" in capsys.readouterr().err
    # a card without a readable episode range: a typed error naming the fix, the card untouched
    from deqmpc_gym.errors import CheckpointError

    path = root / "Pendulum-v0" / "deq-mpc-nn" / "card.json"
    broken = {**card, "evaluation": {**card["evaluation"], "seeds": "ten..twenty"}}
    path.write_text(json.dumps(broken))
    with pytest.raises(CheckpointError, match="zoo ship"):
        refresh_card(PEND, "deq-mpc-nn", root=root)
    assert json.loads(path.read_text()) == broken


def test_ship_cell_without_runs_says_how_to_train(tmp_path):
    with pytest.raises(ConfigError, match="reproduce table1 --envs DEQMPC/Pendulum-v0 --variants deq-mpc-deq"):
        ship_cell(tmp_path, PEND, "deq-mpc-deq", config=ShipConfig(episodes=2))


def test_every_shipped_card_is_complete_and_loads():
    """The controllers shipped in the package: each card names its cell, and the weights load and act."""
    import gymnasium as gym

    for env_id, variant in pretrained.available():
        card = pretrained.card(env_id, variant)
        assert (card["env_id"], card["variant"]) == (env_id, variant)
        assert card["evaluation"]["episodes"] >= 200
        policy = DEQMPCPolicy.load(pretrained.pretrained_dir(env_id, variant))
        assert policy.config.variant == variant and policy.config.hidden == card["hidden"]
        obs, _ = gym.make(env_id).reset(seed=0)
        assert np.all(np.isfinite(policy.act(obs)))


def test_every_shipped_score_uses_the_reference_of_the_records():
    """Every card is normalized by the expert return that ``evaluate`` and the run records use on its episodes,
    so one cell's score is the same in the README, the card and the records."""
    from deqmpc_gym.experiments.zoo import _card_config
    from deqmpc_gym.experts.reference import reference_returns

    for env_id, variant in pretrained.available():
        card = pretrained.card(env_id, variant)
        ev, episodes = card["evaluation"], _card_config(card, ShipConfig())
        ref = reference_returns(env_id, episodes.episodes, episodes.seed)
        assert ev["expert_return"] == pytest.approx(ref["expert_return"], rel=1e-9), (env_id, variant)
        assert ev["random_return"] == ref["random_return"]
        score = (ev["mean_return"] - ref["random_return"]) / (ref["expert_return"] - ref["random_return"])
        assert ev["normalized_score"] == pytest.approx(score, rel=1e-9), (env_id, variant)


@pytest.fixture
def shipped(zoo, monkeypatch):
    """The test zoo in place of the package's."""
    monkeypatch.setattr(pretrained, "ZOO_DIR", zoo[0])
    return zoo[0]


def test_from_pretrained_loads_the_shipped_weights(shipped):
    policy = DEQMPCPolicy.from_pretrained(PEND, "deq-mpc-nn")
    ref = DEQMPCPolicy.load(shipped / "Pendulum-v0" / "deq-mpc-nn")
    for a, b in zip(policy.layer.state_dict().values(), ref.layer.state_dict().values()):
        assert torch.equal(a, b)
    with pytest.raises(ConfigError, match="shipped: DEQMPC/Pendulum-v0: deq-mpc-nn"):
        DEQMPCPolicy.from_pretrained(PEND)  # deq-mpc-deq does not ship in this zoo


def test_cli_evaluate_and_list_the_pretrained_controllers(shipped, capsys):
    from deqmpc_gym.cli import main

    assert main(["zoo", "list"]) == 0
    assert "DEQMPC/Pendulum-v0" in capsys.readouterr().out
    assert main(["evaluate", "--pretrained", PEND, "--variant", "deq-mpc-nn", "--episodes", "2"]) == 0
    assert "normalized score" in capsys.readouterr().out
    assert main(["evaluate", "--pretrained", "DEQMPC/QPole-v0"]) == 2
    err = capsys.readouterr().err
    assert "shipped: DEQMPC/Pendulum-v0: deq-mpc-nn" in err and "Traceback" not in err
    assert main(["record", "--pretrained", PEND, "--env", "DEQMPC/Cartpole-v0", "--out", "x"]) == 2
    assert "name different envs" in capsys.readouterr().err


@pytest.mark.render
def test_cli_records_a_pretrained_controller(shipped, tmp_path):
    from deqmpc_gym.cli import main

    assert main(["record", "--pretrained", PEND, "--variant", "deq-mpc-nn", "--max-steps", "3",
                 "--out", str(tmp_path)]) == 0
    assert list(tmp_path.glob("Pendulum-v0-deq-mpc-nn*.mp4"))


def test_the_readme_lists_exactly_the_shipped_controllers():
    """The README's table of shipped controllers is generated from their cards (`zoo.markdown_table`)."""
    from pathlib import Path

    from deqmpc_gym.experiments.zoo import markdown_table

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    assert pretrained.available(), "no controller ships"
    assert markdown_table() in readme
