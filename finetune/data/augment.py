"""Box-aware augmentation as pure functions: the image and its boxes always change together.

Boxes here are absolute corners ``(x0, y0, x1, y1)`` in pixels of the image they accompany, float32 ``(n, 4)``;
labels are ``(n,)`` int64. Randomness comes only from the ``numpy.random.Generator`` passed in, so a sample's
augmentation is a function of that generator's seed (the trainer derives it from seed, epoch and sample index,
which keeps resumed and multi-process runs identical).

The training recipe is the paper's (DETR / Deformable DETR ``make_coco_transforms``): horizontal flip with p=0.5,
then with p=0.5 either a multi-scale resize of the short side, or a resize, a random crop and a multi-scale resize.
Its sizes (480..800 by 32, crops of 384..600 after a 400/500/600 resize, long side at most 1333) are scaled by
``image_size / 800``. Resizing uses the image processors' size rule, so a model sees at evaluation exactly the
resolutions it saw in training.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import PIL.Image

from ddetr.processing import get_size_with_aspect_ratio

AUGMENT_MODES = ("paper", "flip", "none")
_PAPER_SCALES = tuple(range(480, 801, 32))
_PAPER_CROP_RESIZES = (400, 500, 600)
_PAPER_CROP_RANGE = (384, 600)
_PAPER_SHORT, _PAPER_LONG = 800, 1333


@dataclass(frozen=True)
class AugmentConfig:
    """``image_size`` is the evaluation short side; ``max_size`` caps the long side (default 1333/800 of it)."""

    image_size: int
    max_size: int | None = None
    mode: str = "paper"

    def __post_init__(self) -> None:
        if isinstance(self.image_size, bool) or not isinstance(self.image_size, int) or self.image_size < 16:
            raise ValueError(f"image_size must be an int >= 16, got {self.image_size!r}")
        if self.mode not in AUGMENT_MODES:
            raise ValueError(f"augmentation mode must be one of {AUGMENT_MODES}, got {self.mode!r}")
        if self.max_size is not None and self.max_size < self.image_size:
            raise ValueError(f"max_size={self.max_size} must be at least image_size={self.image_size}")

    @property
    def long_side(self) -> int:
        return self.max_size if self.max_size is not None else round(self.image_size * _PAPER_LONG / _PAPER_SHORT)

    def scaled(self, sizes: tuple[int, ...]) -> list[int]:
        return sorted({max(8, round(size * self.image_size / _PAPER_SHORT)) for size in sizes})


# ---------------------------------------------------------------------------------------------------------------------
# Pure geometric operations


def hflip(image: PIL.Image.Image, boxes: np.ndarray) -> tuple[PIL.Image.Image, np.ndarray]:
    """Mirror left-right; x becomes width - x."""
    width = image.width
    flipped = boxes.copy()
    flipped[:, 0] = width - boxes[:, 2]
    flipped[:, 2] = width - boxes[:, 0]
    return image.transpose(PIL.Image.Transpose.FLIP_LEFT_RIGHT), flipped


def resize(image: PIL.Image.Image, boxes: np.ndarray, size: tuple[int, int]) -> tuple[PIL.Image.Image, np.ndarray]:
    """Resize to ``size`` = (height, width) bilinearly (as the image processors do) and scale the boxes."""
    height, width = size
    if height < 1 or width < 1:
        raise ValueError(f"cannot resize to {height}x{width}")
    scale = np.array(
        [width / image.width, height / image.height, width / image.width, height / image.height], dtype=np.float32
    )
    if (height, width) == (image.height, image.width):
        return image, boxes.copy()
    return image.resize((width, height), PIL.Image.Resampling.BILINEAR), boxes * scale


def resize_short_side(
    image: PIL.Image.Image, boxes: np.ndarray, short_side: int, max_size: int | None
) -> tuple[PIL.Image.Image, np.ndarray]:
    """Resize so the short side is ``short_side`` and the long side at most ``max_size`` (processor rule)."""
    return resize(image, boxes, get_size_with_aspect_ratio((image.height, image.width), short_side, max_size))


def crop(
    image: PIL.Image.Image, boxes: np.ndarray, labels: np.ndarray, region: tuple[int, int, int, int]
) -> tuple[PIL.Image.Image, np.ndarray, np.ndarray]:
    """Cut ``region`` = (top, left, height, width); boxes are clipped to it and those left without area dropped."""
    top, left, height, width = region
    if height < 1 or width < 1 or top < 0 or left < 0 or top + height > image.height or left + width > image.width:
        raise ValueError(f"crop region {region} does not fit a {image.height}x{image.width} image")
    shifted = boxes - np.array([left, top, left, top], dtype=np.float32)
    shifted[:, 0::2] = shifted[:, 0::2].clip(0, width)
    shifted[:, 1::2] = shifted[:, 1::2].clip(0, height)
    keep = (shifted[:, 2] > shifted[:, 0]) & (shifted[:, 3] > shifted[:, 1])
    return image.crop((left, top, left + width, top + height)), shifted[keep], labels[keep]


# ---------------------------------------------------------------------------------------------------------------------
# Random parameters and the recipes


def random_crop_region(
    rng: np.random.Generator, image_size: tuple[int, int], min_size: int, max_size: int
) -> tuple[int, int, int, int]:
    """(top, left, height, width) with each side uniform in [min_size, min(side, max_size)] (DETR RandomSizeCrop)."""
    image_height, image_width = image_size
    width = int(rng.integers(min(min_size, image_width), min(image_width, max_size) + 1))
    height = int(rng.integers(min(min_size, image_height), min(image_height, max_size) + 1))
    top = int(rng.integers(0, image_height - height + 1))
    left = int(rng.integers(0, image_width - width + 1))
    return top, left, height, width


def train_transform(
    image: PIL.Image.Image, boxes: np.ndarray, labels: np.ndarray, rng: np.random.Generator, config: AugmentConfig
) -> tuple[PIL.Image.Image, np.ndarray, np.ndarray]:
    """The training augmentation of ``config.mode`` (see the module doc); ``none`` is the evaluation resize."""
    boxes = np.asarray(boxes, dtype=np.float32).reshape(-1, 4)
    labels = np.asarray(labels, dtype=np.int64)
    if config.mode == "none":
        image, boxes = resize_short_side(image, boxes, config.image_size, config.long_side)
        return image, boxes, labels
    if rng.random() < 0.5:
        image, boxes = hflip(image, boxes)
    if config.mode == "flip":
        image, boxes = resize_short_side(image, boxes, config.image_size, config.long_side)
        return image, boxes, labels
    scales = config.scaled(_PAPER_SCALES)
    if rng.random() < 0.5:
        image, boxes = resize_short_side(image, boxes, int(rng.choice(scales)), config.long_side)
        return image, boxes, labels
    image, boxes = resize_short_side(image, boxes, int(rng.choice(config.scaled(_PAPER_CROP_RESIZES))), None)
    low, high = config.scaled(_PAPER_CROP_RANGE)
    region = random_crop_region(rng, (image.height, image.width), low, high)
    image, boxes, labels = crop(image, boxes, labels, region)
    image, boxes = resize_short_side(image, boxes, int(rng.choice(scales)), config.long_side)
    return image, boxes, labels
