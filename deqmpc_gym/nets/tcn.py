"""Temporal-convolution networks (feed-forward and DEQ) that map (x0, x_prev) to waypoints theta.

Notation: ``B`` batch, ``nx`` state dim, ``T`` horizon knots (including the current one), ``L = T - 1``
predicted knots, ``h`` hidden width, ``nq`` number of "position" coordinates, ``dt`` time step.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import NamedTuple, cast

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from deqmpc_gym.errors import ConfigError, ShapeError, check_shape
from deqmpc_gym.nets._channel_last import (
    conv_cl,
    group_norm_cl,
    same_conv_taps,
    split_input_conv_cl,
    transposed_weight,
)
from deqmpc_gym.nets._deq_cell import CellEval, CellWeights, cell, cell_forward
from deqmpc_gym.nets.fixed_point import AndersonConfig, SolverStats, fixed_point_iter, get_solver

__all__ = [
    "NetConfig",
    "NetOutput",
    "FeedForwardTCN",
    "DEQTCN",
    "build_network",
    "shift_latent",
]

_KINDS = ("nn", "deq")
_DEQ_GRADS = ("phantom", "ift")


def _as_vector(name: str, value: Sequence[float] | Tensor | None, nx: int, positive: bool) -> tuple[float, ...] | None:
    """Validate an optional per-state vector and freeze it as a tuple of ``nx`` floats."""
    if value is None:
        return None
    try:
        vec = tuple(float(v) for v in torch.as_tensor(value, dtype=torch.float64).reshape(-1).tolist())
    except (TypeError, ValueError, RuntimeError) as exc:
        raise ConfigError(f"NetConfig.{name} must be a sequence of {nx} floats: {exc}") from exc
    if len(vec) != nx:
        raise ConfigError(f"NetConfig.{name} must have nx={nx} entries, got {len(vec)}")
    bad = [v for v in vec if not (abs(v) < float("inf")) or (positive and v <= 0)]
    if bad:
        what = "finite and > 0" if positive else "finite"
        raise ConfigError(f"NetConfig.{name} entries must be {what}, got {vec}")
    return vec


@dataclass(frozen=True, kw_only=True)
class NetConfig:
    """Architecture and solver settings of the TCN networks.

    Attributes:
        nx: state dimension (>= 1).
        nq: number of leading "position" coordinates predicted as ``x_prev[:, 0] + dt*o`` (0..nx);
            the remaining ``nx - nq`` are predicted as absolute values ``o``.
        dt: time step (> 0) scaling the position deltas.
        T: horizon knots including the current state (>= 2); the network predicts ``L = T - 1`` knots.
        hidden: hidden width ``h`` (divisible by ``groups``).
        kind: ``"nn"`` (:class:`FeedForwardTCN`) or ``"deq"`` (:class:`DEQTCN`).
        kernel: odd Conv1d kernel width ('same' padding).
        groups: GroupNorm groups.
        expansion: channel expansion factor of the residual / fixed-point block.
        anderson: fixed-point solver settings for the DEQ forward solve.
        solver: registered solver name (see :func:`deqmpc_gym.nets.get_solver`).
        deq_grad: ``"phantom"`` (backprop through ``phantom_steps`` extra applications of f) or
            ``"ift"`` (implicit-function-theorem adjoint solved by ``ift_max_iter`` fixed-point steps).
        phantom_steps: extra applications of f with grad in training (>= 1).
        ift_max_iter: maximum adjoint iterations (>= 1); stops early at ``ift_tol`` (relative).
        ift_tol: relative tolerance of the adjoint iteration (> 0).
        state_scale: optional ``nx`` positive multipliers of the raw head output ``o``.
        state_center: optional ``nx`` offsets subtracted from ``x0`` / ``x_prev`` before encoding.
        input_scale: optional ``nx`` positive divisors of the centred ``x0`` / ``x_prev``.
    """

    nx: int
    nq: int
    dt: float
    T: int = 5
    hidden: int = 128
    kind: str = "deq"
    kernel: int = 3
    groups: int = 4
    expansion: int = 4
    anderson: AndersonConfig = field(default_factory=AndersonConfig)
    solver: str = "anderson"
    deq_grad: str = "phantom"
    phantom_steps: int = 3
    ift_max_iter: int = 10
    ift_tol: float = 1e-4
    state_scale: tuple[float, ...] | None = None
    state_center: tuple[float, ...] | None = None
    input_scale: tuple[float, ...] | None = None

    def __post_init__(self) -> None:
        self._check_ints()
        if not (self.dt > 0 and self.dt < float("inf")):
            raise ConfigError(f"NetConfig.dt must be finite and > 0, got {self.dt!r}")
        if not 0 <= self.nq <= self.nx:
            raise ConfigError(f"NetConfig.nq must be in [0, nx={self.nx}], got {self.nq}")
        if self.hidden % self.groups:
            raise ConfigError(f"NetConfig.hidden={self.hidden} must be divisible by groups={self.groups}")
        if self.kernel % 2 == 0:
            raise ConfigError(f"NetConfig.kernel must be odd for 'same' padding, got {self.kernel}")
        self._check_choices()
        for name, positive in (("state_scale", True), ("state_center", False), ("input_scale", True)):
            object.__setattr__(self, name, _as_vector(name, getattr(self, name), self.nx, positive))

    def _check_ints(self) -> None:
        minima = {"nx": 1, "T": 2, "hidden": 1, "kernel": 1, "groups": 1, "expansion": 1,
                  "phantom_steps": 1, "ift_max_iter": 1, "nq": 0}
        for name, low in minima.items():
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ConfigError(f"NetConfig.{name} must be an integer >= {low}, got {value!r}")

    def _check_choices(self) -> None:
        if self.kind not in _KINDS:
            raise ConfigError(f"NetConfig.kind must be one of {_KINDS}, got {self.kind!r}")
        if self.deq_grad not in _DEQ_GRADS:
            raise ConfigError(f"NetConfig.deq_grad must be one of {_DEQ_GRADS}, got {self.deq_grad!r}")
        if not isinstance(self.anderson, AndersonConfig):
            raise ConfigError(f"NetConfig.anderson must be an AndersonConfig, got {type(self.anderson).__name__}")
        if not self.ift_tol > 0:
            raise ConfigError(f"NetConfig.ift_tol must be > 0, got {self.ift_tol!r}")
        get_solver(self.solver)

    @property
    def L(self) -> int:
        """Number of predicted knots, ``T - 1``."""
        return self.T - 1


class NetOutput(NamedTuple):
    """Output of the TCN networks.

    Attributes:
        theta: ``(B, T, nx)`` waypoints in the parameters' dtype; ``theta[:, 0] == x0``.
        z: ``(B, h, L)`` detached latent (DEQ: the equilibrium; NN: final hidden), for warm starts.
        stats: :class:`SolverStats` of the DEQ forward solve (``None`` for the feed-forward net).
    """

    theta: Tensor
    z: Tensor
    stats: SolverStats | None


#: below this many output positions (batch x length) a conv is computed as one matrix product of the
#: unfolded input (4-5x faster at batch 1 on CPU); above it the library convolution is faster.
_MATMUL_CONV_MAX_POSITIONS = 16


class _SameConv1d(nn.Conv1d):
    """``nn.Conv1d`` with 'same' padding (odd kernel) that switches to an im2col matrix product for small inputs.

    Same parameters and state-dict keys as ``nn.Conv1d``; ``x: (B, c_in, L) -> (B, c_out, L)``.
    """

    def __init__(self, c_in: int, c_out: int, kernel: int, **kwargs) -> None:
        super().__init__(c_in, c_out, kernel, **kwargs)
        if kernel % 2 == 0 or self.padding != (kernel // 2,) or self.stride != (1,) or self.dilation != (1,) \
                or self.groups != 1:
            raise ConfigError("_SameConv1d needs an odd kernel with padding kernel // 2, stride 1, dilation 1 and "
                              f"groups 1, got kernel={kernel} {kwargs}")

    def forward(self, x: Tensor) -> Tensor:
        b, c_in, length = x.shape
        if b * length >= _MATMUL_CONV_MAX_POSITIONS:
            return super().forward(x)
        k = self.kernel_size[0]
        w = self.weight.reshape(self.out_channels, c_in * k)  # a view: (c_out, c_in * k), c_in-major
        cols = F.pad(x, (k // 2, k // 2)).unfold(2, k, 1).transpose(1, 2).reshape(b * length, c_in * k)
        out = cols @ w.t() if self.bias is None else torch.addmm(self.bias, cols, w.t())
        return out.reshape(b, length, self.out_channels).transpose(1, 2)


def _conv(c_in: int, c_out: int, kernel: int) -> nn.Conv1d:
    return _SameConv1d(c_in, c_out, kernel, padding=kernel // 2)


def _encoder(nx: int, h: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(nx, h), nn.LayerNorm(h), nn.ReLU())


def _cconv(conv: nn.Module, x: Tensor, add: Tensor | None = None) -> Tensor:
    """``conv`` (a 'same' Conv1d) on channel-last ``x: (B, L, C_in)`` -> ``(B, L, C_out)``, plus ``add``."""
    c = cast(nn.Conv1d, conv)
    return conv_cl(x, c.weight, c.bias, add)


def _cgn(gn: nn.Module, x: Tensor) -> Tensor:
    """``gn`` (a GroupNorm) on channel-last ``x: (B, L, C)`` -> ``(B, L, C)``."""
    g = cast(nn.GroupNorm, gn)
    return group_norm_cl(x, g.weight, g.bias, g.num_groups, g.eps)


def _relu(x: Tensor) -> Tensor:
    """ReLU, in place when no graph is recorded."""
    return torch.relu_(x) if not (torch.is_grad_enabled() and x.requires_grad) else torch.relu(x)


def _channels_first(x: Tensor) -> Tensor:
    """``(B, L, C) -> (B, C, L)`` contiguous."""
    return x.transpose(1, 2).contiguous()


#: at this many samples or more the input encoder convolves its three input parts separately (the
#: batch-independent time embedding's part once for the batch: two thirds of the concatenated input's products;
#: at hidden 128 and batch 32-64 about 10 % faster forward + backward, at hidden 64 on par); below it the weights'
#: memory traffic dominates and one convolution of the concatenation is faster.
_SPLIT_ENCODER_MIN_BATCH = 8


class _InputBlock(nn.Module):
    """Node / x0 encoders, learned time embedding and the conv input encoder -> ``(B, h, L)``."""

    taps: Tensor  # buffer (registered in __init__)

    def __init__(self, cfg: NetConfig) -> None:
        super().__init__()
        h, k = cfg.hidden, cfg.kernel
        self.node_encoder = _encoder(cfg.nx, h)
        self.x0_encoder = _encoder(cfg.nx, h)
        self.time_embedding = nn.Parameter(torch.randn(cfg.L, h))
        self.input_encoder = nn.Sequential(
            _conv(3 * h, cfg.expansion * h, k), nn.ReLU(), _conv(cfg.expansion * h, h, k), nn.GroupNorm(cfg.groups, h)
        )
        # (L, k): which taps of the input encoder's convolution read inside the horizon (the split path's context)
        self.register_buffer("taps", same_conv_taps(cfg.L, k), persistent=False)

    def forward(self, x0: Tensor, x_prev: Tensor) -> Tensor:
        """``x0: (B, nx)``, ``x_prev: (B, T, nx)`` (normalised) -> ``(B, h, L)``."""
        return _channels_first(self.forward_cl(x0, x_prev))

    def forward_cl(self, x0: Tensor, x_prev: Tensor) -> Tensor:
        """:meth:`forward` with a channel-last result ``(B, L, h)``."""
        conv_a, _, conv_b, gn = self.input_encoder
        nodes = self.node_encoder(x_prev[:, 1:])  # (B, L, h)
        ctx = self.x0_encoder(x0)  # (B, h)
        b, length, h = nodes.shape
        if b < _SPLIT_ENCODER_MIN_BATCH:
            cat = torch.cat([nodes, ctx[:, None].expand_as(nodes), self.time_embedding[None].expand_as(nodes)], -1)
            a = _cconv(conv_a, cat)
        else:  # conv(cat([nodes, ctx, time])) = conv(nodes) + conv(ctx) + conv(time), each zero-padded
            c = cast(nn.Conv1d, conv_a)
            a = split_input_conv_cl(nodes, ctx, self.time_embedding, c.weight, c.bias, self.taps.to(c.weight.dtype))
        return _cgn(gn, _cconv(conv_b, _relu(a)))


class _TCNBase(nn.Module):
    """Shared input block, output head, (de)normalisation and boundary checks."""

    state_scale: Tensor  # buffers (registered in __init__)
    state_center: Tensor
    input_scale: Tensor

    def __init__(self, cfg: NetConfig) -> None:
        super().__init__()
        self.config = cfg
        h, k, nx = cfg.hidden, cfg.kernel, cfg.nx
        self.input_block = _InputBlock(cfg)
        self.head = nn.Sequential(_conv(h, h, k), nn.GroupNorm(cfg.groups, h), nn.ReLU(), _SameConv1d(h, nx, 1))
        self.register_buffer("state_scale", self._vec(cfg.state_scale, 1.0), persistent=False)
        self.register_buffer("state_center", self._vec(cfg.state_center, 0.0), persistent=False)
        self.register_buffer("input_scale", self._vec(cfg.input_scale, 1.0), persistent=False)

    def _vec(self, values: tuple[float, ...] | None, default: float) -> Tensor:
        if values is None:
            return torch.full((self.config.nx,), default)
        return torch.tensor(values, dtype=torch.get_default_dtype())

    def _prepare(self, x0: Tensor, x_prev: Tensor, z: Tensor | None) -> tuple[Tensor, Tensor, Tensor | None]:
        """Check shapes and cast inputs to the parameters' dtype / device."""
        cfg = self.config
        ref = self.input_block.time_embedding
        x0, x_prev = (_tensor(n, v, ref) for n, v in (("x0", x0), ("x_prev", x_prev)))
        check_shape("x0", x0, (None, cfg.nx))
        check_shape("x_prev", x_prev, (x0.shape[0], cfg.T, cfg.nx))
        if z is not None:
            z = _tensor("z", z, ref)
            check_shape("z", z, (x0.shape[0], cfg.hidden, cfg.L))
        return x0, x_prev, z

    def encode(self, x0: Tensor, x_prev: Tensor) -> Tensor:
        """Normalise and encode the inputs: ``(B, nx), (B, T, nx) -> (B, h, L)``."""
        return _channels_first(self._encode_cl(x0, x_prev))

    def _encode_cl(self, x0: Tensor, x_prev: Tensor) -> Tensor:
        """:meth:`encode` with a channel-last result ``(B, L, h)``."""
        x0n = (x0 - self.state_center) / self.input_scale
        xpn = (x_prev - self.state_center) / self.input_scale
        return self.input_block.forward_cl(x0n, xpn)

    def waypoints(self, z: Tensor, x0: Tensor, x_prev: Tensor) -> Tensor:
        """Head + output parameterisation: ``z (B, h, L) -> theta (B, T, nx)`` with ``theta[:, 0] = x0``."""
        return self._waypoints_cl(z.transpose(1, 2).contiguous(), x0, x_prev)

    def _waypoints_cl(self, z: Tensor, x0: Tensor, x_prev: Tensor) -> Tensor:
        """:meth:`waypoints` of a channel-last latent ``z: (B, L, h)``."""
        nq, dt = self.config.nq, self.config.dt
        conv, gn, _, out = self.head
        o = _cconv(out, _relu(_cgn(gn, _cconv(conv, z)))) * self.state_scale
        pos = x_prev[:, :1, :nq] + dt * o[..., :nq]
        rest = torch.cat([pos, o[..., nq:]], dim=-1)
        return torch.cat([x0[:, None], rest], dim=1)


def _tensor(name: str, value: Tensor, ref: Tensor) -> Tensor:
    """Convert ``value`` to a tensor with ``ref``'s dtype and device (keeps autograd history)."""
    try:
        return torch.as_tensor(value).to(dtype=ref.dtype, device=ref.device)
    except (TypeError, ValueError, RuntimeError) as exc:
        raise ShapeError(f"{name} must be convertible to a float tensor: {exc}") from exc


class FeedForwardTCN(_TCNBase):
    """Feed-forward TCN ("nn" kind): input block, one residual block, output head.

    ``forward(x0: (B, nx) float, x_prev: (B, T, nx) float, z=None) -> NetOutput``; ``z`` is
    accepted for interface parity and ignored (shape-checked if given).
    """

    def __init__(self, cfg: NetConfig) -> None:
        super().__init__(cfg)
        h, e, k, g = cfg.hidden, cfg.expansion * cfg.hidden, cfg.kernel, cfg.groups
        self.expand = nn.Sequential(_conv(h, e, k), nn.ReLU(), nn.GroupNorm(g, e))
        self.contract = nn.Sequential(_conv(e, h, k), nn.GroupNorm(g, h))

    def forward(self, x0: Tensor, x_prev: Tensor, z: Tensor | None = None) -> NetOutput:
        """``x0: (B, nx)``, ``x_prev: (B, T, nx)``, ``z: (B, h, L) | None`` -> :class:`NetOutput`."""
        x0, x_prev, _ = self._prepare(x0, x_prev, z)
        u = self._encode_cl(x0, x_prev)  # (B, L, h)
        conv_e, _, gn_e = self.expand
        conv_c, gn_c = self.contract
        y = _cgn(gn_e, _relu(_cconv(conv_e, u)))
        hidden = torch.relu(u + _cgn(gn_c, _cconv(conv_c, y)))
        return NetOutput(self._waypoints_cl(hidden, x0, x_prev), _channels_first(hidden.detach()), None)


class DEQTCN(_TCNBase):
    """Deep-equilibrium TCN ("deq" kind).

    The latent ``z: (B, h, L)`` solves ``z = f(z, u)`` with
    ``f(z, u) = GN3(ReLU(z + GN2(u + Conv(GN1(ReLU(Conv(z)))))))`` and ``u`` the input block output.
    Forward solve by the configured solver (no grad) from ``z`` (or zeros). In training mode with
    grad enabled the gradient is the phantom gradient or the IFT adjoint (``config.deq_grad``).
    """

    def __init__(self, cfg: NetConfig) -> None:
        super().__init__(cfg)
        h, e, k, g = cfg.hidden, cfg.expansion * cfg.hidden, cfg.kernel, cfg.groups
        self.conv1 = _conv(h, e, k)
        self.conv2 = _conv(e, h, k)
        self.gn1 = nn.GroupNorm(g, e)
        self.gn2 = nn.GroupNorm(g, h)
        self.gn3 = nn.GroupNorm(g, h)

    def f(self, z: Tensor, u: Tensor) -> Tensor:
        """Fixed-point map: ``z (B, h, L)``, injection ``u (B, h, L)`` -> ``(B, h, L)``."""
        return _channels_first(self._f_cl(z.transpose(1, 2).contiguous(), u.transpose(1, 2).contiguous()))

    def _cell_weights(self) -> CellWeights:
        norms = (self.gn1, self.gn2, self.gn3)
        return CellWeights(self.conv1.weight, self.conv1.bias, self.conv2.weight, self.conv2.bias,
                           ((norms[0].weight, norms[0].bias), (norms[1].weight, norms[1].bias),
                            (norms[2].weight, norms[2].bias)),
                           (norms[0].num_groups, norms[1].num_groups, norms[2].num_groups),
                           (norms[0].eps, norms[1].eps, norms[2].eps))

    def _f_cl(self, z: Tensor, u: Tensor, pre: CellEval | None = None) -> Tensor:
        """:meth:`f` on channel-last ``z, u: (B, L, h)`` (``pre``: an evaluation at this ``z`` to reuse)."""
        p = self._cell_weights()
        if torch.is_grad_enabled() and (z.requires_grad or u.requires_grad or any(
                t is not None and t.requires_grad for t in (p.w1, p.b1, p.w2, p.b2, *(t for n in p.norms for t in n)))):
            return cell(z.contiguous(), u.contiguous(), p, pre)
        if pre is not None:
            return pre.out
        ub = u if p.b2 is None else u + p.b2
        return cell_forward(z.contiguous(), ub, p, transposed_weight(p.w1), transposed_weight(p.w2)).out

    def _f_solve(self, u: Tensor) -> _SolveMap:
        """The gradient-free map ``z -> f(z, u)`` of the forward solve, channel-last ``(B, L, h)``."""
        return _SolveMap(self._cell_weights(), u)

    def forward(self, x0: Tensor, x_prev: Tensor, z: Tensor | None = None) -> NetOutput:
        """``x0: (B, nx)``, ``x_prev: (B, T, nx)``, warm start ``z: (B, h, L) | None`` -> :class:`NetOutput`."""
        x0, x_prev, z = self._prepare(x0, x_prev, z)
        u = self._encode_cl(x0, x_prev)  # (B, L, h): the solve runs channel-last
        z0 = torch.zeros_like(u) if z is None else z.detach().transpose(1, 2).contiguous()
        solve = get_solver(self.config.solver)
        fmap = self._f_solve(u)
        with torch.no_grad():
            z_star, stats = solve(fmap, z0, self.config.anderson)
        if torch.is_grad_enabled() and self.training:
            z_star = self._grad_path(z_star.detach(), u, fmap.reusable(z_star))
        return NetOutput(self._waypoints_cl(z_star, x0, x_prev), _channels_first(z_star.detach()), stats)

    def _grad_path(self, z_star: Tensor, u: Tensor, pre: CellEval | None = None) -> Tensor:
        """Re-attach autograd to the channel-last equilibrium ``(B, L, h)`` by the configured gradient (``pre``: the
        forward solve's evaluation of ``f(z*)``, reused by the first phantom step)."""
        if self.config.deq_grad == "phantom":
            z = self._f_cl(z_star, u, pre)
            for _ in range(self.config.phantom_steps - 1):
                z = self._f_cl(z, u)
            return z
        return self._ift(z_star, u)

    def _ift(self, z_star: Tensor, u: Tensor) -> Tensor:
        """One differentiable step ``f(z*, u)`` whose incoming gradient is replaced by ``(I - J^T)^-1 grad``."""
        z = self._f_cl(z_star, u)
        if not z.requires_grad:
            return z
        z_leaf = z_star.clone().requires_grad_()
        f_leaf = self._f_cl(z_leaf, u.detach())
        cfg = dataclasses.replace(self.config.anderson, max_iter=self.config.ift_max_iter, tol=self.config.ift_tol)

        def hook(grad: Tensor) -> Tensor:
            def adjoint(g: Tensor) -> Tensor:
                with torch.enable_grad():
                    vjp = torch.autograd.grad(f_leaf, z_leaf, g, retain_graph=True)[0]
                return vjp + grad

            return fixed_point_iter(adjoint, grad, cfg)[0]

        z.register_hook(hook)
        return z


class _SolveMap:
    """The forward solve's map ``z (B, L, h) -> f(z, u)`` (no autograd; weights transposed once per solve, the injection
    folded into the second convolution's bias) that keeps its last evaluation for :meth:`reusable`."""

    def __init__(self, p: CellWeights, u: Tensor) -> None:
        detached = [None if t is None else t.detach() for t in (p.w1, p.b1, p.w2, p.b2)]
        norms = tuple((w.detach(), b.detach()) for w, b in p.norms)
        self.p = CellWeights(detached[0], detached[1], detached[2], detached[3], norms, p.groups, p.eps)  # type: ignore[arg-type]
        self.ub = (u if p.b2 is None else u + p.b2).detach()
        self.wm1, self.wm2 = transposed_weight(p.w1), transposed_weight(p.w2)
        self.last: CellEval | None = None

    def __call__(self, z: Tensor) -> Tensor:
        with torch.no_grad():
            self.last = cell_forward(z.contiguous(), self.ub, self.p, self.wm1, self.wm2)
        return self.last.out

    def reusable(self, z: Tensor) -> CellEval | None:
        """The last evaluation if its input equals ``z`` ``(B, L, h)`` (then its output is ``f(z, u)``), else None."""
        last = self.last
        if last is None or last.z.shape != z.shape or not torch.equal(last.z, z):
            return None
        return last


def build_network(config: NetConfig) -> FeedForwardTCN | DEQTCN:
    """Build the network of ``config.kind`` (float32 parameters on the CPU; move with ``.to``)."""
    if not isinstance(config, NetConfig):
        raise ConfigError(f"build_network expects a NetConfig, got {type(config).__name__}")
    return FeedForwardTCN(config) if config.kind == "nn" else DEQTCN(config)


def shift_latent(z: Tensor) -> Tensor:
    """Shift a latent one knot left, duplicating the last knot: ``(B, h, L) -> (B, h, L)``."""
    check_shape("z", z, (None, None, None))
    return torch.cat([z[..., 1:], z[..., -1:]], dim=-1)
