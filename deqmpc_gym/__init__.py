"""deqmpc_gym: Deep Equilibrium Model Predictive Control for Gymnasium.

``import deqmpc_gym`` registers the ``DEQMPC/*-v0`` environments (see :data:`deqmpc_gym.envs.ENV_IDS`);
``gym.make("deqmpc_gym:DEQMPC/QPole-v0")`` works in fresh subprocesses too.
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"

from deqmpc_gym.envs.registration import ENV_IDS, register_envs  # noqa: E402

register_envs()


def __getattr__(name: str) -> Any:
    if name == "DEQMPCPolicy":
        import importlib

        try:
            mod = importlib.import_module("deqmpc_gym.policies")
        except ImportError as exc:  # pragma: no cover - depends on the policies module being present
            raise ImportError(f"deqmpc_gym.DEQMPCPolicy needs deqmpc_gym.policies, which failed to import: "
                              f"{exc}") from exc
        try:
            return mod.DEQMPCPolicy
        except AttributeError:
            raise AttributeError("deqmpc_gym.policies does not define DEQMPCPolicy yet") from None
    raise AttributeError(f"module 'deqmpc_gym' has no attribute {name!r}")


__all__ = ["__version__", "ENV_IDS", "register_envs", "DEQMPCPolicy"]
