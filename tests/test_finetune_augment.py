"""Augmentation keeps images and boxes consistent: property tests over many random scenes and seeds."""

from __future__ import annotations

import numpy as np
import PIL.Image
import PIL.ImageDraw
import pytest

from ddetr.processing import get_size_with_aspect_ratio
from finetune.data.augment import AugmentConfig, crop, hflip, random_crop_region, resize, train_transform

# Saturated, well separated colours: after bilinear resampling, a pixel within this distance belongs to the object.
COLOURS = np.array([(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0), (255, 0, 255), (0, 255, 255)])
COLOUR_TOLERANCE = 60


def random_scene(rng: np.random.Generator) -> tuple[PIL.Image.Image, np.ndarray, np.ndarray]:
    """A black image with up to 6 non-overlapping filled rectangles; label i is drawn in COLOURS[i]."""
    width, height = int(rng.integers(60, 200)), int(rng.integers(60, 200))
    image = PIL.Image.new("RGB", (width, height))
    draw = PIL.ImageDraw.Draw(image)
    boxes, labels, taken = [], [], np.zeros((height, width), dtype=bool)
    for label in range(int(rng.integers(1, 7))):
        for _ in range(20):
            w, h = int(rng.integers(8, width // 2)), int(rng.integers(8, height // 2))
            x, y = int(rng.integers(0, width - w)), int(rng.integers(0, height - h))
            # A gap of 3 px keeps blurred edges of neighbours apart.
            if not taken[max(0, y - 3) : y + h + 3, max(0, x - 3) : x + w + 3].any():
                taken[y : y + h, x : x + w] = True
                draw.rectangle([x, y, x + w - 1, y + h - 1], fill=tuple(int(c) for c in COLOURS[label]))
                boxes.append([x, y, x + w, y + h])
                labels.append(label)
                break
    return image, np.asarray(boxes, dtype=np.float32).reshape(-1, 4), np.asarray(labels, dtype=np.int64)


def colour_extent(image: PIL.Image.Image, label: int) -> np.ndarray | None:
    """Corner box (x0, y0, x1, y1) of the pixels at least half covered by ``label``'s colour, None when none is.

    On a black background a resampled pixel is ``coverage * colour``; a symmetric filter puts coverage 0.5 exactly
    on the original edge, however strong the blur of a downscale.
    """
    pixels = np.asarray(image, dtype=np.float64)
    colour = COLOURS[label].astype(np.float64)
    coverage = pixels @ colour / (colour @ colour)
    residual = np.abs(pixels - coverage[..., None] * colour).sum(-1)
    close = (coverage > 0.5) & (residual < COLOUR_TOLERANCE)
    rows, cols = np.nonzero(close)
    if rows.size == 0:
        return None
    return np.array([cols.min(), rows.min(), cols.max() + 1, rows.max() + 1], dtype=np.float32)


def assert_consistent(image: PIL.Image.Image, boxes: np.ndarray, labels: np.ndarray, original_labels: np.ndarray):
    assert boxes.shape == (len(labels), 4) and boxes.dtype == np.float32
    assert (boxes[:, 2] > boxes[:, 0]).all() and (boxes[:, 3] > boxes[:, 1]).all()
    assert (boxes[:, :2] >= -1e-3).all()
    assert (boxes[:, 2] <= image.width + 1e-3).all() and (boxes[:, 3] <= image.height + 1e-3).all()
    for box, label in zip(boxes, labels):
        extent = colour_extent(image, int(label))
        # Boxes shrunk to slivers by a crop may have no pixel that keeps the pure colour.
        if min(box[2] - box[0], box[3] - box[1]) < 3:
            continue
        assert extent is not None, f"label {label} has a box {box} but no pixels"
        np.testing.assert_allclose(extent, box, atol=1.5, err_msg=f"label {label}")
    for label in set(original_labels.tolist()) - set(labels.tolist()):
        extent = colour_extent(image, label)
        # A dropped object leaves at most a blurred edge of a pixel or so behind.
        assert extent is None or min(extent[2] - extent[0], extent[3] - extent[1]) <= 2


@pytest.mark.parametrize("mode", ["paper", "flip", "none"])
def test_random_augmentations_keep_boxes_on_their_pixels(mode: str) -> None:
    config = AugmentConfig(image_size=96, mode=mode)
    for seed in range(120):
        rng = np.random.default_rng(seed)
        image, boxes, labels = random_scene(rng)
        out_image, out_boxes, out_labels = train_transform(image, boxes, labels, rng, config)
        assert_consistent(out_image, out_boxes, out_labels, labels)
        if mode != "paper":
            assert out_labels.tolist() == labels.tolist()


def test_paper_recipe_sizes_follow_the_scaled_scales() -> None:
    config = AugmentConfig(image_size=160, mode="paper")
    scales = set(config.scaled(tuple(range(480, 801, 32))))
    short_sides = set()
    for seed in range(200):
        rng = np.random.default_rng(seed)
        image, boxes, labels = random_scene(rng)
        out, _, _ = train_transform(image, boxes, labels, rng, config)
        assert max(out.size) <= config.long_side
        short_sides.add(min(out.size))
    # Unless the long-side cap bites, the short side is one of the scales.
    assert len(short_sides & scales) >= len(scales) - 2


def test_eval_resize_matches_the_processor_rule() -> None:
    config = AugmentConfig(image_size=128, mode="none")
    for size in [(60, 200), (199, 61), (100, 100), (150, 90)]:
        image = PIL.Image.new("RGB", size)
        out, _, _ = train_transform(image, np.zeros((0, 4)), np.zeros(0), np.random.default_rng(0), config)
        assert out.size[::-1] == get_size_with_aspect_ratio(size[::-1], 128, config.long_side)


def test_same_generator_seed_same_augmentation() -> None:
    image, boxes, labels = random_scene(np.random.default_rng(5))
    config = AugmentConfig(image_size=96)
    first = train_transform(image, boxes, labels, np.random.default_rng(42), config)
    second = train_transform(image, boxes, labels, np.random.default_rng(42), config)
    assert np.array_equal(np.asarray(first[0]), np.asarray(second[0]))
    assert np.array_equal(first[1], second[1]) and np.array_equal(first[2], second[2])


def test_pure_operations() -> None:
    image, boxes, labels = random_scene(np.random.default_rng(1))
    flipped, flipped_boxes = hflip(*hflip(image, boxes))
    assert np.array_equal(np.asarray(flipped), np.asarray(image)) and np.allclose(flipped_boxes, boxes)
    resized, resized_boxes = resize(image, boxes, (image.height * 2, image.width * 3))
    np.testing.assert_allclose(resized_boxes, boxes * np.array([3, 2, 3, 2]), rtol=1e-6)
    assert resized.size == (image.width * 3, image.height * 2)
    region = random_crop_region(np.random.default_rng(0), (image.height, image.width), 20, 50)
    cropped, cropped_boxes, cropped_labels = crop(image, boxes, labels, region)
    assert cropped.size == (region[3], region[2])
    assert_consistent(cropped, cropped_boxes, cropped_labels, labels)
    with pytest.raises(ValueError, match="does not fit"):
        crop(image, boxes, labels, (0, 0, image.height + 1, 10))
    with pytest.raises(ValueError, match="augmentation mode"):
        AugmentConfig(image_size=96, mode="mosaic")
    with pytest.raises(ValueError, match="image_size"):
        AugmentConfig(image_size=8)
