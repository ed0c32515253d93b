"""The one precision policy of inference and training: which dtype autocast uses, and where half precision stops.

Under bf16 or fp16 autocast the model code itself keeps these in float32 (``float32_region`` + ``at_least_float32``
at each site, so nothing depends on hooks): the sampling-offset projection and the sampling locations
(``MultiscaleDeformableAttention``), the attention-weight softmax, reference points and box refinement (decoder,
two-stage proposals), the box and class heads, and the loss (``ddetr.loss``). A bf16 coordinate carries 8
significant bits: about 2 px on an 800 px side, enough to break IoU >= 0.95 agreement with float32 boxes. The
regions kept in float32 are small next to the encoder's GEMMs, so bf16 keeps most of its speed.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass

import torch

PRECISIONS = ("auto", "fp32", "bf16", "fp16")


def at_least_float32(x: torch.Tensor) -> torch.Tensor:
    """Upcast half-precision tensors; float32 and float64 pass through unchanged."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


@contextmanager
def float32_region(device_type: str) -> Iterator[None]:
    """Turn autocast off for the enclosed computation (inputs must be upcast with ``at_least_float32``)."""
    with torch.autocast(device_type, enabled=False):
        yield


@dataclass(frozen=True)
class Precision:
    """``name`` is fp32, bf16 or fp16; ``dtype`` the autocast dtype (None: float32, no autocast); ``scale_loss``
    turns on the GradScaler when training (float16's range needs it)."""

    name: str
    dtype: torch.dtype | None
    scale_loss: bool

    def autocast(self, device: torch.device) -> AbstractContextManager[None]:
        """Autocast at this precision on ``device`` (nothing for fp32)."""
        if self.dtype is None:
            return nullcontext()
        return torch.autocast(device_type=device.type, dtype=self.dtype)


FP32 = Precision(name="fp32", dtype=None, scale_loss=False)
BF16 = Precision(name="bf16", dtype=torch.bfloat16, scale_loss=False)
FP16 = Precision(name="fp16", dtype=torch.float16, scale_loss=True)


def native_bf16(device: torch.device) -> bool:
    """Whether ``device`` computes bfloat16 natively (faster than float32), not by emulation."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        return torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    return False


def resolve_precision(requested: str, device: torch.device, *, training: bool = False) -> Precision:
    """The precision for a ``precision`` / ``--precision`` value (auto, fp32, bf16, fp16) on ``device``.

    ``auto`` means bf16 where ``device`` computes it natively (GPUs with bf16; CPUs with AMX or AVX512-BF16),
    else fp32; for training on a GPU without bf16 it means fp16 (with loss scaling). Training follows the same rule
    on CPUs since a convergence check (``python -m benchmarks.bf16_training``: the same 2000-step shapes run from
    scratch in both precisions) reached the same held-out mAP within 0.02; where bf16 is emulated it is 2x slower
    than fp32, so ``auto`` never picks it there.
    """
    if requested not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {requested!r}")
    if requested == "auto":
        if native_bf16(device):
            requested = "bf16"
        else:
            requested = "fp16" if training and device.type == "cuda" else "fp32"
    if requested == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ValueError("this GPU does not support bfloat16; use precision fp16 or fp32")
    return {"fp32": FP32, "bf16": BF16, "fp16": FP16}[requested]
