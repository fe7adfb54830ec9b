"""Video recording with imageio (mp4 via imageio-ffmpeg, GIF fallback) and episode statistics.

:class:`RecordVideo` keeps Gymnasium's trigger semantics (``episode_trigger``, ``video_length``,
``name_prefix``) but streams frames to the writer (no whole-episode buffering) and needs no moviepy. Files are
named ``{name_prefix}-episode-{k}.mp4`` (``.gif`` when ffmpeg is unavailable). When ``plan_source`` (e.g. a
:class:`~deqmpc_gym.policies.DEQMPCPolicy`) exposes ``last_plan``, every frame shows the MPC's predicted
trajectory (blue) and the network's waypoints (orange); on obstacle envs the obstacles nearest to the plan
are highlighted.
"""

from __future__ import annotations

import os
import queue
import threading
from pathlib import Path
from typing import Any, Callable

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
    exists, is non-empty and decodes, raising ``RuntimeError`` otherwise.
    """

    def __init__(self, path: str | Path, fps: float) -> None:
        try:
            import imageio.v2 as iio
        except ImportError as exc:  # pragma: no cover - imageio is a dependency
            raise DependencyNotInstalled("imageio is required for video recording: pip install imageio imageio-ffmpeg") from exc
        self.fps = float(fps)
        base = Path(path)
        self.path = base.with_suffix(".mp4" if _ffmpeg_available() else ".gif")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._tmp = self.path.with_name(f".{self.path.stem}.tmp{self.path.suffix}")
        if self.path.suffix == ".mp4":
            self._writer = iio.get_writer(self._tmp, fps=self.fps, codec="libx264", macro_block_size=16,
                                          quality=7, ffmpeg_log_level="error",
                                          output_params=["-preset", "ultrafast", "-tune", "animation"])
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
        import imageio.v3 as iio3

        try:
            iio3.improps(self._tmp, index=0)
        except Exception as exc:
            raise RuntimeError(f"video {self.path} is not readable after writing: {exc}") from exc
        os.replace(self._tmp, self.path)
        return self.path


class _AsyncFrames:
    """Renders env snapshots and writes the frames in a background thread.

    The thread owns its own renderer (``make_renderer()``; a GL context belongs to the thread that uses it), so
    rendering and encoding overlap with the caller's policy computation. ``submit`` blocks when ``max_pending``
    snapshots are waiting; an error in the thread is re-raised by the next ``submit`` or by ``close``.
    """

    def __init__(self, make_renderer: Callable[[], Any], writer: FrameWriter, max_pending: int = 8) -> None:
        self._queue: queue.Queue = queue.Queue(max_pending)
        self._writer = writer
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, args=(make_renderer,), daemon=True,
                                        name="deqmpc-video")
        self._thread.start()

    def _run(self, make_renderer: Callable[[], Any]) -> None:
        renderer = None
        try:
            while (snap := self._queue.get()) is not None:
                if renderer is None:
                    renderer = make_renderer()
                self._writer.append(renderer.render(snap["x"], **snap["overlay"]))
        except BaseException as exc:  # reported to the caller's thread
            self._error = exc
        finally:
            if renderer is not None:
                renderer.close()

    def _check(self) -> None:
        if self._error is not None:
            raise RuntimeError(f"video rendering failed: {self._error}") from self._error

    def submit(self, snapshot: dict[str, Any]) -> None:
        while True:
            self._check()
            try:
                self._queue.put(snapshot, timeout=0.5)
                return
            except queue.Full:
                if not self._thread.is_alive():
                    self._check()
                    raise RuntimeError("video rendering thread stopped unexpectedly")

    def close(self) -> None:
        if self._thread.is_alive():
            self._queue.put(None)
            self._thread.join()
        self._check()


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
        background: render and encode in a background thread (envs with ``render_snapshot`` /
            ``make_renderer``, i.e. every ``DEQMPC/*`` env), overlapping with the policy's computation; other envs
            always render in the calling thread.
    """

    def __init__(self, env: gym.Env, video_folder: str | Path, episode_trigger: Callable[[int], bool] | None = None,
                 video_length: int = 0, name_prefix: str = "rollout", fps: float | None = None,
                 plan_source: Any = None, overlay: bool = True, background: bool = True) -> None:
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
        base = env.unwrapped
        self.background = bool(background and hasattr(base, "render_snapshot") and hasattr(base, "make_renderer"))
        self._writer: FrameWriter | None = None
        self._worker: _AsyncFrames | None = None
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
        """Render the current state (now, or queued to the background thread)."""
        if self._worker is not None:
            self._worker.submit(self.env.unwrapped.render_snapshot())
            self._frames += 1
            return
        frame = self.env.render()
        if frame is not None and self._writer is not None:
            self._writer.append(np.asarray(frame))
            self._frames += 1

    def _capture(self) -> None:
        if self._writer is None:
            return
        self._overlay()
        self._frame()
        if self.video_length and self._frames >= self.video_length:
            self._finish()

    def _finish(self) -> None:
        if self._writer is not None:
            try:
                if self._worker is not None:
                    self._worker.close()
            finally:
                self._worker = None
                writer, self._writer = self._writer, None
            self.videos.append(writer.close())

    def reset(self, **kwargs: Any) -> tuple[Any, dict[str, Any]]:
        self._finish()
        obs, info = self.env.reset(**kwargs)
        self.episode_id += 1
        if self.episode_trigger(self.episode_id):
            self._writer = FrameWriter(self.video_folder / f"{self.name_prefix}-episode-{self.episode_id}", self.fps)
            self._frames = 0
            if self.background:
                self._worker = _AsyncFrames(self.env.unwrapped.make_renderer, self._writer)
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
        self._finish()
        super().close()


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

