"""Evaluating a model on a validated split: predictions sharded across processes, COCO metrics on rank 0."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from ddetr.processing import DeformableDetrImageProcessor
from finetune.data.collate import DetectionCollator, EvaluationImages
from finetune.data.records import DetectionSplit
from finetune.data.sampler import shard_indices
from finetune.evaluate.coco import CocoMetrics, Detections, evaluate_detections
from finetune.precision import Precision
from finetune.run.distributed import DistributedContext, broadcast_object, gather_objects
from finetune.run.step import predict


def relabel(detections: list[Detections], label_map: dict[int, int]) -> list[Detections]:
    """Model label indices to dataset label indices; detections of classes the dataset lacks are dropped."""
    relabelled = []
    for item in detections:
        keep = np.array([int(label) in label_map for label in item.labels], dtype=bool)
        labels = np.array([label_map[int(label)] for label in item.labels[keep]], dtype=np.int64)
        relabelled.append(Detections(index=item.index, boxes=item.boxes[keep], scores=item.scores[keep], labels=labels))
    return relabelled


def evaluate_model(
    *,
    model: nn.Module,
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
