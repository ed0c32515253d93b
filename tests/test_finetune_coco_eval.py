"""COCO metrics through pycocotools on cases whose answer is known."""

from __future__ import annotations

import numpy as np
import pytest

from finetune.data.records import Sample
from finetune.evaluate.coco import HEADLINE_METRICS, METRIC_NAMES, Detections, evaluate_detections

CLASSES = ["a", "b"]


def _sample(index: int, boxes: list[list[float]], labels: list[int]) -> Sample:
    return Sample(
        where=f"test[{index}]",
        image=index,
        image_id=index,
        width=200,
        height=200,
        boxes=np.asarray(boxes, dtype=np.float32).reshape(-1, 4),
        labels=np.asarray(labels, dtype=np.int64),
    )


SAMPLES = [
    _sample(0, [[10, 10, 50, 50], [100, 100, 60, 40]], [0, 1]),  # medium objects (area >= 32^2)
    _sample(1, [[5, 5, 20, 20]], [0]),  # a small object
]


def _perfect(scores: float = 0.9) -> list[Detections]:
    return [
        Detections(index=i, boxes=s.boxes.copy(), scores=np.full(len(s.labels), scores, np.float32), labels=s.labels)
        for i, s in enumerate(SAMPLES)
    ]


def test_perfect_detections_score_one_and_missing_buckets_are_minus_one() -> None:
    metrics = evaluate_detections(SAMPLES, _perfect(), CLASSES)
    for name in ("map", "map_50", "map_75", "map_small", "map_medium", "mar_1", "mar_10", "mar_100"):
        assert metrics.values[name] == pytest.approx(1.0), name
    assert metrics.values["map_large"] == -1.0  # no large ground truth
    assert metrics.per_class == {"a": pytest.approx(1.0), "b": pytest.approx(1.0)}
    assert set(metrics.headline()) == set(HEADLINE_METRICS)
    assert set(metrics.values) == set(METRIC_NAMES)
    assert "n/a" in metrics.format()


def test_low_scored_false_positives_do_not_hurt_but_high_scored_ones_do() -> None:
    noise = Detections(
        index=1,
        boxes=np.array([[150, 150, 30, 30]], np.float32),
        scores=np.array([0.01], np.float32),
        labels=np.array([0]),
    )
    assert evaluate_detections(SAMPLES, [*_perfect(), noise], CLASSES).values["map"] == pytest.approx(1.0)
    loud = Detections(index=1, boxes=noise.boxes, scores=np.array([0.99], np.float32), labels=np.array([0]))
    assert evaluate_detections(SAMPLES, [*_perfect(), loud], CLASSES).per_class["a"] < 1.0


def test_iou_thresholds() -> None:
    # A box shifted by a fifth of its width: IoU = 0.8 / 1.2 = 0.67, so it counts at 0.5 but not at 0.75.
    shifted = []
    for item in _perfect():
        boxes = item.boxes.copy()
        boxes[:, 0] += boxes[:, 2] * 0.2
        shifted.append(Detections(item.index, boxes, item.scores, item.labels))
    metrics = evaluate_detections(SAMPLES, shifted, CLASSES)
    assert metrics.values["map_50"] == pytest.approx(1.0)
    assert metrics.values["map_75"] == pytest.approx(0.0)


def test_wrong_classes_and_no_detections_score_zero() -> None:
    swapped = [Detections(d.index, d.boxes, d.scores, 1 - d.labels) for d in _perfect()]
    assert evaluate_detections(SAMPLES, swapped, CLASSES).values["map"] == pytest.approx(0.0)
    empty = evaluate_detections(SAMPLES, [], CLASSES)
    assert empty.values["map"] == 0.0 and empty.detections == 0
