"""The deformable transformer decoder: self-attention among queries, deformable cross-attention into the encoder
memory, an FFN, and (with box refinement) a new reference box after every layer."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ddetr.model.deformable_attention import MultiscaleDeformableAttention
from ddetr.model.feed_forward import check_activation, feed_forward
from ddetr.ops.dropout import dropout
from ddetr.ops.linear import Linear
from ddetr.runtime.precision import at_least_float32, float32_region


def inverse_sigmoid(x: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    x = x.clamp(min=0, max=1)
    return torch.log(x.clamp(min=eps) / (1 - x).clamp(min=eps))


class QuerySelfAttention(nn.Module):
    """Multi-head attention among the object queries; positions are added to queries and keys, not values."""

    def __init__(self, *, d_model: int, heads: int, dropout: float = 0.0) -> None:
        super().__init__()
        if d_model % heads != 0:
            raise ValueError(f"d_model={d_model} must be divisible by heads={heads}")
        self.heads = heads
        self.dropout = dropout
        self.q_proj = Linear(d_model, d_model)
        self.k_proj = Linear(d_model, d_model)
        self.v_proj = Linear(d_model, d_model)
        self.out_proj = Linear(d_model, d_model)

    def forward(self, hidden_states: torch.Tensor, position_embeddings: torch.Tensor) -> torch.Tensor:
        batch, queries, d_model = hidden_states.shape
        with_position = hidden_states + position_embeddings

        def split_heads(x: torch.Tensor) -> torch.Tensor:
            # (batch, heads, queries, head_dim)
            return x.view(batch, queries, self.heads, d_model // self.heads).transpose(1, 2)

        attended = F.scaled_dot_product_attention(
            split_heads(self.q_proj(with_position)),
            split_heads(self.k_proj(with_position)),
            split_heads(self.v_proj(hidden_states)),
            dropout_p=self.dropout if self.training else 0.0,
        )
        return self.out_proj(attended.transpose(1, 2).reshape(batch, queries, d_model))


class DeformableDecoderLayer(nn.Module):
    def __init__(
        self,
        *,
        d_model: int,
        ffn_dim: int,
        heads: int,
        levels: int,
        points: int,
        dropout: float,
        attention_dropout: float = 0.0,
        activation: str = "relu",
        activation_dropout: float = 0.0,
    ) -> None:
        super().__init__()
        check_activation(activation)
        self.self_attn = QuerySelfAttention(d_model=d_model, heads=heads, dropout=attention_dropout)
        self.self_attn_layer_norm = nn.LayerNorm(d_model)
        self.encoder_attn = MultiscaleDeformableAttention(d_model=d_model, levels=levels, heads=heads, points=points)
        self.encoder_attn_layer_norm = nn.LayerNorm(d_model)
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
        reference_points: torch.Tensor,
        memory: torch.Tensor,
        memory_mask: torch.Tensor | None,
        spatial_shapes: Sequence[tuple[int, int]],
    ) -> torch.Tensor:
        attended = self.self_attn(hidden_states, position_embeddings)
        hidden_states = self.self_attn_layer_norm(hidden_states + dropout(attended, self.dropout, self.training))
        attended = self.encoder_attn(
            hidden_states + position_embeddings, memory, memory_mask, reference_points, spatial_shapes
        )
        hidden_states = self.encoder_attn_layer_norm(hidden_states + dropout(attended, self.dropout, self.training))
        transformed = feed_forward(
            hidden_states, self.fc1, self.fc2, self.activation, self.activation_dropout, self.training
        )
        return self.final_layer_norm(hidden_states + dropout(transformed, self.dropout, self.training))


class DeformableDecoder(nn.Module):
    """Stack of decoder layers.

    ``bbox_embed`` (one box head per layer) turns on iterative box refinement; ``class_embed`` holds the class
    heads of the two-stage variant, whose last entry scores the encoder proposals. Both are owned here because the
    checkpoints store them under ``model.decoder``; the detection model's heads refer to the same modules.
    """

    def __init__(
        self,
        *,
        layers: list[DeformableDecoderLayer],
        bbox_embed: nn.ModuleList | None = None,
        class_embed: nn.ModuleList | None = None,
    ) -> None:
        super().__init__()
        self.layers = nn.ModuleList(layers)
        self.bbox_embed = bbox_embed
        self.class_embed = class_embed

    def forward(
        self,
        target: torch.Tensor,
        query_position: torch.Tensor,
        reference_points: torch.Tensor,
        memory: torch.Tensor,
        memory_mask: torch.Tensor | None,
        spatial_shapes: Sequence[tuple[int, int]],
        valid_ratios: torch.Tensor,
        output_hidden_states: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor, tuple[torch.Tensor, ...] | None]:
        """
        target            (batch, queries, d_model) content queries
        query_position    (batch, queries, d_model) positional queries
        reference_points  (batch, queries, 2 | 4) in [0, 1] of the unpadded image
        memory            (batch, sequence, d_model) encoder output
        valid_ratios      (batch, levels, 2)
        returns           intermediate hidden states (batch, layers, queries, d_model), intermediate reference points
                          (batch, layers, queries, 2 | 4) after each layer's refinement, and optionally all states
        """
        hidden_states = target
        intermediate_states = []
        intermediate_points = []
        all_states = [hidden_states] if output_hidden_states else None
        for index, layer in enumerate(self.layers):
            # Reference points are relative to the valid image; sampling works on the padded canvas of each level.
            if reference_points.shape[-1] == 4:
                level_points = reference_points[:, :, None] * torch.cat([valid_ratios, valid_ratios], -1)[:, None]
            else:
                level_points = reference_points[:, :, None] * valid_ratios[:, None]
            hidden_states = layer(hidden_states, query_position, level_points, memory, memory_mask, spatial_shapes)
            if self.bbox_embed is not None:
                with float32_region(hidden_states.device.type):
                    delta = self.bbox_embed[index](at_least_float32(hidden_states))
                    previous = inverse_sigmoid(at_least_float32(reference_points))
                    if reference_points.shape[-1] == 4:
                        refined = (delta + previous).sigmoid()
                    else:
                        refined = torch.cat([delta[..., :2] + previous, delta[..., 2:]], -1).sigmoid()
                # The paper stops gradients between refinement stages.
                reference_points = refined.detach()
            intermediate_states.append(hidden_states)
            intermediate_points.append(reference_points)
            if all_states is not None:
                all_states.append(hidden_states)
        return (
            torch.stack(intermediate_states, 1),
            torch.stack(intermediate_points, 1),
            tuple(all_states) if all_states is not None else None,
        )
