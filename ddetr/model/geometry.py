"""What the encoder needs besides the features: position embeddings, valid ratios and reference points.

They depend on the feature-map sizes and the padding mask only, so for unpadded inputs of a size already seen
(a video stream, a benchmark, a batch of same-sized photos) they are the same tensors every time:
:class:`GeometryCache` keeps the last few instead of recomputing them on every forward.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from ddetr.model.encoder import encoder_reference_points


@dataclass(frozen=True)
class EncoderGeometry:
    positions: torch.Tensor  # (batch, sequence, d_model) position embedding of every token, level embedding excluded
    valid_ratios: torch.Tensor  # (batch, levels, 2) as (valid width / width, valid height / height)
    reference_points: torch.Tensor  # (batch, sequence, levels, 2)

    def expand(self, batch: int) -> EncoderGeometry:
        return EncoderGeometry(
            positions=self.positions.expand(batch, -1, -1),
            valid_ratios=self.valid_ratios.expand(batch, -1, -1),
            reference_points=self.reference_points.expand(batch, -1, -1, -1),
        )


def spatial_size(feature: torch.Tensor) -> tuple[int, int]:
    """(height, width) of a (..., height, width) map as Python ints; under tracing (ONNX export) the traced sizes,
    so that the exported graph computes them from its input instead of baking in the traced image's size."""
    height, width = feature.shape[-2], feature.shape[-1]
    if torch.jit.is_tracing():
        return height, width
    return int(height), int(width)


def valid_ratio(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(batch, height, width) validity mask to (batch, 2) as (valid width / width, valid height / height)."""
    _, height, width = mask.shape
    valid_height = mask[:, :, 0].sum(1).to(dtype) / height
    valid_width = mask[:, 0, :].sum(1).to(dtype) / width
    return torch.stack([valid_width, valid_height], -1)


def encoder_geometry(
    masks: Sequence[torch.Tensor], position_embedding: nn.Module, dtype: torch.dtype
) -> EncoderGeometry:
    """Computed from the per-level (batch, height, width) validity masks."""
    spatial_shapes = [spatial_size(mask) for mask in masks]
    positions = torch.cat([position_embedding(mask, dtype).flatten(2).transpose(1, 2) for mask in masks], 1)
    valid_ratios = torch.stack([valid_ratio(mask, dtype) for mask in masks], 1)
    return EncoderGeometry(
        positions=positions,
        valid_ratios=valid_ratios,
        reference_points=encoder_reference_points(spatial_shapes, valid_ratios),
    )


class GeometryCache:
    """The last ``max_entries`` geometries of unpadded single images, by feature-map sizes, device, dtype and mode.

    Inference-mode tensors cannot be saved for backward, so entries made under ``torch.inference_mode`` are kept
    apart from the others.
    """

    def __init__(self, max_entries: int = 4) -> None:
        if max_entries < 1:
            raise ValueError(f"max_entries must be at least 1, got {max_entries}")
        self.max_entries = max_entries
        self._entries: OrderedDict[tuple, EncoderGeometry] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def clear(self) -> None:
        self._entries.clear()

    def get(
        self,
        spatial_shapes: Sequence[tuple[int, int]],
        device: torch.device,
        dtype: torch.dtype,
        build: Callable[[], EncoderGeometry],
    ) -> EncoderGeometry:
        key = (tuple(spatial_shapes), str(device), dtype, torch.is_inference_mode_enabled())
        geometry = self._entries.get(key)
        if geometry is None:
            geometry = build()
            self._entries[key] = geometry
            while len(self._entries) > self.max_entries:
                self._entries.popitem(last=False)
        self._entries.move_to_end(key)
        return geometry
