"""Multi-scale deformable attention: the sampling core of Deformable DETR.

Every implementation shares one contract:

    value               (batch, sequence, heads, head_dim)    flattened levels, level l occupies
                                                              sequence[start_l : start_l + H_l * W_l] row-major
    spatial_shapes      list of (H_l, W_l) python ints, one per level
    sampling_locations  (batch, queries, heads, levels, points, 2)   (x, y) normalised to [0, 1] of each level
    attention_weights   (batch, queries, heads, levels, points)      already softmax-normalised
    returns             (batch, queries, heads * head_dim)

Sampling is bilinear with ``align_corners=False`` semantics (pixel centres at (i + 0.5) / size) and zeros outside
the feature map, exactly like the paper's CUDA kernel and transformers' ``grid_sample`` path.

``ms_deform_attn_reference`` is the slow, obviously-right oracle; ``ms_deform_attn`` dispatches to the fastest
implementation registered for the inputs' device and falls back to the reference.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

SpatialShapes = Sequence[tuple[int, int]]
MSDAFunction = Callable[[torch.Tensor, SpatialShapes, torch.Tensor, torch.Tensor], torch.Tensor]


def ms_deform_attn_reference(
    value: torch.Tensor,
    spatial_shapes: SpatialShapes,
    sampling_locations: torch.Tensor,
    attention_weights: torch.Tensor,
) -> torch.Tensor:
    """Per-level ``grid_sample`` implementation (the oracle every fast path is tested against).

    Half-precision values are sampled in float32 (grid_sample needs one dtype for value and grid, and its bfloat16
    CPU kernel has crashed on non-contiguous inputs); the output has the value's dtype.
    """
    output_dtype = value.dtype
    compute_dtype = torch.promote_types(torch.promote_types(value.dtype, sampling_locations.dtype), torch.float32)
    value = value.to(compute_dtype)
    sampling_locations = sampling_locations.to(compute_dtype)
    attention_weights = attention_weights.to(compute_dtype)
    batch, _, heads, head_dim = value.shape
    _, queries, _, levels, points, _ = sampling_locations.shape
    # Traced sizes (ONNX export) stay tensors so the graph splits by its input's size.
    sizes = [h * w if torch.jit.is_tracing() else int(h) * int(w) for h, w in spatial_shapes]
    value_per_level = value.split(sizes, dim=1)
    # grid_sample wants coordinates in [-1, 1].
    grids = 2.0 * sampling_locations - 1.0
    sampled_levels = []
    for level, (height, width) in enumerate(spatial_shapes):
        # (batch * heads, head_dim, H_l, W_l)
        level_value = value_per_level[level].flatten(2).transpose(1, 2).reshape(batch * heads, head_dim, height, width)
        # (batch * heads, queries, points, 2)
        level_grid = grids[:, :, :, level].transpose(1, 2).flatten(0, 1)
        # (batch * heads, head_dim, queries, points)
        sampled = F.grid_sample(level_value, level_grid, mode="bilinear", padding_mode="zeros", align_corners=False)
        sampled_levels.append(sampled)
    # (batch * heads, head_dim, queries, levels * points)
    stacked = torch.stack(sampled_levels, dim=-2).flatten(-2)
    # (batch * heads, 1, queries, levels * points)
    weights = attention_weights.transpose(1, 2).reshape(batch * heads, 1, queries, levels * points)
    output = (stacked * weights).sum(-1).view(batch, heads * head_dim, queries)
    return output.transpose(1, 2).contiguous().to(output_dtype)


def check_inputs(
    value: torch.Tensor,
    spatial_shapes: SpatialShapes,
    sampling_locations: torch.Tensor,
    attention_weights: torch.Tensor,
) -> None:
    """ValueError, naming the problem, unless the four inputs fit the contract in the module docstring."""
    if value.dim() != 4:
        raise ValueError(f"value must be (batch, sequence, heads, head_dim), got shape {tuple(value.shape)}")
    if sampling_locations.dim() != 6 or sampling_locations.shape[-1] != 2:
        raise ValueError(
            "sampling_locations must be (batch, queries, heads, levels, points, 2), "
            f"got shape {tuple(sampling_locations.shape)}"
        )
    batch, sequence, heads, _ = value.shape
    _, queries, _, levels, points, _ = sampling_locations.shape
    if sampling_locations.shape[0] != batch or sampling_locations.shape[2] != heads:
        raise ValueError(
            f"sampling_locations {tuple(sampling_locations.shape)} disagrees with value {tuple(value.shape)} "
            "on batch or heads"
        )
    if tuple(attention_weights.shape) != (batch, queries, heads, levels, points):
        raise ValueError(
            f"attention_weights must have shape {(batch, queries, heads, levels, points)}, "
            f"got {tuple(attention_weights.shape)}"
        )
    if len(spatial_shapes) != levels:
        raise ValueError(f"{len(spatial_shapes)} spatial shapes given for {levels} levels")
    if any(height < 0 or width < 0 for height, width in spatial_shapes):
        raise ValueError(f"spatial shapes must be non-negative, got {list(spatial_shapes)}")
    if sum(height * width for height, width in spatial_shapes) != sequence:
        raise ValueError(f"spatial_shapes {list(spatial_shapes)} do not cover the value sequence of {sequence}")
    for name, tensor in (("value", value), ("sampling_locations", sampling_locations), ("weights", attention_weights)):
        if not tensor.is_floating_point():
            raise ValueError(f"{name} must be a floating-point tensor, got {tensor.dtype}")


# device type -> implementation; filled by the modules that provide fast kernels.
_IMPLEMENTATIONS: dict[str, MSDAFunction] = {}


def register_implementation(device_type: str, function: MSDAFunction) -> None:
    """Make ``function`` the implementation ``ms_deform_attn`` uses for tensors on ``device_type``."""
    _IMPLEMENTATIONS[device_type] = function


def select_implementation(device: torch.device | str, implementation: str = "auto") -> MSDAFunction:
    """Return the implementation for ``device``: ``"auto"`` picks the registered fast path, ``"reference"`` the
    oracle."""
    if implementation == "reference" or torch.jit.is_tracing():
        # Only the reference is made of standard ops that a traced graph (ONNX) can hold.
        return ms_deform_attn_reference
    if implementation != "auto":
        raise ValueError(f"unknown deformable-attention implementation {implementation!r}; use 'auto' or 'reference'")
    device_type = torch.device(device).type
    return _IMPLEMENTATIONS.get(device_type, ms_deform_attn_reference)


def ms_deform_attn(
    value: torch.Tensor,
    spatial_shapes: SpatialShapes,
    sampling_locations: torch.Tensor,
    attention_weights: torch.Tensor,
    implementation: str = "auto",
) -> torch.Tensor:
    """Multi-scale deformable attention with the fastest implementation available for ``value.device``."""
    function = select_implementation(value.device, implementation)
    return function(value, spatial_shapes, sampling_locations, attention_weights)
