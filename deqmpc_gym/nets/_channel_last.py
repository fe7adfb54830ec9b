"""Channel-last kernels of the TCN layers: 'same' Conv1d as one matrix product, and GroupNorm.

The TCN modules keep ``nn.Conv1d`` / ``nn.GroupNorm`` parameters (and their state-dict keys); their forward passes
run on channel-last activations ``(B, L, C)`` through the functions here. With that layout every convolution is one
matrix product whose output is already channel-last, with a hand-written backward of two matrix products (without
autograd, in the fixed-point iterations, the ``Function`` machinery is skipped), and GroupNorm runs the library's
channels-last kernels, whose backward is several times faster than the channel-first one at the TCN's short
lengths.

A convolution is one matrix product in either of two layouts:
- **Channel-major windows** (calls with autograd, and one-off calls): the input is unfolded into ``(B*L, C_in*k)``
  windows whose column ``c*k + j`` holds input channel ``c`` at tap ``j``, the column order of the Conv1d weight
  itself, so the weight matrix is the weight's ``(C_out, C_in*k)`` view and the weight gradient is written in the
  weight's layout: no call copies or transposes a weight.
- **Taps on the narrower side** (gradient-free calls with a weight prepared once by :func:`transposed_weight`, the
  fixed-point solves): with ``C_in <= C_out`` the input is unfolded into tap-major windows ``(B*L, k*C_in)`` and
  multiplied by the ``(k*C_in, C_out)`` matrix; with ``C_in > C_out`` the input is multiplied by the ``(C_in,
  k*C_out)`` matrix of all taps and the ``k`` shifted ``(B, L, C_out)`` slices of the product are summed. Only ``k``
  times the narrower side is copied, contiguously.
Either way the product has the ``B*L*C_in*k*C_out`` multiply-adds of the convolution.

Notation: ``B`` batch, ``L`` length, ``C`` channels, ``k`` (odd) kernel width, ``G`` groups.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.nn import functional as F

__all__ = ["conv_cl", "group_norm_cl", "split_input_conv_cl", "transposed_weight"]


def _windows_into(cols: Tensor, x: Tensor) -> None:
    """Write the zero-padded windows of ``x: (B, L, C)`` into ``cols: (B, L, C, k)`` (a view may be strided):
    ``cols[:, t, c, j] = x[:, t + j - k//2, c]`` (zero outside ``0..L-1``)."""
    length, k = x.shape[1], cols.shape[3]
    p = k // 2
    for j in range(k):
        s = j - p  # row t reads t + s
        if s == 0:
            cols[..., j] = x
        elif abs(s) >= length:
            cols[..., j] = 0.0
        elif s > 0:
            cols[:, : length - s, :, j] = x[:, s:]
            cols[:, length - s:, :, j] = 0.0
        else:
            cols[:, -s:, :, j] = x[:, : length + s]
            cols[:, :-s, :, j] = 0.0


def _im2col(x: Tensor, k: int) -> Tensor:
    """``(B, L, C) -> (B*L, C*k)`` zero-padded windows, channel-major: row ``t``, column ``c*k + j`` holds
    ``x[t + j - k//2, c]`` (zero outside ``0..L-1``), the column order of ``weight.view(C_out, C_in*k)``."""
    b, length, c = x.shape
    if k == 1:
        return x.reshape(b * length, c)
    p = k // 2  # the padded input's windows, (B, L, C, k) strided, copied once
    return F.pad(x, (0, 0, p, p)).unfold(1, k, 1).reshape(b * length, c * k)


def _col2im(cols: Tensor, b: int, length: int, c: int, k: int) -> Tensor:
    """Adjoint of :func:`_im2col` ``(B*L, C*k) -> (B, L, C)`` (each position sums the window slots that read it;
    a new contiguous tensor). ``cols`` may be a column slice of a wider matrix."""
    win = cols.reshape(b, length, c, k)
    p = k // 2
    out = win[..., p].clone(memory_format=torch.contiguous_format)
    for j in range(k):
        s = j - p  # slot j of row t reads position t + s
        if s == 0 or abs(s) >= length:
            continue
        if s > 0:
            out[:, s:] += win[:, : length - s, :, j]
        else:
            out[:, : length + s] += win[:, -s:, :, j]
    return out


def _forward_cm(x: Tensor, weight: Tensor, wm: Tensor, bias: Tensor | None,
                add: Tensor | None) -> tuple[Tensor, Tensor]:
    """The convolution with the weight matrix ``wm (C_out, C_in*k)``; returns ``(out (B, L, C_out), cols)`` with
    ``cols`` the input's windows (the input itself for ``k = 1``)."""
    b, length, _ = x.shape
    c_out, _, k = weight.shape
    cols = _im2col(x, k)
    if add is not None:
        base = (add if bias is None else add + bias).reshape(b * length, c_out)
        out = torch.addmm(base, cols, wm.t())
    elif bias is not None:
        out = torch.addmm(bias, cols, wm.t())
    else:
        out = cols @ wm.t()
    return out.view(b, length, c_out), cols


def _conv_backward_cm(grad: Tensor, saved: Tensor, weight: Tensor, wm: Tensor, need_x: bool, need_w: bool,
                      need_b: bool) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """Gradients ``(dx (B, L, C_in), dw (C_out, C_in, k), db (C_out,))`` of :func:`_forward_cm` (None where not needed)
    for ``grad`` ``(B, L, C_out)`` contiguous, with the windows ``saved`` and weight matrix ``wm`` of its forward."""
    b, length, c_out = grad.shape
    c_in, k = weight.shape[1], weight.shape[2]
    g = grad.view(b * length, c_out)
    dx = dw = db = None
    if need_x:
        dx = _col2im(g @ wm, b, length, c_in, k) if k > 1 else (g @ wm).view(b, length, c_in)
    if need_w:
        dw = (g.t() @ saved).view(weight.shape)
    if need_b:
        db = g.sum(0)
    return dx, dw, db


def _im2col_tm(x: Tensor, k: int, sign: int = 1) -> Tensor:
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


def _col2im_tm(cols: Tensor, b: int, length: int, c: int, k: int, sign: int = 1, base: Tensor | None = None) -> Tensor:
    """Adjoint of :func:`_im2col_tm` ``(B*L, k*C) -> (B, L, C)`` (each position sums the window slots that read it),
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


def _prepared_matrix(weight: Tensor) -> Tensor:
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


def _forward_tm(x: Tensor, weight: Tensor, wm: Tensor, bias: Tensor | None,
                add: Tensor | None) -> tuple[Tensor, Tensor]:
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
        return _col2im_tm(xf @ wm, b, length, c_out, k, sign=-1, base=base), xf
    cols = _im2col_tm(x, k)
    if base is None:
        out = cols @ wm
    else:
        out = torch.addmm(base.reshape(b * length, c_out) if bias is None or add is not None else bias, cols, wm)
    return out.view(b, length, c_out), cols


def _conv_backward_tm(grad: Tensor, saved: Tensor, weight: Tensor, wm: Tensor, need_x: bool, need_w: bool,
                   need_b: bool) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """Gradients ``(dx (B, L, C_in), dw (C_out, C_in, k), db (C_out,))`` of :func:`_forward` (None where not needed)
    for ``grad`` ``(B, L, C_out)`` contiguous, with the ``saved`` tensor and weight matrix ``wm`` of its forward."""
    b, length, c_out = grad.shape
    c_in, k = weight.shape[1], weight.shape[2]
    g = grad.view(b * length, c_out)
    dx = dw = db = None
    if _taps_out(weight):  # saved = the input (B*L, C_in); the product's gradient is the windows of grad
        gcols = _im2col_tm(grad, k, sign=-1)
        if need_x:
            dx = (gcols @ wm.t()).view(b, length, c_in)
        if need_w:
            dw = _weight_grad(saved.t() @ gcols, weight)
    else:  # saved = the input's windows (B*L, k*C_in)
        if need_x:
            dx = _col2im_tm(g @ wm.t(), b, length, c_in, k)
        if need_w:
            dw = _weight_grad(saved.t() @ g, weight)
    if need_b:
        db = g.sum(0)
    return dx, dw, db


def transposed_weight(weight: Tensor) -> Tensor:
    """The Conv1d weight ``(C_out, C_in, k)`` prepared for repeated gradient-free convolutions (detached): the matrix
    of its taps on the narrower side, ``(k*C_in, C_out)`` (tap-major rows) when ``C_in <= C_out``, else ``(C_in,
    k*C_out)`` (tap-major columns). Callers that convolve many times with one weight (a fixed-point solve) prepare it
    once; without it a call uses the channel-major windows and the weight's own memory.
    """
    return _prepared_matrix(weight.detach())


def _forward(x: Tensor, weight: Tensor, wm: Tensor | None, bias: Tensor | None,
             add: Tensor | None) -> tuple[Tensor, Tensor]:
    """The convolution ``(B, L, C_in) -> (B, L, C_out)``, plus ``bias`` and ``add``; returns ``(out, saved)`` for
    :func:`_conv_backward`. With a prepared matrix ``wm`` (:func:`transposed_weight`) the taps go on the narrower
    side; with ``wm = None`` the input's channel-major windows multiply the weight's own ``(C_out, C_in*k)`` view."""
    if wm is None:
        return _forward_cm(x, weight, _weight_matrix(weight), bias, add)
    return _forward_tm(x, weight, wm, bias, add)


def _conv_backward(grad: Tensor, saved: Tensor, weight: Tensor, wm: Tensor | None, need_x: bool, need_w: bool,
                   need_b: bool) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """Gradients ``(dx (B, L, C_in), dw (C_out, C_in, k), db (C_out,))`` of :func:`_forward` (None where not needed)
    for ``grad`` ``(B, L, C_out)`` contiguous, with the ``saved`` tensor and the ``wm`` (or None) of its forward."""
    if wm is None:
        return _conv_backward_cm(grad, saved, weight, _weight_matrix(weight), need_x, need_w, need_b)
    return _conv_backward_tm(grad, saved, weight, wm, need_x, need_w, need_b)


def _weight_matrix(weight: Tensor) -> Tensor:
    """The ``(C_out, C_in*k)`` view of a Conv1d weight (the column order of the channel-major windows)."""
    return weight.reshape(weight.shape[0], -1)


class _ConvFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor | None, add: Tensor | None) -> Tensor:  # type: ignore[override]
        out, saved = _forward(x, weight, None, bias, add)
        ctx.save_for_backward(saved, weight)
        ctx.has_bias = bias is not None
        return out

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        saved, weight = ctx.saved_tensors
        grad = grad.contiguous()
        need = ctx.needs_input_grad
        dx, dw, db = _conv_backward(grad, saved, weight, None, need[0], need[1], ctx.has_bias and need[2])
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
    return _forward(x, weight, weight_t, bias, add)[0]


def _split_forward(nodes: Tensor, context: Tensor, time: Tensor, weight: Tensor, taps: Tensor,
                   bias: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
    """:func:`split_input_conv_cl`; returns ``(out (B, L, e), windows of [nodes, context] (B*L, 2*h*k), windows of
    time (L, h*k))``."""
    b, length, h = nodes.shape
    e, k = weight.shape[0], weight.shape[2]
    wm = weight.reshape(e, 3 * h * k)  # columns: nodes, context, time (channel-major windows)
    cols = nodes.new_empty(b, length, 2 * h, k)
    _windows_into(cols[:, :, :h], nodes)
    torch.mul(context[:, None, :, None], taps[None, :, None, :], out=cols[:, :, h:])  # the constant context's taps
    tcols = _im2col(time[None], k)  # (L, h*k)
    base = tcols @ wm[:, 2 * h * k:].t()  # (L, e): the time embedding's part, batch-independent
    if bias is not None:
        base += bias
    flat = cols.view(b * length, 2 * h * k)
    out = (flat @ wm[:, : 2 * h * k].t()).view(b, length, e)
    out += base
    return out, flat, tcols


class _SplitConvFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, nodes: Tensor, context: Tensor, time: Tensor, weight: Tensor, bias: Tensor | None,  # type: ignore[override]
                taps: Tensor) -> Tensor:
        out, cols, tcols = _split_forward(nodes, context, time, weight, taps, bias)
        ctx.save_for_backward(weight, taps, cols, tcols)
        ctx.has_bias = bias is not None
        return out

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        weight, taps, cols, tcols = ctx.saved_tensors
        need = ctx.needs_input_grad
        g = grad.contiguous()
        b, length, e = g.shape
        h, k = weight.shape[1] // 3, weight.shape[2]
        hk = h * k
        wm = weight.reshape(e, 3 * hk)
        gf, gsum = g.view(b * length, e), g.sum(0)  # gsum: (L, e), the time part's gradient
        dn = dc = dt = dw = db = None
        if need[0] or need[1]:
            d = gf @ wm[:, : 2 * hk]  # (B*L, 2hk): the gradient of the windows
            if need[0]:
                dn = _col2im(d[:, :hk], b, length, h, k)
            if need[1]:
                dc = torch.einsum("bthj,tj->bh", d[:, hk:].reshape(b, length, h, k), taps)
        if need[2]:
            dt = _col2im(gsum @ wm[:, 2 * hk:], 1, length, h, k)[0]
        if need[3]:
            dw = weight.new_empty(e, 3 * hk)  # the three parts' products written in place
            torch.mm(gf.t(), cols, out=dw[:, : 2 * hk])
            torch.mm(gsum.t(), tcols, out=dw[:, 2 * hk:])
            dw = dw.view(weight.shape)
        if ctx.has_bias and need[4]:
            db = gsum.sum(0)
        return dn, dc, dt, dw, db, None


def split_input_conv_cl(nodes: Tensor, context: Tensor, time: Tensor, weight: Tensor, bias: Tensor | None,
                        taps: Tensor) -> Tensor:
    """'Same' Conv1d of the channel-last concatenation ``[nodes, context, time]`` without forming it.

    The input encoder's convolution sees, at every knot, the knot's node features, the (constant) context of the
    current state and the (batch-independent) time embedding. Convolving the three parts separately needs two
    thirds of the products of convolving their concatenation (the time embedding's part is computed once for the
    batch); this function does that in one autograd node whose weight gradient is written once (slicing the weight
    per part would cost a zero-filled weight-sized gradient per slice).

    Args:
        nodes: ``(B, L, h)`` contiguous node features.
        context: ``(B, h)`` context, the same at every knot.
        time: ``(L, h)`` time embedding, the same for every sample.
        weight: ``(e, 3h, k)`` Conv1d weight over the concatenated channels ``[nodes, context, time]``, ``k`` odd.
        bias: ``(e,)`` or None.
        taps: ``(L, k)`` float: ``taps[t, j] = 1`` where knot ``t``'s tap ``j`` reads inside ``0..L-1``
            (:func:`same_conv_taps`), else 0.

    Returns:
        ``(B, L, e)`` contiguous, equal (to float round-off) to ``conv_cl(cat([nodes, context, time], -1), weight,
        bias)`` with ``context`` and ``time`` broadcast to ``(B, L, h)``.
    """
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (nodes, context, time, weight, bias)):
        return _SplitConvFn.apply(nodes, context, time, weight, bias, taps)
    return _split_forward(nodes, context, time, weight, taps, bias)[0]


def same_conv_taps(length: int, k: int, dtype: torch.dtype | None = None,
                   device: torch.device | str | None = None) -> Tensor:
    """``(length, k)``: 1 where knot ``t``'s tap ``j`` of a 'same' convolution reads inside ``0..length-1``, else 0."""
    t = torch.arange(length, device=device)[:, None] + torch.arange(k, device=device)[None] - k // 2
    return ((t >= 0) & (t < length)).to(torch.get_default_dtype() if dtype is None else dtype)


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
