"""Policy variants and the frozen configuration of a DEQ-MPC policy (defaults follow the paper).

:class:`PolicyConfig` is composed: the network's settings (:class:`NetworkConfig`, with the DEQ's
:class:`~deqmpc_gym.nets.AndersonConfig`), the solver's (:class:`~deqmpc_gym.mpc.MPCConfig`) and the fixed-point
schedule that alternates the two. Its file layout (``config.json`` of a saved policy, the ``policy.*`` fields of
a run definition) is flat: the keys of :data:`FLAT_FIELDS`, plus ``"section.field"`` keys for nested settings
that differ from their defaults; :meth:`PolicyConfig.from_dict` reads that layout and the nested one.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import Any

from deqmpc_gym._config import (
    Choice,
    DeqGrad,
    Gradient,
    LinearSolver,
    SolverDtype,
    check_field_types,
    matches_annotation,
    require_at_least_one,
)
from deqmpc_gym.errors import ConfigError
from deqmpc_gym.mpc.config import MPCConfig
from deqmpc_gym.nets.fixed_point import AndersonConfig


class Variant(Choice):
    """The six model types of the paper (Table 1 uses the first four)."""

    DEQ_MPC_DEQ = "deq-mpc-deq"
    DEQ_MPC_NN = "deq-mpc-nn"
    DIFF_MPC_DEQ = "diff-mpc-deq"
    DIFF_MPC_NN = "diff-mpc-nn"
    DEQ = "deq"
    NN = "nn"

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

#: the DEQ's fixed-point solver settings of the paper (10 / 1e-2 / 5 / 0.8) with a budget of 25 evaluations: the
#: freshly initialised DEQ needs 16-18 on average (up to ~45) to reach the 1e-2 relative tolerance from z = 0;
#: warm-started solves stop after 1-3.
PAPER_ANDERSON = AndersonConfig(m=5, max_iter=25, tol=1e-2, beta=0.8)


@dataclass(frozen=True)
class NetworkConfig:
    """The policy's network settings (the variant decides feed-forward or DEQ).

    Attributes:
        hidden: network width h (paper: 256 Pendulum, 512 Cartpole/Quadrotor, 1024 QPole), divisible by 4.
        deq_grad: :class:`~deqmpc_gym._config.DeqGrad`, ``"phantom"`` (3 extra steps) or ``"ift"``.
        anderson: the DEQ's fixed-point solver (:data:`PAPER_ANDERSON`).
    """

    hidden: int = 128
    deq_grad: DeqGrad = DeqGrad.PHANTOM
    anderson: AndersonConfig = PAPER_ANDERSON

    def __post_init__(self) -> None:
        check_field_types(self)
        require_at_least_one(self, ("hidden",))
        if self.hidden % 4:
            raise ConfigError(f"NetworkConfig.hidden must be divisible by 4 (GroupNorm groups), got {self.hidden}")
        object.__setattr__(self, "deq_grad", DeqGrad.resolve(self.deq_grad))
        if not isinstance(self.anderson, AndersonConfig):
            raise ConfigError(f"NetworkConfig.anderson must be an AndersonConfig, got {type(self.anderson).__name__}")


#: the flat keys of the file layout: ``name -> (section, path inside the section, type)``.
FLAT_FIELDS: dict[str, tuple[str, str, str]] = {
    "hidden": ("net", "hidden", "int"),
    "deq_grad": ("net", "deq_grad", "str"),
    "anderson_max_iter": ("net", "anderson.max_iter", "int"),
    "anderson_tol": ("net", "anderson.tol", "float"),
    "anderson_memory": ("net", "anderson.m", "int"),
    "anderson_beta": ("net", "anderson.beta", "float"),
    "horizon": ("mpc", "horizon", "int"),
    "n_obstacle_constraints": ("mpc", "n_obstacle_constraints", "int"),
    "gradient": ("mpc", "gradient", "str"),
    "solver_dtype": ("mpc", "dtype", "str"),
}

_DEFAULT_MPC = MPCConfig()

#: the Hessians of Diff-MPC's backward (:attr:`PolicyConfig.diff_mpc_hessian`).
_HESSIANS = ("gauss_newton", "exact")
#: schedule fields :meth:`PolicyConfig.to_dict` writes only when they differ from their defaults.
_WRITTEN_IF_SET = frozenset({"diff_mpc_hessian"})


def _get(obj: Any, path: str) -> Any:
    for part in path.split("."):
        obj = getattr(obj, part)
    return obj


def _set(obj: Any, path: str, value: Any) -> Any:
    """A copy of the frozen dataclass ``obj`` with the dotted ``path`` set to ``value``."""
    head, _, tail = path.partition(".")
    if tail:
        value = _set(getattr(obj, head), tail, value)
    if isinstance(obj, MPCConfig):  # the solver's modes, resolved here (strings, case-insensitive)
        if head == "dtype":
            value = SolverDtype.resolve(value).torch_dtype
        elif head == "gradient":
            value = Gradient.resolve(value).value
        elif head == "linear_solver":
            value = LinearSolver.resolve(value).value
    return dataclasses.replace(obj, **{head: value})


def _plain(value: Any) -> Any:
    """A JSON value of a config setting (enums as strings, torch dtypes by name)."""
    if isinstance(value, Choice):
        return value.value
    if type(value).__module__ == "torch":
        return SolverDtype.of(value).value
    return value


def _nested_fields(obj: Any, prefix: str = "") -> dict[str, Any]:
    """``{"dotted.path": value}`` of every leaf of a (nested) frozen dataclass."""
    out: dict[str, Any] = {}
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            out.update(_nested_fields(value, f"{prefix}{f.name}."))
        else:
            out[prefix + f.name] = value
    return out


@dataclass(frozen=True, init=False)
class PolicyConfig:
    """Configuration of a :class:`~deqmpc_gym.policies.DEQMPCPolicy` (paper defaults).

    ``PolicyConfig(variant, net=NetworkConfig(...), mpc=MPCConfig(...), deq_mpc_iters=..., ...)``; the flat
    keywords of :data:`FLAT_FIELDS` (``hidden=``, ``horizon=``, ``gradient=``, ``solver_dtype=``,
    ``anderson_tol=``, ...) are accepted too and set the field of the section they name (after ``net`` / ``mpc``),
    and read back as attributes (``config.hidden is config.net.hidden``).

    Attributes:
        variant: :class:`Variant` (``"deq-mpc-deq"``, ``"deq-mpc-nn"``, ``"diff-mpc-deq"``, ``"diff-mpc-nn"``,
            ``"deq"``, ``"nn"``).
        net: :class:`NetworkConfig` (width, DEQ gradient, Anderson settings).
        mpc: :class:`~deqmpc_gym.mpc.MPCConfig` of the solver: ``horizon`` T in knots including the current state,
            ``n_obstacle_constraints`` (nearest obstacles constrained per knot), ``gradient`` for DEQ-MPC
            (``"implicit"`` | ``"unroll"``; Diff-MPC always uses ``"final_implicit"``), ``dtype`` (float64 or
            float32), and the solver's own settings.
        deq_mpc_iters: N, DEQ-MPC iterations of a cold solve (network pass + MPC-m).
        al_iters: m, AL iterations per DEQ-MPC iteration.
        diff_mpc_al_iters: AL iterations of Diff-MPC's single cold solve.
        stream_iters: K, DEQ-MPC iterations per warm-started control step (paper eval: 1; QPoleObs: 2).
        stream_al_iters: AL iterations per warm-started control step for Diff-MPC (paper eval: 2; QPoleObs: 4).
        stream_exit_residual: Newton-loop exit of the warm-started streaming solves: a sample stops once its
            constraint residual is at or below this value (the paper's reference implementation: 1e-3, see
            :class:`~deqmpc_gym.mpc.MPCConfig`); 0 keeps only the step test of cold solves and training.
        compiled_solver: run the MPC calls that need no gradient (``act``, ``predict``, evaluation) through
            :class:`~deqmpc_gym.mpc.CompiledSolver` (``torch.compile``; same iterates, a fraction of the time on
            small control-bound-only problems such as the Pendulum). Batches are padded to the next power of two,
            so each of those sizes compiles once per process (35-60 s; seconds from torch's disk cache).
            Training keeps the eager solver. Problems it does not support raise a ``ConfigError``.
        diff_mpc_hessian: the Hessian of Diff-MPC's ``"final_implicit"`` backward (``"gauss_newton"``, the paper's,
            or ``"exact"``: the dynamics' second-order terms added, the exact sensitivity of the solved problem at
            1.5-6x the backward's cost; see :func:`~deqmpc_gym.mpc.solve`). DEQ-MPC variants ignore it (their
            ``"implicit"`` / ``"unroll"`` gradients differentiate the m AL iterations, not an optimum).
    """

    variant: Variant = Variant.DEQ_MPC_DEQ
    net: NetworkConfig = NetworkConfig()
    mpc: MPCConfig = _DEFAULT_MPC
    deq_mpc_iters: int = 6
    al_iters: int = 2
    diff_mpc_al_iters: int = 10
    stream_iters: int = 1
    stream_al_iters: int = 2
    stream_exit_residual: float = 1e-3
    compiled_solver: bool = False
    diff_mpc_hessian: str = "gauss_newton"

    def __init__(self, variant: str | Variant = Variant.DEQ_MPC_DEQ, **kwargs: Any) -> None:
        names = {f.name: f for f in dataclasses.fields(self)}
        unknown = sorted(k for k in kwargs if k not in names and k not in FLAT_FIELDS)
        if unknown:
            raise ConfigError(f"unknown PolicyConfig keys {unknown}; valid keys: "
                              f"{sorted(set(names) | set(FLAT_FIELDS))}")
        object.__setattr__(self, "variant", variant)
        for name, f in names.items():
            if name != "variant":
                object.__setattr__(self, name, kwargs.get(name, f.default))
        for key in (k for k in kwargs if k in FLAT_FIELDS):
            section, path, kind = FLAT_FIELDS[key]
            value = kwargs[key]
            if not matches_annotation(value, kind):
                raise ConfigError(f"PolicyConfig.{key} must be {'a finite number' if kind == 'float' else kind}, "
                                  f"got {value!r} ({type(value).__name__})")
            owner = getattr(self, section)
            if not isinstance(owner, (NetworkConfig, MPCConfig)):
                raise ConfigError(f"PolicyConfig.{section} must be a NetworkConfig / MPCConfig, got "
                                  f"{type(owner).__name__}")
            object.__setattr__(self, section, _set(owner, path, value))
        self.__post_init__()

    def __post_init__(self) -> None:
        object.__setattr__(self, "variant", Variant.resolve(self.variant))
        if not isinstance(self.net, NetworkConfig):
            raise ConfigError(f"PolicyConfig.net must be a NetworkConfig, got {type(self.net).__name__}")
        if not isinstance(self.mpc, MPCConfig):
            raise ConfigError(f"PolicyConfig.mpc must be an MPCConfig, got {type(self.mpc).__name__}")
        check_field_types(self)
        require_at_least_one(self, ("deq_mpc_iters", "al_iters", "diff_mpc_al_iters", "stream_iters",
                                    "stream_al_iters"))
        if self.stream_exit_residual < 0:
            raise ConfigError(f"PolicyConfig.stream_exit_residual must be a number >= 0, "
                              f"got {self.stream_exit_residual!r}")
        if self.diff_mpc_hessian not in _HESSIANS:
            raise ConfigError(f"PolicyConfig.diff_mpc_hessian must be one of {list(_HESSIANS)}, got "
                              f"{self.diff_mpc_hessian!r}")
        gradient = Gradient.resolve(self.mpc.gradient)
        if gradient not in (Gradient.IMPLICIT, Gradient.UNROLL):
            raise ConfigError(f"PolicyConfig.gradient (mpc.gradient) must be 'implicit' or 'unroll', got "
                              f"{self.mpc.gradient!r}")
        if self.mpc.gradient != gradient.value:
            object.__setattr__(self, "mpc", dataclasses.replace(self.mpc, gradient=gradient.value))

    # ------------------------------------------------------------------ flat names
    def __getattr__(self, name: str) -> Any:
        """The flat names of :data:`FLAT_FIELDS` read the nested setting (``solver_dtype`` as a string)."""
        spec = FLAT_FIELDS.get(name)
        if spec is None or name.startswith("__"):
            raise AttributeError(f"'PolicyConfig' object has no attribute {name!r}")
        return _plain(_get(self, f"{spec[0]}.{spec[1]}"))

    @property
    def hidden(self) -> int:
        """The network width (``net.hidden``)."""
        return self.net.hidden

    @property
    def horizon(self) -> int:
        """The MPC horizon T in knots (``mpc.horizon``)."""
        return self.mpc.horizon

    @property
    def variant_enum(self) -> Variant:
        return Variant.resolve(self.variant)

    @property
    def solver_torch_dtype(self) -> Any:
        """The solver's ``torch.dtype`` (``mpc.dtype``)."""
        return self.mpc.dtype

    # ------------------------------------------------------------------ layouts
    def to_dict(self) -> dict[str, Any]:
        """The flat file layout: every key of :data:`FLAT_FIELDS` and the schedule fields (``diff_mpc_hessian`` only
        when not the default), plus ``"net.<path>"`` / ``"mpc.<path>"`` for the other nested settings that differ
        from their defaults (JSON values)."""
        out: dict[str, Any] = {"variant": self.variant.value}
        out.update({k: getattr(self, k) for k in FLAT_FIELDS})
        for f in dataclasses.fields(self):
            if f.name not in ("variant", "net", "mpc"):
                if f.name in _WRITTEN_IF_SET and getattr(self, f.name) == f.default:
                    continue  # files written before the field existed stay identical
                out[f.name] = getattr(self, f.name)
        covered = {f"{section}.{path}" for section, path, _ in FLAT_FIELDS.values()}
        defaults = {"net": NetworkConfig(), "mpc": _DEFAULT_MPC}
        for section, default in defaults.items():
            mine, base = _nested_fields(getattr(self, section)), _nested_fields(default)
            for path, value in mine.items():
                if f"{section}.{path}" not in covered and value != base[path]:
                    out[f"{section}.{path}"] = _plain(value)
        return out

    def to_nested_dict(self) -> dict[str, Any]:
        """The nested layout: ``{"variant", "net": {...}, "mpc": {...}, <schedule fields>}`` (JSON values)."""
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if dataclasses.is_dataclass(value):
                out[f.name] = json.loads(json.dumps({k: _plain(v) for k, v in _nested_fields(value).items()}))
            else:
                out[f.name] = _plain(value)
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PolicyConfig:
        """Build from the flat layout of :meth:`to_dict` (what every saved policy and run folder holds) or the
        nested one of :meth:`to_nested_dict`; unknown keys raise :class:`ConfigError`.

        Keys of earlier versions that no longer have an effect (:data:`RETIRED_KEYS`) are dropped, so that
        saved policies stay loadable.
        """
        if not isinstance(data, dict) or not all(isinstance(k, str) for k in data):
            raise ConfigError(f"PolicyConfig must be built from a dict with string keys, got {type(data).__name__}")
        data = {k: v for k, v in data.items() if k not in RETIRED_KEYS}
        sections: dict[str, dict[str, Any]] = {"net": {}, "mpc": {}}
        for name in ("net", "mpc"):
            if isinstance(data.get(name), dict):
                sections[name].update(data.pop(name))
        for key in [k for k in data if "." in k]:
            section, _, path = key.partition(".")
            if section not in sections:
                raise ConfigError(f"unknown PolicyConfig key {key!r}; nested keys start with 'net.' or 'mpc.'")
            sections[section][path] = data.pop(key)
        if sections["net"] or sections["mpc"]:
            data["net"] = _section(NetworkConfig(), sections["net"], "net")
            data["mpc"] = _section(_DEFAULT_MPC, sections["mpc"], "mpc")
        return cls(**data)

    def replace(self, **changes: Any) -> PolicyConfig:
        """A copy with ``changes`` applied (fields, sections or flat keys; unknown keys raise
        :class:`ConfigError`)."""
        current = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        return PolicyConfig(**{**current, **changes})

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)


def _section(default: Any, values: dict[str, Any], name: str) -> Any:
    """``default`` with the dotted ``values`` set (a :class:`ConfigError` naming a bad key)."""
    known = _nested_fields(default)
    out = default
    for path, value in values.items():
        if path not in known:
            raise ConfigError(f"unknown PolicyConfig key '{name}.{path}'; valid: {sorted(known)}")
        try:
            out = _set(out, path, value)
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"PolicyConfig {name}.{path}: {exc}") from None
    return out
