"""Shared pytest setup: one torch thread (the machine is shared), headless MuJoCo, small shared fixtures."""

from __future__ import annotations

import os

os.environ.setdefault("MUJOCO_GL", "egl")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)

PEND = "DEQMPC/Pendulum-v0"


@pytest.fixture(scope="session")
def pendulum_expert():
    """The Pendulum PPO expert shipped with the package."""
    from deqmpc_gym.experts import load_expert

    return load_expert(PEND)


@pytest.fixture(scope="session")
def tiny_pendulum_dataset(pendulum_expert):
    """12 short (40-step) expert trajectories of Pendulum, collected once per session."""
    from deqmpc_gym.experts import collect_dataset

    return collect_dataset(pendulum_expert, PEND, 12, seed=0, max_steps=40, expert_id="test")


@pytest.fixture(scope="session")
def tiny_pendulum_dataset_file(tmp_path_factory, tiny_pendulum_dataset):
    path = tmp_path_factory.mktemp("data") / "pend-tiny.npz"
    tiny_pendulum_dataset.save(path)
    return path


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(0)


@pytest.fixture(scope="module")
def ray_session():
    """One local 2-CPU Ray instance per test module (the launcher joins a running instance)."""
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"OMP_NUM_THREADS": "1"}})
    yield ray
    ray.shutdown()


@pytest.fixture
def without_ray(monkeypatch):
    """``import ray`` fails with ImportError for the duration of the test (Ray not installed)."""
    import builtins

    real_import = builtins.__import__

    def no_ray(name, *args, **kwargs):
        if name == "ray":
            raise ImportError("No module named 'ray'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_ray)
