"""Atomic file writes (temp file in the same directory + ``os.replace``), shared by every writer.

The temporary file of a write to ``dir/name`` is ``dir/.name.<pid>.<random>.tmp``. A process killed mid-write
(``kill -9``) cannot remove its temporary file; the next write of the same target removes the temporary files
of writers that are no longer running, so none accumulate.
"""

from __future__ import annotations

import os
import re
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

from deqmpc_gym.errors import OutputPathError


def pid_alive(pid: int) -> bool:
    """Whether a process with id ``pid`` runs on this machine (a process of another user counts as running)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    except OSError:
        return False
    return True


def _stale_temp_files(target: Path) -> list[Path]:
    """Temporary files of earlier writes of ``target`` whose writing process is gone."""
    pattern = re.compile(re.escape(f".{target.name}.") + r"(\d+)\.[^.]+\.tmp$")
    stale = []
    try:
        entries = list(target.parent.iterdir())
    except OSError:
        return []
    for entry in entries:
        m = pattern.match(entry.name)
        if m and int(m.group(1)) != os.getpid() and not pid_alive(int(m.group(1))):
            stale.append(entry)
    return stale


def remove_stale_temp_files(target: str | os.PathLike[str]) -> list[Path]:
    """Delete the temporary files that killed writers of ``target`` left behind; returns the removed paths."""
    removed = []
    for path in _stale_temp_files(Path(target)):
        try:
            path.unlink()
            removed.append(path)
        except OSError:  # removed concurrently, or not ours to remove
            pass
    return removed


def atomic_write(path: str | os.PathLike[str], write: Callable[[BinaryIO], object]) -> Path:
    """Call ``write(f)`` on a temporary binary file next to ``path``, fsync it, then rename it to ``path``.

    A crash leaves either the old file or the new one, never a partial file; temporary files left by writers
    that were killed are removed first.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temp_files(target)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.{os.getpid()}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, target)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return target


def atomic_write_text(path: str | os.PathLike[str], text: str) -> Path:
    """Atomically write ``text`` (UTF-8) to ``path``."""
    return atomic_write(path, lambda f: f.write(text.encode("utf-8")))


def check_writable(path: str | os.PathLike[str], kind: str = "file") -> Path:
    """Check, without writing anything, that ``path`` can be written: a file (``kind="file"``) or a folder
    (``kind="dir"``) whose nearest existing ancestor is a folder this process can create files in.

    Raises:
        OutputPathError: one line saying what is in the way (a file where a folder is needed, a folder where a
            file is needed, no permission).
    """
    if kind not in ("file", "dir"):
        raise ValueError(f"kind must be 'file' or 'dir', got {kind!r}")
    target = Path(path)
    if kind == "file" and target.is_dir():
        raise OutputPathError(f"cannot write {target}: it is a folder; give a file name")
    if kind == "dir" and target.exists() and not target.is_dir():
        raise OutputPathError(f"cannot use {target} as output folder: it is a file")
    folder = target if kind == "dir" else target.parent
    anchor = folder
    while not anchor.exists() and anchor != anchor.parent:
        anchor = anchor.parent
    if not anchor.is_dir():
        raise OutputPathError(f"cannot create {folder}: {anchor} is a file, not a folder")
    try:
        with tempfile.TemporaryFile(dir=anchor):
            pass
    except OSError as exc:
        raise OutputPathError(f"cannot write to {anchor} ({exc.strerror or exc}); choose another output "
                              "location") from None
    return target
