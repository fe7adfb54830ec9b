"""The structure of the MPC solver: one interface (MPCSolver) for the eager and compiled paths, the shared module they
use instead of each other's private names, read-only problem data, short functions."""

from __future__ import annotations

import ast
import inspect
from pathlib import Path

import numpy as np
import pytest
import torch

import deqmpc_gym.mpc as mpc
from deqmpc_gym.errors import ConfigError
from deqmpc_gym.mpc import CompiledSolver, EagerSolver, MPCConfig, MPCProblem, MPCSolver, solve
from deqmpc_gym.systems import Cartpole, Pendulum

from test_solver import make_batch

MPC_DIR = Path(mpc.__file__).parent


def test_both_paths_are_mpc_solvers() -> None:
    problem = MPCProblem(Pendulum(), MPCConfig(horizon=5))
    eager, compiled = EagerSolver(problem), CompiledSolver(problem, compile=False)
    assert isinstance(eager, MPCSolver) and isinstance(compiled, MPCSolver)
    assert eager.problem is problem and compiled.problem is problem
    assert not isinstance(solve, MPCSolver)  # the bare function is not bound to a problem
    with pytest.raises(ConfigError):
        EagerSolver("pendulum")  # type: ignore[arg-type]


@pytest.mark.parametrize("impl", [EagerSolver, CompiledSolver])
def test_the_protocol_arguments_come_first_with_the_same_defaults(impl) -> None:
    """Every argument of MPCSolver.__call__ is in the same position (or keyword-only) with the same default."""
    want = list(inspect.signature(MPCSolver.__call__).parameters.values())
    got = list(inspect.signature(impl.__call__).parameters.values())
    assert [(p.name, p.kind, p.default) for p in got[:len(want)]] == [(p.name, p.kind, p.default) for p in want]
    assert all(p.kind is inspect.Parameter.KEYWORD_ONLY and p.default is not inspect.Parameter.empty
               for p in got[len(want):])


def test_the_eager_solver_is_solve() -> None:
    system = Cartpole()
    problem = MPCProblem(system, MPCConfig(horizon=6))
    x0, theta = make_batch(system, 5, 6, seed=3)
    a = solve(problem, x0, theta, None, 3, None, True, False, 1e-3, u_ref=torch.ones(1, dtype=torch.float64))
    b = EagerSolver(problem)(x0, theta, None, 3, None, True, 1e-3, u_ref=torch.ones(1, dtype=torch.float64))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) and torch.equal(a[2].lam_ineq, b[2].lam_ineq)
    assert torch.equal(a[3].al_iters, b[3].al_iters) and torch.equal(a[3].dual_residual, b[3].dual_residual)
    c = EagerSolver(problem)(x0, theta, iters=8, stop_when_converged=True, output="iterate")
    d = solve(problem, x0, theta, iters=8, stop_when_converged=True, output="iterate")
    assert torch.equal(c[1], d[1]) and torch.equal(c[3].converged, d[3].converged)


def test_problem_data_is_public_and_read_only() -> None:
    system = Cartpole()
    problem = MPCProblem(system, MPCConfig(horizon=5), R=[0.5], u_low=[-3.0], u_high=[4.0])
    np.testing.assert_array_equal(problem.Q, np.diag(system.Q_diag))
    np.testing.assert_array_equal(problem.R, [[0.5]])
    np.testing.assert_array_equal(problem.u_low, [-3.0])
    np.testing.assert_array_equal(problem.u_high, [4.0])
    for name in ("Q", "R", "u_low", "u_high"):
        with pytest.raises(ValueError):
            getattr(problem, name)[0] = 1.0
        with pytest.raises(AttributeError):
            setattr(problem, name, np.zeros(1))
    np.testing.assert_array_equal(problem.u_high, [4.0])


def _tree(name: str) -> ast.Module:
    return ast.parse((MPC_DIR / name).read_text(encoding="utf-8"))


@pytest.mark.parametrize("name", ["compiled.py", "fused.py", "kkt.py"])
def test_no_private_names_of_other_modules(name: str) -> None:
    """The compiled path and the kernels use the shared module and public problem data, not the eager solver's
    private names or MPCProblem's private fields."""
    tree = _tree(name)
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("deqmpc_gym"):
            assert node.module != "deqmpc_gym.mpc.solver", f"{name} imports from the eager solver"
            private = [a.name for a in node.names if a.name.startswith("_")]
            assert not private, f"{name} imports private names {private} from {node.module}"
        if isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__"):
            owner = node.value
            is_problem = (isinstance(owner, ast.Name) and owner.id == "problem") or (
                isinstance(owner, ast.Attribute) and owner.attr == "problem")
            assert not is_problem, f"{name}:{node.lineno} reads problem.{node.attr}"


@pytest.mark.parametrize("name", ["solver.py", "compiled.py", "_common.py"])
def test_no_long_functions(name: str) -> None:
    """No function of the solver has more than 60 lines of code (its docstring aside)."""
    long = []
    for node in ast.walk(_tree(name)):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            body = node.body
            doc = isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant) \
                and isinstance(body[0].value.value, str)
            start = body[1].lineno if doc and len(body) > 1 else body[0].lineno
            if node.end_lineno - start + 1 > 60:
                long.append((node.name, node.end_lineno - start + 1))
    assert not long, long
