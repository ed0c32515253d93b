"""The multi-scale deformable attention module (Zhu et al., 2020, eq. 3): projections around the sampling op."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from ddetr.ops import ms_deform_attn
from ddetr.ops.linear import Linear, fusable, linear
from ddetr.ops.softmax import short_softmax
from ddetr.runtime.precision import at_least_float32, float32_region


class MultiscaleDeformableAttention(nn.Module):
    """Each query attends to ``points`` learned locations per head and feature level around its reference point."""

    def __init__(self, *, d_model: int = 256, levels: int = 4, heads: int = 8, points: int = 4) -> None:
        super().__init__()
        if d_model % heads != 0:
            raise ValueError(f"d_model={d_model} must be divisible by heads={heads}")
        self.d_model = d_model
        self.levels = levels
        self.heads = heads
        self.points = points
        self.sampling_offsets = Linear(d_model, heads * levels * points * 2)
        self.attention_weights = Linear(d_model, heads * levels * points)
        self.value_proj = Linear(d_model, d_model)
        self.output_proj = Linear(d_model, d_model)
        self.implementation = "auto"
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Paper initialisation: offsets start on rings around the reference point, one direction per head."""
        nn.init.zeros_(self.sampling_offsets.weight)
        angles = torch.arange(self.heads, dtype=torch.float32) * (2.0 * math.pi / self.heads)
        # (heads, 2) unit directions scaled so the larger coordinate is 1
        directions = torch.stack([angles.cos(), angles.sin()], -1)
        directions = directions / directions.abs().max(-1, keepdim=True)[0]
        # (heads, levels, points, 2): point i sits at distance i + 1
        grid = directions[:, None, None, :].repeat(1, self.levels, self.points, 1)
        grid *= torch.arange(1, self.points + 1, dtype=torch.float32)[None, None, :, None]
        self.sampling_offsets.bias.copy_(grid.flatten())
        nn.init.zeros_(self.attention_weights.weight)
        nn.init.zeros_(self.attention_weights.bias)
        nn.init.xavier_uniform_(self.value_proj.weight)
        nn.init.zeros_(self.value_proj.bias)
        nn.init.xavier_uniform_(self.output_proj.weight)
        nn.init.zeros_(self.output_proj.bias)

    def forward(
        self,
        query: torch.Tensor,
        value: torch.Tensor,
        value_mask: torch.Tensor | None,
        reference_points: torch.Tensor,
        spatial_shapes: Sequence[tuple[int, int]],
    ) -> torch.Tensor:
        """
        query             (batch, queries, d_model), position embedding already added
        value             (batch, sequence, d_model), the flattened feature levels
        value_mask        (batch, sequence) True where the pixel is valid (not padding), or None
        reference_points  (batch, queries, levels, 2) as (x, y), or (batch, queries, levels, 4) as (cx, cy, w, h),
                          normalised to [0, 1] of each level
        returns           (batch, queries, d_model)
        """
        batch, queries, _ = query.shape
        sequence = value.shape[1]
        if not torch.jit.is_tracing() and sum(h * w for h, w in spatial_shapes) != sequence:
            raise ValueError(f"spatial_shapes {list(spatial_shapes)} do not cover the value sequence of {sequence}")
        value = self.value_proj(value)
        if value_mask is not None:
            value = value.masked_fill(~value_mask[..., None], 0.0)
        # (batch, sequence, heads, head_dim)
        value = value.view(batch, sequence, self.heads, self.d_model // self.heads)
        # (batch, queries, heads, levels, points)
        weights = short_softmax(at_least_float32(self.attention_weights(query)).view(batch, queries, self.heads, -1))
        weights = weights.view(batch, queries, self.heads, self.levels, self.points)
        locations = self._sampling_locations(query, reference_points, spatial_shapes)
        output = ms_deform_attn(value, spatial_shapes, locations, weights, implementation=self.implementation)
        return self.output_proj(output)

    def _sampling_locations(
        self, query: torch.Tensor, reference_points: torch.Tensor, spatial_shapes: Sequence[tuple[int, int]]
    ) -> torch.Tensor:
        """``sampling_locations(reference_points, sampling_offsets(query), spatial_shapes)``, fused, in float32.

        The per-level normalisation is a per-output-channel scale, so it folds into the projection's weights, and
        the reference is added in place: two fewer passes over a (batch, queries, heads, levels, points, 2) tensor
        (about 4.6 M values per encoder layer at 800x1066). The offsets and locations are float32 under bf16/fp16
        autocast (the precision policy of ``ddetr.runtime.precision``): a bf16 location is off by up to half a
        pixel on a 256-wide map. When hooks watch ``sampling_offsets`` the module is called and its output scaled,
        so they see its real input and output.
        """
        batch, queries, _ = query.shape
        projection = self.sampling_offsets
        # Float32, or float64 for a float64 model.
        dtype = torch.promote_types(projection.weight.dtype, torch.float32)
        if reference_points.shape[-1] == 2:
            # (levels, 2): 1 / (width, height) of each level
            if torch.jit.is_tracing():
                # Traced sizes are tensors: keep them in the graph (ONNX export at any image size).
                sizes = torch.stack([torch.stack([w, h]) for h, w in spatial_shapes])  # type: ignore[list-item]
                sizes = sizes.to(device=query.device, dtype=dtype)
                level_scale = 1.0 / sizes
            else:
                inverse_sizes = [[1.0 / w, 1.0 / h] for h, w in spatial_shapes]
                level_scale = torch.tensor(inverse_sizes, dtype=dtype, device=query.device)
        elif reference_points.shape[-1] == 4:
            level_scale = torch.full((self.levels, 2), 0.5 / self.points, dtype=dtype, device=query.device)
        else:
            raise ValueError(f"reference_points must end in 2 or 4 coordinates, got {tuple(reference_points.shape)}")
        # (heads * levels * points * 2,) in the projection's output order
        channel_scale = level_scale[None, :, None, :].expand(self.heads, -1, self.points, -1).reshape(-1)
        with float32_region(query.device.type):
            if fusable(projection):
                weight, bias = projection.weight.to(dtype), projection.bias.to(dtype)
                # (batch, queries, heads * levels * points * 2)
                offsets = linear(query.to(dtype), weight * channel_scale[:, None], bias * channel_scale)
            else:
                offsets = projection(query.to(projection.weight.dtype)).to(dtype) * channel_scale
        # (batch, queries, heads, levels * points * 2)
        locations = offsets.view(batch, queries, self.heads, -1)
        reference = at_least_float32(reference_points)
        # Broadcasting a (batch, queries, 1, levels, 1, 2) reference leaves 2-element inner runs, 4-5x slower than
        # adding a (batch, queries, 1, levels * points * 2) one, which is small to build (no heads dimension).
        if reference.shape[-1] == 2:
            locations.add_(self._per_point(reference))
        else:
            locations.mul_(self._per_point(reference[..., 2:])).add_(self._per_point(reference[..., :2]))
        # (batch, queries, heads, levels, points, 2)
        return locations.view(batch, queries, self.heads, self.levels, self.points, 2)

    def _per_point(self, reference: torch.Tensor) -> torch.Tensor:
        """(batch, queries, levels, 2) to (batch, queries, 1, levels * points * 2), repeated over the points."""
        batch, queries = reference.shape[:2]
        per_point = reference[:, :, :, None, :].expand(batch, queries, self.levels, self.points, 2)
        return per_point.reshape(batch, queries, 1, -1)


def sampling_locations(
    reference_points: torch.Tensor, offsets: torch.Tensor, spatial_shapes: Sequence[tuple[int, int]]
) -> torch.Tensor:
    """Reference points plus offsets, (batch, queries, heads, levels, points, 2) normalised to [0, 1].

    Point references move by offsets measured in pixels of each level; box references by offsets measured in
    fractions of half the box size (divided by the number of points, as in the paper code).
    """
    if reference_points.shape[-1] == 2:
        # (levels, 2) as (width, height) so that offsets in pixels become fractions of the map
        normalizer = torch.tensor([[w, h] for h, w in spatial_shapes], dtype=offsets.dtype, device=offsets.device)
        return reference_points[:, :, None, :, None, :] + offsets / normalizer[None, None, None, :, None, :]
    if reference_points.shape[-1] == 4:
        points = offsets.shape[4]
        return (
            reference_points[:, :, None, :, None, :2]
            + offsets / points * reference_points[:, :, None, :, None, 2:] * 0.5
        )
    raise ValueError(f"reference_points must end in 2 or 4 coordinates, got shape {tuple(reference_points.shape)}")
