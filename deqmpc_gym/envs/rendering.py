"""Headless MuJoCo ``rgb_array`` rendering of the analytic system states.

MuJoCo is used only as a renderer: each system gets a small MJCF scene (built as an XML string) whose bodies
are *mocap* bodies, so every frame is posed directly from the analytic state (no MuJoCo physics). ``MUJOCO_GL``
defaults to ``egl`` (set before ``mujoco`` is imported, which happens only here, on the first ``render()``).

Scenes: pendulum (pivot, rod, bob), cart-pole (rail, cart, 2 m pole), quadrotor (body box, 4 arms, 4 rotor
discs), QPole (quadrotor plus a 0.5 m pole in the world x-z plane, ``theta = pi`` upright), optional obstacle
spheres (translucent) and a green goal marker. Quadrotor scenes use a camera tracking the vehicle, the cart-pole
camera follows the cart along x and the pendulum camera is fixed.

Overlays (:meth:`SystemRenderer.render` ``plan``/``waypoints``/``highlight``) are appended as extra geoms to
``renderer.scene`` after ``update_scene``, so frames differ only where the overlay is drawn.

Software EGL (llvmpipe) cost: the scenes use coarse plane subdivisions, 16 x 8 sphere/capsule tessellation and
nearest-mipmap texture sampling (1.3-3.6 ms per 480x480 frame instead of 6-12 ms, visually the same). The GL
part (:class:`SceneRenderer`) needs only the scene XML and the mocap poses, so frames can be rendered in another
process; GL contexts of closed renderers are pooled for reuse (a new one costs 50-150 ms).
"""

from __future__ import annotations

import atexit
import math
import os
import threading
from typing import TYPE_CHECKING, Any

import numpy as np

from deqmpc_gym.errors import ConfigError, DependencyNotInstalled, ShapeError

if TYPE_CHECKING:  # (importing the systems would import torch, which the video render server does not need)
    from deqmpc_gym.systems import System

PLAN_RGBA = (0.15, 0.45, 1.0, 0.9)
WAYPOINT_RGBA = (1.0, 0.55, 0.0, 0.9)
HIGHLIGHT_RGBA = (1.0, 0.1, 0.1, 0.55)
OBSTACLE_RGBA = (0.85, 0.3, 0.3, 0.3)
GOAL_RGBA = (0.1, 0.9, 0.2, 0.9)

CARTPOLE_POLE_LENGTH = 2.0  # [m] drawn pole (COM at 1 m)
PENDULUM_LENGTH = 1.0  # [m]

#: Render subdivision [m] of the floor planes (MuJoCo's third plane size; lighting is per vertex, so it only
#: smooths the headlight shading, the checker texture is unaffected). 0.1 m meant up to 200x200 quads per plane,
#: which dominated software-GL (llvmpipe) frame time; 1 m is ~2.5x faster and visually the same.
FLOOR_GRID = 1.0
#: Render subdivision [m] of the flat backdrop of the planar scenes.
BACKDROP_GRID = 2.0
#: Tessellation of spheres, capsules and cylinders (MuJoCo's defaults are 28 x 16): the geoms are at most a few
#: dozen pixels wide at 480x480, and the overlay spheres and capsules are drawn every frame.
NUMSLICES, NUMSTACKS = 16, 8


def _is_quad(system: System) -> bool:
    return system.mrp_slice is not None and system.position_slice is not None


#: y offset [m] of planar overlay points, in front of the pendulum bob / pole (the camera looks along +y).
PLANAR_FRONT = -0.2


def state_to_points(system: System, x: Any) -> np.ndarray:
    """Map states ``(..., nx)`` to one 3-D point ``(..., 3)`` [m] used for goals, plans and overlays.

    pendulum: the bob ``(-sin theta, y_f, cos theta)``; cart-pole: the pole tip ``(p - 2 sin theta, y_f, 2 cos
    theta)``, with ``y_f = PLANAR_FRONT`` placing the points in front of the bodies (towards the camera) so
    that overlays are never hidden inside them; quadrotor / QPole (any system with a ``position_slice``): the 3-D
    position. Other systems: the first (up to three) configuration coordinates padded with zeros.
    """
    x = np.asarray(x, dtype=np.float64)
    if x.shape[-1] != system.nx:
        raise ShapeError(f"states must have shape (..., {system.nx}), got {x.shape}")
    if system.position_slice is not None:
        a, b = system.position_slice
        return x[..., a:b].copy()
    if system.name == "pendulum":
        th = x[..., 0]
        return np.stack([-PENDULUM_LENGTH * np.sin(th), np.full_like(th, PLANAR_FRONT), PENDULUM_LENGTH * np.cos(th)],
                        -1)
    if system.name == "cartpole":
        p, th = x[..., 0], x[..., 1]
        L = CARTPOLE_POLE_LENGTH
        return np.stack([p - L * np.sin(th), np.full_like(th, PLANAR_FRONT), L * np.cos(th)], -1)
    q = x[..., : min(3, system.nq)]
    pad = np.zeros(x.shape[:-1] + (3 - q.shape[-1],))
    return np.concatenate([q, pad], -1)


def to_points(system: System, pts: Any, name: str = "points") -> np.ndarray:
    """``(T, 3)`` positions, or ``(T, nx)`` states mapped by :func:`state_to_points`, as float64 ``(T, 3)``."""
    a = np.asarray(pts, dtype=np.float64)
    if a.ndim != 2 or a.shape[-1] not in (3, system.nx):
        raise ShapeError(f"{name} must have shape (T, 3) positions or (T, {system.nx}) states, got {a.shape}")
    if a.shape[-1] == system.nx and system.nx != 3:
        a = state_to_points(system, a)
    if not np.all(np.isfinite(a)):
        raise ShapeError(f"{name} must be finite")
    return a


def _f(v: Any) -> str:
    return " ".join(f"{float(t):.6g}" for t in np.ravel(v))


def _quad_body(name: str, arm: float) -> str:
    la = arm / math.sqrt(2.0)
    arms, rotors = [], []
    for sx, sy in ((1, 1), (1, -1), (-1, -1), (-1, 1)):
        ex, ey = sx * la, sy * la
        arms.append(f'<geom type="capsule" fromto="0 0 0 {ex:.4f} {ey:.4f} 0" size="0.012" rgba="0.2 0.2 0.2 1"/>')
        col = "0.9 0.2 0.2 0.8" if sx > 0 else "0.2 0.4 0.9 0.8"
        rotors.append(f'<geom type="cylinder" pos="{ex:.4f} {ey:.4f} 0.02" size="{0.45 * la:.4f} 0.004" rgba="{col}"/>')
    return (f'<body name="{name}" mocap="true">'
            f'<geom type="box" size="0.08 0.08 0.03" rgba="0.3 0.3 0.35 1"/>' + "".join(arms) + "".join(rotors)
            + '<camera name="track" mode="track" pos="-1.7 -1.7 1.0" xyaxes="1 -1 0 0.6 0.6 2.4" fovy="60"/>'
            + '</body>')


def build_scene_xml(system: System, width: int, height: int, centers: np.ndarray, radius: float) -> tuple[str, str]:
    """``(MJCF XML, camera name)`` of ``system``'s scene (offscreen buffer of exactly the frame size)."""
    goal_pt = state_to_points(system, np.asarray(system.goal, dtype=np.float64))
    parts: list[str] = []
    cam = "fixed"
    if _is_quad(system):
        fb = float(system.flight_bound or 15.0)
        parts.append(f'<geom type="plane" pos="0 0 {-6.5:.2f}" size="{fb + 5:.1f} {fb + 5:.1f} {FLOOR_GRID:g}" '
                     'material="grid"/>')
        parts.append(_quad_body("vehicle", float(getattr(getattr(system, "params", None), "arm", 0.2))))
        if system.name == "qpole" or getattr(system, "pole_length", None) is not None:
            L = float(getattr(system, "pole_length", 0.5))
            parts.append(f'<body name="pole" mocap="true"><geom type="capsule" fromto="0 0 0 0 0 {-L:.4f}" '
                         f'size="0.015" rgba="0.95 0.75 0.1 1"/>'
                         f'<geom type="sphere" pos="0 0 {-L:.4f}" size="0.04" rgba="0.95 0.75 0.1 1"/></body>')
        cam = "track"
    elif system.name == "pendulum":
        parts.append(f'<geom type="plane" pos="0 0 -1.6" size="6 6 {FLOOR_GRID:g}" material="grid"/>')
        parts.append('<geom type="cylinder" pos="0 0 0" euler="90 0 0" size="0.06 0.05" rgba="0.3 0.3 0.3 1"/>')
        parts.append('<body name="rod" mocap="true">'
                     f'<geom type="capsule" fromto="0 0 0 0 0 {PENDULUM_LENGTH}" size="0.025" rgba="0.8 0.5 0.2 1"/>'
                     f'<geom type="sphere" pos="0 0 {PENDULUM_LENGTH}" size="0.1" rgba="0.8 0.2 0.2 1"/></body>')
        parts.append('<camera name="fixed" pos="0 -3.4 0" xyaxes="1 0 0 0 0 1" fovy="55"/>')
    elif system.name == "cartpole":
        L = CARTPOLE_POLE_LENGTH
        parts.append(f'<geom type="plane" pos="0 0 -0.35" size="60 10 {FLOOR_GRID:g}" material="grid"/>')
        parts.append('<geom type="box" pos="0 0 -0.12" size="60 0.03 0.02" rgba="0.4 0.4 0.4 1"/>')
        parts.append('<body name="cart" mocap="true"><geom type="box" size="0.3 0.2 0.1" rgba="0.2 0.4 0.8 1"/>'
                     '<camera name="fixed" mode="track" pos="0 -7 1" xyaxes="1 0 0 0 0.15 1" fovy="50"/></body>')
        parts.append(f'<body name="rod" mocap="true"><geom type="capsule" fromto="0 0 0 0 0 {L}" size="0.03" '
                     'rgba="0.8 0.5 0.2 1"/></body>')
    else:
        parts.append(f'<geom type="plane" pos="0 0 -2" size="20 20 {FLOOR_GRID:g}" material="grid"/>')
        parts.append('<body name="point" mocap="true"><geom type="sphere" size="0.1" rgba="0.8 0.2 0.2 1"/></body>')
        parts.append('<camera name="fixed" pos="0 -6 1" xyaxes="1 0 0 0 0.2 1" fovy="60"/>')
    parts.append(f'<site name="goal" pos="{_f(goal_pt)}" size="0.06" rgba="{_f(GOAL_RGBA)}"/>')
    if _is_quad(system):  # free camera: a gradient skybox
        sky = ('<texture name="sky" type="skybox" builtin="gradient" rgb1="0.6 0.75 0.9" rgb2="0.15 0.2 0.3" '
               'width="64" height="64"/>')
    else:  # camera looking along +y: a flat backdrop renders ~2x faster than a skybox in software GL
        sky = ""
        parts.append(f'<geom type="plane" pos="0 12 0" zaxis="0 -1 0" size="80 40 {BACKDROP_GRID:g}" '
                     'rgba="0.55 0.68 0.82 1" contype="0" conaffinity="0"/>')
    for k, c in enumerate(centers):
        parts.append(f'<geom name="obstacle{k}" type="sphere" pos="{_f(c)}" size="{radius:.6g}" '
                     f'rgba="{_f(OBSTACLE_RGBA)}" contype="0" conaffinity="0"/>')
    return f"""<mujoco model="deqmpc_{system.name}">
  <visual><global offwidth="{width}" offheight="{height}"/>
    <quality shadowsize="0" offsamples="0" numslices="{NUMSLICES}" numstacks="{NUMSTACKS}"/>
    <headlight ambient="0.4 0.4 0.4" diffuse="0.6 0.6 0.6"/></visual>
  <asset>
    {sky}
    <texture name="grid" type="2d" builtin="checker" rgb1="0.35 0.38 0.42" rgb2="0.25 0.27 0.3"
             width="256" height="256"/>
    <material name="grid" texture="grid" texrepeat="16 16" reflectance="0"/>
  </asset>
  <worldbody>
    <light pos="0 0 12" dir="0 0 -1" directional="true" diffuse="0.6 0.6 0.6"/>
    {chr(10).join('    ' + p for p in parts)}
  </worldbody>
</mujoco>
""", cam


def _quat_y(angle: float) -> np.ndarray:
    """Quaternion ``(w, x, y, z)`` of a rotation by ``angle`` [rad] about the world y axis."""
    return np.array([math.cos(0.5 * angle), 0.0, math.sin(0.5 * angle), 0.0])


def _mrp_to_quat(s: np.ndarray) -> np.ndarray:
    n = float(s @ s)
    return np.concatenate([[1.0 - n], 2.0 * s]) / (1.0 + n)


#: Closed renderers kept for reuse (at most this many): creating a GL context and uploading a scene costs
#: 50-150 ms with software EGL (llvmpipe JIT-compiles its shaders for every new context), more than rendering a
#: short episode. Only EGL contexts are pooled (they can move between threads once released).
POOL_SIZE = 4
_pool: list[tuple[tuple[str, int, int], Any]] = []  # (scene key, mujoco.Renderer), oldest first
_pool_lock = threading.Lock()
_pool_state = {"atexit": False, "pid": os.getpid()}


def _pool_take(key: tuple[str, int, int]) -> Any | None:
    with _pool_lock:
        if _pool_state["pid"] != os.getpid():  # forked child: the parent's GL contexts are not usable here
            return None
        for i, (k, r) in enumerate(_pool):
            if k == key:
                del _pool[i]
                return r
    return None


def _pool_put(key: tuple[str, int, int], renderer: Any) -> bool:
    """Detach ``renderer``'s EGL context from the calling thread and keep it for reuse.

    Returns False (the caller frees it) for other GL backends, or when the context is not current in the calling
    thread (it could be current in another one, and must not be handed out then).
    """
    ctx = getattr(renderer, "_gl_context", None)
    if POOL_SIZE <= 0 or ctx is None or _pool_state["pid"] != os.getpid():
        return False
    try:
        from mujoco import egl

        if not isinstance(ctx, egl.GLContext):
            return False
        current = egl.EGL.eglGetCurrentContext()
        mine = getattr(ctx, "_context", None)
        if egl.EGL_DISPLAY is None or not current or not mine or current.address != mine.address:
            return False
        if not egl.EGL.eglMakeCurrent(egl.EGL_DISPLAY, egl.EGL.EGL_NO_SURFACE, egl.EGL.EGL_NO_SURFACE,
                                      egl.EGL.EGL_NO_CONTEXT):
            return False
    except Exception:  # an unexpected mujoco/PyOpenGL version: just free it
        return False
    with _pool_lock:
        _pool.append((key, renderer))
        evicted = [r for _, r in _pool[:-POOL_SIZE]]
        del _pool[:-POOL_SIZE]
        if not _pool_state["atexit"]:  # runs before mujoco.egl's display teardown (registered earlier)
            atexit.register(clear_renderer_pool)
            _pool_state["atexit"] = True
    for r in evicted:
        r.close()
    return True


def clear_renderer_pool() -> None:
    """Free the pooled GL contexts (also done at interpreter exit)."""
    with _pool_lock:
        items = [r for _, r in _pool]
        _pool.clear()
        forked = _pool_state["pid"] != os.getpid()
    if not forked:
        for r in items:
            r.close()


def _forget_pool_in_child() -> None:
    """After ``fork()``: never use (nor free) the parent's GL contexts; the lock may have been held."""
    global _pool_lock
    _pool_lock = threading.Lock()
    _pool_graveyard.extend(_pool)  # kept referenced: freeing them would issue GL calls
    _pool.clear()


_pool_graveyard: list[Any] = []
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_pool_in_child)


def _import_mujoco() -> Any:
    os.environ.setdefault("MUJOCO_GL", "egl")
    try:
        import mujoco
    except ImportError as exc:  # pragma: no cover
        raise DependencyNotInstalled(f"rendering needs mujoco (pip install mujoco): {exc}") from exc
    return mujoco


class SceneRenderer:
    """Renders one scene XML (from :func:`build_scene_xml`) posed by its mocap bodies; needs no :class:`System`.

    The MuJoCo model is built at once; the GL context (taken from the pool when possible) on the first
    :meth:`render`, in the thread that renders. This is the part of :class:`SystemRenderer` that the video
    render server (:mod:`deqmpc_gym.wrappers`) runs in another process.

    Args:
        xml, width, height, camera: scene, frame size [px] and camera name. centers: ``(K, 3)`` obstacle centres
            [m]; radius: obstacle radius [m] (for the highlight overlay).
    """

    def __init__(self, xml: str, width: int, height: int, camera: str, centers: Any = (), radius: float = 0.0) -> None:
        self._mj = _import_mujoco()
        self.xml, self.width, self.height, self.camera = xml, int(width), int(height), camera
        self.centers = np.asarray(centers, dtype=np.float64).reshape(-1, 3)
        self.radius = float(radius)
        self._key = (xml, self.width, self.height)
        self.model = self._mj.MjModel.from_xml_string(xml)
        self.data = self._mj.MjData(self.model)
        self._renderer: Any = None
        self._closed = False

    def _gl(self) -> Any:
        if self._renderer is None:
            mj = self._mj
            r = _pool_take(self._key)
            if r is None:
                r = mj.Renderer(self.model, height=self.height, width=self.width, max_geom=2000)
                _nearest_mipmap(r)
            else:  # the pooled renderer's own (identical) model
                self.model, self.data = r.model, mj.MjData(r.model)
            self._renderer = r
        return self._renderer

    def _add_geom(self, gtype: Any, size: Any, pos: Any, rgba: Any) -> bool:
        scn = self._renderer.scene
        if scn.ngeom >= scn.maxgeom:
            return False
        self._mj.mjv_initGeom(scn.geoms[scn.ngeom], gtype, np.asarray(size, dtype=np.float64),
                              np.asarray(pos, dtype=np.float64), _EYE9, np.asarray(rgba, dtype=np.float32))
        scn.ngeom += 1
        return True

    def _add_path(self, pts: np.ndarray, rgba: Any, r: float) -> None:
        mj = self._mj
        scn = self._renderer.scene
        for k, p in enumerate(pts):
            if not self._add_geom(mj.mjtGeom.mjGEOM_SPHERE, [r, 0, 0], p, rgba):
                return
            if k > 0 and scn.ngeom < scn.maxgeom and np.linalg.norm(p - pts[k - 1]) > 1e-9:
                g = scn.geoms[scn.ngeom]
                mj.mjv_initGeom(g, mj.mjtGeom.mjGEOM_CAPSULE, np.zeros(3), np.zeros(3), _EYE9,
                                np.asarray(rgba, dtype=np.float32))
                mj.mjv_connector(g, mj.mjtGeom.mjGEOM_CAPSULE, 0.4 * r, pts[k - 1], p)
                scn.ngeom += 1

    def render(self, mocap_pos: Any, mocap_quat: Any, plan: np.ndarray | None = None,
               waypoints: np.ndarray | None = None, highlight: np.ndarray | None = None) -> np.ndarray:
        """Render the scene with the mocap bodies at ``mocap_pos (nmocap, 3)`` / ``mocap_quat (nmocap, 4)`` (plus
        optional overlays, see :meth:`SystemRenderer.render`) into a new ``(height, width, 3)`` uint8 frame."""
        if self._closed:
            raise RuntimeError("renderer is closed")
        mj = self._mj
        renderer = self._gl()
        if self.model.nmocap:
            self.data.mocap_pos[:] = mocap_pos
            self.data.mocap_quat[:] = mocap_quat
        mj.mj_forward(self.model, self.data)
        renderer.update_scene(self.data, camera=self.camera)
        if plan is not None:
            self._add_path(np.asarray(plan, dtype=np.float64), PLAN_RGBA, 0.03)
        if waypoints is not None:
            for p in np.asarray(waypoints, dtype=np.float64):
                self._add_geom(mj.mjtGeom.mjGEOM_SPHERE, [0.045, 0, 0], p, WAYPOINT_RGBA)
        if highlight is not None and self.centers.shape[0]:
            for k in np.asarray(highlight, dtype=np.int64).reshape(-1):
                if not 0 <= k < self.centers.shape[0]:
                    raise ConfigError(f"obstacle index {k} out of range [0, {self.centers.shape[0]})")
                self._add_geom(mj.mjtGeom.mjGEOM_SPHERE, [self.radius * 1.03, 0, 0], self.centers[k], HIGHLIGHT_RGBA)
        return renderer.render()  # a new array

    def close(self) -> None:
        """Release the GL context (to the pool, or freed; idempotent)."""
        if not self._closed:
            self._closed = True
            r, self._renderer = self._renderer, None
            if r is not None and not _pool_put(self._key, r):
                r.close()


_EYE9 = np.eye(3).flatten()


def _nearest_mipmap(renderer: Any) -> None:
    """Sample the 2-D textures (the checker floor) from the nearest mipmap level, bilinearly.

    MuJoCo sets trilinear filtering; blending two mipmap levels per pixel costs llvmpipe ~25% of a 480x480 frame
    of the planar scenes, and changes pixels by < 0.1 grey level on average (at most 6 of 255). Best effort:
    skipped if PyOpenGL or the context is not as expected.
    """
    try:
        import mujoco
        from OpenGL import GL

        ctx, gl_ctx = renderer._mjr_context, renderer._gl_context
        if gl_ctx is not None:
            gl_ctx.make_current()
        for i in range(int(ctx.ntexture)):
            if int(ctx.textureType[i]) == int(mujoco.mjtTexture.mjTEXTURE_2D):
                GL.glBindTexture(GL.GL_TEXTURE_2D, int(ctx.texture[i]))
                GL.glTexParameteri(GL.GL_TEXTURE_2D, GL.GL_TEXTURE_MIN_FILTER, GL.GL_LINEAR_MIPMAP_NEAREST)
        GL.glBindTexture(GL.GL_TEXTURE_2D, 0)
    except Exception:  # pragma: no cover - other backends / versions render as MuJoCo set them up
        pass


class SystemRenderer:
    """MuJoCo renderer of one system's scene (the GL context is created on the first :meth:`render`).

    Closing it returns its GL context to a small process-wide pool (see :data:`POOL_SIZE`), from which a later
    renderer of the same scene and size (e.g. the next ``RecordVideo`` or ``gym.make(...).render()``) is served.
    :meth:`frame_spec` / :attr:`scene_spec` describe frames without GL, for rendering them elsewhere with a
    :class:`SceneRenderer` (``SceneRenderer(**scene_spec).render(**frame_spec(x, ...))`` gives the same frame).

    Args:
        system: the system. width, height: frame size [px]. centers: ``(K, 3)`` obstacle centres [m] (``K`` may
            be 0). radius: obstacle radius [m].
    """

    def __init__(self, system: System, width: int, height: int, centers: np.ndarray, radius: float) -> None:
        self.system = system
        self.width, self.height = int(width), int(height)
        self.centers = np.asarray(centers, dtype=np.float64).reshape(-1, 3)
        self.radius = float(radius)
        xml, cam = build_scene_xml(system, self.width, self.height, self.centers, self.radius)
        self.xml = xml
        self.camera = cam
        self._scene = SceneRenderer(xml, self.width, self.height, cam, self.centers, self.radius)
        mujoco = self._scene._mj
        model = self._scene.model
        self._mocap = {mujoco.mj_id2name(model, mujoco.mjtObj.mjOBJ_BODY, int(b)): int(model.body_mocapid[b])
                       for b in range(model.nbody) if model.body_mocapid[b] >= 0}
        ids = model.body_mocapid
        bodies = np.flatnonzero(ids >= 0)[np.argsort(ids[ids >= 0])]  # the body of each mocap slot
        self._pos0, self._quat0 = model.body_pos[bodies].copy(), model.body_quat[bodies].copy()

    @property
    def model(self) -> Any:
        return self._scene.model

    @property
    def data(self) -> Any:
        return self._scene.data

    @property
    def scene_spec(self) -> dict[str, Any]:
        """Keyword arguments of an equivalent :class:`SceneRenderer` (plain, picklable values)."""
        return {"xml": self.xml, "width": self.width, "height": self.height, "camera": self.camera,
                "centers": self.centers.copy(), "radius": self.radius}

    def mocap(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Mocap body positions ``(nmocap, 3)`` and quaternions ``(nmocap, 4)`` posing state ``x (nx,)``
        (non-finite entries are drawn at 0)."""
        s = self.system
        pos, quat = self._pos0.copy(), self._quat0.copy()

        def put(body: str, p: Any, q: Any | None = None) -> None:
            i = self._mocap.get(body)
            if i is not None:
                pos[i] = p
                if q is not None:
                    quat[i] = q

        x = np.nan_to_num(np.asarray(x, dtype=np.float64), nan=0.0, posinf=1e4, neginf=-1e4)
        if _is_quad(s):
            p = x[slice(*s.position_slice)]
            a, b = s.mrp_slice
            put("vehicle", p, _mrp_to_quat(x[a:b]))
            if s.angle_indices:
                put("pole", p, _quat_y(float(x[s.angle_indices[0]])))
        elif s.name == "pendulum":
            put("rod", np.zeros(3), _quat_y(-float(x[0])))
        elif s.name == "cartpole":
            put("cart", np.array([x[0], 0.0, 0.0]))
            put("rod", np.array([x[0], 0.0, 0.0]), _quat_y(-float(x[1])))
        else:
            put("point", state_to_points(s, x))
        return pos, quat

    def frame_spec(self, x: np.ndarray, plan: np.ndarray | None = None, waypoints: np.ndarray | None = None,
                   highlight: np.ndarray | None = None) -> dict[str, Any]:
        """Keyword arguments of :meth:`SceneRenderer.render` for the frame :meth:`render` would draw (no GL)."""
        pos, quat = self.mocap(x)
        return {"mocap_pos": pos, "mocap_quat": quat, "plan": plan, "waypoints": waypoints, "highlight": highlight}

    def pose(self, x: np.ndarray) -> None:
        """Pose the mocap bodies of :attr:`data` from a state ``(nx,)`` (non-finite entries are drawn at 0)."""
        pos, quat = self.mocap(x)
        if self.model.nmocap:
            self.data.mocap_pos[:] = pos
            self.data.mocap_quat[:] = quat
        self._scene._mj.mj_forward(self.model, self.data)

    def render(self, x: np.ndarray, plan: np.ndarray | None = None, waypoints: np.ndarray | None = None,
               highlight: np.ndarray | None = None) -> np.ndarray:
        """Render state ``x (nx,)`` (plus optional overlays) into a fresh ``(height, width, 3)`` uint8 frame.

        Args:
            plan, waypoints: ``(T, 3)`` points [m] drawn as spheres (plan: joined by capsules).
            highlight: obstacle indices drawn in red.
        """
        return self._scene.render(**self.frame_spec(x, plan, waypoints, highlight))

    def close(self) -> None:
        """Release the GL context (to the pool, or freed; idempotent)."""
        self._scene.close()
