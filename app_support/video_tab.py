"""The Detect tab's Video mode and the ``/detect_video`` endpoint: a video file in, an annotated video out.

Both run ``ddetr.video.annotate_video`` (decode → detect in batches → track → draw → encode), holding the shared
inference lock one batch at a time so image and webcam visitors are served in between. The page shows a live
preview, frames done / total and the ETA while it runs; Cancel stops within one batch and keeps what is done.
Outputs are written under server-chosen names in the app's private work area; a refused or failed video leaves
nothing behind (annotate_video removes its partial files).
"""

from __future__ import annotations

import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gradio as gr

from app_support.detect_controls import DEFAULT_THRESHOLD, DetectControls
from app_support.detector_cache import DetectorCache, cache_by_id
from app_support.downloads import DownloadFolder
from app_support.errors import user_errors
from app_support.model_choices import ModelChoice, ModelRegistry
from app_support.owners import Identities
from app_support.zerogpu import gpu, on_zerogpu
from ddetr.video import AnnotatedVideo, DetectionSettings, VideoLimits, VideoProgress, annotate_video, describe_counts
from ddetr.video.reader import VideoReader

VIDEO_TYPES = [".mp4", ".webm", ".mov", ".mkv", ".avi", ".m4v"]
UPDATE_EVERY = 0.5  # seconds between page updates while a video is processed
OUTPUT_NAME = "video"  # outputs never carry the visitor's file name
# A video's time box on ZeroGPU: loading plus a per-frame allowance well above a GPU's forward pass, and the most
# a PRO visitor's call may take.
GPU_SETUP_SECONDS = 30
GPU_SECONDS_PER_FRAME = 0.25
GPU_MAX_SECONDS = 20 * 60


@dataclass(frozen=True)
class VideoSettings:
    """Limits for a shared 2-core Space (``python app.py --help`` names their flags)."""

    max_seconds: float = 120.0
    max_frames: int = 3600
    max_side: int = 1920
    batch_size: int = 8

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ValueError(f"the video batch size must be at least 1, got {self.batch_size}")
        self.limits()  # checks the limits themselves

    def limits(self) -> VideoLimits:
        return VideoLimits(
            max_seconds=self.max_seconds,
            max_frames=self.max_frames,
            max_side=self.max_side,
            flags={
                "max_seconds": "--video-max-seconds",
                "max_frames": "--video-max-frames",
                "max_side": "--video-max-side",
            },
        )


def progress_text(progress: VideoProgress) -> str:
    total = progress.total if progress.total is not None else "?"
    eta = f" · about {progress.eta:.0f} s left" if progress.eta is not None else ""
    pace = progress.done / progress.elapsed if progress.elapsed > 0 else 0.0
    return f"**{progress.done} / {total} frames** · {pace:.1f} frames/s{eta} · {describe_counts(progress.seen)}"


def result_text(result: AnnotatedVideo) -> str:
    head = "Cancelled" if result.cancelled else "Done"
    note = f" ({result.note})" if result.note and not result.cancelled else ""
    return f"**{head}: {result.frames} frames annotated**{note} · {describe_counts(result.seen)}"


class VideoTab:
    def __init__(
        self,
        registry: ModelRegistry,
        detectors: DetectorCache,
        outputs: DownloadFolder,
        settings: VideoSettings,
        identities: Identities,
    ) -> None:
        self.registry = registry
        self.identities = identities
        self.detectors = detectors
        self.outputs = outputs
        self.settings = settings
        self._cancels: dict[str, CancelFlag] = {}
        self._cancels_lock = threading.Lock()

    def _run(
        self,
        video_path: str,
        model_key: str | None,
        owner_key: str | None,
        settings: DetectionSettings,
        stride: int,
        cancel: CancelFlag | None,
    ) -> Iterator[VideoProgress]:
        choice = self.registry.pick(model_key, owner_key)
        job = VideoJob(
            video_path=str(video_path),
            folder=str(self.outputs.new_folder()),
            settings=settings,
            batch_size=self.settings.batch_size,
            stride=stride,
            limits=self.settings.limits(),
            cancel=cancel,
        )
        if on_zerogpu():  # the whole video in one GPU call, sized from its frame count
            return _annotate_on_gpu(self.detectors.cache_id, choice, job)
        return _annotate(self.detectors, choice, job)

    @user_errors
    def process(
        self,
        video_path: str | None,
        model_key: str | None,
        shortest_edge: int | None,
        threshold: float,
        max_detections: int,
        classes: list[str] | None,
        visitor: str | None,
        stride: float,
        request: gr.Request,
        profile: gr.OAuthProfile | None = None,
        progress_bar: gr.Progress = gr.Progress(),  # noqa: B008 (Gradio's way of asking for a progress bar)
    ) -> Iterator[tuple[Any, ...]]:
        """The Video mode: yields (preview, status, video, json, csv) as the video is processed."""
        if not video_path:
            raise ValueError("upload a video first (mp4, webm, mov, mkv or avi)")
        settings = DetectionSettings(
            threshold=threshold,
            max_detections=int(max_detections),
            classes=tuple(classes or ()),
            size=int(shortest_edge) if shortest_edge else None,
        )
        key = request.session_hash or "anonymous"
        cancel = CancelFlag(str(self.outputs.folder / f".cancel-{uuid.uuid4().hex}"))
        with self._cancels_lock:
            self._cancels[key] = cancel
        try:
            yield None, "Reading the video…", None, None, None
            last_update = 0.0
            owner_key = self.identities.owner_key(visitor, profile)
            for progress in self._run(video_path, model_key, owner_key, settings, max(1, int(stride)), cancel):
                result = progress.result
                if result is not None:
                    yield (
                        progress.preview,
                        result_text(result),
                        str(result.video),
                        str(result.detections_json),
                        str(result.detections_csv),
                    )
                elif progress.elapsed - last_update >= UPDATE_EVERY:
                    last_update = progress.elapsed
                    progress_bar((progress.done, progress.total), desc="frames", unit="frames")
                    yield (
                        progress.preview if progress.preview is not None else gr.skip(),
                        progress_text(progress),
                        gr.skip(),
                        gr.skip(),
                        gr.skip(),
                    )
        finally:
            with self._cancels_lock:
                if self._cancels.get(key) is cancel:
                    del self._cancels[key]
            cancel.clear()

    def cancel(self, request: gr.Request) -> str:
        """Ask this visitor's running video to stop after the current frame."""
        with self._cancels_lock:
            cancel = self._cancels.get(request.session_hash or "anonymous")
        if cancel is None:
            return "No video is being processed."
        cancel.set()
        return "Cancelling: finishing the frames done so far…"

    @user_errors
    def api_detect_video(self, video_path: str | None, threshold: float = DEFAULT_THRESHOLD) -> tuple[str, str]:
        """``/detect_video``: the annotated video and the per-frame detections JSON."""
        if not video_path:
            raise ValueError("no video was given")
        final = None
        for progress in self._run(video_path, None, None, DetectionSettings(threshold=float(threshold)), 1, None):
            final = progress
        if final is None or final.result is None:
            raise RuntimeError("the video produced no result")
        return str(final.result.video), str(final.result.detections_json)

    def build(self, controls: DetectControls) -> None:
        limits = self.settings
        gr.Markdown(
            f"Upload a video (mp4, webm, mov, mkv, avi; up to {limits.max_seconds:g} s, {limits.max_frames} frames, "
            f"{limits.max_side} px): every frame is detected, tracked (boxes read `label #id`) and drawn, then "
            "offered as an mp4 with the detections as JSON and CSV."
        )
        with gr.Row():
            with gr.Column():
                video = gr.Video(sources=["upload"], label="Video", elem_id="video-input")
                stride = gr.Slider(1, 10, value=1, step=1, label="Process every N-th frame", elem_id="video-stride")
                with gr.Row():
                    start = gr.Button("Detect in video", variant="primary", elem_id="video-start")
                    cancel = gr.Button("Cancel", variant="stop", elem_id="video-cancel")
            with gr.Column():
                preview = gr.Image(label="Preview", interactive=False, format="jpeg", elem_id="video-preview")
                status = gr.Markdown(elem_id="video-status")
        with gr.Row():
            annotated = gr.Video(label="Annotated video", interactive=False, elem_id="video-output")
            json_file = gr.File(label="Detections per frame (JSON)", interactive=False, elem_id="video-json")
            csv_file = gr.File(label="Detections (CSV)", interactive=False, elem_id="video-csv")
        start.click(
            self.process,
            [video, *controls.detection_inputs(), stride],
            [preview, status, annotated, json_file, csv_file],
            concurrency_id="video",
            concurrency_limit=1,
            show_progress="full",
            show_progress_on=[status],
            api_name="ui_detect_video",
            api_visibility="private",
        )
        cancel.click(self.cancel, None, status, queue=False, api_name="ui_cancel_video", api_visibility="private")

        with gr.Row(visible=False):
            api_video = gr.File(label="video", file_types=VIDEO_TYPES)
            api_threshold = gr.Number(DEFAULT_THRESHOLD, label="threshold", minimum=0.0, maximum=1.0)
            api_annotated = gr.File(label="annotated_video")
            api_json = gr.File(label="detections_json")
            api_trigger = gr.Button("detect_video")
        api_trigger.click(
            self.api_detect_video,
            [api_video, api_threshold],
            [api_annotated, api_json],
            api_name="detect_video",
            api_description="Detect and track objects in a video: [annotated_video_path, detections_json_path].",
            concurrency_id="video",
            concurrency_limit=1,
        )


@dataclass(frozen=True)
class VideoJob:
    """One video to annotate, in plain values: on ZeroGPU it is pickled into the GPU call."""

    video_path: str
    folder: str
    settings: DetectionSettings
    batch_size: int
    stride: int
    limits: VideoLimits
    cancel: CancelFlag | None = None


@dataclass(frozen=True)
class CancelFlag:
    """Cancel, as a file: set in the server, seen by a run in another process too (a ZeroGPU call is a forked
    child), and it pickles."""

    path: str

    def set(self) -> None:
        Path(self.path).touch()

    def is_set(self) -> bool:
        return Path(self.path).exists()

    def clear(self) -> None:
        Path(self.path).unlink(missing_ok=True)


def _annotate(detectors: DetectorCache, choice: ModelChoice, job: VideoJob) -> Iterator[VideoProgress]:
    return annotate_video(
        detectors.get(choice),
        job.video_path,
        Path(job.folder),
        job.settings,
        batch_size=job.batch_size,
        stride=job.stride,
        limits=job.limits,
        cancel=job.cancel,
        name=OUTPUT_NAME,
        forward_lock=detectors.inference_lock,
    )


def video_gpu_seconds(cache_id: int, choice: ModelChoice, job: VideoJob) -> int:
    """The GPU call's time box for ``job``: its frames at a conservative rate, plus loading (at most 20 min)."""
    try:
        with VideoReader(job.video_path, limits=job.limits, stride=job.stride) as reader:
            frames = reader.info.frames_after_stride(job.stride) or job.limits.max_frames or 0
    except ValueError:  # refused: the call itself reports why, quickly
        frames = 0
    return int(min(GPU_SETUP_SECONDS + frames * GPU_SECONDS_PER_FRAME, GPU_MAX_SECONDS))


@gpu(duration=video_gpu_seconds)
def _annotate_on_gpu(cache_id: int, choice: ModelChoice, job: VideoJob) -> Iterator[VideoProgress]:
    cache = cache_by_id(cache_id)
    yield from _annotate(cache, choice, job)
