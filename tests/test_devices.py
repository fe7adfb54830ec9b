"""Device-agnostic code: no module creates tensors on a hard-coded device (an ``ast`` scan of the package for
device literals, with an allow-list that gives each exception's reason), and a training step and a solve on
``cuda`` when a GPU is present."""

from __future__ import annotations

import ast
from pathlib import Path

import numpy as np
import pytest
import torch

import deqmpc_gym

ROOT = Path(deqmpc_gym.__file__).parent
DEVICE_WORDS = ("cpu", "cuda", "mps", "meta")

#: ``(module path, source of the flagged expression) -> reason`` of the device literals that stay.
ALLOWED: dict[tuple[str, str], str] = {
    ("_device.py", "'cuda' if torch.cuda.is_available() else 'cpu'"):
        "resolve_device('auto'): the one place that picks a device by itself",
    ("mpc/problem.py", "torch.device('cpu')"):
        "MPCProblem(device=None): the default of an optional argument",
    ("policies/policy.py", "torch.load(file, map_location='cpu', weights_only=True)"):
        "a checkpoint is read into host memory; load_state_dict copies it onto the policy's device",
    ("experts/loader.py", "torch.load(actor_file, map_location='cpu', weights_only=True)"):
        "the PPO expert's actor (a small MLP) runs on the CPU, as SB3 advises for MLP policies",
    ("experts/train.py", "device='cpu'"):
        "PPO experts train on the CPU: SB3 advises against a GPU for MLP policies (slower than the CPU)",
    ("experiments/reproduce.py", "'cuda' if launch.gpus_per_run else device"):
        "a Ray task that was granted a GPU sees it as 'cuda' (Ray sets CUDA_VISIBLE_DEVICES)",
}


def _is_device_literal(node: ast.AST) -> bool:
    return (isinstance(node, ast.Constant) and isinstance(node.value, str)
            and node.value.split(":")[0] in DEVICE_WORDS)


def _call_literals(node: ast.Call) -> list[ast.AST]:
    """The parts of a call that fix a device: ``x.cuda()``, ``device="..."``, ``map_location="..."`` (the whole
    call), ``torch.device("...")`` and ``x.to("...")``."""
    func = node.func
    name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
    out: list[ast.AST] = []
    if name == "cuda" and isinstance(func, ast.Attribute):
        out.append(node)
    for kw in node.keywords:
        if kw.arg in ("device", "map_location") and _is_device_literal(kw.value):
            out.append(node if kw.arg == "map_location" else kw)
    if name in ("device", "to") and node.args and _is_device_literal(node.args[0]):
        out.append(node)
    return out


def device_literals(source: str) -> list[tuple[int, str]]:
    """``(line, expression)`` of every place ``source`` fixes a device: a literal device name passed as ``device=``
    or ``map_location=``, to ``torch.device(...)`` or ``.to(...)``, a ``.cuda()`` call, and ``"cuda"`` used as a
    value elsewhere (e.g. in a conditional expression). Parameter defaults, comparisons (``x.device.type ==
    "cpu"``), lists of names and docstrings are not flagged: they choose nothing."""
    tree = ast.parse(source)
    found: list[tuple[int, str]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            found += [(node.lineno, ast.unparse(part)) for part in _call_literals(node)]
        for child in ast.iter_child_nodes(node):
            if _is_device_literal(child) and str(child.value).startswith("cuda") and not isinstance(  # type: ignore
                    node, (ast.Compare, ast.arguments, ast.Tuple, ast.List, ast.Set, ast.keyword, ast.Call)):
                found.append((child.lineno, ast.unparse(node if isinstance(node, ast.IfExp) else child)))
    return sorted(set(found))


def scan(root: Path = ROOT) -> dict[tuple[str, str], int]:
    """``{(module path, expression): line}`` of the device literals of every module under ``root``."""
    out = {}
    for path in sorted(root.rglob("*.py")):
        for line, expr in device_literals(path.read_text(encoding="utf-8")):
            out[(path.relative_to(root).as_posix(), expr)] = line
    return out


def test_no_module_creates_tensors_on_a_hard_coded_device() -> None:
    found = scan()
    unexpected = {f"{path}:{line}: {expr}" for (path, expr), line in found.items() if (path, expr) not in ALLOWED}
    assert not unexpected, "device literals (pass the configured device, or add them to ALLOWED with the reason): " \
                           + "; ".join(sorted(unexpected))
    stale = sorted(set(ALLOWED) - set(found))
    assert not stale, f"allowed device literals that no longer exist (remove them from ALLOWED): {stale}"


def test_the_scan_flags_device_literals_and_nothing_else() -> None:
    source = '''
"""Docstring naming "cuda" and device="cpu"."""
import torch

def f(x, device="cpu", map_location="cpu"):
    a = torch.zeros(3, device="cuda:1")
    b = x.cuda()
    c = torch.device("cpu")
    d = x.to("cuda")
    e = torch.load("f", map_location="cpu")
    g = "cuda" if x else device
    ok = torch.zeros(3, device=x.device), x.device.type == "cpu", x.to(device), ("cpu", "cuda")
    return a, b, c, d, e, g, ok
'''
    assert [expr for _, expr in device_literals(source)] == [
        "device='cuda:1'", "x.cuda()", "torch.device('cpu')", "x.to('cuda')",
        "torch.load('f', map_location='cpu')", "'cuda' if x else device"]


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")


@cuda
def test_solve_on_cuda() -> None:
    from deqmpc_gym.mpc import MPCConfig, MPCProblem, solve
    from deqmpc_gym.systems import OBSTACLE_CENTERS, QPole

    for dtype in (torch.float64, torch.float32):
        problem = MPCProblem(QPole(), MPCConfig(horizon=5, dtype=dtype), obstacle_centers=OBSTACLE_CENTERS,
                             obstacle_radius=0.5, device="cuda")
        x0 = torch.zeros(4, 14, dtype=dtype, device="cuda")
        x0[:, 6] = np.pi
        theta = x0[:, None].expand(4, 5, 14).clone()
        x, u, _, info = solve(problem, x0, theta, iters=3)
        assert x.device.type == "cuda" and u.device.type == "cuda" and x.dtype == dtype
        assert bool(torch.isfinite(x).all()) and bool(torch.isfinite(u).all())


@cuda
def test_training_step_and_act_on_cuda(tiny_pendulum_dataset, tmp_path: Path) -> None:
    from deqmpc_gym.envs.vector import make_batched_env
    from deqmpc_gym.policies import DEQMPCPolicy
    from deqmpc_gym.training import ImitationTrainer, TrainConfig

    policy = DEQMPCPolicy.from_env("DEQMPC/Pendulum-v0", "deq-mpc-deq", hidden=16, device="cuda")
    before = [p.detach().clone() for p in policy.layer.net.parameters()]
    config = TrainConfig(steps=1, batch_size=4, val_every=1, val_batches=1)
    ImitationTrainer(policy, tiny_pendulum_dataset, config, tmp_path, progress=False).train()
    after = list(policy.layer.net.parameters())
    assert all(p.device.type == "cuda" for p in after) and any(not torch.equal(a, b) for a, b in zip(after, before))
    env = make_batched_env("DEQMPC/Pendulum-v0", 3, seed=0, device="cuda", return_tensors=True)
    actions, _ = policy.predict(env.state.cpu().numpy())
    obs, reward, *_ = env.step(torch.as_tensor(actions, device="cuda"))
    assert obs.device.type == "cuda" and bool(torch.isfinite(reward).all())
