"""Every ```python block of README.md runs.

Convention
----------
* Each fenced block opened by a line ```` ```python ```` (or ```` ```py ````) is executed on its own: in a fresh
  subprocess (a fresh namespace; blocks do not share variables, so every block must carry its own imports),
  with ``cwd`` = a temporary directory (relative output paths such as ``runs/...`` land there),
  ``MUJOCO_GL=egl``, ``torch.set_num_threads(1)`` and a timeout of ``TIMEOUT_S`` seconds.
* To exclude a block (e.g. a full-budget training command), put the HTML comment
  ``<!-- readme-test: skip -->`` on the last non-blank line before its opening fence; it is invisible on
  GitHub. The test is then reported as skipped.
* Tracebacks point at README.md line numbers (the block is padded so that its lines keep their numbers).
* A README without any python block fails :func:`test_readme_has_python_blocks` with a clear message.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
SKIP_MARKER = "<!-- readme-test: skip -->"
TIMEOUT_S = 180
_OPEN = re.compile(r"^\s*```\s*(python|py|python3)\s*$")
_CLOSE = re.compile(r"^\s*```\s*$")

PRELUDE = """\
import os, sys
os.environ.setdefault("MUJOCO_GL", "egl")
import torch
torch.set_num_threads(1)
_path = sys.argv[1]
with open(_path) as _f:
    _code = compile(_f.read(), {readme!r}, "exec")
del _f
exec(_code, {{"__name__": "__main__", "__file__": {readme!r}}})
"""


@dataclass(frozen=True)
class Block:
    line: int  # 1-based README line of the first code line
    code: str
    skip: bool

    @property
    def id(self) -> str:
        return f"README.md:{self.line}"


def extract_blocks(text: str) -> list[Block]:
    """The ```python blocks of ``text`` with their first line number and skip flag."""
    lines = text.splitlines()
    blocks: list[Block] = []
    i = 0
    while i < len(lines):
        if _OPEN.match(lines[i]):
            prev = next((lines[j].strip() for j in range(i - 1, -1, -1) if lines[j].strip()), "")
            start = i + 1
            j = start
            while j < len(lines) and not _CLOSE.match(lines[j]):
                j += 1
            if j == len(lines):
                raise AssertionError(f"README.md:{i + 1}: ```python block is never closed")
            blocks.append(Block(line=start + 1, code="\n".join(lines[start:j]) + "\n", skip=prev == SKIP_MARKER))
            i = j + 1
        else:
            i += 1
    return blocks


def _blocks() -> list[Block]:
    return extract_blocks(README.read_text(encoding="utf-8")) if README.exists() else []


BLOCKS = _blocks()


def test_extract_blocks_convention() -> None:
    text = ("intro\n```python\nprint(1)\n```\n\n" + SKIP_MARKER + "\n\n```python\nraise SystemExit(1)\n```\n"
            "```bash\nls\n```\n")
    got = extract_blocks(text)
    assert [(b.line, b.code, b.skip) for b in got] == [(3, "print(1)\n", False), (9, "raise SystemExit(1)\n", True)]


def test_readme_has_python_blocks() -> None:
    assert README.exists(), f"{README} does not exist"
    assert BLOCKS, (f"{README} has no ```python code blocks; the README quick-start must contain runnable python "
                    "snippets (mark non-runnable ones with a preceding '<!-- readme-test: skip -->')")


@pytest.mark.parametrize("block", BLOCKS, ids=[b.id for b in BLOCKS])
def test_readme_block_runs(block: Block, tmp_path: Path) -> None:
    if block.skip:
        pytest.skip(f"{block.id} is marked {SKIP_MARKER}")
    script = tmp_path / "_readme_block.py"
    script.write_text("\n" * (block.line - 1) + block.code, encoding="utf-8")  # keep README line numbers
    runner = tmp_path / "_run_block.py"
    runner.write_text(PRELUDE.format(readme=str(README)), encoding="utf-8")
    env = dict(os.environ)
    env["MUJOCO_GL"] = "egl"
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env.setdefault("OMP_NUM_THREADS", "1")
    work = tmp_path / "cwd"
    work.mkdir()
    try:
        proc = subprocess.run([sys.executable, str(runner), str(script)], cwd=work, env=env, capture_output=True,
                              text=True, timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"{block.id}: block did not finish within {TIMEOUT_S} s (shrink its budget or mark it "
                    f"{SKIP_MARKER})\n{exc.stdout or ''}")
    assert proc.returncode == 0, (f"{block.id}: block exited with {proc.returncode}\n--- code ---\n{block.code}"
                                  f"--- stdout ---\n{proc.stdout[-3000:]}\n--- stderr ---\n{proc.stderr[-4000:]}")
