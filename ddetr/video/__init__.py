"""Video files and frame streams: decoding and encoding (PyAV), detection with tracking, annotated outputs."""

from ddetr.video.annotate import AnnotatedVideo, VideoProgress, annotate_video, output_paths
from ddetr.video.frames import DetectionSettings, FrameResult, FrameTracker, describe_counts, detect_frames
from ddetr.video.limits import VideoInputError, VideoLimitError, VideoLimits
from ddetr.video.reader import VideoFrame, VideoInfo, VideoReader
from ddetr.video.writer import VideoWriter

__all__ = [
    "AnnotatedVideo",
    "DetectionSettings",
    "FrameResult",
    "FrameTracker",
    "VideoFrame",
    "VideoInfo",
    "VideoInputError",
    "VideoLimitError",
    "VideoLimits",
    "VideoProgress",
    "VideoReader",
    "VideoWriter",
    "annotate_video",
    "describe_counts",
    "detect_frames",
    "output_paths",
]
