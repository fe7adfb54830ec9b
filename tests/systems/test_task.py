"""The task written once (:mod:`deqmpc_gym.systems.task`): numpy and torch evaluations agree."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from deqmpc_gym.systems import OBSTACLE_CENTERS, QPole, get_system
from deqmpc_gym.systems.task import Task


@pytest.mark.parametrize("name", ["pendulum", "cartpole", "quadrotor", "qpole"])
def test_numpy_and_torch_agree(name: str) -> None:
    system = get_system(name)
    centers = OBSTACLE_CENTERS if system.position_slice is not None else None
    tn, tt = Task.of(system, centers, 0.5), Task.of(system, centers, 0.5, dtype=torch.float64)
    rng = np.random.default_rng(0)
    x = np.asarray(system.goal) + rng.normal(0.0, 1.0, (64, system.nx)) * rng.choice([0.01, 1.0, 30.0], (64, 1))
    x[-1, 0] = np.nan
    x[-2, -1] = 1e39  # finite in float64, not in the float32 observation
    a = rng.uniform(-1.0, 1.0, (64, system.nu))
    batch = tt.outcome(torch.as_tensor(x), torch.as_tensor(a))
    for i in range(64):
        with np.errstate(all="ignore"):
            one = tn.outcome(x[i], a[i])
        assert bool(one.terminated) == bool(batch.terminated[i]) and bool(one.success) == bool(batch.success[i])
        assert bool(one.violated) == bool(batch.violated[i])
        assert math.isclose(float(one.reward), float(batch.reward[i]), rel_tol=1e-11)
        if centers is not None:
            assert math.isclose(float(one.distance), float(batch.distance[i]), abs_tol=1e-12) or i >= 62
    assert bool(batch.terminated[-1]) and bool(batch.terminated[-2]) and float(batch.reward[-1]) == 0.0
    assert not bool(batch.violated[-1]) and not bool(batch.success[-2])


def test_goal_and_obstacles() -> None:
    system = QPole()
    task = Task.of(system, OBSTACLE_CENTERS, 0.5)
    goal = np.asarray(system.goal, dtype=np.float64)
    assert task.reward(goal, task.nominal_action) == 1.0 and task.success(goal)
    inside = goal.copy()
    inside[:3] = OBSTACLE_CENTERS[3] + 0.1
    violated, dist = task.violation(inside)
    assert violated and math.isclose(float(dist), math.sqrt(0.03) - 0.5)
    assert not task.with_radius(0.1).violation(inside)[0] and task.radius == 0.5
    assert not Task.of(system).has_obstacles and Task.of(system).violation(inside)[1] is None
