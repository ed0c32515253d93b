"""The deformable transformer encoder: post-norm layers of multi-scale deformable self-attention and an FFN."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from ddetr.model.deformable_attention import MultiscaleDeformableAttention
from ddetr.model.feed_forward import check_activation, feed_forward
from ddetr.ops.dropout import dropout
from ddetr.ops.linear import Linear


class DeformableEncoderLayer(nn.Module):
    def __init__(
        self,
        *,
        d_model: int,
        ffn_dim: int,
        heads: int,
        levels: int,
        points: int,
        dropout: float,
        activation: str = "relu",
        activation_dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.self_attn = MultiscaleDeformableAttention(d_model=d_model, levels=levels, heads=heads, points=points)
        self.self_attn_layer_norm = nn.LayerNorm(d_model)
        check_activation(activation)
        self.activation = activation
        self.activation_dropout = activation_dropout
        self.fc1 = Linear(d_model, ffn_dim)
        self.fc2 = Linear(ffn_dim, d_model)
        self.final_layer_norm = nn.LayerNorm(d_model)
        self.dropout = dropout

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: torch.Tensor,
        mask: torch.Tensor | None,
        reference_points: torch.Tensor,
        spatial_shapes: Sequence[tuple[int, int]],
    ) -> torch.Tensor:
        attended = self.self_attn(
            hidden_states + position_embeddings, hidden_states, mask, reference_points, spatial_shapes
        )
        hidden_states = self.self_attn_layer_norm(hidden_states + dropout(attended, self.dropout, self.training))
        transformed = feed_forward(
            hidden_states, self.fc1, self.fc2, self.activation, self.activation_dropout, self.training
        )
        return self.final_layer_norm(hidden_states + dropout(transformed, self.dropout, self.training))


def encoder_reference_points(spatial_shapes: Sequence[tuple[int, int]], valid_ratios: torch.Tensor) -> torch.Tensor:
    """Pixel centres of every level, normalised by the valid region, (batch, sequence, levels, 2) as (x, y).

    valid_ratios  (batch, levels, 2) as (valid width / width, valid height / height)
    """
    per_level = []
    for level, (height, width) in enumerate(spatial_shapes):
        ref_y, ref_x = torch.meshgrid(
            torch.linspace(0.5, height - 0.5, height, dtype=valid_ratios.dtype, device=valid_ratios.device),
            torch.linspace(0.5, width - 0.5, width, dtype=valid_ratios.dtype, device=valid_ratios.device),
            indexing="ij",
        )
        ref_y = ref_y.reshape(-1)[None] / (valid_ratios[:, None, level, 1] * height)
        ref_x = ref_x.reshape(-1)[None] / (valid_ratios[:, None, level, 0] * width)
        per_level.append(torch.stack((ref_x, ref_y), -1))
    # (batch, sequence, 2) -> (batch, sequence, levels, 2)
    return torch.cat(per_level, 1)[:, :, None] * valid_ratios[:, None]


class DeformableEncoder(nn.Module):
    def __init__(self, *, layers: list[DeformableEncoderLayer]) -> None:
        super().__init__()
        self.layers = nn.ModuleList(layers)

    def forward(
        self,
        source: torch.Tensor,
        position_embeddings: torch.Tensor,
        mask: torch.Tensor | None,
        spatial_shapes: Sequence[tuple[int, int]],
        reference_points: torch.Tensor,
        output_hidden_states: bool = False,
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, ...] | None]:
        """
        source               (batch, sequence, d_model) flattened projected feature levels
        position_embeddings  (batch, sequence, d_model) sine + level embedding
        mask                 (batch, sequence) True where valid
        reference_points     (batch, sequence, levels, 2) from ``encoder_reference_points``
        returns              memory (batch, sequence, d_model) and, if asked, the input of every layer plus the output
        """
        hidden_states = source
        all_states = [hidden_states] if output_hidden_states else None
        for layer in self.layers:
            hidden_states = layer(hidden_states, position_embeddings, mask, reference_points, spatial_shapes)
            if all_states is not None:
                all_states.append(hidden_states)
        return hidden_states, tuple(all_states) if all_states is not None else None
