"""The convolution's two tap layouts, the GroupNorm kernels with statistics, the DEQ cell's hand-written backward and
the first phantom step's reuse of the forward solve's evaluation."""

from __future__ import annotations

import pytest
import torch
from torch.nn import functional as F

from deqmpc_gym.nets import AndersonConfig, NetConfig, anderson, build_network, fixed_point_iter
from deqmpc_gym.nets._channel_last import (
    _taps_out,
    conv_cl,
    group_norm_backward_cl,
    group_norm_stats_cl,
    transposed_weight,
)
from deqmpc_gym.nets._deq_cell import cell

F64 = dict(rtol=1e-11, atol=1e-11)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.mark.parametrize("c_in, c_out", [(3, 7), (7, 3), (4, 4)])
@pytest.mark.parametrize("length", [1, 2, 4])
@pytest.mark.parametrize("kernel", [1, 3, 5])
def test_conv_cl_layouts_match_conv1d(c_in, c_out, length, kernel):
    x = torch.randn(2, length, c_in, dtype=torch.float64, requires_grad=True)
    w = torch.randn(c_out, c_in, kernel, dtype=torch.float64, requires_grad=True)
    b = torch.randn(c_out, dtype=torch.float64, requires_grad=True)
    add = torch.randn(2, length, c_out, dtype=torch.float64, requires_grad=True)
    assert _taps_out(w) == (c_in > c_out)
    assert transposed_weight(w).shape == ((c_in, kernel * c_out) if c_in > c_out else (kernel * c_in, c_out))
    for bias, extra in ((b, add), (None, None), (b, None), (None, add)):
        y = conv_cl(x, w, bias, extra)
        ref = F.conv1d(x.transpose(1, 2), w, bias, padding=kernel // 2).transpose(1, 2)
        ref = ref if extra is None else ref + extra
        torch.testing.assert_close(y, ref, **F64)
        with torch.no_grad():
            torch.testing.assert_close(conv_cl(x, w, bias, extra, weight_t=transposed_weight(w)), ref, **F64)
        g = torch.randn_like(y)
        inputs = [t for t in (x, w, bias, extra) if t is not None]
        for a, r in zip(torch.autograd.grad(y, inputs, g), torch.autograd.grad(ref, inputs, g)):
            torch.testing.assert_close(a, r, **F64)


def test_group_norm_with_statistics_and_its_backward_match_the_library():
    x = torch.randn(5, 4, 12, dtype=torch.float64, requires_grad=True)
    w = torch.randn(12, dtype=torch.float64, requires_grad=True)
    b = torch.randn(12, dtype=torch.float64, requires_grad=True)
    ref = F.group_norm(x.transpose(1, 2), 3, w, b, 1e-5).transpose(1, 2)
    y, mean, rstd = group_norm_stats_cl(x.detach(), w.detach(), b.detach(), 3, 1e-5)
    assert mean.shape == rstd.shape == (5, 3) and y.is_contiguous()
    torch.testing.assert_close(y, ref, **F64)
    g = torch.randn_like(y)
    got = group_norm_backward_cl(g, x.detach(), mean, rstd, w.detach(), 3, True, True, True)
    for a, r in zip(got, torch.autograd.grad(ref, [x, w, b], g)):
        torch.testing.assert_close(a, r, **F64)
    assert group_norm_backward_cl(g, x.detach(), mean, rstd, w.detach(), 3, False, True, False)[::2] == (None, None)


def _net(**kw):
    return build_network(NetConfig(nx=4, nq=2, dt=0.05, T=5, hidden=16, kind="deq", **kw)).double().train()


def _reference_f(net, z, u):
    """``f`` with the library layers, channel-first ``(B, h, L)``."""
    y = net.gn1(torch.relu(F.conv1d(z, net.conv1.weight, net.conv1.bias, padding=1)))
    return net.gn3(torch.relu(z + net.gn2(u + F.conv1d(y, net.conv2.weight, net.conv2.bias, padding=1))))


@pytest.mark.parametrize("z_grad", [True, False])
def test_cell_backward_matches_autograd_of_the_library_layers(z_grad):
    """Every input's gradient (z only when it needs one), with the ReLUs active on part of the entries."""
    net = _net()
    z = torch.randn(6, 4, 16, dtype=torch.float64, requires_grad=z_grad)
    u = torch.randn(6, 4, 16, dtype=torch.float64, requires_grad=True)
    out = cell(z, u, net._cell_weights())
    ref = _reference_f(net, z.transpose(1, 2), u.transpose(1, 2)).transpose(1, 2)
    torch.testing.assert_close(out, ref, **F64)
    g = torch.randn_like(out)
    inputs = [z, u, *net.parameters()] if z_grad else [u, *net.parameters()]
    got = torch.autograd.grad(out, inputs, g, allow_unused=True)
    want = torch.autograd.grad(ref, inputs, g, allow_unused=True)
    for a, r in zip(got, want):
        assert (a is None) == (r is None)
        if a is not None:
            torch.testing.assert_close(a, r, **F64)


def test_cell_gradient_of_the_injection_only():
    net = _net().requires_grad_(False)
    u = torch.randn(3, 4, 16, dtype=torch.float64, requires_grad=True)
    z = torch.randn(3, 4, 16, dtype=torch.float64)
    (gu,) = torch.autograd.grad(cell(z, u, net._cell_weights()).sum(), [u])
    ref = _reference_f(net, z.transpose(1, 2), u.transpose(1, 2)).sum()
    torch.testing.assert_close(gu, torch.autograd.grad(ref, [u])[0], **F64)


@pytest.mark.parametrize("solver", [anderson, fixed_point_iter])
def test_first_phantom_step_reuses_the_solve_and_gives_the_same_gradient(solver):
    net = _net()
    u = torch.randn(7, 4, 16, dtype=torch.float64, requires_grad=True)
    fmap = net._f_solve(u)
    z_star, _ = solver(fmap, torch.zeros(7, 4, 16, dtype=torch.float64), AndersonConfig(max_iter=6, tol=1e-12))
    pre = fmap.reusable(z_star)
    assert pre is not None  # tol 1e-12: no sample stops early, so the last evaluation is every sample's best
    assert fmap.reusable(z_star + 1e-9) is None and fmap.reusable(z_star[:3]) is None
    params = [u, *(p for m in (net.conv1, net.conv2, net.gn1, net.gn2, net.gn3) for p in m.parameters())]
    g = torch.randn_like(z_star)
    with_reuse = torch.autograd.grad(net._grad_path(z_star, u, pre), params, g)
    without = torch.autograd.grad(net._grad_path(z_star, u), params, g)
    for a, b in zip(with_reuse, without):
        # the solve's evaluation (taps on the narrower side) and a fresh one (channel-major windows) differ only in
        # the order of the products' sums
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_training_forward_evaluates_the_cell_once_less_with_reuse(monkeypatch):
    """A training call evaluates f (solve + phantom) once less than the solve's evaluations plus phantom_steps."""
    import deqmpc_gym.nets.tcn as tcn

    net = _net(anderson=AndersonConfig(max_iter=5, tol=1e-12), phantom_steps=3)
    count = [0]
    real = tcn.cell_forward

    def counting(*args, **kwargs):
        count[0] += 1
        return real(*args, **kwargs)

    monkeypatch.setattr(tcn, "cell_forward", counting)
    import deqmpc_gym.nets._deq_cell as dc
    monkeypatch.setattr(dc, "cell_forward", counting)
    x0 = torch.randn(4, 4, dtype=torch.float64)
    out = net(x0, x0[:, None].repeat(1, 5, 1))
    out.theta.sum().backward()
    assert count[0] == 5 + 3 - 1
