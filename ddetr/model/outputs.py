"""Output dataclasses with transformers' field names and shapes."""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

import torch


class _Output:
    """Attribute access plus ``output["name"]`` and ``keys()`` for the fields that are set, like transformers'."""

    def keys(self) -> list[str]:
        return [f.name for f in fields(self) if getattr(self, f.name) is not None]  # type: ignore[arg-type]

    def __getitem__(self, key: str) -> Any:
        if not isinstance(key, str):
            raise TypeError("index outputs by field name, e.g. outputs['logits']")
        if key not in self.keys():
            raise KeyError(key)
        return getattr(self, key)

    def __contains__(self, key: object) -> bool:
        return key in self.keys()

    def to_dict(self) -> dict[str, Any]:
        return {key: getattr(self, key) for key in self.keys()}


@dataclass
class DeformableDetrModelOutput(_Output):
    """
    last_hidden_state              (batch, queries, d_model) output of the last decoder layer
    init_reference_points          (batch, queries, 2 | 4) reference points fed to the first decoder layer
    intermediate_hidden_states     (batch, decoder_layers, queries, d_model)
    intermediate_reference_points  (batch, decoder_layers, queries, 2 | 4) after each layer (refined or constant)
    encoder_last_hidden_state      (batch, sequence, d_model) the memory
    decoder_hidden_states / encoder_hidden_states: per-layer states when ``output_hidden_states=True``
    enc_outputs_class              (batch, sequence, num_labels) two-stage proposal scores
    enc_outputs_coord_logits       (batch, sequence, 4) two-stage proposal boxes before the sigmoid
    """

    last_hidden_state: torch.Tensor | None = None
    init_reference_points: torch.Tensor | None = None
    intermediate_hidden_states: torch.Tensor | None = None
    intermediate_reference_points: torch.Tensor | None = None
    decoder_hidden_states: tuple[torch.Tensor, ...] | None = None
    encoder_last_hidden_state: torch.Tensor | None = None
    encoder_hidden_states: tuple[torch.Tensor, ...] | None = None
    enc_outputs_class: torch.Tensor | None = None
    enc_outputs_coord_logits: torch.Tensor | None = None


@dataclass
class DeformableDetrObjectDetectionOutput(DeformableDetrModelOutput):
    """The body's outputs (see DeformableDetrModelOutput) plus the detection heads' and the loss:

    loss                 scalar, the weighted sum of ``loss_dict`` (only when labels are given)
    loss_dict            the individual terms: loss_ce, loss_bbox, loss_giou, cardinality_error, ``_i`` per auxiliary
                         decoder layer, ``_enc`` for the two-stage proposals
    logits               (batch, queries, num_labels) class logits, sigmoid scores, no background class
    pred_boxes           (batch, queries, 4) (cx, cy, w, h) in [0, 1] of the unpadded image
    auxiliary_outputs    list of {"logits", "pred_boxes"} for the earlier decoder layers (when labels are given and
                         config.auxiliary_loss)
    """

    loss: torch.Tensor | None = None
    loss_dict: dict[str, torch.Tensor] | None = None
    logits: torch.Tensor | None = None
    pred_boxes: torch.Tensor | None = None
    auxiliary_outputs: list[dict[str, torch.Tensor]] | None = None
