"""numba kernels of the block-tridiagonal Cholesky factorisation and solve (see :mod:`deqmpc_gym.mpc.linalg`).

One compiled loop per sample replaces the ``3 T`` batched LAPACK calls (and their per-call overhead) of
:func:`~deqmpc_gym.mpc.linalg.banded_factor`: on the MPC's small blocks (``n = nx + nu <= 18``) the arithmetic is
a few microseconds per sample. Imported lazily by :mod:`deqmpc_gym.mpc.linalg` (numba is then required).

Shapes (numpy float64, C-contiguous): ``D (B, T, n, n)`` diagonal blocks, ``L (B, T-1, n, n)`` sub-diagonal
blocks ``H[t+1, t]``; the factor ``C (B, T, n, n)`` (lower-triangular blocks) and ``Y (B, T-1, n, n)``
(``Y_t = L_t C_t^{-T}``) with ``H = C C^T``; ``ok (B,)`` is False where a pivot is not positive and finite.
"""

from __future__ import annotations

import numpy as np
from numba import njit

_OPTS = {"cache": True, "error_model": "numpy", "nogil": True}


@njit(**_OPTS)
def _chol(S, C):  # pragma: no cover - compiled
    """Lower Cholesky factor of ``S (n, n)`` into ``C``; returns False at a non-positive or non-finite pivot."""
    n = S.shape[0]
    for j in range(n):
        d = S[j, j]
        for k in range(j):
            d -= C[j, k] * C[j, k]
        if not (d > 0.0) or d == np.inf:
            return False
        cjj = np.sqrt(d)
        C[j, j] = cjj
        for i in range(j + 1, n):
            s = S[i, j]
            for k in range(j):
                s -= C[i, k] * C[j, k]
            C[i, j] = s / cjj
        for i in range(j):
            C[i, j] = 0.0
    return True


@njit(**_OPTS)
def banded_factor(D, L, C, Y, ok):  # pragma: no cover - compiled
    """Fill ``C``, ``Y`` and ``ok`` (see the module docstring); a failed sample's blocks are NaN."""
    nb, t_len, n = D.shape[0], D.shape[1], D.shape[2]
    S = np.empty((n, n))
    for b in range(nb):
        ok[b] = True
        for t in range(t_len):
            for i in range(n):
                for j in range(n):
                    S[i, j] = D[b, t, i, j]
            if t > 0:  # S -= Y_{t-1} Y_{t-1}^T
                Yp = Y[b, t - 1]
                for i in range(n):
                    for j in range(i + 1):
                        s = 0.0
                        for k in range(n):
                            s += Yp[i, k] * Yp[j, k]
                        S[i, j] -= s
            Ct = C[b, t]
            if not _chol(S, Ct):
                ok[b] = False
                C[b, :, :, :] = np.nan
                Y[b, :, :, :] = np.nan
                break
            if t < t_len - 1:  # row r of Y_t solves C_t y = (row r of L_t)
                Lt, Yt = L[b, t], Y[b, t]
                for r in range(n):
                    for i in range(n):
                        s = Lt[r, i]
                        for k in range(i):
                            s -= Ct[i, k] * Yt[r, k]
                        Yt[r, i] = s / Ct[i, i]


@njit(**_OPTS)
def banded_solve(C, Y, rhs, out):  # pragma: no cover - compiled
    """``out (B, T, n) = H^{-1} rhs`` with the factor from :func:`banded_factor`."""
    nb, t_len, n = C.shape[0], C.shape[1], C.shape[2]
    z = np.empty((t_len, n))
    for b in range(nb):
        for t in range(t_len):  # forward: C_t z_t = rhs_t - Y_{t-1} z_{t-1}
            Ct = C[b, t]
            for i in range(n):
                s = rhs[b, t, i]
                if t > 0:
                    for k in range(n):
                        s -= Y[b, t - 1, i, k] * z[t - 1, k]
                for k in range(i):
                    s -= Ct[i, k] * z[t, k]
                z[t, i] = s / Ct[i, i]
        for t in range(t_len - 1, -1, -1):  # backward: C_t^T x_t = z_t - Y_t^T x_{t+1}
            Ct = C[b, t]
            xb = out[b, t]
            for i in range(n - 1, -1, -1):
                s = z[t, i]
                if t < t_len - 1:
                    for k in range(n):
                        s -= Y[b, t, k, i] * out[b, t + 1, k]
                for k in range(i + 1, n):
                    s -= Ct[k, i] * xb[k]
                xb[i] = s / Ct[i, i]


def factor(D: np.ndarray, L: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(C, Y, ok)`` of the block-tridiagonal matrix given by ``D``, ``L`` (see the module docstring)."""
    b, t, n, _ = D.shape
    C = np.zeros((b, t, n, n))
    Y = np.zeros((b, max(t - 1, 0), n, n))
    ok = np.empty(b, dtype=np.bool_)
    banded_factor(np.ascontiguousarray(D), np.ascontiguousarray(L).reshape(b, max(t - 1, 0), n, n), C, Y, ok)
    return C, Y, ok


def solve(C: np.ndarray, Y: np.ndarray, rhs: np.ndarray) -> np.ndarray:
    """``H^{-1} rhs`` for ``rhs (B, T, n)``."""
    out = np.empty(rhs.shape)
    banded_solve(C, Y, np.ascontiguousarray(rhs), out)
    return out
