"""The :class:`System` base class: one source of truth for a controlled system's physics and task.

A system bundles

* the discrete dynamics ``x_{k+1} = f(x_k, u_k)`` (:meth:`System.step`), batched over leading dimensions,
  in numpy (used by the single Gymnasium env) or torch (batched envs, MPC, training), float32 or float64;
* its Jacobians ``A = df/dx`` and ``B = df/du`` of the *discrete* map (:meth:`System.jacobians`),
  computed by reverse-mode autodiff (:func:`autodiff_jacobians`) unless the subclass provides them
  analytically (:meth:`System._step_and_jacobians`; RK4 systems via :meth:`System.continuous_jacobians` and
  :func:`rk4_with_jacobians`);
* physical control bounds, default MPC weights ``Q``/``R`` (paper values), the goal, angle coordinates;
* the task used by the env shell: initial-state distribution, reward weights, success tolerance and an
  optional flight volume.

Defining a new system
---------------------
Subclass :class:`System`, set the class attributes and implement :meth:`System._step` with the ``ops``
namespace (``ops.sin``, ``ops.cos``, ``ops.sqrt``, ``ops.stack``) so the same code runs on numpy and torch::

    class DoubleIntegrator(System):
        name = "double_integrator"
        nx, nu, nq, dt = 2, 1, 1, 0.1
        state_names = ("p", "v"); control_names = ("a",)
        u_low, u_high = (-1.0,), (1.0,)
        Q_diag, R_diag = (10.0, 1.0), (1e-3,)
        goal = (0.0, 0.0)
        init_low, init_high = (-2.0, -1.0), (2.0, 1.0)
        reward_weights, effort_weights = (1.0, 0.1), (0.01,)
        success_tolerance = (0.05, 0.1)

        def _step(self, x, u, ops):
            v = x[..., 1] + self.dt * u[..., 0]
            return ops.stack([x[..., 0] + self.dt * v, v])

Such a system plugs into :class:`deqmpc_gym.envs.SystemEnv`, the MPC solver and the policy unchanged.

Shapes: ``x`` is ``(..., nx)`` and ``u`` is ``(..., nu)`` with the same leading dimensions (``B`` for a batch).
Units are SI (m, rad, s, N, N m) unless a system documents otherwise.
"""

from __future__ import annotations

import math
from functools import cached_property
from typing import Any, ClassVar

import numpy as np
import torch

from deqmpc_gym.errors import ShapeError
from deqmpc_gym.systems import kernels
from deqmpc_gym.systems.ops import NUMPY, TORCH, ops_for


class System:
    """Base class of a controlled discrete-time system (see the module docstring for how to subclass).

    Class attributes (tuples of python floats so that the class is immutable and device-free):

    * ``nx``, ``nu``: state and control sizes; ``nq``: the number of configuration ("position") coordinates,
      which come first in the state; ``dt``: the time step [s].
    * ``u_low``, ``u_high``: ``(nu,)`` physical control bounds.
    * ``Q_diag``, ``R_diag``: ``(nx,)``, ``(nu,)`` default MPC tracking weights (the paper's values).
    * ``goal``: ``(nx,)`` goal state.
    * ``angle_indices``: state indices that are angles; they are wrapped into ``goal +- pi``.
    * ``mrp_slice``: ``(start, stop)`` of an MRP attitude, switched to the shadow set when ``|sigma| > 1``.
    * ``position_slice``: ``(start, stop)`` of the 3-D position used for obstacles, or ``None``.
    * ``init_low``, ``init_high``: ``(nx,)`` box of the default initial-state distribution.
    * ``reward_weights``, ``effort_weights``: ``(nx,)``, ``(nu,)`` weights of the env reward
      ``r = exp(-1/2 sum_i w_i (x_i - g_i)^2 - 1/2 sum_j e_j a_j^2)`` with ``a`` the normalized action
      deviation from ``u_nominal``; ``r`` is in ``(0, 1]`` and equals 1 at the goal with nominal control.
    * ``success_tolerance``: ``(nx,)`` per-coordinate tolerance of "goal reached" (``inf`` = untracked).
    * ``flight_bound``: a state is out of the flight volume when ``|position| > flight_bound`` on any axis
      (``None``: no flight volume).
    * ``state_envelope``: ``(nx,)`` bounds on ``|x_i - goal_i|`` beyond which the vehicle is out of control
      (the env terminates; ``inf`` = unbounded; ``None`` = no envelope). For the quadrotors it bounds the
      position by ``flight_bound``, speeds by 50 m/s and body rates by 30 rad/s (beyond these the RK4 step at
      ``dt = 0.05`` is no longer an accurate model of the vehicle).
    * ``u_nominal``: ``(nu,)`` nominal control (hover for quadrotors; default zeros).
    """

    name: ClassVar[str] = "system"
    nx: ClassVar[int]
    nu: ClassVar[int]
    nq: ClassVar[int]
    dt: ClassVar[float]
    state_names: ClassVar[tuple[str, ...]] = ()
    control_names: ClassVar[tuple[str, ...]] = ()
    u_low: ClassVar[tuple[float, ...]]
    u_high: ClassVar[tuple[float, ...]]
    u_nominal: ClassVar[tuple[float, ...] | None] = None
    Q_diag: ClassVar[tuple[float, ...]]
    R_diag: ClassVar[tuple[float, ...]]
    goal: ClassVar[tuple[float, ...]]
    angle_indices: ClassVar[tuple[int, ...]] = ()
    mrp_slice: ClassVar[tuple[int, int] | None] = None
    position_slice: ClassVar[tuple[int, int] | None] = None
    init_low: ClassVar[tuple[float, ...]]
    init_high: ClassVar[tuple[float, ...]]
    reward_weights: ClassVar[tuple[float, ...]]
    effort_weights: ClassVar[tuple[float, ...]]
    success_tolerance: ClassVar[tuple[float, ...]]
    flight_bound: ClassVar[float | None] = None
    state_envelope: ClassVar[tuple[float, ...] | None] = None
    #: evaluate no-grad float64 CPU calls of :meth:`step` (and, where a subclass supports it,
    #: :meth:`step_and_jacobians`) with numpy: worth it for dynamics of hundreds of small operations (the
    #: quadrotors: 2-3x; the cart-pole's RK4 with Jacobians: 3-4x up to B ~ 800), not for a handful (pendulum).
    numpy_fast_path: ClassVar[bool] = False
    #: largest batch whose RK4 Jacobians take the numpy path (above it torch's kernels are faster;
    #: benchmarks/jacobians.py: the quadrotors cross over near B = 700, the cart-pole near B = 1500)
    numpy_jacobian_max_batch: ClassVar[int] = 512
    #: largest batch whose RK4 Jacobians on the numpy path are taken by the complex step (one complex RK4 step
    #: of ``nx + nu`` perturbed copies, :func:`complex_step_jacobians_numpy`) instead of the analytic chain rule:
    #: fewer numpy calls, so cheaper while per-call overhead dominates (a warm ``act()``); 0 disables it.
    complex_step_max_batch: ClassVar[int] = 0

    # ------------------------------------------------------------------ dynamics
    def _step(self, x: Any, u: Any, ops: Any) -> Any:
        """Discrete dynamics on ``x: (..., nx)``, ``u: (..., nu)`` with the array namespace ``ops``."""
        raise NotImplementedError

    def step(self, x: Any, u: Any) -> Any:
        """One discrete step ``x_next = f(x, u)``.

        Args:
            x: ``(..., nx)`` state, numpy array or torch tensor (float32 or float64).
            u: ``(..., nu)`` physical control of the same type and leading shape.

        Returns:
            ``(..., nx)`` next state, same type and dtype as ``x`` (angles are *not* wrapped; see :meth:`wrap`).

        On systems with :attr:`numpy_fast_path`, a float64 CPU tensor call that needs no autograd graph evaluates
        the same expressions on numpy (a few times cheaper per operation at small batches) and returns a tensor;
        otherwise the torch ops run.
        """
        self._check_xu(x, u)
        if numpy_eligible(x, u) and x.shape[:-1] == u.shape[:-1] and (k := kernels.kernels_for(self)) is not None:
            return torch.from_numpy(k.step(_rows(x), _rows(u)).reshape(x.shape))
        if self.numpy_fast_path and numpy_eligible(x, u):
            # No graph needed on a CPU tensor: numpy evaluates the same elementwise expressions with a
            # several-times smaller per-operation overhead (this dominates at the small batches of act()).
            with np.errstate(over="ignore", invalid="ignore", divide="ignore"):  # torch semantics: inf/nan, no warning
                return torch.from_numpy(self._step(x.numpy(), u.numpy(), NUMPY))
        return self._step(x, u, ops_for(x))

    def jacobians(self, x: torch.Tensor, u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Jacobians of the discrete map.

        Args:
            x: ``(B, nx)`` torch state; u: ``(B, nu)`` torch control.

        Returns:
            ``A: (B, nx, nx) = df/dx`` and ``B: (B, nx, nu) = df/du`` (differentiable w.r.t. ``x``, ``u``).
        """
        _, A, B = self.step_and_jacobians(x, u)
        return A, B

    def step_and_jacobians(
        self, x: torch.Tensor, u: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(x_next (B, nx), A (B, nx, nx), B (B, nx, nu))`` for torch ``x: (B, nx)``, ``u: (B, nu)``.

        The default uses reverse-mode autodiff on ``nx`` replicas of the batch (:func:`autodiff_jacobians`);
        subclasses may override it with analytic Jacobians. The result is differentiable w.r.t. ``x`` and ``u``
        when they require grad.
        """
        if not isinstance(x, torch.Tensor) or x.dim() != 2:
            raise ShapeError(f"x must be a torch tensor of shape (B, {self.nx}), got {type(x).__name__} "
                             f"{tuple(getattr(x, 'shape', ()))}")
        if not isinstance(u, torch.Tensor) or u.dim() != 2:
            raise ShapeError(f"u must be a torch tensor of shape (B, {self.nu}), got {type(u).__name__} "
                             f"{tuple(getattr(u, 'shape', ()))}")
        self._check_xu(x, u)
        if numpy_eligible(x, u) and (k := kernels.kernels_for(self)) is not None:
            return tuple(torch.from_numpy(a) for a in k.step_and_jacobians(_rows(x), _rows(u)))  # type: ignore
        return self._step_and_jacobians(x, u)

    def _deriv_and_jac(self, x: Any, u: Any) -> Any:
        """Continuous dynamics and Jacobians ``(x_dot (B, nx), [dx_dot/dx | dx_dot/du] (B, nx, nx + nu))`` on torch
        tensors or numpy arrays (for :meth:`_rk4_step_and_jacobians`); optional."""
        raise NotImplementedError

    def _rk4_step_and_jacobians(
        self, x: torch.Tensor, u: torch.Tensor, n_free: int
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """RK4 step and Jacobians from :meth:`_deriv_and_jac` (see :func:`rk4_with_jacobians`), on numpy when
        :attr:`numpy_fast_path` allows it for these inputs."""
        if self.numpy_fast_path and x.shape[0] <= self.numpy_jacobian_max_batch and numpy_eligible(x, u):
            with np.errstate(over="ignore", invalid="ignore", divide="ignore"):  # as torch: inf/nan, no warning
                if x.shape[0] <= self.complex_step_max_batch:
                    out = complex_step_jacobians_numpy(lambda a, b: self._step(a, b, NUMPY), x.numpy(), u.numpy())
                else:
                    out = rk4_with_jacobians_numpy(self._deriv_and_jac, x.numpy(), u.numpy(), self.dt,
                                                   n_free=n_free)
            return tuple(torch.from_numpy(a) for a in out)  # type: ignore[return-value]
        return rk4_with_jacobians(self._deriv_and_jac, x, u, self.dt, n_free=n_free)

    def _step_and_jacobians(
        self, x: torch.Tensor, u: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Hook behind :meth:`step_and_jacobians` (inputs already validated); default: :func:`autodiff_jacobians`.

        Override it with analytic Jacobians. ``x_next`` must equal :meth:`step` bit for bit (the complex-step
        path of :meth:`_rk4_step_and_jacobians`, for batches up to :attr:`complex_step_max_batch`, equals it up to
        one rounding). An RK4 system only
        needs :meth:`continuous_jacobians` and::

            def _step_and_jacobians(self, x, u):
                return rk4_with_jacobians(self.continuous_jacobians, x, u, self.dt)
        """
        return autodiff_jacobians(self, x, u)

    def continuous_jacobians(
        self, x: torch.Tensor, u: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Optional hook for continuous-time systems ``x_dot = g(x, u)`` integrated by RK4.

        Args:
            x: ``(B, nx)`` torch state; u: ``(B, nu)`` torch control.

        Returns:
            ``g (B, nx)`` (bit-identical to what ``_step`` evaluates at that point), ``Gx = dg/dx (B, nx, nx)``
            and ``Gu = dg/du (B, nx, nu)``, built from differentiable torch ops. Used through
            :func:`rk4_with_jacobians` (see :meth:`_step_and_jacobians`).
        """
        raise NotImplementedError(f"{type(self).__name__} does not provide continuous_jacobians")

    # ------------------------------------------------------------------ state helpers
    def wrap(self, x: Any) -> Any:
        """Wrap angle coordinates into ``goal +- pi`` and MRPs into ``|sigma| <= 1``.

        Args:
            x: ``(..., nx)`` numpy array or torch tensor. Returns a new array of the same type.
        """
        ops = ops_for(x)
        x = x.clone() if isinstance(x, torch.Tensor) else np.array(x, copy=True)
        for i in self.angle_indices:
            g = self.goal[i]
            x[..., i] = (x[..., i] - g + math.pi) % (2 * math.pi) - math.pi + g
        if self.mrp_slice is not None:
            from deqmpc_gym.systems.rotations import mrp_to_shadow_if_needed

            a, b = self.mrp_slice
            x[..., a:b] = mrp_to_shadow_if_needed(x[..., a:b], ops)
        return x

    def sample_initial_states(self, rng: np.random.Generator, n: int) -> np.ndarray:
        """Draw ``n`` initial states ``(n, nx)`` float64 from the task's distribution using ``rng``."""
        low, high = np.asarray(self.init_low), np.asarray(self.init_high)
        return low + (high - low) * rng.random((n, self.nx))

    def position(self, x: Any) -> Any:
        """The 3-D position ``(..., 3)`` used for obstacles; raises ``ValueError`` if the system has none."""
        if self.position_slice is None:
            raise ValueError(f"system {self.name!r} has no 3-D position (position_slice is None)")
        a, b = self.position_slice
        return x[..., a:b]

    # ------------------------------------------------------------------ arrays of the class constants
    @cached_property
    def nominal_control(self) -> np.ndarray:
        """``(nu,)`` float64 nominal control (``u_nominal`` or zeros)."""
        return np.asarray(self.u_nominal if self.u_nominal is not None else (0.0,) * self.nu, dtype=np.float64)

    def tensor(self, name: str, like: torch.Tensor | None = None, *, dtype: torch.dtype = torch.float64,
               device: torch.device | str | None = None) -> torch.Tensor:
        """A class constant (e.g. ``"Q_diag"``, ``"u_low"``, ``"goal"``) as a torch tensor on ``like``'s
        device/dtype."""
        value = self.nominal_control if name == "u_nominal" else getattr(self, name)
        if like is not None:
            dtype, device = like.dtype, like.device
        return torch.as_tensor(np.asarray(value, dtype=np.float64), dtype=dtype, device=device)

    def _check_xu(self, x: Any, u: Any) -> None:
        if x.shape[-1:] != (self.nx,) or u.shape[-1:] != (self.nu,) or x.shape[:-1] != u.shape[:-1]:
            raise ShapeError(
                f"{self.name}: expected x (..., {self.nx}) and u (..., {self.nu}) with equal leading shapes, "
                f"got x {tuple(x.shape)} and u {tuple(u.shape)}"
            )

    def __repr__(self) -> str:
        return f"{type(self).__name__}(nx={self.nx}, nu={self.nu}, dt={self.dt})"


def numpy_eligible(x: Any, u: Any) -> bool:
    """True for float64 CPU torch tensors whose result needs no autograd graph."""
    return (isinstance(x, torch.Tensor) and x.device.type == "cpu" and x.dtype == torch.float64
            and isinstance(u, torch.Tensor) and u.device.type == "cpu" and u.dtype == torch.float64
            and not (torch.is_grad_enabled() and (x.requires_grad or u.requires_grad)))


def _rows(t: torch.Tensor) -> np.ndarray:
    """``(..., n)`` CPU float64 tensor -> C-contiguous ``(N, n)`` numpy array (shares memory when it can)."""
    return np.ascontiguousarray(t.detach().reshape(-1, t.shape[-1]).numpy())


def rk4(f: Any, x: Any, u: Any, dt: float) -> Any:
    """Classic Runge-Kutta 4 step of ``x_dot = f(x, u)`` with ``u`` held constant over ``dt``."""
    k1 = f(x, u)
    k2 = f(x + 0.5 * dt * k1, u)
    k3 = f(x + 0.5 * dt * k2, u)
    k4 = f(x + dt * k3, u)
    return x + (dt / 6.0) * (k1 + 2.0 * k2 + 2.0 * k3 + k4)


def rk4_with_jacobians(
    deriv_and_jac: Any, x: torch.Tensor, u: torch.Tensor, dt: float, *, n_free: int = 0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One :func:`rk4` step and its Jacobians by the chain rule through the four stages.

    With ``K_i = d k_i / d[x, u]`` (``(B, nx, nx + nu)``) and stage points ``x_i = x + c_i dt k_{i-1}``::

        K_1 = [G_x(x_1) | G_u(x_1)],   K_i = [G_x(x_i) | G_u(x_i)] + c_i dt G_x(x_i) K_{i-1}   (c = 1/2, 1/2, 1)
        [A | B] = [I | 0] + dt/6 (K_1 + 2 K_2 + 2 K_3 + K_4)

    Args:
        deriv_and_jac: ``(x (B, nx), u (B, nu)) -> (g (B, nx), G_x (B, nx, nx), G_u (B, nx, nu))`` or
            ``-> (g, G)`` with ``G = [G_x | G_u] (B, nx, nx + nu)``: the continuous dynamics (the function
            :func:`rk4` integrates, evaluated bit-identically) and their Jacobians. A returned ``G`` must be a
            fresh tensor: without autograd it is reused in place as an accumulator.
        x: ``(B, nx)``, u: ``(B, nu)`` torch tensors; dt: step [s].
        n_free: the first ``n_free`` state coordinates do not appear in ``g`` (e.g. positions); their columns
            of ``G_x`` must be zero and are skipped in the matrix products.

    Returns:
        ``x_next (B, nx)`` (bit-identical to ``rk4(g, x, u, dt)``), ``A (B, nx, nx)``, ``B (B, nx, nu)``.
        Differentiable when ``deriv_and_jac`` is.
    """
    nx = x.shape[-1]

    def stage(xi: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = deriv_and_jac(xi, u)
        if len(out) == 3:
            return out[0], torch.cat([out[1], out[2]], dim=-1)
        return out[0], out[1]

    # The stage points are written exactly as in :func:`rk4` so that x_next is bit-identical.
    k1, d1 = stage(x)
    k2, g2 = stage(x + 0.5 * dt * k1)
    k3, g3 = stage(x + 0.5 * dt * k2)
    k4, g4 = stage(x + dt * k3)
    x_next = x + (dt / 6.0) * (k1 + 2.0 * k2 + 2.0 * k3 + k4)
    n = n_free
    if torch.is_grad_enabled() and (x.requires_grad or u.requires_grad or d1.requires_grad):
        d2 = torch.baddbmm(g2, g2[:, :, n:nx], d1[:, n:nx], alpha=0.5 * dt)
        d3 = torch.baddbmm(g3, g3[:, :, n:nx], d2[:, n:nx], alpha=0.5 * dt)
        d4 = torch.baddbmm(g4, g4[:, :, n:nx], d3[:, n:nx], alpha=dt)
        jac = (d1 + d4 + 2.0 * (d2 + d3)) * (dt / 6.0)
        A = jac[..., :nx] + torch.eye(nx, dtype=x.dtype, device=x.device)
        return x_next, A, jac[..., nx:]
    # No graph needed: accumulate in place to keep few (B, nx, nx + nu) buffers alive (fresh large buffers
    # cost page faults that dominate at B ~ 1000).
    d2 = torch.baddbmm(g2, g2[:, :, n:nx], d1[:, n:nx], alpha=0.5 * dt)
    del g2
    jac = d1.add_(d2, alpha=2.0)  # d1 is no longer needed
    d3 = torch.baddbmm(g3, g3[:, :, n:nx], d2[:, n:nx], alpha=0.5 * dt)
    del g3, d2
    jac.add_(d3, alpha=2.0)
    d4 = torch.baddbmm(g4, g4[:, :, n:nx], d3[:, n:nx], alpha=dt)
    del g4, d3
    jac.add_(d4).mul_(dt / 6.0)
    A, B = jac[..., :nx], jac[..., nx:]
    A.diagonal(dim1=-2, dim2=-1).add_(1.0)
    return x_next, A, B


def rk4_with_jacobians_numpy(
    deriv_and_jac: Any, x: np.ndarray, u: np.ndarray, dt: float, *, n_free: int = 0
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """:func:`rk4_with_jacobians` on numpy arrays (no autograd): ``deriv_and_jac(x, u) -> (g, G)`` with numpy
    ``g (B, nx)`` and ``G (B, nx, nx + nu)``. ``x_next`` is bit-identical to :func:`rk4` on the same arrays."""
    nx, n = x.shape[-1], n_free
    k1, d1 = deriv_and_jac(x, u)
    k2, g2 = deriv_and_jac(x + 0.5 * dt * k1, u)
    k3, g3 = deriv_and_jac(x + 0.5 * dt * k2, u)
    k4, g4 = deriv_and_jac(x + dt * k3, u)
    x_next = x + (dt / 6.0) * (k1 + 2.0 * k2 + 2.0 * k3 + k4)
    d2 = g2 + (0.5 * dt) * (g2[:, :, n:nx] @ d1[:, n:nx])
    d3 = g3 + (0.5 * dt) * (g3[:, :, n:nx] @ d2[:, n:nx])
    d4 = g4 + dt * (g4[:, :, n:nx] @ d3[:, n:nx])
    jac = (d1 + d4 + 2.0 * (d2 + d3)) * (dt / 6.0)
    A = jac[..., :nx]
    A[:, np.arange(nx), np.arange(nx)] += 1.0
    return x_next, A, jac[..., nx:]


#: imaginary perturbation of :func:`complex_step_jacobians_numpy` (any tiny value: no cancellation error).
COMPLEX_STEP = 1e-30


def complex_step_jacobians_numpy(
    step: Any, x: np.ndarray, u: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Jacobians of a real-analytic discrete map by the complex step (Squire & Trapp 1998):
    ``df/dz_j = Im f(z + i h e_j) / h`` is exact to round-off for any tiny ``h`` (no subtraction).

    All ``nx + nu`` perturbed copies of the batch go through ``step`` in one complex call, so the cost is one
    step of ``(nx + nu) B`` rows: cheaper than the analytic chain rule while per-call overhead dominates.
    ``step`` must use only analytic operations (``+ - * /``, ``sin``, ``cos``, ``sqrt``, ...; no ``abs``,
    comparisons or ``where``).

    Args:
        step: ``(x (N, nx), u (N, nu)) -> (N, nx)`` on numpy arrays (complex-safe).
        x: ``(B, nx)``, u: ``(B, nu)`` float64 arrays.

    Returns:
        ``x_next (B, nx)`` (the real part of the first copy: equal to ``step(x, u)`` up to one rounding of the
        complex arithmetic), ``A (B, nx, nx)``, ``B (B, nx, nu)``.
    """
    b, nx = x.shape
    nu = u.shape[1]
    n = nx + nu
    xs = np.empty((n, b, nx), dtype=np.complex128)
    xs[:] = x
    us = np.empty((n, b, nu), dtype=np.complex128)
    us[:] = u
    ix, iu = np.arange(nx), np.arange(nu)
    xs[ix, :, ix] += 1j * COMPLEX_STEP
    us[nx + iu, :, iu] += 1j * COMPLEX_STEP
    y = step(xs.reshape(n * b, nx), us.reshape(n * b, nu)).reshape(n, b, nx)
    jac = y.imag.transpose(1, 2, 0) * (1.0 / COMPLEX_STEP)  # (B, nx, n)
    return (np.ascontiguousarray(y[0].real), np.ascontiguousarray(jac[..., :nx]),
            np.ascontiguousarray(jac[..., nx:]))


def autodiff_jacobians(
    system: System, x: torch.Tensor, u: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Reference Jacobians of ``system`` by reverse-mode autodiff.

    The batch is replicated ``nx`` times, the replicated outputs are contracted with the identity and one
    backward pass returns every row of ``[A B]``.

    Args:
        x: ``(B, nx)``, u: ``(B, nu)`` torch tensors.

    Returns:
        ``x_next (B, nx)``, ``A (B, nx, nx)``, ``B (B, nx, nu)``.
    """
    nb, nx, nu = x.shape[0], system.nx, system.nu
    create_graph = torch.is_grad_enabled() and (x.requires_grad or u.requires_grad)
    with torch.enable_grad():
        xs = x.unsqueeze(0).expand(nx, nb, nx).reshape(nx * nb, nx)
        us = u.unsqueeze(0).expand(nx, nb, nu).reshape(nx * nb, nu)
        if not (create_graph and x.requires_grad):
            xs = xs.detach().requires_grad_(True)
        if not (create_graph and u.requires_grad):
            us = us.detach().requires_grad_(True)
        y = system._step(xs, us, TORCH)
        seed = torch.eye(nx, dtype=x.dtype, device=x.device)[:, None, :].expand(nx, nb, nx).reshape(nx * nb, nx)
        gx, gu = torch.autograd.grad(y, (xs, us), seed, create_graph=create_graph)
    A = gx.reshape(nx, nb, nx).transpose(0, 1)
    B = gu.reshape(nx, nb, nu).transpose(0, 1)
    xn = y[:nb] if create_graph else y[:nb].detach()
    return xn, A, B
