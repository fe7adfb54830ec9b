"""Gymnasium environments over :mod:`deqmpc_gym.systems` (single numpy env, batched torch env, SB3 adapter).

Heavy submodules (torch-batched env, SB3 adapter, MuJoCo rendering) are imported lazily.
"""

from __future__ import annotations

from typing import Any

from deqmpc_gym.envs.registration import ENV_IDS, ENV_SPECS, MAX_EPISODE_STEPS, make_system_env, register_envs

_LAZY = {
    "SystemEnv": "deqmpc_gym.envs.core",
    "observation_bounds": "deqmpc_gym.envs.core",
    "BatchedSystemEnv": "deqmpc_gym.envs.vector",
    "make_batched_env": "deqmpc_gym.envs.vector",
    "SB3VecEnvAdapter": "deqmpc_gym.envs.sb3",
    "make_sb3_vec_env": "deqmpc_gym.envs.sb3",
    "SystemRenderer": "deqmpc_gym.envs.rendering",
    "state_to_points": "deqmpc_gym.envs.rendering",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'deqmpc_gym.envs' has no attribute {name!r}")


__all__ = ["ENV_IDS", "ENV_SPECS", "MAX_EPISODE_STEPS", "make_system_env", "register_envs", *_LAZY]
