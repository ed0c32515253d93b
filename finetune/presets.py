"""Models to train: named presets (from scratch) or a checkpoint directory / hub id (fine-tuning).

Presets (no ImageNet weights can be downloaded here, so every preset trains its backbone from scratch):

    tiny   ~0.4M parameters, for tests: trains in seconds on a CPU at 64-128 px
    small  ~4M parameters, CPU-friendly: a half-width ResNet-18, d_model 128, 3+3 layers, 100 queries, box refinement,
           256 px
    r50    the paper's Deformable DETR: ResNet-50, d_model 256, 6+6 layers, 300 queries, 4 levels

Training always uses the auxiliary decoder losses (paper recipe; transformers' config defaults them off).
"""

from __future__ import annotations

import copy
import logging
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ddetr import DeformableDetrConfig, DeformableDetrForObjectDetection
from ddetr.processing import DeformableDetrImageProcessor

logger = logging.getLogger(__name__)


def _resnet(*, stem: int, widths: list[int], depths: list[int], stages: list[int]) -> dict[str, Any]:
    return {
        "model_type": "resnet",
        "embedding_size": stem,
        "hidden_sizes": widths,
        "depths": depths,
        "layer_type": "basic",
        "out_features": [f"stage{stage}" for stage in stages],
    }


@dataclass(frozen=True)
class Preset:
    description: str
    config: dict[str, Any]
    image_size: int


PRESETS: dict[str, Preset] = {
    "tiny": Preset(
        description="test-sized model (~0.4M parameters)",
        config={
            "backbone_config": _resnet(stem=16, widths=[16, 32, 64, 128], depths=[1, 1, 1, 1], stages=[2, 3, 4]),
            "d_model": 64,
            "encoder_layers": 1,
            "decoder_layers": 2,
            "encoder_attention_heads": 4,
            "decoder_attention_heads": 4,
            "encoder_ffn_dim": 128,
            "decoder_ffn_dim": 128,
            "num_queries": 30,
            "num_feature_levels": 3,
            "encoder_n_points": 2,
            "decoder_n_points": 2,
            "dropout": 0.0,
        },
        image_size=128,
    ),
    "small": Preset(
        description="CPU-friendly model (~4M parameters)",
        config={
            "backbone_config": _resnet(stem=32, widths=[32, 64, 128, 256], depths=[2, 2, 2, 2], stages=[2, 3, 4]),
            "d_model": 128,
            "encoder_layers": 3,
            "decoder_layers": 3,
            "encoder_attention_heads": 8,
            "decoder_attention_heads": 8,
            # The encoder runs over ~1300 tokens per 256 px image: its feed-forward layers are the largest cost.
            "encoder_ffn_dim": 256,
            "decoder_ffn_dim": 512,
            "num_queries": 100,
            "num_feature_levels": 3,
            "encoder_n_points": 4,
            "decoder_n_points": 4,
            "with_box_refine": True,
            "dropout": 0.0,
        },
        image_size=256,
    ),
    "r50": Preset(description="the paper's Deformable DETR (ResNet-50)", config={}, image_size=800),
}


@dataclass
class BuiltModel:
    """The model to train, where it came from, and the image size it expects by default."""

    model: DeformableDetrForObjectDetection
    origin: str
    from_scratch: bool
    default_image_size: int


def is_preset(source: str) -> bool:
    return source in PRESETS


def preset_config(name: str, class_names: list[str], dropout: float | None = None) -> DeformableDetrConfig:
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; presets: {sorted(PRESETS)}")
    fields = copy.deepcopy(PRESETS[name].config)
    fields["id2label"] = dict(enumerate(class_names))
    fields["auxiliary_loss"] = True
    if dropout is not None:
        fields["dropout"] = dropout
    return DeformableDetrConfig(**fields)


def build_model(source: str, class_names: list[str], *, dropout: float | None = None) -> BuiltModel:
    """A preset initialised from the current torch seed, or a checkpoint whose class heads are re-initialised
    when its labels differ from ``class_names``; ``dropout`` overrides the model's."""
    if not class_names:
        raise ValueError("class_names must not be empty")
    if is_preset(source):
        model = DeformableDetrForObjectDetection(preset_config(source, class_names, dropout))
        # The paper freezes the stem and layer1 because they come pretrained; random ones must learn too.
        model.model.backbone.requires_grad_(True)
        return BuiltModel(
            model=model, origin=f"preset {source}", from_scratch=True, default_image_size=PRESETS[source].image_size
        )
    if not Path(source).exists() and "/" not in source:
        raise ValueError(
            f"model {source!r} is neither a preset ({', '.join(PRESETS)}) nor an existing folder; hub ids have the "
            "form owner/name (e.g. SenseTime/deformable-detr)"
        )
    labels = dict(enumerate(class_names))
    checkpoint_config = DeformableDetrConfig.from_pretrained(source)
    overrides: dict[str, Any] = {"auxiliary_loss": True}
    if dropout is not None:
        overrides["dropout"] = dropout
    if checkpoint_config.id2label != labels:
        overrides["id2label"] = labels
        logger.info(
            "the checkpoint's %d labels differ from the dataset's %d: class heads are re-initialised",
            checkpoint_config.num_labels,
            len(labels),
        )
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="class heads re-initialised")
        model = DeformableDetrForObjectDetection.from_pretrained(source, **overrides)
    model.train()
    return BuiltModel(
        model=model,
        origin=f"checkpoint {source}",
        from_scratch=False,
        default_image_size=_checkpoint_image_size(source),
    )


def _checkpoint_image_size(source: str) -> int:
    """The short side the checkpoint's processor resizes to (800 when it has none)."""
    try:
        processor = DeformableDetrImageProcessor.from_pretrained(source, local_files_only=not Path(source).exists())
    except OSError:
        return 800
    return int(processor.size.get("shortest_edge", 800))


def parameter_groups(
    model: torch.nn.Module, *, lr: float, lr_backbone: float, lr_linear_proj_mult: float, weight_decay: float
) -> list[dict[str, Any]]:
    """The paper's optimiser groups: the backbone at ``lr_backbone``, deformable sampling offsets and reference
    points at ``lr * lr_linear_proj_mult``, everything else at ``lr``; frozen parameters are left out."""
    groups: dict[str, list[torch.nn.Parameter]] = {"backbone": [], "linear_proj": [], "rest": []}
    seen: set[int] = set()
    for name, parameter in model.named_parameters():
        # Tied heads appear under several names; an optimiser must see each tensor once.
        if not parameter.requires_grad or id(parameter) in seen:
            continue
        seen.add(id(parameter))
        if ".backbone." in f".{name}":
            groups["backbone"].append(parameter)
        elif "sampling_offsets" in name or "reference_points" in name:
            groups["linear_proj"].append(parameter)
        else:
            groups["rest"].append(parameter)
    rates = {"backbone": lr_backbone, "linear_proj": lr * lr_linear_proj_mult, "rest": lr}
    return [
        {"params": params, "lr": rates[name], "weight_decay": weight_decay, "name": name}
        for name, params in groups.items()
        if params
    ]
