"""Linear layers that run as one 2-d GEMM, through oneDNN on CPU.

Two measured CPU costs of ``F.linear`` at the encoder's 17.8k tokens (800x1066 input, 2-core AMD EPYC):

- a (batch, tokens, features) input takes a slower path than the same data viewed as (batch * tokens, features):
  the 3-d call took 1.75x as long, most of it copying the bias into the output;
- even as 2-d, ``addmm`` goes to MKL, which first copies the bias into the whole output and then runs a GEMM that
  is not tuned for this CPU. oneDNN's linear adds the bias (and optionally the ReLU) in the GEMM's epilogue and
  took 0.4-0.6x the time (fc1 + ReLU: 142 ms -> 67 ms on one thread).

oneDNN's linear has no autograd formula; for float32 training :class:`_OneDnnLinear` supplies one (the input
gradient by oneDNN too, the weight gradient by ``mm``). ``F.linear`` is the reference the tests hold both paths to,
and what runs everywhere else (other devices and dtypes, training under autocast, torch.compile). Autocast does
not know the oneDNN op, so at bf16 CPU inference :func:`linear` casts its operands to bf16 itself, as autocast
would for ``F.linear`` (bf16 forward at 800x1066: the separate bias copy and ReLU pass cost about 90 ms).

Which library is faster depends on the CPU, so oneDNN is used only where it measured faster on this machine
(:mod:`ddetr.runtime.kernel_choice`, family ``linear``, options ``onednn`` and ``aten`` = ``F.linear``), decided
separately for float32 inference, bf16 inference and float32 training.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeGuard

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules import module as module_hooks

from ddetr.ops.onednn_dtypes import onednn_compute_dtype
from ddetr.ops.prepared_weights import cast
from ddetr.runtime import kernel_choice

LINEAR_OPTIONS = ("onednn", "aten")
# The timed shape: encoder tokens of a 512x640 image, the feed-forward's first layer (the most common large GEMM).
_CHOICE_ROWS, _CHOICE_IN, _CHOICE_OUT = 5440, 256, 1024


def _onednn_available() -> bool:
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


_HAS_ONEDNN_LINEAR = _onednn_available()


def _records_grad(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> bool:
    needs_grad = x.requires_grad or weight.requires_grad or (bias is not None and bias.requires_grad)
    return torch.is_grad_enabled() and needs_grad


def onednn_dtype(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.dtype | None:
    """The dtype :func:`linear` computes in through oneDNN for these arguments, None when it takes ``F.linear``."""
    return _chosen_onednn_dtype(x, weight, bias, training=_records_grad(x, weight, bias))


def _chosen_onednn_dtype(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, *, training: bool
) -> torch.dtype | None:
    dtype = _onednn_dtype(x, weight, bias, training=training)
    if dtype is not None and linear_choice(dtype, training=training).option != "onednn":
        return None
    return dtype


def _onednn_dtype(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, *, training: bool
) -> torch.dtype | None:
    # Traced (ONNX export) and compiled graphs take F.linear: the oneDNN op has no export or decomposition.
    if not _HAS_ONEDNN_LINEAR or x.device.type != "cpu" or torch.compiler.is_compiling() or torch.jit.is_tracing():
        return None
    dtype = onednn_compute_dtype(x, weight, bias)
    # Training: float32 only (never under autocast, where F.linear keeps autocast's casts and their gradients).
    return None if training and dtype != torch.float32 else dtype


def linear_choice(dtype: torch.dtype = torch.float32, *, training: bool = False) -> kernel_choice.Choice:
    """Which library computes CPU linears of ``dtype`` (and whether they train) on this machine, and why."""
    mode = kernel_choice.mode_name(dtype, training=training)
    decision = kernel_choice.Decision(family="linear", mode=mode, options=LINEAR_OPTIONS)
    return kernel_choice.choose(decision, lambda: _choice_candidates(dtype, training))


def _choice_candidates(dtype: torch.dtype, training: bool) -> dict[str, Callable[[], object]]:
    """The two libraries on the timed shape, as the model calls them (bias and ReLU included)."""
    if not _HAS_ONEDNN_LINEAR:
        raise RuntimeError("this torch build has no oneDNN linear")
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(_CHOICE_ROWS, _CHOICE_IN, generator=generator).to(dtype)
    weight = (torch.randn(_CHOICE_OUT, _CHOICE_IN, generator=generator) / 16).to(dtype)
    bias = torch.randn(_CHOICE_OUT, generator=generator).to(dtype)
    if training:
        x, weight, bias = (t.requires_grad_() for t in (x, weight, bias))

        def onednn() -> object:
            _OneDnnLinear.apply(x, weight, bias, True).sum().backward()
            return None

        def aten() -> object:
            F.relu(F.linear(x, weight, bias)).sum().backward()
            return None

        return {"onednn": onednn, "aten": aten}

    def onednn_inference() -> object:
        with torch.no_grad():
            return _onednn_linear(x, weight, bias, True)

    def aten_inference() -> object:
        with torch.no_grad():
            return F.relu(F.linear(x, weight, bias))

    return {"onednn": onednn_inference, "aten": aten_inference}


def _onednn_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, relu: bool) -> torch.Tensor:
    """(rows, in) x (out, in) -> (rows, out) in one oneDNN call; ``x`` and ``weight`` may be transposed views."""
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "relu" if relu else "none", [], "")


def _weight_gradient(grad_output: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """grad_output^T @ x, (out, in), as one ``mm``: MKL reads the transposed operands in place, where oneDNN's linear
    first copies a transposed operand (a (256, 13.6k) copy per layer cost more than the GEMM: 1.05 of a 5.6 s training
    step, 2-core AMD EPYC; ``mm`` took 39-40 ms instead of 40-92 ms on the feed-forward's shapes)."""
    return torch.mm(grad_output.t(), x)


class _OneDnnLinear(torch.autograd.Function):
    """oneDNN's linear (+ ReLU) with its gradients, float32 on CPU; ``F.linear`` + ``F.relu`` is the reference.

    One training step of the ResNet-50 model (batch 2, 512x640) spent 2.3 of its 4.0 s in MKL GEMMs of linear
    layers; oneDNN computes the forward and the input gradient in about half the time. The weight gradient is an
    ``mm`` (see :func:`_weight_gradient`).
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, relu: bool) -> torch.Tensor:
        out = _onednn_linear(x, weight, bias, relu)
        ctx.relu, ctx.has_bias = relu, bias is not None
        ctx.save_for_backward(x, weight, out if relu else None)
        return out

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, weight, out = ctx.saved_tensors
        if ctx.relu:
            # ReLU's own backward, one pass (masked_fill took a mask, a copy and a fill: 33 vs 5 ms at 13.6k x 1024)
            grad_output = torch.ops.aten.threshold_backward(grad_output, out, 0)
        grad_output = grad_output.contiguous()
        grad_x = grad_weight = grad_bias = None
        if ctx.needs_input_grad[0]:
            grad_x = _onednn_linear(grad_output, weight.t().contiguous(), None, False)
        if ctx.needs_input_grad[1]:
            grad_weight = _weight_gradient(grad_output, x)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_bias = grad_output.sum(0)
        return grad_x, grad_weight, grad_bias, None


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, relu: bool = False) -> torch.Tensor:
    """``F.linear`` (followed by ReLU when ``relu``) over the last dimension of ``x``, as one 2-d GEMM."""
    # (rows, in_features): every leading dimension folded into one
    flat = x.reshape(-1, x.shape[-1])
    training = _records_grad(flat, weight, bias)
    dtype = _chosen_onednn_dtype(flat, weight, bias, training=training)
    if dtype is None:
        out = F.linear(flat, weight, bias)
        if relu:
            out = F.relu(out)
    elif training:
        out = _OneDnnLinear.apply(flat, weight, bias, relu)
    else:
        bias = cast(bias, dtype) if bias is not None else None
        out = _onednn_linear(flat.to(dtype), cast(weight, dtype), bias, relu)
    return out.view(*x.shape[:-1], out.shape[-1])


class Linear(nn.Linear):
    """``nn.Linear`` with the same parameters, names and results, computed by :func:`linear`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)

    def forward_relu(self, x: torch.Tensor) -> torch.Tensor:
        """``relu(self(x))``, fused into the GEMM where the oneDNN path applies."""
        return linear(x, self.weight, self.bias, relu=True)


def fusable(module: nn.Module) -> TypeGuard[Linear]:
    """Whether a fused path may compute ``module``'s output without calling it: a plain :class:`Linear` that no
    hook watches. Otherwise the caller goes through ``module(...)``, so that quantisation, LoRA or profiling hooks
    (and subclasses or replacements of the layer) see every call."""
    if type(module) is not Linear:
        return False
    local = module._forward_hooks or module._forward_pre_hooks or module._backward_hooks or module._backward_pre_hooks
    shared = (
        module_hooks._global_forward_hooks
        or module_hooks._global_forward_pre_hooks
        or module_hooks._global_backward_hooks
        or module_hooks._global_backward_pre_hooks
    )
    return not (local or shared)
