"""The Detect tab: pick a model, then an image, the webcam or a video; sliders re-filter without re-running.

The Image mode lives here; the Webcam and Video modes are ``live_tab`` and ``video_tab``, sharing the model picker
and filters (``detect_controls``).

``DetectTab`` holds the event handlers as plain methods (tests call them directly) and ``build`` lays out the
components and wires the events. Per-visitor results live in a ``gr.State`` (``DetectionView``); loaded models are
shared by all visitors through the ``DetectorCache``.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gradio as gr
import PIL.Image

from app_support.detect_controls import DEFAULT_MAX_DETECTIONS, DEFAULT_THRESHOLD, build_filters
from app_support.detector_cache import Detector, DetectorCache, ModelLoadError
from app_support.downloads import DownloadFolder
from app_support.errors import user_errors
from app_support.live_tab import LiveTab
from app_support.model_choices import (
    HubModelError,
    ModelChoice,
    ModelRegistry,
    NoModelAvailableError,
    check_hub_model_id,
    fetch_hub_model,
    hub_model_choice,
)
from app_support.owners import Identities
from app_support.video_tab import VideoTab
from ddetr.drawing import display_copy, draw_detections
from ddetr.pipeline import Candidates, Detection

TABLE_HEADERS = ["label", "score", "xmin", "ymin", "xmax", "ymax"]
INFERENCE_GROUP = "inference"  # one forward pass at a time: on a 2-core Space, parallel passes only thrash
# (repo id, the visitor's token or None) -> the downloaded model folder; ``fetch_hub_model`` unless a test says else.
HubFetcher = Callable[[str, str | None], Path]


@dataclass
class DetectionView:
    """What one visitor's last detection left behind: enough to re-filter and re-draw without the model."""

    candidates: Candidates
    display: PIL.Image.Image
    scale: float
    id2label: dict[int, str]
    seconds: float  # the model's time for the image
    model_summary: str  # which model, at which precision


@dataclass
class DetectOutputs:
    """Everything the tab shows for one set of detections."""

    image: PIL.Image.Image | None
    rows: list[list[Any]]
    json_file: str | None
    summary: str

    def as_tuple(self) -> tuple[Any, ...]:
        return self.image, self.rows, self.json_file, self.summary


def describe_model(choice: ModelChoice, detector: Detector) -> str:
    labels = [name for _, name in sorted(detector.model.config.id2label.items()) if not name.startswith("N/A")]
    shown = ", ".join(labels[:40]) + (f", … ({len(labels) - 40} more)" if len(labels) > 40 else "")
    return f"**Active model:** {choice.label} · {len(labels)} classes  \n**Classes:** {shown}"


def table_rows(detections: list[Detection]) -> list[list[Any]]:
    """Rows for the detections table, in ``TABLE_HEADERS`` order."""
    return [
        [d["label"], d["score"], d["box"]["xmin"], d["box"]["ymin"], d["box"]["xmax"], d["box"]["ymax"]]
        for d in detections
    ]


def class_names(detector: Detector) -> list[str]:
    return sorted({name for name in detector.model.config.id2label.values() if not name.startswith("N/A")})


class DetectTab:
    def __init__(
        self,
        registry: ModelRegistry,
        detectors: DetectorCache,
        downloads: DownloadFolder,
        identities: Identities,
        *,
        fetch_hub: HubFetcher = fetch_hub_model,
    ) -> None:
        self.registry = registry
        self.identities = identities
        self.detectors = detectors
        self.downloads = downloads
        self.fetch_hub = fetch_hub

    # -- event handlers ----------------------------------------------------------------------------------------- #

    def default_key(self) -> str | None:
        try:
            return self.registry.default().key
        except NoModelAvailableError:
            return None

    @user_errors
    def refresh_models(
        self, current: str | None, visitor: str | None = None, profile: gr.OAuthProfile | None = None
    ) -> Any:
        """The picker's choices for this visitor: the shared models and their own fine-tuned ones."""
        choices = self.registry.dropdown_choices(self.identities.owner_key(visitor, profile))
        keys = [key for _, key in choices]
        return gr.update(choices=choices, value=current if current in keys else self.default_key())

    @user_errors
    def add_hub_model(
        self,
        repo_id: str | None,
        visitor: str | None = None,
        profile: gr.OAuthProfile | None = None,
        token: gr.OAuthToken | None = None,
    ) -> Any:
        """Download the hub model ``repo_id`` (with the visitor's login token when signed in, so their private repos
        work), check that it loads, list it for this visitor only and select it in the picker."""
        owner_key = self.identities.owner_key(visitor, profile)
        if owner_key is None:  # an API client: nobody the model could be listed for
            raise HubModelError("adding a hub model needs a browser session or a Hugging Face login")
        repo = check_hub_model_id(repo_id)  # before any request: nothing typed becomes a URL path or a local one
        folder = self.fetch_hub(repo, token.token if token is not None else None)
        choice = hub_model_choice(repo, folder)
        try:
            # Loaded before it is listed: a model that does not load is never offered (and the picker's load of it
            # right after is instant, from the cache).
            self.detectors.get(choice)
        except ModelLoadError as error:
            reason = error.__cause__ or error
            raise HubModelError(f"{repo} is not a Deformable DETR model this app can load: {reason}") from None
        self.registry.add_hub_model(owner_key, repo, folder)
        return gr.update(choices=self.registry.dropdown_choices(owner_key), value=choice.key)

    @user_errors
    def select_model(
        self, model_key: str | None, visitor: str | None = None, profile: gr.OAuthProfile | None = None
    ) -> tuple[str, Any]:
        """Load the picked model (once; it stays cached) and show its name and classes."""
        try:
            choice = self.registry.pick(model_key, self.identities.owner_key(visitor, profile))
        except NoModelAvailableError as error:
            return f"**No model loaded.** {error}", gr.update(choices=[], value=[])
        detector = self.detectors.get(choice)
        return describe_model(choice, detector), gr.update(choices=class_names(detector), value=[])

    @user_errors
    def detect(
        self,
        image_path: str | None,
        model_key: str | None,
        shortest_edge: int | None,
        threshold: float,
        max_detections: int,
        classes: list[str] | None,
        visitor: str | None = None,
        profile: gr.OAuthProfile | None = None,
    ) -> tuple[Any, ...]:
        """Run the model once on the image and show the filtered result; returns the outputs plus the new state."""
        if not image_path:
            return (
                *DetectOutputs(None, [], None, "Upload an image, take a webcam photo or paste one.").as_tuple(),
                None,
            )
        choice = self.registry.pick(model_key, self.identities.owner_key(visitor, profile))
        detector = self.detectors.get(choice)
        picture = detector.processor.load_image(image_path)
        started = time.perf_counter()
        (candidates,) = self.detectors.candidates(choice, [picture], size=int(shortest_edge) if shortest_edge else None)
        seconds = time.perf_counter() - started
        display, scale = display_copy(picture)
        summary = f"{choice.label}, {detector.precision.name}"
        view = DetectionView(candidates, display, scale, dict(detector.model.config.id2label), seconds, summary)
        return (*self._render(view, threshold, max_detections, classes).as_tuple(), view)

    @user_errors
    def refilter(
        self, view: DetectionView | None, threshold: float, max_detections: int, classes: list[str] | None
    ) -> tuple[Any, ...]:
        """Apply new slider/filter values to the cached candidates; the model is not involved."""
        if view is None:
            return DetectOutputs(None, [], None, "Upload an image to detect objects.").as_tuple()
        return self._render(view, threshold, max_detections, classes).as_tuple()

    def _render(
        self, view: DetectionView, threshold: float, max_detections: int, classes: list[str] | None
    ) -> DetectOutputs:
        detections = view.candidates.detections(threshold, max_detections, classes)
        annotated = draw_detections(view.display, detections, scale=view.scale, id2label=view.id2label)
        json_file = self.downloads.write_json(detections)
        return DetectOutputs(annotated, table_rows(detections), str(json_file), self._summary(view, detections))

    @staticmethod
    def _summary(view: DetectionView, detections: list[Detection]) -> str:
        candidates = view.candidates
        count = len(detections)
        noun = "detection" if count == 1 else "detections"
        height, width = candidates.input_size
        return (
            f"**{count} {noun}** · model time {view.seconds * 1000:.0f} ms at {width}×{height} px "
            f"({view.model_summary})"
        )

    @user_errors
    def api_detect(
        self, image_path: str | None, threshold: float = DEFAULT_THRESHOLD, max_detections: float = 100, model: str = ""
    ) -> list[Detection]:
        """The ``/detect`` endpoint: detections in the hub's object-detection schema."""
        if not image_path:
            raise ValueError("no image was given")
        choice = self.registry.pick(model)
        (candidates,) = self.detectors.candidates(choice, [image_path])
        return candidates.detections(threshold, int(max_detections))

    # -- layout ------------------------------------------------------------------------------------------------- #

    def build(
        self, examples: dict[str, list[Path]], *, live: LiveTab, video: VideoTab, visitor: gr.BrowserState
    ) -> dict[str, gr.components.Component]:
        """Create the tab's components inside the current ``gr.Tab`` and wire their events: the model picker and
        filters on top, shared by the three modes below (Image, Webcam, Video)."""
        initial_key = self.default_key()
        with gr.Row():
            model = gr.Dropdown(
                self.registry.dropdown_choices(), value=initial_key, label="Model", scale=4, elem_id="model-picker"
            )
            refresh = gr.Button("↻ Refresh list", scale=1, size="sm")
        with gr.Row():
            hub_model_id = gr.Textbox(
                label="Add a model from the Hub (owner/name)",
                placeholder="SenseTime/deformable-detr-with-box-refine",
                max_length=200,
                scale=4,
                elem_id="hub-model-id",
            )
            hub_model_add = gr.Button("Add", scale=1, size="sm", elem_id="hub-model-add")
        model_info = gr.Markdown(elem_id="model-info")
        controls = build_filters(model, visitor)
        threshold, max_detections, classes, resolution = (
            controls.threshold,
            controls.max_detections,
            controls.classes,
            controls.resolution,
        )
        with gr.Tabs(selected="mode-image"):
            with gr.Tab("Image", id="mode-image"), gr.Row():
                with gr.Column(scale=1):
                    image = gr.Image(
                        type="filepath",
                        image_mode=None,  # decoding (and rejecting bad files) is ddetr's job, with its own messages
                        sources=["upload", "webcam", "clipboard"],
                        label="Image",
                        elem_id="detect-input",
                    )
                    detect_button = gr.Button("Detect", variant="primary", elem_id="detect-button")
                    for title, paths in examples.items():
                        if paths:
                            gr.Examples([[str(p)] for p in paths], inputs=[image], label=title, examples_per_page=8)
                with gr.Column(scale=1):
                    annotated = gr.Image(label="Detections", format="png", interactive=False, elem_id="detect-output")
                    summary = gr.Markdown(elem_id="detect-summary")
                    table = gr.Dataframe(headers=TABLE_HEADERS, label="Detections table", interactive=False)
                    json_file = gr.File(label="Detections (JSON, hub object-detection schema)", interactive=False)
            with gr.Tab("Webcam", id="mode-webcam"):
                live.build(controls)
            with gr.Tab("Video", id="mode-video"):
                video.build(controls)
        view = gr.State(None, time_to_live=3600)

        outputs = [annotated, table, json_file, summary]
        detect_inputs = [image, *controls.detection_inputs()]
        run = {"fn": self.detect, "inputs": detect_inputs, "outputs": [*outputs, view]}
        queue_options = {"concurrency_id": INFERENCE_GROUP, "concurrency_limit": 1}
        # UI-only events are private, with their own names so that "detect" stays free for the public endpoint.
        private = {"api_visibility": "private"}
        image.change(**run, **queue_options, **private, api_name="ui_detect_on_image")
        detect_button.click(**run, **queue_options, **private, api_name="ui_detect_on_click")
        resolution.change(**run, **queue_options, **private, api_name="ui_detect_on_resolution")
        model.change(
            self.select_model, [model, visitor], [model_info, classes], **private, api_name="ui_select_model"
        ).then(**run, **queue_options, **private, api_name="ui_detect_on_model")
        refresh.click(self.refresh_models, [model, visitor], [model], **private, api_name="ui_refresh_models")
        # Selecting the added model fires model.change, which loads it and detects as a pick would. Downloads wait
        # on the network, not the CPU: their own queue, so they never hold up a forward pass.
        add_hub = {"fn": self.add_hub_model, "inputs": [hub_model_id, visitor], "outputs": [model]}
        hub_queue = {"concurrency_id": "hub-model-add", "concurrency_limit": 2}
        hub_model_add.click(**add_hub, **hub_queue, **private, api_name="ui_add_hub_model")
        hub_model_id.submit(**add_hub, **hub_queue, **private, api_name="ui_add_hub_model_on_submit")
        for name, control in (("threshold", threshold), ("max", max_detections), ("classes", classes)):
            control.change(
                self.refilter,
                [view, threshold, max_detections, classes],
                outputs,
                trigger_mode="always_last",
                show_progress="hidden",
                concurrency_id="refilter",
                concurrency_limit=4,
                api_name=f"ui_refilter_{name}",
                **private,
            )

        # The public API: hidden components, so API calls neither need nor disturb the visible page.
        with gr.Row(visible=False):
            # A file, not gr.Image: Gradio's image component would decode the upload itself and answer a file it
            # cannot open with a bare error; ddetr's loader refuses it with a message naming the problem.
            api_image = gr.File(label="image", type="filepath")
            api_threshold = gr.Number(DEFAULT_THRESHOLD, label="threshold", minimum=0.0, maximum=1.0)
            api_max = gr.Number(DEFAULT_MAX_DETECTIONS, label="max_detections", precision=0, minimum=1, maximum=300)
            api_model = gr.Textbox("", label="model")
            api_result = gr.JSON(label="detections")
            api_trigger = gr.Button("detect")
        api_trigger.click(
            self.api_detect,
            [api_image, api_threshold, api_max, api_model],
            api_result,
            api_name="detect",
            api_description="Detect objects: returns [{score, label, box: {xmin, ymin, xmax, ymax}}].",
            **queue_options,
        )
        return {"model": model, "model_info": model_info, "classes": classes, "image": image, "threshold": threshold}
