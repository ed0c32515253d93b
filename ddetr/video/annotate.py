"""A video file in, an annotated video, a per-frame JSON and a CSV out, with progress, cancelling and previews.

``annotate_video`` is what the demo app's Video mode, ``/detect_video`` and ``python -m ddetr.annotate`` run. It is
a generator of ``VideoProgress``: the caller shows progress (and the latest annotated frame) as it goes, and the
last item carries the ``AnnotatedVideo``. Records are streamed to disk frame by frame, so memory does not grow
with the video. Every output appears complete or not at all (temporary names, renamed at the end); a cancelled run
keeps and finishes what was done; a failed one removes its partial files.

The JSON: ``{"fps": float, "width": int, "height": int, "frames": [{"index": int, "time": float, "detections":
[{"score", "label", "box": {"xmin", "ymin", "xmax", "ymax"}, "track_id": int}]}]}``, one entry per processed frame,
in order (``track_id`` only when tracking).
"""

from __future__ import annotations

import csv
import json
import os
import time
import uuid
from collections.abc import Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import IO, Any, Protocol

import numpy as np
import PIL.Image

from ddetr.drawing import draw_detections
from ddetr.pipeline import ObjectDetectionPipeline
from ddetr.video.frames import (
    DEFAULT_BATCH_SIZE,
    DetectionSettings,
    FrameTracker,
    csv_rows,
    detect_frames,
    frame_record,
)
from ddetr.video.limits import VideoLimits
from ddetr.video.reader import VideoReader
from ddetr.video.writer import VideoWriter

CSV_HEADER = ["frame", "time", "track_id", "label", "score", "xmin", "ymin", "xmax", "ymax"]


class Cancellation(Protocol):
    """Asks a run to stop (``threading.Event``, or anything that answers ``is_set()``: a flag in a file works
    across the process boundary of a ZeroGPU call)."""

    def is_set(self) -> bool: ...


@dataclass(frozen=True)
class AnnotatedVideo:
    video: Path
    detections_json: Path
    detections_csv: Path
    frames: int  # processed frames (each is in the video and has a JSON entry)
    total_frames: int | None  # what a full pass would have processed, when known
    cancelled: bool
    note: str | None  # why the pass ended before the end of the file, when it did
    seen: dict[str, int]  # distinct tracks per class


@dataclass
class VideoProgress:
    done: int
    total: int | None
    elapsed: float  # seconds
    model_seconds: float  # time spent in the model so far
    preview: np.ndarray | None = None  # the latest annotated frame, (height, width, 3) uint8
    seen: dict[str, int] = field(default_factory=dict)
    result: AnnotatedVideo | None = None  # set on the last item only

    @property
    def eta(self) -> float | None:
        """Seconds left, from the pace so far."""
        if not self.total or not self.done:
            return None
        return max(0.0, self.elapsed / self.done * (self.total - self.done))


class _AtomicText:
    """A text file written under a temporary name and moved into place by ``commit``."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.temporary = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.partial")
        self.file: IO[str] = open(self.temporary, "w", encoding="utf-8", newline="")  # noqa: SIM115

    def commit(self) -> Path:
        self.file.close()
        os.replace(self.temporary, self.path)
        return self.path

    def discard(self) -> None:
        self.file.close()
        self.temporary.unlink(missing_ok=True)


class _Records:
    """The JSON and CSV outputs, written one frame at a time."""

    def __init__(self, json_path: Path, csv_path: Path, *, fps: float, width: int, height: int) -> None:
        self.json = _AtomicText(json_path)
        try:
            self.csv = _AtomicText(csv_path)
        except BaseException:
            self.json.discard()
            raise
        header = json.dumps({"fps": fps, "width": width, "height": height})
        self.json.file.write(header[:-1] + ', "frames": [')
        self.rows = csv.writer(self.csv.file)
        self.rows.writerow(CSV_HEADER)
        self.count = 0

    def add(self, record: dict[str, Any], rows: Any) -> None:
        self.json.file.write(("," if self.count else "") + "\n" + json.dumps(record))
        self.rows.writerows(rows)
        self.count += 1

    def commit(self) -> tuple[Path, Path]:
        self.json.file.write("\n]}\n")
        return self.json.commit(), self.csv.commit()

    def discard(self) -> None:
        self.json.discard()
        self.csv.discard()

    def __enter__(self) -> _Records:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, traceback: TracebackType | None
    ) -> None:
        if error is not None:
            self.discard()


def output_paths(source: Path, folder: Path, name: str | None = None) -> tuple[Path, Path, Path]:
    """Where ``annotate_video`` writes: ``<name>.annotated.mp4``, ``<name>.detections.json`` and ``.csv``, where
    ``name`` defaults to the source's stem."""
    stem = source.stem if name is None else name
    return (
        folder / f"{stem}.annotated.mp4",
        folder / f"{stem}.detections.json",
        folder / f"{stem}.detections.csv",
    )


def _annotate(image: np.ndarray, detections: list[dict[str, Any]], id2label: dict[int, str]) -> np.ndarray:
    drawn = draw_detections(PIL.Image.fromarray(image), detections, id2label=id2label)
    return np.asarray(drawn)


def annotate_video(
    detector: ObjectDetectionPipeline,
    source: str | Path,
    folder: str | Path,
    settings: DetectionSettings | None = None,
    *,
    batch_size: int = DEFAULT_BATCH_SIZE,
    stride: int = 1,
    limits: VideoLimits | None = None,
    cancel: Cancellation | None = None,
    preview_every: float = 0.5,
    name: str | None = None,
    forward_lock: AbstractContextManager[Any] | None = None,
) -> Iterator[VideoProgress]:
    """Detect, track and draw on every ``stride``-th frame of ``source``; write the three outputs into ``folder``.

    Yields progress after every frame (with a preview at most every ``preview_every`` seconds); the last item has
    ``result``. Setting ``cancel`` stops after the frame being processed, finishing the outputs with what is done.
    ``name`` is the outputs' stem (default: the source's); ``forward_lock`` is held around each batch's forward.
    Raises ``VideoInputError`` (a ``ValueError``) for files that cannot be used, before any output is created.
    """
    settings = settings or DetectionSettings()
    source, folder = Path(source), Path(folder)
    video_path, json_path, csv_path = output_paths(source, folder, name)
    id2label = {int(k): v for k, v in detector.model.config.id2label.items()}
    tracker = FrameTracker() if settings.track else None
    started = time.perf_counter()
    with VideoReader(source, limits=limits, stride=stride) as reader:
        info = reader.info
        folder.mkdir(parents=True, exist_ok=True)  # only once the file is accepted
        total = info.frames_after_stride(stride)
        fps = info.fps / stride
        with (
            VideoWriter(video_path, width=info.width, height=info.height, fps=fps) as writer,
            _Records(json_path, csv_path, fps=fps, width=info.width, height=info.height) as records,
        ):
            progress = VideoProgress(0, total, 0.0, 0.0)
            last_preview = -float("inf")
            cancelled = False
            for result in detect_frames(
                detector, reader, settings, batch_size=batch_size, tracker=tracker, forward_lock=forward_lock
            ):
                annotated = _annotate(result.image, result.detections, id2label)
                writer.write(annotated)
                records.add(frame_record(result), csv_rows(result))
                now = time.perf_counter()
                progress = VideoProgress(
                    done=records.count,
                    total=max(total, records.count) if total is not None else None,
                    elapsed=now - started,
                    model_seconds=progress.model_seconds + result.model_seconds,
                    seen=tracker.seen() if tracker else {},
                )
                if now - last_preview >= preview_every:
                    progress.preview, last_preview = annotated, now
                yield progress
                if cancel is not None and cancel.is_set():
                    cancelled = True
                    break
            # The video first: if it cannot be finished, the records are discarded with it.
            writer.close()
            json_done, csv_done = records.commit()
        note = reader.ended_early
        if cancelled:
            note = f"cancelled after {records.count} of {total if total is not None else '?'} frames"
    progress.result = AnnotatedVideo(
        video=video_path,
        detections_json=json_done,
        detections_csv=csv_done,
        frames=records.count,
        total_frames=total,
        cancelled=cancelled,
        note=note,
        seen=progress.seen,
    )
    progress.preview = progress.preview if progress.preview is not None else annotated
    yield progress
