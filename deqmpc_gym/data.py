"""Expert trajectories: an ``imitation``-style :class:`Trajectory` and an atomic, versioned ``.npz`` dataset.

Layout of a dataset file (schema version 1), all arrays concatenated over trajectories:

========================  ====================  ===============================================
key                       shape / dtype         meaning
========================  ====================  ===============================================
``states``                (sum(L_i + 1), nx) f8  physical states incl. the final state
``controls``              (sum(L_i), nu) f8      physical controls applied
``actions``               (sum(L_i), nu) f4      normalized env actions in [-1, 1]
``rewards``               (sum(L_i),) f8         env rewards
``lengths``               (n,) i8                number of actions L_i of each trajectory
``terminal``              (n,) bool              True if the episode ended by termination
``meta``                  () str (JSON)          schema, env_id, expert_id, seed, nx, nu
========================  ====================  ===============================================
"""

from __future__ import annotations

import io
import json
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from deqmpc_gym.errors import DatasetError, ShapeError
from deqmpc_gym.io import atomic_write

SCHEMA = "deqmpc_gym.dataset"
SHIPPED_DIR = Path(__file__).resolve().parent / "datasets"
SCHEMA_VERSION = 1


@dataclass(frozen=True)
class Trajectory:
    """One episode, with the field names of ``imitation.data.types.TrajectoryWithRew``.

    Attributes:
        obs: ``(L + 1, nx)`` float64 physical states (the final state included).
        acts: ``(L, nu)`` float32 normalized actions.
        rews: ``(L,)`` float64 rewards.
        terminal: True if the episode ended by termination (not truncation).
        controls: ``(L, nu)`` float64 physical controls (``None`` -> not recorded).
        infos: always None (kept for layout compatibility).
    """

    obs: np.ndarray
    acts: np.ndarray
    rews: np.ndarray
    terminal: bool
    controls: np.ndarray | None = None
    infos: None = None

    def __post_init__(self) -> None:
        n = len(self.acts)
        if n < 1:
            raise ShapeError("a Trajectory needs at least one action")
        if self.obs.ndim != 2 or len(self.obs) != n + 1:
            raise ShapeError(f"obs must have shape ({n + 1}, nx) for {n} actions, got {self.obs.shape}")
        if self.rews.shape != (n,):
            raise ShapeError(f"rews must have shape ({n},), got {self.rews.shape}")
        if self.controls is not None and self.controls.shape != self.acts.shape:
            raise ShapeError(f"controls must have the shape of acts {self.acts.shape}, got {self.controls.shape}")

    def __len__(self) -> int:
        return len(self.acts)


@dataclass
class ExpertDataset:
    """A list of :class:`Trajectory` of one env, with provenance."""

    env_id: str
    trajectories: list[Trajectory]
    expert_id: str = ""
    seed: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def nx(self) -> int:
        return int(self.trajectories[0].obs.shape[1])

    @property
    def nu(self) -> int:
        return int(self.trajectories[0].acts.shape[1])

    def __len__(self) -> int:
        return len(self.trajectories)

    def save(self, path: str | Path) -> Path:
        """Write the dataset to ``path`` (``.npz``) atomically."""
        if not self.trajectories:
            raise DatasetError("refusing to save an empty dataset")
        t = self.trajectories
        arrays = {
            "states": np.concatenate([x.obs for x in t]).astype(np.float64),
            "controls": np.concatenate([x.controls if x.controls is not None else np.full(x.acts.shape, np.nan)
                                        for x in t]).astype(np.float64),
            "actions": np.concatenate([x.acts for x in t]).astype(np.float32),
            "rewards": np.concatenate([x.rews for x in t]).astype(np.float64),
            "lengths": np.array([len(x) for x in t], dtype=np.int64),
            "terminal": np.array([x.terminal for x in t], dtype=bool),
            "meta": np.array(json.dumps({
                "schema": SCHEMA, "version": SCHEMA_VERSION, "env_id": self.env_id, "expert_id": self.expert_id,
                "seed": self.seed, "nx": self.nx, "nu": self.nu, "extra": self.extra,
            })),
        }

        def write(f: Any) -> None:
            buf = io.BytesIO()
            np.savez_compressed(buf, **arrays)
            f.write(buf.getvalue())

        return atomic_write(path, write)

    @classmethod
    def load(cls, path: str | Path, env_id: str | None = None) -> "ExpertDataset":
        """Read a dataset written by :meth:`save`; ``env_id`` (if given) must match the file's."""
        p = Path(path)
        if not p.exists():
            raise DatasetError(f"no dataset file at {p}")
        try:
            with np.load(p, allow_pickle=False) as z:
                meta = json.loads(str(z["meta"]))
                arrays = {k: z[k] for k in ("states", "controls", "actions", "rewards", "lengths", "terminal")}
        except (KeyError, ValueError, OSError, EOFError, zipfile.BadZipFile, json.JSONDecodeError) as exc:
            raise DatasetError(f"{p} is not a deqmpc_gym dataset ({type(exc).__name__}: {exc})") from exc
        if meta.get("schema") != SCHEMA or meta.get("version") != SCHEMA_VERSION:
            raise DatasetError(f"{p} has schema {meta.get('schema')!r} v{meta.get('version')}; "
                               f"expected {SCHEMA!r} v{SCHEMA_VERSION} — regenerate it with `deqmpc-gym expert collect`")
        if env_id is not None and meta.get("env_id") != env_id:
            raise DatasetError(f"{p} holds data of {meta.get('env_id')!r}, not {env_id!r}")
        return cls(meta["env_id"], _split_arrays(arrays), meta.get("expert_id", ""), meta.get("seed"),
                   meta.get("extra", {}))

    def split(self, val_fraction: float = 0.1, seed: int = 0) -> tuple["ExpertDataset", "ExpertDataset"]:
        """Seeded split by trajectory into (train, validation); validation gets ``ceil(val_fraction * n)``."""
        n = len(self.trajectories)
        if n < 2:
            raise DatasetError(f"need at least 2 trajectories to split, got {n}")
        n_val = min(n - 1, max(1, int(np.ceil(val_fraction * n))))
        perm = np.random.default_rng(seed).permutation(n)
        pick = lambda idx: ExpertDataset(self.env_id, [self.trajectories[i] for i in sorted(idx)], self.expert_id,
                                         self.seed, dict(self.extra))  # noqa: E731
        return pick(perm[n_val:]), pick(perm[:n_val])

    def subset(self, n: int) -> "ExpertDataset":
        """The first ``n`` trajectories."""
        return ExpertDataset(self.env_id, self.trajectories[:n], self.expert_id, self.seed, dict(self.extra))


def _split_arrays(a: dict[str, np.ndarray]) -> list[Trajectory]:
    out: list[Trajectory] = []
    s = c = 0
    for length, term in zip(a["lengths"].tolist(), a["terminal"].tolist()):
        ctrl = a["controls"][c:c + length]
        out.append(Trajectory(obs=a["states"][s:s + length + 1], acts=a["actions"][c:c + length],
                              rews=a["rewards"][c:c + length], terminal=bool(term),
                              controls=None if np.isnan(ctrl).all() else ctrl))
        s += length + 1
        c += length
    if s != len(a["states"]) or c != len(a["actions"]):
        raise DatasetError("dataset arrays are inconsistent with the stored trajectory lengths")
    return out


def from_trajectories(env_id: str, trajectories: Sequence[Any], expert_id: str = "", seed: int | None = None) -> ExpertDataset:
    """Build a dataset from ``imitation``-style objects (duck-typed on ``obs``, ``acts``, ``rews``, ``terminal``)."""
    trajs = [Trajectory(obs=np.asarray(t.obs, np.float64), acts=np.asarray(t.acts, np.float32),
                        rews=np.asarray(getattr(t, "rews", np.zeros(len(t.acts))), np.float64),
                        terminal=bool(t.terminal), controls=getattr(t, "controls", None)) for t in trajectories]
    return ExpertDataset(env_id, trajs, expert_id, seed)


def shipped_dataset(env_id: str) -> Path:
    """Path of the expert dataset shipped with the package for ``env_id`` (e.g. ``"DEQMPC/Pendulum-v0"``).

    Raises :class:`DatasetError` listing the shipped datasets when there is none for ``env_id``; other envs'
    datasets are made with ``deqmpc-gym expert collect``.
    """
    name = env_id.split("/")[-1]
    found = sorted(SHIPPED_DIR.glob(f"{name}-*.npz"))
    if not found:
        have = sorted(p.name for p in SHIPPED_DIR.glob("*.npz"))
        raise DatasetError(f"no dataset shipped for {env_id!r} (shipped: {have}); create one with "
                           f"`deqmpc-gym expert collect --env {env_id} --out FILE`")
    return found[-1]
