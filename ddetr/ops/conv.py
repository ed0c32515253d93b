"""CPU convolution paths of the ResNet, each chosen on this machine by measurement (``ddetr.runtime.kernel_choice``).

- ``conv_layout``: channels-last or contiguous activations. oneDNN convolves channels-last maps natively and
  reorders NCHW ones around every convolution (ResNet-50 at 800x1066, 2 threads, AMD EPYC: 0.40 s instead of 0.89 s).
- ``conv_relu``: a convolution followed by ReLU as one oneDNN call with the ReLU in its epilogue (``fused``), or
  ``F.conv2d`` then an in-place ReLU pass over the output (``unfused``, the reference). Inference only (the
  oneDNN op has no autograd formula): 7% of a 3x3 256-channel convolution at 100x134 on a 2-core Xeon. A residual
  block's last convolution also takes the residual sum into that epilogue (``relu(conv(x) + shortcut)``):
  two passes fewer over the block's widest map.

Traced, compiled and float64 runs take ``F.conv2d`` and channels-last without measuring.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from ddetr.ops.onednn_dtypes import onednn_compute_dtype
from ddetr.ops.prepared_weights import cast
from ddetr.runtime import kernel_choice

CONV_RELU_OPTIONS = ("fused", "unfused")
_HAS_ONEDNN_CONV = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_convolution_pointwise")


def _plain_run() -> bool:
    return torch.compiler.is_compiling() or torch.jit.is_tracing()


def _onednn_conv_dtype(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, residual: torch.Tensor | None = None
) -> torch.dtype | None:
    """The dtype the fused oneDNN convolution would compute in here, None when it does not apply."""
    if not _HAS_ONEDNN_CONV or x.device.type != "cpu" or _plain_run():
        return None
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, weight, bias, residual)):
        return None
    return onednn_compute_dtype(x, weight, bias, residual)


def conv2d(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    *,
    stride: tuple[int, ...],
    padding: tuple[int, ...] | str,
    dilation: tuple[int, ...],
    groups: int,
    relu: bool = False,
    residual: torch.Tensor | None = None,
) -> torch.Tensor:
    """``F.conv2d``, plus ``residual`` (a tensor of the output's shape) when given, then ReLU when ``relu``; the sum
    and the ReLU run in oneDNN's convolution epilogue where that measured faster on this machine."""
    dtype = _onednn_conv_dtype(x, weight, bias, residual) if relu and not isinstance(padding, str) else None
    if dtype is not None and conv_relu_choice(dtype).option == "fused":
        bias = cast(bias, dtype) if bias is not None else None
        weight = cast(weight, dtype)
        layout = (list(padding), list(stride), list(dilation), groups)
        if residual is None:
            return torch.ops.mkldnn._convolution_pointwise(x.to(dtype), weight, bias, *layout, "relu", [], "")
        return torch.ops.mkldnn._convolution_pointwise.binary(
            x.to(dtype), residual.to(dtype), weight, bias, *layout, "add", None, "relu", [], ""
        )
    out = F.conv2d(x, weight, bias, stride, padding, dilation, groups)
    if residual is not None:
        out = out.add_(residual)
    return F.relu(out, inplace=True) if relu else out


def conv_relu_choice(dtype: torch.dtype = torch.float32) -> kernel_choice.Choice:
    """Whether inference convolutions followed by ReLU run fused in oneDNN on this CPU, and why."""
    decision = kernel_choice.Decision(
        family="conv_relu", mode=kernel_choice.mode_name(dtype, training=False), options=CONV_RELU_OPTIONS
    )
    return kernel_choice.choose(decision, lambda: _conv_relu_candidates(dtype))


def _stage_two_tensors() -> tuple[torch.Tensor, torch.Tensor]:
    """A bottleneck's 3x3 convolution at stage 2 of a 512x640 image: (batch, channels, height, width), weight."""
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(1, 128, 64, 80, generator=generator)
    return x, torch.randn(128, 128, 3, 3, generator=generator) / 34


def _conv_relu_candidates(dtype: torch.dtype) -> dict[str, Callable[[], object]]:
    if not _HAS_ONEDNN_CONV:
        raise RuntimeError("this torch build has no oneDNN convolution")
    x, weight = _stage_two_tensors()
    x, weight = x.to(dtype).contiguous(memory_format=torch.channels_last), weight.to(dtype)
    bias = torch.zeros(weight.shape[0], dtype=dtype)

    def fused() -> object:
        with torch.no_grad():
            return torch.ops.mkldnn._convolution_pointwise(x, weight, bias, [1, 1], [1, 1], [1, 1], 1, "relu", [], "")

    def unfused() -> object:
        with torch.no_grad():
            return F.relu(F.conv2d(x, weight, bias, 1, 1), inplace=True)

    return {"fused": fused, "unfused": unfused}


CONV_LAYOUTS = ("channels_last", "contiguous")


def conv_layout_choice(dtype: torch.dtype = torch.float32, *, training: bool = False) -> kernel_choice.Choice:
    """Whether the ResNet convolves channels-last or contiguous activations on this CPU (measured once per
    machine, dtype and mode; ``DDETR_KERNELS=conv_layout=...`` overrides). Traced, compiled and float64 runs
    take channels-last without measuring."""
    if _plain_run() or dtype not in (torch.float32, torch.bfloat16):
        return kernel_choice.Choice(option=CONV_LAYOUTS[0], source="default", seconds={})
    decision = kernel_choice.Decision(
        family="conv_layout", mode=kernel_choice.mode_name(dtype, training=training), options=CONV_LAYOUTS
    )
    return kernel_choice.choose(decision, lambda: _conv_layout_candidates(dtype, training))


def _conv_layout_candidates(dtype: torch.dtype, training: bool) -> dict[str, Callable[[], object]]:
    """A bottleneck's 3x3 then 1x1 convolution at stage 2 of a 512x640 image, in both layouts."""
    x, first = _stage_two_tensors()
    second = torch.randn(512, 128, 1, 1, generator=torch.Generator().manual_seed(1)) / 11
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16)

    def run(layout: torch.memory_format) -> Callable[[], object]:
        weights = [w.contiguous(memory_format=layout).requires_grad_(training) for w in (first, second)]
        source = x.contiguous(memory_format=layout)

        def step() -> object:
            with torch.set_grad_enabled(training), autocast:
                out = F.conv2d(F.relu(F.conv2d(source, weights[0], padding=1)), weights[1])
                if training:
                    out.float().sum().backward()
            return None

        return step

    return {"channels_last": run(torch.channels_last), "contiguous": run(torch.contiguous_format)}
