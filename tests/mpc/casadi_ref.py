"""CasADi + IPOPT reference solutions of the MPC problem, built from the SAME ``System._step`` code.

``_step`` indexes ``x[..., i]`` and calls ``ops.sin/cos/sqrt/stack``; :class:`CasVec` adapts a CasADi column
vector to that interface so the torch dynamics are reused symbol for symbol.
"""

from __future__ import annotations

import numpy as np

cs = __import__("pytest").importorskip("casadi")


class CasVec:
    """A CasADi column vector that supports ``v[..., i]`` and elementwise arithmetic."""

    def __init__(self, v):
        self.v = v

    def __getitem__(self, key):
        if isinstance(key, tuple) and len(key) == 2 and key[0] is Ellipsis:
            return self.v[key[1]]
        raise TypeError(f"unsupported index {key!r}")

    def _o(self, other):
        return other.v if isinstance(other, CasVec) else other

    def __add__(self, o): return CasVec(self.v + self._o(o))
    __radd__ = __add__
    def __sub__(self, o): return CasVec(self.v - self._o(o))
    def __rsub__(self, o): return CasVec(self._o(o) - self.v)
    def __mul__(self, o): return CasVec(self.v * self._o(o))
    __rmul__ = __mul__
    def __truediv__(self, o): return CasVec(self.v / self._o(o))
    def __neg__(self): return CasVec(-self.v)


class CasOps:
    sin = staticmethod(cs.sin)
    cos = staticmethod(cs.cos)
    sqrt = staticmethod(cs.sqrt)
    tanh = staticmethod(cs.tanh)
    abs = staticmethod(cs.fabs)

    @staticmethod
    def stack(xs):
        return CasVec(cs.vertcat(*[x.v if isinstance(x, CasVec) else x for x in xs]))

    @staticmethod
    def where(c, a, b):
        return cs.if_else(c, a, b)


def casadi_dynamics(system) -> cs.Function:
    x = cs.SX.sym("x", system.nx)
    u = cs.SX.sym("u", system.nu)
    y = system._step(CasVec(x), CasVec(u), CasOps())
    y = y.v if isinstance(y, CasVec) else y
    return cs.Function("f", [x, u], [y])


def ipopt_solve(system, f, x0, theta, Q, R, u_low, u_high, x_init=None, u_init=None, obstacles=None, radius=None):
    """Solve one problem with IPOPT. Returns ``(x (T,nx), u (T,nu), cost, success)``."""
    T, nx, nu = theta.shape[0], system.nx, system.nu
    opti = cs.Opti()
    X = opti.variable(nx, T)
    U = opti.variable(nu, T)
    opti.subject_to(X[:, 0] == x0)
    cost = 0
    for t in range(T):
        e = X[:, t] - theta[t]
        cost += 0.5 * cs.mtimes([e.T, Q, e]) + 0.5 * cs.mtimes([U[:, t].T, R, U[:, t]])
        opti.subject_to(opti.bounded(u_low, U[:, t], u_high))
        if t < T - 1:
            opti.subject_to(X[:, t + 1] == f(X[:, t], U[:, t]))
        if obstacles is not None and t > 0:
            a, b = system.position_slice
            p = X[a:b, t]
            for o in obstacles:
                opti.subject_to(cs.sumsqr(p - o) >= radius ** 2)
    opti.minimize(cost)
    if x_init is not None:
        opti.set_initial(X, x_init.T)
    if u_init is not None:
        opti.set_initial(U, u_init.T)
    opti.solver("ipopt", {"print_time": False, "expand": True}, {"print_level": 0, "tol": 1e-10, "max_iter": 500,
                                                  "sb": "yes"})
    try:
        sol = opti.solve()
        ok = True
    except RuntimeError:
        sol = opti.debug
        ok = False
    xs = np.asarray(sol.value(X)).reshape(nx, T).T
    us = np.asarray(sol.value(U)).reshape(nu, T).T
    return xs, us, float(sol.value(cost)), ok
