"""Stable-baselines3 glue: let ``EvalCallback`` evaluate a :class:`DEQMPCPolicy` outside SB3 training.

``EvalCallback`` evaluates ``callback.model``, a ``BaseAlgorithm``; besides ``predict`` it touches
``get_env()``, ``get_vec_normalize_env()``, ``num_timesteps``, ``logger`` and ``save()``. :class:`SB3ModelShim`
provides exactly those around a policy. Typical use inside an imitation-training loop::

    from stable_baselines3.common.callbacks import EvalCallback
    callback = EvalCallback(eval_env, eval_freq=1, n_eval_episodes=4, best_model_save_path="runs/best")
    shim = attach_eval_callback(callback, policy)
    for step in range(1, n_steps + 1):
        ...  # one training step
        if step % 100 == 0:
            shim.num_timesteps = step
            callback.on_step()
"""

from __future__ import annotations

from typing import Any

from deqmpc_gym.policies.policy import DEQMPCPolicy


class SB3ModelShim:
    """The subset of ``BaseAlgorithm`` that SB3's ``EvalCallback`` uses, backed by a :class:`DEQMPCPolicy`.

    Args:
        policy: the policy to evaluate.
        env: the "training" env reported by ``get_env()`` (may be None).
        logger: an SB3 logger; defaults to ``stable_baselines3.common.logger.configure(None, ["stdout"])``.
    """

    def __init__(self, policy: DEQMPCPolicy, env: Any = None, logger: Any = None) -> None:
        from stable_baselines3.common.logger import configure

        self.policy = policy
        self._env = env
        self.logger = logger if logger is not None else configure(None, ["stdout"])
        self.num_timesteps = 0

    def predict(self, observation: Any, state: Any = None, episode_start: Any = None,
                deterministic: bool = False) -> tuple[Any, Any]:
        return self.policy.predict(observation, state, episode_start, deterministic)

    def get_env(self) -> Any:
        return self._env

    def get_vec_normalize_env(self) -> None:
        """DEQ-MPC works on physical states: never normalized."""
        return None

    def save(self, path: str) -> None:
        """Save the policy (``EvalCallback`` calls this with ``best_model_save_path/best_model``)."""
        self.policy.save(path)


def attach_eval_callback(callback: Any, policy: DEQMPCPolicy, env: Any = None, logger: Any = None) -> SB3ModelShim:
    """Initialise an SB3 callback (e.g. ``EvalCallback``) on a :class:`SB3ModelShim` of ``policy``.

    ``env`` is what ``model.get_env()`` reports (default: the callback's ``eval_env``). Returns the shim; set
    ``shim.num_timesteps`` and call ``callback.on_step()`` to trigger evaluations.
    """
    if env is None:  # SB3 callbacks require model.get_env(); the eval env stands in for a training env
        env = getattr(callback, "eval_env", None)
    shim = SB3ModelShim(policy, env=env, logger=logger)
    callback.init_callback(shim)
    return shim
