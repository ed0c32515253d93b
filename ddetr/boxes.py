"""Bounding-box conversions (torch tensors or numpy arrays) and overlap measures (tensors), any leading shape.

The one place box formats change: ``xyxy`` corners, ``cxcywh`` centre and size (the model's), ``xywh`` COCO."""

from __future__ import annotations

from typing import TypeVar

import numpy as np
import torch

Boxes = TypeVar("Boxes", torch.Tensor, np.ndarray)


def _stack(columns: list[Boxes], like: Boxes) -> Boxes:
    if isinstance(like, torch.Tensor):
        return torch.stack(columns, dim=-1)
    return np.stack(columns, axis=-1).astype(like.dtype, copy=False)


def _columns(boxes: Boxes) -> list[Boxes]:
    return [boxes[..., index] for index in range(4)]


def box_cxcywh_to_xyxy(boxes: Boxes) -> Boxes:
    """(..., 4) centre/size boxes to corner boxes (torch tensors or numpy arrays)."""
    center_x, center_y, width, height = _columns(boxes)
    corners = [center_x - 0.5 * width, center_y - 0.5 * height, center_x + 0.5 * width, center_y + 0.5 * height]
    return _stack(corners, boxes)


def box_xyxy_to_cxcywh(boxes: Boxes) -> Boxes:
    """(..., 4) corner boxes to centre/size boxes."""
    x0, y0, x1, y1 = _columns(boxes)
    return _stack([(x0 + x1) / 2, (y0 + y1) / 2, x1 - x0, y1 - y0], boxes)


def box_xywh_to_xyxy(boxes: Boxes) -> Boxes:
    """(..., 4) COCO (x, y, width, height) boxes to corner boxes."""
    x, y, width, height = _columns(boxes)
    return _stack([x, y, x + width, y + height], boxes)


def box_xyxy_to_xywh(boxes: Boxes) -> Boxes:
    """(..., 4) corner boxes to COCO (x, y, width, height) boxes."""
    x0, y0, x1, y1 = _columns(boxes)
    return _stack([x0, y0, x1 - x0, y1 - y0], boxes)


def box_area(boxes: torch.Tensor) -> torch.Tensor:
    """(..., 4) corner boxes to (...) areas."""
    return (boxes[..., 2] - boxes[..., 0]) * (boxes[..., 3] - boxes[..., 1])


def check_xyxy_boxes(boxes: torch.Tensor, name: str = "boxes") -> None:
    """Raise ValueError, showing the offending rows, for non-finite boxes or boxes with x1 < x0 or y1 < y0."""
    if boxes.numel() == 0:
        return
    bad = ~torch.isfinite(boxes).all(-1) | (boxes[..., 2] < boxes[..., 0]) | (boxes[..., 3] < boxes[..., 1])
    if bad.any():
        rows = boxes[bad][:5].tolist()
        raise ValueError(
            f"{name}: {int(bad.sum())} box(es) are non-finite or have x1 < x0 / y1 < y0 (xyxy); first: {rows}"
        )


def box_iou(boxes1: torch.Tensor, boxes2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Pairwise IoU and union of (N, 4) and (M, 4) corner boxes, both (N, M)."""
    area1 = box_area(boxes1)
    area2 = box_area(boxes2)
    top_left = torch.max(boxes1[:, None, :2], boxes2[None, :, :2])
    bottom_right = torch.min(boxes1[:, None, 2:], boxes2[None, :, 2:])
    intersection_size = (bottom_right - top_left).clamp(min=0)
    intersection = intersection_size[..., 0] * intersection_size[..., 1]
    union = area1[:, None] + area2[None, :] - intersection
    return intersection / union, union


def generalized_box_iou(boxes1: torch.Tensor, boxes2: torch.Tensor) -> torch.Tensor:
    """Pairwise generalised IoU (Rezatofighi et al., 2019) of (N, 4) and (M, 4) corner boxes, (N, M).

    Raises ValueError for degenerate or non-finite boxes instead of returning NaN.
    """
    check_xyxy_boxes(boxes1, "boxes1")
    check_xyxy_boxes(boxes2, "boxes2")
    iou, union = box_iou(boxes1, boxes2)
    top_left = torch.min(boxes1[:, None, :2], boxes2[None, :, :2])
    bottom_right = torch.max(boxes1[:, None, 2:], boxes2[None, :, 2:])
    enclosing_size = (bottom_right - top_left).clamp(min=0)
    enclosing = enclosing_size[..., 0] * enclosing_size[..., 1]
    return iou - (enclosing - union) / enclosing
