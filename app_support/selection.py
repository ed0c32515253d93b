"""One forward pass per image, then any number of cheap re-filterings.

The model runs once with no score threshold and keeps the ``MAX_CANDIDATES`` best (query, class) pairs. Score
threshold, maximum detections and the class filter are then applied to those candidates in microseconds, so moving a
slider never touches the model. For ``max_detections <= MAX_CANDIDATES`` the result is exactly what
``ddetr.pipeline(...)(image, threshold, top_k)`` returns: the same top-k-then-threshold rule on the same scores.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np
import PIL.Image
import torch

import ddetr

MAX_CANDIDATES = 300
# The Deformable DETR processors cap the long side at 1333 for the 800-pixel default; keep that ratio.
LONGEST_TO_SHORTEST = 1333 / 800

Detection = dict[str, Any]


@dataclass(frozen=True)
class Candidates:
    """Every scored box of one forward pass, best first, in pixels of the (EXIF-oriented) input image."""

    labels: tuple[str, ...]
    scores: np.ndarray  # (n,) float32, descending
    boxes: np.ndarray  # (n, 4) float32 xyxy, clamped to the image
    image_size: tuple[int, int]  # (width, height)
    model_label: str
    seconds: float
    input_size: tuple[int, int]  # (height, width) the model actually saw

    def __len__(self) -> int:
        return len(self.labels)


def inference_size(shortest_edge: int | None) -> dict[str, int] | None:
    """The processor ``size`` override for a chosen shortest edge (None keeps the checkpoint's own setting)."""
    if shortest_edge is None:
        return None
    shortest = int(shortest_edge)
    if shortest < 32:
        raise ValueError(f"the inference shortest edge must be at least 32 pixels, got {shortest}")
    return {"shortest_edge": shortest, "longest_edge": round(shortest * LONGEST_TO_SHORTEST)}


@torch.inference_mode()
def find_candidates(
    detector: ddetr.ObjectDetectionPipeline,
    image: PIL.Image.Image,
    *,
    shortest_edge: int | None = None,
    model_label: str = "",
) -> Candidates:
    """Run the model once on an already loaded RGB image (see ``detector.processor.load_image``)."""
    width, height = image.size
    started = time.perf_counter()
    size = inference_size(shortest_edge)
    inputs = detector.processor(image, device=detector.device, **({"size": size} if size else {}))
    outputs = detector.model(inputs["pixel_values"], inputs["pixel_mask"])
    (result,) = detector.processor.post_process_object_detection(
        outputs, threshold=0.0, target_sizes=[(height, width)], top_k=MAX_CANDIDATES
    )
    seconds = time.perf_counter() - started
    id2label = detector.model.config.id2label
    limits = np.array([width, height, width, height], dtype=np.float32)
    boxes = result["boxes"].float().cpu().numpy().reshape(-1, 4)
    boxes = np.clip(boxes, 0.0, limits)
    return Candidates(
        labels=tuple(id2label.get(int(label), str(int(label))) for label in result["labels"].tolist()),
        scores=result["scores"].float().cpu().numpy(),
        boxes=boxes.astype(np.float32),
        image_size=(width, height),
        model_label=model_label,
        seconds=seconds,
        input_size=tuple(int(side) for side in inputs["pixel_values"].shape[-2:]),  # type: ignore[arg-type]
    )


def select(
    candidates: Candidates,
    threshold: float,
    max_detections: int,
    classes: Iterable[str] | None = None,
) -> list[Detection]:
    """Detections in the hub's object-detection schema: ``[{"score", "label", "box": {xmin, ymin, xmax, ymax}}]``.

    ``classes`` (empty or None: all) is applied after the top-k cut, so hiding a class never promotes low-scoring
    boxes of another class into view.
    """
    threshold = float(threshold)
    if not 0.0 <= threshold <= 1.0:
        raise ValueError(f"threshold must be in [0, 1], got {threshold}")
    max_detections = int(max_detections)
    if max_detections < 1:
        raise ValueError(f"max detections must be at least 1, got {max_detections}")
    wanted = set(classes or ())
    selected = []
    for index in range(min(max_detections, len(candidates))):
        score = float(candidates.scores[index])
        if score <= threshold:
            break  # scores are sorted, nothing after this passes either
        label = candidates.labels[index]
        if wanted and label not in wanted:
            continue
        xmin, ymin, xmax, ymax = (round(float(v)) for v in candidates.boxes[index])
        selected.append(
            {
                "score": round(score, 4),
                "label": label,
                "box": {"xmin": xmin, "ymin": ymin, "xmax": xmax, "ymax": ymax},
            }
        )
    return selected


def table_rows(detections: list[Detection]) -> list[list[Any]]:
    """Rows for the detections table: label, score, xmin, ymin, xmax, ymax."""
    return [
        [d["label"], d["score"], d["box"]["xmin"], d["box"]["ymin"], d["box"]["xmax"], d["box"]["ymax"]]
        for d in detections
    ]


TABLE_HEADERS = ["label", "score", "xmin", "ymin", "xmax", "ymax"]
