"""The resumable-checkpoint helper shared by the trainer, PPO experts and the teacher (deqmpc_gym.checkpoint)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from deqmpc_gym.checkpoint import check_definition, definition_differences, load_checkpoint, save_checkpoint
from deqmpc_gym.errors import CheckpointError, ResumeMismatchError


@pytest.mark.parametrize("name", ["state.pt", "progress.json"])
def test_save_and_load_round_trip(tmp_path: Path, name: str) -> None:
    path = tmp_path / "sub" / name
    payload = {"format": "kind", "step": 3, "rows": [1, 2]}
    if name.endswith(".pt"):
        payload["weights"] = torch.arange(3.0)
    save_checkpoint(path, payload, files={"side.bin": lambda p: p.write_bytes(b"x")})
    loaded = load_checkpoint(path, ("kind",))
    assert loaded is not None and loaded["step"] == 3 and loaded["rows"] == [1, 2]
    if name.endswith(".pt"):
        assert torch.equal(loaded["weights"], torch.arange(3.0))
    else:
        assert json.loads(path.read_text())["format"] == "kind"
    assert (tmp_path / "sub" / "side.bin").read_bytes() == b"x"
    assert sorted(p.name for p in (tmp_path / "sub").iterdir()) == sorted([name, "side.bin"])  # no temporary files
    assert load_checkpoint(tmp_path / "none.pt", ("kind",)) is None


def test_a_failing_side_file_keeps_the_old_checkpoint(tmp_path: Path) -> None:
    path = tmp_path / "progress.json"
    save_checkpoint(path, {"format": "kind", "step": 1})

    def fail(p: Path) -> None:
        p.write_bytes(b"half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(path, {"format": "kind", "step": 2}, files={"model.zip": fail})
    assert load_checkpoint(path, ("kind",))["step"] == 1  # type: ignore[index]
    assert [p.name for p in tmp_path.iterdir()] == ["progress.json"]


def test_unreadable_or_foreign_checkpoints_are_refused(tmp_path: Path) -> None:
    torn = tmp_path / "a.json"
    torn.write_text("{torn")
    with pytest.raises(CheckpointError, match="a.json.*delete it"):
        load_checkpoint(torn, ("kind",))
    other = tmp_path / "b.pt"
    torch.save({"format": "other"}, other)
    with pytest.raises(CheckpointError, match="not a MY checkpoint .*'other'"):
        load_checkpoint(other, ("kind",), what="MY")
    torch.save({"step": 1}, other)  # no format: accepted only where None is listed
    assert load_checkpoint(other, ("kind", None)) == {"step": 1}
    with pytest.raises(CheckpointError):
        load_checkpoint(other, ("kind",))


def test_the_mismatch_error_names_fields_and_the_fix(tmp_path: Path) -> None:
    saved = {"a.lr": 0.1, "a.steps": 10, "a.old": 1}
    requested = {"a.lr": 0.2, "a.steps": 20, "a.new": 5}
    assert definition_differences(saved, requested, may_change={"a.steps"}, added={"a.new": 5}) == \
        ["a.lr: 0.1 -> 0.2", "a.old: 1 -> '<missing>'"]
    check_definition(tmp_path, {"a.x": 1}, {"a.x": 1})  # the same run: no error
    with pytest.raises(ResumeMismatchError) as info:
        check_definition(tmp_path / "c.pt", saved, requested, may_change={"a.steps"}, added={"a.new": 5},
                         what="demo run", start_over="use another folder")
    msg = str(info.value)
    assert info.value.fields == ("a.lr", "a.old") and isinstance(info.value, CheckpointError)
    assert "c.pt belongs to another demo run: a.lr: 0.1 -> 0.2" in msg
    assert "run with the saved settings (only a.steps may change)" in msg and msg.endswith("use another folder")
