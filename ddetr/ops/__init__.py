"""Custom operators: multi-scale deformable attention and its fast implementations."""

# Imported for its side effect: registers the fast CPU implementation with the dispatcher.
from ddetr.ops import ms_deform_attn_cpu  # noqa: F401
from ddetr.ops.ms_deform_attn import (
    ms_deform_attn,
    ms_deform_attn_reference,
    register_implementation,
    select_implementation,
)

__all__ = ["ms_deform_attn", "ms_deform_attn_reference", "register_implementation", "select_implementation"]
