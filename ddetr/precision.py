"""Where half precision stops: box coordinates, sampling locations and scores stay float32 under autocast.

A bf16 coordinate carries 8 significant bits: about 2 px on an 800 px side, enough to break IoU >= 0.95 agreement
with float32 boxes. The regions kept in float32 are tiny (heads over a few hundred queries), so bf16 keeps its speed.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch


def at_least_float32(x: torch.Tensor) -> torch.Tensor:
    """Upcast half-precision tensors; float32 and float64 pass through unchanged."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


@contextmanager
def float32_region(device_type: str) -> Iterator[None]:
    """Turn autocast off for the enclosed computation (inputs must be upcast with ``at_least_float32``)."""
    with torch.autocast(device_type, enabled=False):
        yield
