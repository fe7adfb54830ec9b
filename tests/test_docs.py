"""The documentation pages: their python blocks run, their links resolve, the README stays a user document.

* Every ```python block of ``docs/*.md`` and ``benchmarks/README.md`` runs exactly like the README's blocks
  (``tests/test_readme.py``: one fresh subprocess per block, cwd a temporary directory, the same
  ``<!-- docs-test: skip -->`` / ``<!-- docs-test: slow -->`` markers; ``readme-test:`` works as well).
* Every relative link and image of ``README.md``, ``docs/*.md`` and ``benchmarks/README.md`` points at a file
  that exists, and a ``#fragment`` into a Markdown file at one of its headings (GitHub's anchor rules).
* ``README.md`` is at most ``README_MAX_BYTES`` and none of the pages reads like a lab notebook
  (:data:`NARRATIVE`): the pages state current facts; how figures changed belongs in the commit messages.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from test_readme import ROOT, Block, block_params, extract_blocks, run_block

DOCS = sorted((ROOT / "docs").glob("*.md")) + [ROOT / "benchmarks" / "README.md"]
PAGES = [ROOT / "README.md"] + DOCS
README_MAX_BYTES = 20 * 1024
#: phrases of development history that the pages must not contain (case-insensitive regular expressions)
NARRATIVE = (r"previous version", r"\bthis session\b", r"\bsessions? \d", r"what did not work",
             r"\*\*targets?\b", r"\btargets? (not )?met\b", r"\bnot met\b", r"\bearlier run\b", r"\bthe issue\b",
             r"\bissue #\d")

_FENCE = re.compile(r"^\s*```")
_LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
_CODE_SPAN = re.compile(r"`+[^`]*`+")
_HEADING = re.compile(r"^\s{0,3}#{1,6}\s+(.*?)\s*#*\s*$")
_HTML_ANCHOR = re.compile(r"<a\s+(?:name|id)=\"([^\"]+)\"")


def _rel(path: Path) -> str:
    return path.relative_to(ROOT).as_posix()


def _doc_blocks() -> list[Block]:
    blocks: list[Block] = []
    for page in DOCS:
        if page.exists():
            blocks += extract_blocks(page.read_text(encoding="utf-8"), name=_rel(page))
    return blocks


BLOCKS = _doc_blocks()


def _prose_lines(text: str) -> list[tuple[int, str]]:
    """``(line number, line)`` outside fenced code blocks, with inline code spans blanked."""
    out, fenced = [], False
    for n, line in enumerate(text.splitlines(), 1):
        if _FENCE.match(line):
            fenced = not fenced
            continue
        if not fenced:
            out.append((n, _CODE_SPAN.sub("``", line)))
    return out


def github_anchors(text: str) -> set[str]:
    """The anchors GitHub gives the headings of a Markdown text (plus explicit ``<a name=...>`` anchors)."""
    anchors: set[str] = set(_HTML_ANCHOR.findall(text))
    seen: dict[str, int] = {}
    fenced = False
    for line in text.splitlines():
        if _FENCE.match(line):
            fenced = not fenced
            continue
        m = None if fenced else _HEADING.match(line)
        if not m:
            continue
        title = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", m.group(1))  # link text only
        slug = re.sub(r"[^\w\- ]", "", title.lower()).replace(" ", "-")
        n = seen.get(slug, 0)
        seen[slug] = n + 1
        anchors.add(slug if n == 0 else f"{slug}-{n}")
    return anchors


def test_github_anchors() -> None:
    text = "# A `b` (c, d = 1.0)\n```bash\n# not a heading\n```\n## A `b` (c, d = 1.0)\n## Pretrained controllers\n"
    assert github_anchors(text) == {"a-b-c-d--10", "a-b-c-d--10-1", "pretrained-controllers"}


def test_docs_pages_exist() -> None:
    missing = [_rel(p) for p in DOCS if not p.exists()]
    assert not missing, f"missing documentation pages: {missing}"
    assert BLOCKS, "docs/*.md has no ```python blocks (the usage and solver pages carry tested snippets)"


@pytest.mark.parametrize("page", PAGES, ids=_rel)
def test_links_resolve(page: Path) -> None:
    text = page.read_text(encoding="utf-8")
    broken = []
    for n, line in _prose_lines(text):
        for target in _LINK.findall(line):
            if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto: ...
                continue
            path_part, _, fragment = target.partition("#")
            dest = (page.parent / path_part).resolve() if path_part else page
            if not dest.exists():
                broken.append(f"{_rel(page)}:{n}: {target} (no such file)")
            elif fragment and dest.suffix == ".md" and fragment not in github_anchors(dest.read_text("utf-8")):
                broken.append(f"{_rel(page)}:{n}: {target} (no heading with that anchor)")
    assert not broken, "broken links:\n" + "\n".join(broken)


def test_readme_size() -> None:
    size = len((ROOT / "README.md").read_bytes())
    assert size <= README_MAX_BYTES, (f"README.md is {size} bytes (limit {README_MAX_BYTES}): it is the user "
                                      "document; move results, benchmarks and design notes to docs/")


@pytest.mark.parametrize("page", PAGES, ids=_rel)
def test_no_development_narrative(page: Path) -> None:
    found = [f"{_rel(page)}:{n}: {line.strip()[:100]}" for n, line in _prose_lines(page.read_text(encoding="utf-8"))
             if any(re.search(p, line, re.IGNORECASE) for p in NARRATIVE)]
    assert not found, ("development history in a documentation page (state current facts; the history belongs "
                       "in commit messages):\n" + "\n".join(found))


@pytest.mark.parametrize("block", block_params(BLOCKS))
def test_docs_block_runs(block: Block, tmp_path: Path) -> None:
    run_block(block, tmp_path)
