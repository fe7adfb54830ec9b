"""Property-based tests of the public entry points: random shapes, dtypes and values never escape as anything but a
``DeqmpcError``, and whatever is returned is finite and valid.

Entry points: ``SystemEnv.reset``/``step``, ``BatchedSystemEnv``, ``deqmpc_gym.mpc.solve``,
``DEQMPCPolicy.predict``, ``ExpertDataset.load`` and ``DEQMPCPolicy.load``. Each example breaks at most one
argument (or none) so that both the error paths and the valid path are exercised; ``--hypothesis-show-statistics``
shows the split. Examples are derandomized (the same on every run, no example database) and the policies are
tiny, which keeps the module to a few seconds.
"""

from __future__ import annotations

import functools
import json
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import deqmpc_gym  # noqa: F401  (registers the env ids)
from deqmpc_gym import DEQMPCPolicy
from deqmpc_gym.data import SCHEMA, SCHEMA_VERSION, ExpertDataset
from deqmpc_gym.envs import ENV_IDS, SystemEnv, make_batched_env
from deqmpc_gym.errors import DeqmpcError
from deqmpc_gym.mpc import MPCConfig, MPCProblem, solve
from deqmpc_gym.systems import get_system

PEND = "DEQMPC/Pendulum-v0"
FAST = settings(max_examples=40, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

# ---------------------------------------------------------------------------------------------- strategies
MODERATE = st.floats(-20.0, 20.0)
EXTREME = st.one_of(st.floats(-1e30, 1e30), st.sampled_from([1e20, -1e20, 1e300, -1e300]))
NON_FINITE = st.sampled_from([np.nan, np.inf, -np.inf])
ODD_DTYPES = [np.int8, np.int64, np.uint8, np.bool_, np.complex128, np.float16]
#: values of the wrong kind for any argument
JUNK = st.one_of(st.none(), st.text(max_size=5), st.integers(-5, 5), st.floats(allow_nan=True), st.booleans(),
                 st.lists(st.integers(), max_size=3), st.dictionaries(st.text(max_size=3), st.integers(), max_size=2))


def _array(shape: tuple[int, ...], dtype: Any, values: list[float]) -> np.ndarray:
    """``values`` repeated to ``shape`` and cast to ``dtype`` (float overflow gives inf)."""
    flat = np.resize(np.array(values, dtype=np.float64), int(np.prod(shape)))
    with np.errstate(all="ignore"):
        if np.issubdtype(dtype, np.integer) or dtype is np.bool_:
            flat = np.nan_to_num(flat, nan=0.0, posinf=1e3, neginf=-1e3).clip(-100, 100)
        return flat.astype(dtype).reshape(shape)


def valid(*shape: int) -> st.SearchStrategy[np.ndarray]:
    """Float64/float32 arrays of ``shape`` with moderate (mostly) or extreme but finite values."""
    return st.builds(_array, st.just(shape), st.sampled_from([np.float64, np.float64, np.float32]),
                     st.lists(st.one_of(MODERATE, MODERATE, MODERATE, EXTREME), min_size=1, max_size=6))


def invalid_array(*shape: int) -> st.SearchStrategy[np.ndarray]:
    """An array that should not pass for one of ``shape``: another shape, an odd dtype, or NaN/inf values."""
    wrong_shape = st.one_of(hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=4),
                            st.just(shape[:-1]), st.just((*shape, 1)), st.just(tuple(max(0, d - 1) for d in shape)))
    values = st.lists(st.one_of(MODERATE, EXTREME), min_size=1, max_size=6)
    return st.one_of(
        st.builds(_array, wrong_shape, st.sampled_from([np.float64, np.float32]), values),
        st.builds(_array, st.just(shape), st.sampled_from(ODD_DTYPES), values),
        st.builds(_array, st.just(shape), st.just(np.float64), st.lists(st.one_of(MODERATE, NON_FINITE),
                                                                        min_size=1, max_size=6)))


def invalid(*shape: int) -> st.SearchStrategy[Any]:
    """:func:`invalid_array` or a value of another kind altogether."""
    return st.one_of(invalid_array(*shape), JUNK)


def draw_arg(data: st.DataObject, name: str, broken: str | None, good: st.SearchStrategy,
             bad: st.SearchStrategy) -> Any:
    """Draw argument ``name`` from ``bad`` if it is the ``broken`` one, else from ``good``."""
    return data.draw(bad if name == broken else good, label=name)


def _finite(x: Any) -> bool:
    return bool(np.all(np.isfinite(np.asarray(x, dtype=np.float64))))


# ---------------------------------------------------------------------------------------------- envs
SYSTEMS = ("pendulum", "cartpole", "quadrotor", "qpole")
BAD_SEEDS = st.one_of(st.integers(-5, -1), st.floats(allow_nan=True), st.text(max_size=3), st.booleans())


@functools.cache
def _single_env(system: str) -> SystemEnv:
    return SystemEnv(system=system)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # numpy overflow warnings of states near 1e300
@FAST
@given(system=st.sampled_from(SYSTEMS), data=st.data(),
       broken=st.sampled_from([None, None, "seed", "options", "action"]))
def test_env_reset_and_step(system: str, data: st.DataObject, broken: str | None) -> None:
    env = _single_env(system)
    nx, nu = env.system.nx, env.system.nu
    seed = draw_arg(data, "seed", broken, st.one_of(st.none(), st.integers(0, 2**40)), BAD_SEEDS)
    options = draw_arg(data, "options", broken, st.one_of(st.none(), st.fixed_dictionaries({"state": valid(nx)})),
                       st.one_of(JUNK, st.fixed_dictionaries({"state": invalid(nx)})))
    try:
        obs, info = env.reset(seed=seed, options=options)
    except DeqmpcError as exc:
        event(f"reset: {type(exc).__name__}")
        return
    event("reset: ok")
    assert obs.shape == (nx,) and obs.dtype == np.float32 and isinstance(info["is_success"], bool)
    for _ in range(3):
        action = draw_arg(data, "action", broken, valid(nu), invalid(nu))
        try:
            obs, reward, terminated, truncated, info = env.step(action)
        except DeqmpcError as exc:
            event(f"step: {type(exc).__name__}")
            continue
        event("step: ok")
        assert obs.shape == (nx,) and 0.0 <= reward <= 1.0 and not truncated
        assert _finite(obs) or terminated  # a diverged state is terminal (documented)
        if terminated:
            break


@functools.cache
def _batched(env_id: str, n: int) -> Any:
    return make_batched_env(env_id, n)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
@FAST
@given(env_id=st.sampled_from(["DEQMPC/Pendulum-v0", "DEQMPC/Cartpole-v0", "DEQMPC/QPole-v0"]),
       n=st.integers(1, 3), data=st.data(), broken=st.sampled_from([None, None, "seed", "actions"]))
def test_batched_env(env_id: str, n: int, data: st.DataObject, broken: str | None) -> None:
    env = _batched(env_id, n)
    nx, nu = env.system.nx, env.system.nu
    seed = draw_arg(data, "seed", broken,
                    st.one_of(st.none(), st.integers(0, 10**6), st.lists(st.one_of(st.none(), st.integers(0, 99)),
                                                                         min_size=n, max_size=n)),
                    st.one_of(BAD_SEEDS, st.lists(st.integers(0, 9), min_size=n + 1, max_size=n + 2),
                              st.lists(st.one_of(st.integers(-3, -1), st.floats()), min_size=n, max_size=n)))
    try:
        obs, _ = env.reset(seed=seed)
    except DeqmpcError as exc:
        event(f"reset: {type(exc).__name__}")
        return
    assert obs.shape == (n, nx) and _finite(obs)
    for _ in range(3):
        actions = draw_arg(data, "actions", broken, valid(n, nu), invalid(n, nu))
        try:
            obs, reward, terminated, truncated, infos = env.step(actions)
        except DeqmpcError as exc:
            event(f"step: {type(exc).__name__}")
            continue
        event("step: ok")
        assert obs.shape == (n, nx) and _finite(obs)  # diverged sub-envs are reset at once
        assert reward.shape == (n,) and np.all((reward >= 0.0) & (reward <= 1.0))


@pytest.mark.parametrize("num_envs", [0, -1, 1.5, "2", None, True])
def test_batched_env_rejects_bad_sizes(num_envs: Any) -> None:
    with pytest.raises(DeqmpcError):
        make_batched_env(PEND, num_envs)


# ---------------------------------------------------------------------------------------------- solver
@functools.cache
def _problem(system: str, horizon: int) -> MPCProblem:
    return MPCProblem(get_system(system), MPCConfig(horizon=horizon))


def _tensors(strategy: st.SearchStrategy) -> st.SearchStrategy:
    """Arrays from ``strategy`` as torch tensors (anything else as it is)."""
    return strategy.map(lambda x: torch.as_tensor(x) if isinstance(x, np.ndarray) else x)


@FAST
@given(system=st.sampled_from(("pendulum", "cartpole")), horizon=st.integers(2, 5), b=st.integers(1, 3),
       data=st.data(), broken=st.sampled_from([None, None, "x0", "theta", "iters", "gradient"]))
def test_mpc_solve(system: str, horizon: int, b: int, data: st.DataObject, broken: str | None) -> None:
    problem = _problem(system, horizon)
    nx = problem.nx
    bad_x0 = invalid(b, nx).filter(lambda x: not (isinstance(x, np.ndarray) and x.ndim == 2 and x.shape[0] == 0))
    x0 = draw_arg(data, "x0", broken, _tensors(valid(b, nx)), st.one_of(_tensors(bad_x0), valid(b, nx)))
    theta = draw_arg(data, "theta", broken, _tensors(valid(b, horizon, nx)), _tensors(invalid(b, horizon, nx)))
    iters = draw_arg(data, "iters", broken, st.integers(0, 3), st.one_of(st.just(2.0), st.integers(-3, -1), JUNK))
    gradient = draw_arg(data, "gradient", broken, st.sampled_from([None, "implicit", "unroll", "final_implicit"]),
                        st.one_of(st.just("bogus"), JUNK))
    try:
        x, u, state, info = solve(problem, x0, theta, iters=iters, gradient=gradient)
    except DeqmpcError as exc:
        event(f"solve: {type(exc).__name__}")
        return
    event("solve: ok")
    assert x.shape == (b, horizon, nx) and u.shape == (b, horizon, problem.nu)
    assert _finite(x) and _finite(u)


def test_mpc_solve_empty_batch_bad_state_and_exit_residual() -> None:
    problem = _problem("pendulum", 3)
    with pytest.raises(DeqmpcError, match="empty batch"):
        solve(problem, torch.zeros(0, 2, dtype=torch.float64), torch.zeros(0, 3, 2, dtype=torch.float64))
    x0, theta = torch.zeros(1, 2, dtype=torch.float64), torch.zeros(1, 3, 2, dtype=torch.float64)
    with pytest.raises(DeqmpcError, match="SolverState"):
        solve(problem, x0, theta, state={"x": x0})  # type: ignore[arg-type]
    for bad in ("1e-3", -1.0, float("nan"), True):
        with pytest.raises(DeqmpcError, match="exit_residual"):
            solve(problem, x0, theta, exit_residual=bad)  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------------- policy
VARIANTS = ("deq-mpc-nn", "deq-mpc-deq", "diff-mpc-nn", "diff-mpc-deq", "nn", "deq")


@functools.cache
def _small_policy(variant: str) -> DEQMPCPolicy:
    torch.manual_seed(0)
    return DEQMPCPolicy.from_env(PEND, variant, hidden=8)


@FAST
@given(variant=st.sampled_from(VARIANTS), n=st.integers(1, 4), data=st.data(),
       broken=st.sampled_from([None, None, "obs", "starts"]))
def test_policy_predict(variant: str, n: int, data: st.DataObject, broken: str | None) -> None:
    policy = _small_policy(variant)
    state = None
    for _ in range(3):  # a cold call, then warm-started ones from the returned state
        obs = draw_arg(data, "obs", broken, st.one_of(valid(n, 2), valid(n, 2), valid(2)), invalid(n, 2))
        starts = draw_arg(data, "starts", broken, st.one_of(st.none(), st.lists(st.booleans(), min_size=n,
                                                                                 max_size=n)),
                          st.one_of(st.lists(st.booleans(), min_size=n + 1, max_size=n + 2), st.text(max_size=3)))
        try:
            actions, state = policy.predict(obs, state, starts)
        except DeqmpcError as exc:
            event(f"predict: {type(exc).__name__}")
            continue
        event(f"predict: ok, fallback {bool(policy.last_fallback.any())}")
        single = np.asarray(obs).ndim == 1
        rows = 1 if single else np.asarray(obs).shape[0]
        assert actions.shape == ((1,) if single else (rows, 1))
        assert actions.dtype == np.float32 and _finite(actions) and np.all(np.abs(actions) <= 1.0)
        assert policy.last_fallback.shape == (rows,)


# ---------------------------------------------------------------------------------------------- dataset files
def _valid_arrays(lengths: list[int]) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    steps = sum(lengths)
    return {"states": rng.normal(size=(steps + len(lengths), 2)), "controls": rng.normal(size=(steps, 1)),
            "actions": rng.uniform(-1, 1, size=(steps, 1)).astype(np.float32), "rewards": rng.uniform(size=steps),
            "lengths": np.array(lengths, dtype=np.int64), "terminal": np.zeros(len(lengths), bool)}


META = {"schema": SCHEMA, "version": SCHEMA_VERSION, "env_id": PEND, "expert_id": "", "seed": 0, "nx": 2, "nu": 1,
        "extra": {}}
ARRAY_KEYS = ("states", "controls", "actions", "rewards", "lengths", "terminal")


@FAST
@given(lengths=st.lists(st.integers(1, 4), min_size=1, max_size=3), data=st.data(),
       change=st.sampled_from(["none", "array", "array", "valid array", "meta", "drop"]))
def test_dataset_load(lengths: list[int], data: st.DataObject, change: str) -> None:
    arrays_ = _valid_arrays(lengths)
    meta = dict(META)
    if change in ("array", "valid array"):
        key = data.draw(st.sampled_from(ARRAY_KEYS), label="array")
        make = valid if change == "valid array" else invalid
        arrays_[key] = data.draw(make(*arrays_[key].shape), label=key)
    elif change == "meta":
        key = data.draw(st.sampled_from(list(META)), label="meta key")
        meta[key] = data.draw(st.one_of(JUNK, st.sampled_from([*ENV_IDS, "os:system", "Pendulum-v1"])), label=key)
    arrays_["meta"] = np.array(json.dumps(meta))
    if change == "drop":
        arrays_.pop(data.draw(st.sampled_from([*ARRAY_KEYS, "meta"]), label="dropped"))
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "d.npz"
        np.savez(path, **{k: np.asarray(v, dtype=object if v is None else None) for k, v in arrays_.items()})
        try:
            ds = ExpertDataset.load(path)
        except DeqmpcError as exc:
            event(f"load: {type(exc).__name__}")
            return
    event("load: ok")
    assert len(ds) >= 1 and ds.nx == 2 and ds.nu == 1 and ds.env_id == PEND
    for t in ds.trajectories:
        assert t.obs.dtype == np.float64 and t.acts.dtype == np.float32 and len(t) >= 1
        assert _finite(t.obs) and _finite(t.acts) and _finite(t.rews)
        assert t.controls is None or _finite(t.controls)


# ---------------------------------------------------------------------------------------------- checkpoints
@functools.cache
def _saved_payload() -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        path = _small_policy("deq-mpc-nn").save(Path(tmp) / "pol")
        return torch.load(path / "policy.pt", weights_only=True)


CONFIG_VALUES = st.one_of(JUNK, st.integers(-2, 12), st.floats(-1.0, 2.0),
                          st.sampled_from(["nn", "deq", "diff-mpc-nn", "implicit", "float32", "phantom", "ift"]))


@FAST
@given(data=st.data(), change=st.sampled_from(["none", "config", "config", "meta", "weight", "state_dict"]))
def test_checkpoint_load(data: st.DataObject, change: str) -> None:
    payload = dict(_saved_payload())
    meta = json.loads(payload["meta_json"])
    meta["config"] = dict(meta["config"])
    state = dict(payload["state_dict"])
    if change == "config":
        key = data.draw(st.sampled_from(sorted(meta["config"])), label="config key")
        meta["config"][key] = data.draw(CONFIG_VALUES, label=key)
    elif change == "meta":
        key = data.draw(st.sampled_from(["env_id", "env_kwargs", "version", "format", "config"]), label="meta key")
        meta[key] = data.draw(st.one_of(JUNK, st.sampled_from([*ENV_IDS, "os:system"]),
                                        st.fixed_dictionaries({"system": st.sampled_from(["qpole", "nope"])})),
                              label=key)
    elif change == "weight":
        key = data.draw(st.sampled_from(sorted(state)), label="weight")
        shape = tuple(state[key].shape)
        state[key] = torch.as_tensor(data.draw(st.one_of(valid(*shape), invalid_array(*shape)), label="w"))
    payload["meta_json"] = json.dumps(meta)
    payload["state_dict"] = data.draw(JUNK, label="state_dict") if change == "state_dict" else state
    with tempfile.TemporaryDirectory() as tmp:
        torch.save(payload, Path(tmp) / "policy.pt")
        try:
            policy = DEQMPCPolicy.load(tmp)
        except DeqmpcError as exc:
            event(f"load: {type(exc).__name__}")
            return
    event("load: ok")
    actions, _ = policy.predict(np.array([[0.3, 0.0], [-2.0, 1.0]]))
    assert actions.shape == (2, policy.system.nu) and _finite(actions) and np.all(np.abs(actions) <= 1.0)
