"""Raw detection-head outputs to per-image scored boxes, with transformers' ``post_process_object_detection`` semantics.

Deformable DETR classifies with a sigmoid per class and has no background class, so one query may yield several
detections with different labels: the top ``top_k`` (query, class) pairs are taken over all queries x classes, then
thresholded. Boxes are (x0, y0, x1, y1), relative or scaled by ``target_sizes`` -- pass each image's *original*
(height, width) to get pixels in the image the user gave, since normalised boxes are relative to the unpadded
image. Like transformers, boxes are not clipped to the image.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from ddetr.boxes import box_cxcywh_to_xyxy


def _logits_and_boxes(outputs: Any) -> tuple[torch.Tensor, torch.Tensor]:
    if isinstance(outputs, Mapping):
        missing = [key for key in ("logits", "pred_boxes") if key not in outputs]
        if missing:
            raise ValueError(f"outputs is missing {missing}; expected 'logits' and 'pred_boxes'")
        logits, boxes = outputs["logits"], outputs["pred_boxes"]
    else:
        logits, boxes = getattr(outputs, "logits", None), getattr(outputs, "pred_boxes", None)
        if logits is None or boxes is None:
            raise ValueError(
                f"outputs ({type(outputs).__name__}) must have .logits (batch, queries, classes) and .pred_boxes "
                "(batch, queries, 4), or be a dict with those keys"
            )
    if not isinstance(logits, torch.Tensor) or logits.ndim != 3:
        raise ValueError(f"logits must be a (batch, queries, classes) tensor, got {_describe(logits)}")
    if not isinstance(boxes, torch.Tensor) or boxes.ndim != 3 or boxes.shape[-1] != 4:
        raise ValueError(f"pred_boxes must be a (batch, queries, 4) tensor, got {_describe(boxes)}")
    if boxes.shape[:2] != logits.shape[:2]:
        raise ValueError(f"logits {tuple(logits.shape)} and pred_boxes {tuple(boxes.shape)} disagree on batch/queries")
    return logits, boxes


def _describe(value: Any) -> str:
    return f"shape {tuple(value.shape)}" if isinstance(value, torch.Tensor) else type(value).__name__


def _scale_factors(target_sizes: Any, batch_size: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """(batch, 4) factors [w, h, w, h] from a (batch, 2) tensor or a list of (height, width) pairs."""
    if isinstance(target_sizes, torch.Tensor):
        sizes = target_sizes.to(device=device, dtype=dtype)
    elif isinstance(target_sizes, Sequence) and not isinstance(target_sizes, str):
        try:
            sizes = torch.tensor([[float(s[0]), float(s[1])] for s in target_sizes], device=device, dtype=dtype)
        except (TypeError, IndexError, ValueError):
            raise ValueError(f"target_sizes must be (height, width) pairs, got {target_sizes!r}") from None
        sizes = sizes.reshape(-1, 2)
    else:
        raise ValueError(f"target_sizes must be a (batch, 2) tensor or a list of (height, width), got {target_sizes!r}")
    if sizes.ndim != 2 or sizes.shape[1] != 2:
        raise ValueError(f"target_sizes must have shape (batch, 2), got {tuple(sizes.shape)}")
    if sizes.shape[0] != batch_size:
        raise ValueError(
            f"got {sizes.shape[0]} target sizes for a batch of {batch_size}; pass one (height, width) per image"
        )
    heights, widths = sizes.unbind(1)
    return torch.stack([widths, heights, widths, heights], dim=1)


@torch.no_grad()
def post_process_object_detection(
    outputs: Any,
    threshold: float = 0.5,
    target_sizes: torch.Tensor | Sequence[Sequence[float]] | None = None,
    top_k: int = 100,
) -> list[dict[str, torch.Tensor]]:
    """Per image ``{"scores": (n,), "labels": (n,) int64, "boxes": (n, 4) xyxy}``, scores descending.

    ``outputs`` is anything with ``.logits`` (batch, queries, classes) and ``.pred_boxes`` (batch, queries, 4,
    cxcywh in [0, 1]), or a dict with those keys. Kept are the top ``min(top_k, queries x classes)`` sigmoid scores
    that are strictly above ``threshold``. Results stay on the outputs' device.
    """
    logits, pred_boxes = _logits_and_boxes(outputs)
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
        raise ValueError(f"top_k must be a positive int, got {top_k!r}")
    batch_size, _, num_classes = logits.shape
    scores = logits.sigmoid().reshape(batch_size, -1)
    scores, flat_index = torch.topk(scores, min(top_k, scores.shape[1]), dim=1)
    query_index = torch.div(flat_index, num_classes, rounding_mode="floor")
    labels = flat_index % num_classes
    boxes = box_cxcywh_to_xyxy(pred_boxes)
    boxes = torch.gather(boxes, 1, query_index.unsqueeze(-1).expand(-1, -1, 4))
    if target_sizes is not None:
        if boxes.dtype in (torch.float16, torch.bfloat16):
            # Half precision cannot hold pixel coordinates of large images (bf16 steps by 8 above 1024).
            boxes = boxes.float()
        boxes = boxes * _scale_factors(target_sizes, batch_size, boxes.device, boxes.dtype)[:, None, :]
    results = []
    for image_scores, image_labels, image_boxes in zip(scores, labels, boxes):
        keep = image_scores > threshold
        results.append({"scores": image_scores[keep], "labels": image_labels[keep], "boxes": image_boxes[keep]})
    return results
