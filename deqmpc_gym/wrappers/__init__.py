"""Gymnasium wrappers: imageio video recording (with the MPC plan overlay) and episode statistics."""

from deqmpc_gym.wrappers.video import EpisodeStatistics, FrameWriter, RecordVideo, capped_cubic_video_schedule

__all__ = ["EpisodeStatistics", "FrameWriter", "RecordVideo", "capped_cubic_video_schedule"]
