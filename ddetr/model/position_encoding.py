"""2-d position embeddings of feature maps (sine as in the paper, or learned)."""

from __future__ import annotations

import math

import torch
from torch import nn


def sine_frequencies(num_features: int, temperature: float, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """Per-channel divisors ``temperature ** (2 * floor(i / 2) / num_features)``, (num_features,)."""
    index = torch.arange(num_features, device=device, dtype=torch.int64)
    return temperature ** (2 * torch.div(index, 2, rounding_mode="floor").to(dtype) / num_features)


def interleave_sin_cos(positions: torch.Tensor) -> torch.Tensor:
    """(..., n) angles to (..., n) values sin, cos, sin, ... taken from even / odd channels respectively."""
    return torch.stack((positions[..., 0::2].sin(), positions[..., 1::2].cos()), dim=-1).flatten(-2)


class SinePositionEmbedding(nn.Module):
    """Normalised sine embedding: channels [0, d/2) encode y, [d/2, d) encode x.

    Coordinates are cumulative sums over the valid (unpadded) region, shifted by -0.5 (the Deformable DETR variant)
    and normalised to ``scale`` over each image's valid extent, so padding does not change the embedding.
    """

    def __init__(self, *, num_features: int = 128, temperature: float = 10000.0, scale: float = 2 * math.pi) -> None:
        super().__init__()
        self.num_features = num_features
        self.temperature = temperature
        self.scale = scale

    def forward(self, mask: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """(batch, height, width) boolean validity mask to (batch, 2 * num_features, height, width)."""
        valid = mask.to(dtype)
        y_embed = valid.cumsum(1)
        x_embed = valid.cumsum(2)
        eps = 1e-6
        y_embed = (y_embed - 0.5) / (y_embed[:, -1:, :] + eps) * self.scale
        x_embed = (x_embed - 0.5) / (x_embed[:, :, -1:] + eps) * self.scale
        frequencies = sine_frequencies(self.num_features, self.temperature, mask.device, dtype)
        pos_x = interleave_sin_cos(x_embed[..., None] / frequencies)
        pos_y = interleave_sin_cos(y_embed[..., None] / frequencies)
        return torch.cat((pos_y, pos_x), dim=3).permute(0, 3, 1, 2)


class LearnedPositionEmbedding(nn.Module):
    """Absolute learned embedding of row and column indices (up to 50 each): channels [0, d/2) x, [d/2, d) y."""

    def __init__(self, *, num_features: int = 128, max_size: int = 50) -> None:
        super().__init__()
        self.max_size = max_size
        self.row_embeddings = nn.Embedding(max_size, num_features)
        self.column_embeddings = nn.Embedding(max_size, num_features)
        nn.init.uniform_(self.row_embeddings.weight)
        nn.init.uniform_(self.column_embeddings.weight)

    def forward(self, mask: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        batch, height, width = mask.shape
        if height > self.max_size or width > self.max_size:
            raise ValueError(
                f"learned position embeddings cover at most {self.max_size}x{self.max_size} feature maps, "
                f"got {height}x{width}; use position_embedding_type='sine' or smaller images"
            )
        x_emb = self.column_embeddings(torch.arange(width, device=mask.device))
        y_emb = self.row_embeddings(torch.arange(height, device=mask.device))
        # (height, width, 2 * num_features)
        pos = torch.cat([x_emb[None].expand(height, -1, -1), y_emb[:, None].expand(-1, width, -1)], dim=-1)
        return pos.permute(2, 0, 1)[None].expand(batch, -1, -1, -1).to(dtype)
