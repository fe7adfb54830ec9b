"""Video render server: a child process started by :class:`~deqmpc_gym.wrappers.RecordVideo` (:func:`main`).

Renders frames with :class:`~deqmpc_gym.envs.rendering.SceneRenderer` and encodes them with
:class:`~deqmpc_gym.wrappers.video.FrameWriter` in a child process, so that recording runs in parallel with the
caller's policy: a render *thread* shares the caller's GIL (MuJoCo holds it while it submits the scene), which
serialized much of the work. The process needs no torch (the caller sends mocap poses, not states).

Requests are pickled tuples on stdin, one video at a time:

* ``("open", scene_spec, path, fps)``: start ``path`` (``FrameWriter`` picks .mp4/.gif) of scene
  ``SceneRenderer(**scene_spec)`` (kept, with its GL context, while the following videos use the same scene);
* ``("frame", frame_spec)``: append ``SceneRenderer.render(**frame_spec)``;
* ``("close",)``: finish and check the video; replies ``("ok", path)`` or ``("error", message)``;
* ``("quit",)`` or end of input: exit.

Replies are pickled on the original stdout; ``sys.stdout`` is redirected to stderr so that nothing else can
write into the reply stream. Errors while rendering are kept and reported by the next ``close``.
"""

from __future__ import annotations

import os
import pickle
import signal
import sys
import traceback
from typing import Any, BinaryIO


def serve(inp: BinaryIO, out: BinaryIO) -> None:
    from deqmpc_gym.envs.rendering import SceneRenderer
    from deqmpc_gym.wrappers.video import FrameWriter

    scene: Any = None
    scene_key: Any = None
    writer: Any = None
    error: str | None = None
    try:
        while True:
            try:
                req = pickle.load(inp)
            except EOFError:
                return
            op = req[0]
            if op == "frame":
                if error is None and writer is not None:
                    try:
                        writer.append(scene.render(**req[1]))
                    except Exception:
                        error = traceback.format_exc(limit=4)
            elif op == "open":
                _, spec, path, fps = req
                error = None
                try:
                    key = (spec["xml"], spec["width"], spec["height"])
                    if key != scene_key:
                        if scene is not None:
                            scene.close()  # its GL context goes to the renderer pool
                        scene, scene_key = None, None
                        scene, scene_key = SceneRenderer(**spec), key
                    writer = FrameWriter(path, fps)
                except Exception:
                    error = traceback.format_exc(limit=4)
            elif op == "close":
                reply = _close_reply(writer, error)
                writer, error = None, None
                pickle.dump(reply, out, protocol=pickle.HIGHEST_PROTOCOL)
                out.flush()
            elif op == "quit":
                return
    finally:
        if writer is not None:
            writer.discard()
        if scene is not None:
            scene.close()


def _close_reply(writer: Any, error: str | None) -> tuple[str, str]:
    """Finish (or, after an error, discard) the open video; the reply to ``("close",)``."""
    if writer is None:
        return ("error", error or "no video is open")
    if error is not None:
        writer.discard()
        return ("error", error)
    try:
        return ("ok", str(writer.close()))
    except Exception as exc:
        return ("error", str(exc))


def main() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is for the caller, which then closes or abandons us
    out = os.fdopen(os.dup(sys.stdout.fileno()), "wb")
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())  # stray prints (and child processes) write to stderr
    serve(sys.stdin.buffer, out)


if __name__ == "__main__":
    main()
