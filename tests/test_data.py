"""Expert trajectories and the versioned .npz dataset: validation, round trip, loading errors, split, atomicity."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from deqmpc_gym.data import SCHEMA, SCHEMA_VERSION, ExpertDataset, Trajectory, from_trajectories
from deqmpc_gym.errors import DatasetError, ShapeError

PEND = "DEQMPC/Pendulum-v0"


def _traj(rng: np.random.Generator, length: int, nx: int = 2, nu: int = 1, controls: bool = True,
          terminal: bool = False) -> Trajectory:
    return Trajectory(obs=rng.normal(size=(length + 1, nx)),
                      acts=rng.uniform(-1, 1, size=(length, nu)).astype(np.float32),
                      rews=rng.uniform(0, 1, size=length), terminal=terminal,
                      controls=rng.normal(size=(length, nu)) if controls else None)


def _dataset(n: int = 10, seed: int = 0, env_id: str = PEND) -> ExpertDataset:
    rng = np.random.default_rng(seed)
    trajs = [_traj(rng, int(rng.integers(3, 9)), controls=(i % 3 != 0), terminal=(i % 4 == 1)) for i in range(n)]
    return ExpertDataset(env_id, trajs, expert_id="unit-test", seed=seed, extra={"note": "x", "k": [1, 2]})


# ---------------------------------------------------------------------------------------------- Trajectory
def test_trajectory_valid(rng: np.random.Generator) -> None:
    t = _traj(rng, 5)
    assert len(t) == 5
    assert t.infos is None


@pytest.mark.parametrize("case", ["no_actions", "obs_len", "obs_ndim", "rews", "controls"])
def test_trajectory_shape_errors(case: str) -> None:
    obs, acts, rews = np.zeros((4, 2)), np.zeros((3, 1), np.float32), np.zeros(3)
    kw: dict = dict(obs=obs, acts=acts, rews=rews, terminal=False)
    if case == "no_actions":
        kw.update(obs=np.zeros((1, 2)), acts=np.zeros((0, 1), np.float32), rews=np.zeros(0))
    elif case == "obs_len":
        kw.update(obs=np.zeros((3, 2)))  # needs L + 1 = 4 states
    elif case == "obs_ndim":
        kw.update(obs=np.zeros(4))
    elif case == "rews":
        kw.update(rews=np.zeros((3, 1)))
    elif case == "controls":
        kw.update(controls=np.zeros((3, 2)))
    with pytest.raises(ShapeError):
        Trajectory(**kw)
    # ShapeError is also a ValueError
    with pytest.raises(ValueError):
        Trajectory(**kw)


# ---------------------------------------------------------------------------------------------- save / load
def _assert_same(a: ExpertDataset, b: ExpertDataset) -> None:
    assert a.env_id == b.env_id and a.expert_id == b.expert_id and a.seed == b.seed and a.extra == b.extra
    assert len(a) == len(b)
    for x, y in zip(a.trajectories, b.trajectories):
        np.testing.assert_array_equal(x.obs, y.obs)
        np.testing.assert_array_equal(x.acts, y.acts)
        np.testing.assert_array_equal(x.rews, y.rews)
        assert x.terminal == y.terminal
        if x.controls is None:
            assert y.controls is None
        else:
            np.testing.assert_array_equal(x.controls, y.controls)
        assert y.obs.dtype == np.float64 and y.acts.dtype == np.float32 and y.rews.dtype == np.float64


def test_save_load_round_trip_exact(tmp_path: Path) -> None:
    ds = _dataset()
    path = ds.save(tmp_path / "d.npz")
    assert path == tmp_path / "d.npz" and path.exists()
    back = ExpertDataset.load(path, env_id=PEND)
    _assert_same(ds, back)
    assert back.nx == 2 and back.nu == 1
    # saving the loaded dataset again gives identical arrays
    back.save(tmp_path / "e.npz")
    _assert_same(back, ExpertDataset.load(tmp_path / "e.npz"))


def test_save_overwrites_and_creates_parent(tmp_path: Path) -> None:
    target = tmp_path / "sub" / "dir" / "d.npz"
    _dataset(4, seed=1).save(target)
    _dataset(6, seed=2).save(target)
    assert len(ExpertDataset.load(target)) == 6


def test_save_empty_dataset_refused(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="empty"):
        ExpertDataset(PEND, []).save(tmp_path / "x.npz")
    assert not (tmp_path / "x.npz").exists()


def test_load_wrong_env_names_both_ids(tmp_path: Path) -> None:
    path = _dataset().save(tmp_path / "d.npz")
    with pytest.raises(DatasetError) as info:
        ExpertDataset.load(path, env_id="DEQMPC/QPole-v0")
    msg = str(info.value)
    assert PEND in msg and "DEQMPC/QPole-v0" in msg


def _rewrite_meta(src: Path, dst: Path, **changes: object) -> None:
    with np.load(src, allow_pickle=False) as z:
        arrays = {k: z[k] for k in z.files}
    meta = json.loads(str(arrays["meta"]))
    meta.update(changes)
    arrays["meta"] = np.array(json.dumps(meta))
    np.savez(dst, **arrays)


@pytest.mark.parametrize("changes", [{"version": SCHEMA_VERSION + 1}, {"schema": "something.else"}])
def test_load_rejects_wrong_schema(tmp_path: Path, changes: dict) -> None:
    path = _dataset().save(tmp_path / "d.npz")
    bad = tmp_path / "bad.npz"
    _rewrite_meta(path, bad, **changes)
    with pytest.raises(DatasetError, match="schema"):
        ExpertDataset.load(bad)


def test_schema_is_stored(tmp_path: Path) -> None:
    path = _dataset().save(tmp_path / "d.npz")
    with np.load(path, allow_pickle=False) as z:
        meta = json.loads(str(z["meta"]))
        assert set(z.files) == {"states", "controls", "actions", "rewards", "lengths", "terminal", "meta"}
    assert meta["schema"] == SCHEMA and meta["version"] == SCHEMA_VERSION and meta["env_id"] == PEND


@pytest.mark.parametrize("content", [b"this is not a numpy file\n", b"PK\x03\x04 truncated zip", b""])
def test_load_rejects_non_npz(tmp_path: Path, content: bytes) -> None:
    p = tmp_path / "junk.npz"
    p.write_bytes(content)
    with pytest.raises(DatasetError):
        ExpertDataset.load(p)


def test_load_rejects_npz_missing_keys(tmp_path: Path) -> None:
    p = tmp_path / "other.npz"
    np.savez(p, a=np.zeros(3))
    with pytest.raises(DatasetError, match="not a deqmpc_gym dataset"):
        ExpertDataset.load(p)


def test_load_rejects_inconsistent_lengths(tmp_path: Path) -> None:
    path = _dataset().save(tmp_path / "d.npz")
    with np.load(path, allow_pickle=False) as z:
        arrays = {k: z[k] for k in z.files}
    arrays["lengths"] = arrays["lengths"].copy()
    arrays["lengths"][0] -= 1
    np.savez(tmp_path / "bad.npz", **arrays)
    with pytest.raises(DatasetError):
        ExpertDataset.load(tmp_path / "bad.npz")


def test_load_missing_file(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="no dataset file"):
        ExpertDataset.load(tmp_path / "nope.npz")


def test_shipped_dataset_loads() -> None:
    import deqmpc_gym

    path = Path(deqmpc_gym.__file__).parent / "datasets" / "Pendulum-v0-300.npz"
    ds = ExpertDataset.load(path, env_id=PEND)
    assert len(ds) == 300
    assert all(len(t) == 200 for t in ds.trajectories)
    assert ds.nx == 2 and ds.nu == 1


# ---------------------------------------------------------------------------------------------- split
def test_split_by_trajectory_seeded_disjoint() -> None:
    ds = _dataset(50)
    train, val = ds.split(0.1, seed=3)
    assert len(val) == 5 and len(train) == 45
    ids = {id(t) for t in ds.trajectories}
    tr_ids, va_ids = {id(t) for t in train.trajectories}, {id(t) for t in val.trajectories}
    assert tr_ids.isdisjoint(va_ids)
    assert tr_ids | va_ids == ids  # whole trajectories, nothing lost
    assert train.env_id == val.env_id == PEND
    # seeded: same seed -> same split, other seed -> (almost surely) another split
    train2, val2 = ds.split(0.1, seed=3)
    assert [id(t) for t in val2.trajectories] == [id(t) for t in val.trajectories]
    _, val3 = ds.split(0.1, seed=4)
    assert {id(t) for t in val3.trajectories} != va_ids
    # order is preserved within each part
    order = {id(t): i for i, t in enumerate(ds.trajectories)}
    assert [order[id(t)] for t in train.trajectories] == sorted(order[id(t)] for t in train.trajectories)


def test_split_default_is_90_10_and_rounds_up() -> None:
    train, val = _dataset(20).split()
    assert (len(train), len(val)) == (18, 2)
    train, val = _dataset(11).split()
    assert (len(train), len(val)) == (9, 2)  # ceil(1.1) = 2
    train, val = _dataset(2).split(0.9)
    assert (len(train), len(val)) == (1, 1)  # training keeps at least one trajectory
    with pytest.raises(DatasetError):
        _dataset(1).split()


def test_subset() -> None:
    ds = _dataset(10)
    sub = ds.subset(3)
    assert len(sub) == 3 and sub.trajectories[0] is ds.trajectories[0]


# ---------------------------------------------------------------------------------------------- atomicity
def test_atomic_write_leaves_no_temp_files(tmp_path: Path) -> None:
    ds = _dataset()
    for _ in range(3):
        ds.save(tmp_path / "d.npz")
    assert sorted(os.listdir(tmp_path)) == ["d.npz"]


def test_failed_write_keeps_old_file_and_no_temp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "d.npz"
    _dataset(4).save(target)
    before = target.read_bytes()

    def boom(*args: object, **kwargs: object) -> None:
        raise RuntimeError("disk full")

    monkeypatch.setattr(np, "savez_compressed", boom)
    with pytest.raises(RuntimeError, match="disk full"):
        _dataset(8).save(target)
    assert target.read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == ["d.npz"]


# ---------------------------------------------------------------------------------------------- from_trajectories
@dataclass
class _ImitationLike:
    obs: list
    acts: list
    rews: list
    terminal: bool
    infos: None = None


@dataclass
class _NoRews:
    obs: np.ndarray
    acts: np.ndarray
    terminal: bool


def test_from_trajectories_duck_typed(tmp_path: Path) -> None:
    a = _ImitationLike(obs=[[0.0, 1.0], [0.5, 1.5], [1.0, 2.0]], acts=[[0.1], [-0.2]], rews=[1.0, 0.5], terminal=True)
    b = _NoRews(obs=np.zeros((4, 2), np.float32), acts=np.zeros((3, 1)), terminal=False)
    ds = from_trajectories(PEND, [a, b], expert_id="imitation", seed=5)
    assert len(ds) == 2 and ds.expert_id == "imitation" and ds.seed == 5
    t0, t1 = ds.trajectories
    assert t0.obs.dtype == np.float64 and t0.acts.dtype == np.float32 and t0.rews.dtype == np.float64
    assert t0.terminal is True and t1.terminal is False
    np.testing.assert_array_equal(t1.rews, np.zeros(3))
    assert t0.controls is None
    back = ExpertDataset.load(ds.save(tmp_path / "d.npz"), env_id=PEND)
    _assert_same(ds, back)


def test_from_trajectories_validates_shapes() -> None:
    bad = _ImitationLike(obs=[[0.0, 1.0]], acts=[[0.1], [0.2]], rews=[1.0, 1.0], terminal=False)
    with pytest.raises(ShapeError):
        from_trajectories(PEND, [bad])
