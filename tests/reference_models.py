"""Small transformers models (the reference oracle) with every tensor perturbed, for parity tests."""

from __future__ import annotations

import torch

TINY_BACKBONE = {
    "embedding_size": 8,
    "hidden_sizes": [16, 32, 64, 128],
    "depths": [1, 1, 2, 1],
    "layer_type": "basic",
}

VARIANTS = {
    "multi-scale": {},
    "single-scale": {"num_feature_levels": 1},
    "box-refine": {"with_box_refine": True},
    "two-stage": {"with_box_refine": True, "two_stage": True},
}


def tiny_transformers_config(variant: str = "multi-scale", layer_type: str = "basic", **overrides):
    """A transformers DeformableDetrConfig with a tiny HF-ResNet backbone (timm is not installed in CI)."""
    from transformers import DeformableDetrConfig, ResNetConfig

    fields = {**VARIANTS[variant], **overrides}
    levels = fields.get("num_feature_levels", 4)
    backbone = dict(TINY_BACKBONE, layer_type=layer_type)
    if layer_type == "bottleneck":
        backbone["hidden_sizes"] = [32, 64, 128, 256]
    out_features = ["stage2", "stage3", "stage4"] if levels > 1 else ["stage4"]
    return DeformableDetrConfig(
        backbone_config=ResNetConfig(**backbone, out_features=out_features),
        d_model=64,
        encoder_layers=2,
        decoder_layers=3,
        encoder_attention_heads=4,
        decoder_attention_heads=4,
        encoder_ffn_dim=48,
        decoder_ffn_dim=40,
        num_queries=12,
        two_stage_num_proposals=12,
        encoder_n_points=3,
        decoder_n_points=2,
        num_labels=5,
        auxiliary_loss=True,
        **fields,
    )


@torch.no_grad()
def perturb_(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Make every parameter and buffer distinct and non-trivial so any mis-loaded tensor changes the outputs."""
    generator = torch.Generator().manual_seed(seed)
    for name, tensor in list(model.named_parameters()) + list(model.named_buffers()):
        if not tensor.is_floating_point():
            continue
        noise = torch.randn(tensor.shape, generator=generator, dtype=tensor.dtype)
        if name.endswith("running_var"):
            tensor.copy_(0.5 + noise.abs())
        elif name.endswith("running_mean"):
            tensor.copy_(0.1 * noise)
        elif tensor.dim() > 1:
            tensor.add_(0.05 * noise)
        else:
            tensor.add_(0.1 * noise)
    return model


def transformers_model(variant: str = "multi-scale", seed: int = 0, layer_type: str = "basic", **overrides):
    from transformers import DeformableDetrForObjectDetection

    torch.manual_seed(seed)
    model = DeformableDetrForObjectDetection(tiny_transformers_config(variant, layer_type, **overrides))
    return perturb_(model, seed).eval()


def batch_of_two(seed: int = 0, sizes=((96, 128), (80, 72))):
    """Two differently sized images padded bottom/right to one canvas, with their pixel mask."""
    generator = torch.Generator().manual_seed(seed)
    height = max(h for h, _ in sizes)
    width = max(w for _, w in sizes)
    pixel_values = torch.zeros(len(sizes), 3, height, width)
    pixel_mask = torch.zeros(len(sizes), height, width, dtype=torch.long)
    for index, (h, w) in enumerate(sizes):
        pixel_values[index, :, :h, :w] = torch.randn(3, h, w, generator=generator)
        pixel_mask[index, :h, :w] = 1
    return pixel_values, pixel_mask
