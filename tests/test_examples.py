"""Every script in ``examples/`` runs end to end with ``--quick``.

Each example is run in a subprocess (``sys.executable``, ``MUJOCO_GL=egl``, cwd a tmp dir, outputs in that
tmp dir) and must exit with code 0. The quick budgets keep each run to a few seconds; the timeout is generous
for a loaded 2-core machine.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
TIMEOUT_S = 180

#: example -> extra arguments (output locations inside the tmp dir)
CASES: dict[str, list[str]] = {
    "gym_loop.py": [],
    "sb3_evaluate.py": [],
    "eval_callback.py": ["--out", "{tmp}/eval_callback"],
    "train_expert_and_collect.py": ["--out", "{tmp}/expert"],
    "train_deqmpc.py": ["--out", "{tmp}/train_deqmpc"],
    "record_video.py": ["--out", "{tmp}/videos"],
    "custom_system.py": [],
}


def run_example(name: str, args: list[str], tmp_path: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env["MUJOCO_GL"] = "egl"
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env.setdefault("OMP_NUM_THREADS", "1")
    cmd = [sys.executable, str(EXAMPLES / name), "--quick", *[a.format(tmp=tmp_path) for a in args]]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=TIMEOUT_S)
    assert proc.returncode == 0, (f"{' '.join(cmd)} exited with {proc.returncode}\n--- stdout ---\n"
                                  f"{proc.stdout[-4000:]}\n--- stderr ---\n{proc.stderr[-4000:]}")
    return proc


def test_every_example_is_covered() -> None:
    scripts = sorted(p.name for p in EXAMPLES.glob("*.py") if not p.name.startswith("_"))
    assert scripts == sorted(CASES), f"examples without a test case (or stale cases): {scripts} vs {sorted(CASES)}"


@pytest.mark.parametrize("name", sorted(CASES))
def test_example_is_self_describing(name: str) -> None:
    text = (EXAMPLES / name).read_text()
    assert len(text.splitlines()) < 300, f"{name} should stay under 300 lines"
    assert text.lstrip().startswith('"""') and "Run::" in text, f"{name} needs a module docstring with 'Run::'"
    assert 'if __name__ == "__main__":' in text and "--quick" in text and "argparse" in text


@pytest.mark.parametrize("name", sorted(CASES))
def test_example_runs_quick(name: str, tmp_path: Path) -> None:
    proc = run_example(name, CASES[name], tmp_path)
    assert proc.stdout.strip(), f"{name} printed nothing"


def test_outputs_of_the_pipeline(tmp_path: Path) -> None:
    """The artifacts the examples promise exist: expert + dataset, trained policy, EvalCallback best model, video."""
    run_example("train_expert_and_collect.py", ["--out", "{tmp}/expert"], tmp_path)
    assert (tmp_path / "expert" / "card.json").exists() and (tmp_path / "expert" / "dataset.npz").exists()
    # train on the freshly collected dataset, normalized by the freshly trained expert's card
    run_example("train_deqmpc.py", ["--out", "{tmp}/train", "--dataset", "{tmp}/expert/dataset.npz",
                                    "--expert", "{tmp}/expert"], tmp_path)
    assert (tmp_path / "train" / "best" / "policy.pt").exists() and (tmp_path / "train" / "eval.json").exists()
    # and drive the trained policy in the Gymnasium loop and the video recorder
    run_example("gym_loop.py", ["--policy", "{tmp}/train/best"], tmp_path)
    run_example("record_video.py", ["--policy", "{tmp}/train/best", "--out", "{tmp}/videos"], tmp_path)
    assert list((tmp_path / "videos").glob("*-episode-0.*"))
