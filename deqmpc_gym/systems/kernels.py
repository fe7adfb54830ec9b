"""Compiled dynamics kernels: a system's own dynamics code, traced symbolically and compiled with numba.

A system's physics are written once, with the ``ops`` namespace (:mod:`deqmpc_gym.systems.ops`). This module
runs that same code on sympy symbols (an ``ops`` namespace of sympy functions), differentiates the result, shares common
subexpressions and emits a small Python module of scalar numba functions:

* the continuous dynamics ``x_dot = g(x, u)`` of an RK4 system (one that defines ``_deriv``), or the discrete map
  ``f(x, u)`` of any other system;
* the non-zero entries of their Jacobian ``[dg/dx | dg/du]``;
* per-row loops for one discrete step and for a step with its Jacobians ``A = df/dx``, ``B = df/du`` (for RK4:
  the chain rule through the four stages, with the Jacobian's sparsity, as :func:`~deqmpc_gym.systems.base.
  rk4_with_jacobians`).

On the small batches of MPC (``B (T - 1)`` rows of a 14-state quadrotor) one call costs a few microseconds per row
instead of the per-operation overhead of hundreds of numpy or torch calls (``benchmarks/kernels.py``).
:class:`~deqmpc_gym.systems.System` uses the kernels for float64 CPU torch calls that need no autograd graph;
everything else (float32, GPU tensors, autograd) keeps the torch path. :func:`load_module` also serves the MPC
solver's compiled Newton loop (:mod:`deqmpc_gym.mpc.fused`), appended to the same generated module.

The generated module is written to a cache folder (``$DEQMPC_GYM_CACHE`` or ``~/.cache/deqmpc_gym``; a temporary
folder if neither is writable) under a name hashed from its source, so numba's own disk cache compiles it once
per machine. A system whose code cannot be traced (a python branch on a state value, an unsupported function) or
whose kernel disagrees with its numpy step on a random check keeps the numpy/torch path, with one warning.
Set ``DEQMPC_GYM_KERNELS=0`` (or call :func:`set_enabled`) to turn the kernels off.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import logging
import os
import sys
import tempfile
import threading
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from deqmpc_gym.systems.base import System

#: bump when the generated code's template changes (part of the cache key)
KERNEL_FORMAT = 2

_ENABLED = [os.environ.get("DEQMPC_GYM_KERNELS", "1").strip() not in ("0", "false", "no", "off")]
_CACHE: dict[Any, Kernels | None] = {}
_SOURCES: dict[Any, str] = {}
_LOCK = threading.Lock()
_LOG = logging.getLogger(__name__)


def enabled() -> bool:
    """Whether :class:`System` calls may use compiled kernels."""
    return _ENABLED[0]


def set_enabled(flag: bool) -> bool:
    """Turn the compiled kernels on or off for this process; returns the previous setting."""
    prev, _ENABLED[0] = _ENABLED[0], bool(flag)
    return prev


@contextlib.contextmanager
def disabled() -> Iterator[None]:
    """Context manager: the numpy/torch paths only (e.g. to compare against the kernels)."""
    prev = set_enabled(False)
    try:
        yield
    finally:
        set_enabled(prev)


@dataclass(frozen=True)
class Kernels:
    """Compiled per-row dynamics of one system (numpy float64 in, numpy float64 out)."""

    nx: int
    nu: int
    source: Path
    _step: Any
    _step_jac: Any

    def step(self, x: np.ndarray, u: np.ndarray) -> np.ndarray:
        """``x: (N, nx)``, ``u: (N, nu)`` C-contiguous float64 -> ``x_next: (N, nx)``."""
        y = np.empty_like(x)
        self._step(x, u, y)
        return y

    def step_and_jacobians(self, x: np.ndarray, u: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``x: (N, nx)``, ``u: (N, nu)`` -> ``(x_next (N, nx), A (N, nx, nx), B (N, nx, nu))``; ``x_next`` is
        bit-identical to :meth:`step`."""
        y = np.empty_like(x)
        jac = np.empty((x.shape[0], self.nx, self.nx + self.nu))
        self._step_jac(x, u, y, jac)
        return y, jac[..., : self.nx], jac[..., self.nx:]


# ----------------------------------------------------------------------------- symbolic tracing
class _SymbolicOps:
    """The ``ops`` namespace on numpy object arrays of sympy expressions (for tracing only)."""

    def __init__(self) -> None:
        import sympy as sp

        self._sp = sp
        self.sin = np.vectorize(sp.sin, otypes=[object])
        self.cos = np.vectorize(sp.cos, otypes=[object])
        self.sqrt = np.vectorize(sp.sqrt, otypes=[object])
        self.tanh = np.vectorize(sp.tanh, otypes=[object])
        self.abs = np.vectorize(sp.Abs, otypes=[object])

    def stack(self, xs: Any) -> np.ndarray:
        return np.array([self._sp.sympify(np.asarray(x, dtype=object).item()) for x in xs], dtype=object)

    def where(self, cond: Any, a: Any, b: Any) -> Any:
        sp = self._sp
        return np.vectorize(lambda c, p, q: sp.Piecewise((p, c), (q, True)), otypes=[object])(cond, a, b)

    def zeros_like(self, x: Any, shape: tuple[int, ...]) -> np.ndarray:
        return np.zeros(shape, dtype=object)


def _is_rk4(system: System) -> bool:
    return callable(getattr(system, "_deriv", None))


def _trace(system: System) -> tuple[list[Any], list[tuple[int, int]], list[Any], Any]:
    """``(g entries, Jacobian non-zero (row, col), Jacobian entries, symbols)`` of the traced dynamics."""
    import sympy as sp

    xs = sp.symbols(f"x0:{system.nx}", real=True)
    us = sp.symbols(f"u0:{system.nu}", real=True)
    X, U = np.array(xs, dtype=object), np.array(us, dtype=object)
    ops = _SymbolicOps()
    out = system._deriv(X, U, ops) if _is_rk4(system) else system._step(X, U, ops)  # type: ignore[attr-defined]
    g = [sp.sympify(np.asarray(e, dtype=object).item()) for e in np.asarray(out, dtype=object).reshape(-1)]
    if len(g) != system.nx:
        raise ValueError(f"traced dynamics have {len(g)} entries, expected nx = {system.nx}")
    z = list(xs) + list(us)
    nz, entries = [], []
    for i, gi in enumerate(g):
        for j, zj in enumerate(z):
            d = sp.diff(gi, zj)
            if d != 0:
                nz.append((i, j))
                entries.append(d)
    return g, nz, entries, (xs, us)


def _body(exprs: list[Any], targets: list[str], syms: Any) -> list[str]:
    import sympy as sp
    from sympy.printing.pycode import PythonCodePrinter

    printer = PythonCodePrinter({"standard": "python3"})
    xs, us = syms
    lines = [f"    {s} = x[{i}]" for i, s in enumerate(xs)] + [f"    {s} = u[{i}]" for i, s in enumerate(us)]
    reps, reduced = sp.cse(exprs, symbols=sp.numbered_symbols("c_"))
    lines += [f"    {s} = {printer.doprint(e)}" for s, e in reps]
    lines += [f"    {t} = {printer.doprint(e)}" for t, e in zip(targets, reduced)]
    return lines


_TEMPLATE_RK4 = '''
@njit(**_OPTS)
def step_into(X, U, Y, ws):
    k, xi = ws[0], ws[1]
    for b in range(X.shape[0]):
        x, u = X[b], U[b]
        deriv(x, u, k[0])
        for i in range(NX):
            xi[i] = x[i] + 0.5 * DT * k[0, i]
        deriv(xi, u, k[1])
        for i in range(NX):
            xi[i] = x[i] + 0.5 * DT * k[1, i]
        deriv(xi, u, k[2])
        for i in range(NX):
            xi[i] = x[i] + DT * k[2, i]
        deriv(xi, u, k[3])
        for i in range(NX):
            Y[b, i] = x[i] + (DT / 6.0) * (k[0, i] + 2.0 * k[1, i] + 2.0 * k[2, i] + k[3, i])


@njit(**_OPTS)
def step_jac_into(X, U, Y, J, ws):
    m = NX + NU
    k, xi, g, D = ws
    for b in range(X.shape[0]):
        x, u = X[b], U[b]
        Jb = J[b]
        for s in range(4):
            if s == 0:
                for i in range(NX):
                    xi[i] = x[i]
            else:
                c = DT if s == 3 else 0.5 * DT
                for i in range(NX):
                    xi[i] = x[i] + c * k[s - 1, i]
            deriv(xi, u, k[s])
            jac(xi, u, g)
            cur, prev = D[s % 2], D[(s + 1) % 2]
            cur[:, :] = 0.0
            for q in range(NNZ):
                cur[ROWS[q], COLS[q]] = g[q]
            if s > 0:
                c = DT if s == 3 else 0.5 * DT
                for q in range(NNZ):
                    col = COLS[q]
                    if col >= NFREE and col < NX:
                        a, r = c * g[q], ROWS[q]
                        for j in range(m):
                            cur[r, j] += a * prev[col, j]
            w = 2.0 if (s == 1 or s == 2) else 1.0
            for i in range(NX):
                for j in range(m):
                    Jb[i, j] = cur[i, j] if s == 0 else Jb[i, j] + w * cur[i, j]
        for i in range(NX):
            Y[b, i] = x[i] + (DT / 6.0) * (k[0, i] + 2.0 * k[1, i] + 2.0 * k[2, i] + k[3, i])
            for j in range(m):
                Jb[i, j] *= DT / 6.0
            Jb[i, i] += 1.0
'''

_TEMPLATE_DISCRETE = '''
@njit(**_OPTS)
def step_into(X, U, Y, ws):
    for b in range(X.shape[0]):
        deriv(X[b], U[b], Y[b])


@njit(**_OPTS)
def step_jac_into(X, U, Y, J, ws):
    g = ws[2]
    for b in range(X.shape[0]):
        deriv(X[b], U[b], Y[b])
        jac(X[b], U[b], g)
        J[b, :, :] = 0.0
        for q in range(NNZ):
            J[b, ROWS[q], COLS[q]] = g[q]
'''

#: the work space of ``step_into`` / ``step_jac_into`` (one signature for every system; the discrete template uses
#: only the Jacobian entries), and ``step(X, U, Y)`` / ``step_jac(X, U, Y, J)`` on rows: the entry points of one
#: call (a fresh work space each)
_TEMPLATE_ENTRY = '''

@njit(**_OPTS)
def workspace():
    """Work space of ``step_into`` / ``step_jac_into``: stage derivatives, stage state, Jacobian entries and the
    two stage Jacobians (allocated once by a caller that steps many times)."""
    return np.empty((4, NX)), np.empty(NX), np.empty(NNZ), np.empty((2, NX, NX + NU))


@njit(**_OPTS)
def step(X, U, Y):
    step_into(X, U, Y, workspace())


@njit(**_OPTS)
def step_jac(X, U, Y, J):
    step_jac_into(X, U, Y, J, workspace())
'''


def generate_source(system: System) -> str:
    """The Python source of ``system``'s kernel module (see the module docstring)."""
    g, nz, entries, syms = _trace(system)
    rk4 = _is_rk4(system)
    n_free = 0
    if rk4:  # leading state coordinates that g does not depend on are skipped in the chain rule
        used = {j for _, j in nz}
        while n_free < system.nx and n_free not in used:
            n_free += 1
    rows = ", ".join(str(i) for i, _ in nz) or ""
    cols = ", ".join(str(j) for _, j in nz) or ""
    lines = [
        f'"""Generated by deqmpc_gym.systems.kernels (format {KERNEL_FORMAT}) for {type(system).__name__}; '
        'do not edit."""',
        "import math", "import numpy as np", "from numba import njit", "",
        '_OPTS = {"cache": True, "error_model": "numpy", "nogil": True}',
        f"NX, NU, NNZ, NFREE, DT = {system.nx}, {system.nu}, {len(nz)}, {n_free}, {float(system.dt)!r}",
        f"ROWS = np.array([{rows}], dtype=np.int64)", f"COLS = np.array([{cols}], dtype=np.int64)", "",
        "", "@njit(inline='always', **_OPTS)", "def deriv(x, u, out):",
        *_body(g, [f"out[{i}]" for i in range(system.nx)], syms),
        "", "", "@njit(inline='always', **_OPTS)", "def jac(x, u, out):",
        *_body(entries, [f"out[{k}]" for k in range(len(nz))], syms),
    ]
    if not nz:
        lines.append("    pass")
    return "\n".join(lines) + "\n" + (_TEMPLATE_RK4 if rk4 else _TEMPLATE_DISCRETE) + _TEMPLATE_ENTRY


def cache_dir() -> Path:
    """Folder of the generated kernel modules (created on demand)."""
    env = os.environ.get("DEQMPC_GYM_CACHE")
    base = Path(env) if env else Path(os.path.expanduser("~")) / ".cache" / "deqmpc_gym"
    d = base / "kernels"
    try:
        d.mkdir(parents=True, exist_ok=True)
        probe = d / f".probe-{os.getpid()}"
        probe.write_text("")
        probe.unlink()
        return d
    except OSError:
        d = Path(tempfile.gettempdir()) / f"deqmpc_gym-kernels-{os.getuid() if hasattr(os, 'getuid') else 0}"
        d.mkdir(parents=True, exist_ok=True)
        return d


def _load(system: System, fresh: bool = False) -> Kernels:
    """Generate, write and import the kernel module; ``fresh``: drop its numba cache and module first."""
    mod, path = load_module(system, fresh=fresh)
    k = Kernels(system.nx, system.nu, path, mod.step, mod.step_jac)
    one = np.zeros((1, system.nx)), np.zeros((1, system.nu))
    k.step_and_jacobians(*one)  # compile (or load from the disk cache) now, inside the caller's fallback
    k.step(*one)
    return k


def load_module(system: System, extra: str = "", tag: str = "", fresh: bool = False) -> tuple[Any, Path]:
    """Import the generated module of ``system`` with the source ``extra`` appended (e.g. a solver kernel that
    calls ``step`` / ``step_jac``); returns ``(module, path)``. The module is written to :func:`cache_dir` under a
    name hashed from its source; ``fresh``: drop its numba cache and loaded module first."""
    key = system_key(system)
    if key not in _SOURCES:
        _SOURCES[key] = generate_source(system)
    src = _SOURCES[key] + extra
    digest = hashlib.sha256(src.encode()).hexdigest()[:16]
    name = f"dq_{type(system).__name__.lower()}_{tag}{digest}"
    path = cache_dir() / f"{name}.py"
    if fresh:
        sys.modules.pop(name, None)
        for f in (path.parent / "__pycache__").glob(f"{name}.*"):
            with contextlib.suppress(OSError):
                f.unlink()
    if not path.exists() or path.read_text() != src:
        _LOG.info("compiling the kernels of %s %s (once per machine, up to about 40 s; cached in %s)",
                  type(system).__name__, tag.rstrip("_") or "dynamics", path.parent)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(src)
        os.replace(tmp, path)
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot load the generated kernel module {path}")
    mod = sys.modules.get(name)
    if mod is None:
        mod = importlib.util.module_from_spec(spec)
        sys.modules[name] = mod  # numba's disk cache finds the module by name
        try:
            spec.loader.exec_module(mod)
        except BaseException:
            del sys.modules[name]
            raise
    return mod, path


def _self_check(system: System, k: Kernels) -> None:
    """Compare the kernel with the system's numpy step on random states (raises ValueError on disagreement)."""
    from deqmpc_gym.systems.ops import NUMPY

    rng = np.random.default_rng(0)
    x = system.sample_initial_states(rng, 8)
    u = system.nominal_control + 0.1 * rng.standard_normal((8, system.nu)) * (
        np.asarray(system.u_high) - np.asarray(system.u_low))
    u = np.ascontiguousarray(np.clip(u, system.u_low, system.u_high))
    want = system._step(x, u, NUMPY)
    got = k.step(x, u)
    got2, _, _ = k.step_and_jacobians(x, u)
    scale = 1.0 + np.abs(want)
    if not (np.all(np.abs(got - want) <= 1e-9 * scale) and np.array_equal(got, got2)):
        raise ValueError(f"the compiled kernel disagrees with {type(system).__name__}._step "
                         f"(max difference {np.max(np.abs(got - want)):.3g})")


def _checked(system: System) -> Kernels:
    """Load (generate, compile) and check the kernels. On a failure to load -- e.g. a numba cache written by
    another numba version -- the module's cache is dropped and it is compiled afresh, once."""
    try:
        k = _load(system)
    except (ImportError, OSError, EOFError, AttributeError, TypeError):
        k = _load(system, fresh=True)
    with np.errstate(all="ignore"):
        _self_check(system, k)
    return k


def system_key(system: System) -> Any:
    """The class and the instance's own settings (values cached by ``cached_property`` excluded)."""
    cls = type(system)
    own = ((k, repr(v)) for k, v in vars(system).items() if not isinstance(getattr(cls, k, None), cached_property))
    return (cls, tuple(sorted(own)))


def kernels_for(system: System) -> Kernels | None:
    """The compiled kernels of ``system`` (built, compiled and checked on first use), or None when kernels are
    disabled, numba is missing or the system cannot be compiled (then one warning says why)."""
    if not _ENABLED[0]:
        return None
    key = system_key(system)
    if key in _CACHE:
        return _CACHE[key]
    with _LOCK:
        if key in _CACHE:
            return _CACHE[key]
        result: Kernels | None = None
        try:
            import numba  # noqa: F401
        except ImportError:
            warnings.warn("numba is not installed: dynamics run on numpy/torch (pip install numba for compiled "
                          "kernels)", RuntimeWarning, stacklevel=3)
        else:
            try:
                result = _checked(system)
            except Exception as exc:  # noqa: BLE001 -- any tracing/compile failure falls back, with a warning
                warnings.warn(f"no compiled dynamics kernel for {type(system).__name__} ({type(exc).__name__}: "
                              f"{exc}); using the numpy/torch path", RuntimeWarning, stacklevel=3)
                result = None
        _CACHE[key] = result
        return result
