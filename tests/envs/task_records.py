"""Recorded rollouts of the single and the batched env: the golden records of ``test_task_records.py``.

``python tests/envs/task_records.py`` rewrites ``tests/envs/data/task_records.npz``; the records in the
repository were written by the envs whose reward, success, termination and obstacle distance were computed by
two separate implementations (numpy in the single env, torch in the batched env), so the test checks that the
one ops-generic task (:mod:`deqmpc_gym.systems.task`) reproduces both of them bit for bit.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np

from deqmpc_gym.envs import ENV_IDS

RECORDS = Path(__file__).parent / "data" / "task_records.npz"
N_ENVS, STEPS, SEED = 3, 60, 11


def _stress_states(env: Any, rng: np.random.Generator, n: int) -> np.ndarray:
    """``n`` finite start states far outside the initial box (envelope exits, collisions, overflow)."""
    low, high = env.observation_space.low.astype(np.float64), env.observation_space.high.astype(np.float64)
    scale = np.minimum(np.maximum(np.abs(low), np.abs(high)), 1e4)
    x = rng.uniform(-1.0, 1.0, (n, low.shape[0])) * scale * rng.choice([1e-3, 1e-1, 1.0], (n, 1))
    x[0] = np.asarray(env.system.goal, dtype=np.float64)
    if env.system.position_slice is not None and env.obstacle_centers.shape[0]:
        a, _ = env.system.position_slice
        x[1, a:a + 3] = env.obstacle_centers[0] + 0.05  # inside a sphere
    x[2] = 0.99 * high * np.where(rng.random(low.shape[0]) < 0.5, -1.0, 1.0)  # overflows the quadrotors' step
    return x


def single_records(env_id: str) -> dict[str, np.ndarray]:
    """Rollouts of ``N_ENVS`` single envs (seeds ``SEED + i``) under random (partly out-of-range) actions, then
    a few steps from stress states; every step's obs, reward, flags and info."""
    rng = np.random.default_rng(SEED)
    out: dict[str, list[Any]] = {k: [] for k in ("obs", "reward", "terminated", "cost", "success", "dist")}

    def record(o: np.ndarray, r: float, te: bool, info: dict[str, Any]) -> None:
        out["obs"].append(o)
        out["reward"].append(r)
        out["terminated"].append(te)
        out["cost"].append(info["cost"])
        out["success"].append(info["is_success"])
        out["dist"].append(info.get("min_obstacle_distance", np.inf))

    for i in range(N_ENVS):
        env = gym.make(env_id).unwrapped
        o, info = env.reset(seed=SEED + i)
        record(o, np.nan, False, info)
        for _ in range(STEPS):
            o, r, te, _, info = env.step(rng.uniform(-1.3, 1.3, env.system.nu).astype(np.float32))
            record(o, r, te, info)
            if te:
                o, info = env.reset()
                record(o, np.nan, False, info)
        for x in _stress_states(env, rng, 6):
            o, info = env.reset(options={"state": x})
            record(o, np.nan, False, info)
            for _ in range(3):
                o, r, te, _, info = env.step(rng.uniform(-1.0, 1.0, env.system.nu))
                record(o, r, te, info)
                if te:
                    break
    return {k: np.asarray(v) for k, v in out.items()}


def batched_records(env_id: str) -> dict[str, np.ndarray]:
    """Rollouts of a ``BatchedSystemEnv`` of ``N_ENVS`` sub-envs (autoreset included) and steps from stress
    states: obs, rewards, flags and the step infos (final infos where a sub-env ended)."""
    from deqmpc_gym.envs.vector import make_batched_env

    rng = np.random.default_rng(SEED + 1)
    venv = make_batched_env(env_id, N_ENVS)
    out: dict[str, list[Any]] = {k: [] for k in ("obs", "reward", "terminated", "truncated", "cost", "success",
                                                 "dist")}

    def record(o: Any, r: Any, te: Any, tr: Any, info: dict[str, Any]) -> None:
        final = info.get("final_info")
        done = info.get("_final_info", np.zeros(N_ENVS, bool))
        for key, name in (("cost", "cost"), ("success", "is_success"), ("dist", "min_obstacle_distance")):
            v = np.asarray(info.get(name, np.full(N_ENVS, np.inf)))
            if final is not None and name in final:
                v = np.where(done, final[name], v)
            out[key].append(v)
        out["obs"].append(o)
        out["reward"].append(r)
        out["terminated"].append(te)
        out["truncated"].append(tr)

    nan, false = np.full(N_ENVS, np.nan), np.zeros(N_ENVS, bool)
    o, info = venv.reset(seed=SEED)
    record(o, nan, false, false, info)
    for _ in range(STEPS):
        o, r, te, tr, info = venv.step(rng.uniform(-1.3, 1.3, (N_ENVS, venv.system.nu)).astype(np.float32))
        record(o, r, te, tr, info)
    single = gym.make(env_id).unwrapped
    for _ in range(2):
        o, info = venv.reset(options={"state": _stress_states(single, rng, N_ENVS)})
        record(o, nan, false, false, info)
        for _ in range(3):
            o, r, te, tr, info = venv.step(rng.uniform(-1.0, 1.0, (N_ENVS, venv.system.nu)))
            record(o, r, te, tr, info)
    return {k: np.asarray(v) for k, v in out.items()}


def all_records() -> dict[str, np.ndarray]:
    """``{"<env id>/<single|batched>/<field>": array}`` for every registered id."""
    out = {}
    for env_id in ENV_IDS:
        for kind, fn in (("single", single_records), ("batched", batched_records)):
            for k, v in fn(env_id).items():
                out[f"{env_id}/{kind}/{k}"] = v
    return out


if __name__ == "__main__":
    RECORDS.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(RECORDS, **all_records())
    print(f"wrote {RECORDS} ({RECORDS.stat().st_size} bytes)")
