"""Where half precision stops: box coordinates, sampling locations and scores stay float32 under autocast.

A bf16 coordinate carries 8 significant bits: about 2 px on an 800 px side, enough to break IoU >= 0.95 agreement
with float32 boxes. The regions kept in float32 are tiny (heads over a few hundred queries), so bf16 keeps its speed.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext

import torch


def at_least_float32(x: torch.Tensor) -> torch.Tensor:
    """Upcast half-precision tensors; float32 and float64 pass through unchanged."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


@contextmanager
def float32_region(device_type: str) -> Iterator[None]:
    """Turn autocast off for the enclosed computation (inputs must be upcast with ``at_least_float32``)."""
    with torch.autocast(device_type, enabled=False):
        yield


PRECISIONS = ("auto", "fp32", "bf16")


def native_bf16(device: torch.device) -> bool:
    """Whether ``device`` computes bfloat16 natively (faster than float32), not by emulation."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        return torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    return False


def resolve_precision(precision: str, device: torch.device) -> str:
    """``"auto"`` becomes ``"bf16"`` where bfloat16 is native, else ``"fp32"``."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if precision == "auto":
        return "bf16" if native_bf16(device) else "fp32"
    return precision


def inference_autocast(precision: str, device: torch.device) -> AbstractContextManager[None]:
    """bf16 autocast for ``"bf16"`` (boxes, sampling locations and scores stay float32), nothing for ``"fp32"``."""
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return nullcontext()
