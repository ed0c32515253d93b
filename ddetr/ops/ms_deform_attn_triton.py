"""Multi-scale deformable attention on CUDA devices as Triton kernels, forward and backward.

Same contract and numerics as ``ms_deform_attn_reference`` (bilinear, ``align_corners=False``, zero padding). The
kernels live in ``_ms_deform_attn_triton_kernels`` and are imported on the first call, so ``ddetr`` neither requires
nor imports triton at start-up; when triton is not installed nothing is registered and CUDA tensors take the
reference path. See the kernels module for the work decomposition.

Precision: ``value`` may be float32, bfloat16, float16 or float64. Sampling locations and attention weights are
used in float32 (float64 when ``value`` is float64), sampling is accumulated in that precision, the output has
``value``'s dtype, and the value gradient is accumulated in float32 before being cast to ``value``'s dtype.

Testing without a GPU: with ``TRITON_INTERPRET=1`` in the environment before the kernels are first imported, the
kernels run on CPU tensors in Triton's interpreter (slow; tiny shapes only).
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import threading
import warnings
from collections import OrderedDict
from types import ModuleType
from typing import Any

import torch
from torch.autograd.function import once_differentiable

from ddetr.ops.ms_deform_attn import (
    SpatialShapes,
    check_inputs,
    ms_deform_attn_reference,
    register_implementation,
)

__all__ = ["ms_deform_attn_triton", "triton_available", "triton_kernels_interpreted"]

_KERNELS_MODULE = "ddetr.ops._ms_deform_attn_triton_kernels"
_VALUE_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
_INT32_LIMIT = 2**31 - 1

_kernels: ModuleType | None = None
_load_attempted = False
_load_lock = threading.Lock()


def triton_available() -> bool:
    """Whether triton is installed (checked without importing it)."""
    try:
        return importlib.util.find_spec("triton") is not None
    except (ImportError, ValueError):
        return False


def _load_kernels() -> ModuleType | None:
    """Import the kernels once; ``None`` (with a one-time warning) when triton is missing or broken."""
    global _kernels, _load_attempted
    if _load_attempted:
        return _kernels
    with _load_lock:
        if not _load_attempted:
            try:
                _kernels = importlib.import_module(_KERNELS_MODULE)
            except Exception as error:  # a broken triton install must degrade to the reference, never crash inference
                warnings.warn(
                    "ddetr: could not load the Triton deformable-attention kernels, using the grid_sample reference "
                    f"instead. Reason: {error!r}",
                    RuntimeWarning,
                    stacklevel=3,
                )
            _load_attempted = True
    return _kernels


def triton_kernels_interpreted() -> bool:
    """Whether the kernels were loaded in Triton's interpreter mode (CPU tensors; for tests)."""
    kernels = _load_kernels()
    return kernels is not None and bool(kernels.INTERPRETED)


# (level heights/widths, device) -> int32 (levels, 2) shapes and (levels,) starts on that device. Cached because
# building them is a host-to-device copy that would otherwise run on every call (12 calls per image).
_LEVEL_TABLES: OrderedDict[tuple[tuple[tuple[int, int], ...], torch.device], tuple[torch.Tensor, torch.Tensor]] = (
    OrderedDict()
)
_LEVEL_TABLES_MAX = 64


def _level_tables(shapes: tuple[tuple[int, int], ...], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    key = (shapes, device)
    tables = _LEVEL_TABLES.get(key)
    if tables is not None:
        _LEVEL_TABLES.move_to_end(key)
        return tables
    starts = [0]
    for height, width in shapes[:-1]:
        starts.append(starts[-1] + height * width)
    tables = (
        torch.tensor(shapes, dtype=torch.int32, device=device).view(len(shapes), 2),
        torch.tensor(starts, dtype=torch.int32, device=device),
    )
    _LEVEL_TABLES[key] = tables
    if len(_LEVEL_TABLES) > _LEVEL_TABLES_MAX:
        _LEVEL_TABLES.popitem(last=False)
    return tables


def _on_device(device: torch.device) -> contextlib.AbstractContextManager:
    # Triton launches on the current CUDA device and stream, not on the tensors' device.
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


class _MSDeformAttnTriton(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: Any,
        value: torch.Tensor,
        level_shapes: torch.Tensor,
        level_starts: torch.Tensor,
        sampling_locations: torch.Tensor,
        attention_weights: torch.Tensor,
    ) -> torch.Tensor:
        kernels = _load_kernels()
        assert kernels is not None  # checked by the caller
        value = value.contiguous()
        sampling_locations = sampling_locations.contiguous()
        attention_weights = attention_weights.contiguous()
        ctx.save_for_backward(value, level_shapes, level_starts, sampling_locations, attention_weights)
        with _on_device(value.device):
            return kernels.forward(value, level_shapes, level_starts, sampling_locations, attention_weights)

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_output: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        kernels = _load_kernels()
        assert kernels is not None
        value, level_shapes, level_starts, sampling_locations, attention_weights = ctx.saved_tensors
        value_needs, _, _, locations_needs, weights_needs = ctx.needs_input_grad
        with _on_device(value.device):
            grad_value, grad_locations, grad_weights = kernels.backward(
                grad_output.contiguous(),
                value,
                level_shapes,
                level_starts,
                sampling_locations,
                attention_weights,
                value_grad=value_needs,
            )
        return (
            grad_value.to(value.dtype) if value_needs else None,
            None,
            None,
            grad_locations if locations_needs else None,
            grad_weights if weights_needs else None,
        )


def _check_inputs(
    value: torch.Tensor,
    shapes: tuple[tuple[int, int], ...],
    sampling_locations: torch.Tensor,
    attention_weights: torch.Tensor,
) -> None:
    check_inputs(value, shapes, sampling_locations, attention_weights)
    _, sequence, heads, head_dim = value.shape
    _, queries, _, levels, points, _ = sampling_locations.shape
    if value.dtype not in _VALUE_DTYPES:
        raise ValueError(f"value must be float32, bfloat16, float16 or float64, got {value.dtype}")
    for name, tensor in (("sampling_locations", sampling_locations), ("attention_weights", attention_weights)):
        if tensor.device != value.device:
            raise ValueError(f"{name} is on {tensor.device} but value is on {value.device}")
    # The kernels index inside one image with int32 (only the per-image base is 64-bit).
    per_image = (sequence * heads * head_dim, queries * heads * head_dim, queries * heads * levels * points * 2)
    if max(per_image) > _INT32_LIMIT:
        raise ValueError(f"one image's tensors exceed 2**31 elements {per_image}; split the queries or the batch")


def ms_deform_attn_triton(
    value: torch.Tensor,
    spatial_shapes: SpatialShapes,
    sampling_locations: torch.Tensor,
    attention_weights: torch.Tensor,
) -> torch.Tensor:
    """Multi-scale deformable attention with Triton kernels; same contract as ``ms_deform_attn_reference``.

    Shapes: value (batch, sequence, heads, head_dim), sampling_locations (batch, queries, heads, levels, points, 2),
    attention_weights (batch, queries, heads, levels, points); returns (batch, queries, heads * head_dim) in
    ``value``'s dtype. Differentiable in value, sampling_locations and attention_weights. Falls back to the reference
    when the kernels cannot be loaded. CPU tensors are accepted only under ``TRITON_INTERPRET=1``.
    """
    shapes = tuple((int(height), int(width)) for height, width in spatial_shapes)
    _check_inputs(value, shapes, sampling_locations, attention_weights)
    # Locations and weights stay in float32 even for bf16/fp16 value: a bf16 coordinate is off by up to ~0.65 px
    # at the finest level. The casts are differentiable, so their gradients come back in the callers' dtypes.
    compute_dtype = torch.float64 if value.dtype == torch.float64 else torch.float32
    kernels = _load_kernels()
    if kernels is None:
        # Same numerics on the reference (whose grid_sample also needs one dtype for value and locations).
        output = ms_deform_attn_reference(
            value.to(compute_dtype), shapes, sampling_locations.to(compute_dtype), attention_weights.to(compute_dtype)
        )
        return output.to(value.dtype)
    if value.device.type == "cpu" and not kernels.INTERPRETED:
        raise ValueError(
            "the Triton deformable-attention kernels need GPU tensors (or TRITON_INTERPRET=1 set before they are "
            "first imported, for testing on CPU)"
        )
    level_shapes, level_starts = _level_tables(shapes, value.device)
    return _MSDeformAttnTriton.apply(
        value,
        level_shapes,
        level_starts,
        sampling_locations.to(compute_dtype),
        attention_weights.to(compute_dtype),
    )


if triton_available():
    register_implementation("cuda", ms_deform_attn_triton)
