"""Custom operators: multi-scale deformable attention and its fast implementations."""

from ddetr.ops.ms_deform_attn import (
    ms_deform_attn,
    ms_deform_attn_reference,
    register_implementation,
    select_implementation,
)

__all__ = ["ms_deform_attn", "ms_deform_attn_reference", "register_implementation", "select_implementation"]
