"""Two-stage Deformable DETR: every encoder pixel proposes a box; the best proposals seed the decoder queries."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from ddetr.model.position_encoding import interleave_sin_cos, sine_frequencies


def encoder_proposals(
    memory: torch.Tensor, mask: torch.Tensor, spatial_shapes: Sequence[tuple[int, int]]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Anchor boxes centred on every pixel of every level, with side 0.05 * 2**level of the valid image.

    memory  (batch, sequence, d_model) encoder output
    mask    (batch, sequence) True where the pixel is valid
    returns proposals (batch, sequence, 4) as logits (inverse sigmoid), +inf where padded or too close to the border;
            the memory with those positions zeroed (batch, sequence, d_model); and the validity (batch, sequence, 1)
    """
    batch = memory.shape[0]
    proposals = []
    start = 0
    for level, (height, width) in enumerate(spatial_shapes):
        level_mask = mask[:, start : start + height * width].view(batch, height, width)
        valid_height = level_mask[:, :, 0].sum(1)
        valid_width = level_mask[:, 0, :].sum(1)
        grid_y, grid_x = torch.meshgrid(
            torch.linspace(0, height - 1, height, dtype=memory.dtype, device=memory.device),
            torch.linspace(0, width - 1, width, dtype=memory.dtype, device=memory.device),
            indexing="ij",
        )
        # (batch, height, width, 2) centres normalised by the valid extent
        grid = torch.stack([grid_x, grid_y], -1)
        scale = torch.stack([valid_width, valid_height], 1).view(batch, 1, 1, 2).to(memory.dtype)
        centres = (grid[None].expand(batch, -1, -1, -1) + 0.5) / scale
        sizes = torch.full_like(centres, 0.05 * (2.0**level))
        proposals.append(torch.cat([centres, sizes], -1).view(batch, -1, 4))
        start += height * width
    # (batch, sequence, 4)
    proposals_xywh = torch.cat(proposals, 1)
    valid = ((proposals_xywh > 0.01) & (proposals_xywh < 0.99)).all(-1, keepdim=True)
    logits = torch.log(proposals_xywh / (1 - proposals_xywh))
    logits = logits.masked_fill(~mask[..., None], float("inf")).masked_fill(~valid, float("inf"))
    masked_memory = memory.masked_fill(~mask[..., None], 0.0).masked_fill(~valid, 0.0)
    return logits, masked_memory, valid


def proposal_position_embedding(proposal_logits: torch.Tensor, num_features: int = 128) -> torch.Tensor:
    """Sine embedding of (cx, cy, w, h) proposals, (batch, queries, 4 * num_features), computed in float32 because
    the 10000**x frequencies overflow half precision."""
    frequencies = sine_frequencies(num_features, 10000.0, proposal_logits.device, torch.float32)
    # (batch, queries, 4, num_features)
    angles = proposal_logits.sigmoid().float()[..., None] * (2 * math.pi) / frequencies
    return interleave_sin_cos(angles).flatten(2).to(proposal_logits.dtype)
