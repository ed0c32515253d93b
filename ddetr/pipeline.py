"""The one inference path: images → preprocess → model (at the precision policy's dtype) → scored boxes.

``detect_candidates`` is the forward and post-processing that everything shares: ``ObjectDetectionPipeline`` (and so
``ddetr.pipeline(...)(image)``), the demo app's image, webcam and video modes, and ``finetune``'s COCO evaluation,
which batches its own pixels. It keeps the best (query, class) pairs with no score threshold, so a caller can
re-filter them by threshold, count or class without running the model again (``Candidates.detections``).
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from ddetr.checkpoint.default_model import default_model
from ddetr.checkpoint.hub import resolve_file
from ddetr.model.object_detection import DeformableDetrForObjectDetection
from ddetr.ops.prepared_weights import reusing_prepared_weights
from ddetr.processing import DeformableDetrImageProcessorFast, ImageInputError, post_process_object_detection
from ddetr.runtime.allocator import keep_freed_memory
from ddetr.runtime.precision import Precision, resolve_precision
from ddetr.runtime.threads import ADAPTIVE, AdaptiveThreads, adaptive_threads, configure_threads

if TYPE_CHECKING:
    from ddetr.video import FrameResult, VideoLimits

PREPROCESSOR_NAME = "preprocessor_config.json"
# Every (query, class) pair a caller may want to re-filter: the paper model's 300 queries' best.
MAX_CANDIDATES = 300
# The Deformable DETR processors cap the long side at 1333 for the 800-pixel default; a chosen size keeps that ratio.
LONGEST_TO_SHORTEST = 1333 / 800
logger = logging.getLogger(__name__)

Detection = dict[str, Any]


@dataclass(frozen=True)
class Candidates:
    """The scored boxes of one image from one forward pass, best first, in pixels of the (EXIF-oriented) input."""

    scores: np.ndarray  # (candidates,) float32, descending
    labels: np.ndarray  # (candidates,) int64 class indices
    names: tuple[str, ...]  # (candidates,) class names
    boxes: np.ndarray  # (candidates, 4) float32 (xmin, ymin, xmax, ymax), clamped to the image
    image_size: tuple[int, int]  # (height, width) of the input image
    input_size: tuple[int, int]  # (height, width) the model saw, padding excluded

    def __len__(self) -> int:
        return len(self.names)

    def selection(self, threshold: float, max_detections: int, classes: Iterable[str] | None = None) -> list[int]:
        """Indices of the best ``max_detections`` candidates scoring above ``threshold``, best first.

        ``classes`` (empty or None: all) is applied after the cut to ``max_detections``, so hiding a class never
        promotes low-scoring boxes of another class into view.
        """
        threshold = float(threshold)
        if not 0.0 <= threshold <= 1.0:
            raise ValueError(f"threshold must be in [0, 1], got {threshold}")
        max_detections = int(max_detections)
        if max_detections < 1:
            raise ValueError(f"max detections must be at least 1, got {max_detections}")
        wanted = set(classes or ())
        selected = []
        for index in range(min(max_detections, len(self))):
            if float(self.scores[index]) <= threshold:
                break  # scores are sorted: nothing after this passes either
            if not wanted or self.names[index] in wanted:
                selected.append(index)
        return selected

    def detections(
        self,
        threshold: float,
        max_detections: int,
        classes: Iterable[str] | None = None,
        *,
        track_ids: np.ndarray | None = None,
    ) -> list[Detection]:
        """The hub's object-detection schema, ``[{"score", "label", "box": {xmin, ymin, xmax, ymax}}]``, for
        :meth:`selection`'s candidates; ``track_ids`` ((candidates,) int, from a tracker) adds ``"track_id"``."""
        if track_ids is not None and len(track_ids) != len(self):
            raise ValueError(f"got {len(track_ids)} track ids for {len(self)} candidates")
        selected = []
        for index in self.selection(threshold, max_detections, classes):
            xmin, ymin, xmax, ymax = (round(float(v)) for v in self.boxes[index])
            box = {"xmin": xmin, "ymin": ymin, "xmax": xmax, "ymax": ymax}
            detection: Detection = {
                "score": round(float(self.scores[index]), 4),
                "label": self.names[index],
                "box": box,
            }
            if track_ids is not None:
                detection["track_id"] = int(track_ids[index])
            selected.append(detection)
        return selected


def inference_size(shortest_edge: int | None) -> dict[str, int] | None:
    """The processor ``size`` for a chosen shortest edge (None keeps the checkpoint's own setting)."""
    if shortest_edge is None:
        return None
    shortest = int(shortest_edge)
    if shortest < 32:
        raise ValueError(f"the inference shortest edge must be at least 32 pixels, got {shortest}")
    return {"shortest_edge": shortest, "longest_edge": round(shortest * LONGEST_TO_SHORTEST)}


def _unpadded_sizes(pixel_mask: torch.Tensor) -> list[tuple[int, int]]:
    """(height, width) of the valid region of each image of a (batch, height, width) mask."""
    rows = pixel_mask.bool().any(dim=2).sum(dim=1).tolist()
    columns = pixel_mask.bool().any(dim=1).sum(dim=1).tolist()
    return [(int(height), int(width)) for height, width in zip(rows, columns)]


@torch.inference_mode()
def detect_candidates(
    model: DeformableDetrForObjectDetection,
    pixel_values: torch.Tensor,
    pixel_mask: torch.Tensor,
    *,
    image_sizes: Sequence[tuple[int, int]],
    precision: Precision,
    top_k: int = MAX_CANDIDATES,
) -> list[Candidates]:
    """One forward pass over a preprocessed batch and its top ``top_k`` (query, class) pairs per image.

    pixel_values  (batch, 3, height, width) on the model's device; pixel_mask (batch, height, width), 1 = image
    image_sizes   (height, width) of each original image: boxes are scaled to it and clamped inside it

    The model runs under ``precision``'s autocast; boxes and scores are float32 whatever it is (the precision
    policy, ``ddetr.runtime.precision``). The model's train/eval mode is the caller's business.
    """
    if len(image_sizes) != pixel_values.shape[0]:
        raise ValueError(f"got {len(image_sizes)} image sizes for a batch of {pixel_values.shape[0]} images")
    if pixel_values.shape[0] == 0:
        return []
    with precision.autocast(pixel_values.device):
        outputs = model(pixel_values, pixel_mask)
    # Pixel coordinates need float32 whatever the model computed in (bf16 steps by 8 above 1024).
    scored = {"logits": outputs.logits.float(), "pred_boxes": outputs.pred_boxes.float()}
    results = post_process_object_detection(scored, threshold=0.0, target_sizes=list(image_sizes), top_k=top_k)
    id2label = model.config.id2label
    candidates = []
    for result, (height, width), input_size in zip(results, image_sizes, _unpadded_sizes(pixel_mask)):
        # (candidates, 4) (xmin, ymin, xmax, ymax) in pixels
        boxes = result["boxes"].float()
        limits = torch.tensor([width, height, width, height], dtype=boxes.dtype, device=boxes.device)
        boxes = torch.minimum(boxes.clamp(min=0.0), limits)
        labels = result["labels"].cpu().numpy().astype(np.int64)
        candidates.append(
            Candidates(
                scores=result["scores"].float().cpu().numpy(),
                labels=labels,
                names=tuple(id2label.get(int(label), str(int(label))) for label in labels),
                boxes=boxes.cpu().numpy(),
                image_size=(int(height), int(width)),
                input_size=input_size,
            )
        )
    return candidates


class ObjectDetectionPipeline:
    """Load → preprocess (fast processor, on the model's device) → :func:`detect_candidates` → detections.

    Calling it returns, per image, ``[{"score": float, "label": str, "box": {"xmin", "ymin", "xmax", "ymax"}}]``
    sorted by score, with boxes in pixels of the (EXIF-oriented) input and clamped to it.
    """

    def __init__(
        self,
        *,
        model: DeformableDetrForObjectDetection,
        processor: DeformableDetrImageProcessorFast,
        threshold: float = 0.5,
        top_k: int = 100,
        precision: str | Precision = "fp32",
        thread_tuner: AdaptiveThreads | None = None,
    ) -> None:
        self.model = model.eval()
        self.processor = processor
        self.threshold = threshold
        self.top_k = top_k
        # "auto" is resolved once, for the model's device: bf16 where the hardware computes it natively.
        self.precision = precision if isinstance(precision, Precision) else resolve_precision(precision, self.device)
        # Thread counts tried per input shape; None runs on torch's current count. Only CPU forward passes use it.
        self.thread_tuner = thread_tuner if self.device.type == "cpu" else None

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def candidates(
        self, images: Sequence[Any], *, size: int | None = None, top_k: int = MAX_CANDIDATES
    ) -> list[Candidates]:
        """Every image of ``images`` (paths, bytes, PIL images, arrays) through the model in one batch.

        ``size`` is the shortest edge to resize to (the long side keeps the processors' 1333/800 cap); None keeps
        the checkpoint's setting. Padding to a common size changes results slightly: for outputs that do not
        depend on the rest of the batch, pass one image at a time.
        """
        if not images:
            raise ValueError("candidates() needs at least one image")
        pictures = [self.processor.load_image(image) for image in images]
        override = inference_size(size)
        inputs = self.processor(pictures, device=self.device, **({"size": override} if override else {}))
        # (batch, 3, height, width)
        pixel_values = inputs["pixel_values"]
        tuner = self.thread_tuner
        threads = tuner.running(tuple(pixel_values.shape)) if tuner else contextlib.nullcontext()
        # The pipeline's own model is not trained under it, so its bf16 weight casts can be kept between calls
        # (ddetr.ops.prepared_weights); detect_candidates alone, as fine-tuning evaluates, keeps nothing.
        with threads, reusing_prepared_weights():
            return detect_candidates(
                self.model,
                pixel_values,
                inputs["pixel_mask"],
                image_sizes=[(picture.height, picture.width) for picture in pictures],
                precision=self.precision,
                top_k=top_k,
            )

    def video(
        self,
        path: str | os.PathLike,
        *,
        threshold: float | None = None,
        max_detections: int | None = None,
        classes: Sequence[str] = (),
        size: int | None = None,
        batch_size: int = 8,
        stride: int = 1,
        track: bool = True,
        limits: VideoLimits | None = None,
    ) -> Iterator[FrameResult]:
        """Per-frame results (``ddetr.video.FrameResult``: index, time, pixels, detections with ``track_id``) of
        every ``stride``-th frame of a video file, decoded, detected in batches and tracked as it goes.

        Files ``limits`` refuses, or that cannot be read, raise
        ``ddetr.video.VideoInputError`` (a ``ValueError``). Needs PyAV (``pip install av``).
        """
        # Imported here: ddetr.video builds on this module (and PyAV is optional for still images).
        from ddetr.video import DetectionSettings, VideoReader, detect_frames

        settings = DetectionSettings(
            threshold=self.threshold if threshold is None else float(threshold),
            max_detections=self.top_k if max_detections is None else int(max_detections),
            classes=tuple(classes),
            size=size,
            track=track,
        )
        with VideoReader(os.fspath(path), limits=limits, stride=stride) as reader:
            yield from detect_frames(self, reader, settings, batch_size=batch_size)

    def __call__(
        self, images: Any, threshold: float | None = None, top_k: int | None = None
    ) -> list[Detection] | list[list[Detection]]:
        """One image (path, bytes, PIL image, array) gives a list of detections; a list of images a list of lists
        (one forward pass per image, so each result is independent of the others)."""
        single = not isinstance(images, (list, tuple))
        batch: Sequence[Any] = [images] if single else images
        threshold = self.threshold if threshold is None else float(threshold)
        top_k = self.top_k if top_k is None else int(top_k)
        if not 0.0 <= threshold <= 1.0:
            raise ValueError(f"threshold must be in [0, 1], got {threshold}")
        if top_k < 1:
            raise ValueError(f"top_k must be at least 1, got {top_k}")
        results = [self.candidates([image], top_k=top_k)[0].detections(threshold, top_k) for image in batch]
        return results[0] if single else results


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
    threads: int | str | None = None,
) -> ObjectDetectionPipeline:
    """Build a detector. ``model`` is a directory, a hub repo id, or a loaded model; None means
    ``SenseTime/deformable-detr`` when cached or reachable, else the bundled shapes model (logged).

    ``precision``: ``"fp32"`` (outputs equal transformers'), ``"bf16"`` (about 2x faster on CPUs with native
    bfloat16; boxes, sampling locations and scores stay float32), or ``"auto"`` (bf16 where native).

    ``threads``: torch's CPU threads; None caps torch's default at the CPUs this process may use (see
    :func:`ddetr.runtime.threads.configure_threads`); ``"adaptive"`` runs each input shape on whichever of that
    count and one thread has lately been faster (:class:`ddetr.runtime.threads.AdaptiveThreads`: on a machine shared
    with other busy processes, one thread can be the faster). Freed activations are kept for the next call instead
    of being returned to the OS (:func:`ddetr.runtime.allocator.keep_freed_memory`; ``DDETR_KEEP_FREED_MEMORY=0``
    turns it off).
    """
    if task != "object-detection":
        raise ValueError(f"only the 'object-detection' task is supported, got {task!r}")
    tuner = None
    if threads == ADAPTIVE:
        tuner = adaptive_threads()
    elif isinstance(threads, str):
        raise ValueError(f"threads must be a positive int, None or {ADAPTIVE!r}, got {threads!r}")
    else:
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
        model=model, processor=processor, threshold=threshold, top_k=top_k, precision=precision, thread_tuner=tuner
    )


__all__ = ["Candidates", "ImageInputError", "ObjectDetectionPipeline", "detect_candidates", "pipeline"]
