"""The GEMM floor: how long a forward or training step would take if all its multiply-accumulates ran at this
CPU's best measured GEMM/convolution rate. Everything else (deformable sampling, norms, softmax, copies, casts)
is time above the floor.

MACs are counted by ``torch.utils.flop_counter`` over what actually runs (oneDNN's fused linear and CPU attention
added to its table), forward and backward alike; rates are timed in the same process as the model, per library
and dtype, on large shapes and on the network's own feed-forward shape.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import conv_flop_count, flop_registry, shape_wrapper

from benchmarks.measure import interleaved_times
from ddetr.ops.onednn_dtypes import onednn_dtypes

CPU = torch.device("cpu")


def _linear_pointwise_flops(x_shape: Any, weight_shape: Any, *args: Any, out_shape: Any = None, **kwargs: Any) -> int:
    """A linear layer, ``(rows, in) x (out, in)^T`` (oneDNN's or aten's): 2 * rows * in * out."""
    rows = 1
    for size in x_shape[:-1]:
        rows *= size
    return 2 * rows * x_shape[-1] * weight_shape[0]


def _cpu_attention_flops(query: Any, key: Any, value: Any, *args: Any, out_shape: Any = None, **kwargs: Any) -> int:
    """``softmax(q k^T) v`` on (batch, heads, queries, head_dim): two batched GEMMs."""
    batch_heads = query[0] * query[1]
    return 2 * batch_heads * query[2] * key[2] * (query[3] + value[3])


def _onednn_conv_flops(x_shape: Any, weight_shape: Any, *args: Any, out_shape: Any = None, **kwargs: Any) -> int:
    """A convolution as aten's or oneDNN's op sees it (the fused convolution + ReLU too)."""
    return conv_flop_count(list(x_shape), list(weight_shape), list(out_shape), transposed=False)


def _onednn_residual_conv_flops(
    x_shape: Any, residual_shape: Any, weight_shape: Any, *args: Any, out_shape: Any = None, **kwargs: Any
) -> int:
    """oneDNN's convolution with a residual sum in its epilogue: the residual comes before the weight."""
    return conv_flop_count(list(x_shape), list(weight_shape), list(out_shape), transposed=False)


def _custom_mapping() -> dict[Any, Callable[..., int]]:
    """Formulas by op (overload packet) or, where one overload's arguments differ from the others', by overload."""
    mapping: dict[Any, Callable[..., int]] = {torch.ops.aten.mkldnn_convolution: _onednn_conv_flops}
    if hasattr(torch.ops.mkldnn, "_convolution_pointwise"):
        mapping[torch.ops.mkldnn._convolution_pointwise] = _onednn_conv_flops
        mapping[torch.ops.mkldnn._convolution_pointwise.binary] = _onednn_residual_conv_flops
    if hasattr(torch.ops.mkldnn, "_linear_pointwise"):
        mapping[torch.ops.mkldnn._linear_pointwise] = _linear_pointwise_flops
    # In inference mode the dispatcher shows composite ops themselves, elsewhere the kernels they decompose into.
    mapping[torch.ops.aten.scaled_dot_product_attention] = _cpu_attention_flops
    mapping[torch.ops.aten.conv2d] = _onednn_conv_flops
    mapping[torch.ops.aten.linear] = _linear_pointwise_flops
    if hasattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu"):
        mapping[torch.ops.aten._scaled_dot_product_flash_attention_for_cpu] = _cpu_attention_flops
    return mapping


_CONVOLUTIONS = ("conv2d", "convolution", "_convolution", "convolution_backward", "_slow_conv2d_forward",
                 "mkldnn_convolution", "_convolution_pointwise")  # fmt: skip


@dataclass(frozen=True)
class MacCount:
    """Multiply-accumulates of one call, split into convolutions and matrix products."""

    convolution: float
    matmul: float

    @property
    def total(self) -> float:
        return self.convolution + self.matmul


class _MacCounter(TorchDispatchMode):
    """FLOPs per aten op by torch's own formulas (no module tracking: it breaks on inference-mode tensors)."""

    def __init__(self) -> None:
        super().__init__()
        self.registry = {**flop_registry, **{op: shape_wrapper(f) for op, f in _custom_mapping().items()}}
        self.flops: dict[str, float] = {}

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        formula = self.registry.get(func, self.registry.get(func._overloadpacket))
        if formula is not None:
            name = func._overloadpacket.__name__
            self.flops[name] = self.flops.get(name, 0.0) + formula(*args, **kwargs, out_val=out)
        return out


def count_macs(run: Callable[[], object]) -> MacCount:
    """The MACs ``run()`` executes in convolutions and GEMMs (a backward inside ``run`` included), counted on its
    second call: first-use work (kernel choices timing their candidates) is not the model's."""
    run()
    with _MacCounter() as counter:
        run()
    convolution = sum(flops for name, flops in counter.flops.items() if name in _CONVOLUTIONS) / 2
    matmul = sum(flops for name, flops in counter.flops.items() if name not in _CONVOLUTIONS) / 2
    return MacCount(convolution=convolution, matmul=matmul)


@dataclass
class GemmRates:
    """Measured GMAC/s per (dtype, kernel); ``peak`` is the best of each dtype, what the floor divides by."""

    rates: dict[str, dict[str, float]] = field(default_factory=dict)

    def peak(self, dtype: str) -> float:
        return max(self.rates[dtype].values())

    def floor_seconds(self, macs: float, dtype: str) -> float:
        return macs / (self.peak(dtype) * 1e9)


def _gemm_candidates(
    dtype: torch.dtype, network_rows: int, size: int
) -> Mapping[str, tuple[Callable[[], object], float]]:
    """(closure, MACs) per kernel: MKL/aten ``mm`` and oneDNN's linear on a square GEMM, oneDNN on the network's
    feed-forward shape (tokens x 256 -> 1024), and a oneDNN 3x3 convolution at stage-3 width (channels-last)."""
    generator = torch.Generator().manual_seed(0)
    a = torch.randn(size, size, generator=generator).to(dtype)
    b = torch.randn(size, size, generator=generator).to(dtype)
    tokens = torch.randn(network_rows, 256, generator=generator).to(dtype)
    ffn_weight = torch.randn(1024, 256, generator=generator).to(dtype)
    feature = torch.randn(1, 256, 64, 80, generator=generator).to(dtype).contiguous(memory_format=torch.channels_last)
    conv_weight = torch.randn(256, 256, 3, 3, generator=generator).to(dtype)
    conv_weight = conv_weight.contiguous(memory_format=torch.channels_last)
    square = float(size) ** 3
    library = "MKL" if dtype == torch.float32 else "oneDNN"
    candidates: dict[str, tuple[Callable[[], object], float]] = {
        f"mm {size}^3 (aten: {library})": (lambda: torch.mm(a, b), square),
        "conv 3x3 256ch 64x80 (oneDNN)": (
            lambda: F.conv2d(feature, conv_weight, padding=1),
            64 * 80 * 256 * 256 * 9.0,
        ),
    }
    if hasattr(torch.ops.mkldnn, "_linear_pointwise") and dtype in onednn_dtypes():  # oneDNN bf16 needs AVX-512
        linear = torch.ops.mkldnn._linear_pointwise
        candidates[f"linear {size}^3 (oneDNN)"] = (lambda: linear(a, b, None, "none", [], ""), square)
        candidates[f"linear {network_rows}x256->1024 (oneDNN)"] = (
            lambda: linear(tokens, ffn_weight, None, "none", [], ""),
            network_rows * 256 * 1024.0,
        )
    return candidates


def measure_rates(*, network_rows: int, size: int = 2048, repeats: int = 3, bf16: bool = True) -> GemmRates:
    """GMAC/s of each kernel in fp32 (and bf16), timed here and now."""
    rates = GemmRates()
    dtypes = {"fp32": torch.float32} | ({"bf16": torch.bfloat16} if bf16 else {})
    with torch.no_grad():
        for name, dtype in dtypes.items():
            candidates = _gemm_candidates(dtype, network_rows, size)
            times = interleaved_times({label: run for label, (run, _) in candidates.items()}, repeats, CPU)
            rates.rates[name] = {label: macs / times[label] / 1e9 for label, (_, macs) in candidates.items()}
    return rates
