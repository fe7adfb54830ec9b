"""Channel-last kernels of the TCN layers: 'same' Conv1d as one matrix product, and GroupNorm.

The TCN modules keep ``nn.Conv1d`` / ``nn.GroupNorm`` parameters (and their state-dict keys); their forward passes
run on channel-last activations ``(B, L, C)`` through the functions here. With that layout every convolution is one
matrix product whose output is already channel-last, with a hand-written backward of two matrix products (without
autograd, in the fixed-point iterations, the ``Function`` machinery is skipped), and GroupNorm runs the library's
channels-last kernels, whose backward is several times faster than the channel-first one at the TCN's short
lengths.

A convolution takes the taps on its narrower side: with ``C_in <= C_out`` it unfolds the input into tap-major
windows ``(B*L, k*C_in)`` and multiplies by the ``(k*C_in, C_out)`` weight matrix; with ``C_in > C_out`` it
multiplies the input by the ``(C_in, k*C_out)`` matrix of all taps and sums the ``k`` shifted ``(B, L, C_out)``
slices of the product. Either way the product has the ``B*L*C_in*k*C_out`` multiply-adds of the convolution, and
the only copies are of ``k`` times the narrower side.

Notation: ``B`` batch, ``L`` length, ``C`` channels, ``k`` (odd) kernel width, ``G`` groups.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["conv_cl", "group_norm_cl", "transposed_weight"]


def _im2col(x: Tensor, k: int, sign: int = 1) -> Tensor:
    """``(B, L, C) -> (B*L, k*C)`` zero-padded windows, tap-major: row ``t``, slot ``j`` holds
    ``x[t + sign*(j - k//2)]`` (zero outside ``0..L-1``)."""
    b, length, c = x.shape
    if k == 1:
        return x.reshape(b * length, c)
    p = k // 2
    cols = x.new_empty(b, length, k, c)
    for j in range(k):
        s = sign * (j - p)
        if s == 0:
            cols[:, :, j] = x
        elif abs(s) >= length:
            cols[:, :, j] = 0.0
        elif s > 0:  # t reads t + s
            cols[:, : length - s, j] = x[:, s:]
            cols[:, length - s:, j] = 0.0
        else:
            cols[:, -s:, j] = x[:, : length + s]
            cols[:, :-s, j] = 0.0
    return cols.view(b * length, k * c)


def _col2im(cols: Tensor, b: int, length: int, c: int, k: int, sign: int = 1, base: Tensor | None = None) -> Tensor:
    """Adjoint of :func:`_im2col` ``(B*L, k*C) -> (B, L, C)`` (each position sums the window slots that read it),
    added to ``base`` ``(B, L, C)`` when given (a new tensor; ``base`` is not modified)."""
    win = cols.view(b, length, k, c)
    p = k // 2
    out = win[:, :, p].clone() if base is None else torch.add(base, win[:, :, p])
    for j in range(k):
        s = sign * (j - p)  # slot j of row t reads position t + s
        if s == 0 or abs(s) >= length:
            continue
        if s > 0:
            out[:, s:] += win[:, : length - s, j]
        else:
            out[:, : length + s] += win[:, -s:, j]
    return out


def _taps_out(weight: Tensor) -> bool:
    """Whether a ``(C_out, C_in, k)`` convolution takes its taps on the output side (``C_in > C_out``)."""
    return weight.shape[1] > weight.shape[0]


def transposed_weight(weight: Tensor) -> Tensor:
    """The Conv1d weight ``(C_out, C_in, k)`` as the contiguous matrix :func:`conv_cl` multiplies by (detached):
    ``(k*C_in, C_out)`` (tap-major rows) when ``C_in <= C_out``, else ``(C_in, k*C_out)`` (tap-major columns).

    Callers that convolve many times with one weight (a fixed-point solve) prepare it once.
    """
    return _weight_matrix(weight.detach())


def _weight_matrix(weight: Tensor) -> Tensor:
    c_out, c_in, k = weight.shape
    if _taps_out(weight):
        return weight.permute(1, 2, 0).reshape(c_in, k * c_out).contiguous()
    return weight.permute(2, 1, 0).reshape(k * c_in, c_out).contiguous()


def _weight_grad(gm: Tensor, weight: Tensor) -> Tensor:
    """The gradient of :func:`_weight_matrix` ``gm`` back in the ``(C_out, C_in, k)`` layout (contiguous)."""
    c_out, c_in, k = weight.shape
    if _taps_out(weight):
        return gm.view(c_in, k, c_out).permute(2, 0, 1).contiguous()
    return gm.view(k, c_in, c_out).permute(2, 1, 0).contiguous()


def _forward(x: Tensor, weight: Tensor, wm: Tensor, bias: Tensor | None, add: Tensor | None) -> tuple[Tensor, Tensor]:
    """The convolution with the weight matrix ``wm``; returns ``(out (B, L, C_out), saved)`` with ``saved`` the
    windows of the input (input-side taps) or the input itself (output-side taps)."""
    b, length, c_in = x.shape
    c_out, _, k = weight.shape
    if add is not None:
        base: Tensor | None = add if bias is None else add + bias
    elif bias is not None:
        base = bias.expand(b, length, c_out)
    else:
        base = None
    if _taps_out(weight):
        xf = x.reshape(b * length, c_in)
        if k == 1:
            out = xf @ wm if base is None else torch.addmm(base.reshape(b * length, c_out), xf, wm)
            return out.view(b, length, c_out), xf
        return _col2im(xf @ wm, b, length, c_out, k, sign=-1, base=base), xf
    cols = _im2col(x, k)
    if base is None:
        out = cols @ wm
    else:
        out = torch.addmm(base.reshape(b * length, c_out) if bias is None or add is not None else bias, cols, wm)
    return out.view(b, length, c_out), cols


def _conv_backward(grad: Tensor, saved: Tensor, weight: Tensor, wm: Tensor, need_x: bool, need_w: bool,
                   need_b: bool) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """Gradients ``(dx (B, L, C_in), dw (C_out, C_in, k), db (C_out,))`` of :func:`_forward` (None where not needed)
    for ``grad`` ``(B, L, C_out)`` contiguous, with the ``saved`` tensor and weight matrix ``wm`` of its forward."""
    b, length, c_out = grad.shape
    c_in, k = weight.shape[1], weight.shape[2]
    g = grad.view(b * length, c_out)
    dx = dw = db = None
    if _taps_out(weight):  # saved = the input (B*L, C_in); the product's gradient is the windows of grad
        gcols = _im2col(grad, k, sign=-1)
        if need_x:
            dx = (gcols @ wm.t()).view(b, length, c_in)
        if need_w:
            dw = _weight_grad(saved.t() @ gcols, weight)
    else:  # saved = the input's windows (B*L, k*C_in)
        if need_x:
            dx = _col2im(g @ wm.t(), b, length, c_in, k)
        if need_w:
            dw = _weight_grad(saved.t() @ g, weight)
    if need_b:
        db = g.sum(0)
    return dx, dw, db


class _ConvFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor | None, add: Tensor | None) -> Tensor:  # type: ignore[override]
        wm = _weight_matrix(weight)
        out, saved = _forward(x, weight, wm, bias, add)
        ctx.save_for_backward(saved, weight, wm)
        ctx.has_bias = bias is not None
        return out

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        saved, weight, wm = ctx.saved_tensors
        grad = grad.contiguous()
        need = ctx.needs_input_grad
        dx, dw, db = _conv_backward(grad, saved, weight, wm, need[0], need[1], ctx.has_bias and need[2])
        return dx, dw, db, grad if need[3] else None


def conv_cl(x: Tensor, weight: Tensor, bias: Tensor | None, add: Tensor | None = None,
            weight_t: Tensor | None = None) -> Tensor:
    """'Same' (zero-padded, stride 1) Conv1d on channel-last input, plus an optional summand.

    Args:
        x: ``(B, L, C_in)`` contiguous input.
        weight: ``(C_out, C_in, k)`` Conv1d weight, ``k`` odd.
        bias: ``(C_out,)`` or None.
        add: optional ``(B, L, C_out)`` tensor added to the result (fused into the matrix product or the sum of
            the taps).
        weight_t: optional :func:`transposed_weight` of ``weight`` (used only without autograd).

    Returns:
        ``(B, L, C_out)`` contiguous, equal to ``conv1d(x.transpose(1, 2), weight, bias, padding=k // 2)``
        transposed back (to float round-off), plus ``add``.
    """
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, weight, bias, add)):
        return _ConvFn.apply(x, weight, bias, add)
    wm = _weight_matrix(weight) if weight_t is None else weight_t
    return _forward(x, weight, wm, bias, add)[0]


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


def _cl4(x: Tensor) -> Tensor:
    """The contiguous ``(B, L, C)`` tensor as the ``channels_last`` ``(B, C, L, 1)`` view the norm kernels take."""
    b, length, c = x.shape
    return x.view(b, length, 1, c).permute(0, 3, 1, 2)


def group_norm_stats_cl(x: Tensor, weight: Tensor, bias: Tensor, groups: int,
                        eps: float) -> tuple[Tensor, Tensor, Tensor]:
    """:func:`group_norm_cl` (no autograd) that also returns the ``(B, G)`` group means and inverse deviations its
    backward (:func:`group_norm_backward_cl`) takes; the output is the same kernel's, bit for bit."""
    b, length, c = x.shape
    y, mean, rstd = torch.native_group_norm(_cl4(x), weight, bias, b, c, length, groups, eps)
    return y.permute(0, 2, 3, 1).reshape(b, length, c), mean, rstd


def group_norm_backward_cl(grad: Tensor, x: Tensor, mean: Tensor, rstd: Tensor, weight: Tensor, groups: int,
                           need_x: bool, need_w: bool, need_b: bool,
                           ) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """Gradients ``(dx (B, L, C), dweight (C,), dbias (C,))`` of GroupNorm at channel-last ``x`` for ``grad`` ``(B, L,
    C)`` (both contiguous), from the statistics of :func:`group_norm_stats_cl` (None where not needed)."""
    b, length, c = x.shape
    # all three always: the channels-last kernel crashes when the input gradient is masked out
    dx, dw, db = torch.ops.aten.native_group_norm_backward(_cl4(grad), _cl4(x), mean, rstd, weight, b, c, length,
                                                           groups, [True, True, True])
    return (dx.permute(0, 2, 3, 1).reshape(b, length, c) if need_x else None, dw if need_w else None,
            db if need_b else None)
