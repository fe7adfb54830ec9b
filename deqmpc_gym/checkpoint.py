"""Resumable checkpoints, shared by the imitation trainer, PPO expert training and the MPC teacher.

A checkpoint is one file (``.json``: JSON, anything else: ``torch.save``; loaded with ``weights_only=True``) that
holds a run's state together with the *definition* of the run it belongs to: a flat ``{"section.field": value}``
dict of everything that shapes the result (configs, dataset, the actor a refinement starts from...).

**On resume, a checkpoint continues only the run it was written for.** :func:`check_definition` compares the
stored definition with the requested one; every field that differs, other than those its owner lists as
changeable (a step budget, say), is named in one :class:`~deqmpc_gym.errors.ResumeMismatchError` as
``field: saved -> requested``. The error says how to go on: run again with the saved settings to continue, or
write the new run to another output folder (or delete the checkpoint) to start over. Nothing is ever restarted
or overwritten silently.

:func:`save_checkpoint` writes atomically (temporary file + rename, :mod:`deqmpc_gym.io`): a checkpoint is either
the old or the new one, never a torn file. Files a checkpoint needs beside it (an SB3 model, normalization
statistics) are written first, each atomically, so the payload file is the last one replaced.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Collection, Mapping
from pathlib import Path
from typing import Any

from deqmpc_gym.errors import CheckpointError, ResumeMismatchError
from deqmpc_gym.io import atomic_write, atomic_write_text

#: the value a field that is missing from a stored definition is shown with
MISSING = "<missing>"


def save_checkpoint(path: str | os.PathLike[str], payload: Mapping[str, Any],
                    files: Mapping[str, Callable[[Path], None]] | None = None) -> None:
    """Atomically write ``payload`` to ``path`` (JSON for a ``.json`` path, else ``torch.save``).

    Args:
        path: the checkpoint file; its folder is created.
        payload: the state; JSON types for a ``.json`` file, tensors / JSON types for ``torch.save``.
        files: ``{file name: writer}``: files beside ``path`` written first, each by ``writer(temporary path)`` (the
            temporary path keeps the file's suffix) and then renamed into place.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    for name, writer in (files or {}).items():
        final = target.parent / name
        tmp = target.parent / f".{final.stem}.{os.getpid()}.tmp{final.suffix}"
        try:
            writer(tmp)
            os.replace(tmp, final)
        finally:
            if tmp.exists():
                tmp.unlink()
    if target.suffix == ".json":
        atomic_write_text(target, json.dumps(dict(payload), indent=2))
    else:
        import torch

        atomic_write(target, lambda f: torch.save(dict(payload), f))


def load_checkpoint(path: str | os.PathLike[str], formats: Collection[str | None], *, what: str = "deqmpc_gym",
                    map_location: Any = "cpu") -> dict[str, Any] | None:
    """The payload stored at ``path``, or None when there is no checkpoint.

    Args:
        path: the checkpoint file.
        formats: accepted values of the payload's ``"format"`` key (``None``: a payload without one, written before
            checkpoints named their format).
        what: the kind of checkpoint, for the message (``"deqmpc_gym training"``).
        map_location: where ``torch.load`` puts tensors.

    Raises:
        CheckpointError: the file cannot be read, or it is another kind of file (the message says to delete it).
    """
    source = Path(path)
    if not source.exists():
        return None
    try:
        if source.suffix == ".json":
            payload = json.loads(source.read_text())
        else:
            import torch

            payload = torch.load(source, map_location=map_location, weights_only=True)
    except Exception as exc:
        raise CheckpointError(f"cannot read checkpoint {source} ({type(exc).__name__}: {exc}); delete it to start "
                              "over") from exc
    if not isinstance(payload, dict) or payload.get("format") not in formats:
        got = payload.get("format") if isinstance(payload, dict) else type(payload).__name__
        raise CheckpointError(f"{source} is not a {what} checkpoint (format {got!r}); delete it to start over, or "
                              "use another output folder")
    return payload


def definition_differences(saved: Mapping[str, Any], requested: Mapping[str, Any], *,
                           may_change: Collection[str] = (),
                           added: Mapping[str, Any] | None = None) -> list[str]:
    """``"field: saved -> requested"`` for every field of two definitions that differs and may not change.

    Args:
        saved, requested: flat definitions (JSON types).
        may_change: fields that may differ on resume.
        added: fields introduced after checkpoints were written without them, with the value such a checkpoint was
            made with (compared instead of :data:`MISSING`).
    """
    added = added or {}
    diffs = []
    for key in sorted(set(saved) | set(requested)):
        if key in may_change:
            continue
        a, b = saved.get(key, added.get(key, MISSING)), requested.get(key, MISSING)
        if a != b:
            diffs.append(f"{key}: {a!r} -> {b!r}")
    return diffs


def check_definition(path: str | os.PathLike[str], saved: Mapping[str, Any], requested: Mapping[str, Any], *,
                     may_change: Collection[str] = (), added: Mapping[str, Any] | None = None,
                     what: str = "run", start_over: str = "use another output folder") -> None:
    """Raise :class:`~deqmpc_gym.errors.ResumeMismatchError` unless the checkpoint at ``path`` (definition
    ``saved``) may continue as ``requested`` (see :func:`definition_differences` and the module docstring).

    Args:
        what: what the checkpoint holds, for the message (``"training run"``, ``"PPO expert run"``...).
        start_over: how to start the new run instead (e.g. ``"pass overwrite=True (--overwrite) or use another
            output folder"``).
    """
    diffs = definition_differences(saved, requested, may_change=may_change, added=added)
    if not diffs:
        return
    changeable = f" (only {', '.join(sorted(may_change))} may change)" if may_change else ""
    raise ResumeMismatchError(
        f"{path} belongs to another {what}: {'; '.join(diffs)}. To continue it, run with the saved settings"
        f"{changeable}; to start a new run, {start_over}", tuple(d.split(":", 1)[0] for d in diffs))
