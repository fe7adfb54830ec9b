"""Tests of deqmpc_gym.systems: dynamics, analytic Jacobians, state helpers and physics sanity."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from deqmpc_gym.errors import ShapeError
from deqmpc_gym.systems import SYSTEMS, Cartpole, Pendulum, QPole, Quadrotor, get_system, kernels
from deqmpc_gym.systems.base import autodiff_jacobians
from deqmpc_gym.systems.ops import TORCH
from deqmpc_gym.systems.rotations import euler_xyz_to_mrp

NAMES = sorted(SYSTEMS)


def _random_xu(system, n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Random float64 states (non-zero MRPs with |sigma| <= 1, angles, velocities) and in-bounds controls."""
    rng = np.random.default_rng(seed)
    x = rng.uniform(-1.0, 1.0, (n, system.nx))
    for i in system.angle_indices:
        x[:, i] = rng.uniform(-math.pi, 2 * math.pi, n)
    if system.mrp_slice is not None:
        a, b = system.mrp_slice
        x[:, a:b] = euler_xyz_to_mrp(rng.uniform(-1.5, 1.5, (n, 3)))
    lo, hi = np.asarray(system.u_low), np.asarray(system.u_high)
    u = lo + (hi - lo) * rng.uniform(0.05, 0.95, (n, system.nu))
    return x, u


def _fd_jacobians(system, x: torch.Tensor, u: torch.Tensor, eps: float = 1e-6):
    """Central finite differences of ``system.step`` (float64)."""
    cols_x, cols_u = [], []
    for i in range(system.nx):
        e = torch.zeros_like(x)
        e[:, i] = eps
        cols_x.append((system.step(x + e, u) - system.step(x - e, u)) / (2 * eps))
    for j in range(system.nu):
        e = torch.zeros_like(u)
        e[:, j] = eps
        cols_u.append((system.step(x, u + e) - system.step(x, u - e)) / (2 * eps))
    return torch.stack(cols_x, -1), torch.stack(cols_u, -1)


def _quat_to_matrix(q: np.ndarray) -> np.ndarray:
    """Rotation matrices ``(n, 3, 3)`` of unit quaternions ``(n, 4)`` (scalar first), independent formula."""
    w, x, y, z = q[:, 0], q[:, 1], q[:, 2], q[:, 3]
    return np.stack([
        np.stack([1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y)], -1),
        np.stack([2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x)], -1),
        np.stack([2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y)], -1),
    ], -2)


def _mrp_to_quat(s: np.ndarray) -> np.ndarray:
    n = (s * s).sum(-1, keepdims=True)
    return np.concatenate([1 - n, 2 * s], -1) / (1 + n)


def _hamilton(p: np.ndarray, q: np.ndarray) -> np.ndarray:
    pw, pv = p[:, :1], p[:, 1:]
    qw, qv = q[:, :1], q[:, 1:]
    w = pw * qw - (pv * qv).sum(-1, keepdims=True)
    v = pw * qv + qw * pv + np.cross(pv, qv)
    return np.concatenate([w, v], -1)


# ---------------------------------------------------------------------------------------------- Jacobians
def _assert_same_step(system, a: torch.Tensor, b: torch.Tensor) -> None:
    """Bit-identical, except on the complex-step Jacobian path (small batches), which rounds once more."""
    if system.numpy_fast_path and a.shape[0] <= system.complex_step_max_batch:
        torch.testing.assert_close(a, b, rtol=4e-16, atol=4e-16)
    else:
        assert torch.equal(a, b)


@pytest.mark.parametrize("name", [n for n in NAMES if get_system(n).complex_step_max_batch > 0])
def test_complex_step_jacobians_match_the_analytic_chain_rule(name):
    """Small no-grad float64 batches take the complex-step Jacobians; they agree with the analytic ones
    (forced by a batch above the threshold, split into the same rows) to round-off."""
    system = get_system(name)
    nb = system.complex_step_max_batch
    with kernels.disabled():  # the numpy fallback paths
        _check_complex_step(system, nb)


def _check_complex_step(system, nb: int) -> None:
    xn, un = _random_xu(system, 2 * nb + 1, seed=5)
    x, u = torch.from_numpy(xn), torch.from_numpy(un)
    analytic = system.step_and_jacobians(x, u)  # above the threshold: analytic
    small = [system.step_and_jacobians(x[i:i + nb], u[i:i + nb]) for i in range(0, 2 * nb, nb)]
    for k in range(3):
        got = torch.cat([s[k] for s in small])
        want = analytic[k][: 2 * nb]
        scale = want.abs().amax().clamp_min(1.0)
        assert ((got - want).abs() / scale).max() < 1e-13
    # a complex-unsafe step would break the imaginary parts; guard the function's contract on a known map
    from deqmpc_gym.systems.base import complex_step_jacobians_numpy

    xs, As, Bs = complex_step_jacobians_numpy(lambda a, b: a * a + np.sin(b[:, :1]), np.array([[1.0, 2.0]]),
                                              np.array([[0.5]]))
    np.testing.assert_allclose(As, [[[2.0, 0.0], [0.0, 4.0]]], rtol=1e-15)
    np.testing.assert_allclose(Bs, [[[np.cos(0.5)], [np.cos(0.5)]]], rtol=1e-15)


@pytest.mark.parametrize("name", NAMES)
def test_analytic_jacobians_match_finite_differences_and_autodiff(name):
    system = get_system(name)
    xn, un = _random_xu(system, 16)
    x, u = torch.from_numpy(xn), torch.from_numpy(un)
    x_next, A, B = system.step_and_jacobians(x, u)
    assert A.shape == (16, system.nx, system.nx) and B.shape == (16, system.nx, system.nu)
    assert A.dtype == B.dtype == torch.float64
    _assert_same_step(system, x_next, system.step(x, u))
    A_fd, B_fd = _fd_jacobians(system, x, u)
    for an, fd in ((A, A_fd), (B, B_fd)):
        scale = fd.abs().amax(dim=(-2, -1), keepdim=True).clamp_min(1.0)
        assert ((an - fd).abs() / scale).max() < 1e-6
    x_ad, A_ad, B_ad = autodiff_jacobians(system, x, u)
    if kernels.kernels_for(system) is None:
        _assert_same_step(system, x_ad, x_next)
    else:  # the compiled kernel evaluates the same expressions in another order
        torch.testing.assert_close(x_ad, x_next, rtol=1e-13, atol=1e-13)
    torch.testing.assert_close(A, A_ad, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(B, B_ad, rtol=1e-10, atol=1e-10)
    A2, B2 = system.jacobians(x, u)
    assert torch.equal(A2, A) and torch.equal(B2, B)


@pytest.mark.parametrize("name", NAMES)
def test_numpy_and_torch_steps_agree_exactly(name):
    system = get_system(name)
    xn, un = _random_xu(system, 32, seed=1)
    y_np = system.step(xn, un)
    assert isinstance(y_np, np.ndarray) and y_np.dtype == np.float64
    y_t = system._step(torch.from_numpy(xn), torch.from_numpy(un), TORCH)  # the torch ops themselves
    assert np.array_equal(y_np, y_t.numpy())
    # a single unbatched state works too
    assert np.array_equal(system.step(xn[0], un[0]), y_np[0])


@pytest.fixture(params=["kernels", "numpy"])
def no_grad_path(request):
    """Run a test with the compiled kernels and again with the numpy fallback (kernels off)."""
    prev = kernels.set_enabled(request.param == "kernels")
    yield request.param
    kernels.set_enabled(prev)


@pytest.mark.parametrize("name", [n for n in NAMES if get_system(n).numpy_fast_path])
def test_no_grad_numpy_fast_path_matches_the_torch_graph_path(name, no_grad_path):
    """A float64 CPU call without autograd runs the compiled kernel (or, with kernels off, the dynamics and the
    rigid-body Jacobians on numpy); with ``requires_grad`` the torch path runs. Both give the same step and
    Jacobians (to round-off)."""
    system = get_system(name)
    xn, un = _random_xu(system, 37, seed=3)
    x, u = torch.from_numpy(xn), torch.from_numpy(un)
    fast = system.step_and_jacobians(x, u)
    graph = system.step_and_jacobians(x.clone().requires_grad_(True), u)
    assert graph[1].requires_grad and not fast[1].requires_grad
    for a, b in zip(fast, graph):
        torch.testing.assert_close(a, b.detach(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(system.step(x, u), system.step(x.clone().requires_grad_(True), u).detach(),
                               rtol=1e-12, atol=1e-12)
    _assert_same_step(system, fast[0], system.step(x, u))


@pytest.mark.parametrize("name", NAMES)
def test_float32_inputs_return_float32(name):
    system = get_system(name)
    xn, un = _random_xu(system, 8, seed=2)
    x, u = torch.from_numpy(xn).float(), torch.from_numpy(un).float()
    x_next, A, B = system.step_and_jacobians(x, u)
    assert x_next.dtype == A.dtype == B.dtype == torch.float32
    assert torch.equal(x_next, system.step(x, u))
    _, A64, B64 = system.step_and_jacobians(x.double(), u.double())
    torch.testing.assert_close(A.double(), A64, rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(B.double(), B64, rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("name", NAMES)
def test_jacobians_are_differentiable(name):
    system = get_system(name)
    xn, un = _random_xu(system, 2, seed=3)
    x = torch.from_numpy(xn).requires_grad_(True)
    u = torch.from_numpy(un).requires_grad_(True)
    gen = torch.Generator().manual_seed(0)
    wa = torch.randn(2, system.nx, system.nx, generator=gen, dtype=torch.float64)
    wb = torch.randn(2, system.nx, system.nu, generator=gen, dtype=torch.float64)

    def f(x, u):
        xn_, A, B = system.step_and_jacobians(x, u)
        return (A * wa).sum() + (B * wb).sum() + xn_.sum()

    assert torch.autograd.gradcheck(f, (x, u), eps=1e-6, atol=1e-5, rtol=1e-4)
    # the analytic graph gives the same gradient as differentiating the autodiff Jacobians
    g_an = torch.autograd.grad(f(x, u), (x, u))

    def f_ad(x, u):
        xn_, A, B = autodiff_jacobians(system, x, u)
        return (A * wa).sum() + (B * wb).sum() + xn_.sum()

    g_ad = torch.autograd.grad(f_ad(x, u), (x, u))
    for a, b in zip(g_an, g_ad):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-8)


@pytest.mark.parametrize("name", NAMES)
def test_wrong_shapes_raise(name):
    system = get_system(name)
    x = torch.zeros(3, system.nx, dtype=torch.float64)
    u = torch.zeros(3, system.nu, dtype=torch.float64)
    with pytest.raises(ShapeError):
        system.step(torch.zeros(3, system.nx + 1, dtype=torch.float64), u)
    with pytest.raises(ShapeError):
        system.step(x, torch.zeros(2, system.nu, dtype=torch.float64))
    with pytest.raises(ShapeError):
        system.step_and_jacobians(x, torch.zeros(3, system.nu + 1, dtype=torch.float64))
    with pytest.raises(ShapeError):
        system.step_and_jacobians(x[0], u[0])  # unbatched
    with pytest.raises(ShapeError):
        system.step_and_jacobians(x.numpy(), u.numpy())
    with pytest.raises(ShapeError):
        system.step_and_jacobians(x, u.numpy())


# ---------------------------------------------------------------------------------------------- state helpers
@pytest.mark.parametrize("name", NAMES)
def test_wrap_angles_and_mrps(name):
    system = get_system(name)
    rng = np.random.default_rng(4)
    x = rng.uniform(-3.0, 3.0, (200, system.nx))
    for i in system.angle_indices:
        x[:, i] = rng.uniform(-20.0, 20.0, 200)
    if system.mrp_slice is not None:
        a, b = system.mrp_slice
        x[:, a:b] = rng.uniform(-3.0, 3.0, (200, 3))  # many with |sigma| > 1
    for arr in (x, torch.from_numpy(x)):
        w = system.wrap(arr)
        w = w.numpy() if isinstance(w, torch.Tensor) else w
        assert type(system.wrap(arr)) is type(arr)
        for i in system.angle_indices:
            g = system.goal[i]
            assert np.all(np.abs(w[:, i] - g) <= math.pi + 1e-12)
            assert np.allclose(np.cos(w[:, i]), np.cos(x[:, i])) and np.allclose(np.sin(w[:, i]), np.sin(x[:, i]))
        if system.mrp_slice is not None:
            a, b = system.mrp_slice
            assert np.all(np.linalg.norm(w[:, a:b], axis=-1) <= 1.0 + 1e-12)
            np.testing.assert_allclose(_quat_to_matrix(_mrp_to_quat(w[:, a:b])),
                                       _quat_to_matrix(_mrp_to_quat(x[:, a:b])), atol=1e-12)
        others = [i for i in range(system.nx) if i not in system.angle_indices
                  and not (system.mrp_slice and system.mrp_slice[0] <= i < system.mrp_slice[1])]
        assert np.array_equal(w[:, others], x[:, others])


def test_euler_xyz_to_mrp_matches_hamilton_product():
    rng = np.random.default_rng(5)
    e = rng.uniform(-math.pi, math.pi, (500, 3))
    sigma = euler_xyz_to_mrp(e)
    assert np.all(np.linalg.norm(sigma, axis=-1) <= 1.0 + 1e-12)

    def axis_quat(angle, k):
        q = np.zeros((len(angle), 4))
        q[:, 0] = np.cos(angle / 2)
        q[:, 1 + k] = np.sin(angle / 2)
        return q

    q = _hamilton(_hamilton(axis_quat(e[:, 0], 0), axis_quat(e[:, 1], 1)), axis_quat(e[:, 2], 2))
    q = np.where(q[:, :1] < 0, -q, q)
    q_from_sigma = _mrp_to_quat(sigma)
    assert np.all(q_from_sigma[:, 0] >= 0.0)
    np.testing.assert_allclose(q_from_sigma, q, atol=1e-12)
    # and the rotation is R_x(e1) R_y(e2) R_z(e3)
    c, s = np.cos(e[0]), np.sin(e[0])
    Rx = np.array([[1, 0, 0], [0, c[0], -s[0]], [0, s[0], c[0]]])
    Ry = np.array([[c[1], 0, s[1]], [0, 1, 0], [-s[1], 0, c[1]]])
    Rz = np.array([[c[2], -s[2], 0], [s[2], c[2], 0], [0, 0, 1]])
    np.testing.assert_allclose(_quat_to_matrix(q_from_sigma[:1])[0], Rx @ Ry @ Rz, atol=1e-12)


# ---------------------------------------------------------------------------------------------- physics sanity
def test_pendulum_energy_is_bounded_without_drift():
    system = Pendulum()
    x = np.array([2.0, 0.0])
    u = np.zeros(1)
    energies = []
    for _ in range(2000):
        x = system.step(x, u)
        energies.append(0.5 * x[1] ** 2 + 10.0 * math.cos(x[0]))
    e = np.asarray(energies)
    e0 = 10.0 * math.cos(2.0)
    assert np.abs(e - e0).max() < 0.5  # bounded oscillation of the symplectic integrator
    assert abs(e[:200].mean() - e[-200:].mean()) < 0.05  # no secular drift
    assert np.abs(x[0]) < 10.0  # never went over the top


def test_quadrotor_hovers_at_origin():
    system = Quadrotor()
    x = torch.zeros(1, 12, dtype=torch.float64)
    u = system.tensor("u_nominal", x).expand(1, 4)
    for _ in range(100):
        x = system.step(x, u)
    assert x.abs().max() < 1e-9


def test_qpole_pole_falls_while_quad_hovers():
    system = QPole()
    x = torch.zeros(1, 14, dtype=torch.float64)
    x[0, 6] = math.pi + 0.01
    u = torch.zeros(1, 4, dtype=torch.float64)
    fell = False
    for _ in range(round(3.0 / system.dt)):
        x = system.step(x, u)
        fell = fell or abs(x[0, 6].item() - math.pi) > 1.0
    assert fell
    quad = torch.cat([x[0, :6], x[0, 7:13]])
    assert quad.abs().max() < 1e-9


def test_cartpole_hanging_stays_at_rest():
    system = Cartpole()
    x0 = torch.tensor([[0.0, math.pi, 0.0, 0.0]], dtype=torch.float64)
    x, u = x0, torch.zeros(1, 1, dtype=torch.float64)
    for _ in range(200):
        x = system.step(x, u)
    assert (x - x0).abs().max() < 1e-9


@pytest.mark.parametrize("name", [n for n in NAMES if get_system(n).numpy_fast_path])
def test_numpy_fast_path_overflows_to_nan_without_warnings(name):
    """Like the torch path, an overflowing no-grad numpy step returns inf/nan silently (the solver handles it)."""
    import warnings

    system = get_system(name)
    x = torch.full((2, system.nx), 1e200, dtype=torch.float64)
    u = torch.zeros(2, system.nu, dtype=torch.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        y = system.step(x, u)
        _, A, _ = system.step_and_jacobians(x, u)
    assert not bool(torch.isfinite(y).all()) and not bool(torch.isfinite(A).all())
