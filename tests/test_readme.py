"""Every ```python block of README.md runs (``tests/test_docs.py`` applies the same to ``docs/*.md``).

Convention
----------
* Each fenced block opened by a line ```` ```python ```` (or ```` ```py ````) is executed on its own: in a fresh
  subprocess (a fresh namespace; blocks do not share variables, so every block must carry its own imports),
  with ``cwd`` = a temporary directory (relative output paths such as ``runs/...`` land there),
  ``MUJOCO_GL=egl``, ``torch.set_num_threads(1)`` and a timeout of ``TIMEOUT_S`` seconds.
* An HTML comment on the last non-blank line before the opening fence (invisible on GitHub) changes that:
  ``<!-- readme-test: skip -->`` never runs the block (e.g. a full-budget training command; reported as
  skipped), ``<!-- readme-test: slow -->`` runs it only with the ``slow`` tests (``make test-slow``; e.g. a
  ``torch.compile`` that takes minutes from a cold cache). ``docs-test:`` works as the prefix too.
* Tracebacks point at the Markdown file's line numbers (the block is padded so that its lines keep their numbers).
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
SLOW_MARKER = "<!-- readme-test: slow -->"
TIMEOUT_S = 180
_OPEN = re.compile(r"^\s*```\s*(python|py|python3)\s*$")
_CLOSE = re.compile(r"^\s*```\s*$")
_MARKER = re.compile(r"^<!--\s*(?:readme|docs)-test:\s*(skip|slow)\s*-->$")

PRELUDE = """\
import os, sys
os.environ.setdefault("MUJOCO_GL", "egl")
import torch
torch.set_num_threads(1)
_path = sys.argv[1]
with open(_path) as _f:
    _code = compile(_f.read(), {source!r}, "exec")
del _f
exec(_code, {{"__name__": "__main__", "__file__": {source!r}}})
"""


@dataclass(frozen=True)
class Block:
    line: int  # 1-based line (in its Markdown file) of the first code line
    code: str
    skip: bool
    slow: bool = False
    name: str = "README.md"  # the Markdown file, relative to the repository root

    @property
    def id(self) -> str:
        return f"{self.name}:{self.line}"


def extract_blocks(text: str, name: str = "README.md") -> list[Block]:
    """The ```python blocks of ``text`` with their first line number and skip / slow flags."""
    lines = text.splitlines()
    blocks: list[Block] = []
    i = 0
    while i < len(lines):
        if _OPEN.match(lines[i]):
            prev = next((lines[j].strip() for j in range(i - 1, -1, -1) if lines[j].strip()), "")
            marker = _MARKER.match(prev)
            kind = marker.group(1) if marker else None
            start = i + 1
            j = start
            while j < len(lines) and not _CLOSE.match(lines[j]):
                j += 1
            if j == len(lines):
                raise AssertionError(f"{name}:{i + 1}: ```python block is never closed")
            blocks.append(Block(line=start + 1, code="\n".join(lines[start:j]) + "\n", skip=kind == "skip",
                                slow=kind == "slow", name=name))
            i = j + 1
        else:
            i += 1
    return blocks


def block_params(blocks: list[Block]) -> list:
    """``pytest.param`` per block; slow blocks carry the ``slow`` mark (deselected by default)."""
    return [pytest.param(b, id=b.id, marks=(pytest.mark.slow,) if b.slow else ()) for b in blocks]


def run_block(block: Block, tmp_path: Path) -> None:
    """Run ``block`` as described in the module docstring; fail the test with its output if it fails."""
    if block.skip:
        pytest.skip(f"{block.id} is marked {SKIP_MARKER}")
    source = ROOT / block.name
    script = tmp_path / "_md_block.py"
    script.write_text("\n" * (block.line - 1) + block.code, encoding="utf-8")  # keep the file's line numbers
    runner = tmp_path / "_run_block.py"
    runner.write_text(PRELUDE.format(source=str(source)), encoding="utf-8")
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
                    f"{SKIP_MARKER} or {SLOW_MARKER})\n{exc.stdout or ''}")
    assert proc.returncode == 0, (f"{block.id}: block exited with {proc.returncode}\n--- code ---\n{block.code}"
                                  f"--- stdout ---\n{proc.stdout[-3000:]}\n--- stderr ---\n{proc.stderr[-4000:]}")


def _blocks() -> list[Block]:
    return extract_blocks(README.read_text(encoding="utf-8")) if README.exists() else []


BLOCKS = _blocks()


def test_extract_blocks_convention() -> None:
    text = ("intro\n```python\nprint(1)\n```\n\n" + SKIP_MARKER + "\n\n```python\nraise SystemExit(1)\n```\n"
            "```bash\nls\n```\n<!-- docs-test: slow -->\n```python\nprint(2)\n```\n")
    got = extract_blocks(text, name="docs/x.md")
    assert [(b.line, b.code, b.skip, b.slow) for b in got] == [
        (3, "print(1)\n", False, False), (9, "raise SystemExit(1)\n", True, False), (16, "print(2)\n", False, True)]
    assert got[0].id == "docs/x.md:3"


def test_readme_has_python_blocks() -> None:
    assert README.exists(), f"{README} does not exist"
    assert BLOCKS, (f"{README} has no ```python code blocks; the README quick-start must contain runnable python "
                    f"snippets (mark non-runnable ones with a preceding '{SKIP_MARKER}')")


@pytest.mark.parametrize("block", block_params(BLOCKS))
def test_readme_block_runs(block: Block, tmp_path: Path) -> None:
    run_block(block, tmp_path)
