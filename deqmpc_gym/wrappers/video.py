"""Video recording with imageio (mp4 via imageio-ffmpeg, GIF fallback) and episode statistics.

:class:`RecordVideo` keeps Gymnasium's trigger semantics (``episode_trigger``, ``video_length``,
``name_prefix``) but streams frames to the writer (no whole-episode buffering) and needs no moviepy. Files are
named ``{name_prefix}-episode-{k}.mp4`` (``.gif`` when ffmpeg is unavailable). When ``plan_source`` (e.g. a
:class:`~deqmpc_gym.policies.DEQMPCPolicy`) exposes ``last_plan``, every frame shows the MPC's predicted
trajectory (blue) and the network's waypoints (orange); on obstacle envs the obstacles nearest to the plan
are highlighted.

Recording ``DEQMPC/*`` envs costs the caller little: each step only sends the frame's mocap poses and plan
points (a few hundred bytes) to a render-server child process (:mod:`deqmpc_gym.wrappers._render_server`),
which renders with MuJoCo (software EGL is ~1.5-3 ms per 480x480 frame) and pipes the frames to ffmpeg
(ultrafast x264, ~1.3 ms of CPU per frame), in parallel with the policy. The first recording in a process starts
the server (~0.4 s: Python, MuJoCo, a GL context); later recorders reuse it and its GL context.
"""

from __future__ import annotations

import atexit
import os
import pickle
import queue
import struct
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, BinaryIO

import gymnasium as gym
import numpy as np

from deqmpc_gym.errors import ConfigError, DependencyNotInstalled


def capped_cubic_video_schedule(episode_id: int) -> bool:
    """Gymnasium's default trigger: episodes 0, 1, 8, 27, ..., 729, 1000, then every 1000th."""
    if episode_id < 1000:
        return int(round(episode_id ** (1.0 / 3))) ** 3 == episode_id
    return episode_id % 1000 == 0


def _ffmpeg_available() -> bool:
    try:
        import imageio_ffmpeg

        return bool(imageio_ffmpeg.get_ffmpeg_exe())
    except Exception:  # missing package or binary
        return False


class FrameWriter:
    """Streaming writer of uint8 ``(H, W, 3)`` frames to ``path`` (.mp4 with ffmpeg, else .gif).

    ``H`` and ``W`` should be multiples of 16 (the mp4 macro-block size); :meth:`close` checks that the file
    exists and is complete -- an mp4 must hold exactly one video sample per appended frame (read from its
    ``moov`` index, no decoding), a GIF must decode -- raising ``RuntimeError`` otherwise.
    """

    def __init__(self, path: str | Path, fps: float) -> None:
        try:
            import imageio.v2 as iio
        except ImportError as exc:  # pragma: no cover - imageio is a dependency
            raise DependencyNotInstalled("imageio is required for video recording: "
                                         "pip install imageio imageio-ffmpeg") from exc
        self.fps = float(fps)
        base = Path(path)
        self.path = base.with_suffix(".mp4" if _ffmpeg_available() else ".gif")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._tmp = self.path.with_name(f".{self.path.stem}.tmp{self.path.suffix}")
        if self.path.suffix == ".mp4":
            # ultrafast x264 (~1.3 ms of ffmpeg CPU per 480x480 frame, in its own process); one encoder thread is
            # plenty at these frame rates and leaves the cores to the rollout and the renderer
            self._writer = iio.get_writer(self._tmp, fps=self.fps, codec="libx264", macro_block_size=16,
                                          quality=7, ffmpeg_log_level="error",
                                          output_params=["-preset", "ultrafast", "-tune", "animation",
                                                         "-threads", "1"])
        else:
            self._writer = iio.get_writer(self._tmp, mode="I", duration=1000.0 / self.fps, loop=0)
        self.frames = 0

    def append(self, frame: np.ndarray) -> None:
        """Write one uint8 ``(H, W, 3)`` frame."""
        if frame.dtype != np.uint8 or frame.ndim != 3 or frame.shape[2] != 3:
            raise ConfigError(f"frames must be uint8 (H, W, 3), got {frame.dtype} {frame.shape}")
        self._writer.append_data(frame)
        self.frames += 1

    def close(self) -> Path:
        """Finish the file, verify it and move it into place; returns its path."""
        self._writer.close()
        if self.frames == 0 or not self._tmp.exists() or self._tmp.stat().st_size == 0:
            if self._tmp.exists():
                self._tmp.unlink()
            raise RuntimeError(f"video {self.path} was not written ({self.frames} frames); check the frame size "
                               "(multiples of 16) and the ffmpeg install")
        try:
            if self.path.suffix == ".mp4":
                n = mp4_sample_count(self._tmp)
                if n != self.frames:
                    raise ValueError(f"it holds {n} video samples for {self.frames} frames written")
            else:
                import imageio.v3 as iio3

                iio3.improps(self._tmp, index=0)
        except Exception as exc:
            raise RuntimeError(f"video {self.path} is not readable after writing: {exc}") from exc
        os.replace(self._tmp, self.path)
        return self.path

    def discard(self) -> None:
        """Stop writing and delete the unfinished file."""
        try:
            self._writer.close()
        except Exception:
            pass
        if self._tmp.exists():
            self._tmp.unlink()


def _boxes(f: BinaryIO, start: int, end: int) -> Iterator[tuple[bytes, int, int]]:
    """``(type, payload start, box end)`` of the ISO-BMFF boxes in ``[start, end)`` of ``f``."""
    pos = start
    while pos + 8 <= end:
        f.seek(pos)
        size, kind = struct.unpack(">I4s", f.read(8))
        head = 8
        if size == 1:  # 64-bit size
            size, head = struct.unpack(">Q", f.read(8))[0], 16
        elif size == 0:  # to the end
            size = end - pos
        if size < head or pos + size > end:
            raise ValueError(f"truncated or corrupt {kind!r} box at byte {pos}")
        yield kind, pos + head, pos + size
        pos += size


def mp4_sample_count(path: str | Path) -> int:
    """Number of video samples (frames) in the first video track of the mp4 ``path``, from its ``moov`` index.

    Raises ``ValueError`` if the file has no media data, no ``moov`` index or no video track (e.g. the encoder
    was killed before finishing it). Reads a few hundred bytes; nothing is decoded.
    """
    with open(path, "rb") as f:
        end = f.seek(0, os.SEEK_END)
        top = {kind: (a, b) for kind, a, b in _boxes(f, 0, end)}
        if b"mdat" not in top or top[b"mdat"][1] <= top[b"mdat"][0]:
            raise ValueError("no media data")
        if b"moov" not in top:
            raise ValueError("no moov index (unfinished file)")

        def child(kind: bytes, a: int, b: int) -> tuple[int, int] | None:
            return next(((x, y) for k, x, y in _boxes(f, a, b) if k == kind), None)

        for kind, a, b in _boxes(f, *top[b"moov"]):
            if kind != b"trak":
                continue
            mdia = child(b"mdia", a, b)
            hdlr = mdia and child(b"hdlr", *mdia)
            if not hdlr:
                continue
            f.seek(hdlr[0] + 8)  # version/flags, pre_defined
            if f.read(4) != b"vide":
                continue
            minf = child(b"minf", *mdia)
            stbl = minf and child(b"stbl", *minf)
            stsz = stbl and child(b"stsz", *stbl)
            if not stsz:
                raise ValueError("video track without a sample-size table")
            f.seek(stsz[0] + 8)  # version/flags, sample_size
            return int(struct.unpack(">I", f.read(4))[0])
    raise ValueError("no video track")


class _RenderWorker:
    """Renders env snapshots and writes the frames in a background thread, for all episodes of one recorder.

    The thread creates its own renderer as soon as it starts (``make_renderer()``; a GL context belongs to the
    thread that uses it) and keeps it until :meth:`stop`, so it is built once per :class:`RecordVideo`, not per
    episode. Only part of the work overlaps with the caller's policy: MuJoCo releases the GIL while the software
    rasterizer finishes the frame (``mjr_readPixels``) and the pipe write to ffmpeg releases it too, but the scene
    submission (``mjr_render``) and the Python glue hold it -- hence the render server is the default.
    ``submit`` blocks when ``max_pending`` snapshots (a state and a short plan each) are waiting; an error in the
    thread is re-raised by the next ``submit``, ``flush`` or ``stop``.
    """

    def __init__(self, make_renderer: Callable[[], Any], max_pending: int = 256) -> None:
        self._queue: queue.Queue = queue.Queue(max_pending)
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, args=(make_renderer,), daemon=True,
                                        name="deqmpc-video")
        self._thread.start()

    def _run(self, make_renderer: Callable[[], Any]) -> None:
        renderer = None
        try:
            renderer = make_renderer()
            while (item := self._queue.get()) is not None:
                writer, snap = item
                if isinstance(snap, threading.Event):  # flush marker: everything before it is written
                    snap.set()
                    continue
                writer.append(renderer.render(snap["x"], **snap["overlay"]))
        except BaseException as exc:  # reported to the caller's thread
            self._error = exc
        finally:
            if renderer is not None:
                renderer.close()

    def _check(self) -> None:
        if self._error is not None:
            raise RuntimeError(f"video rendering failed: {self._error}") from self._error

    def _put(self, item: Any) -> None:
        while True:
            self._check()
            try:
                self._queue.put(item, timeout=0.5)
                return
            except queue.Full:
                if not self._thread.is_alive():
                    self._check()
                    raise RuntimeError("video rendering thread stopped unexpectedly") from None

    def submit(self, writer: FrameWriter, snapshot: dict[str, Any]) -> None:
        """Queue one frame of ``snapshot`` (from ``env.render_snapshot()``) for ``writer``."""
        self._put((writer, snapshot))

    def flush(self) -> None:
        """Wait until every submitted frame is written."""
        done = threading.Event()
        self._put((None, done))
        while not done.wait(0.5):
            if not self._thread.is_alive():
                self._check()
                raise RuntimeError("video rendering thread stopped unexpectedly")
        self._check()

    def stop(self, wait: bool = True) -> None:
        """End the thread (after the queued frames) and free its renderer; idempotent."""
        if self._thread.is_alive():
            try:
                self._queue.put(None, block=wait)
            except queue.Full:  # not waiting (garbage collection): the daemon thread ends with the process
                return
            if wait:
                self._thread.join()
        if wait:
            self._check()


class _RenderServer:
    """Client of one render-server child process (:mod:`deqmpc_gym.wrappers._render_server`).

    Frames are sent without waiting (the pipe, enlarged to 1 MiB where possible, holds ~1000 of them, so the
    caller runs ahead of the renderer); :meth:`close_video` waits for the server to finish the video.
    """

    def __init__(self) -> None:
        if not sys.executable:
            raise RuntimeError("no Python executable to start the render server")
        root = str(Path(__file__).resolve().parents[2])  # the directory holding this deqmpc_gym package
        code = (f"import sys; sys.path.insert(0, {root!r}); "
                "from deqmpc_gym.wrappers._render_server import main; main()")
        env = dict(os.environ)
        env.setdefault("MUJOCO_GL", "egl")
        self._proc = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                      env=env)
        self.owner = os.getpid()
        try:
            import fcntl

            fcntl.fcntl(self._proc.stdin.fileno(), getattr(fcntl, "F_SETPIPE_SZ", 1031), 1 << 20)
        except (ImportError, OSError):  # not Linux, or above /proc/sys/fs/pipe-max-size: keep the default
            pass

    def alive(self) -> bool:
        return self._proc.poll() is None and self.owner == os.getpid()

    def _died(self) -> RuntimeError:
        code = self._proc.poll()
        return RuntimeError(f"the video render server exited unexpectedly (exit code {code}; see its stderr)")

    def send(self, request: tuple) -> None:
        try:
            pickle.dump(request, self._proc.stdin, protocol=pickle.HIGHEST_PROTOCOL)
            self._proc.stdin.flush()
        except (BrokenPipeError, OSError, ValueError):
            raise self._died() from None

    def close_video(self) -> Path:
        """Finish the open video; returns its path (raises ``RuntimeError`` if it could not be written)."""
        self.send(("close",))
        try:
            status, value = pickle.load(self._proc.stdout)
        except (EOFError, OSError, pickle.UnpicklingError):
            raise self._died() from None
        if status != "ok":
            raise RuntimeError(f"video rendering failed: {value}")
        return Path(value)

    def shutdown(self, wait: bool = True) -> None:
        """Ask the server to exit (it also exits when this process does)."""
        if self.owner != os.getpid():
            return
        try:
            self._proc.stdin.close()
        except OSError:
            pass
        if wait:
            try:
                self._proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
            self._proc.stdout.close()


#: Idle render servers kept for the next recorder (starting one costs a Python interpreter and MuJoCo import).
_idle_servers: list[_RenderServer] = []
_servers_lock = threading.Lock()
MAX_IDLE_SERVERS = 2


def _acquire_server() -> _RenderServer:
    with _servers_lock:
        while _idle_servers:
            server = _idle_servers.pop()
            if server.alive():
                return server
    return _RenderServer()


def _release_server(server: _RenderServer) -> None:
    with _servers_lock:
        if server.alive() and len(_idle_servers) < MAX_IDLE_SERVERS:
            _idle_servers.append(server)
            return
    server.shutdown(wait=False)


@atexit.register
def shutdown_render_servers() -> None:
    """End the idle render servers (they also end when this process exits; busy ones end with their recorder)."""
    with _servers_lock:
        servers = list(_idle_servers)
        _idle_servers.clear()
    for server in servers:
        server.shutdown()


def _forget_servers_in_child() -> None:  # after fork(): the servers belong to the parent
    global _servers_lock
    _servers_lock = threading.Lock()
    _idle_servers.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_servers_in_child)


class RecordVideo(gym.Wrapper):
    """Record episodes of an ``rgb_array`` env to video files (see the module docstring).

    Args:
        env: an env made with ``render_mode="rgb_array"``.
        video_folder: output directory.
        episode_trigger: ``fn(episode_id) -> bool``; default :func:`capped_cubic_video_schedule`.
        video_length: frames per video (0: whole episodes).
        name_prefix: file-name prefix.
        fps: frames per second (default: ``env.metadata["render_fps"]``, else 30).
        plan_source: object with a ``last_plan`` dict (``"states"``, ``"waypoints"``: ``(T, nx)``) to overlay,
            or None. ``overlay=False`` disables the overlay.
        background: render and encode in the background, overlapping with the policy's computation (envs with
            ``render_snapshot`` / ``make_renderer``, i.e. every ``DEQMPC/*`` env; other envs always render in
            the calling thread). ``True`` / ``"process"``: in a render-server child process (the caller only sends
            the mocap poses and plan points of each frame; if the server cannot be started, a thread is used);
            ``"thread"``: in a thread of this process, which shares the GIL with the policy; ``False``: in the
            calling thread. The server (or thread) is started by the first recorded episode and kept until
            :meth:`close`; closed recorders hand their server to the next one.
    """

    def __init__(self, env: gym.Env, video_folder: str | Path, episode_trigger: Callable[[int], bool] | None = None,
                 video_length: int = 0, name_prefix: str = "rollout", fps: float | None = None,
                 plan_source: Any = None, overlay: bool = True, background: bool | str = True) -> None:
        super().__init__(env)
        if env.render_mode != "rgb_array":
            raise ConfigError(f"RecordVideo needs render_mode='rgb_array', got {env.render_mode!r}; "
                              "use gym.make(env_id, render_mode='rgb_array')")
        if video_length < 0:
            raise ConfigError(f"video_length must be >= 0, got {video_length}")
        self.video_folder = Path(video_folder)
        self.episode_trigger = episode_trigger or capped_cubic_video_schedule
        self.video_length = int(video_length)
        self.name_prefix = name_prefix
        self.fps = float(fps or env.metadata.get("render_fps", 30))
        self.plan_source = plan_source if overlay else None
        self.episode_id = -1
        if background not in (True, False, "process", "thread"):
            raise ConfigError(f"background must be True, False, 'process' or 'thread', got {background!r}")
        base = env.unwrapped
        able = hasattr(base, "render_snapshot") and hasattr(base, "make_renderer")
        self.background: str | None = ("thread" if background == "thread" else "process") if background and able \
            else None
        self._writer: FrameWriter | None = None
        self._worker: _RenderWorker | None = None
        self._server: _RenderServer | None = None
        self._poser: Any = None  # GL-free SystemRenderer describing frames for the server
        self._recording = False
        self._frames = 0
        self.videos: list[Path] = []

    def _overlay(self) -> None:
        base = self.env.unwrapped
        plan = getattr(self.plan_source, "last_plan", None) if self.plan_source is not None else None
        if not hasattr(base, "set_plan_overlay"):
            return
        if plan is None:
            base.set_plan_overlay(None, None, None)
            return
        highlight = None
        centers = getattr(base, "obstacle_centers", None)
        system = getattr(base, "system", None)
        if centers is not None and len(centers) and system is not None and system.position_slice is not None:
            a, b = system.position_slice
            pts = np.asarray(plan["states"])[:, a:b]
            d = np.linalg.norm(pts[:, None, :] - centers[None], axis=-1)
            highlight = np.unique(np.argsort(d, axis=1)[:, :2])
        base.set_plan_overlay(plan["states"], plan["waypoints"], highlight)

    def _frame(self) -> None:
        """Render the current state (now, or sent to the render server / queued to the background thread)."""
        if self._server is not None:
            snap = self.env.unwrapped.render_snapshot()
            self._server.send(("frame", self._poser.frame_spec(snap["x"], **snap["overlay"])))
            self._frames += 1
            return
        if self._worker is not None and self._writer is not None:
            self._worker.submit(self._writer, self.env.unwrapped.render_snapshot())
            self._frames += 1
            return
        frame = self.env.render()
        if frame is not None and self._writer is not None:
            self._writer.append(np.asarray(frame))
            self._frames += 1

    def _capture(self) -> None:
        if not self._recording:
            return
        self._overlay()
        self._frame()
        if self.video_length and self._frames >= self.video_length:
            self._finish()

    def _finish(self) -> None:
        if not self._recording:
            return
        self._recording = False
        if self._server is not None:
            try:
                self.videos.append(self._server.close_video())
            except RuntimeError:
                if not self._server.alive():
                    self._server = None
                raise
            return
        writer, self._writer = self._writer, None
        if self._worker is not None:
            try:
                self._worker.flush()
            except BaseException:
                self._stop_background(wait=False)
                raise
        self.videos.append(writer.close())

    def _stop_background(self, wait: bool = True) -> None:
        worker, self._worker = self._worker, None
        if worker is not None:
            worker.stop(wait)
        server, self._server = self._server, None
        self._poser = None
        if server is not None:
            if self._recording:  # a video is still open (garbage collection): the server discards it and exits
                server.shutdown(wait=False)
            else:
                _release_server(server)

    def _start_background(self) -> None:
        base = self.env.unwrapped
        if self._server is not None and not self._server.alive():  # it died (or we were forked): start another
            self._server = None
        if self.background == "process" and self._server is None:
            try:
                poser = base.make_renderer()
                if not (hasattr(poser, "frame_spec") and hasattr(poser, "scene_spec")):
                    raise RuntimeError("the env's renderer cannot describe frames for the render server")
                self._server = _acquire_server()
                self._poser = poser
                return
            except (OSError, RuntimeError) as exc:
                gym.logger.warn(f"RecordVideo: rendering in a thread instead of a render server ({exc})")
                self.background = "thread"
        if self.background == "thread" and self._worker is None:
            self._worker = _RenderWorker(base.make_renderer)

    def reset(self, **kwargs: Any) -> tuple[Any, dict[str, Any]]:
        self._finish()
        obs, info = self.env.reset(**kwargs)
        self.episode_id += 1
        if self.episode_trigger(self.episode_id):
            path = self.video_folder / f"{self.name_prefix}-episode-{self.episode_id}"
            self._frames = 0
            if self.background:
                self._start_background()
            if self._server is not None:
                self._server.send(("open", self._poser.scene_spec, str(path), self.fps))
            else:
                self._writer = FrameWriter(path, self.fps)
            self._recording = True
            if self.plan_source is not None and hasattr(self.env.unwrapped, "set_plan_overlay"):
                self.env.unwrapped.set_plan_overlay(None, None, None)
            self._frame()
        return obs, info

    def step(self, action: Any) -> tuple[Any, float, bool, bool, dict[str, Any]]:
        obs, reward, terminated, truncated, info = self.env.step(action)
        self._capture()
        if (terminated or truncated) and not self.video_length:
            self._finish()
        return obs, reward, terminated, truncated, info

    def close(self) -> None:
        try:
            self._finish()
        finally:
            self._stop_background()
        super().close()

    def __del__(self) -> None:  # an unclosed recorder: let its thread / server free the renderer and end
        if getattr(self, "_worker", None) is not None or getattr(self, "_server", None) is not None:
            self._stop_background(wait=False)


class EpisodeStatistics(gym.Wrapper):
    """Add ``info["episode"] = {"r": return, "l": length, "cost": summed cost, "success": bool}`` at episode end."""

    def __init__(self, env: gym.Env) -> None:
        super().__init__(env)
        self._ret, self._len, self._cost = 0.0, 0, 0.0

    def reset(self, **kwargs: Any) -> tuple[Any, dict[str, Any]]:
        self._ret, self._len, self._cost = 0.0, 0, 0.0
        return self.env.reset(**kwargs)

    def step(self, action: Any) -> tuple[Any, float, bool, bool, dict[str, Any]]:
        obs, reward, terminated, truncated, info = self.env.step(action)
        self._ret += float(reward)
        self._len += 1
        self._cost += float(info.get("cost", 0.0))
        if terminated or truncated:
            info = dict(info)
            info["episode"] = {"r": self._ret, "l": self._len, "cost": self._cost,
                               "success": bool(info.get("is_success", False))}
        return obs, reward, terminated, truncated, info

