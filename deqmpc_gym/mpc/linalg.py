"""Batched solves with the symmetric positive-definite block-tridiagonal MPC Hessian.

The Hessian ``H`` of the AL merit is block-tridiagonal over the ``T`` knots: ``D: (B, T, n, n)`` holds the
diagonal blocks ``H[t, t]`` and ``L: (B, T-1, n, n)`` the sub-diagonal blocks ``H[t+1, t]`` (``n = nx + nu``).

* :func:`banded_factor` / :func:`banded_solve`: block Cholesky ``H = C C^T`` with lower block-bidiagonal ``C``
  (diagonal blocks ``C_t``, sub-diagonal blocks ``Y_t = L_t C_t^{-T}``), cost ``O(T n^3)``.
* :func:`dense_factor` / :func:`dense_solve`: the assembled ``(B, Tn, Tn)`` matrix and a dense Cholesky, cost
  ``O(T^3 n^3)`` but fewer, larger kernels -- faster for short horizons.

Both return per-sample ``ok: (B,) bool`` (factorisation succeeded) instead of raising. All functions are
differentiable by autograd (used by the ``"unroll"`` gradient).

:func:`factor` and :func:`solve` calls that need no autograd graph on float64 CPU tensors run the compiled block
Cholesky of :mod:`deqmpc_gym.mpc.linalg_kernels` instead (one numba loop per sample, whatever ``kind``; a
``"banded"`` factor whose ``blocks`` hold the stacked ``C`` and ``Y``), unless compiled kernels are off
(:func:`deqmpc_gym.systems.kernels.set_enabled`) or numba is missing.
"""

from __future__ import annotations

from types import ModuleType
from typing import NamedTuple

import torch

from deqmpc_gym.errors import ShapeError
from deqmpc_gym.systems import kernels as _kernels


class Factor(NamedTuple):
    """A factorisation of ``H``: ``kind`` is ``"dense"`` or ``"banded"``."""

    kind: str
    C: torch.Tensor | list[torch.Tensor]  # dense: (B, Tn, Tn) lower factor; banded: list of T (B, n, n) lower factors
    Y: list[torch.Tensor] | None  # banded: list of T-1 (B, n, n) sub-diagonal blocks; dense: None
    ok: torch.Tensor  # (B,) bool
    blocks: tuple[torch.Tensor, torch.Tensor] | None = None  # compiled banded factor: (C (B,T,n,n), Y (B,T-1,n,n))

    def dense(self) -> torch.Tensor:
        """The ``(B, Tn, Tn)`` lower factor of a ``"dense"`` factor (:class:`~deqmpc_gym.errors.ShapeError` if
        ``C`` is not one tensor)."""
        if not isinstance(self.C, torch.Tensor):
            raise ShapeError(f"a dense Factor holds C as one (B, Tn, Tn) tensor, got {type(self.C).__name__}")
        return self.C

    def banded(self) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """``(C, Y)``: the ``T`` lower diagonal blocks ``(B, n, n)`` and ``T-1`` sub-diagonal blocks ``(B, n, n)``
        of a ``"banded"`` factor (:class:`~deqmpc_gym.errors.ShapeError` if they are not lists)."""
        if isinstance(self.C, torch.Tensor) or self.Y is None:
            raise ShapeError("a banded Factor holds C and Y as lists of (B, n, n) blocks")
        return self.C, self.Y


def assemble_dense(D: torch.Tensor, L: torch.Tensor) -> torch.Tensor:
    """Assemble the dense ``(B, T n, T n)`` matrix from blocks ``D (B,T,n,n)``, ``L (B,T-1,n,n)``."""
    b, t, n, _ = D.shape
    H = D.new_zeros(b, t, n, t, n)
    # block (i, j) of H is H[:, i, :, j, :]; the block diagonals are strided views (diagonal over dims 1 and 3)
    H.diagonal(dim1=1, dim2=3).copy_(D.permute(0, 2, 3, 1))
    if t > 1:
        H[:, 1:, :, :-1, :].diagonal(dim1=1, dim2=3).copy_(L.permute(0, 2, 3, 1))
        H[:, :-1, :, 1:, :].diagonal(dim1=1, dim2=3).copy_(L.permute(0, 3, 2, 1))
    return H.reshape(b, t * n, t * n)


def dense_factor(D: torch.Tensor, L: torch.Tensor) -> Factor:
    """Dense batched Cholesky of the block-tridiagonal ``H``."""
    C, info = torch.linalg.cholesky_ex(assemble_dense(D, L))
    return Factor("dense", C, None, info == 0)


def banded_factor(D: torch.Tensor, L: torch.Tensor) -> Factor:
    """Block-tridiagonal Cholesky ``H = C C^T`` (sequential over knots, batched over samples)."""
    t_len = D.shape[1]
    Cs: list[torch.Tensor] = []
    Ys: list[torch.Tensor] = []
    infos: list[torch.Tensor] = []
    Lt = L.transpose(-1, -2)
    Y = None
    for t in range(t_len):
        S = D[:, t] if Y is None else torch.baddbmm(D[:, t], Y, Y.transpose(-1, -2), alpha=-1.0)
        C, info = torch.linalg.cholesky_ex(S)
        infos.append(info)
        Cs.append(C)
        if t < t_len - 1:
            # Y = L_t C^{-T}  <=>  C Y^T = L_t^T
            Y = torch.linalg.solve_triangular(C, Lt[:, t], upper=False).transpose(-1, -2)
            Ys.append(Y)
    return Factor("banded", Cs, Ys, torch.stack(infos, 1).eq(0).all(1))


def _compiled() -> ModuleType | None:
    """The numba kernels module, or None when compiled kernels are off or numba is missing."""
    if not _kernels.enabled():
        return None
    try:
        from deqmpc_gym.mpc import linalg_kernels
    except ImportError:
        return None
    return linalg_kernels


def _plain(*ts: torch.Tensor) -> bool:
    """float64 CPU tensors whose result needs no autograd graph."""
    grad = torch.is_grad_enabled()
    return all(t.dtype == torch.float64 and t.device.type == "cpu" and not (grad and t.requires_grad) for t in ts)


def compiled_factor(D: torch.Tensor, L: torch.Tensor) -> Factor | None:
    """The compiled block Cholesky of ``H`` (a ``"banded"`` factor with ``blocks``), or None when the inputs or
    the installation do not allow it."""
    mod = _compiled() if _plain(D, L) else None
    if mod is None:
        return None
    C, Y, ok = (torch.from_numpy(a) for a in mod.factor(D.detach().numpy(), L.detach().numpy()))
    return Factor("banded", list(C.unbind(1)), list(Y.unbind(1)), ok, (C, Y))


def factor(D: torch.Tensor, L: torch.Tensor, kind: str) -> Factor:
    """Factorise with ``kind`` in ``{"dense", "banded"}`` (compiled when possible, see the module docstring)."""
    F = compiled_factor(D, L)
    if F is not None:
        return F
    return dense_factor(D, L) if kind == "dense" else banded_factor(D, L)


def solve(F: Factor, b: torch.Tensor) -> torch.Tensor:
    """Solve ``H x = b`` for ``b: (B, T, n)`` with a factor from :func:`factor`; returns ``(B, T, n)``."""
    if F.kind == "dense":
        bs, t, n = b.shape
        return torch.cholesky_solve(b.reshape(bs, t * n, 1), F.dense()).reshape(bs, t, n)
    if F.blocks is not None and _plain(b):
        mod = _compiled()
        if mod is not None:
            C_all, Y_all = F.blocks
            out = mod.solve(C_all.numpy(), Y_all.numpy(), b.detach().numpy())
            return torch.from_numpy(out)
    Cs, Ys = F.banded()
    t_len = len(Cs)
    ys: list[torch.Tensor] = []
    prev: torch.Tensor | None = None
    bc = b[..., None]
    for t in range(t_len):
        rhs = bc[:, t] if prev is None else torch.baddbmm(bc[:, t], Ys[t - 1], prev, alpha=-1.0)
        prev = torch.linalg.solve_triangular(Cs[t], rhs, upper=False)
        ys.append(prev)
    xs: list[torch.Tensor] = []  # x_{T-1}, ..., x_0
    nxt: torch.Tensor | None = None
    for t in range(t_len - 1, -1, -1):
        rhs = ys[t] if nxt is None else torch.baddbmm(ys[t], Ys[t].transpose(-1, -2), nxt, alpha=-1.0)
        nxt = torch.linalg.solve_triangular(Cs[t].transpose(-1, -2), rhs, upper=True)
        xs.append(nxt)
    return torch.stack(xs[::-1], 1)[..., 0]


def block_matvec(D: torch.Tensor, L: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """``H v`` for ``v: (B, T, n)`` with ``H`` given by its blocks (used by tests and diagnostics)."""
    out = (D @ v[..., None])[..., 0]
    if D.shape[1] > 1:
        low = (L @ v[:, :-1, :, None])[..., 0]
        up = (L.transpose(-1, -2) @ v[:, 1:, :, None])[..., 0]
        out = out + torch.cat([torch.zeros_like(out[:, :1]), low], 1) + torch.cat([up, torch.zeros_like(out[:, :1])], 1)
    return out
