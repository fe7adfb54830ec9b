"""The channel-last layers, the split input encoder and the lean Anderson loop against plain references."""

from __future__ import annotations

import pytest
import torch
from torch.nn import functional as F

from deqmpc_gym.nets import AndersonConfig, NetConfig, anderson, build_network
from deqmpc_gym.nets._channel_last import conv_cl, group_norm_cl, transposed_weight
from deqmpc_gym.nets.tcn import _SPLIT_ENCODER_MIN_BATCH

F64 = dict(rtol=1e-11, atol=1e-11)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("length", [1, 2, 4, 7])
@pytest.mark.parametrize("kernel", [1, 3, 5])
def test_conv_cl_matches_conv1d(batch, length, kernel):
    x = torch.randn(batch, length, 6, dtype=torch.float64, requires_grad=True)
    w = torch.randn(5, 6, kernel, dtype=torch.float64, requires_grad=True)
    b = torch.randn(5, dtype=torch.float64, requires_grad=True)
    add = torch.randn(batch, length, 5, dtype=torch.float64, requires_grad=True)
    for bias, extra in ((b, add), (None, None), (b, None), (None, add)):
        y = conv_cl(x, w, bias, extra)
        ref = F.conv1d(x.transpose(1, 2), w, bias, padding=kernel // 2).transpose(1, 2)
        ref = ref if extra is None else ref + extra
        assert y.shape == (batch, length, 5) and y.is_contiguous()
        torch.testing.assert_close(y, ref, **F64)
        g = torch.randn_like(y)
        inputs = [t for t in (x, w, bias, extra) if t is not None]
        for a, r in zip(torch.autograd.grad(y, inputs, g), torch.autograd.grad(ref, inputs, g)):
            torch.testing.assert_close(a, r, **F64)
    with torch.no_grad():
        torch.testing.assert_close(conv_cl(x, w, b, add, weight_t=transposed_weight(w)), conv_cl(x, w, b, add), **F64)


def test_conv_cl_gradient_only_where_needed():
    x = torch.randn(2, 4, 3, dtype=torch.float64)
    w = torch.randn(4, 3, 3, dtype=torch.float64, requires_grad=True)
    (gw,) = torch.autograd.grad(conv_cl(x, w, None).sum(), [w])
    torch.testing.assert_close(gw, torch.autograd.grad(F.conv1d(x.transpose(1, 2), w, padding=1).sum(), [w])[0])


@pytest.mark.parametrize("batch, length, channels, groups", [(1, 4, 8, 4), (3, 1, 8, 2), (5, 4, 16, 4), (2, 7, 6, 3)])
def test_group_norm_cl_matches_group_norm(batch, length, channels, groups):
    x = torch.randn(batch, length, channels, dtype=torch.float64, requires_grad=True)
    w = torch.randn(channels, dtype=torch.float64, requires_grad=True)
    b = torch.randn(channels, dtype=torch.float64, requires_grad=True)
    y = group_norm_cl(x, w, b, groups, 1e-5)
    ref = F.group_norm(x.transpose(1, 2), groups, w, b, 1e-5).transpose(1, 2)
    assert y.shape == x.shape and y.is_contiguous()
    torch.testing.assert_close(y, ref, **F64)
    g = torch.randn_like(y)
    for a, r in zip(torch.autograd.grad(y, [x, w, b], g), torch.autograd.grad(ref, [x, w, b], g)):
        torch.testing.assert_close(a, r, **F64)


def _cfg(kind: str, **kw) -> NetConfig:
    return NetConfig(nx=4, nq=2, dt=0.05, T=5, hidden=16, kind=kind, **kw)


def _reference_encode(net, x0, x_prev):
    """The input block as written channel-first: one convolution of the concatenated input parts."""
    blk = net.input_block
    x0n, xpn = (x0 - net.state_center) / net.input_scale, (x_prev - net.state_center) / net.input_scale
    nodes = blk.node_encoder(xpn[:, 1:])
    ctx = blk.x0_encoder(x0n)[:, None].expand_as(nodes)
    time = blk.time_embedding[None].expand_as(nodes)
    conv_a, relu, conv_b, gn = blk.input_encoder
    cat = torch.cat([nodes, ctx, time], dim=-1).transpose(1, 2)
    return gn(F.conv1d(relu(F.conv1d(cat, conv_a.weight, conv_a.bias, padding=1)), conv_b.weight, conv_b.bias,
                       padding=1))


def _reference_f(net, z, u):
    """``f`` of the DEQ cell with the library layers, channel-first."""
    y = net.gn1(torch.relu(F.conv1d(z, net.conv1.weight, net.conv1.bias, padding=1)))
    return net.gn3(torch.relu(z + net.gn2(u + F.conv1d(y, net.conv2.weight, net.conv2.bias, padding=1))))


def _inputs(batch):
    x0 = torch.randn(batch, 4, dtype=torch.float64)
    return x0, x0[:, None].repeat(1, 5, 1) + 0.3 * torch.randn(batch, 5, 4, dtype=torch.float64)


@pytest.mark.parametrize("batch", [1, _SPLIT_ENCODER_MIN_BATCH - 1, _SPLIT_ENCODER_MIN_BATCH, 20])
def test_encoder_paths_match_the_concatenated_convolution(batch):
    """Both encoder paths (one convolution below the split batch, three parts from it on), values and gradients."""
    net = build_network(_cfg("nn", state_center=(0.5, 0.0, -1.0, 0.0), input_scale=(2.0, 1.0, 1.0, 3.0))).double()
    x0, x_prev = _inputs(batch)
    x0.requires_grad_()
    u, ref = net.encode(x0, x_prev), _reference_encode(net, x0, x_prev)
    torch.testing.assert_close(u, ref, **F64)
    g = torch.randn_like(u)
    params = [x0, *net.input_block.parameters()]
    for a, r in zip(torch.autograd.grad(u, params, g), torch.autograd.grad(ref, params, g)):
        torch.testing.assert_close(a, r, **F64)


@pytest.mark.parametrize("batch", [1, 9])
def test_deq_cell_and_solve_map_match_the_reference(batch):
    net = build_network(_cfg("deq")).double()
    z = torch.randn(batch, 16, 4, dtype=torch.float64, requires_grad=True)
    u = torch.randn(batch, 16, 4, dtype=torch.float64, requires_grad=True)
    out, ref = net.f(z, u), _reference_f(net, z, u)
    torch.testing.assert_close(out, ref, **F64)
    g = torch.randn_like(out)
    params = [z, u, *net.parameters()]
    grads = torch.autograd.grad(out, params, g, allow_unused=True)
    grads_ref = torch.autograd.grad(ref, params, g, allow_unused=True)
    for a, r in zip(grads, grads_ref):
        assert (a is None) == (r is None)
        if a is not None:
            torch.testing.assert_close(a, r, **F64)
    with torch.no_grad():  # the gradient-free map of the forward solve, channel-last
        f_solve = net._f_solve(u.transpose(1, 2).contiguous())
        torch.testing.assert_close(f_solve(z.transpose(1, 2).contiguous()).transpose(1, 2), ref, **F64)


@pytest.mark.parametrize("kind", ["nn", "deq"])
def test_training_step_gradients_match_the_reference_network(kind):
    """theta and every parameter gradient of a training-mode call equal the channel-first formulas'."""
    cfg = _cfg(kind, anderson=AndersonConfig(max_iter=8), phantom_steps=2)
    net = build_network(cfg).double().train()
    x0, x_prev = _inputs(10)
    w = torch.randn(10, 5, 4, dtype=torch.float64)
    with torch.no_grad():
        z_solve = net.eval()(x0, x_prev).z  # eval mode: the forward solve's result without the phantom steps
    out = net.train()(x0, x_prev)
    u = _reference_encode(net, x0, x_prev)
    if kind == "nn":
        hidden = torch.relu(u + net.contract(net.expand(u)))
    else:
        hidden = z_solve  # then the phantom steps with the reference cell
        for _ in range(cfg.phantom_steps):
            hidden = _reference_f(net, hidden, u)
    o = net.head(hidden).transpose(1, 2) * net.state_scale
    ref = torch.cat([x0[:, None], torch.cat([x_prev[:, :1, :2] + cfg.dt * o[..., :2], o[..., 2:]], -1)], 1)
    torch.testing.assert_close(out.theta, ref, **F64)
    params = list(net.parameters())
    for a, r in zip(torch.autograd.grad((out.theta * w).sum(), params), torch.autograd.grad((ref * w).sum(), params)):
        torch.testing.assert_close(a, r, **F64)


# ------------------------------------------------------------------------------- Anderson reference


def _reference_anderson(f, x0, cfg):
    """Anderson acceleration written plainly (history of x and f(x), Gram matrix and bordered system rebuilt per
    step, per-sample best iterate and Tikhonov retries), the algorithm :func:`anderson` implements."""
    bsz, n = x0.shape
    best_x, best_f = x0.clone(), x0.clone()
    best_res = torch.full((bsz,), float("inf"), dtype=x0.dtype)
    iters = torch.zeros(bsz, dtype=torch.int64)
    done = torch.zeros(bsz, dtype=torch.bool)
    xs, fs = torch.zeros(bsz, cfg.m, n, dtype=x0.dtype), torch.zeros(bsz, cfg.m, n, dtype=x0.dtype)
    lam = torch.full((bsz,), cfg.lam, dtype=x0.dtype)
    x, nfe = x0, 0
    for k in range(cfg.max_iter):
        if k >= 2:
            kk = min(k, cfg.m)
            g = fs[:, :kk] - xs[:, :kk]
            alpha, ok = torch.zeros(bsz, kk, dtype=x0.dtype), torch.zeros(bsz, dtype=torch.bool)
            alpha[:, -1] = 1.0
            for _ in range(4):
                h = torch.zeros(bsz, kk + 1, kk + 1, dtype=x0.dtype)
                h[:, 0, 1:], h[:, 1:, 0] = 1.0, 1.0
                h[:, 1:, 1:] = g @ g.transpose(1, 2) + lam[:, None, None] * torch.eye(kk, dtype=x0.dtype)
                rhs = torch.zeros(bsz, kk + 1, 1, dtype=x0.dtype)
                rhs[:, 0] = 1.0
                sol, info = torch.linalg.solve_ex(h, rhs)
                a = sol[:, 1:, 0]
                good = (info == 0) & torch.isfinite(a).all(dim=1)
                alpha = torch.where(good[:, None] & ~ok[:, None], a, alpha)
                ok = ok | good
                if ok.all():
                    break
                lam = torch.where(ok, lam, torch.clamp(lam * 10.0, min=1e-8))
            mix_f, mix_x = (alpha[:, :, None] * fs[:, :kk]).sum(1), (alpha[:, :, None] * xs[:, :kk]).sum(1)
            x = cfg.beta * mix_f + (1 - cfg.beta) * mix_x
        elif k == 1:
            x = fs[:, 0]
        fx = f(x)
        nfe += 1
        res = (fx - x).norm(dim=1)
        if cfg.stop_mode == "rel":
            res = res / (1e-5 + fx.norm(dim=1))
        finite = torch.isfinite(x).all(1) & torch.isfinite(fx).all(1) & torch.isfinite(res)
        res = torch.where(finite, res, torch.full_like(res, float("inf")))
        better = res < best_res
        best_res = torch.where(better, res, best_res)
        best_x, best_f = torch.where(better[:, None], x, best_x), torch.where(better[:, None], fx, best_f)
        newly = ~done & (res < cfg.tol)
        iters, done = torch.where(newly, torch.full_like(iters, nfe), iters), done | newly
        x, fx = torch.where(finite[:, None], x, best_x), torch.where(finite[:, None], fx, best_f)
        xs[:, k % cfg.m], fs[:, k % cfg.m] = x, fx
        if done.all():
            break
    return best_x, best_res, torch.where(done, iters, torch.full_like(iters, nfe))


def _tanh_map(n: int, b: int):
    w = 0.9 * torch.linalg.qr(torch.randn(n, n, dtype=torch.float64))[0]
    c = torch.randn(b, n, dtype=torch.float64)
    return lambda z: torch.tanh(z @ w.T + c)


@pytest.mark.parametrize("cfg", [AndersonConfig(max_iter=30, tol=1e-9), AndersonConfig(m=3, beta=1.0, tol=1e-6),
                                 AndersonConfig(max_iter=12, tol=1e-3, stop_mode="abs")])
def test_anderson_matches_the_plain_reference(cfg):
    f = _tanh_map(20, 6)
    z0 = torch.randn(6, 20, dtype=torch.float64)
    z, stats = anderson(f, z0, cfg)
    z_ref, res_ref, iters_ref = _reference_anderson(f, z0, cfg)
    torch.testing.assert_close(z, z_ref, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(stats.residual, res_ref, rtol=1e-6, atol=1e-14)
    assert torch.equal(stats.iters, iters_ref)


def test_anderson_matches_the_reference_with_failures():
    """A sample that turns NaN and a singular system (the retry path) give the reference's answers."""
    count = {"n": 0}
    base = _tanh_map(8, 3)

    def f(z):
        count["n"] += 1
        out = base(z)
        if count["n"] % 7 == 5:
            out[1] = float("nan")
        return out

    cfg = AndersonConfig(max_iter=20, tol=1e-12, lam=0.0)
    z0 = torch.zeros(3, 8, dtype=torch.float64)
    z, stats = anderson(f, z0, cfg)
    count["n"] = 0
    z_ref, res_ref, iters_ref = _reference_anderson(f, z0, cfg)
    torch.testing.assert_close(z, z_ref, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(stats.residual, res_ref, rtol=1e-6, atol=1e-14)
    assert torch.equal(stats.iters, iters_ref)
    const = lambda z: z + 1.0  # noqa: E731  every residual equal: H singular with lam = 0
    z, stats = anderson(const, z0, AndersonConfig(lam=0.0, max_iter=8))
    z_ref, res_ref, _ = _reference_anderson(const, z0, AndersonConfig(lam=0.0, max_iter=8))
    torch.testing.assert_close(z, z_ref)
    torch.testing.assert_close(stats.residual, res_ref)


def test_anderson_result_is_not_the_input():
    z0 = torch.zeros(2, 3)
    z, _ = anderson(lambda z: z + float("nan"), z0, AndersonConfig(max_iter=3))
    z.add_(1.0)
    assert torch.equal(z0, torch.zeros(2, 3))
