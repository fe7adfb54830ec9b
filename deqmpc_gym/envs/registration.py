"""Registration of the ``DEQMPC/*-v0`` ids with Gymnasium (string entry points: importing stays cheap)."""

from __future__ import annotations

from typing import Any

#: ``id -> SystemEnv kwargs`` of every registered environment.
ENV_SPECS: dict[str, dict[str, Any]] = {
    "DEQMPC/Pendulum-v0": {"system": "pendulum"},
    "DEQMPC/Cartpole-v0": {"system": "cartpole"},
    "DEQMPC/Quadrotor-v0": {"system": "quadrotor"},
    "DEQMPC/QPole-v0": {"system": "qpole"},
    "DEQMPC/QuadrotorObs-v0": {"system": "quadrotor", "obstacles": True},
    "DEQMPC/QPoleObs-v0": {"system": "qpole", "obstacles": True},
}
#: every registered id, in a stable order.
ENV_IDS: tuple[str, ...] = tuple(ENV_SPECS)
#: episode length of every registered id (``TimeLimit``).
MAX_EPISODE_STEPS: int = 200


def register_envs() -> None:
    """Register every id of :data:`ENV_IDS` with Gymnasium; ids already registered are skipped (idempotent)."""
    from gymnasium.envs.registration import register, registry

    for env_id, kwargs in ENV_SPECS.items():
        if env_id in registry:
            continue
        register(
            id=env_id,
            entry_point="deqmpc_gym.envs.core:SystemEnv",
            vector_entry_point="deqmpc_gym.envs.vector:BatchedSystemEnv",
            max_episode_steps=MAX_EPISODE_STEPS,
            kwargs=dict(kwargs),
        )


def env_kwargs(env_id: str) -> dict[str, Any]:
    """The ``SystemEnv`` kwargs of a registered id (raises :class:`~deqmpc_gym.errors.ConfigError`)."""
    from deqmpc_gym.errors import ConfigError

    if env_id not in ENV_SPECS:
        raise ConfigError(f"unknown env id {env_id!r}; valid ids: {list(ENV_IDS)}")
    return dict(ENV_SPECS[env_id])


def make_system_env(env_id: str, **kwargs: Any) -> Any:
    """``gymnasium.make(env_id, **kwargs)`` after making sure the ``DEQMPC/*`` ids are registered."""
    import gymnasium as gym

    register_envs()
    return gym.make(env_id, **kwargs)


def check_env_id_from_file(env_id: Any, source: str, explicit: str | None = None) -> str:
    """Return ``env_id`` read from ``source`` (a checkpoint, dataset or expert card) if it is safe to make.

    Accepted: the id the caller passed explicitly (``explicit``), or a ``DEQMPC/*`` id registered with Gymnasium.
    Anything else raises :class:`~deqmpc_gym.errors.UntrustedEnvIdError` *before* ``gym.make`` sees it (an id
    of the form ``"module:Env-v0"`` makes ``gym.make`` import ``module``, i.e. run code named by the file).
    """
    from deqmpc_gym.errors import UntrustedEnvIdError

    if explicit is not None and env_id == explicit:
        return explicit
    if isinstance(env_id, str) and env_id.startswith("DEQMPC/") and ":" not in env_id:
        from gymnasium.envs.registration import registry

        register_envs()
        if env_id in registry:
            return env_id
    raise UntrustedEnvIdError(
        f"{source} names the env id {env_id!r}, which is not a registered DEQMPC/* id; it was refused without "
        f"importing or running anything (gym.make('module:Env') would import 'module'). Use a file made for one "
        f"of {list(ENV_IDS)}, or pass the env id explicitly if you trust the file")
