"""Detection over a sequence of frames (a video file or a webcam stream), with object ids kept by a tracker.

Frames go through the one inference path (``ObjectDetectionPipeline.candidates``, precision included) in batches.
The tracker sees every candidate above its low threshold (ByteTrack's second association keeps a track alive
through frames where its score dips); what is shown is the caller's selection (threshold, count, classes), each box
with the id of its track.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any

import numpy as np

from ddetr.pipeline import Candidates, Detection, ObjectDetectionPipeline
from ddetr.tracking import ByteTracker, TrackerSettings
from ddetr.video.reader import VideoFrame

DEFAULT_BATCH_SIZE = 8  # frames per forward pass: 8 is where the bundled model's per-frame time stops falling


@dataclass(frozen=True)
class DetectionSettings:
    """What to keep of each frame's candidates; ``size`` is the inference shortest edge (None: the model's)."""

    threshold: float = 0.5
    max_detections: int = 100
    classes: tuple[str, ...] = ()
    size: int | None = None
    track: bool = True

    def __post_init__(self) -> None:
        if not 0.0 <= float(self.threshold) <= 1.0:
            raise ValueError(f"threshold must be in [0, 1], got {self.threshold}")
        if int(self.max_detections) < 1:
            raise ValueError(f"max detections must be at least 1, got {self.max_detections}")


@dataclass(frozen=True)
class FrameResult:
    """One processed frame: where it is in the source, its pixels and what was found on it."""

    index: int
    time: float  # seconds
    image: np.ndarray  # (height, width, 3) uint8 RGB, as decoded
    detections: list[Detection]  # the hub schema, plus "track_id" when tracking
    model_seconds: float  # this frame's share of its batch's inference time


class FrameTracker:
    """A ``ByteTracker`` fed from ``Candidates``: shown boxes (score above the threshold) always carry an id.

    The tracker's high threshold follows the caller's score threshold, so moving a slider during a live stream
    changes what counts as a confident detection without losing the tracks already made.
    """

    def __init__(self, settings: TrackerSettings | None = None) -> None:
        self._base = settings or TrackerSettings()
        self.tracker = ByteTracker(settings=self._base)
        self.class_names: dict[int, str] = {}

    def _follow(self, threshold: float) -> None:
        if self.tracker.settings.high_threshold != threshold:
            low = min(self._base.low_threshold, threshold)
            self.tracker.settings = dataclasses.replace(self._base, high_threshold=threshold, low_threshold=low)

    def detections(self, candidates: Candidates, settings: DetectionSettings, *, steps: int = 1) -> list[Detection]:
        self._follow(float(settings.threshold))
        # (tracked,) candidate indices: the ones a shown box could come from, down to the tracker's low threshold
        considered = np.arange(min(int(settings.max_detections), len(candidates)))
        tracked = considered[candidates.scores[considered] >= self.tracker.settings.low_threshold]
        # (candidates,) the id of each candidate's track, -1 for none
        track_ids = np.full(len(candidates), -1, dtype=np.int64)
        track_ids[tracked] = self.tracker.update(
            candidates.boxes[tracked], candidates.scores[tracked], candidates.labels[tracked], steps=steps
        )
        for label, name in zip(candidates.labels[tracked], (candidates.names[i] for i in tracked)):
            self.class_names[int(label)] = name
        return candidates.detections(settings.threshold, settings.max_detections, settings.classes, track_ids=track_ids)

    def seen(self) -> dict[str, int]:
        """Distinct confirmed tracks per class name, most frequent first."""
        counts = Counter(
            {self.class_names.get(label, str(label)): count for label, count in self.tracker.seen_counts().items()}
        )
        return dict(counts.most_common())

    def reset(self) -> None:
        self.tracker.reset()


def describe_counts(counts: Mapping[str, int]) -> str:
    """``"12 car, 3 person seen"``-style text (class names are used as they are: no guessing at plurals)."""
    if not counts:
        return "nothing tracked yet"
    return ", ".join(f"{count} × {name}" for name, count in counts.items()) + " seen"


def _batches(frames: Iterable[VideoFrame], size: int) -> Iterator[list[VideoFrame]]:
    batch: list[VideoFrame] = []
    for frame in frames:
        batch.append(frame)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def detect_frames(
    detector: ObjectDetectionPipeline,
    frames: Iterable[VideoFrame],
    settings: DetectionSettings | None = None,
    *,
    batch_size: int = DEFAULT_BATCH_SIZE,
    tracker: FrameTracker | None = None,
    forward_lock: AbstractContextManager[Any] | None = None,
) -> Iterator[FrameResult]:
    """Detect on ``frames`` in batches of ``batch_size``, in order; ``tracker`` (made here when ``settings.track``
    and none is given) assigns the track ids. Frames of one source share a size, so batching adds no padding.

    ``forward_lock`` is held around each batch's forward pass only (a server shares one model between visitors).
    """
    if int(batch_size) < 1:
        raise ValueError(f"batch size must be at least 1, got {batch_size}")
    settings = settings or DetectionSettings()
    if tracker is None and settings.track:
        tracker = FrameTracker()
    previous_index: int | None = None
    for batch in _batches(frames, int(batch_size)):
        with forward_lock if forward_lock is not None else contextlib.nullcontext():
            started = time.perf_counter()
            candidates = detector.candidates([frame.image for frame in batch], size=settings.size)
        share = (time.perf_counter() - started) / len(batch)
        for frame, found in zip(batch, candidates):
            if tracker is None:
                detections = found.detections(settings.threshold, settings.max_detections, settings.classes)
            else:
                steps = 1 if previous_index is None else max(1, frame.index - previous_index)
                detections = tracker.detections(found, settings, steps=steps)
            previous_index = frame.index
            yield FrameResult(frame.index, frame.time, frame.image, detections, share)


def frame_record(result: FrameResult) -> dict[str, object]:
    """The per-frame entry of the detections JSON: ``{"index", "time", "detections"}``."""
    return {"index": result.index, "time": result.time, "detections": result.detections}


def csv_rows(result: FrameResult) -> Sequence[list[object]]:
    """One CSV row per detection: ``frame, time, track_id, label, score, xmin, ymin, xmax, ymax``."""
    return [
        [
            result.index,
            result.time,
            detection.get("track_id", ""),
            detection["label"],
            detection["score"],
            *(detection["box"][key] for key in ("xmin", "ymin", "xmax", "ymax")),
        ]
        for detection in result.detections
    ]
