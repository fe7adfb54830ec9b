"""The composed PolicyConfig: sections, mode enums, the flat file layout and the nested one."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import deqmpc_gym
from deqmpc_gym._config import DeqGrad, Gradient, LinearSolver, SolverDtype
from deqmpc_gym.errors import ConfigError
from deqmpc_gym.mpc import MPCConfig
from deqmpc_gym.nets import AndersonConfig
from deqmpc_gym.policies import NetworkConfig, PolicyConfig, Variant

SHIPPED = sorted((Path(deqmpc_gym.__file__).parent / "pretrained_policies").glob("*/*/config.json"))


def test_sections_and_flat_keywords_agree() -> None:
    flat = PolicyConfig(variant="diff_mpc_nn", hidden=32, horizon=7, gradient="UNROLL", solver_dtype="float32",
                        anderson_tol=1e-3, deq_grad="ift")
    nested = PolicyConfig(Variant.DIFF_MPC_NN,
                          net=NetworkConfig(hidden=32, deq_grad=DeqGrad.IFT,
                                            anderson=AndersonConfig(m=5, max_iter=25, tol=1e-3, beta=0.8)),
                          mpc=MPCConfig(horizon=7, gradient="unroll", dtype=torch.float32))
    assert flat == nested and flat.mpc.dtype is torch.float32 and flat.net.deq_grad is DeqGrad.IFT
    assert (flat.hidden, flat.horizon, flat.gradient, flat.solver_dtype, flat.anderson_tol) == (
        32, 7, "unroll", "float32", 1e-3)
    assert flat.variant == "diff-mpc-nn" and f"{flat.variant}" == "diff-mpc-nn" and str(DeqGrad.IFT) == "ift"
    assert flat.replace(stream_iters=3, hidden=16).net.hidden == 16 and flat.net.hidden == 32
    with pytest.raises(AttributeError):
        _ = flat.hiden  # type: ignore[attr-defined]


def test_modes_are_checked_by_resolve() -> None:
    assert Gradient.resolve("Final_Implicit") is Gradient.FINAL_IMPLICIT
    assert LinearSolver.resolve("DENSE").value == "dense"
    assert SolverDtype.of(torch.float32) is SolverDtype.FLOAT32 and SolverDtype.FLOAT64.torch_dtype is torch.float64
    for kwargs, match in (({"gradient": "final_implicit"}, "implicit' or 'unroll"), ({"solver_dtype": "half"}, "dtype"),
                          ({"deq_grad": "adjoint"}, "deq grad"), ({"variant": "mpc"}, "unknown variant"),
                          ({"hidden": 30}, "divisible by 4"), ({"anderson_tol": None}, "anderson_tol"),
                          ({"hiden": 3}, "hiden"), ({"net": "wide"}, "NetworkConfig")):
        with pytest.raises(ConfigError, match=match):
            PolicyConfig(**kwargs)


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: f"{p.parent.parent.name}/{p.parent.name}")
def test_shipped_flat_configs_load_and_write_back_identically(path: Path) -> None:
    saved = json.loads(path.read_text())["config"]
    config = PolicyConfig.from_dict(saved)
    assert config.to_dict() == saved  # run definitions of older folders compare equal
    assert PolicyConfig.from_dict(config.to_nested_dict()) == config


def test_nested_settings_beyond_the_flat_keys_round_trip() -> None:
    config = PolicyConfig(mpc=MPCConfig(newton_steps=6, linear_solver="banded"), hidden=16)
    flat = config.to_dict()
    assert flat["mpc.newton_steps"] == 6 and flat["mpc.linear_solver"] == "banded" and "mpc.rho_max" not in flat
    assert PolicyConfig.from_dict(json.loads(json.dumps(flat))) == config
    assert PolicyConfig.from_dict({"variant": "nn", "rho_init_max": 1e7}) == PolicyConfig(variant="nn")  # retired
    for bad in ({"mpc.newton_step": 6}, {"solver.newton_steps": 6}, {"mpc": {"newton_steps": "six"}}):
        with pytest.raises(ConfigError):
            PolicyConfig.from_dict(bad)


def test_diff_mpc_hessian_is_checked_written_only_when_set_and_reaches_the_backward() -> None:
    assert "diff_mpc_hessian" not in PolicyConfig(variant="diff-mpc-nn").to_dict()  # older files stay identical
    exact = PolicyConfig(variant="diff-mpc-nn", hidden=16, horizon=4, diff_mpc_hessian="exact")
    assert exact.to_dict()["diff_mpc_hessian"] == "exact" and PolicyConfig.from_dict(exact.to_dict()) == exact
    with pytest.raises(ConfigError, match="diff_mpc_hessian"):
        PolicyConfig(variant="diff-mpc-nn", diff_mpc_hessian="newton")
    from deqmpc_gym.policies import DEQMPCPolicy

    grads = {}
    for hessian in ("gauss_newton", "exact"):
        torch.manual_seed(0)
        policy = DEQMPCPolicy.from_env("DEQMPC/Pendulum-v0", "diff-mpc-nn", hidden=16, horizon=4,
                                       diff_mpc_hessian=hessian)
        x0 = torch.tensor([[2.5, 0.3], [-1.0, 2.0]], dtype=torch.float64)
        out = policy.layer(x0)
        out.controls[-1].sum().backward()
        grads[hessian] = torch.cat([p.grad.reshape(-1) for p in policy.layer.parameters() if p.grad is not None])
    assert torch.isfinite(grads["exact"]).all()
    assert not torch.allclose(grads["exact"], grads["gauss_newton"])  # the second-order terms reach the weights
