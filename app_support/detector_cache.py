"""Loaded detectors, kept in memory so switching back to a model is instant.

Loading a checkpoint takes seconds and hundreds of megabytes, so only a few are kept (least recently used goes
first), and loads are serialised: two visitors picking the same model at once load it once. ``inference_lock`` lets
one forward pass run at a time whichever mode asks (image, webcam, video): on a 2-core Space parallel passes only
thrash, and each mode's own queue slot stays free for its next visitor. A model directory that
is rewritten (a fine-tuning run that was resumed) is detected by its weights' modification time and reloaded.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path

import ddetr
from app_support.errors import UserFacingError
from app_support.model_choices import ModelChoice
from ddetr.checkpoint.default_model import WEIGHT_FILES

Detector = ddetr.ObjectDetectionPipeline
Loader = Callable[[str], Detector]


class ModelLoadError(UserFacingError):
    """A listed model could not be loaded; the message says which and why."""


def load_detector(source: str, precision: str = "auto") -> Detector:
    """The app's detector: bf16 where the CPU or GPU computes it natively (``"auto"``), else fp32."""
    return ddetr.pipeline(model=source, precision=precision)


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

    def loaded_sources(self) -> list[str]:
        with self._lock:
            return [source for source, _ in self._loaded]
