"""The controls the Detect tab's three modes (image, webcam, video) share: model, resolution and the filters."""

from __future__ import annotations

from dataclasses import dataclass

import gradio as gr

DEFAULT_THRESHOLD = 0.5
DEFAULT_MAX_DETECTIONS = 100
# "model default" keeps the checkpoint's own preprocessing (800 px for the SenseTime checkpoints).
RESOLUTIONS: tuple[tuple[str, int], ...] = (
    ("model default", 0),
    ("256 px", 256),
    ("320 px", 320),
    ("480 px", 480),
    ("640 px", 640),
    ("800 px", 800),
    ("1024 px", 1024),
)


@dataclass(frozen=True)
class DetectControls:
    model: gr.Dropdown
    resolution: gr.Dropdown
    threshold: gr.Slider
    max_detections: gr.Slider
    classes: gr.Dropdown
    visitor: gr.BrowserState  # whose fine-tuned models the picker may name

    def detection_inputs(self) -> list[gr.components.Component]:
        """In the order every mode's handler takes them: model, resolution, threshold, max detections, classes,
        visitor."""
        return [self.model, self.resolution, self.threshold, self.max_detections, self.classes, self.visitor]


def build_filters(model: gr.Dropdown, visitor: gr.BrowserState) -> DetectControls:
    """The sliders and pickers under the model picker, inside the current layout block."""
    with gr.Row():
        threshold = gr.Slider(
            0.0, 1.0, value=DEFAULT_THRESHOLD, step=0.01, label="Score threshold", elem_id="threshold"
        )
        max_detections = gr.Slider(
            1, 300, value=DEFAULT_MAX_DETECTIONS, step=1, label="Max detections", elem_id="max-detections"
        )
        classes = gr.Dropdown([], value=[], multiselect=True, label="Show only these classes (empty: all)")
        resolution = gr.Dropdown(
            list(RESOLUTIONS), value=0, label="Inference resolution (shortest edge)", elem_id="resolution"
        )
    return DetectControls(model, resolution, threshold, max_detections, classes, visitor)
