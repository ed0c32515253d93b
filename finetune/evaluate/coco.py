"""COCO box metrics with pycocotools: AP@[.5:.95], AP50, AP75, AP small/medium/large, AR@1/10/100 and AP per class.

Ground truth comes from the validated samples (boxes in original image pixels, area = box area, no crowd regions);
detections are the model's top-100 (query, class) pairs per image. Images and categories are numbered from 1 here,
because pycocotools treats an annotation id of 0 as "unmatched". Buckets without ground truth are -1, as in
pycocotools (shown as n/a).
"""

from __future__ import annotations

import contextlib
import io
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from finetune.data.records import Sample

# pycocotools' summary order.
METRIC_NAMES: tuple[str, ...] = (
    "map",
    "map_50",
    "map_75",
    "map_small",
    "map_medium",
    "map_large",
    "mar_1",
    "mar_10",
    "mar_100",
    "mar_small",
    "mar_medium",
    "mar_large",
)
HEADLINE_METRICS: tuple[str, ...] = ("map", "map_50", "map_75", "map_small", "map_medium", "map_large", "mar_100")


@dataclass
class Detections:
    """One image's detections: ``boxes`` (n, 4) COCO xywh in original pixels, ``scores`` (n,), ``labels`` (n,)."""

    index: int
    boxes: np.ndarray
    scores: np.ndarray
    labels: np.ndarray


@dataclass
class CocoMetrics:
    values: dict[str, float]
    per_class: dict[str, float] = field(default_factory=dict)
    images: int = 0
    detections: int = 0

    def headline(self) -> dict[str, float]:
        return {name: self.values[name] for name in HEADLINE_METRICS}

    def to_dict(self) -> dict[str, Any]:
        return {
            **self.values,
            "per_class_ap": dict(self.per_class),
            "images": self.images,
            "detections": self.detections,
        }

    def format(self) -> str:
        def shown(value: float) -> str:
            return "  n/a" if value < 0 else f"{value:.4f}"

        lines = [f"COCO box metrics on {self.images} images ({self.detections} detections)"]
        labels = {
            "map": "AP @[.50:.95]",
            "map_50": "AP @.50",
            "map_75": "AP @.75",
            "map_small": "AP small",
            "map_medium": "AP medium",
            "map_large": "AP large",
            "mar_1": "AR @1",
            "mar_10": "AR @10",
            "mar_100": "AR @100",
            "mar_small": "AR small",
            "mar_medium": "AR medium",
            "mar_large": "AR large",
        }
        for name in METRIC_NAMES:
            lines.append(f"  {labels[name]:<14} {shown(self.values[name])}")
        if self.per_class:
            lines.append("  AP per class:")
            width = max(len(name) for name in self.per_class)
            for name, value in self.per_class.items():
                lines.append(f"    {name:<{width}}  {shown(value)}")
        return "\n".join(lines)


def ground_truth(samples: list[Sample], class_names: list[str]) -> COCO:
    images: list[dict[str, Any]] = []
    annotations: list[dict[str, Any]] = []
    for position, sample in enumerate(samples):
        images.append({"id": position + 1, "width": sample.width, "height": sample.height})
        for box, label in zip(sample.boxes, sample.labels):
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": position + 1,
                    "category_id": int(label) + 1,
                    "bbox": [float(v) for v in box],
                    "area": float(box[2] * box[3]),
                    "iscrowd": 0,
                }
            )
    coco = COCO()
    coco.dataset = {
        "images": images,
        "annotations": annotations,
        "categories": [{"id": index + 1, "name": name} for index, name in enumerate(class_names)],
    }
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


def evaluate_detections(samples: list[Sample], detections: list[Detections], class_names: list[str]) -> CocoMetrics:
    """COCO metrics of ``detections`` (one entry per evaluated image, ``index`` into ``samples``)."""
    truth = ground_truth(samples, class_names)
    results = [
        {
            "image_id": item.index + 1,
            "category_id": int(label) + 1,
            "bbox": [float(v) for v in box],
            "score": float(score),
        }
        for item in detections
        for box, score, label in zip(item.boxes, item.scores, item.labels)
        if box[2] > 0 and box[3] > 0
    ]
    has_truth = bool(truth.dataset["annotations"])
    if not results:
        # pycocotools cannot load an empty result list: nothing detected is AP 0 (or n/a without ground truth).
        value = 0.0 if has_truth else -1.0
        return CocoMetrics(
            values=dict.fromkeys(METRIC_NAMES, value),
            per_class=dict.fromkeys(class_names, value),
            images=len(samples),
        )
    with contextlib.redirect_stdout(io.StringIO()):
        predicted = truth.loadRes(results)
        evaluator = COCOeval(truth, predicted, iouType="bbox")
        evaluator.params.imgIds = [position + 1 for position in range(len(samples))]
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    values = {name: float(value) for name, value in zip(METRIC_NAMES, evaluator.stats)}
    # precision: (iou thresholds, recall points, classes, area ranges, max detections); area "all", 100 detections.
    precision = evaluator.eval["precision"][:, :, :, 0, -1]
    per_class = {}
    for index, name in enumerate(class_names):
        valid = precision[:, :, index][precision[:, :, index] > -1]
        per_class[name] = float(valid.mean()) if valid.size else -1.0
    return CocoMetrics(values=values, per_class=per_class, images=len(samples), detections=len(results))
