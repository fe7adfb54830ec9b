"""The output folder of a training run: its lock, the run definition checked on resume, and ``progress.csv``.

* :class:`RunLock`: ``train.lock`` holds the pid of the process training into the folder. A second trainer
  (another process, or the same one) is refused while the owner runs; the lock of a process that died (even by
  ``kill -9``) is taken over. On POSIX the lock is an ``flock`` (released by the kernel when its owner dies);
  elsewhere the pid in the file decides.
* :func:`run_definition` / :func:`definition_differences`: what must stay the same for ``resume`` to continue a
  run (policy config with its variant, env, train config except ``steps``, dataset identity).
* :func:`write_progress`: ``progress.csv`` with a fixed column order, rewritten atomically from the rows kept in
  the checkpoint, so every row survives a resume.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import io
import json
import os
import socket
import time
from pathlib import Path
from typing import Any

import numpy as np

from deqmpc_gym import checkpoint
from deqmpc_gym.data import ExpertDataset
from deqmpc_gym.errors import RunDirError
from deqmpc_gym.io import atomic_write_text, pid_alive

try:  # POSIX
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

LOCK_NAME = "train.lock"

#: the columns of ``progress.csv``, in this order (empty cells where a value was not logged).
PROGRESS_COLUMNS: tuple[str, ...] = ("time/steps", "time/elapsed_s", "train/loss", "train/loss_end", "train/grad_norm",
                                     "train/skipped_nonfinite", "val/loss_end", "eval/score", "eval/success_rate")

#: PolicyConfig fields that may change between a run and its resume (inference-only settings).
RESUMABLE_POLICY_FIELDS = frozenset({"compiled_solver"})
#: TrainConfig fields that may change between a run and its resume (extending a run's budget).
RESUMABLE_TRAIN_FIELDS = frozenset({"steps", "eval_every"})

#: run-definition fields that may change between a run and its resume
RESUMABLE_FIELDS = frozenset({f"policy.{k}" for k in RESUMABLE_POLICY_FIELDS} |
                             {f"train.{k}" for k in RESUMABLE_TRAIN_FIELDS})

#: fields added to the run definition after checkpoints were written without them, with the value such a
#: checkpoint was trained with (compared instead of "<missing>")
ADDED_FIELDS: dict[str, Any] = {"train.state_noise": 0.0, "train.eval_every": 0,
                                "policy.diff_mpc_hessian": "gauss_newton"}

#: files and folders a training run writes into its output folder (``overwrite`` removes exactly these).
RUN_FILES: tuple[str, ...] = ("checkpoint.pt", "best", "final", "progress.csv", "result.json")


# ---------------------------------------------------------------------------------------------- lock
class RunLock:
    """Exclusive use of a run folder by one trainer, with the owner's pid in ``<folder>/train.lock``.

    Use as a context manager or call :meth:`acquire` / :meth:`release`. Raises :class:`RunDirError` naming the
    owner when a live process holds the folder.
    """

    def __init__(self, folder: str | os.PathLike[str]) -> None:
        self.folder = Path(folder)
        self.path = self.folder / LOCK_NAME
        self._fd: int | None = None

    def __enter__(self) -> RunLock:
        self.acquire()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.release()

    def acquire(self) -> None:
        """Take the lock (taking over the lock of a dead owner); :class:`RunDirError` if a live run holds it."""
        self.folder.mkdir(parents=True, exist_ok=True)
        for _ in range(20):  # retried only when the lock file is replaced under us
            fd = self._open_locked() if fcntl is not None else self._open_by_pid()
            if fd is None:
                continue
            self._fd = fd
            self._write_owner()
            return
        raise RunDirError(f"could not lock {self.path}: it keeps changing; is another trainer starting there?")

    def release(self) -> None:
        """Remove the lock file and release the lock (idempotent)."""
        if self._fd is None:
            return
        try:
            os.unlink(self.path)
        except OSError:
            pass
        os.close(self._fd)
        self._fd = None

    # -------------------------------------------------------------- helpers
    def _open_locked(self) -> int | None:
        """``flock`` the lock file; None when the file was replaced meanwhile (retry)."""
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            owner = _read_owner(fd)
            os.close(fd)
            raise RunDirError(self._busy_message(owner)) from None
        try:
            same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
        except FileNotFoundError:
            same = False
        if not same:  # the previous owner removed the file between our open and flock
            os.close(fd)
            return None
        return fd

    def _open_by_pid(self) -> int | None:  # pragma: no cover - platforms without fcntl
        """Create the lock file exclusively, taking over the file of a dead owner."""
        try:
            return os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            owner = _read_owner_file(self.path)
            if owner.get("pid") is not None and pid_alive(int(owner["pid"])):
                raise RunDirError(self._busy_message(owner)) from None
            try:
                os.unlink(self.path)
            except OSError:
                pass
            return None

    def _write_owner(self) -> None:
        owner = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S")}
        if self._fd is None:
            return
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, (json.dumps(owner) + "\n").encode(), 0)
        os.fsync(self._fd)

    def _busy_message(self, owner: dict[str, Any]) -> str:
        who = f"pid {owner.get('pid', '?')}" + (f" on {owner['host']}" if owner.get("host") else "")
        since = f" since {owner['started']}" if owner.get("started") else ""
        return (f"output folder {self.folder} is in use by a running training ({who}{since}); wait for it to "
                f"finish or stop it, or choose another output folder")


def _read_owner(fd: int) -> dict[str, Any]:
    try:
        data = os.pread(fd, 4096, 0)
        owner = json.loads(data.decode() or "{}")
        return owner if isinstance(owner, dict) else {}
    except (OSError, ValueError):
        return {}


def _read_owner_file(path: Path) -> dict[str, Any]:  # pragma: no cover - platforms without fcntl
    try:
        owner = json.loads(path.read_text() or "{}")
        return owner if isinstance(owner, dict) else {}
    except (OSError, ValueError):
        return {}


# ---------------------------------------------------------------------------------------------- run definition
def dataset_fingerprint(dataset: ExpertDataset) -> str:
    """SHA-256 (hex, first 16 digits) of a dataset's env id and arrays (states, actions, lengths, terminal)."""
    h = hashlib.sha256(dataset.env_id.encode())
    for t in dataset.trajectories:
        h.update(np.ascontiguousarray(t.obs, dtype=np.float64).tobytes())
        h.update(np.ascontiguousarray(t.acts, dtype=np.float32).tobytes())
        h.update(np.array([len(t), int(t.terminal)], dtype=np.int64).tobytes())
    return h.hexdigest()[:16]


def run_definition(policy_config: Any, env_id: str | None, train_config: Any, dataset: ExpertDataset) -> dict[str, Any]:
    """The flat ``{"section.field": value}`` definition of a run (see the module docstring)."""
    out: dict[str, Any] = {"env.id": env_id}
    out.update({f"policy.{k}": v for k, v in policy_config.to_dict().items()})  # the flat layout
    out.update({f"train.{k}": v for k, v in dataclasses.asdict(train_config).items()})
    out.update({"dataset.sha256": dataset_fingerprint(dataset), "dataset.trajectories": len(dataset),
                "dataset.env_id": dataset.env_id})
    return json.loads(json.dumps(out))  # what a checkpoint stores (JSON types)


def definition_differences(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """``"field: saved -> current"`` for every field of the two definitions that may not change on resume."""
    return checkpoint.definition_differences(saved, current, may_change=RESUMABLE_FIELDS, added=ADDED_FIELDS)


# ---------------------------------------------------------------------------------------------- progress.csv
def write_progress(path: Path, rows: list[dict[str, Any]]) -> None:
    """Atomically write ``rows`` to ``path`` as CSV with the columns :data:`PROGRESS_COLUMNS`."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(PROGRESS_COLUMNS), extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: ("" if row.get(k) is None else row[k]) for k in PROGRESS_COLUMNS})
    atomic_write_text(path, buf.getvalue())


def existing_run_files(folder: Path) -> list[str]:
    """The :data:`RUN_FILES` present in ``folder``."""
    return [name for name in RUN_FILES if (folder / name).exists()]


def remove_run_files(folder: Path) -> None:
    """Delete the files of a previous run in ``folder`` (only :data:`RUN_FILES`; other files are kept)."""
    import shutil

    for name in RUN_FILES:
        target = folder / name
        if target.is_dir() and not target.is_symlink():
            shutil.rmtree(target)
        elif target.exists() or target.is_symlink():
            target.unlink()
