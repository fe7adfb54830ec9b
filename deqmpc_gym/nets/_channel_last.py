"""Channel-last kernels of the TCN layers: 'same' Conv1d as one im2col matrix product, and GroupNorm.

The TCN modules keep ``nn.Conv1d`` / ``nn.GroupNorm`` parameters (and their state-dict keys); their forward passes
run on channel-last activations ``(B, L, C)`` through the functions here. With that layout every convolution is one
``(B*L, C_in*k) @ (C_in*k, C_out)`` matrix product whose output is already channel-last, with a hand-written
backward of two matrix products (without autograd, in the fixed-point iterations, the ``Function`` machinery is
skipped), and GroupNorm runs the library's channels-last kernels, whose backward is several times faster than the
channel-first one at the TCN's short lengths.

Notation: ``B`` batch, ``L`` length, ``C`` channels, ``k`` (odd) kernel width, ``G`` groups.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.nn import functional as F

__all__ = ["conv_cl", "group_norm_cl", "transposed_weight"]


def _im2col(x: Tensor, k: int) -> Tensor:
    """``(B, L, C) -> (B*L, C*k)`` zero-padded windows, channel-major (the layout of ``weight.reshape(C_out, -1)``)."""
    b, length, c = x.shape
    if k == 1:
        return x.reshape(b * length, c)
    p = k // 2
    return F.pad(x, (0, 0, p, p)).unfold(1, k, 1).reshape(b * length, c * k)


def _col2im(cols: Tensor, b: int, length: int, c: int, k: int) -> Tensor:
    """Adjoint of :func:`_im2col`: ``(B*L, C*k) -> (B, L, C)``, summing each input position's windows."""
    if k == 1:
        return cols.reshape(b, length, c)
    p = k // 2
    win = cols.reshape(b, length, c, k)
    out = win[..., p].clone()
    for j in range(k):
        s = j - p  # window slot j of output t reads input t + s
        if j == p or abs(s) >= length:
            continue
        if s > 0:
            out[:, s:] += win[:, : length - s, :, j]
        else:
            out[:, : length + s] += win[:, -s:, :, j]
    return out


class _ConvFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor | None, add: Tensor | None) -> Tensor:  # type: ignore[override]
        b, length, c_in = x.shape
        c_out, _, k = weight.shape
        cols = _im2col(x, k)
        out = _matmul(cols, weight.reshape(c_out, c_in * k).t(), bias, add, b, length)
        ctx.save_for_backward(cols, weight)
        ctx.dims = (b, length, c_in, k, bias is not None)
        return out

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        cols, weight = ctx.saved_tensors
        b, length, c_in, k, has_bias = ctx.dims
        g = grad.reshape(b * length, -1)
        dx = dw = db = dadd = None
        if ctx.needs_input_grad[0]:
            dx = _col2im(g @ weight.reshape(weight.shape[0], c_in * k), b, length, c_in, k)
        if ctx.needs_input_grad[1]:
            dw = (g.t() @ cols).reshape(weight.shape)
        if has_bias and ctx.needs_input_grad[2]:
            db = g.sum(0)
        if ctx.needs_input_grad[3]:
            dadd = grad
        return dx, dw, db, dadd


def _matmul(cols: Tensor, wt: Tensor, bias: Tensor | None, add: Tensor | None, b: int, length: int) -> Tensor:
    """``cols @ wt (+ bias) (+ add)`` as ``(B, L, C_out)``; ``wt`` is the ``(C_in*k, C_out)`` weight matrix."""
    if add is not None:
        base = add.reshape(b * length, -1)
        if bias is not None:
            base = base + bias
        out = torch.addmm(base, cols, wt)
    elif bias is not None:
        out = torch.addmm(bias, cols, wt)
    else:
        out = cols @ wt
    return out.view(b, length, -1)


def transposed_weight(weight: Tensor) -> Tensor:
    """The Conv1d weight ``(C_out, C_in, k)`` as a contiguous ``(C_in*k, C_out)`` matrix (detached).

    A product with this layout is up to 2x faster than with ``weight.reshape(C_out, -1).t()`` for the few rows of
    small batches; callers that convolve many times with one weight (a fixed-point solve) transpose it once.
    """
    return weight.detach().reshape(weight.shape[0], -1).t().contiguous()


def conv_cl(x: Tensor, weight: Tensor, bias: Tensor | None, add: Tensor | None = None,
            weight_t: Tensor | None = None) -> Tensor:
    """'Same' (zero-padded, stride 1) Conv1d on channel-last input, plus an optional summand.

    Args:
        x: ``(B, L, C_in)`` contiguous input.
        weight: ``(C_out, C_in, k)`` Conv1d weight, ``k`` odd.
        bias: ``(C_out,)`` or None.
        add: optional ``(B, L, C_out)`` tensor added to the result (fused into the matrix product).
        weight_t: optional :func:`transposed_weight` of ``weight`` (used only without autograd).

    Returns:
        ``(B, L, C_out)`` contiguous, equal to ``conv1d(x.transpose(1, 2), weight, bias, padding=k // 2)``
        transposed back (to float round-off), plus ``add``.
    """
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, weight, bias, add)):
        return _ConvFn.apply(x, weight, bias, add)
    b, length, c_in = x.shape
    k = weight.shape[2]
    wt = weight.reshape(weight.shape[0], c_in * k).t() if weight_t is None else weight_t
    return _matmul(_im2col(x, k), wt, bias, add, b, length)


def group_norm_cl(x: Tensor, weight: Tensor, bias: Tensor, groups: int, eps: float) -> Tensor:
    """GroupNorm of channel-last ``x`` ``(B, L, C)`` with per-channel ``weight`` / ``bias`` ``(C,)``.

    Equal (to float round-off) to ``F.group_norm(x.transpose(1, 2), groups, weight, bias, eps)`` transposed back.
    ``x`` must be contiguous; it is passed to the library kernel as the ``channels_last`` 4-d tensor
    ``(B, C, L, 1)`` (a view), whose forward and backward are several times faster at these lengths than the
    ``(B, C, L)`` kernels. Returns a contiguous ``(B, L, C)`` tensor.
    """
    b, length, c = x.shape
    y = torch.group_norm(x.view(b, length, 1, c).permute(0, 3, 1, 2), groups, weight, bias, eps, False)
    return y.permute(0, 2, 3, 1).reshape(b, length, c)
