"""Torch datasets over validated splits, and the collator that turns examples into model batches.

Pixels and labels come from ``ddetr.processing.DeformableDetrImageProcessor``: rescale, normalise, pad to the batch
and pixel mask, COCO annotations to ``labels`` with boxes normalised to the unpadded image. Training examples are
already augmented (and resized) here, so the processor is told not to resize them; evaluation examples are resized
by the processor itself, as at inference.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import PIL.Image
import torch

from ddetr.boxes import box_xywh_to_xyxy, box_xyxy_to_xywh
from ddetr.processing import DeformableDetrImageProcessor, ImageInputError, load_image
from finetune.data.augment import AugmentConfig, train_transform
from finetune.data.records import DetectionSplit


@dataclass
class Example:
    """One image ready for the processor; ``annotation`` is COCO detection format in the image's pixels."""

    index: int
    image: PIL.Image.Image
    annotation: dict[str, Any]
    original_size: tuple[int, int]


@dataclass
class Batch:
    """``pixel_values`` (B, 3, H, W), ``pixel_mask`` (B, H, W), ``labels`` per image, and where images came from."""

    pixel_values: torch.Tensor
    pixel_mask: torch.Tensor
    labels: list[dict[str, torch.Tensor]]
    indices: list[int]
    original_sizes: list[tuple[int, int]]

    def to(self, device: torch.device) -> Batch:
        return Batch(
            pixel_values=self.pixel_values.to(device, non_blocking=True),
            pixel_mask=self.pixel_mask.to(device, non_blocking=True),
            labels=[{key: value.to(device) for key, value in label.items()} for label in self.labels],
            indices=self.indices,
            original_sizes=self.original_sizes,
        )

    @property
    def num_boxes(self) -> int:
        return sum(int(label["class_labels"].shape[0]) for label in self.labels)


def coco_annotation(image_id: int, boxes_xywh: np.ndarray, labels: np.ndarray) -> dict[str, Any]:
    return {
        "image_id": int(image_id),
        "annotations": [
            {"bbox": [float(v) for v in box], "category_id": int(label), "area": float(box[2] * box[3])}
            for box, label in zip(boxes_xywh, labels)
        ],
    }


def _load(split: DetectionSplit, index: int) -> PIL.Image.Image:
    sample = split.samples[index]
    try:
        image = load_image(split.image_source(index))
    except (ImageInputError, FileNotFoundError) as error:
        raise ValueError(f"{sample.where}: the image could not be loaded during training: {error}") from None
    if image.size != (sample.width, sample.height):
        raise ValueError(
            f"{sample.where}: image is {image.width}x{image.height}, but {sample.width}x{sample.height} when validated"
        )
    return image


class TrainingImages(torch.utils.data.Dataset):
    """Augmented training examples indexed by ``(epoch, index)``: the augmentation of a sample in an epoch is fixed
    by the seed, whichever process or worker draws it."""

    def __init__(self, *, split: DetectionSplit, augment: AugmentConfig, seed: int) -> None:
        self.split = split
        self.augment = augment
        self.seed = seed

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, key: tuple[int, int]) -> Example:
        epoch, index = key
        sample = self.split.samples[index]
        image = _load(self.split, index)
        rng = np.random.default_rng(np.random.SeedSequence([self.seed, epoch, index, 0xA06]))
        corners = box_xywh_to_xyxy(np.asarray(sample.boxes, dtype=np.float32).reshape(-1, 4))
        image, boxes, labels = train_transform(image, corners, sample.labels, rng, self.augment)
        return Example(
            index=index,
            image=image,
            annotation=coco_annotation(index, box_xyxy_to_xywh(boxes), labels),
            original_size=(sample.height, sample.width),
        )


class EvaluationImages(torch.utils.data.Dataset):
    """Un-augmented examples at their original size (the processor resizes them)."""

    def __init__(self, *, split: DetectionSplit, indices: list[int] | None = None) -> None:
        self.split = split
        self.indices = list(range(len(split))) if indices is None else list(indices)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, position: int) -> Example:
        index = self.indices[position]
        sample = self.split.samples[index]
        return Example(
            index=index,
            image=_load(self.split, index),
            annotation=coco_annotation(index, sample.boxes, sample.labels),
            original_size=(sample.height, sample.width),
        )


class DetectionCollator:
    """Examples to a :class:`Batch` through the image processor (``resize`` only for evaluation)."""

    def __init__(self, *, processor: DeformableDetrImageProcessor, resize: bool) -> None:
        self.processor = processor
        self.resize = resize

    def __call__(self, examples: list[Example]) -> Batch:
        features = self.processor.preprocess(
            [example.image for example in examples],
            [example.annotation for example in examples],
            do_resize=self.resize,
            return_tensors="pt",
        )
        labels = [
            {"class_labels": label["class_labels"], "boxes": label["boxes"], "size": label["size"]}
            for label in features["labels"]
        ]
        return Batch(
            pixel_values=features["pixel_values"],
            pixel_mask=features["pixel_mask"],
            labels=labels,
            indices=[example.index for example in examples],
            original_sizes=[example.original_size for example in examples],
        )


def make_processor(image_size: int, max_size: int) -> DeformableDetrImageProcessor:
    """The processor saved with the model: resize to ``image_size`` short side, ``max_size`` long side."""
    return DeformableDetrImageProcessor(size={"shortest_edge": image_size, "longest_edge": max_size})
