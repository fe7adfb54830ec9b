"""Wrappers: RecordVideo (imageio mp4, trigger semantics, plan overlay) and EpisodeStatistics."""

from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("MUJOCO_GL", "egl")

import gymnasium as gym  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

import deqmpc_gym  # noqa: E402,F401
from deqmpc_gym.envs.registration import ENV_IDS  # noqa: E402
from deqmpc_gym.errors import ConfigError  # noqa: E402
from deqmpc_gym.wrappers import EpisodeStatistics, FrameWriter, RecordVideo, capped_cubic_video_schedule  # noqa: E402

PEND = "DEQMPC/Pendulum-v0"
QPOLE = "DEQMPC/QPole-v0"
SIZE = dict(width=64, height=64)


def _frames(path: Path) -> list[np.ndarray]:
    import imageio.v3 as iio

    return list(iio.imiter(path))


def _fps(path: Path) -> float:
    import imageio.v3 as iio

    return float(iio.immeta(path)["fps"])


def _run(env: gym.Env, episodes: int, seed: int = 0, action: float = 0.3) -> None:
    for ep in range(episodes):
        env.reset(seed=seed + ep)
        done = False
        while not done:
            a = np.full(env.action_space.shape, action, dtype=np.float32)
            _, _, term, trunc, _ = env.step(a)
            done = term or trunc


# ---------------------------------------------------------------------------------------------- schedule
def test_capped_cubic_video_schedule() -> None:
    triggered = [i for i in range(3001) if capped_cubic_video_schedule(i)]
    assert triggered[:5] == [0, 1, 8, 27, 64]
    for i in (0, 1, 8, 27, 729, 1000, 2000, 3000):
        assert capped_cubic_video_schedule(i), i
    for i in (2, 7, 9, 26, 28, 999, 1001, 1999):
        assert not capped_cubic_video_schedule(i), i
    assert [i for i in triggered if i >= 729] == [729, 1000, 2000, 3000]


# ---------------------------------------------------------------------------------------------- errors
def test_record_video_requires_rgb_array(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="rgb_array"):
        RecordVideo(gym.make(PEND), tmp_path)
    with pytest.raises(ConfigError):
        RecordVideo(gym.make(PEND, render_mode="rgb_array", **SIZE), tmp_path, video_length=-1)


def test_frame_writer_rejects_bad_frames(tmp_path: Path) -> None:
    w = FrameWriter(tmp_path / "v", fps=10)
    with pytest.raises(ConfigError):
        w.append(np.zeros((16, 16, 3), np.float32))
    with pytest.raises(ConfigError):
        w.append(np.zeros((16, 16), np.uint8))
    with pytest.raises(RuntimeError, match="0 frames"):
        w.close()  # nothing written: no file is left behind
    assert not list(tmp_path.iterdir())


# ---------------------------------------------------------------------------------------------- EpisodeStatistics
def test_episode_statistics() -> None:
    env = EpisodeStatistics(gym.make(PEND, max_episode_steps=7))
    env.reset(seed=0)
    total, info, n = 0.0, {}, 0
    done = False
    while not done:
        _, r, term, trunc, info = env.step(np.zeros(1, np.float32))
        total += r
        n += 1
        done = term or trunc
        if not done:
            assert "episode" not in info
    ep = info["episode"]
    assert ep["l"] == n == 7
    assert ep["r"] == pytest.approx(total)
    assert ep["cost"] == 0.0 and isinstance(ep["success"], bool)
    env.reset(seed=1)  # counters restart
    _, r, *_ = env.step(np.zeros(1, np.float32))
    assert env._len == 1 and env._ret == pytest.approx(r)


# ---------------------------------------------------------------------------------------------- RecordVideo
@pytest.mark.render
@pytest.mark.parametrize("env_id", ENV_IDS)
def test_record_video_frames_and_fps(tmp_path: Path, env_id: str) -> None:
    steps = 6
    base = gym.make(env_id, render_mode="rgb_array", max_episode_steps=steps, **SIZE)
    env = RecordVideo(base, tmp_path, episode_trigger=lambda e: True, name_prefix="t")
    _run(env, 2, action=0.0)
    env.close()
    assert [p.name for p in env.videos] == ["t-episode-0.mp4", "t-episode-1.mp4"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t-episode-0.mp4", "t-episode-1.mp4"]  # no temp files
    for p in env.videos:
        frames = _frames(p)
        assert len(frames) == steps + 1  # reset frame + one per step
        assert frames[0].shape == (64, 64, 3)
        assert _fps(p) == pytest.approx(base.metadata["render_fps"])


@pytest.mark.render
def test_record_video_length_and_trigger(tmp_path: Path) -> None:
    base = gym.make(PEND, render_mode="rgb_array", max_episode_steps=8, **SIZE)
    env = RecordVideo(base, tmp_path, episode_trigger=lambda e: e in (0, 2), video_length=3, name_prefix="v", fps=7)
    _run(env, 4)
    env.close()
    assert [p.name for p in env.videos] == ["v-episode-0.mp4", "v-episode-2.mp4"]
    for p in env.videos:
        assert len(_frames(p)) == 3
        assert _fps(p) == pytest.approx(7)


@pytest.mark.render
def test_record_video_default_schedule(tmp_path: Path) -> None:
    base = gym.make(PEND, render_mode="rgb_array", max_episode_steps=2, **SIZE)
    env = RecordVideo(base, tmp_path)
    _run(env, 10)
    env.close()
    assert [p.name for p in env.videos] == [f"rollout-episode-{k}.mp4" for k in (0, 1, 8)]


@pytest.mark.render
def test_record_video_close_mid_episode(tmp_path: Path) -> None:
    env = RecordVideo(gym.make(PEND, render_mode="rgb_array", **SIZE), tmp_path, episode_trigger=lambda e: True)
    env.reset(seed=0)
    for _ in range(4):
        env.step(np.zeros(1, np.float32))
    env.close()  # finishes the partial video
    assert len(env.videos) == 1 and len(_frames(env.videos[0])) == 5


@pytest.mark.render
@pytest.mark.parametrize("env_id", [PEND, QPOLE])
def test_plan_overlay_changes_only_a_small_region(env_id: str) -> None:
    env = gym.make(env_id, render_mode="rgb_array", width=96, height=96)
    env.reset(seed=0)
    u = env.unwrapped
    plain = env.render()
    T = 5
    plan = np.repeat(np.asarray(u.state, dtype=np.float64)[None], T, axis=0)
    idx = u.system.angle_indices[0] if u.system.angle_indices else 0
    plan[:, idx] += np.linspace(0.0, 0.8, T)
    u.set_plan_overlay(plan, plan + 0.05)
    drawn = env.render()
    u.set_plan_overlay(None, None)
    cleared = env.render()
    np.testing.assert_array_equal(cleared, plain)  # clearing restores the plain frame exactly
    diff = (drawn != plain).any(-1)
    n = int(diff.sum())
    assert 0 < n < 0.1 * diff.size  # a small, nonempty set of pixels
    rows, cols = np.nonzero(diff)
    bbox = (rows.max() - rows.min() + 1) * (cols.max() - cols.min() + 1)
    assert bbox < 0.5 * diff.size  # localized
    outside = ~diff
    np.testing.assert_array_equal(drawn[outside], plain[outside])
    env.close()


def _record_policy(policy, folder: Path, overlay: bool, state: list[float]) -> Path:
    env = RecordVideo(gym.make(PEND, render_mode="rgb_array", max_episode_steps=5, width=96, height=96), folder,
                      episode_trigger=lambda e: True, plan_source=policy, overlay=overlay)
    obs, _ = env.reset(seed=3, options={"state": state})
    policy.reset()
    done = False
    while not done:
        obs, _, term, trunc, _ = env.step(policy.act(obs))
        done = term or trunc
    env.close()
    assert len(env.videos) == 1
    return env.videos[0]


def _frame_diffs(policy, tmp_path: Path, state: list[float]) -> list[float]:
    with_plan = _frames(_record_policy(policy, tmp_path / "a", True, state))
    without = _frames(_record_policy(policy, tmp_path / "b", False, state))
    assert len(with_plan) == len(without) == 6  # reset frame + 5 steps
    return [float(np.abs(a.astype(int) - b.astype(int)).mean()) for a, b in zip(with_plan, without)]


@pytest.mark.render
def test_record_plan_overlay_through_policy(tmp_path: Path) -> None:
    from deqmpc_gym.policies import DEQMPCPolicy

    torch.manual_seed(0)
    policy = DEQMPCPolicy.from_env(PEND, "deq-mpc-nn", hidden=16)
    # a fast swing: the 5-knot plan spreads well beyond the pendulum's bob, so it is visible
    diffs = _frame_diffs(policy, tmp_path, [1.5, 8.0])
    assert policy.last_plan is not None and policy.last_plan["states"].shape == (5, 2)
    assert policy.last_plan["waypoints"].shape == (5, 2)
    assert diffs[0] < 0.5  # the reset frame has no plan yet
    assert all(d > diffs[0] + 0.05 for d in diffs[1:])  # every step frame shows the plan


@pytest.mark.render
def test_plan_overlay_visible_for_slow_hanging_pendulum(tmp_path: Path) -> None:
    from deqmpc_gym.policies import DEQMPCPolicy

    torch.manual_seed(0)
    policy = DEQMPCPolicy.from_env(PEND, "deq-mpc-nn", hidden=16)
    diffs = _frame_diffs(policy, tmp_path, [-2.6034, -0.5264])  # the initial state of seed 3
    assert min(diffs[1:]) > 0.0


class _PlainRGBEnv(gym.Env):
    """A minimal rgb_array env without ``set_plan_overlay``."""

    metadata = {"render_modes": ["rgb_array"], "render_fps": 10}
    observation_space = gym.spaces.Box(-1.0, 1.0, (1,), np.float32)
    action_space = gym.spaces.Box(-1.0, 1.0, (1,), np.float32)

    def __init__(self) -> None:
        self.render_mode = "rgb_array"
        self.t = 0

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self.t = 0
        return np.zeros(1, np.float32), {}

    def step(self, action):
        self.t += 1
        return np.zeros(1, np.float32), 0.0, False, self.t >= 3, {}

    def render(self):
        frame = np.zeros((32, 32, 3), np.uint8)
        frame[:, : 8 * self.t] = 255
        return frame


def test_record_video_without_overlay_support(tmp_path: Path) -> None:
    """Envs without set_plan_overlay are recorded plainly even with a plan source."""
    class Source:
        last_plan = {"states": np.zeros((5, 2)), "waypoints": np.zeros((5, 2))}

    env = RecordVideo(_PlainRGBEnv(), tmp_path, episode_trigger=lambda e: True, plan_source=Source())
    _run(env, 1, action=0.0)
    env.close()
    assert len(env.videos) == 1
    frames = _frames(env.videos[0])
    assert len(frames) == 4
    assert _fps(env.videos[0]) == pytest.approx(10)


# ---------------------------------------------------------------------------------------------- background modes
def _record_modes(tmp_path: Path, env_id: str, modes: tuple) -> dict:
    out = {}
    for mode in modes:
        env = RecordVideo(gym.make(env_id, render_mode="rgb_array", max_episode_steps=4, width=96, height=96),
                          tmp_path / str(mode), episode_trigger=lambda e: True, background=mode)
        _run(env, 2, action=0.2)
        env.close()
        assert len(env.videos) == 2
        out[mode] = [_frames(p) for p in env.videos]
    return out


@pytest.mark.render
@pytest.mark.parametrize("env_id", [PEND, "DEQMPC/QPoleObs-v0"])
def test_background_modes_write_identical_videos(tmp_path: Path, env_id: str) -> None:
    """The render server, the render thread and the calling thread render (and x264 encodes) the same frames."""
    out = _record_modes(tmp_path, env_id, ("process", "thread", False))
    for mode in ("thread", False):
        for a, b in zip(out["process"], out[mode]):
            assert len(a) == len(b) == 5
            for fa, fb in zip(a, b):
                np.testing.assert_array_equal(fa, fb)


def test_background_mode_is_checked(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="background"):
        RecordVideo(gym.make(PEND, render_mode="rgb_array", **SIZE), tmp_path, background="gpu")


@pytest.mark.render
def test_render_server_reports_errors_and_stays_usable(tmp_path: Path) -> None:
    from deqmpc_gym.wrappers import video

    env = gym.make(PEND, render_mode="rgb_array", **SIZE)
    env.reset(seed=0)
    poser = env.unwrapped.make_renderer()
    server = video._RenderServer()
    try:
        server.send(("open", poser.scene_spec, str(tmp_path / "bad"), 10))
        server.send(("frame", {"mocap_pos": np.zeros((7, 3)), "mocap_quat": np.zeros((7, 4))}))  # wrong shapes
        with pytest.raises(RuntimeError, match="video rendering failed"):
            server.close_video()
        assert not list(tmp_path.iterdir())  # the unfinished file is removed
        server.send(("open", poser.scene_spec, str(tmp_path / "good"), 10))
        server.send(("frame", poser.frame_spec(env.unwrapped.state)))
        path = server.close_video()
        assert path.name == "good.mp4" and len(_frames(path)) == 1
    finally:
        server.shutdown()


@pytest.mark.render
def test_recorders_reuse_the_render_server(tmp_path: Path) -> None:
    from deqmpc_gym.wrappers import video

    pids = []
    for k in range(2):
        env = RecordVideo(gym.make(PEND, render_mode="rgb_array", max_episode_steps=2, **SIZE), tmp_path / str(k),
                          episode_trigger=lambda e: True)
        env.reset(seed=0)
        pids.append(env._server._proc.pid)
        _run(env, 1)
        env.close()
        assert env._server is None and len(env.videos) == 2
    assert pids[0] == pids[1]
    video.shutdown_render_servers()
    assert not video._idle_servers


def test_mp4_sample_count(tmp_path: Path) -> None:
    from deqmpc_gym.wrappers.video import mp4_sample_count

    w = FrameWriter(tmp_path / "v", fps=10)
    if w.path.suffix != ".mp4":
        pytest.skip("no ffmpeg")
    for k in range(7):
        w.append(np.full((32, 48, 3), 30 * k, np.uint8))
    path = w.close()
    assert mp4_sample_count(path) == 7
    data = path.read_bytes()
    (tmp_path / "cut.mp4").write_bytes(data[: len(data) // 2])  # unfinished: no complete moov index
    with pytest.raises(ValueError):
        mp4_sample_count(tmp_path / "cut.mp4")
    (tmp_path / "junk.mp4").write_bytes(b"\x00\x00\x00\x10junk" + bytes(8))
    with pytest.raises(ValueError):
        mp4_sample_count(tmp_path / "junk.mp4")


# ---------------------------------------------------------------------------------------------- renderer pool
@pytest.mark.render
def test_pooled_gl_context_renders_the_same_frames_in_another_thread() -> None:
    import threading

    from deqmpc_gym.envs import rendering

    env = gym.make(QPOLE, render_mode="rgb_array", width=80, height=64)
    env.reset(seed=0)
    u = env.unwrapped
    r = u.make_renderer()
    assert r._scene._renderer is None  # no GL context until the first render
    first = r.render(u.state)
    r.close()
    assert any(k == (r.xml, 80, 64) for k, _ in rendering._pool)
    out = {}

    def render_elsewhere() -> None:
        r2 = u.make_renderer()
        out["frame"] = r2.render(u.state)
        out["pooled"] = not any(k == (r.xml, 80, 64) for k, _ in rendering._pool)  # taken from the pool
        r2.close()

    t = threading.Thread(target=render_elsewhere)
    t.start()
    t.join()
    assert out["pooled"]
    np.testing.assert_array_equal(out["frame"], first)
    env.close()
