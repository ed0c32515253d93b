"""Linear layers that run as one 2-d GEMM, through oneDNN on CPU at inference.

Two measured CPU costs of ``F.linear`` at the encoder's 17.8k tokens (800x1066 input, 2-core AMD EPYC):

- a (batch, tokens, features) input takes a slower path than the same data viewed as (batch * tokens, features):
  the 3-d call took 1.75x as long, most of it copying the bias into the output;
- even as 2-d, ``addmm`` goes to MKL, which first copies the bias into the whole output and then runs a GEMM that
  is not tuned for this CPU. oneDNN's linear adds the bias (and optionally the ReLU) in the GEMM's epilogue and
  took 0.4-0.6x the time (fc1 + ReLU: 142 ms -> 67 ms on one thread).

oneDNN's linear has no autograd formula, so it is used only when no gradient is needed: training and anything
that requires grad take ``F.linear``, which is also the reference the tests hold the fast path to. Autocast does not
know the oneDNN op, so under bf16 CPU autocast :func:`linear` casts its operands to bf16 itself, as autocast would
for ``F.linear`` (bf16 forward at 800x1066: the separate bias copy and ReLU pass cost about 90 ms).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

_ONEDNN_DTYPES = (torch.float32, torch.bfloat16)


def _onednn_available() -> bool:
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


_HAS_ONEDNN_LINEAR = _onednn_available()


def onednn_dtype(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.dtype | None:
    """The dtype :func:`linear` computes in through oneDNN for these arguments, None when it takes ``F.linear``."""
    if not _HAS_ONEDNN_LINEAR or x.device.type != "cpu" or torch.compiler.is_compiling():
        return None
    needs_grad = x.requires_grad or weight.requires_grad or (bias is not None and bias.requires_grad)
    if torch.is_grad_enabled() and needs_grad:
        return None
    dtypes = {x.dtype, weight.dtype} | ({bias.dtype} if bias is not None else set())
    if torch.is_autocast_enabled("cpu"):
        # What autocast does for F.linear: cast float32 operands to bf16 (other autocast dtypes take F.linear)
        bf16 = torch.get_autocast_dtype("cpu") == torch.bfloat16 and dtypes <= set(_ONEDNN_DTYPES)
        return torch.bfloat16 if bf16 else None
    return x.dtype if len(dtypes) == 1 and x.dtype in _ONEDNN_DTYPES else None


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, relu: bool = False) -> torch.Tensor:
    """``F.linear`` (followed by ReLU when ``relu``) over the last dimension of ``x``, as one 2-d GEMM."""
    # (rows, in_features): every leading dimension folded into one
    flat = x.reshape(-1, x.shape[-1])
    dtype = onednn_dtype(flat, weight, bias)
    if dtype is not None:
        flat, weight = flat.to(dtype), weight.to(dtype)
        bias = bias.to(dtype) if bias is not None else None
        out = torch.ops.mkldnn._linear_pointwise(flat, weight, bias, "relu" if relu else "none", [], "")
    else:
        out = F.linear(flat, weight, bias)
        if relu:
            out = F.relu(out)
    return out.view(*x.shape[:-1], out.shape[-1])


class Linear(nn.Linear):
    """``nn.Linear`` with the same parameters, names and results, computed by :func:`linear`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)

    def forward_relu(self, x: torch.Tensor) -> torch.Tensor:
        """``relu(self(x))``, fused into the GEMM where the oneDNN path applies."""
        return linear(x, self.weight, self.bias, relu=True)
