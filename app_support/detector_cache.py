"""Loaded detectors, kept in memory so switching back to a model is instant.

Loading a checkpoint takes seconds and hundreds of megabytes, so only a few are kept (least recently used goes
first), and loads are serialised: two visitors picking the same model at once load it once. ``inference_lock`` lets
one forward pass run at a time whichever mode asks (image, webcam, video): on a 2-core Space parallel passes only
thrash, and each mode's own queue slot stays free for its next visitor. A model directory that
is rewritten (a fine-tuning run that was resumed) is detected by its weights' modification time and reloaded.

Every mode's forward pass goes through ``DetectorCache.candidates``: on a ZeroGPU Space that is a ``spaces.GPU``
call (``zerogpu.gpu``), run in a forked child with pickled arguments. So the call takes the model by its choice (a
small frozen dataclass) and images, finds the cache by a number (the fork copies the cache and its loaded, CUDA
placed models), and returns the candidates as numpy arrays. Off ZeroGPU the same function runs in-process.
"""

from __future__ import annotations

import os
import threading
import weakref
from collections import OrderedDict
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import ddetr
from app_support.errors import UserFacingError
from app_support.model_choices import ModelChoice
from app_support.zerogpu import gpu, on_zerogpu
from ddetr.checkpoint.default_model import WEIGHT_FILES
from ddetr.pipeline import Candidates
from ddetr.runtime.threads import ADAPTIVE

# The time box of one image's (or webcam frame's) forward pass on ZeroGPU, loading the model included.
IMAGE_GPU_SECONDS = 30

Detector = ddetr.ObjectDetectionPipeline
Loader = Callable[[str], Detector]


class ModelLoadError(UserFacingError):
    """A listed model could not be loaded; the message says which and why."""


def load_detector(source: str, precision: str = "auto", threads: int | str = ADAPTIVE) -> Detector:
    """The app's detector: bf16 where the CPU or GPU computes it natively (``"auto"``), else fp32; on CPU, forward
    passes on ``threads`` (``"adaptive"``: per input shape, the faster of the usable CPUs and one). On ZeroGPU the
    model goes to ``cuda`` when it is loaded, in the main process, as ZeroGPU asks (it emulates CUDA there)."""
    return ddetr.pipeline(model=source, precision=precision, threads=threads, device="cuda" if on_zerogpu() else None)


def _version(choice: ModelChoice) -> float:
    """Modification time of a local model's weights (0 for hub models, whose cache entries are immutable)."""
    if not choice.is_local:
        return 0.0
    for name in WEIGHT_FILES:
        weights = Path(choice.source) / name
        if weights.is_file():
            return weights.stat().st_mtime
    return 0.0


class DetectorCache:
    def __init__(self, max_loaded: int = 2, loader: Loader = load_detector) -> None:
        if max_loaded < 1:
            raise ValueError(f"max_loaded must be at least 1, got {max_loaded}")
        self.max_loaded = max_loaded
        self._loader = loader
        self._lock = threading.Lock()
        self._loaded: OrderedDict[tuple[str, float], Detector] = OrderedDict()
        self._load_locks: dict[str, threading.Lock] = {}
        self.inference_lock = threading.Lock()
        _CACHES[self.cache_id] = self

    def get(self, choice: ModelChoice) -> Detector:
        cache_key = (choice.source, _version(choice))
        with self._lock:
            found = self._lookup(cache_key)
            load_lock = self._load_locks.setdefault(choice.source, threading.Lock())
        if found is not None:
            return found
        # One lock per model: a slow load of one model never delays requests served by another, already loaded one.
        with load_lock:
            with self._lock:
                found = self._lookup(cache_key)
            if found is not None:
                return found
            try:
                detector = self._loader(choice.source)
            except Exception as error:  # checkpoint, hub and config errors all mean "cannot use this model"
                raise ModelLoadError(f"could not load model {choice.label}: {error}") from error
            with self._lock:
                for stale in [key for key in self._loaded if key[0] == choice.source]:
                    del self._loaded[stale]
                self._loaded[cache_key] = detector
                while len(self._loaded) > self.max_loaded:
                    self._loaded.popitem(last=False)
            return detector

    def _lookup(self, cache_key: tuple[str, float]) -> Detector | None:
        detector = self._loaded.get(cache_key)
        if detector is not None:
            self._loaded.move_to_end(cache_key)
        return detector

    @property
    def cache_id(self) -> int:
        """This cache's number for GPU calls (``cache_by_id``): what they are given instead of the cache."""
        return id(self)

    def candidates(self, choice: ModelChoice, images: Sequence[Any], *, size: int | None = None) -> list[Candidates]:
        """``choice``'s candidates for ``images`` (one forward pass at a time, on the GPU call when on ZeroGPU)."""
        return _forward(self.cache_id, choice, list(images), size)

    def loaded_sources(self) -> list[str]:
        with self._lock:
            return [source for source, _ in self._loaded]


# Caches by id, for the GPU function: a number pickles, a cache (locks, models) need not.
_CACHES: weakref.WeakValueDictionary[int, DetectorCache] = weakref.WeakValueDictionary()


def _fresh_locks_in_child() -> None:
    """A forked child (each ZeroGPU call) starts with the parent's locks as they were at the fork: one held by
    another thread then (a model loading, another visitor's forward pass) would never be released there."""
    for cache in list(_CACHES.values()):
        cache._lock = threading.Lock()
        cache._load_locks = {}
        cache.inference_lock = threading.Lock()


os.register_at_fork(after_in_child=_fresh_locks_in_child)


def cache_by_id(cache_id: int) -> DetectorCache:
    return _CACHES[cache_id]


@gpu(duration=IMAGE_GPU_SECONDS)
def _forward(cache_id: int, choice: ModelChoice, images: list[Any], size: int | None) -> list[Candidates]:
    cache = cache_by_id(cache_id)
    detector = cache.get(choice)
    with cache.inference_lock:
        return detector.candidates(images, size=size)
