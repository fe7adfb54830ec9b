"""The solver's outputs, bit for bit, against values recorded in ``tests/data/solver_pinned_<cpu>.pt``: a change of the
solver's code that is meant to keep its numerics (a restructuring) must leave every iterate, multiplier, flag and
gradient of these calls (``pinned_cases.py``) exactly as recorded."""

from __future__ import annotations

import json
from pathlib import Path

import pinned_cases
import pytest
import torch


def _recordings() -> list[Path]:
    return sorted(pinned_cases.DATA.glob("solver_pinned_*.pt"))


@pytest.fixture(scope="module")
def pinned() -> dict[str, torch.Tensor]:
    """This CPU kind's recording, else any (the test of the rare paths reads values, not bits)."""
    here = pinned_cases.pinned_file(pinned_cases.environment()["cpu"])
    return torch.load(here if here.exists() else _recordings()[0], weights_only=True)


@pytest.fixture(scope="module")
def same_environment() -> None:
    """Bit-level results need a recording made with these libraries on this CPU kind; elsewhere record one with
    ``python tests/mpc/pinned_cases.py`` at a commit whose numerics are trusted."""
    here = pinned_cases.environment()
    made = [json.loads(p.with_suffix(".json").read_text()) for p in _recordings()]
    if here not in made:
        pytest.skip(f"pinned outputs recorded with {made}, this is {here}")


@pytest.mark.parametrize("case", pinned_cases.CASES, ids=lambda c: c.__name__.removeprefix("case_"))
def test_outputs_are_bit_identical_to_the_recorded_ones(case, pinned, same_environment) -> None:
    got = pinned_cases.compute(case)
    want = {k: v for k, v in pinned.items() if k in got}
    assert sorted(got) == sorted(want), f"outputs not recorded: {sorted(set(got) - set(want))}"
    differ = [k for k in got if got[k].dtype != want[k].dtype or not torch.equal(got[k], want[k])]
    assert not differ, f"{len(differ)} outputs changed, e.g. {differ[:8]}"


def test_the_pinned_calls_exercise_the_rare_paths(pinned) -> None:
    """The recorded calls reach what a restructuring could break: regularised factorisations, samples that stop
    (streaming, converged), non-finite warm starts, rollout answers, and every gradient."""
    assert bool(pinned["qpole.torch.cold.info.fallback"].any())
    assert bool(pinned["qpole.fused.cold.info.fallback"].any())
    al = pinned["cartpole.torch.stream.info.al_iters"]
    assert int(al.min()) < int(al.max())
    al = pinned["standalone.cartpole.torch.rollout.info.al_iters"]
    assert int(al.min()) < int(al.max())
    assert bool(pinned["standalone.pendulum.fused.rollout.info.rollout"].all())
    for key in ("pendulum.torch.unroll", "pendulum.fused.final", "compiled.cartpole.implicit", "user.implicit",
                "standalone.cartpole.fused.exact", "quadrotor.torch.final", "cartpole.float32"):
        assert bool(pinned[f"{key}.grad_theta"].abs().sum() > 0), key
