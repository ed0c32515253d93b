"""Softmax over a short last dimension (the attention weights' levels x points, 12-16 values), at inference.

PyTorch's CPU softmax vectorises along the reduced dimension, so over 12 values it runs mostly scalar code: for the
bundled shapes model at batch 8 (240x427) the six attention softmaxes took 15% of the forward pass. The same
max-subtract, exp and normalise written as whole-tensor ops (the max and sum along the short dimension, the exp and
the division in place) vectorise across rows: 5x faster at (8, 2137, 8, 12) on a 2-core Xeon, equal to
``F.softmax`` within float32 rounding (tests hold them together, float64 too).

Where autograd records (training), under tracing (ONNX export) and on other devices ``F.softmax`` runs: it is the
reference, with the well-tested backward.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _records_grad(x: torch.Tensor) -> bool:
    return torch.is_grad_enabled() and x.requires_grad


def short_softmax(x: torch.Tensor) -> torch.Tensor:
    """``F.softmax(x, dim=-1)``, fast on CPU when the last dimension is short and no gradient is recorded."""
    if x.device.type != "cpu" or _records_grad(x) or torch.jit.is_tracing() or torch.compiler.is_compiling():
        return F.softmax(x, dim=-1)
    # Subtracting the row maximum keeps exp finite, exactly as F.softmax does.
    exponentials = torch.sub(x, x.amax(dim=-1, keepdim=True)).exp_()
    return exponentials.div_(exponentials.sum(dim=-1, keepdim=True))
