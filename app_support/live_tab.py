"""The Detect tab's Webcam mode: the visitor's camera streams through the model and annotated frames come back.

Frames travel as Gradio 6 stream chunks (one HTTP POST per captured frame); the server keeps only the newest one
and calls ``stream_frame`` again when it is done with the previous, so a slow model drops frames instead of
building up latency. Every chunk carries the current slider values, so the threshold, max-detections and class
filter apply from the next frame on. Boxes are drawn on the frame as it arrived: with the webcam's mirrored preview
(the default) the browser sends mirrored frames, so the annotated stream matches what the visitor sees.

Per-visitor state (``LiveSession``: tracker, frame clock) lives in a ``gr.State``; the model is shared through the
``DetectorCache`` and its inference lock.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import gradio as gr
import numpy as np
import PIL.Image
import torch

from app_support.detect_controls import DetectControls
from app_support.detector_cache import Detector, DetectorCache
from app_support.errors import user_errors
from app_support.model_choices import ModelRegistry
from app_support.owners import Identities
from ddetr.drawing import display_copy, draw_detections
from ddetr.video import DetectionSettings, FrameTracker, describe_counts

FPS_WINDOW = 12  # frames the fps figure averages over


@dataclass(frozen=True)
class LiveSettings:
    """Server-side knobs of the webcam stream (``python app.py --help`` names their flags)."""

    stream_every: float = 0.06  # seconds between captured frames in the browser (upload bandwidth)
    time_limit: int = 120  # seconds of processing per visitor before they rejoin the queue
    max_side: int = 640  # frames are scaled down to this longer side before detection
    streams: int = 2  # visitors streaming at the same time
    mirror: bool = True  # mirror the preview like a selfie camera (frames arrive mirrored too)

    def __post_init__(self) -> None:
        if not self.stream_every > 0:
            raise ValueError(f"stream_every must be positive, got {self.stream_every}")
        for name in ("time_limit", "max_side", "streams"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")


@dataclass
class LiveSession:
    """One visitor's stream: the tracker for their camera and when the recent frames were answered."""

    model_key: str | None
    tracker: FrameTracker = field(default_factory=FrameTracker)
    answered: deque[float] = field(default_factory=lambda: deque(maxlen=FPS_WINDOW))
    frames: int = 0

    def fps(self) -> float:
        if len(self.answered) < 2:
            return 0.0
        span = self.answered[-1] - self.answered[0]
        return (len(self.answered) - 1) / span if span > 0 else 0.0


def _threads_note(detector: Detector) -> str:
    """ " on N threads" for a CPU model: with ``--threads adaptive`` the count the latest forward pass ran on."""
    if detector.device.type != "cpu":
        return ""
    count = detector.thread_tuner.last_count if detector.thread_tuner is not None else None
    count = count or torch.get_num_threads()
    return f" on {count} thread{'s' if count > 1 else ''}"


class LiveTab:
    def __init__(
        self, registry: ModelRegistry, detectors: DetectorCache, settings: LiveSettings, identities: Identities
    ) -> None:
        self.registry = registry
        self.identities = identities
        self.detectors = detectors
        self.settings = settings

    @user_errors
    def stream_frame(
        self,
        frame: np.ndarray | None,
        model_key: str | None,
        shortest_edge: int | None,
        threshold: float,
        max_detections: int,
        classes: list[str] | None,
        visitor: str | None,
        session: LiveSession | None,
        profile: gr.OAuthProfile | None = None,
    ) -> tuple[Any, str, LiveSession | None]:
        """One webcam frame in, the annotated frame, the live figures and the visitor's session out."""
        if frame is None:
            return None, "Waiting for the camera…", session
        if session is None or session.model_key != model_key:
            session = LiveSession(model_key=model_key)  # a new model means new classes: tracks start over
        choice = self.registry.pick(model_key, self.identities.owner_key(visitor, profile))
        detector = self.detectors.get(choice)
        # Camera frames can be full HD or more: scaled to max_side (display_copy) before anything else.
        camera = PIL.Image.fromarray(np.ascontiguousarray(frame[..., :3]).astype(np.uint8, copy=False))
        picture, _ = display_copy(camera, self.settings.max_side)
        settings = DetectionSettings(
            threshold=threshold,
            max_detections=int(max_detections),
            classes=tuple(classes or ()),
            size=int(shortest_edge) if shortest_edge else None,
        )
        started = time.perf_counter()
        (candidates,) = self.detectors.candidates(choice, [picture], size=settings.size)
        model_ms = (time.perf_counter() - started) * 1000
        detections = session.tracker.detections(candidates, settings)
        annotated = draw_detections(picture, detections, id2label=detector.model.config.id2label)
        session.answered.append(time.perf_counter())
        session.frames += 1
        stats = (
            f"**{session.fps():.1f} fps** · model {model_ms:.0f} ms{_threads_note(detector)} · "
            f"{len(detections)} boxes · {picture.width}×{picture.height} px · {describe_counts(session.tracker.seen())}"
        )
        return annotated, stats, session

    def build(self, controls: DetectControls) -> None:
        """The Webcam mode's components, inside the current ``gr.Tab``."""
        settings = self.settings
        gr.Markdown(
            "Allow the camera, then press **Record**: boxes follow the objects live (the newest frame always wins, "
            f"so a slow model drops frames rather than lagging). Streams pause after {settings.time_limit} s of "
            "processing so other visitors get a turn."
        )
        with gr.Row():
            webcam = gr.Image(
                sources=["webcam"],
                streaming=True,
                type="numpy",
                label="Webcam",
                webcam_options=gr.WebcamOptions(mirror=settings.mirror),
                elem_id="live-input",
            )
            output = gr.Image(
                label="Live detections", streaming=True, format="jpeg", interactive=False, elem_id="live-output"
            )
        stats = gr.Markdown("Waiting for the camera…", elem_id="live-stats")
        session = gr.State(None, time_to_live=900)
        webcam.stream(
            self.stream_frame,
            [webcam, *controls.detection_inputs(), session],
            [output, stats, session],
            stream_every=settings.stream_every,
            time_limit=settings.time_limit,
            concurrency_id="live",
            concurrency_limit=settings.streams,
            show_progress="hidden",
            api_name="ui_live_frame",
            api_visibility="private",
        )
