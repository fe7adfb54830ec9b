"""The generic single-environment shell :class:`SystemEnv` over any :class:`~deqmpc_gym.systems.System`.

Everything physical (dynamics, goal, weights, bounds, initial-state distribution) comes from the system, and the
task (reward, success, termination, obstacle distance) from :class:`~deqmpc_gym.systems.task.Task`, written once
for numpy and torch; this module only adds the Gymnasium plumbing, the normalized action space and ``info``.
The batched torch twin is :class:`deqmpc_gym.envs.vector.BatchedSystemEnv`; both share the task and the helpers
below so that they produce identical trajectories for the same seeds and actions.
"""

from __future__ import annotations

import math
from typing import Any

import gymnasium as gym
import numpy as np

from deqmpc_gym.errors import ConfigError, ResetNeeded, ShapeError
from deqmpc_gym.systems import OBSTACLE_CENTERS, System, get_system
from deqmpc_gym.systems.task import Task

#: keyword arguments accepted by :class:`SystemEnv` (and ``gym.make`` of every ``DEQMPC/*`` id).
VALID_KWARGS: tuple[str, ...] = ("system", "obstacles", "obstacle_radius", "render_mode", "width", "height")

#: initial states are resampled while the position is closer than ``obstacle_radius + START_MARGIN`` [m]
#: to any obstacle centre.
START_MARGIN: float = 0.1

#: maximum number of rejection-sampling attempts for a collision-free initial state.
MAX_START_TRIES: int = 10_000

# Loose observation bounds of the built-in systems for the coordinates that are not angles or MRPs
# (keyed by ``System.name``; ``(position_bound, velocity_bound)``). They were chosen from adversarial probes
# (uniform, bang-bang and held-bang-bang policies over 200 steps, 3-20k episodes each) with a >= 4x margin:
#   pendulum  |theta_dot| <= 54;  cartpole |p| <= 490, |p_dot| <= 95, |theta_dot| <= 13;
#   quadrotor / qpole: inside the flight volume |v| <= 3.4e3 and |w| <= 150, but the RK4 step can diverge at
#   large body rates, so the *terminal* state that leaves the flight volume reached |r| <= 2e3, |v| <= 1.5e5.
_LOOSE_BOUNDS: dict[str, tuple[float, float]] = {
    "pendulum": (50.0, 250.0),
    "cartpole": (2.0e3, 5.0e2),
    "quadrotor": (1.0e4, 1.0e6),
    "qpole": (1.0e4, 1.0e6),
}
_DEFAULT_LOOSE = (1.0e3, 1.0e3)
_EPS_BOUND = 1e-4


def resolve_system(system: str | System | type[System]) -> System:
    """Return a :class:`System` instance from a name, a class or an instance (raises :class:`ConfigError`)."""
    return get_system(system)


def observation_bounds(system: System) -> tuple[np.ndarray, np.ndarray]:
    """Return ``(low, high)`` ``(nx,)`` float32 observation bounds for ``system``.

    A system may define ``observation_low`` / ``observation_high`` (``(nx,)`` tuples) to override the defaults.
    Defaults: angle coordinates ``goal_i +- pi`` (the wrapped range), MRP components ``+-1`` (shadow set),
    other configuration coordinates ``+-position_bound`` and velocities ``+-velocity_bound`` from a per-system
    table (``+-1e3`` for user systems). A small epsilon is added so that float32 rounding stays inside.
    """
    nx = system.nx
    if getattr(system, "observation_high", None) is not None:
        high = np.asarray(system.observation_high, dtype=np.float64)  # type: ignore[attr-defined]
        low_attr = getattr(system, "observation_low", None)
        low = -high if low_attr is None else np.asarray(low_attr, dtype=np.float64)
        if high.shape != (nx,) or low.shape != (nx,) or not (np.all(np.isfinite(low)) and np.all(np.isfinite(high))):
            raise ConfigError(f"{system.name}: observation_low/high must be finite with shape ({nx},)")
        return low.astype(np.float32), high.astype(np.float32)
    pos_b, vel_b = _LOOSE_BOUNDS.get(system.name, _DEFAULT_LOOSE)
    if system.flight_bound is not None:
        pos_b = max(pos_b, 10.0 * float(system.flight_bound))
    low = np.empty(nx, dtype=np.float64)
    high = np.empty(nx, dtype=np.float64)
    for i in range(nx):
        b = pos_b if i < system.nq else vel_b
        low[i], high[i] = -b, b
    for i in system.angle_indices:
        g = float(system.goal[i])
        low[i], high[i] = g - math.pi - _EPS_BOUND, g + math.pi + _EPS_BOUND
    if system.mrp_slice is not None:
        a, b = system.mrp_slice
        low[a:b], high[a:b] = -1.0 - _EPS_BOUND, 1.0 + _EPS_BOUND
    return low.astype(np.float32), high.astype(np.float32)


def check_obstacle_config(system: System, obstacles: bool, obstacle_radius: float) -> np.ndarray:
    """Validate the obstacle options and return the ``(K, 3)`` float64 obstacle centres (``K = 0`` when off)."""
    if not isinstance(obstacles, (bool, np.bool_)):
        raise ConfigError(f"obstacles must be a bool, got {obstacles!r}")
    try:
        r = float(obstacle_radius)
    except (TypeError, ValueError):
        raise ConfigError(f"obstacle_radius must be a positive float [m], got {obstacle_radius!r}") from None
    if not (math.isfinite(r) and r > 0.0):
        raise ConfigError(f"obstacle_radius must be a positive finite float [m], got {obstacle_radius!r}")
    if obstacles:
        if system.position_slice is None:
            raise ConfigError(f"system {system.name!r} has no 3-D position (position_slice is None); "
                              "obstacles=True needs one (use a quadrotor-like system)")
        return np.array(OBSTACLE_CENTERS, dtype=np.float64)
    return np.zeros((0, 3), dtype=np.float64)


def sample_initial_state(system: System, rng: np.random.Generator, task: Task) -> np.ndarray:
    """Draw one wrapped ``(nx,)`` float64 initial state, rejecting starts within ``task.radius + START_MARGIN``
    of a sphere centre (``task``: the numpy :class:`~deqmpc_gym.systems.task.Task` of the env).

    The single env and every sub-env of the batched env call exactly this function with their own generator,
    so sub-env ``i`` seeded with ``seed + i`` starts where ``SystemEnv.reset(seed=seed + i)`` starts.
    """
    for _ in range(MAX_START_TRIES):
        with np.errstate(invalid="ignore", divide="ignore"):
            x = system.wrap(system.sample_initial_states(rng, 1)[0])
        if not task.has_obstacles or task.center_distance(x) >= task.radius + START_MARGIN:
            return x
    raise ConfigError(f"could not sample a collision-free initial state in {MAX_START_TRIES} tries "
                      f"(obstacle_radius={task.radius} m is too large for the initial-state box); use a smaller "
                      "radius")


def check_kwargs(kwargs: dict[str, Any], valid: tuple[str, ...], where: str) -> None:
    """Raise :class:`ConfigError` naming the valid keyword arguments if ``kwargs`` is not empty."""
    if kwargs:
        raise ConfigError(f"{where}: unknown keyword argument(s) {sorted(kwargs)}; valid keyword arguments are "
                          f"{list(valid)}")


#: the keys ``reset(options=...)`` understands.
RESET_OPTIONS: tuple[str, ...] = ("state",)


def check_reset_options(options: Any) -> dict[str, Any]:
    """Validate ``reset(options=...)``: None or a dict with keys from :data:`RESET_OPTIONS` (returns a dict)."""
    if options is None:
        return {}
    if not isinstance(options, dict):
        raise ConfigError(f"reset options must be a dict such as {{'state': x}} or None, got {options!r}")
    unknown = sorted(str(k) for k in options if k not in RESET_OPTIONS)
    if unknown:
        raise ConfigError(f"unknown reset option(s) {unknown}; valid options: {list(RESET_OPTIONS)}")
    return options


def check_seed(seed: Any, name: str = "seed") -> int | None:
    """Validate a reset seed: None or a non-negative integer (numpy integers accepted); returns an ``int``."""
    if seed is None:
        return None
    if isinstance(seed, (bool, np.bool_)) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ConfigError(f"{name} must be None or an integer >= 0, got {seed!r}")
    return int(seed)


def check_render_size(width: Any, height: Any) -> tuple[int, int]:
    """Validate the frame size (positive multiples of 16, so that H.264 encoders need no resizing)."""
    out = []
    for name, v in (("width", width), ("height", height)):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v <= 0 or v % 16 != 0 or v > 8192:
            raise ConfigError(f"{name} must be a positive multiple of 16 pixels (<= 8192), got {v!r}")
        out.append(int(v))
    return out[0], out[1]


def _state_array(value: Any) -> np.ndarray:
    """``options["state"]`` as a float64 array (a :class:`ShapeError` for non-numeric values)."""
    try:
        x = np.array(value, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise ShapeError(f"options['state'] must be a numeric array: {exc}") from None
    return x


def _action_array(action: Any) -> np.ndarray:
    """``action`` as a float64 array (a :class:`ShapeError` for non-numeric values)."""
    try:
        return np.array(action, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise ShapeError(f"action must be a numeric array normalized to [-1, 1]: {exc}") from None


class SystemEnv(gym.Env):
    r"""A Gymnasium environment driving a :class:`~deqmpc_gym.systems.System` (any subclass plugs in).

    ## Description
    The state ``x`` (float64, SI units, see the system's docstring) evolves by ``x <- wrap(system.step(x, u))``
    with the system's discrete dynamics (``dt = system.dt``, 0.05 s for the built-in systems). The task is
    to bring the system to ``system.goal`` (pendulum/cart-pole swing-up, quadrotor stabilisation to the origin,
    QPole stabilisation with the pole upright) and, for obstacle variants, to avoid the 40 spheres of the
    paper's QPoleObs task (centres ``deqmpc_gym.systems.OBSTACLE_CENTERS``, radius ``obstacle_radius``).

    ## Action Space
    ``Box(-1, 1, (nu,), float32)``, a normalized control mapped affinely to the physical control
    ``u = action_offset + action_scale * a`` in ``[system.u_low, system.u_high]``:

    | System    | nu | physical control                                    | range           |
    |-----------|----|-----------------------------------------------------|-----------------|
    | pendulum  | 1  | torque [N m]                                        | [-5, 5]         |
    | cartpole  | 1  | horizontal force on the cart [N]                    | [-100, 100]     |
    | quadrotor | 4  | motor commands (x100 = PWM)                         | [11.5, 18.3]    |
    | qpole     | 4  | motor deltas around hover                           | +-0.3 u_hover   |

    Finite out-of-range actions are clipped to ``[-1, 1]``; a wrong shape or a NaN/inf raises
    :class:`~deqmpc_gym.errors.ShapeError` (a ``ValueError``).

    ## Observation Space
    ``Box(low, high, (nx,), float32)``: the full physical state, angles wrapped into ``goal +- pi`` and MRPs
    into the ``|sigma| <= 1`` set (``system.wrap``). Never clipped; the bounds (:func:`observation_bounds`)
    are deliberately loose so that honest observations stay inside:

    | System    | nx | state                                                      | loose bound (non-angle) |
    |-----------|----|------------------------------------------------------------|-------------------------|
    | pendulum  | 2  | theta [rad] (0 = upright), theta_dot [rad/s]               | 250 rad/s               |
    | cartpole  | 4  | p [m], theta [rad] (0 = upright), p_dot, theta_dot         | 2000 m, 500 /s          |
    | quadrotor | 12 | r (3) [m], MRP (3), body v (3) [m/s], body w (3) [rad/s]   | 1e4 m, 1e6 /s           |
    | qpole     | 14 | r (3), MRP (3), theta [rad] (pi = up), v (3), w (3), theta_dot | 1e4 m, 1e6 /s       |

    ## Reward
    ``r = exp(-1/2 sum_i w_i (x_i - g_i)^2 - 1/2 sum_j e_j a_j^2)`` in ``(0, 1]`` with ``w =
    system.reward_weights``, ``e = system.effort_weights``, ``g = system.goal`` (angle errors wrapped to
    ``[-pi, pi)``) and ``a = action - to_normalized(system.nominal_control)`` the normalized deviation from the
    nominal control (hover for quadrotors). It is 1 at the goal with nominal control.

    ## Starting State
    ``system.sample_initial_states(np_random, 1)[0]``, wrapped. With obstacles, states whose position is
    within ``obstacle_radius + 0.1 m`` of an obstacle centre are resampled. ``reset(options={"state": x})``
    starts from an explicit ``(nx,)`` finite state instead.

    ## Episode End
    ``terminated`` when the state becomes non-finite (or leaves the float32 range of the observation), when a
    system with a state envelope leaves it (``|x_i - goal_i| > system.state_envelope_i``; quadrotors: positions
    15 m, speeds 50 m/s, body rates 30 rad/s), or on an obstacle collision (``||r - o_k|| < obstacle_radius``).
    ``truncated`` only from the ``TimeLimit`` wrapper (200 steps for the registered ids).

    ## Info
    A fresh dict on every ``reset``/``step``: ``cost`` (float, 1.0 on a collision or an envelope exit, else
    0.0; Safety-Gymnasium convention), ``is_success`` (bool, ``|x_i - g_i| <= system.success_tolerance_i`` for
    all ``i``) and, for obstacle variants, ``min_obstacle_distance`` (float [m], signed distance to the nearest
    sphere surface, < 0 inside). Deterministic (no timings).

    ## Arguments
    ``SystemEnv(system="pendulum", obstacles=False, obstacle_radius=0.5, render_mode=None, width=480,
    height=480)``: ``system`` is a name (``"pendulum"``, ``"cartpole"``, ``"quadrotor"``, ``"qpole"``), a
    :class:`System` subclass or instance; ``render_mode`` is ``None`` or ``"rgb_array"`` (MuJoCo, headless);
    ``width``/``height`` are multiples of 16 pixels. Unknown keyword arguments raise
    :class:`~deqmpc_gym.errors.ConfigError`.

    ## Version History
    * v0: initial release.
    """

    metadata: dict[str, Any] = {"render_modes": ["rgb_array"], "render_fps": 20}

    def __init__(
        self,
        system: str | System | type[System] = "pendulum",
        obstacles: bool = False,
        obstacle_radius: float = 0.5,
        render_mode: str | None = None,
        width: int = 480,
        height: int = 480,
        **kwargs: Any,
    ) -> None:
        check_kwargs(kwargs, VALID_KWARGS, "SystemEnv")
        self.system: System = resolve_system(system)
        sys_ = self.system
        if render_mode is not None and render_mode not in self.metadata["render_modes"]:
            raise ConfigError(f"render_mode must be None or one of {self.metadata['render_modes']}, "
                              f"got {render_mode!r}")
        self.render_mode = render_mode
        self.width, self.height = check_render_size(width, height)
        self.metadata = {**type(self).metadata, "render_fps": max(1, int(round(1.0 / sys_.dt)))}

        self.obstacle_centers: np.ndarray = check_obstacle_config(sys_, obstacles, obstacle_radius)
        self.obstacle_centers.setflags(write=False)
        self.obstacle_radius: float = float(obstacle_radius)
        self.obstacles: bool = bool(obstacles)

        nx, nu = sys_.nx, sys_.nu
        u_low = np.asarray(sys_.u_low, dtype=np.float64)
        u_high = np.asarray(sys_.u_high, dtype=np.float64)
        if u_low.shape != (nu,) or u_high.shape != (nu,) or not np.all(u_high > u_low):
            raise ConfigError(f"{sys_.name}: u_low/u_high must be ({nu},) with u_high > u_low")
        #: ``(nu,)`` float64 scale of the affine action map ``u = action_offset + action_scale * a``.
        self.action_scale: np.ndarray = 0.5 * (u_high - u_low)
        #: ``(nu,)`` float64 offset of the affine action map.
        self.action_offset: np.ndarray = 0.5 * (u_high + u_low)
        self.action_space = gym.spaces.Box(-1.0, 1.0, shape=(nu,), dtype=np.float32)
        low, high = observation_bounds(sys_)
        self.observation_space = gym.spaces.Box(low, high, dtype=np.float32)

        for name, n in (("goal", nx), ("reward_weights", nx), ("effort_weights", nu), ("success_tolerance", nx)):
            shape = np.shape(getattr(sys_, name))
            if shape != (n,):
                raise ConfigError(f"{sys_.name}: {name} must have {n} entries, got shape {shape}")
        #: the task (reward, success, termination, obstacle distance) on numpy float64 arrays.
        self.task: Task = Task.of(sys_, self.obstacle_centers, self.obstacle_radius)
        self._nu = nu
        self._act_shape = (nu,)
        self._quiet = sys_.mrp_slice is not None
        self._x: np.ndarray = np.asarray(sys_.goal, dtype=np.float64).copy()
        self._needs_reset = True
        self._renderer: Any = None
        self._overlay: dict[str, Any] = {}

    # ------------------------------------------------------------------ action map
    def to_physical(self, action: Any) -> np.ndarray:
        """Normalized action ``(..., nu)`` in ``[-1, 1]`` -> physical control ``(..., nu)`` float64 (no clipping)."""
        return self.action_offset + self.action_scale * np.asarray(action, dtype=np.float64)

    def to_normalized(self, u: Any) -> np.ndarray:
        """Physical control ``(..., nu)`` -> normalized action ``(..., nu)`` float64 (no clipping)."""
        return (np.asarray(u, dtype=np.float64) - self.action_offset) / self.action_scale

    @property
    def state(self) -> np.ndarray:
        """A copy of the current wrapped physical state ``(nx,)`` float64."""
        return self._x.copy()

    # ------------------------------------------------------------------ gym API
    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None) -> tuple[np.ndarray, dict]:
        """Reset; ``options={"state": x}`` (``(nx,)`` finite) sets the initial state explicitly.

        Returns ``(obs (nx,) float32, info)``.
        """
        options = check_reset_options(options)
        super().reset(seed=check_seed(seed))
        if options.get("state") is not None:
            x = _state_array(options["state"])
            if x.shape != (self.system.nx,):
                raise ShapeError(f"options['state'] must have shape ({self.system.nx},), got {x.shape}")
            if not np.all(np.isfinite(x.astype(np.float32))):
                raise ShapeError("options['state'] must be finite and within the float32 range of observations")
            with np.errstate(invalid="ignore", divide="ignore"):
                x = self.system.wrap(x)
        else:
            x = sample_initial_state(self.system, self.np_random, self.task)
        self._x = x
        self._needs_reset = False
        violated, dist = self.task.violation(x)
        info: dict[str, Any] = {"cost": 1.0 if violated else 0.0, "is_success": bool(self.task.success(x))}
        if dist is not None:
            info["min_obstacle_distance"] = float(dist)
        return x.astype(np.float32), info

    def step(self, action: Any) -> tuple[np.ndarray, float, bool, bool, dict]:
        """Apply a normalized action ``(nu,)``; returns ``(obs (nx,) float32, reward, terminated, False, info)``.

        Raises :class:`~deqmpc_gym.errors.ResetNeeded` before the first :meth:`reset`.
        """
        if self._needs_reset:
            raise ResetNeeded("SystemEnv.step() called before reset(); call env.reset() to start an episode")
        a = _action_array(action)
        if a.shape != self._act_shape:
            raise ShapeError(f"action must have shape ({self._nu},) (normalized to [-1, 1]), got {a.shape}")
        s = float(a.sum())
        if s - s != 0.0 and not np.all(np.isfinite(a)):
            raise ShapeError(f"action of shape ({self._nu},) must be finite, got {a}")
        np.clip(a, -1.0, 1.0, out=a)
        u = self.action_offset + self.action_scale * a
        if self._quiet:  # MRP shadow switch divides by |sigma|^2 inside np.where (harmless 0/0 at sigma = 0)
            with np.errstate(invalid="ignore", divide="ignore"):
                x = self.system.wrap(self.system.step(self._x, u))
        else:
            x = self.system.wrap(self.system.step(self._x, u))
        self._x = x
        with np.errstate(all="ignore"):  # a huge or non-finite state: its branch of Task.outcome
            out = self.task.outcome(x, a)
        info: dict[str, Any] = {"cost": 1.0 if out.violated else 0.0, "is_success": bool(out.success)}
        if out.distance is not None:
            info["min_obstacle_distance"] = float(out.distance)
        return out.obs, float(out.reward), bool(out.terminated), False, info

    # ------------------------------------------------------------------ rendering
    def set_plan_overlay(self, plan: Any = None, waypoints: Any = None, highlight_obstacles: Any = None) -> None:
        """Draw a plan on the next rendered frames (``None`` everywhere clears it).

        Args:
            plan: ``(T, 3)`` positions [m] or ``(T, nx)`` states (mapped by the renderer's ``state_to_points``),
                drawn as small blue spheres joined by capsules.
            waypoints: same format, drawn as small orange spheres.
            highlight_obstacles: indices of obstacles drawn highlighted (red), or ``None``.
        """
        from deqmpc_gym.envs.rendering import to_points

        ov: dict[str, Any] = {}
        if plan is not None:
            ov["plan"] = to_points(self.system, plan, "plan")
        if waypoints is not None:
            ov["waypoints"] = to_points(self.system, waypoints, "waypoints")
        if highlight_obstacles is not None:
            idx = np.asarray(highlight_obstacles, dtype=np.int64).reshape(-1)
            k = self.obstacle_centers.shape[0]
            if idx.size and (idx.min() < 0 or idx.max() >= k):
                raise ConfigError(f"highlight_obstacles indices must be in [0, {k}), got {idx.tolist()}")
            ov["highlight"] = idx
        self._overlay = ov

    def render_snapshot(self) -> dict[str, Any]:
        """What :meth:`render` would draw now (state and overlay copies), for rendering in another thread with
        a renderer from :meth:`make_renderer`: ``make_renderer().render(snap["x"], **snap["overlay"])``."""
        return {"x": self._x.copy(), "overlay": dict(self._overlay)}

    def make_renderer(self) -> Any:
        """A new, independent :class:`~deqmpc_gym.envs.rendering.SystemRenderer` of this env's scene (its GL
        context belongs to the thread that first renders with it)."""
        from deqmpc_gym.envs.rendering import SystemRenderer

        return SystemRenderer(self.system, self.width, self.height, self.obstacle_centers, self.obstacle_radius)

    def render(self) -> np.ndarray | None:
        """Return an ``(height, width, 3)`` uint8 frame of the current state (``render_mode="rgb_array"``)."""
        if self.render_mode is None:
            gym.logger.warn("render() called without render_mode; pass render_mode='rgb_array' to gym.make")
            return None
        if self._renderer is None:
            self._renderer = self.make_renderer()
        return self._renderer.render(self._x, **self._overlay)

    def close(self) -> None:
        """Release the renderer (idempotent)."""
        if self._renderer is not None:
            self._renderer.close()
            self._renderer = None
