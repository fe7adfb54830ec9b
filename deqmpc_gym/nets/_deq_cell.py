"""The DEQ cell of :class:`~deqmpc_gym.nets.DEQTCN` on channel-last tensors, with a hand-written backward.

``f(z, u) = GN3(ReLU(z + GN2(u + Conv2(GN1(ReLU(Conv1(z)))))))`` on ``z, u: (B, L, h)``. :func:`cell_forward` evaluates
it without autograd and returns the intermediates its backward needs; :func:`cell` is the differentiable cell (one
autograd node whose backward is the chain of the layers' backward kernels: the two convolutions' matrix products,
the three GroupNorm backward kernels and the two ReLU masks). Given the intermediates of an evaluation at the same
``z`` (a forward solve's last one), :func:`cell` reuses them instead of evaluating ``f`` again: the same value and
gradient to round-off (the solve's prepared weights put the convolutions' taps on the narrower side, a fresh
evaluation uses the channel-major windows; see :mod:`deqmpc_gym.nets._channel_last`).

Notation: ``B`` batch, ``L`` length, ``h`` hidden width, ``e`` expanded width, ``k`` kernel width, ``G`` groups.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from deqmpc_gym.nets._channel_last import (
    _conv_backward,
    _forward,
    group_norm_backward_cl,
    group_norm_stats_cl,
)

__all__ = ["CellWeights", "CellEval", "cell_forward", "cell"]


class CellWeights(NamedTuple):
    """The cell's parameters: Conv1d weights ``w1 (e, h, k)``, ``w2 (h, e, k)``, biases ``b1 (e,)``, ``b2 (h,)`` (or
    None), the three GroupNorms' ``(weight, bias)`` pairs (``(e,)``, ``(h,)``, ``(h,)``), their groups and eps."""

    w1: Tensor
    b1: Tensor | None
    w2: Tensor
    b2: Tensor | None
    norms: tuple[tuple[Tensor, Tensor], tuple[Tensor, Tensor], tuple[Tensor, Tensor]]
    groups: tuple[int, int, int]
    eps: tuple[float, float, float]


class CellEval(NamedTuple):
    """One gradient-free evaluation of the cell: its input ``z`` and output ``out`` ``(B, L, h)`` and the
    intermediates of the backward (``saved``; its weight matrices are None for the channel-major windows)."""

    z: Tensor
    out: Tensor
    saved: tuple[Tensor | None, ...]


def cell_forward(z: Tensor, ub: Tensor, p: CellWeights, wm1: Tensor | None, wm2: Tensor | None) -> CellEval:
    """Evaluate the cell without autograd.

    Args:
        z: ``(B, L, h)`` contiguous latent.
        ub: ``(B, L, h)`` injection plus the second convolution's bias (``u + b2``).
        p: the parameters (used detached).
        wm1, wm2: the prepared weight matrices of ``p.w1``, ``p.w2``
            (:func:`~deqmpc_gym.nets._channel_last.transposed_weight`), or None for the channel-major windows.

    Returns:
        :class:`CellEval` with ``out = f(z, u)`` ``(B, L, h)``.
    """
    (n1w, n1b), (n2w, n2b), (n3w, n3b) = p.norms
    a, s1 = _forward(z, p.w1, wm1, p.b1, None)
    r = a.relu_()
    y, m1, r1 = group_norm_stats_cl(r, n1w, n1b, p.groups[0], p.eps[0])
    c, s2 = _forward(y, p.w2, wm2, None, ub)
    n2, m2, r2 = group_norm_stats_cl(c, n2w, n2b, p.groups[1], p.eps[1])
    s = n2.add_(z).relu_()
    out, m3, r3 = group_norm_stats_cl(s, n3w, n3b, p.groups[2], p.eps[2])
    return CellEval(z, out, (s1, r, m1, r1, s2, c, m2, r2, s, m3, r3, wm1, wm2))


class _CellFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, z: Tensor, u: Tensor, w1: Tensor, b1: Tensor | None, w2: Tensor, b2: Tensor | None,  # type: ignore[override]
                n1w: Tensor, n1b: Tensor, n2w: Tensor, n2b: Tensor, n3w: Tensor, n3b: Tensor,
                groups: tuple[int, int, int], eps: tuple[float, float, float], pre: CellEval | None) -> Tensor:
        if pre is None:
            p = CellWeights(w1, b1, w2, b2, ((n1w, n1b), (n2w, n2b), (n3w, n3b)), groups, eps)
            pre = cell_forward(z, u if b2 is None else u + b2, p, None, None)
        ctx.save_for_backward(w1, w2, n1w, n2w, n3w, *pre.saved)
        ctx.groups = groups
        ctx.has_bias = (b1 is not None, b2 is not None)
        return pre.out

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        w1, w2, n1w, n2w, n3w, s1, r, m1, r1, s2, c, m2, r2, s, m3, r3, wm1, wm2 = ctx.saved_tensors
        need = ctx.needs_input_grad
        g1, g2, g3 = ctx.groups
        threshold_backward = torch.ops.aten.threshold_backward
        gs, dn3w, dn3b = group_norm_backward_cl(grad.contiguous(), s, m3, r3, n3w, g3, True, need[10], need[11])
        gpre = threshold_backward(gs, s, 0)  # ReLU: z + GN2(...)
        need_c = any(need[:2]) or any(need[2:10])
        if not need_c:
            return gpre if need[0] else None, *([None] * 14)
        gc, dn2w, dn2b = group_norm_backward_cl(gpre, c, m2, r2, n2w, g2, True, need[8], need[9])
        assert gc is not None  # internal invariant: requested above
        need_y = need[0] or any(need[2:4]) or any(need[6:8])
        dy, dw2, db2 = _conv_backward(gc, s2, w2, wm2, need_y, need[4], ctx.has_bias[1] and need[5])
        dz = dw1 = db1 = dn1w = dn1b = None
        if need_y:
            assert dy is not None  # internal invariant: requested above
            need_a = need[0] or any(need[2:4])
            gr, dn1w, dn1b = group_norm_backward_cl(dy.contiguous(), r, m1, r1, n1w, g1, need_a, need[6], need[7])
            if need_a:
                ga = threshold_backward(gr, r, 0)
                dz, dw1, db1 = _conv_backward(ga, s1, w1, wm1, need[0], need[2], ctx.has_bias[0] and need[3])
        if need[0]:
            dz = gpre if dz is None else dz.add_(gpre)
        return (dz, gc if need[1] else None, dw1, db1, dw2, db2, dn1w, dn1b, dn2w, dn2b, dn3w, dn3b,
                None, None, None)


def cell(z: Tensor, u: Tensor, p: CellWeights, pre: CellEval | None = None) -> Tensor:
    """The differentiable cell ``f(z, u)`` ``(B, L, h)`` on contiguous ``z, u: (B, L, h)``.

    With ``pre`` (a :func:`cell_forward` evaluation at this ``z`` and ``u``, same weights) its output and
    intermediates are used as they are; the caller guarantees they belong to these inputs.
    """
    (n1w, n1b), (n2w, n2b), (n3w, n3b) = p.norms
    return _CellFn.apply(z, u, p.w1, p.b1, p.w2, p.b2, n1w, n1b, n2w, n2b, n3w, n3b, p.groups, p.eps, pre)
