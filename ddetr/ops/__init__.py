"""Custom operators: multi-scale deformable attention and its fast implementations."""

import contextlib

# Imported for its side effect: registers the fast CPU implementation with the dispatcher.
from ddetr.ops import ms_deform_attn_cpu  # noqa: F401
from ddetr.ops.ms_deform_attn import (
    ms_deform_attn,
    ms_deform_attn_reference,
    register_implementation,
    select_implementation,
)

# Registers the Triton kernels for CUDA tensors when triton is installed; triton itself is imported on first use.
with contextlib.suppress(ImportError):
    from ddetr.ops import ms_deform_attn_triton  # noqa: F401

__all__ = ["ms_deform_attn", "ms_deform_attn_reference", "register_implementation", "select_implementation"]
