"""numba kernels of the block-tridiagonal Cholesky factorisation and solve (see :mod:`deqmpc_gym.mpc.linalg`).

One compiled loop per sample replaces the ``3 T`` batched LAPACK calls (and their per-call overhead) of
:func:`~deqmpc_gym.mpc.linalg.banded_factor`: on the MPC's small blocks (``n = nx + nu <= 18``) the arithmetic is
a few microseconds per sample. Imported lazily by :mod:`deqmpc_gym.mpc.linalg` (numba is then required).

Shapes (numpy float64, C-contiguous): ``D (B, T, n, n)`` diagonal blocks, ``L (B, T-1, n, n)`` sub-diagonal
blocks ``H[t+1, t]``; the factor ``C (B, T, n, n)`` (lower-triangular blocks) and ``Y (B, T-1, n, n)``
(``Y_t = L_t C_t^{-T}``) with ``H = C C^T``; ``ok (B,)`` is False where a pivot is not positive and finite.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from numba import njit

_OPTS: dict[str, Any] = {"cache": True, "error_model": "numpy", "nogil": True}


@njit(inline="always", **_OPTS)
def _chol_block(S, C, t, n):  # pragma: no cover - compiled
    """Lower Cholesky factor of ``S (n, n)`` (lower triangle read) into ``C[t]``; False at a non-positive or
    non-finite pivot."""
    for j in range(n):
        d = S[j, j]
        for k in range(j):
            d -= C[t, j, k] * C[t, j, k]
        if not (d > 0.0) or d == np.inf:
            return False
        cjj = np.sqrt(d)
        C[t, j, j] = cjj
        for i in range(j + 1, n):
            s = S[i, j]
            for k in range(j):
                s -= C[t, i, k] * C[t, j, k]
            C[t, i, j] = s / cjj
        for i in range(j):
            C[t, i, j] = 0.0
    return True


@njit(inline="always", **_OPTS)
def factor_one(D, L, C, Y, S, m, n):  # pragma: no cover - compiled
    """One sample: ``D (T, n, n)``, ``L (T-1, n, n)`` -> ``C``, ``Y`` (``S (n, n)``: work space; ``n`` the block
    size); returns ok.
    A failed factorisation leaves NaN blocks. Per block: ``S = D_t - Y_{t-1} Y_{t-1}^T`` (lower triangle), its
    Cholesky factor ``C_t`` and ``Y_t = L_t C_t^{-T}`` by rows, indexed in place (no block views: on the MPC's
    small blocks the views' bookkeeping costs as much as the arithmetic).

    Rows ``m..n-1`` of every ``L_t`` are zero (``m = n``: none; the MPC's ``L_t = -rho [A B]`` has ``m = nx``), so
    the same rows of ``Y_t`` are zero and are written as such without arithmetic, and ``S``'s entries in those rows
    and columns are ``D_t``'s: the same values as the full computation, which adds and subtracts only exact zeros
    there."""
    t_len = D.shape[0]
    for t in range(t_len):
        for i in range(n):
            for j in range(i + 1):
                s = D[t, i, j]
                if t > 0 and i < m:  # j <= i < m
                    a = 0.0
                    for k in range(n):
                        a += Y[t - 1, i, k] * Y[t - 1, j, k]
                    s -= a
                S[i, j] = s
        if not _chol_block(S, C, t, n):
            C[:, :, :] = np.nan
            Y[:, :, :] = np.nan
            return False
        if t < t_len - 1:  # row r of Y_t solves C_t y = (row r of L_t)
            for r in range(m):
                for i in range(n):
                    s = L[t, r, i]
                    for k in range(i):
                        s -= C[t, i, k] * Y[t, r, k]
                    Y[t, r, i] = s / C[t, i, i]
            for r in range(m, n):
                for i in range(n):
                    Y[t, r, i] = 0.0
    return True


@njit(inline="always", **_OPTS)
def solve_one(C, Y, rhs, out, z, m, n):  # pragma: no cover - compiled
    """One sample: ``out (T, n) = H^{-1} rhs`` (``z (T, n)``: work space), with the factor of :func:`factor_one`
    (``m``: its count of rows of ``Y_t`` that may be non-zero)."""
    t_len = C.shape[0]
    for t in range(t_len):  # forward: C_t z_t = rhs_t - Y_{t-1} z_{t-1}
        for i in range(n):
            s = rhs[t, i]
            if t > 0 and i < m:
                for k in range(n):
                    s -= Y[t - 1, i, k] * z[t - 1, k]
            for k in range(i):
                s -= C[t, i, k] * z[t, k]
            z[t, i] = s / C[t, i, i]
    for t in range(t_len - 1, -1, -1):  # backward: C_t^T x_t = z_t - Y_t^T x_{t+1}
        for i in range(n - 1, -1, -1):
            s = z[t, i]
            if t < t_len - 1:
                for k in range(m):
                    s -= Y[t, k, i] * out[t + 1, k]
            for k in range(i + 1, n):
                s -= C[t, k, i] * out[t, k]
            out[t, i] = s / C[t, i, i]


@njit(**_OPTS)
def banded_factor(D, L, C, Y, ok):  # pragma: no cover - compiled
    """Fill ``C``, ``Y`` and ``ok`` (see the module docstring); a failed sample's blocks are NaN."""
    n = D.shape[2]
    S = np.empty((n, n))
    for b in range(D.shape[0]):
        ok[b] = factor_one(D[b], L[b], C[b], Y[b], S, n, n)


@njit(**_OPTS)
def banded_solve(C, Y, rhs, out):  # pragma: no cover - compiled
    """``out (B, T, n) = H^{-1} rhs`` with the factor from :func:`banded_factor`."""
    z = np.empty((C.shape[1], C.shape[2]))
    for b in range(C.shape[0]):
        solve_one(C[b], Y[b], rhs[b], out[b], z, C.shape[2], C.shape[2])


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
