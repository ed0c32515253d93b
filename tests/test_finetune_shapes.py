"""The synthetic shapes dataset: schema, determinism, and that it is a real detection task."""

from __future__ import annotations

import io

import datasets
import numpy as np
import PIL.Image
import pytest

from finetune.data.shapes import MAX_OBJECTS, SHAPE_CLASSES, make_shapes_dataset
from finetune.data.sources import parse_shapes_spec


@pytest.fixture(scope="module")
def sample() -> datasets.Dataset:
    return make_shapes_dataset(48, seed=11, image_size=128)


def _raw_bytes(dataset: datasets.Dataset) -> list[bytes]:
    return [row["image"]["bytes"] for row in dataset.cast_column("image", datasets.Image(decode=False))]


def test_schema_is_the_cppe5_object_detection_layout(sample: datasets.Dataset) -> None:
    features = sample.features
    assert set(features) == {"image", "image_id", "width", "height", "objects"}
    assert isinstance(features["image"], datasets.Image)
    objects = features["objects"]
    assert set(objects) == {"id", "area", "bbox", "category"}
    assert isinstance(objects["category"].feature, datasets.ClassLabel)
    assert objects["category"].feature.names == list(SHAPE_CLASSES)
    assert len(SHAPE_CLASSES) >= 6
    row = sample[0]
    assert row["width"] == row["height"] == 128
    assert isinstance(row["image"], PIL.Image.Image) and row["image"].size == (128, 128)
    assert len(row["objects"]["bbox"]) == len(row["objects"]["category"]) == len(row["objects"]["id"])


def test_same_seed_same_bytes_and_prefix_property() -> None:
    first = make_shapes_dataset(4, seed=3, image_size=96)
    again = make_shapes_dataset(4, seed=3, image_size=96)
    longer = make_shapes_dataset(6, seed=3, image_size=96)
    other = make_shapes_dataset(4, seed=4, image_size=96)
    assert _raw_bytes(first) == _raw_bytes(again)
    assert first["objects"] == again["objects"]
    assert _raw_bytes(longer)[:4] == _raw_bytes(first)
    assert _raw_bytes(other) != _raw_bytes(first)


def test_boxes_are_valid_and_cover_the_size_range(sample: datasets.Dataset) -> None:
    counts, widths, heights, categories = [], [], [], []
    for row in sample:
        boxes = np.asarray(row["objects"]["bbox"], dtype=np.float64).reshape(-1, 4)
        counts.append(len(boxes))
        assert (boxes[:, 2] > 0).all() and (boxes[:, 3] > 0).all()
        assert (boxes[:, :2] >= 0).all()
        assert (boxes[:, 0] + boxes[:, 2] <= 128).all() and (boxes[:, 1] + boxes[:, 3] <= 128).all()
        assert all(area > 0 for area in row["objects"]["area"])
        widths += boxes[:, 2].tolist()
        heights += boxes[:, 3].tolist()
        categories += row["objects"]["category"]
    assert min(counts) >= 1 and max(counts) <= MAX_OBJECTS
    assert max(counts) >= 10, "some images should be crowded"
    extents = np.maximum(widths, heights)
    assert np.percentile(extents, 10) < 20, "small objects (~12 px) are common"
    assert extents.max() >= 0.4 * 128, "objects reach about half the image"
    assert set(categories) == set(range(len(SHAPE_CLASSES)))


def test_objects_overlap_and_colour_is_not_tied_to_class(sample: datasets.Dataset) -> None:
    overlapping_pairs = 0
    colours: dict[int, list[np.ndarray]] = {c: [] for c in range(len(SHAPE_CLASSES))}
    for row in sample:
        pixels = np.asarray(row["image"], dtype=np.float64)
        boxes = np.asarray(row["objects"]["bbox"]).reshape(-1, 4)
        for i in range(len(boxes)):
            for j in range(i + 1, len(boxes)):
                a, b = boxes[i], boxes[j]
                if a[0] < b[0] + b[2] and b[0] < a[0] + a[2] and a[1] < b[1] + b[3] and b[1] < a[1] + a[3]:
                    overlapping_pairs += 1
        for box, category in zip(boxes, row["objects"]["category"]):
            x, y, w, h = (int(v) for v in box)
            colours[category].append(np.median(pixels[y : y + h, x : x + w].reshape(-1, 3), axis=0))
    assert overlapping_pairs > 20
    for category, values in colours.items():
        spread = np.stack(values).std(axis=0)
        assert (spread > 30).all(), f"{SHAPE_CLASSES[category]} colours hardly vary: std {spread}"


def test_images_are_textured_not_flat(sample: datasets.Dataset) -> None:
    row = sample[0]
    pixels = np.asarray(row["image"], dtype=np.float64)
    # Background noise and texture: neighbouring pixels differ almost everywhere.
    assert (np.abs(np.diff(pixels, axis=1)).sum(-1) > 0).mean() > 0.8
    encoded = sample.cast_column("image", datasets.Image(decode=False))[0]["image"]["bytes"]
    assert PIL.Image.open(io.BytesIO(encoded)).format == "PNG"


def test_bad_arguments_are_refused() -> None:
    with pytest.raises(ValueError, match="num_images"):
        make_shapes_dataset(-1, seed=0)
    with pytest.raises(ValueError, match="image_size"):
        make_shapes_dataset(2, seed=0, image_size=16)


def test_shapes_spec_parsing() -> None:
    assert parse_shapes_spec("shapes") == {"train": 2000, "validation": 200, "test": 200, "size": 256}
    assert parse_shapes_spec("shapes:train=10,val=2,test=0,size=64") == {
        "train": 10,
        "validation": 2,
        "test": 0,
        "size": 64,
    }
    with pytest.raises(ValueError, match="bad shapes option"):
        parse_shapes_spec("shapes:colour=3")
    with pytest.raises(ValueError, match="integer"):
        parse_shapes_spec("shapes:train=many")
