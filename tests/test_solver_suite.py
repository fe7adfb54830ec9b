"""``benchmarks/solver_suite.py``'s mpc.pytorch comparison: mpc.pytorch is given the suite's problem (weights, bounds,
control reference, warm start) and the comparison's record holds what the docs quote.

Needs mpc.pytorch (``pip install --no-deps mpc==0.0.6``, as ``make bench`` installs it) and CasADi (the
``reference`` extra); skipped without them.
"""

from __future__ import annotations

import os
import sys

import numpy as np
import pytest
import torch

pytest.importorskip("mpc.mpc")  # mpc.pytorch (a bare "mpc" would also find the tests/mpc folder)
pytest.importorskip("casadi")

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))

import solver_suite as suite  # noqa: E402


def _inst(name: str, T: int, B: int) -> suite.Instances:
    return suite.make_instances(name, T, B, "tune")


def test_mpc_pytorch_solves_the_suite_problem_with_its_control_reference() -> None:
    """On the quadrotor (control reference = hover thrust) mpc.pytorch's cold answer reaches IPOPT's optimum of the
    suite's cost; without the control reference in its cost it would not (the reference term is really there)."""
    inst = _inst("quadrotor", 5, 3)
    ref_cost, _ = suite.ipopt_references(inst, suite.load_cache())
    x, u = suite.mpc_pytorch_run(inst)()
    m = suite.evaluate(inst, x, u, torch.ones(3, dtype=torch.bool), ref_cost)
    assert m["ok"] == 3 and m["gap_max"] < 1e-4
    assert m["xu_max"] < 1e-9  # its states are the rollout of its controls
    no_ref = suite.Instances(inst.name, inst.T, inst.x0, inst.theta, torch.zeros_like(inst.u_ref))
    x0, u0 = suite.mpc_pytorch_run(no_ref)()
    assert suite.evaluate(inst, x0, u0, torch.ones(3, dtype=torch.bool), ref_cost)["gap_max"] > 1e-2


def test_mpc_pytorch_warm_start_starts_from_u_init() -> None:
    """Warm-started at the optimum (``u_init`` = its own cold answer) mpc.pytorch returns that answer."""
    inst = _inst("pendulum", 5, 4)
    _, u = suite.mpc_pytorch_run(inst)()
    _, u2 = suite.mpc_pytorch_run(inst, u_init=u)()
    assert torch.allclose(u2, u, atol=1e-6)


def test_compare_mpc_pytorch_record() -> None:
    """The comparison's fields, their ratios, and warm answers of the same quality as mpc.pytorch's."""
    inst = _inst("pendulum", 5, 6)
    ref_cost, _ = suite.ipopt_references(inst, suite.load_cache())
    pb = suite.make_problem(inst)
    row = suite.compare_mpc_pytorch(inst, pb, suite.STANDALONE_ITERS, ref_cost, reps=1)
    for k in ("ours_cold_s", "mpcpytorch_cold_s", "ours_warm_s", "ours_stream_s", "mpcpytorch_warm_s"):
        assert row[k] > 0.0
    assert row["ours_vs_mpcpytorch_cold"] == pytest.approx(row["mpcpytorch_cold_s"] / row["ours_cold_s"])
    assert row["ours_warm_vs_mpcpytorch_warm"] == pytest.approx(row["mpcpytorch_warm_s"] / row["ours_warm_s"])
    assert row["ours_stream_vs_mpcpytorch_cold"] == pytest.approx(row["mpcpytorch_cold_s"] / row["ours_stream_s"])
    assert row["mpcpytorch_ok"] == 6 and row["mpcpytorch_gap_max"] < 1e-4
    for key in ("warm", "stream"):
        assert abs(row[f"{key}_cost_vs_mpcpytorch_median"]) < 1e-6
        assert np.isfinite(row[f"{key}_cost_vs_mpcpytorch_max"])


def test_time_single_times_both_solvers() -> None:
    inst = _inst("cartpole", 5, 3)
    ours, ipopt = suite.time_single(inst, suite.make_problem(inst), suite.STANDALONE_ITERS, n=2, reps=1)
    assert ours > 0.0 and ipopt > 0.0
