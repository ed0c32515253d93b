"""Triton kernels of multi-scale deformable attention (imported lazily by ``ms_deform_attn_triton``).

This module imports triton at the top on purpose: ``ms_deform_attn_triton`` imports it only on the first call, so
importing ``ddetr`` never pays for (or requires) triton.

Work decomposition, shared by both kernels: the (query, head) pairs of one image are flattened into "rows"; a program
owns ``BLOCK_ROWS`` consecutive rows of one batch element and the whole ``head_dim`` of each (grid = (row blocks,
batch)). Because heads are the fastest-varying index of (query, head), a block's output and ``grad_output`` are one
contiguous slab, its locations and weights are consecutive 128-/64-byte records, and every bilinear corner is a
contiguous ``head_dim`` vector of ``value`` (channel-last), i.e. one or two cache lines per gather.
Levels are unrolled at compile time (their shapes are scalars loaded once), points are a runtime loop: fully unrolled,
the compiler hoists all 4 x levels x points gathers to the top and spills registers (checked on the sm_90 cubin),
while one point's four independent corner gathers per iteration keep enough loads in flight next to the other
resident programs. The sampling is gather-latency bound, not arithmetic bound.

Forward: accumulate ``weight * bilinear * corner`` in registers (fp32, or fp64 for fp64 inputs), store once.
Backward: recompute the corners (nothing is saved but the inputs), reduce ``<grad_output, corner>`` over channels for
the location and weight gradients (each row owns its entries: plain stores), and scatter ``weight * bilinear *
grad_output`` into an fp32 ``grad_value`` with relaxed atomics (corners of different queries collide, so a scatter
is unavoidable without sorting; relaxed ordering is enough because nothing reads the buffer before the kernel ends).

Coordinates follow ``grid_sample(align_corners=False, padding_mode="zeros")``: pixel x = location_x * width - 0.5,
corners outside the map contribute zero (value and gradient), so samples entirely outside are free (masked loads).
"""

from __future__ import annotations

import math
from typing import Any

import torch
import triton
import triton.language as tl

__all__ = ["INTERPRETED", "backward", "forward"]

try:  # triton >= 3.0 ships the interpreter under this name
    from triton.runtime.interpreter import InterpretedFunction as _InterpretedFunction
except ImportError:  # pragma: no cover - depends on the triton build
    _InterpretedFunction = None


def _configs() -> list[triton.Config]:
    # Few configurations on purpose: each one is a compilation on the first call with a new shape class.
    sizes = ((16, 1), (32, 2), (64, 2), (64, 4), (128, 4), (128, 8))
    return [triton.Config({"BLOCK_ROWS": rows}, num_warps=warps) for rows, warps in sizes]


def _prune_configs(configs: list[triton.Config], named_args: dict, **kwargs: Any) -> list[triton.Config]:
    """Keep the register tile (rows x padded head_dim) bounded for large head_dim; always keep the smallest."""
    block_dim = int(kwargs["BLOCK_DIM"])
    kept = [config for config in configs if config.kwargs["BLOCK_ROWS"] * block_dim <= 8192]
    return kept or [min(configs, key=lambda config: config.kwargs["BLOCK_ROWS"])]


# size_class separates tiny launches (decoder: a few hundred queries) from huge ones (encoder: the whole feature
# pyramid), which favour different block sizes; dtypes are added to the key by the autotuner itself.
_TUNING_KEY = ["size_class", "HEADS", "HEAD_DIM", "LEVELS", "POINTS"]


@triton.jit
def _corner_geometry(location_x, location_y, width, height):
    """Top-left corner (int32) and fractional offsets of bilinear samples at normalised (x, y) locations."""
    width_f = width.to(location_x.dtype)
    height_f = height.to(location_x.dtype)
    x = location_x * width_f - 0.5
    y = location_y * height_f - 0.5
    # Outside [-2, size + 1] both neighbours are off the map whatever the exact value, so clamping changes nothing
    # but keeps the int cast defined for far-away and infinite points; NaN samples are treated as off the map.
    x = tl.where(x == x, x, -2.0)
    y = tl.where(y == y, y, -2.0)
    x = tl.minimum(tl.maximum(x, -2.0), width_f + 1.0)
    y = tl.minimum(tl.maximum(y, -2.0), height_f + 1.0)
    x_floor = tl.floor(x)
    y_floor = tl.floor(y)
    return x_floor.to(tl.int32), y_floor.to(tl.int32), x - x_floor, y - y_floor


@triton.autotune(configs=_configs(), key=_TUNING_KEY, prune_configs_by={"early_config_prune": _prune_configs})
@triton.jit(do_not_specialize=["sequence", "queries", "size_class"])
def _forward_kernel(
    value_ptr,  # (batch, sequence, heads, head_dim) fp32 / bf16 / fp16 / fp64
    shapes_ptr,  # (levels, 2) int32 as (height, width)
    starts_ptr,  # (levels,) int32 first sequence index of each level
    locations_ptr,  # (batch, queries, heads, levels, points, 2) fp32 (fp64 with fp64 value)
    weights_ptr,  # (batch, queries, heads, levels, points) same dtype as locations
    output_ptr,  # (batch, queries, heads, head_dim) value dtype
    sequence,
    queries,
    size_class,
    HEADS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    LEVELS: tl.constexpr,
    POINTS: tl.constexpr,
    BLOCK_DIM: tl.constexpr,
    BLOCK_ROWS: tl.constexpr,
):
    compute = locations_ptr.dtype.element_ty
    batch = tl.program_id(1).to(tl.int64)
    # Row = query * HEADS + head within this batch element.
    rows = tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    row_valid = rows < queries * HEADS
    heads = rows % HEADS
    channels = tl.arange(0, BLOCK_DIM)
    # 64-bit only for the per-image base: offsets inside one image fit in int32 (checked on the host).
    value_ptr += batch * sequence * (HEADS * HEAD_DIM)
    locations_ptr += batch * queries * (HEADS * LEVELS * POINTS * 2)
    weights_ptr += batch * queries * (HEADS * LEVELS * POINTS)
    output_ptr += batch * queries * (HEADS * HEAD_DIM)

    accumulator = tl.zeros([BLOCK_ROWS, BLOCK_DIM], dtype=compute)
    for level in tl.static_range(LEVELS):
        height = tl.load(shapes_ptr + 2 * level)
        width = tl.load(shapes_ptr + 2 * level + 1)
        # Value row of pixel (0, 0) of this level for each row's head.
        level_rows = tl.load(starts_ptr + level) * HEADS + heads
        for point in range(POINTS):  # not unrolled: see the module docstring (register pressure)
            sample = rows * (LEVELS * POINTS) + (level * POINTS + point)
            # Separate x and y loads rather than one (rows, 2) load + split: the split costs a shared-memory layout
            # conversion per sample, the second load only an L1 hit.
            location_x = tl.load(locations_ptr + 2 * sample, mask=row_valid, other=0.0)
            location_y = tl.load(locations_ptr + 2 * sample + 1, mask=row_valid, other=0.0)
            weight = tl.load(weights_ptr + sample, mask=row_valid, other=0.0)
            x0, y0, fraction_x, fraction_y = _corner_geometry(location_x, location_y, width, height)
            x_valid0 = (x0 >= 0) & (x0 < width)
            x_valid1 = (x0 >= -1) & (x0 < width - 1)
            y_valid0 = row_valid & (y0 >= 0) & (y0 < height)
            y_valid1 = row_valid & (y0 >= -1) & (y0 < height - 1)
            # (BLOCK_ROWS,) first element of the top-left corner's head_dim vector
            corner = (level_rows + (y0 * width + x0) * HEADS) * HEAD_DIM
            down = width * (HEADS * HEAD_DIM)
            weight_y0 = weight * (1.0 - fraction_y)
            weight_y1 = weight * fraction_y
            for dy in tl.static_range(2):
                for dx in tl.static_range(2):
                    if dy == 0:
                        valid = y_valid0
                        weight_y = weight_y0
                    else:
                        valid = y_valid1
                        weight_y = weight_y1
                    if dx == 0:
                        valid = valid & x_valid0
                        corner_weight = weight_y * (1.0 - fraction_x)
                    else:
                        valid = valid & x_valid1
                        corner_weight = weight_y * fraction_x
                    offsets = corner + (dy * down + dx * (HEADS * HEAD_DIM))
                    if BLOCK_DIM == HEAD_DIM:
                        mask = valid[:, None]
                    else:
                        mask = valid[:, None] & (channels < HEAD_DIM)[None, :]
                    corner_value = tl.load(value_ptr + offsets[:, None] + channels[None, :], mask=mask, other=0.0)
                    accumulator += corner_weight[:, None] * corner_value.to(compute)

    output_offsets = rows[:, None] * HEAD_DIM + channels[None, :]
    if BLOCK_DIM == HEAD_DIM:
        out_mask = row_valid[:, None]
    else:
        out_mask = row_valid[:, None] & (channels < HEAD_DIM)[None, :]
    tl.store(output_ptr + output_offsets, accumulator.to(output_ptr.dtype.element_ty), mask=out_mask)


@triton.autotune(
    configs=_configs(),
    key=_TUNING_KEY,
    prune_configs_by={"early_config_prune": _prune_configs},
    # Benchmarking runs the kernel several times and it accumulates into grad_value.
    reset_to_zero=["grad_value_ptr"],
)
@triton.jit(do_not_specialize=["sequence", "queries", "size_class"])
def _backward_kernel(
    value_ptr,  # (batch, sequence, heads, head_dim)
    shapes_ptr,  # (levels, 2) int32 as (height, width)
    starts_ptr,  # (levels,) int32
    locations_ptr,  # (batch, queries, heads, levels, points, 2)
    weights_ptr,  # (batch, queries, heads, levels, points)
    grad_output_ptr,  # (batch, queries, heads, head_dim) value dtype
    grad_value_ptr,  # (batch, sequence, heads, head_dim) locations dtype, zero-initialised, accumulated atomically
    grad_locations_ptr,  # (batch, queries, heads, levels, points, 2)
    grad_weights_ptr,  # (batch, queries, heads, levels, points)
    sequence,
    queries,
    size_class,
    HEADS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    LEVELS: tl.constexpr,
    POINTS: tl.constexpr,
    BLOCK_DIM: tl.constexpr,
    VALUE_GRAD: tl.constexpr,
    BLOCK_ROWS: tl.constexpr,
):
    compute = locations_ptr.dtype.element_ty
    batch = tl.program_id(1).to(tl.int64)
    rows = tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    row_valid = rows < queries * HEADS
    heads = rows % HEADS
    channels = tl.arange(0, BLOCK_DIM)
    # Gathers and atomic adds share their addresses; capping their vector width at 16 bytes of fp32 (4 elements)
    # gives a 16-bit value's loads the same register layout as the fp32 atomics, instead of one shared-memory layout
    # conversion of every (rows, head_dim) contribution tile.
    value_channels = tl.max_contiguous(channels, 4)
    value_ptr += batch * sequence * (HEADS * HEAD_DIM)
    grad_value_ptr += batch * sequence * (HEADS * HEAD_DIM)
    locations_ptr += batch * queries * (HEADS * LEVELS * POINTS * 2)
    grad_locations_ptr += batch * queries * (HEADS * LEVELS * POINTS * 2)
    weights_ptr += batch * queries * (HEADS * LEVELS * POINTS)
    grad_weights_ptr += batch * queries * (HEADS * LEVELS * POINTS)
    grad_output_ptr += batch * queries * (HEADS * HEAD_DIM)

    if BLOCK_DIM == HEAD_DIM:
        row_mask = row_valid[:, None]
    else:
        row_mask = row_valid[:, None] & (channels < HEAD_DIM)[None, :]
    # (BLOCK_ROWS, BLOCK_DIM) loaded once, reused by every sample of the row.
    grad_output_offsets = rows[:, None] * HEAD_DIM + channels[None, :]
    grad_output = tl.load(grad_output_ptr + grad_output_offsets, mask=row_mask, other=0.0).to(compute)

    for level in tl.static_range(LEVELS):
        height = tl.load(shapes_ptr + 2 * level)
        width = tl.load(shapes_ptr + 2 * level + 1)
        level_rows = tl.load(starts_ptr + level) * HEADS + heads
        for point in range(POINTS):
            sample = rows * (LEVELS * POINTS) + (level * POINTS + point)
            location_x = tl.load(locations_ptr + 2 * sample, mask=row_valid, other=0.0)
            location_y = tl.load(locations_ptr + 2 * sample + 1, mask=row_valid, other=0.0)
            weight = tl.load(weights_ptr + sample, mask=row_valid, other=0.0)
            x0, y0, fraction_x, fraction_y = _corner_geometry(location_x, location_y, width, height)
            x_valid0 = (x0 >= 0) & (x0 < width)
            x_valid1 = (x0 >= -1) & (x0 < width - 1)
            y_valid0 = row_valid & (y0 >= 0) & (y0 < height)
            y_valid1 = row_valid & (y0 >= -1) & (y0 < height - 1)
            corner = (level_rows + (y0 * width + x0) * HEADS) * HEAD_DIM
            down = width * (HEADS * HEAD_DIM)
            weight_x0 = 1.0 - fraction_x
            weight_y0 = 1.0 - fraction_y
            # <grad_output, corner value> per row for the four corners; off-map corners load as zero, which is
            # exactly grid_sample's zero padding for the value and its derivative.
            dot00 = tl.zeros([BLOCK_ROWS], dtype=compute)
            dot01 = tl.zeros([BLOCK_ROWS], dtype=compute)
            dot10 = tl.zeros([BLOCK_ROWS], dtype=compute)
            dot11 = tl.zeros([BLOCK_ROWS], dtype=compute)
            for dy in tl.static_range(2):
                for dx in tl.static_range(2):
                    if dy == 0:
                        valid = y_valid0
                        bilinear = weight_y0
                    else:
                        valid = y_valid1
                        bilinear = fraction_y
                    if dx == 0:
                        valid = valid & x_valid0
                        bilinear = bilinear * weight_x0
                    else:
                        valid = valid & x_valid1
                        bilinear = bilinear * fraction_x
                    offsets = (corner + (dy * down + dx * (HEADS * HEAD_DIM)))[:, None] + value_channels[None, :]
                    if BLOCK_DIM == HEAD_DIM:
                        mask = valid[:, None]
                    else:
                        mask = valid[:, None] & (channels < HEAD_DIM)[None, :]
                    corner_value = tl.load(value_ptr + offsets, mask=mask, other=0.0).to(compute)
                    dot = tl.sum(grad_output * corner_value, axis=1)
                    if dy == 0:
                        if dx == 0:
                            dot00 = dot
                        else:
                            dot01 = dot
                    else:
                        if dx == 0:
                            dot10 = dot
                        else:
                            dot11 = dot
                    if VALUE_GRAD:
                        contribution = (weight * bilinear)[:, None] * grad_output
                        tl.atomic_add(grad_value_ptr + offsets, contribution, mask=mask, sem="relaxed")

            top = weight_x0 * dot00 + fraction_x * dot01
            bottom = weight_x0 * dot10 + fraction_x * dot11
            tl.store(grad_weights_ptr + sample, weight_y0 * top + fraction_y * bottom, mask=row_valid)
            # Chain rule through x = location_x * width - 0.5 (and y likewise).
            slope_x = weight_y0 * (dot01 - dot00) + fraction_y * (dot11 - dot10)
            slope_y = bottom - top
            grad_x = weight * slope_x * width.to(compute)
            grad_y = weight * slope_y * height.to(compute)
            tl.store(grad_locations_ptr + 2 * sample, grad_x, mask=row_valid)
            tl.store(grad_locations_ptr + 2 * sample + 1, grad_y, mask=row_valid)


INTERPRETED: bool = _InterpretedFunction is not None and isinstance(_forward_kernel.fn, _InterpretedFunction)

# The configuration used under the interpreter, where the autotuner's GPU benchmarking cannot run.
_INTERPRETER_META = {"BLOCK_ROWS": 16}


def _size_class(rows: int) -> int:
    return max(0, int(math.log2(max(rows, 1))) // 2)


def _launch(kernel: triton.runtime.Autotuner, grid: object, *args: object, **meta: object) -> None:
    if INTERPRETED:
        kernel.fn[grid](*args, **meta, **_INTERPRETER_META)
    else:
        kernel[grid](*args, **meta)


def _meta(value: torch.Tensor, locations: torch.Tensor) -> dict[str, int]:
    _, _, heads, head_dim = value.shape
    _, _, _, levels, points, _ = locations.shape
    return {
        "HEADS": heads,
        "HEAD_DIM": head_dim,
        "LEVELS": levels,
        "POINTS": points,
        "BLOCK_DIM": triton.next_power_of_2(head_dim),
    }


def forward(
    value: torch.Tensor,
    shapes: torch.Tensor,
    starts: torch.Tensor,
    locations: torch.Tensor,
    weights: torch.Tensor,
) -> torch.Tensor:
    """(batch, queries, heads * head_dim) in value's dtype; all inputs contiguous and on one device."""
    batch, sequence, heads, head_dim = value.shape
    queries = locations.shape[1]
    # (batch, queries, heads * head_dim)
    output = value.new_empty(batch, queries, heads * head_dim)
    rows = queries * heads
    if output.numel() == 0:
        return output
    if value.numel() == 0:
        return output.zero_()

    def grid(meta: dict) -> tuple[int, int]:
        return triton.cdiv(rows, meta["BLOCK_ROWS"]), batch

    _launch(
        _forward_kernel,
        grid,
        value,
        shapes,
        starts,
        locations,
        weights,
        output,
        sequence,
        queries,
        _size_class(batch * rows),
        **_meta(value, locations),
    )
    return output


def backward(
    grad_output: torch.Tensor,
    value: torch.Tensor,
    shapes: torch.Tensor,
    starts: torch.Tensor,
    locations: torch.Tensor,
    weights: torch.Tensor,
    value_grad: bool,
) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor]:
    """Gradients for value (in the locations' dtype, or None when ``value_grad`` is false), locations and weights."""
    batch, sequence, heads, _ = value.shape
    queries = locations.shape[1]
    rows = queries * heads
    # (batch, sequence, heads, head_dim) accumulated with atomics: fp32 (fp64) even for bf16/fp16 value, because
    # low-precision atomics would both be slow and round every one of the many partial sums.
    if value_grad:
        grad_value = torch.zeros(value.shape, dtype=locations.dtype, device=value.device)
    else:
        # Never touched by the kernel (VALUE_GRAD is off); it only has to be a valid pointer.
        grad_value = torch.zeros(1, dtype=locations.dtype, device=value.device)
    if batch * rows == 0 or value.numel() == 0:
        # Every sample is off the (empty) map: all gradients are zero.
        return (grad_value if value_grad else None), torch.zeros_like(locations), torch.zeros_like(weights)
    # Every entry is written by exactly one row of the kernel.
    grad_locations = torch.empty_like(locations)
    grad_weights = torch.empty_like(weights)

    def grid(meta: dict) -> tuple[int, int]:
        return triton.cdiv(rows, meta["BLOCK_ROWS"]), batch

    _launch(
        _backward_kernel,
        grid,
        value,
        shapes,
        starts,
        locations,
        weights,
        grad_output,
        grad_value,
        grad_locations,
        grad_weights,
        sequence,
        queries,
        _size_class(batch * rows),
        VALUE_GRAD=value_grad,
        **_meta(value, locations),
    )
    return (grad_value if value_grad else None), grad_locations, grad_weights
