"""Bounding-box conversions and overlap measures (pure tensor functions, any leading batch shape)."""

from __future__ import annotations

import torch


def box_cxcywh_to_xyxy(boxes: torch.Tensor) -> torch.Tensor:
    """(..., 4) centre/size boxes to corner boxes."""
    center_x, center_y, width, height = boxes.unbind(-1)
    return torch.stack(
        [center_x - 0.5 * width, center_y - 0.5 * height, center_x + 0.5 * width, center_y + 0.5 * height], dim=-1
    )


def box_xyxy_to_cxcywh(boxes: torch.Tensor) -> torch.Tensor:
    """(..., 4) corner boxes to centre/size boxes."""
    x0, y0, x1, y1 = boxes.unbind(-1)
    return torch.stack([(x0 + x1) / 2, (y0 + y1) / 2, x1 - x0, y1 - y0], dim=-1)


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
