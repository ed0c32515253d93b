"""`DeformableDetrForObjectDetection`: the body plus per-decoder-layer class and box heads, and the training loss."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ddetr.checkpoint.pretrained import PretrainedMixin
from ddetr.loss.criterion import build_criterion
from ddetr.model.configuration import DeformableDetrConfig
from ddetr.model.decoder import inverse_sigmoid
from ddetr.model.deformable_detr import DeformableDetrModel
from ddetr.model.heads import build_box_heads, build_class_heads
from ddetr.model.outputs import DeformableDetrObjectDetectionOutput
from ddetr.runtime.precision import at_least_float32, float32_region


class DeformableDetrForObjectDetection(PretrainedMixin, nn.Module):
    """Deformable DETR with detection heads.

    Head sharing follows the paper code: without box refinement one class head and one box head serve every decoder
    layer; with refinement each layer has its own, and the box heads are the very modules the decoder refines with
    (``model.decoder.bbox_embed``); two-stage adds one more pair scoring the encoder proposals
    (``model.decoder.class_embed``).
    """

    def __init__(self, config: DeformableDetrConfig) -> None:
        super().__init__()
        config.validate()
        self.config = config
        self.model = DeformableDetrModel(config)
        layers = config.decoder_layers
        # The decoder holds class heads exactly when two-stage and box heads exactly with box refinement.
        decoder_class_embed, decoder_bbox_embed = self.model.decoder.class_embed, self.model.decoder.bbox_embed
        if config.two_stage:
            assert decoder_class_embed is not None
            self.class_embed: nn.ModuleList = decoder_class_embed
        else:
            self.class_embed = build_class_heads(
                config.d_model, config.num_labels, layers, shared=not config.with_box_refine
            )
        if config.with_box_refine:
            assert decoder_bbox_embed is not None
            self.bbox_embed: nn.ModuleList = decoder_bbox_embed
        else:
            self.bbox_embed = build_box_heads(config.d_model, layers, shared=True, two_stage=False)
        self._criterion: nn.Module | None = None

    @property
    def criterion(self) -> nn.Module:
        if self._criterion is None:
            # Built lazily: inference never needs scipy's matcher.
            self._criterion = build_criterion(self.config)
        return self._criterion

    def forward(
        self,
        pixel_values: torch.Tensor,
        pixel_mask: torch.Tensor | None = None,
        labels: list[dict[str, torch.Tensor]] | None = None,
        output_hidden_states: bool = False,
    ) -> DeformableDetrObjectDetectionOutput:
        """
        pixel_values  (batch, channels, height, width); pixel_mask (batch, height, width), 1 = image, 0 = padding
        labels        optional list (one per image) of {"class_labels": (boxes,) int64, "boxes": (boxes, 4)
                      (cx, cy, w, h) normalised to the unpadded image}; when given, the loss is computed
        """
        outputs = self.model(pixel_values, pixel_mask, output_hidden_states=output_hidden_states)
        hidden_states = outputs.intermediate_hidden_states
        # Layer l predicts relative to the reference it sampled around: the initial one, then each refinement.
        references = [outputs.init_reference_points, *outputs.intermediate_reference_points.unbind(1)[:-1]]
        layer_logits, layer_boxes = [], []
        with float32_region(hidden_states.device.type):
            hidden_states = at_least_float32(hidden_states)
            for level in range(hidden_states.shape[1]):
                reference = inverse_sigmoid(at_least_float32(references[level]))
                delta = self.bbox_embed[level](hidden_states[:, level])
                if reference.shape[-1] == 4:
                    delta = delta + reference
                else:
                    delta = torch.cat([delta[..., :2] + reference, delta[..., 2:]], -1)
                layer_logits.append(self.class_embed[level](hidden_states[:, level]))
                layer_boxes.append(delta.sigmoid())

        loss = loss_dict = auxiliary_outputs = None
        if labels is not None:
            if self.config.auxiliary_loss:
                auxiliary_outputs = [
                    {"logits": logits, "pred_boxes": boxes}
                    for logits, boxes in zip(layer_logits[:-1], layer_boxes[:-1])
                ]
            loss_inputs: dict[str, Any] = {
                "logits": layer_logits[-1],
                "pred_boxes": layer_boxes[-1],
                "auxiliary_outputs": auxiliary_outputs,
            }
            if self.config.two_stage:
                loss_inputs["enc_outputs"] = {
                    "logits": outputs.enc_outputs_class,
                    "pred_boxes": outputs.enc_outputs_coord_logits.sigmoid(),
                }
            # The matcher's costs and the focal loss under- and overflow in half precision.
            with float32_region(hidden_states.device.type):
                loss, loss_dict = self.criterion(loss_inputs, labels)

        return DeformableDetrObjectDetectionOutput(
            loss=loss,
            loss_dict=loss_dict,
            logits=layer_logits[-1],
            pred_boxes=layer_boxes[-1],
            auxiliary_outputs=auxiliary_outputs,
            **outputs.to_dict(),
        )
