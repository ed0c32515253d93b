"""Weights cast to the compute dtype for inference (the ResNet's with its frozen BatchNorm folded in), kept between
forward passes.

Why: under bf16 every forward pass cast every linear and convolution weight again and folded the frozen BatchNorm
into every kernel again. Keeping them made the bundled model's forward on a 640x480 webcam frame 6% faster in bf16
(30.0 -> 28.1 ms, 2 threads, Intel Xeon with AMX; 0-5% for the ResNet-50 model) for about 0.4x the weights' fp32
size in memory (64 MiB for the ResNet-50 model). float32 runs keep nothing: their weights need no cast, and keeping
folded float32 kernels (90 MiB there) measured no faster.

Reuse is scoped: only inside :func:`reusing_prepared_weights`, which ``ObjectDetectionPipeline.candidates``
enters (the app, the library's detector, video) and ``detect_candidates`` alone does not (fine-tuning evaluates
through it), and only where no gradient is recorded and nothing is traced or compiled. A prepared tensor is reused
while each of its sources keeps its storage, dtype, shape and version counter. Most in-place updates bump the
counter (``load_state_dict``, ``copy_`` and ``lerp_`` under ``no_grad`` as EMA does, foreach optimizers); a fused
optimizer (``AdamW(fused=True)``) and writes through ``tensor.data`` do not: after changing a pipeline's model that
way, call ``forget_prepared_weights()``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Hashable, Iterator
from contextvars import ContextVar
from typing import Any, TypeVar

import torch
from torch.utils.weak import WeakIdKeyDictionary

Prepared = TypeVar("Prepared")

_reusing: ContextVar[bool] = ContextVar("ddetr_reusing_prepared_weights", default=False)
# first source tensor -> {tag: (signature of all sources, prepared value)}; an entry dies with its first source
_cache: WeakIdKeyDictionary = WeakIdKeyDictionary()


@contextlib.contextmanager
def reusing_prepared_weights() -> Iterator[None]:
    """Within this block (in this thread or task), :func:`prepared` keeps what it prepares for the next call."""
    token = _reusing.set(True)
    try:
        yield
    finally:
        _reusing.reset(token)


def forget_prepared_weights() -> None:
    """Drop every kept tensor (after changing weights through ``.data``, or to free their memory)."""
    _cache.clear()


def _signature(sources: tuple[torch.Tensor, ...]) -> tuple[Any, ...] | None:
    try:
        return tuple((t._version, t.data_ptr(), t.dtype, t.device, t.shape, t.stride()) for t in sources)
    except RuntimeError:  # inference tensors have no version counter
        return None


def _may_reuse(sources: tuple[torch.Tensor, ...]) -> bool:
    # Compiling first: Dynamo cannot trace ContextVar.get, and would break the graph at every weight.
    if torch.compiler.is_compiling() or torch.jit.is_tracing() or not _reusing.get():
        return False
    return not (torch.is_grad_enabled() and any(t.requires_grad for t in sources))


def prepared(sources: tuple[torch.Tensor, ...], tag: Hashable, make: Callable[[], Prepared]) -> Prepared:
    """``make()``, or what it returned for the same ``sources`` and ``tag`` before while they are unchanged.

    ``make`` must depend on nothing but ``sources`` and ``tag`` (put a dtype or a layout in the tag).
    """
    if not sources or not _may_reuse(sources):
        return make()
    signature = _signature(sources)
    if signature is None:
        return make()
    entries = _cache.get(sources[0])
    if entries is None:
        entries = {}
        _cache[sources[0]] = entries
    found = entries.get(tag)
    if found is not None and found[0] == signature:
        return found[1]
    # A normal tensor without history, even under inference_mode: what is prepared from a kept tensor (a cast of a
    # folded kernel) can then be kept too, since inference tensors have no version counter to check.
    with torch.inference_mode(False), torch.no_grad():
        value = make()
    entries[tag] = (signature, value)
    return value


def cast(tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``tensor.to(dtype)``, kept between calls where :func:`prepared` may reuse it."""
    if tensor.dtype == dtype:
        return tensor
    return prepared((tensor,), ("cast", dtype), lambda: tensor.to(dtype))
