"""Policy variants and the frozen configuration of a DEQ-MPC policy (defaults follow the paper)."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from enum import Enum
from typing import Any

from deqmpc_gym._config import check_field_types, config_from_dict, require_at_least_one
from deqmpc_gym.errors import ConfigError


class Variant(str, Enum):
    """The six model types of the paper (Table 1 uses the first four)."""

    DEQ_MPC_DEQ = "deq-mpc-deq"
    DEQ_MPC_NN = "deq-mpc-nn"
    DIFF_MPC_DEQ = "diff-mpc-deq"
    DIFF_MPC_NN = "diff-mpc-nn"
    DEQ = "deq"
    NN = "nn"

    @classmethod
    def resolve(cls, value: str | Variant) -> Variant:
        """Return the member for ``value`` (a member or its string, case-insensitive, ``_`` allowed)."""
        if isinstance(value, Variant):
            return value
        key = str(value).strip().lower().replace("_", "-")
        for member in cls:
            if member.value == key:
                return member
        raise ConfigError(f"unknown variant {value!r}; valid variants: {[m.value for m in cls]}")

    @property
    def net_kind(self) -> str:
        """``"deq"`` or ``"nn"``: the network inside the variant."""
        return "deq" if self.value.endswith("deq") else "nn"

    @property
    def joint_fixed_point(self) -> bool:
        """True for DEQ-MPC: network and MPC alternate N times."""
        return self.value.startswith("deq-mpc")

    @property
    def diff_mpc(self) -> bool:
        """True for Diff-MPC: network once, then the solver alone."""
        return self.value.startswith("diff-mpc")

    @property
    def uses_mpc(self) -> bool:
        """False for the network-only baselines ``deq`` and ``nn``."""
        return self.joint_fixed_point or self.diff_mpc


#: PolicyConfig keys written by earlier versions that are ignored on load: ``rho_init_max`` (the warm-start
#: penalty is now derived from ``MPCConfig.rho_max`` and the remaining AL iterations).
RETIRED_KEYS = frozenset({"rho_init_max"})


@dataclass(frozen=True)
class PolicyConfig:
    """Configuration of a :class:`~deqmpc_gym.policies.DEQMPCPolicy` (paper defaults).

    Attributes:
        variant: one of :class:`Variant` (``"deq-mpc-deq"``, ``"deq-mpc-nn"``, ``"diff-mpc-deq"``,
            ``"diff-mpc-nn"``, ``"deq"``, ``"nn"``).
        hidden: network width h (paper: 256 Pendulum, 512 Cartpole/Quadrotor, 1024 QPole).
        horizon: MPC horizon T in knots, including the current state.
        deq_mpc_iters: N, DEQ-MPC iterations of a cold solve (network pass + MPC-m).
        al_iters: m, AL iterations per DEQ-MPC iteration.
        diff_mpc_al_iters: AL iterations of Diff-MPC's single cold solve.
        stream_iters: K, DEQ-MPC iterations per warm-started control step (paper eval: 1; QPoleObs: 2).
        stream_al_iters: AL iterations per warm-started control step for Diff-MPC (paper eval: 2; QPoleObs: 4).
        stream_exit_residual: Newton-loop exit of the warm-started streaming solves: a sample stops once its
            constraint residual is at or below this value (the paper's reference implementation: 1e-3, see
            :class:`~deqmpc_gym.mpc.MPCConfig`); 0 keeps only the step test of cold solves and training.
        n_obstacle_constraints: nearest obstacles constrained per knot.
        gradient: MPC gradient for DEQ-MPC (``"implicit"`` | ``"unroll"``); Diff-MPC always uses
            ``"final_implicit"``.
        anderson_max_iter / anderson_tol / anderson_memory / anderson_beta: DEQ fixed-point solver settings
            (paper: 10 / 1e-2 / 5 / 0.8). The default budget is 25 evaluations because the freshly initialised
            DEQ needs 16-18 on average (up to ~45) to reach the 1e-2 relative tolerance from z = 0; warm-started
            solves stop after 1-3.
        deq_grad: ``"phantom"`` (3 extra steps) or ``"ift"``.
        solver_dtype: ``"float64"`` or ``"float32"`` for the MPC solver (the network is float32).
        compiled_solver: run the MPC calls that need no gradient (``act``, ``predict``, evaluation) through
            :class:`~deqmpc_gym.mpc.CompiledSolver` (``torch.compile``; same iterates, a fraction of the time on
            small control-bound-only problems such as the Pendulum). Batches are padded to the next power of two,
            so each of those sizes compiles once per process (35-60 s; seconds from torch's disk cache).
            Training keeps the eager solver. Problems it does not support raise a ``ConfigError``.
    """

    variant: str = "deq-mpc-deq"
    hidden: int = 128
    horizon: int = 5
    deq_mpc_iters: int = 6
    al_iters: int = 2
    diff_mpc_al_iters: int = 10
    stream_iters: int = 1
    stream_al_iters: int = 2
    stream_exit_residual: float = 1e-3
    n_obstacle_constraints: int = 4
    gradient: str = "implicit"
    anderson_max_iter: int = 25
    anderson_tol: float = 1e-2
    anderson_memory: int = 5
    anderson_beta: float = 0.8
    deq_grad: str = "phantom"
    solver_dtype: str = "float64"
    compiled_solver: bool = False

    def __post_init__(self) -> None:
        check_field_types(self)
        object.__setattr__(self, "variant", Variant.resolve(self.variant).value)
        positive = ("hidden", "deq_mpc_iters", "al_iters", "diff_mpc_al_iters", "stream_iters", "stream_al_iters")
        require_at_least_one(self, positive)
        if self.horizon < 2:
            raise ConfigError(f"PolicyConfig.horizon must be >= 2 knots, got {self.horizon}")
        if self.hidden % 4:
            raise ConfigError(f"PolicyConfig.hidden must be divisible by 4 (GroupNorm groups), got {self.hidden}")
        if not (isinstance(self.stream_exit_residual, (int, float)) and self.stream_exit_residual >= 0):
            raise ConfigError(f"PolicyConfig.stream_exit_residual must be a number >= 0, "
                              f"got {self.stream_exit_residual!r}")
        if self.gradient not in ("implicit", "unroll"):
            raise ConfigError(f"PolicyConfig.gradient must be 'implicit' or 'unroll', got {self.gradient!r}")
        if not isinstance(self.compiled_solver, bool):
            raise ConfigError(f"PolicyConfig.compiled_solver must be True or False, got {self.compiled_solver!r}")
        if self.solver_dtype not in ("float64", "float32"):
            raise ConfigError(f"PolicyConfig.solver_dtype must be 'float64' or 'float32', got {self.solver_dtype!r}")

    @property
    def variant_enum(self) -> Variant:
        return Variant.resolve(self.variant)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PolicyConfig:
        """Build from a dict, rejecting unknown keys with a :class:`ConfigError`.

        Keys of earlier versions that no longer have an effect (:data:`RETIRED_KEYS`) are dropped, so that
        saved policies stay loadable.
        """
        if not isinstance(data, dict):
            raise ConfigError(f"PolicyConfig must be built from a dict, got {type(data).__name__}")
        return config_from_dict(cls, {k: v for k, v in data.items() if k not in RETIRED_KEYS})

    def replace(self, **changes: Any) -> PolicyConfig:
        """A copy with ``changes`` applied (unknown keys raise :class:`ConfigError`)."""
        return self.from_dict({**self.to_dict(), **changes})

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)
