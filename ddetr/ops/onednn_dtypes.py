"""The dtypes oneDNN's own CPU kernels (the fused linear and convolution) compute on this CPU, and the one they
would compute in for given operands.

oneDNN refuses bf16 on a CPU without AVX-512 (BW, VL and DQ) or AVX-NE-CONVERT ("bf16 path needs the cpu
support avx_ne_convert or avx512bw, avx512vl and avx512dq"; seen on a 2-core AMD EPYC Zen 3, AVX2 only), where
``F.linear`` and ``F.conv2d`` still run bf16, emulated. The fast paths apply only to the dtypes listed here, so an
explicit ``--precision bf16`` on such a CPU runs the reference ops instead of failing.
"""

from __future__ import annotations

import functools

import torch


@functools.cache
def onednn_dtypes() -> frozenset[torch.dtype]:
    """float32 wherever oneDNN is built in, bfloat16 too where this CPU runs oneDNN's bf16 kernels."""
    if not torch.backends.mkldnn.is_available():
        return frozenset()
    supported = {torch.float32}
    if torch.ops.mkldnn._is_mkldnn_bf16_supported():
        supported.add(torch.bfloat16)
    return frozenset(supported)


def onednn_compute_dtype(x: torch.Tensor, *others: torch.Tensor | None) -> torch.dtype | None:
    """The dtype a fused oneDNN kernel computes in for these CPU operands, as ``F.linear`` / ``F.conv2d`` would:
    bf16 under bf16 autocast (which casts float32 operands; other autocast dtypes take the plain op), else the
    operands' one dtype. None where this CPU's oneDNN does not compute it or the dtypes are mixed."""
    dtypes = {x.dtype} | {t.dtype for t in others if t is not None}
    if torch.is_autocast_enabled("cpu"):
        bf16 = torch.get_autocast_dtype("cpu") == torch.bfloat16 and dtypes <= {torch.float32, torch.bfloat16}
        return torch.bfloat16 if bf16 and torch.bfloat16 in onednn_dtypes() else None
    return x.dtype if dtypes == {x.dtype} and x.dtype in onednn_dtypes() else None
