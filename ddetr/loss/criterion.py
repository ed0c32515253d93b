"""Set-prediction loss of Deformable DETR: Hungarian matching, then sigmoid focal + L1 + GIoU on the matched pairs.

Terms (all normalised by ``num_boxes``, the batch's target count averaged over processes, at least 1):

    loss_ce            sigmoid focal loss summed over queries and classes; unmatched queries have all-zero targets
    loss_bbox          L1 distance of matched cxcywh boxes
    loss_giou          1 - GIoU of matched boxes
    cardinality_error  |#queries with max sigmoid > 0.5 - #targets| averaged over images; logged only, no gradient

``_{i}`` keys repeat the terms for decoder layer i (0 .. layers-2) when ``auxiliary_loss``; ``_enc`` keys score the
two-stage encoder proposals against the targets with every label set to 0 ("object"), as in the paper code.
transformers 5.23 has no ``_enc`` term (its proposal head then gets no gradient); everything else matches it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, cast

import torch
import torch.distributed as dist
from torch import nn

from ddetr.boxes import box_cxcywh_to_xyxy, generalized_box_iou
from ddetr.loss.matcher import HungarianMatcher, MatchIndices, Target, check_targets


def sigmoid_focal_loss(
    logits: torch.Tensor, targets: torch.Tensor, alpha: float = 0.25, gamma: float = 2.0
) -> torch.Tensor:
    """Element-wise focal loss of Lin et al. (2017) on sigmoid logits, same shape as ``logits``; no reduction.

    ``targets`` holds 0/1 per element. A negative ``alpha`` disables the positive/negative weighting.
    """
    prob = logits.sigmoid()
    cross_entropy = nn.functional.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    prob_of_truth = prob * targets + (1 - prob) * (1 - targets)
    loss = cross_entropy * (1 - prob_of_truth) ** gamma
    if alpha >= 0:
        loss = (alpha * targets + (1 - alpha) * (1 - targets)) * loss
    return loss


class SetCriterion(nn.Module):
    """Deformable DETR loss: ``forward`` returns ``(total, loss_dict)``, ``total = Σ weight_dict[k] * loss_dict[k]``.

    ``weight_dict`` lists the weight of every term that can appear (base, ``_0`` .. ``_{num_decoder_layers-2}`` when
    ``auxiliary_loss``, and ``_enc``), so a training loop can log weighted terms; cardinality errors are not in it.
    """

    def __init__(
        self,
        *,
        num_labels: int,
        matcher: HungarianMatcher,
        focal_alpha: float = 0.25,
        focal_gamma: float = 2.0,
        class_loss_coefficient: float = 1.0,
        bbox_loss_coefficient: float = 5.0,
        giou_loss_coefficient: float = 2.0,
        auxiliary_loss: bool = True,
        num_decoder_layers: int = 6,
    ) -> None:
        super().__init__()
        if num_labels < 1:
            raise ValueError(f"num_labels must be >= 1, got {num_labels}")
        if num_decoder_layers < 1:
            raise ValueError(f"num_decoder_layers must be >= 1, got {num_decoder_layers}")
        if focal_alpha > 1 or focal_gamma < 0:
            raise ValueError(f"need focal_alpha <= 1 and focal_gamma >= 0, got {focal_alpha}, {focal_gamma}")
        self.num_labels = num_labels
        self.matcher = matcher
        self.focal_alpha = float(focal_alpha)
        self.focal_gamma = float(focal_gamma)
        self.auxiliary_loss = auxiliary_loss
        self.num_decoder_layers = num_decoder_layers
        base = {
            "loss_ce": float(class_loss_coefficient),
            "loss_bbox": float(bbox_loss_coefficient),
            "loss_giou": float(giou_loss_coefficient),
        }
        suffixes = [""]
        if auxiliary_loss:
            suffixes += [f"_{layer}" for layer in range(num_decoder_layers - 1)]
        suffixes.append("_enc")
        self.weight_dict: dict[str, float] = {term + suffix: base[term] for suffix in suffixes for term in base}

    def extra_repr(self) -> str:
        return (
            f"num_labels={self.num_labels}, focal_alpha={self.focal_alpha}, focal_gamma={self.focal_gamma}, "
            f"auxiliary_loss={self.auxiliary_loss}, num_decoder_layers={self.num_decoder_layers}"
        )

    def forward(
        self, outputs: Mapping[str, Any], targets: Sequence[Target]
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Compute the total loss and every term.

        Args:
            outputs: "logits" (batch, queries, num_labels) and "pred_boxes" (batch, queries, 4) of the last decoder
                layer; optional "auxiliary_outputs", a list of such dicts for the earlier layers (used only when
                ``auxiliary_loss``); optional "enc_outputs", a dict with "logits" (batch, sequence, classes) and
                sigmoid-normalised "pred_boxes" (batch, sequence, 4) of the two-stage proposals.
            targets: one dict per image, "class_labels" (targets,) integers in [0, num_labels) and "boxes"
                (targets, 4) normalised cxcywh.
        """
        logits, pred_boxes = outputs["logits"], outputs["pred_boxes"]
        if logits.dim() != 3 or logits.shape[-1] != self.num_labels:
            raise ValueError(
                f"logits must be (batch, queries, num_labels={self.num_labels}), got {tuple(logits.shape)}"
            )
        check_targets(targets, logits.shape[0], self.num_labels)
        targets = [{key: t[key].to(logits.device) for key in ("class_labels", "boxes")} for t in targets]
        num_boxes = self._num_boxes(targets, logits.device)

        losses = self._layer_losses(logits, pred_boxes, targets, num_boxes, suffix="")
        auxiliary_outputs = outputs.get("auxiliary_outputs") or []
        if self.auxiliary_loss and len(auxiliary_outputs) > self.num_decoder_layers - 1:
            raise ValueError(
                f"got {len(auxiliary_outputs)} auxiliary outputs but num_decoder_layers={self.num_decoder_layers} "
                f"allows at most {self.num_decoder_layers - 1}"
            )
        if self.auxiliary_loss:
            for layer, layer_outputs in enumerate(auxiliary_outputs):
                losses.update(
                    self._layer_losses(
                        layer_outputs["logits"], layer_outputs["pred_boxes"], targets, num_boxes, suffix=f"_{layer}"
                    )
                )
        enc_outputs = outputs.get("enc_outputs")
        if enc_outputs is not None:
            # The proposal head only says "object or not": every target becomes class 0.
            binary_targets = [{**t, "class_labels": torch.zeros_like(t["class_labels"])} for t in targets]
            losses.update(
                self._layer_losses(
                    enc_outputs["logits"], enc_outputs["pred_boxes"], binary_targets, num_boxes, suffix="_enc"
                )
            )
        total = sum(self.weight_dict[key] * value for key, value in losses.items() if key in self.weight_dict)
        # A tensor, not sum()'s start value 0: the base terms (loss_ce, loss_bbox, loss_giou) are always in both.
        return cast(torch.Tensor, total), losses

    @staticmethod
    def _num_boxes(targets: Sequence[Target], device: torch.device) -> torch.Tensor:
        """Targets per process: the batch count summed over processes, divided by the world size, at least 1.

        Kept as a tensor so that no host sync is needed; all ranks then normalise by the same number.
        """
        num_boxes = torch.tensor(float(sum(int(t["class_labels"].shape[0]) for t in targets)), device=device)
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(num_boxes, op=dist.ReduceOp.SUM)
            num_boxes = num_boxes / dist.get_world_size()
        return num_boxes.clamp(min=1)

    def _layer_losses(
        self,
        logits: torch.Tensor,
        pred_boxes: torch.Tensor,
        targets: Sequence[Target],
        num_boxes: torch.Tensor,
        suffix: str,
    ) -> dict[str, torch.Tensor]:
        """Match one layer's predictions and compute its four terms, keys ending in ``suffix``."""
        try:
            indices = self.matcher(logits, pred_boxes, targets)
        except ValueError as error:
            # Say which decoder layer (or the encoder proposals) produced the bad values; the type stays, so a
            # trainer can tell diverged predictions (NonFinitePredictionError) from malformed targets.
            raise type(error)(f"{_layer_name(suffix)}: {error}") from error
        # At least float32: a half-precision focal loss under AMP underflows and overflows.
        compute_dtype = torch.promote_types(logits.dtype, torch.float32)
        logits = logits.to(compute_dtype)
        pred_boxes = pred_boxes.to(compute_dtype)
        image_index, query_index = _prediction_index(indices, logits.device)
        # (matched,) and (matched, 4), in the order of (image_index, query_index)
        matched_labels = torch.cat([t["class_labels"][j.to(logits.device)] for t, (_, j) in zip(targets, indices)])
        matched_target_boxes = torch.cat([t["boxes"][j.to(logits.device)] for t, (_, j) in zip(targets, indices)])
        matched_target_boxes = matched_target_boxes.to(compute_dtype)

        # (batch, queries, classes): one-hot at the matched label, all zero for unmatched queries.
        class_targets = torch.zeros_like(logits)
        class_targets[image_index, query_index, matched_labels] = 1
        loss_ce = sigmoid_focal_loss(logits, class_targets, self.focal_alpha, self.focal_gamma).sum() / num_boxes

        # (matched, 4)
        matched_boxes = pred_boxes[image_index, query_index]
        loss_bbox = (matched_boxes - matched_target_boxes).abs().sum() / num_boxes
        giou = generalized_box_iou(box_cxcywh_to_xyxy(matched_boxes), box_cxcywh_to_xyxy(matched_target_boxes))
        loss_giou = (1 - giou.diagonal()).sum() / num_boxes

        with torch.no_grad():
            # (batch,)
            predicted_count = (logits.sigmoid().max(-1).values > 0.5).sum(-1).to(compute_dtype)
            target_count = torch.tensor([float(t["class_labels"].shape[0]) for t in targets], device=logits.device)
            cardinality_error = (predicted_count - target_count.to(compute_dtype)).abs().mean()
        return {
            f"loss_ce{suffix}": loss_ce,
            f"loss_bbox{suffix}": loss_bbox,
            f"loss_giou{suffix}": loss_giou,
            f"cardinality_error{suffix}": cardinality_error,
        }


def _layer_name(suffix: str) -> str:
    if suffix == "":
        return "last decoder layer"
    if suffix == "_enc":
        return "two-stage encoder proposals"
    return f"auxiliary decoder layer {suffix[1:]}"


def _prediction_index(indices: MatchIndices, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(matched,) image and query indices of every matched prediction, images in batch order."""
    image_index = torch.cat([torch.full_like(queries, image) for image, (queries, _) in enumerate(indices)])
    query_index = torch.cat([queries for queries, _ in indices])
    return image_index.to(device), query_index.to(device)


def build_criterion(config: Any) -> SetCriterion:
    """SetCriterion from a transformers-style ``DeformableDetrConfig`` (or any object with the same field names).

    Reads class_cost, bbox_cost, giou_cost (matcher), num_labels, focal_alpha, bbox_loss_coefficient,
    giou_loss_coefficient, auxiliary_loss and decoder_layers; class_loss_coefficient and focal_gamma are optional
    (transformers has neither: its class weight is 1 and gamma 2). The matcher's focal alpha/gamma stay at 0.25/2,
    as in the paper and transformers, whatever ``config.focal_alpha`` says.
    """
    matcher = HungarianMatcher(class_cost=config.class_cost, bbox_cost=config.bbox_cost, giou_cost=config.giou_cost)
    return SetCriterion(
        num_labels=config.num_labels,
        matcher=matcher,
        focal_alpha=config.focal_alpha,
        focal_gamma=getattr(config, "focal_gamma", 2.0),
        class_loss_coefficient=getattr(config, "class_loss_coefficient", 1.0),
        bbox_loss_coefficient=config.bbox_loss_coefficient,
        giou_loss_coefficient=config.giou_loss_coefficient,
        auxiliary_loss=config.auxiliary_loss,
        num_decoder_layers=getattr(config, "decoder_layers", 6),
    )
