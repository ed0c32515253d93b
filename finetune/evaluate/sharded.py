"""Evaluating a model on a validated split: predictions sharded across processes, COCO metrics on rank 0."""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import torch

from ddetr.boxes import box_xyxy_to_xywh
from ddetr.model.object_detection import DeformableDetrForObjectDetection
from ddetr.pipeline import detect_candidates
from ddetr.processing import DeformableDetrImageProcessor
from ddetr.runtime.precision import Precision
from finetune.data.collate import Batch, DetectionCollator, EvaluationImages
from finetune.data.records import DetectionSplit
from finetune.data.sampler import shard_indices
from finetune.evaluate.coco import CocoMetrics, Detections, evaluate_detections
from finetune.run.distributed import DistributedContext, broadcast_object, gather_objects


def relabel(detections: list[Detections], label_map: dict[int, int]) -> list[Detections]:
    """Model label indices to dataset label indices; detections of classes the dataset lacks are dropped."""
    relabelled = []
    for item in detections:
        keep = np.array([int(label) in label_map for label in item.labels], dtype=bool)
        labels = np.array([label_map[int(label)] for label in item.labels[keep]], dtype=np.int64)
        relabelled.append(Detections(index=item.index, boxes=item.boxes[keep], scores=item.scores[keep], labels=labels))
    return relabelled


# COCO's AP@100 reads the top 100 (query, class) pairs of each image, at any score.
EVAL_TOP_K = 100


def predict(
    *,
    model: DeformableDetrForObjectDetection,
    batches: Iterable[Batch],
    precision: Precision,
    device: torch.device,
) -> list[Detections]:
    """Top-100 detections per image through ddetr's inference path, boxes in original image pixels (COCO xywh)."""
    was_training = model.training
    model.eval()
    results = []
    try:
        for batch in batches:
            batch = batch.to(device)
            candidates = detect_candidates(
                model,
                batch.pixel_values,
                batch.pixel_mask,
                image_sizes=batch.original_sizes,
                precision=precision,
                top_k=EVAL_TOP_K,
            )
            for index, found in zip(batch.indices, candidates):
                results.append(
                    Detections(
                        index=int(index), boxes=box_xyxy_to_xywh(found.boxes), scores=found.scores, labels=found.labels
                    )
                )
    finally:
        model.train(was_training)
    return results


def evaluate_model(
    *,
    model: DeformableDetrForObjectDetection,
    split: DetectionSplit,
    class_names: list[str],
    processor: DeformableDetrImageProcessor,
    context: DistributedContext,
    precision: Precision,
    batch_size: int,
    num_workers: int = 0,
    label_map: dict[int, int] | None = None,
) -> CocoMetrics:
    """COCO metrics of ``model`` on ``split`` (every process must call this; all get the same result)."""
    indices = shard_indices(len(split), context.rank, context.world_size)
    loader = torch.utils.data.DataLoader(
        EvaluationImages(split=split, indices=indices),
        batch_size=batch_size,
        collate_fn=DetectionCollator(processor=processor, resize=True),
        num_workers=num_workers,
        # Its own generator: evaluating must not draw from the global RNG training uses.
        generator=torch.Generator().manual_seed(0),
    )
    detections = predict(model=model, batches=loader, precision=precision, device=context.device)
    if label_map is not None:
        detections = relabel(detections, label_map)
    gathered = gather_objects(detections, context)
    metrics = None
    if context.is_main:
        everything = [item for part in gathered for item in part]
        metrics = evaluate_detections(split.samples, everything, class_names)
    return broadcast_object(metrics, context)
