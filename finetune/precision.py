"""Mixed precision: which autocast dtype to use, and keeping deformable-attention sampling in float32.

``auto`` picks bfloat16 on GPUs that support it (float16 with loss scaling on older ones) and float32 on CPU, where
bfloat16 autocast is available (``--precision bf16``) but changes results more than it saves on small models.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn

from ddetr.model.deformable_attention import MultiscaleDeformableAttention


@dataclass(frozen=True)
class Precision:
    """``dtype`` is the autocast dtype (None: float32, no autocast); ``scale_loss`` turns on the GradScaler."""

    name: str
    dtype: torch.dtype | None
    scale_loss: bool


def resolve_precision(requested: str, device: torch.device) -> Precision:
    """The precision to train with on ``device`` for a ``--precision`` value (auto, fp32, bf16, fp16)."""
    if requested == "auto":
        if device.type == "cuda":
            requested = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        else:
            requested = "fp32"
    if requested == "fp32":
        return Precision(name="fp32", dtype=None, scale_loss=False)
    if requested == "bf16":
        if device.type == "cuda" and not torch.cuda.is_bf16_supported():
            raise ValueError("this GPU does not support bfloat16; use --precision fp16 or fp32")
        return Precision(name="bf16", dtype=torch.bfloat16, scale_loss=False)
    if requested == "fp16":
        return Precision(name="fp16", dtype=torch.float16, scale_loss=True)
    raise ValueError(f"precision must be auto, fp32, bf16 or fp16, got {requested!r}")


@contextlib.contextmanager
def autocast(precision: Precision, device: torch.device) -> Iterator[None]:
    if precision.dtype is None:
        yield
        return
    with torch.autocast(device_type=device.type, dtype=precision.dtype):
        yield


def _to_float32(_module: nn.Module, _inputs: tuple, output: torch.Tensor) -> torch.Tensor:
    return output.float()


def keep_sampling_in_float32(model: nn.Module) -> list[torch.utils.hooks.RemovableHandle]:
    """Make every deformable-attention layer sample in float32 under autocast.

    The value projection, sampling offsets and attention weights come out of their (autocast) linear layers as
    float32, so sampling locations (reference + offset / level size) and the bilinear sampling itself are computed
    in float32: half-precision coordinates are off by up to a quarter pixel on large feature maps. The output
    projection runs in the autocast dtype again.
    """
    handles = []
    for module in model.modules():
        if isinstance(module, MultiscaleDeformableAttention):
            for layer in (module.value_proj, module.sampling_offsets, module.attention_weights):
                handles.append(layer.register_forward_hook(_to_float32))
    return handles
