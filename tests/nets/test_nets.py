"""Tests of deqmpc_gym.nets: fixed-point solvers and the TCN networks."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from deqmpc_gym.errors import ConfigError, ShapeError
from deqmpc_gym.nets import (
    DEQTCN,
    AndersonConfig,
    FeedForwardTCN,
    NetConfig,
    NetOutput,
    anderson,
    build_network,
    fixed_point_iter,
    get_solver,
    register_solver,
    shift_latent,
    solver_names,
)

NX, NQ, T, H, B = 4, 2, 5, 16, 3


def _cfg(**kw) -> NetConfig:
    base = dict(nx=NX, nq=NQ, dt=0.05, T=T, hidden=H)
    base.update(kw)
    return NetConfig(**base)


def _inputs(b: int = B, nx: int = NX, t: int = T, dtype=torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    x0 = torch.randn(b, nx, dtype=dtype)
    x_prev = x0[:, None].repeat(1, t, 1) + 0.3 * torch.randn(b, t, nx, dtype=dtype)
    return x0, x_prev


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


# ----------------------------------------------------------------------------------------- networks


@pytest.mark.parametrize("kind", ["nn", "deq"])
@pytest.mark.parametrize("train", [True, False])
def test_shapes_and_first_knot(kind, train):
    net = build_network(_cfg(kind=kind)).train(train)
    assert isinstance(net, FeedForwardTCN if kind == "nn" else DEQTCN)
    x0, x_prev = _inputs()
    out = net(x0, x_prev)
    assert isinstance(out, NetOutput)
    assert out.theta.shape == (B, T, NX) and out.theta.dtype == torch.float32
    assert out.z.shape == (B, H, T - 1) and not out.z.requires_grad
    assert torch.equal(out.theta[:, 0], x0)
    assert torch.isfinite(out.theta).all()
    if kind == "deq":
        assert out.stats.residual.shape == (B,) and out.stats.iters.shape == (B,)
        assert out.stats.converged.dtype == torch.bool
    else:
        assert out.stats is None


def test_output_parameterisation_and_state_scale():
    cfg = _cfg(kind="nn")
    scale = (1.0, 2.0, 3.0, 4.0)
    net, scaled = build_network(cfg).eval(), build_network(dataclasses.replace(cfg, state_scale=scale)).eval()
    scaled.load_state_dict(net.state_dict())
    x0, x_prev = _inputs()
    with torch.no_grad():
        th, th_s = net(x0, x_prev).theta, scaled(x0, x_prev).theta
        o = net.head(net(x0, x_prev).z).transpose(1, 2)
    base = x_prev[:, :1, :NQ]
    torch.testing.assert_close(th[:, 1:, :NQ], base + cfg.dt * o[..., :NQ])
    torch.testing.assert_close(th[:, 1:, NQ:], o[..., NQ:])
    torch.testing.assert_close(th_s[:, 1:, NQ:], o[..., NQ:] * torch.tensor(scale[NQ:]))
    torch.testing.assert_close(th_s[:, 1:, :NQ], base + cfg.dt * o[..., :NQ] * torch.tensor(scale[:NQ]))


def test_input_normalisation():
    center, scale = (1.0, -2.0, 0.5, 0.0), (10.0, 2.0, 1.0, 4.0)
    plain = build_network(_cfg(kind="deq"))
    normed = build_network(_cfg(kind="deq", state_center=center, input_scale=scale))
    normed.load_state_dict(plain.state_dict())
    x0, x_prev = _inputs()
    c, s = torch.tensor(center), torch.tensor(scale)
    with torch.no_grad():
        torch.testing.assert_close(normed.encode(x0, x_prev), plain.encode((x0 - c) / s, (x_prev - c) / s))


@pytest.mark.parametrize(
    "kind,grad", [("nn", "phantom"), ("deq", "phantom"), ("deq", "ift")]
)
def test_gradients_reach_all_parameters(kind, grad):
    net = build_network(_cfg(kind=kind, deq_grad=grad)).train()
    x0, x_prev = _inputs()
    x0.requires_grad_()
    out = net(x0, x_prev)
    (out.theta[:, 1:] ** 2).sum().backward()
    for name, p in net.named_parameters():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name
    assert x0.grad is not None and x0.grad[:, :].abs().sum() > 0


def test_eval_mode_skips_extra_steps():
    net = build_network(_cfg(kind="deq")).eval()
    x0, x_prev = _inputs()
    out = net(x0, x_prev)
    (out.theta ** 2).sum().backward()
    assert net.conv1.weight.grad is None  # only the head and nothing inside f
    assert net.head[0].weight.grad is not None


def test_dtype_follows_parameters():
    net = build_network(_cfg(kind="deq")).double()
    x0, x_prev = _inputs()
    out = net(x0, x_prev)
    assert out.theta.dtype == torch.float64 and out.z.dtype == torch.float64
    assert torch.equal(out.theta[:, 0], x0.double())


@pytest.mark.parametrize("batch, length", [(1, 4), (2, 4), (3, 1), (8, 4)])
@pytest.mark.parametrize("kernel, bias", [(3, True), (1, True), (5, False)])
def test_small_input_conv_matches_library_conv(batch, length, kernel, bias):
    """The im2col matrix-product path used for small inputs equals nn.Conv1d (values and gradients)."""
    from deqmpc_gym.nets.tcn import _MATMUL_CONV_MAX_POSITIONS, _SameConv1d

    conv = _SameConv1d(6, 5, kernel, padding=kernel // 2, bias=bias).double()
    ref = torch.nn.Conv1d(6, 5, kernel, padding=kernel // 2, bias=bias).double()
    ref.load_state_dict(conv.state_dict())
    x = torch.randn(batch, 6, length, dtype=torch.float64, requires_grad=True)
    assert (batch * length < _MATMUL_CONV_MAX_POSITIONS) == (batch * length < 16)
    y, y_ref = conv(x), ref(x)
    assert y.shape == y_ref.shape == (batch, 5, length)
    torch.testing.assert_close(y, y_ref, rtol=1e-12, atol=1e-12)
    g = torch.randn_like(y)
    grads = torch.autograd.grad(y, [x, conv.weight], g)
    grads_ref = torch.autograd.grad(y_ref, [x, ref.weight], g)
    for a, b_ in zip(grads, grads_ref):
        torch.testing.assert_close(a, b_, rtol=1e-12, atol=1e-12)


def test_shift_latent():
    z = torch.arange(2 * 3 * 4, dtype=torch.float32).reshape(2, 3, 4)
    s = shift_latent(z)
    assert torch.equal(s[..., :3], z[..., 1:]) and torch.equal(s[..., 3], z[..., 3])
    with pytest.raises(ShapeError):
        shift_latent(torch.zeros(2, 3))


@pytest.mark.parametrize("hidden", [64, 128])
def test_deq_converges_at_init(hidden):
    """At initialisation the default 10 Anderson steps do NOT reach rel 1e-2; ~15-25 (max ~50) do."""
    x0, x_prev = _inputs(b=8)
    default = build_network(_cfg(kind="deq", hidden=hidden)).eval()
    long = build_network(_cfg(kind="deq", hidden=hidden, anderson=AndersonConfig(max_iter=60))).eval()
    long.load_state_dict(default.state_dict())
    with torch.no_grad():
        s10, s60 = default(x0, x_prev).stats, long(x0, x_prev).stats
    print(f"h={hidden}: 10 iters max rel {s10.residual.max():.3g}; "
          f"60 iters converged {s60.converged.all().item()} mean iters {s60.iters.float().mean():.1f} "
          f"max {s60.iters.max().item()} max rel {s60.residual.max():.3g}")
    assert s10.residual.max() < 0.1
    assert s60.converged.all()


def test_warm_start_needs_fewer_iterations():
    net = build_network(_cfg(kind="deq", hidden=64, anderson=AndersonConfig(max_iter=60))).eval()
    x0, x_prev = _inputs(b=8)
    with torch.no_grad():
        cold = net(x0, x_prev)
        warm = net(x0, x_prev, cold.z)
    assert warm.stats.converged.all()
    assert (warm.stats.iters < cold.stats.iters).all()
    assert (warm.stats.iters == 1).all()  # z* already satisfies tol


def _flat_grads(net, x0) -> torch.Tensor:
    return torch.cat([p.grad.reshape(-1) for p in net.parameters()] + [x0.grad.reshape(-1)])


def _loss_grads(net, x0, x_prev, w) -> torch.Tensor:
    net.zero_grad()
    x0 = x0.clone().requires_grad_()
    (net(x0, x_prev).theta * w).sum().backward()
    return _flat_grads(net, x0)


def test_ift_gradient_matches_references():
    tight = AndersonConfig(max_iter=300, tol=1e-13, lam=1e-14)
    base = dict(kind="deq", nx=2, nq=1, T=3, hidden=8, anderson=tight, solver="fixed_point_iter")
    ift = build_network(_cfg(**base, deq_grad="ift", ift_max_iter=300, ift_tol=1e-13)).double().train()
    unrolled = build_network(_cfg(**base, deq_grad="phantom", phantom_steps=200)).double().train()
    unrolled.load_state_dict(ift.state_dict())
    x0, x_prev = _inputs(b=2, nx=2, t=3, dtype=torch.float64)
    w = torch.randn(2, 3, 2, dtype=torch.float64)
    g_ift, g_ref = _loss_grads(ift, x0, x_prev, w), _loss_grads(unrolled, x0, x_prev, w)
    assert (g_ift - g_ref).norm() / g_ref.norm() < 1e-6
    # central finite difference of the eval-mode loss along a random parameter direction
    params = list(ift.parameters())
    dirs = [torch.randn_like(p) for p in params]
    directional = sum((p.grad * d).sum() for p, d in zip(params, dirs))
    ift.eval()
    eps, losses = 1e-6, []
    with torch.no_grad():
        for sign in (1.0, -1.0):
            for p, d in zip(params, dirs):
                p.add_(sign * eps * d)
            losses.append((ift(x0, x_prev).theta * w).sum())
            for p, d in zip(params, dirs):
                p.sub_(sign * eps * d)
    fd = (losses[0] - losses[1]) / (2 * eps)
    assert abs(fd - directional) / abs(fd) < 1e-4


# ------------------------------------------------------------------------------------------- errors


@pytest.mark.parametrize("kind", ["nn", "deq"])
def test_bad_shapes_raise(kind):
    net = build_network(_cfg(kind=kind))
    x0, x_prev = _inputs()
    bad_calls = [
        (torch.zeros(B, NX + 1), x_prev, None),
        (x0, torch.zeros(B, T + 1, NX), None),
        (x0, torch.zeros(B + 1, T, NX), None),
        (x0[0], x_prev, None),
        (x0, x_prev, torch.zeros(B, H, T)),
        (x0, x_prev, torch.zeros(B, H + 1, T - 1)),
    ]
    for args in bad_calls:
        with pytest.raises(ShapeError):
            net(*args)
    with pytest.raises(ShapeError, match="x_prev"):
        net(x0, torch.zeros(B, T + 1, NX))


@pytest.mark.parametrize(
    "kw",
    [
        dict(hidden=10),
        dict(T=1),
        dict(kind="mlp"),
        dict(deq_grad="jfb"),
        dict(nq=NX + 1),
        dict(nq=-1),
        dict(dt=0.0),
        dict(kernel=4),
        dict(phantom_steps=0),
        dict(ift_max_iter=0),
        dict(nx=0, nq=0),
        dict(hidden=16.0),
        dict(state_scale=(1.0, 1.0)),
        dict(input_scale=(1.0, 0.0, 1.0, 1.0)),
        dict(state_center=(float("nan"), 0.0, 0.0, 0.0)),
        dict(anderson={"m": 5}),
        dict(solver="broyden"),
    ],
)
def test_invalid_net_config(kw):
    with pytest.raises(ConfigError):
        _cfg(**kw)


@pytest.mark.parametrize(
    "kw",
    [dict(m=0), dict(max_iter=0), dict(tol=0.0), dict(beta=0.0), dict(beta=1.5), dict(lam=-1.0), dict(stop_mode="x")],
)
def test_invalid_anderson_config(kw):
    with pytest.raises(ConfigError):
        AndersonConfig(**kw)


def test_build_network_rejects_non_config():
    with pytest.raises(ConfigError):
        build_network({"nx": 4})


def test_solver_registry():
    with pytest.raises(ConfigError, match="anderson"):
        get_solver("nope")
    calls = []

    def my_solver(f, z0, config):
        calls.append(1)
        return fixed_point_iter(f, z0, config)

    register_solver("test_custom", my_solver)
    assert "test_custom" in solver_names() and get_solver("test_custom") is my_solver
    net = build_network(_cfg(kind="deq", solver="test_custom"))
    net(*_inputs())
    assert calls


# ------------------------------------------------------------------------------------------ solvers


def _linear_problem(n: int = 32, rho: float = 0.9, b: int = 4):
    q, _ = torch.linalg.qr(torch.randn(n, n, dtype=torch.float64))
    a = q @ torch.diag(torch.linspace(-rho, rho, n, dtype=torch.float64)) @ q.T
    c = torch.randn(b, n, dtype=torch.float64)
    exact = torch.linalg.solve(torch.eye(n, dtype=torch.float64) - a, c.T).T
    return (lambda z: z @ a.T + c), c, exact


@pytest.mark.parametrize("solver", [anderson, fixed_point_iter])
def test_linear_contraction_matches_closed_form(solver):
    f, c, exact = _linear_problem()
    cfg = AndersonConfig(max_iter=400, tol=1e-12, lam=0.0)  # an absolute lam > 0 stalls once |G|^2 ~ lam
    z, stats = solver(f, torch.zeros_like(c), cfg)
    assert stats.converged.all()
    torch.testing.assert_close(z, exact, atol=1e-6, rtol=0)


def test_anderson_beats_plain_iteration_on_linear():
    f, c, _ = _linear_problem(rho=0.95)
    cfg = AndersonConfig(max_iter=20, tol=1e-12, lam=1e-14)
    res_a = anderson(f, torch.zeros_like(c), cfg)[1].residual
    res_p = fixed_point_iter(f, torch.zeros_like(c), cfg)[1].residual
    assert (res_a < 0.2 * res_p).all()


def test_anderson_multidim_and_abs_mode():
    f, c, exact = _linear_problem(n=24)
    shaped = lambda z: f(z.reshape(4, 24)).reshape(4, 2, 3, 4)  # noqa: E731
    cfg = AndersonConfig(max_iter=200, tol=1e-10, lam=0.0, stop_mode="abs")
    z, stats = anderson(shaped, torch.zeros(4, 2, 3, 4, dtype=torch.float64), cfg)
    assert z.shape == (4, 2, 3, 4) and stats.converged.all()
    torch.testing.assert_close(z.reshape(4, 24), exact, atol=1e-8, rtol=0)


@pytest.mark.parametrize(
    "solver,f,mode",
    [
        (fixed_point_iter, lambda z: 2 * z + 1, "rel"),  # repelling fixed point -1 (Anderson solves affine maps)
        # no fixed point at all; "abs" because the rel residual of a diverging iterate shrinks like 1/|z|
        (anderson, lambda z: z + 1 + 0.5 * torch.cos(3 * z) ** 2, "abs"),
        (anderson, lambda z: 2 * z + 1 + torch.sin(5 * z), "rel"),  # repelling, non-affine
    ],
)
def test_non_contractive_returns_best_finite(solver, f, mode):
    # from some starts Anderson's extrapolation throws an iterate out to |z| ~ 1e16, where float64 absorbs
    # z + 1 == z, the residual vanishes and the sample is rightly flagged converged (float32 would absorb it once
    # |z| ~ 1e7); which starts do depends on the CPU's rounding (seed 3 here: none on an AVX-512 machine, one on an
    # AVX2 one), so only samples that stayed where float64 resolves the map must be flagged unconverged
    z0 = torch.randn(3, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    z, stats = solver(f, z0, AndersonConfig(max_iter=30, stop_mode=mode))
    resolved = z.abs().amax(1) < 1e15
    assert torch.isfinite(z).all() and bool(resolved.any()) and not (stats.converged & resolved).any()
    assert stats.iters.dtype == torch.int64
    # the returned iterate is the one whose residual is reported
    res = (f(z) - z).norm(dim=1)
    if mode == "rel":
        res = res / (1e-5 + f(z).norm(dim=1))
    torch.testing.assert_close(res, stats.residual)


@pytest.mark.parametrize("solver", [anderson, fixed_point_iter])
def test_nan_producing_map_keeps_best_finite(solver):
    count = {"n": 0}

    def f(z):
        count["n"] += 1
        out = 0.5 * z + 1.0
        if count["n"] >= 3:
            out[0] = float("nan")  # sample 0 blows up; sample 1 keeps contracting
        return out

    z, stats = solver(f, torch.zeros(2, 4), AndersonConfig(max_iter=40, tol=1e-4))
    assert torch.isfinite(z).all() and torch.isfinite(stats.residual).all()
    assert stats.converged[1] and not stats.converged[0]
    torch.testing.assert_close(z[1], torch.full((4,), 2.0), atol=1e-3, rtol=0)


def test_singular_anderson_system_does_not_raise():
    f = lambda z: z + 1.0  # noqa: E731  G = 1 for every history entry -> singular H with lam=0
    z, stats = anderson(f, torch.zeros(2, 3), AndersonConfig(lam=0.0, max_iter=8))
    assert torch.isfinite(z).all() and torch.isfinite(stats.residual).all()
    assert not stats.converged.any()


def test_bad_z0_raises():
    with pytest.raises(ShapeError):
        anderson(lambda z: z, torch.zeros(()), AndersonConfig())
    with pytest.raises(ShapeError):
        anderson(lambda z: z[:, :2], torch.zeros(2, 3), AndersonConfig())
