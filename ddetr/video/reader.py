"""Decoding video files with PyAV, frame by frame, inside stated limits.

A file is probed before any frame is decoded: no video stream, a frame larger than the limit or a duration or frame
count the container declares above the limit are refused up front, each refusal naming its limit. What a container
does not declare (a stream without a duration, a phone video whose frame rate varies) is enforced while decoding.
A file that breaks off part way (truncated, corrupt packets) yields the frames that decoded and says where it
stopped (``VideoReader.ended_early``); one that yields no frame at all is refused. Only one decoded frame is held
at a time: memory does not grow with the length of the video.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from types import TracebackType
from typing import Any

import numpy as np

from ddetr.video.limits import VideoInputError, VideoLimitError, VideoLimits

logger = logging.getLogger(__name__)

# Used when a stream declares no usable rate (some webm and raw streams): the JSON's times still make sense.
FALLBACK_FPS = 25.0


def require_av() -> Any:
    try:
        import av
    except ImportError as error:  # a clear message for a missing optional dependency
        raise ImportError("video needs PyAV: pip install av (or pip install 'ddetr[video]')") from error
    return av


@dataclass(frozen=True)
class VideoInfo:
    """What the container declares about its first video stream (``frame_count``/``duration`` may be unknown)."""

    width: int
    height: int
    fps: float  # average frame rate; FALLBACK_FPS when the file declares none
    frame_count: int | None
    duration: float | None  # seconds
    codec: str

    def frames_after_stride(self, stride: int) -> int | None:
        """How many frames a pass with ``stride`` processes, when the frame count is known."""
        return None if self.frame_count is None else math.ceil(self.frame_count / stride)


@dataclass(frozen=True)
class VideoFrame:
    """One decoded frame: its index in the file, its presentation time and its pixels."""

    index: int
    time: float  # seconds from the stream's start, from the frame's own timestamp (right for variable rates)
    image: np.ndarray  # (height, width, 3) uint8 RGB


def _as_float(rate: Fraction | int | float | None) -> float | None:
    if rate is None:
        return None
    value = float(rate)
    return value if math.isfinite(value) and value > 0 else None


class VideoReader:
    """Open, probe and check a video file; iterate to decode its frames (every ``stride``-th one).

    Use as a context manager (or call ``close``): the file handle is released however iteration ends.
    """

    def __init__(self, path: str | Path, *, limits: VideoLimits | None = None, stride: int = 1) -> None:
        if int(stride) < 1:
            raise ValueError(f"the frame stride must be at least 1, got {stride}")
        self.path = Path(path)
        self.limits = limits or VideoLimits()
        self.stride = int(stride)
        self.ended_early: str | None = None  # why decoding stopped before the end of the file, if it did
        av = require_av()
        if self.path.is_dir():
            raise VideoInputError(f"{self.path.name} is a folder, not a video file")
        if not self.path.is_file():
            raise VideoInputError(f"{self.path.name}: no such file")
        try:
            self._container = av.open(str(self.path), mode="r", metadata_errors="ignore")
        except (av.error.FFmpegError, UnicodeDecodeError, OSError) as error:
            raise VideoInputError(
                f"{self.path.name} could not be opened as a video (not a video file, or a format FFmpeg cannot read)"
            ) from error
        try:
            if not self._container.streams.video:
                kinds = sorted({stream.type for stream in self._container.streams})
                found = f" (it has only {', '.join(kinds)} streams)" if kinds else ""
                raise VideoInputError(f"{self.path.name} has no video stream{found}")
            self._stream = self._container.streams.video[0]
            self._stream.thread_type = "AUTO"
            self.info = self._probe()
            self.limits.check_size(self.info.width, self.info.height)
            self.limits.check_declared(duration=self.info.duration, frame_count=self.info.frame_count)
        except BaseException:
            self._container.close()
            raise

    def _probe(self) -> VideoInfo:
        stream = self._stream
        width, height = int(stream.codec_context.width or 0), int(stream.codec_context.height or 0)
        if width <= 0 or height <= 0:
            raise VideoInputError(f"{self.path.name}: the video stream declares no frame size")
        fps = _as_float(stream.average_rate) or _as_float(stream.guessed_rate) or FALLBACK_FPS
        duration: float | None = None
        if stream.duration is not None and stream.time_base is not None:
            duration = float(stream.duration * stream.time_base)
        elif self._container.duration is not None:
            duration = self._container.duration / 1_000_000  # AV_TIME_BASE: microseconds
        if duration is not None and not (math.isfinite(duration) and duration >= 0):
            duration = None
        frame_count = int(stream.frames) if stream.frames else None
        if frame_count is None and duration is not None:
            frame_count = max(1, round(duration * fps))  # an estimate, for progress bars and the up-front checks
        return VideoInfo(width, height, fps, frame_count, duration, str(stream.codec_context.name))

    def _shortfall(self, decoded: int, last_time: float) -> str | None:
        """Why the frames decoded end well before the duration the container declares, if they do.

        FFmpeg ends a file cut off part way like a complete one (no error, just fewer frames), so a truncated upload
        shows only here. Time, not the declared frame count: AVI counts dropped frames that decode to nothing. The
        margin allows for a long last frame and for other streams outlasting the video.
        """
        duration, fps = self.info.duration, self.info.fps
        if duration is None:
            return None
        covered = last_time + 1 / fps
        if covered >= duration - max(2 / fps, 0.5, 0.05 * duration):
            return None
        return (
            f"decoding stopped after {decoded} frames ({covered:.1f} s of {duration:.1f} s): "
            "the file is damaged or truncated"
        )

    def __iter__(self) -> Iterator[VideoFrame]:
        av = require_av()
        decoded = 0
        first_time: float | None = None
        elapsed = 0.0
        try:
            for frame in self._container.decode(self._stream):
                index = decoded
                decoded += 1
                time = float(frame.time) if frame.time is not None else index / self.info.fps
                if first_time is None:
                    first_time = time
                elapsed = time - first_time
                self.limits.check_progress(frames=decoded, seconds=elapsed)
                if index % self.stride:
                    continue
                image = frame.to_ndarray(format="rgb24")
                if image.shape[:2] != (self.info.height, self.info.width):
                    # A mid-stream size change: keep one size for the output video (and the limit's guarantee).
                    image = frame.reformat(width=self.info.width, height=self.info.height).to_ndarray(format="rgb24")
                yield VideoFrame(index=index, time=round(max(0.0, elapsed), 6), image=image)
        except VideoLimitError:
            raise
        except (av.error.FFmpegError, ValueError, OSError) as error:
            # A broken packet or a cut-off file: what decoded so far is kept.
            self.ended_early = f"decoding stopped after {decoded} frames: the file is damaged or truncated"
            logger.warning("%s: %s (%s)", self.path.name, self.ended_early, error)
        else:
            self.ended_early = self._shortfall(decoded, elapsed) if decoded else None
            if self.ended_early:
                logger.warning("%s: %s", self.path.name, self.ended_early)
        if decoded == 0:
            raise VideoInputError(f"{self.path.name} has no frames that could be decoded")

    def close(self) -> None:
        self._container.close()

    def __enter__(self) -> VideoReader:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self.close()
