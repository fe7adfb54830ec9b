"""A system's dynamics on component lists, with forward-mode Jacobians (for code generation by ``torch.compile``).

:meth:`System._step` is written once against an array namespace (``ops.sin``, ``ops.stack``, ``x[..., i]``).
This module supplies a third namespace whose arrays are :class:`Vec` -- a tuple of per-component *scalars*: a
python ``float`` or a tensor of any shape (e.g. ``(B,)``), possibly a :class:`Dual` carrying forward-mode tangents.
Evaluating ``_step`` on it yields each component of ``f(x, u)`` as its own tensor and, with tangents seeded on the
inputs, every entry of ``[A | B]`` as its own tensor. Entries that are structurally constant stay python floats
(e.g. the pendulum's ``df/du``), so products with them fold away when the caller builds on them. Everything is
elementwise, which ``torch.compile`` fuses into a few loops over the batch (the compiled MPC path,
:mod:`deqmpc_gym.mpc.compiled`).

Supported in ``_step``: ``+ - * /`` and ``**`` with python numbers, unary ``-``, ``x[..., i]`` and
``x[..., a:b]``, comparisons (on values), ``ops.sin/cos/sqrt/tanh/abs/stack/where`` and :func:`~deqmpc_gym.systems.rk4`
-- what the pendulum and the cart-pole use. Operations outside this set raise ``TypeError`` naming the operation.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch

Scalar = Any  # float | torch.Tensor | Dual


def _is0(a: Any) -> bool:
    return type(a) is float and a == 0.0


def _is1(a: Any) -> bool:
    return type(a) is float and a == 1.0


def smul(a: Any, b: Any) -> Any:
    """``a * b`` for floats / tensors, with exact python-float zeros and ones folded away."""
    if _is0(a) or _is0(b):
        return 0.0
    if _is1(a):
        return b
    if _is1(b):
        return a
    return a * b


def sadd(a: Any, b: Any) -> Any:
    """``a + b`` with exact python-float zeros folded away."""
    if _is0(a):
        return b
    if _is0(b):
        return a
    return a + b


def ssub(a: Any, b: Any) -> Any:
    """``a - b`` with exact python-float zeros folded away."""
    if _is0(b):
        return a
    if _is0(a):
        return -b
    return a - b


def ssum(xs: Sequence[Any]) -> Any:
    """Sum of floats / tensors (``0.0`` for none), zeros folded away."""
    out: Any = 0.0
    for v in xs:
        out = sadd(out, v)
    return out


def _num(a: Any) -> Any:
    """ints -> float so that the zero/one folding sees them."""
    return float(a) if isinstance(a, (int, float)) and not isinstance(a, bool) else a


class Dual:
    """A scalar ``val`` (float or tensor) with forward-mode tangents ``tan`` (tuple of floats / tensors)."""

    __slots__ = ("val", "tan")

    def __init__(self, val: Any, tan: tuple) -> None:
        self.val, self.tan = val, tan

    # -- arithmetic
    def __add__(self, o: Any) -> Dual:
        o = _num(o)
        if isinstance(o, Dual):
            return Dual(sadd(self.val, o.val), tuple(sadd(a, b) for a, b in zip(self.tan, o.tan)))
        return Dual(sadd(self.val, o), self.tan)

    __radd__ = __add__

    def __neg__(self) -> Dual:
        return Dual(-self.val, tuple(0.0 if _is0(a) else -a for a in self.tan))

    def __sub__(self, o: Any) -> Dual:
        return self + (-o if isinstance(o, Dual) else -_num(o))

    def __rsub__(self, o: Any) -> Dual:
        return (-self) + o

    def __mul__(self, o: Any) -> Dual:
        o = _num(o)
        if isinstance(o, Dual):
            return Dual(smul(self.val, o.val), tuple(sadd(smul(a, o.val), smul(self.val, b))
                                                     for a, b in zip(self.tan, o.tan)))
        return Dual(smul(self.val, o), tuple(smul(a, o) for a in self.tan))

    __rmul__ = __mul__

    def __truediv__(self, o: Any) -> Dual:
        o = _num(o)
        if isinstance(o, Dual):
            v = self.val / o.val
            inv = 1.0 / o.val
            return Dual(v, tuple(smul(ssub(a, smul(v, b)), inv) for a, b in zip(self.tan, o.tan)))
        inv = 1.0 / o
        return Dual(smul(self.val, inv) if type(o) is float else self.val / o, tuple(smul(a, inv) for a in self.tan))

    def __rtruediv__(self, o: Any) -> Dual:
        v = _num(o) / self.val
        k = -v / self.val
        return Dual(v, tuple(smul(k, a) for a in self.tan))

    def __pow__(self, p: Any) -> Dual:
        if not isinstance(p, (int, float)):
            raise TypeError(f"Dual ** {type(p).__name__}: only python-number exponents are supported")
        p = float(p)
        if p == 2.0:
            return self * self
        k = p * self.val ** (p - 1.0)
        return Dual(self.val ** p, tuple(smul(k, a) for a in self.tan))

    # -- comparisons act on the value (branch conditions, ops.where)
    def __gt__(self, o: Any) -> Any:
        return self.val > (o.val if isinstance(o, Dual) else o)

    def __lt__(self, o: Any) -> Any:
        return self.val < (o.val if isinstance(o, Dual) else o)

    def __ge__(self, o: Any) -> Any:
        return self.val >= (o.val if isinstance(o, Dual) else o)

    def __le__(self, o: Any) -> Any:
        return self.val <= (o.val if isinstance(o, Dual) else o)


def _chain(x: Any, f, df) -> Any:
    """``f(x)`` for a float / tensor / :class:`Dual` with derivative ``df(value)``."""
    if isinstance(x, Dual):
        d = df(x.val)
        return Dual(f(x.val), tuple(smul(d, a) for a in x.tan))
    return f(x)


def _fn(tf, mf):
    return lambda v: tf(v) if isinstance(v, torch.Tensor) else mf(v)


_sin, _cos = _fn(torch.sin, math.sin), _fn(torch.cos, math.cos)
_sqrt, _tanh = _fn(torch.sqrt, math.sqrt), _fn(torch.tanh, math.tanh)
_abs, _sign = _fn(torch.abs, abs), _fn(torch.sign, lambda v: math.copysign(1.0, v) if v != 0 else 0.0)


class Vec:
    """A vector as a tuple of scalar components (floats, tensors or :class:`Dual`); the array type of
    :data:`COMPONENT_OPS`. Indexing takes ``x[..., i]`` (a component) or ``x[..., a:b]`` (a :class:`Vec`)."""

    __slots__ = ("c",)

    def __init__(self, comps: Sequence[Any]) -> None:
        self.c = tuple(comps)

    def __len__(self) -> int:
        return len(self.c)

    def __iter__(self):
        return iter(self.c)

    def __getitem__(self, key: Any) -> Any:
        if isinstance(key, tuple) and len(key) == 2 and key[0] is Ellipsis:
            key = key[1]
        if isinstance(key, int):
            return self.c[key]
        if isinstance(key, slice):
            return Vec(self.c[key])
        raise TypeError(f"Vec supports x[..., i] and x[..., a:b] indexing, got {key!r}")

    def _bin(self, o: Any, op) -> Vec:
        if isinstance(o, Vec):
            if len(o) != len(self):
                raise TypeError(f"Vec sizes differ: {len(self)} vs {len(o)}")
            return Vec([op(a, b) for a, b in zip(self.c, o.c)])
        return Vec([op(a, o) for a in self.c])

    def __add__(self, o: Any) -> Vec:
        return self._bin(o, _add)

    def __radd__(self, o: Any) -> Vec:
        return self._bin(o, lambda a, b: _add(b, a))

    def __sub__(self, o: Any) -> Vec:
        return self._bin(o, _sub)

    def __rsub__(self, o: Any) -> Vec:
        return self._bin(o, lambda a, b: _sub(b, a))

    def __mul__(self, o: Any) -> Vec:
        return self._bin(o, _mul)

    def __rmul__(self, o: Any) -> Vec:
        return self._bin(o, lambda a, b: _mul(b, a))

    def __truediv__(self, o: Any) -> Vec:
        return self._bin(o, lambda a, b: a / b)

    def __neg__(self) -> Vec:
        return Vec([-a for a in self.c])


def _add(a: Any, b: Any) -> Any:
    a, b = _num(a), _num(b)
    if isinstance(a, Dual) or isinstance(b, Dual):
        return a + b if isinstance(a, Dual) else b + a
    return sadd(a, b)


def _sub(a: Any, b: Any) -> Any:
    a, b = _num(a), _num(b)
    if isinstance(a, Dual) or isinstance(b, Dual):
        return a - b
    return ssub(a, b)


def _mul(a: Any, b: Any) -> Any:
    a, b = _num(a), _num(b)
    if isinstance(a, Dual) or isinstance(b, Dual):
        return a * b if isinstance(a, Dual) else b * a
    return smul(a, b)


class _ComponentOps:
    """The ``ops`` namespace of :class:`Vec` arrays (see the module docstring)."""

    @staticmethod
    def sin(x: Any) -> Any:
        return _chain(x, _sin, _cos)

    @staticmethod
    def cos(x: Any) -> Any:
        return _chain(x, _cos, lambda v: -_sin(v))

    @staticmethod
    def sqrt(x: Any) -> Any:
        return _chain(x, _sqrt, lambda v: 0.5 / _sqrt(v))

    @staticmethod
    def tanh(x: Any) -> Any:
        return _chain(x, _tanh, lambda v: 1.0 - _tanh(v) ** 2)

    @staticmethod
    def abs(x: Any) -> Any:
        return _chain(x, _abs, _sign)

    @staticmethod
    def stack(xs: Sequence[Any]) -> Vec:
        return Vec(list(xs))

    @staticmethod
    def where(cond: Any, a: Any, b: Any) -> Any:
        if isinstance(a, Dual) or isinstance(b, Dual):
            nt = len(a.tan if isinstance(a, Dual) else b.tan)
            da = a if isinstance(a, Dual) else Dual(a, (0.0,) * nt)
            db = b if isinstance(b, Dual) else Dual(b, (0.0,) * nt)
            return Dual(torch.where(cond, da.val, db.val),
                        tuple(ta if (_is0(ta) and _is0(tb)) else torch.where(cond, ta, tb)
                              for ta, tb in zip(da.tan, db.tan)))
        return torch.where(cond, a, b)

    @staticmethod
    def zeros_like(x: Any, shape: tuple[int, ...]) -> Any:
        raise TypeError("ops.zeros_like is not supported on component vectors: write _step with ops.stack")


COMPONENT_OPS = _ComponentOps()


def step_components(system: Any, xs: Sequence[Any], us: Sequence[Any]) -> list[Any]:
    """``f(x, u)`` componentwise: ``xs`` ``nx`` scalars (floats / tensors of one shape), ``us`` ``nu`` scalars;
    returns ``nx`` scalars (the system's :meth:`~deqmpc_gym.systems.System._step` on :data:`COMPONENT_OPS`)."""
    out = system._step(Vec(xs), Vec(us), COMPONENT_OPS)
    return [_num(v) for v in out]


def step_and_jacobian_components(system: Any, xs: Sequence[Any],
                                 us: Sequence[Any]) -> tuple[list[Any], list[list[Any]]]:
    """``(f, J)``: ``f`` as in :func:`step_components` and ``J[i][j] = d f_i / d [x, u]_j`` (``nx`` rows of
    ``nx + nu`` scalars; structurally constant entries are python floats), by forward mode on :class:`Dual`."""
    n = len(xs) + len(us)
    seeds = [Dual(v, tuple(1.0 if k == j else 0.0 for k in range(n))) for j, v in enumerate(list(xs) + list(us))]
    out = system._step(Vec(seeds[:len(xs)]), Vec(seeds[len(xs):]), COMPONENT_OPS)
    f, J = [], []
    for v in out:
        if isinstance(v, Dual):
            f.append(v.val)
            J.append(list(v.tan))
        else:  # a component that does not depend on the inputs
            f.append(_num(v))
            J.append([0.0] * n)
    return f, J
