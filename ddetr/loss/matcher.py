"""Hungarian matching between Deformable DETR predictions and ground-truth objects.

Each image's queries are assigned one-to-one to its target objects by minimising

    class_cost * C_class + bbox_cost * C_L1 + giou_cost * (-GIoU)

with the sigmoid focal classification cost of the paper (and transformers):

    C_class = alpha * (1 - p)^gamma * -log(p + 1e-8)  -  (1 - alpha) * p^gamma * -log(1 - p + 1e-8)

evaluated at the target's class. Unmatched queries are "no object" for the criterion.

Unlike transformers, which replaces NaN/inf costs by the largest float and lets training carry on with a silently
wrong assignment (or crashes later inside ``generalized_box_iou``), bad predictions and bad targets raise a
``ValueError`` that names the image and shows the offending values: ``NonFinitePredictionError`` for predictions
that are not finite numbers (a diverging model, which a training loop may skip), a plain ``ValueError`` for
malformed inputs and bad targets (a bug or bad data, to surface).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from torch import nn

from ddetr.boxes import box_cxcywh_to_xyxy, generalized_box_iou

Target = dict[str, torch.Tensor]
MatchIndices = list[tuple[torch.Tensor, torch.Tensor]]

# How many offending rows an error message shows; enough to diagnose, short enough to read.
_SHOWN_ROWS = 5


class NonFinitePredictionError(ValueError):
    """Predictions with NaN/inf logits or boxes, negative box sizes, or a matching cost that overflows: what a
    diverging model produces (not a malformed input or a bad target, which raise a plain ``ValueError``)."""


def _empty_match() -> tuple[torch.Tensor, torch.Tensor]:
    return torch.empty(0, dtype=torch.int64), torch.empty(0, dtype=torch.int64)


def check_predictions(logits: torch.Tensor, pred_boxes: torch.Tensor, name: str = "predictions") -> None:
    """Raise ValueError unless logits are (batch, queries, classes) and pred_boxes (batch, queries, 4);
    ``NonFinitePredictionError`` unless the logits are finite and the boxes finite cxcywh boxes with non-negative
    width and height."""
    if logits.dim() != 3 or pred_boxes.dim() != 3 or pred_boxes.shape[-1] != 4:
        raise ValueError(
            f"{name}: expected logits (batch, queries, classes) and pred_boxes (batch, queries, 4), got "
            f"{tuple(logits.shape)} and {tuple(pred_boxes.shape)}"
        )
    if logits.shape[:2] != pred_boxes.shape[:2]:
        raise ValueError(
            f"{name}: logits {tuple(logits.shape)} and pred_boxes {tuple(pred_boxes.shape)} "
            "disagree on (batch, queries)"
        )
    if logits.shape[-1] == 0:
        raise ValueError(f"{name}: logits have no classes (shape {tuple(logits.shape)})")
    # (batch, queries); zero width is allowed because a sigmoid head can underflow to exactly 0. Non-finite logits
    # are rejected even for classes absent from the targets: they make the focal loss NaN/inf all the same.
    bad_boxes = ~torch.isfinite(pred_boxes).all(-1) | (pred_boxes[..., 2] < 0) | (pred_boxes[..., 3] < 0)
    bad = bad_boxes | ~torch.isfinite(logits).all(-1)
    if bad.any():
        image = int(bad.any(-1).nonzero()[0])
        queries = bad[image].nonzero().flatten()[:_SHOWN_ROWS]
        raise NonFinitePredictionError(
            f"{name}: image {image} has {int(bad[image].sum())} queries with non-finite logits or non-finite / "
            f"negative-size boxes; queries {queries.tolist()}: boxes (cxcywh) {pred_boxes[image, queries].tolist()}, "
            f"logits (first 8 classes) {logits[image, queries, :8].tolist()} ({int(bad.sum())} bad queries in the "
            "batch; NaN predictions usually mean training diverged: lower the learning rate or train in float32)"
        )


def check_targets(targets: Sequence[Target], batch_size: int, num_classes: int) -> None:
    """Raise ValueError unless ``targets`` holds ``batch_size`` dicts with integer "class_labels" (n,) in
    [0, num_classes) and finite "boxes" (n, 4) cxcywh with width and height > 0."""
    if len(targets) != batch_size:
        raise ValueError(f"got {len(targets)} target dicts for a batch of {batch_size} images")
    for image, target in enumerate(targets):
        if "class_labels" not in target or "boxes" not in target:
            raise ValueError(f"target {image} needs 'class_labels' and 'boxes', has keys {sorted(target)}")
        labels, boxes = target["class_labels"], target["boxes"]
        if not isinstance(labels, torch.Tensor) or not isinstance(boxes, torch.Tensor):
            raise ValueError(
                f"target {image}: class_labels and boxes must be tensors, got {type(labels)}, {type(boxes)}"
            )
        if labels.dim() != 1 or labels.dtype.is_floating_point or labels.dtype == torch.bool:
            raise ValueError(
                f"target {image}: class_labels must be a 1-d integer tensor, got {labels.dtype} {tuple(labels.shape)}"
            )
        if boxes.dim() != 2 or boxes.shape[-1] != 4 or boxes.shape[0] != labels.shape[0]:
            raise ValueError(
                f"target {image}: boxes must be ({labels.shape[0]}, 4) to match class_labels, got {tuple(boxes.shape)}"
            )
    if sum(int(t["class_labels"].shape[0]) for t in targets) == 0:
        return
    # (batch, 2): [label out of range, bad box] per image, copied to the host once for the whole batch.
    any_bad = torch.stack(
        [
            torch.stack(
                [
                    ((t["class_labels"] < 0) | (t["class_labels"] >= num_classes)).any(),
                    (~torch.isfinite(t["boxes"]).all(-1) | (t["boxes"][:, 2] <= 0) | (t["boxes"][:, 3] <= 0)).any(),
                ]
            )
            for t in targets
        ]
    ).cpu()
    if not any_bad.any():
        return
    image, kind = (int(i) for i in any_bad.nonzero()[0])
    labels, boxes = targets[image]["class_labels"], targets[image]["boxes"]
    if kind == 0:
        bad_labels = labels[(labels < 0) | (labels >= num_classes)]
        raise ValueError(
            f"target {image}: class labels {bad_labels[:_SHOWN_ROWS].tolist()} are outside [0, {num_classes}); "
            "the sigmoid head has no background class, so ids must be remapped to 0..num_labels-1"
        )
    bad_boxes = boxes[~torch.isfinite(boxes).all(-1) | (boxes[:, 2] <= 0) | (boxes[:, 3] <= 0)]
    raise ValueError(
        f"target {image}: {bad_boxes.shape[0]} box(es) are non-finite or have width/height <= 0 (cxcywh): "
        f"{bad_boxes[:_SHOWN_ROWS].tolist()}"
    )


class HungarianMatcher(nn.Module):
    """One-to-one assignment of queries to targets with the focal / L1 / GIoU cost of Deformable DETR.

    The focal ``alpha`` and ``gamma`` of the cost are fixed at 0.25 and 2 in both the paper code and transformers
    (independent of the loss's ``focal_alpha``); they are parameters here only so that experiments can change them.
    """

    def __init__(
        self,
        *,
        class_cost: float = 1.0,
        bbox_cost: float = 5.0,
        giou_cost: float = 2.0,
        focal_alpha: float = 0.25,
        focal_gamma: float = 2.0,
    ) -> None:
        super().__init__()
        costs = {"class_cost": class_cost, "bbox_cost": bbox_cost, "giou_cost": giou_cost}
        for key, value in costs.items():
            if not np.isfinite(value) or value < 0:
                raise ValueError(f"{key} must be finite and >= 0, got {value}")
        if not any(costs.values()):
            raise ValueError("class_cost, bbox_cost and giou_cost cannot all be 0")
        if not 0.0 <= focal_alpha <= 1.0 or not np.isfinite(focal_gamma) or focal_gamma < 0:
            raise ValueError(f"need 0 <= focal_alpha <= 1 and focal_gamma >= 0, got {focal_alpha}, {focal_gamma}")
        self.class_cost = float(class_cost)
        self.bbox_cost = float(bbox_cost)
        self.giou_cost = float(giou_cost)
        self.focal_alpha = float(focal_alpha)
        self.focal_gamma = float(focal_gamma)

    def extra_repr(self) -> str:
        return (
            f"class_cost={self.class_cost}, bbox_cost={self.bbox_cost}, giou_cost={self.giou_cost}, "
            f"focal_alpha={self.focal_alpha}, focal_gamma={self.focal_gamma}"
        )

    def cost_matrix(self, logits: torch.Tensor, pred_boxes: torch.Tensor, target: Target) -> torch.Tensor:
        """Matching cost of one image, (queries, targets).

        logits (queries, classes), pred_boxes (queries, 4) cxcywh, target as in ``forward``. Computed in at least
        float32: under AMP a half-precision cost overflows and used to crash the assignment (transformers#42202).
        """
        compute_dtype = torch.promote_types(logits.dtype, torch.float32)
        labels = target["class_labels"].to(logits.device)
        # (targets, 4)
        target_boxes = target["boxes"].to(device=logits.device, dtype=compute_dtype)
        # (queries, targets): only the probabilities of the classes present in this image are needed.
        prob = logits.to(compute_dtype).sigmoid()[:, labels]
        positive = self.focal_alpha * (1 - prob) ** self.focal_gamma * -(prob + 1e-8).log()
        negative = (1 - self.focal_alpha) * prob**self.focal_gamma * -(1 - prob + 1e-8).log()
        class_cost = positive - negative
        boxes = pred_boxes.to(compute_dtype)
        bbox_cost = torch.cdist(boxes, target_boxes, p=1)
        giou_cost = -generalized_box_iou(box_cxcywh_to_xyxy(boxes), box_cxcywh_to_xyxy(target_boxes))
        # Same summation order as transformers so that float32 ties break the same way.
        return self.bbox_cost * bbox_cost + self.class_cost * class_cost + self.giou_cost * giou_cost

    @torch.no_grad()
    def forward(self, logits: torch.Tensor, pred_boxes: torch.Tensor, targets: Sequence[Target]) -> MatchIndices:
        """Match each image's queries to its targets.

        Args:
            logits: (batch, queries, classes) classification logits (sigmoid, no background class).
            pred_boxes: (batch, queries, 4) predicted boxes, normalised cxcywh.
            targets: ``batch`` dicts with "class_labels" (targets,) integer ids in [0, classes) and "boxes"
                (targets, 4) normalised cxcywh.

        Returns:
            One ``(query_indices, target_indices)`` pair of int64 CPU tensors per image, each of length
            min(queries, targets), query indices ascending; empty for an image without targets.
        """
        check_predictions(logits, pred_boxes)
        batch_size, num_queries, num_classes = logits.shape
        check_targets(targets, batch_size, num_classes)
        sizes = [int(t["class_labels"].shape[0]) for t in targets]
        costs = [
            self.cost_matrix(logits[image], pred_boxes[image], targets[image]).flatten()
            for image in range(batch_size)
            if sizes[image] > 0
        ]
        if not costs:
            return [_empty_match() for _ in targets]
        # A single device-to-host copy for the whole batch.
        flat_costs = torch.cat(costs).cpu().double().numpy()
        indices: MatchIndices = []
        offset = 0
        for image, size in enumerate(sizes):
            if size == 0:
                indices.append(_empty_match())
                continue
            # (queries, targets)
            cost = flat_costs[offset : offset + num_queries * size].reshape(num_queries, size)
            offset += num_queries * size
            if not np.isfinite(cost).all():
                self._raise_non_finite(image, cost, logits[image], pred_boxes[image])
            query_indices, target_indices = linear_sum_assignment(cost)
            indices.append(
                (torch.as_tensor(query_indices, dtype=torch.int64), torch.as_tensor(target_indices, dtype=torch.int64))
            )
        return indices

    @staticmethod
    def _raise_non_finite(image: int, cost: np.ndarray, logits: torch.Tensor, pred_boxes: torch.Tensor) -> None:
        bad_queries = np.nonzero(~np.isfinite(cost).all(1))[0][:_SHOWN_ROWS].tolist()
        raise NonFinitePredictionError(
            f"matching cost of image {image} is non-finite for queries {bad_queries}: predicted boxes (cxcywh) "
            f"{pred_boxes[bad_queries].tolist()}, logits {logits[bad_queries, :8].tolist()} (first 8 classes); "
            "NaN/inf predictions usually mean training diverged (try a lower learning rate or float32 instead of AMP)"
        )
