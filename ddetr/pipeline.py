"""A one-line detector: ``ddetr.pipeline(model=...)(image)`` gives the hub's object-detection schema."""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from typing import Any

import torch

from ddetr.checkpoint.default_model import default_model
from ddetr.checkpoint.hub import resolve_file
from ddetr.model.object_detection import DeformableDetrForObjectDetection
from ddetr.processing import DeformableDetrImageProcessorFast, ImageInputError
from ddetr.runtime.allocator import keep_freed_memory
from ddetr.runtime.precision import inference_autocast, resolve_precision
from ddetr.runtime.threads import configure_threads

PREPROCESSOR_NAME = "preprocessor_config.json"
logger = logging.getLogger(__name__)

Detection = dict[str, Any]


class ObjectDetectionPipeline:
    """Load → preprocess (fast processor, on the model's device) → model → post-process, per image.

    Returns, per image, ``[{"score": float, "label": str, "box": {"xmin", "ymin", "xmax", "ymax"}}]`` sorted by
    score, with boxes in pixels of the (EXIF-oriented) input and clamped to it.
    """

    def __init__(
        self,
        *,
        model: DeformableDetrForObjectDetection,
        processor: DeformableDetrImageProcessorFast,
        threshold: float = 0.5,
        top_k: int = 100,
        precision: str = "fp32",
    ) -> None:
        self.model = model.eval()
        self.processor = processor
        self.threshold = threshold
        self.top_k = top_k
        # "auto" is resolved once, for the model's device: bf16 where the hardware computes it natively.
        self.precision = resolve_precision(precision, self.device)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def __call__(
        self, images: Any, threshold: float | None = None, top_k: int | None = None
    ) -> list[Detection] | list[list[Detection]]:
        """One image (path, bytes, PIL image, array) gives a list of detections; a list of images a list of lists."""
        single = not isinstance(images, (list, tuple))
        batch: Sequence[Any] = [images] if single else images
        threshold = self.threshold if threshold is None else float(threshold)
        top_k = self.top_k if top_k is None else int(top_k)
        if not 0.0 <= threshold <= 1.0:
            raise ValueError(f"threshold must be in [0, 1], got {threshold}")
        if top_k < 1:
            raise ValueError(f"top_k must be at least 1, got {top_k}")
        results = [self._detect_one(image, threshold, top_k) for image in batch]
        return results[0] if single else results

    @torch.inference_mode()
    def _detect_one(self, image: Any, threshold: float, top_k: int) -> list[Detection]:
        picture = self.processor.load_image(image)
        width, height = picture.size
        inputs = self.processor(picture, device=self.device)
        with inference_autocast(self.precision, self.device):
            outputs = self.model(inputs["pixel_values"], inputs["pixel_mask"])
        (result,) = self.processor.post_process_object_detection(
            outputs, threshold=threshold, target_sizes=[(height, width)], top_k=top_k
        )
        id2label = self.model.config.id2label
        detections = []
        for score, label, box in zip(result["scores"].tolist(), result["labels"].tolist(), result["boxes"].tolist()):
            x0, y0, x1, y1 = box
            detections.append(
                {
                    "score": round(float(score), 4),
                    "label": id2label.get(int(label), str(label)),
                    "box": {
                        "xmin": round(min(max(x0, 0.0), width)),
                        "ymin": round(min(max(y0, 0.0), height)),
                        "xmax": round(min(max(x1, 0.0), width)),
                        "ymax": round(min(max(y1, 0.0), height)),
                    },
                }
            )
        return detections


def load_processor(source: str | os.PathLike | None) -> DeformableDetrImageProcessorFast:
    """The checkpoint's preprocessor_config.json when it has one, otherwise transformers' defaults."""
    if source is not None:
        config_file = resolve_file(source, PREPROCESSOR_NAME, required=False)
        if config_file is not None:
            return DeformableDetrImageProcessorFast.from_pretrained(config_file)
    return DeformableDetrImageProcessorFast()


def pipeline(
    task: str = "object-detection",
    model: str | os.PathLike | DeformableDetrForObjectDetection | None = None,
    *,
    processor: DeformableDetrImageProcessorFast | None = None,
    device: str | torch.device | None = None,
    threshold: float = 0.5,
    top_k: int = 100,
    precision: str = "fp32",
    threads: int | None = None,
) -> ObjectDetectionPipeline:
    """Build a detector. ``model`` is a directory, a hub repo id, or a loaded model; None means
    ``SenseTime/deformable-detr`` when cached or reachable, else the bundled shapes model (logged).

    ``precision``: ``"fp32"`` (outputs equal transformers'), ``"bf16"`` (about 2x faster on CPUs with native
    bfloat16; boxes, sampling locations and scores stay float32), or ``"auto"`` (bf16 where native).

    ``threads``: torch's CPU threads; None caps torch's default at the CPUs this process may use (see
    :func:`ddetr.runtime.threads.configure_threads`). Freed activations are kept for the next call instead of being
    returned to the OS (:func:`ddetr.runtime.allocator.keep_freed_memory`; ``DDETR_KEEP_FREED_MEMORY=0`` turns it off).
    """
    if task != "object-detection":
        raise ValueError(f"only the 'object-detection' task is supported, got {task!r}")
    configure_threads(threads)
    keep_freed_memory()
    source: str | os.PathLike | None = None
    if model is None:
        chosen = default_model()
        logger.info("ddetr.pipeline: using %s", chosen.reason)
        model = chosen.source
    if not isinstance(model, DeformableDetrForObjectDetection):
        source = model
        model = DeformableDetrForObjectDetection.from_pretrained(model)
    if device is not None:
        model = model.to(device)
    if processor is None:
        processor = load_processor(source)
    return ObjectDetectionPipeline(
        model=model, processor=processor, threshold=threshold, top_k=top_k, precision=precision
    )


__all__ = ["ImageInputError", "ObjectDetectionPipeline", "pipeline"]
