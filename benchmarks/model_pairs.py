"""The models a benchmark compares: the same weights in ddetr and (when installed) transformers."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ddetr.model.configuration import DeformableDetrConfig
from ddetr.model.object_detection import DeformableDetrForObjectDetection

# ResNet-50 in transformers' own layout (timm, which the published configs name, is not needed to build it).
RESNET50 = {"model_type": "resnet", "out_features": ["stage2", "stage3", "stage4"]}
TINY_RESNET = {
    "model_type": "resnet",
    "embedding_size": 16,
    "hidden_sizes": [32, 64, 128, 256],
    "depths": [1, 1, 1, 1],
    "layer_type": "basic",
    "out_features": ["stage2", "stage3", "stage4"],
}


@dataclass
class ModelPair:
    ours: DeformableDetrForObjectDetection
    theirs: Any | None  # transformers' DeformableDetrForObjectDetection, None when transformers is absent
    directory: Path


def config_fields(quick: bool, variant: str) -> dict[str, Any]:
    fields: dict[str, Any] = {"num_labels": 91, "auxiliary_loss": True}
    if quick:
        fields.update(
            backbone_config=dict(TINY_RESNET),
            d_model=64,
            encoder_layers=2,
            decoder_layers=2,
            encoder_ffn_dim=128,
            decoder_ffn_dim=128,
            num_queries=50,
            two_stage_num_proposals=50,
        )
    else:
        fields["backbone_config"] = dict(RESNET50)
    if variant in ("box-refine", "two-stage"):
        fields["with_box_refine"] = True
    if variant == "two-stage":
        fields["two_stage"] = True
    return fields


@torch.no_grad()
def spread_weights_(model: torch.nn.Module, seed: int) -> None:
    """Random weights whose detections are not all ties: perturb every tensor and give the class logits a spread.

    Benchmarks run without trained weights (nothing is downloaded); untouched random heads would score every query
    about the same, which makes "same top-100 detections" meaningless.
    """
    generator = torch.Generator().manual_seed(seed)
    for name, tensor in list(model.named_parameters()) + list(model.named_buffers()):
        if not tensor.is_floating_point():
            continue
        noise = torch.randn(tensor.shape, generator=generator)
        if name.endswith("running_var"):
            tensor.copy_(0.5 + noise.abs())
        elif name.endswith("running_mean"):
            tensor.copy_(0.1 * noise)
        elif "class_embed" in name and name.endswith("weight"):
            tensor.copy_(noise * 3.0 / math.sqrt(tensor.shape[1]))
        elif tensor.dim() > 1:
            tensor.add_(0.02 * noise)


def build_pair(directory: Path, *, quick: bool, variant: str = "multi-scale", seed: int = 0) -> ModelPair:
    """Create weights, save them, and load them into both implementations."""
    fields = config_fields(quick, variant)
    try:
        import transformers
    except ImportError:
        transformers = None
    if transformers is not None:
        torch.manual_seed(seed)
        backbone = dict(fields.pop("backbone_config"))
        backbone.pop("model_type")
        config = transformers.DeformableDetrConfig(backbone_config=transformers.ResNetConfig(**backbone), **fields)
        theirs = transformers.DeformableDetrForObjectDetection(config)
        spread_weights_(theirs, seed)
        theirs.save_pretrained(directory)
        theirs = transformers.DeformableDetrForObjectDetection.from_pretrained(directory).eval()
        ours = DeformableDetrForObjectDetection.from_pretrained(directory)
    else:
        torch.manual_seed(seed)
        ours = DeformableDetrForObjectDetection(DeformableDetrConfig(**fields))
        spread_weights_(ours, seed)
        ours.save_pretrained(directory)
        theirs = None
    return ModelPair(ours=ours.eval(), theirs=theirs, directory=directory)
