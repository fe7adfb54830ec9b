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
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

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
        arrays: dict[str, Any] = {
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
    def load(cls, path: str | Path, env_id: str | None = None) -> ExpertDataset:
        """Read a dataset written by :meth:`save`; ``env_id`` (if given) must match the file's.

        The file's env id must be a registered ``DEQMPC/*`` id (or ``env_id``); the arrays are validated (float
        dtypes, finite values, consistent lengths, state and action widths of the env).

        Raises:
            DatasetError: a missing, corrupt or invalid file, or data of another env.
            UntrustedEnvIdError: the file names an env id that is not a registered ``DEQMPC/*`` id.
        """
        from deqmpc_gym.envs.registration import check_env_id_from_file

        if not isinstance(path, (str, os.PathLike)):
            raise DatasetError(f"path must be a str or os.PathLike, got {type(path).__name__}")
        p = Path(path)
        if not p.is_file():
            raise DatasetError(f"no dataset file at {p}")
        meta, arrays = _read_npz(p)
        _check_meta(meta, p)
        if env_id is not None and meta["env_id"] != env_id:
            raise DatasetError(f"{p} holds data of {meta['env_id']!r}, not {env_id!r}")
        check_env_id_from_file(meta["env_id"], f"dataset {p}", explicit=env_id)
        arrays = _check_arrays(arrays, meta, p)
        return cls(meta["env_id"], _split_arrays(arrays), meta.get("expert_id", ""), meta.get("seed"),
                   meta.get("extra", {}))

    def split(self, val_fraction: float = 0.1, seed: int = 0) -> tuple[ExpertDataset, ExpertDataset]:
        """Seeded split by trajectory into (train, validation); validation gets ``ceil(val_fraction * n)``."""
        n = len(self.trajectories)
        if n < 2:
            raise DatasetError(f"need at least 2 trajectories to split, got {n}")
        n_val = min(n - 1, max(1, int(np.ceil(val_fraction * n))))
        perm = np.random.default_rng(seed).permutation(n)

        def pick(idx: np.ndarray) -> ExpertDataset:
            return ExpertDataset(self.env_id, [self.trajectories[i] for i in sorted(idx)], self.expert_id, self.seed,
                                 dict(self.extra))

        return pick(perm[n_val:]), pick(perm[:n_val])

    def subset(self, n: int) -> ExpertDataset:
        """The first ``n`` trajectories."""
        return ExpertDataset(self.env_id, self.trajectories[:n], self.expert_id, self.seed, dict(self.extra))


_ARRAY_KEYS = ("states", "controls", "actions", "rewards", "lengths", "terminal")


def _read_npz(p: Path) -> tuple[Any, dict[str, np.ndarray]]:
    """``(meta, arrays)`` of a dataset file; any read failure is a :class:`DatasetError` (no pickle)."""
    try:
        with np.load(p, allow_pickle=False) as z:
            meta = json.loads(str(z["meta"]))
            arrays = {k: z[k] for k in _ARRAY_KEYS}
    except Exception as exc:  # not an npz, truncated zip, missing keys, object arrays, bad JSON...
        raise DatasetError(f"{p} is not a deqmpc_gym dataset ({type(exc).__name__}: {exc})") from exc
    return meta, arrays


def _check_meta(meta: Any, p: Path) -> None:
    """Raise :class:`DatasetError` unless ``meta`` is this schema's metadata with well-typed fields."""
    if not isinstance(meta, dict) or meta.get("schema") != SCHEMA or meta.get("version") != SCHEMA_VERSION:
        got = (meta.get("schema"), meta.get("version")) if isinstance(meta, dict) else (type(meta).__name__, None)
        raise DatasetError(f"{p} has schema {got[0]!r} v{got[1]}; "
                           f"expected {SCHEMA!r} v{SCHEMA_VERSION} — regenerate it with `deqmpc-gym expert collect`")
    checks = {"env_id": lambda v: isinstance(v, str), "expert_id": lambda v: isinstance(v, str),
              "seed": lambda v: v is None or (isinstance(v, int) and not isinstance(v, bool)),
              "extra": lambda v: isinstance(v, dict),
              "nx": lambda v: isinstance(v, int) and not isinstance(v, bool),
              "nu": lambda v: isinstance(v, int) and not isinstance(v, bool)}
    for key, ok in checks.items():
        if key in meta and not ok(meta[key]):
            raise DatasetError(f"{p}: metadata field {key!r} has the wrong type ({meta[key]!r})")
    if "env_id" not in meta:
        raise DatasetError(f"{p}: metadata has no env_id")


#: dtype kinds of the stored arrays ("f" float, "i"/"u" integer, "b" bool).
_KINDS = {"states": "f", "controls": "f", "actions": "f", "rewards": "f", "lengths": "iu", "terminal": "b"}
#: number of dimensions of the stored arrays.
_NDIM = {"states": 2, "controls": 2, "actions": 2, "rewards": 1, "lengths": 1, "terminal": 1}


def _check_arrays(a: dict[str, np.ndarray], meta: dict[str, Any], p: Path) -> dict[str, np.ndarray]:
    """Validate dtypes, shapes, finiteness and widths; returns the arrays in the dtypes of :meth:`save`."""
    for key, kinds in _KINDS.items():
        if a[key].dtype.kind not in kinds or a[key].ndim != _NDIM[key]:
            raise DatasetError(f"{p}: {key!r} must be a {_NDIM[key]}-D {_kind_name(kinds)} array, got "
                               f"{a[key].ndim}-D {a[key].dtype}")
    n, nx, nu = len(a["lengths"]), a["states"].shape[1], a["actions"].shape[1]
    if n == 0 or a["terminal"].shape != (n,) or (n and int(a["lengths"].min()) < 1):
        raise DatasetError(f"{p}: needs >= 1 trajectory with >= 1 action each, and one terminal flag per trajectory")
    if a["controls"].shape != a["actions"].shape or a["rewards"].shape != (len(a["actions"]),):
        raise DatasetError(f"{p}: controls {a['controls'].shape} and rewards {a['rewards'].shape} must match the "
                           f"actions {a['actions'].shape}")
    _check_widths(p, meta, nx, nu)
    out = dict(a)
    with np.errstate(over="ignore"):  # float64 values beyond the float32 range become inf: refused below
        for key in ("states", "controls", "rewards"):
            out[key] = a[key].astype(np.float64)
        out["actions"] = a["actions"].astype(np.float32)
    for key in ("states", "actions", "rewards"):
        if not np.all(np.isfinite(out[key])):
            raise DatasetError(f"{p}: {key!r} has NaN or inf values (in their stored dtypes: states, rewards "
                               "float64, actions float32); the dataset is damaged — collect it again")
    if np.any(np.isinf(out["controls"])):
        raise DatasetError(f"{p}: 'controls' has inf values; the dataset is damaged — collect it again")
    return out


def _kind_name(kinds: str) -> str:
    return {"f": "float", "iu": "integer", "b": "bool"}[kinds]


def _check_widths(p: Path, meta: dict[str, Any], nx: int, nu: int) -> None:
    """State / action widths must match the metadata and, for ``DEQMPC/*`` ids, the env's system."""
    if meta.get("nx", nx) != nx or meta.get("nu", nu) != nu:
        raise DatasetError(f"{p}: arrays are {nx} states / {nu} actions wide but the metadata says "
                           f"{meta.get('nx')} / {meta.get('nu')}")
    want = _env_widths(meta["env_id"])
    if want is not None and want != (nx, nu):
        raise DatasetError(f"{p}: states/actions are {nx}/{nu} wide, but {meta['env_id']} has nx={want[0]}, "
                           f"nu={want[1]}; the file does not hold data of this env")


def _env_widths(env_id: str) -> tuple[int, int] | None:
    """``(nx, nu)`` of a built-in ``DEQMPC/*`` id, else None."""
    from deqmpc_gym.envs.registration import ENV_SPECS

    if env_id not in ENV_SPECS:
        return None
    from deqmpc_gym.systems import get_system

    system = get_system(ENV_SPECS[env_id]["system"])
    return int(system.nx), int(system.nu)


def _split_arrays(a: dict[str, np.ndarray]) -> list[Trajectory]:
    """Cut the concatenated arrays into trajectories (controls: all finite, or all NaN = not recorded)."""
    lengths = a["lengths"].astype(np.int64)
    if int(lengths.sum()) != len(a["actions"]) or int((lengths + 1).sum()) != len(a["states"]):
        raise DatasetError("dataset arrays are inconsistent with the stored trajectory lengths")
    out: list[Trajectory] = []
    s = c = 0
    for length, term in zip(lengths.tolist(), a["terminal"].tolist()):
        ctrl = a["controls"][c:c + length]
        missing = np.isnan(ctrl)
        if missing.any() and not missing.all():
            raise DatasetError(f"trajectory {len(out)} has NaN controls at some steps only (NaN marks a trajectory "
                               "without recorded controls); the dataset is damaged")
        out.append(Trajectory(obs=a["states"][s:s + length + 1], acts=a["actions"][c:c + length],
                              rews=a["rewards"][c:c + length], terminal=bool(term),
                              controls=None if missing.all() else ctrl))
        s += length + 1
        c += length
    return out


def from_trajectories(env_id: str, trajectories: Sequence[Any], expert_id: str = "",
                      seed: int | None = None) -> ExpertDataset:
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
