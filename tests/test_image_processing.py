"""Image processors against transformers 5.23's PIL backend (the oracle): pixels, masks, labels, sizes, configs."""

from __future__ import annotations

import importlib.util
import io
import json
import random
import warnings
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch

from ddetr.processing import (
    DeformableDetrFeatureExtractor,
    DeformableDetrImageProcessor,
    DeformableDetrImageProcessorFast,
    ImageInputError,
    get_output_size,
    load_image,
)
from ddetr.processing.annotations import AnnotationError
from ddetr.processing.image_processor_fast import resize_batch
from ddetr.processing.resize import normalize_size

transformers = pytest.importorskip("transformers")
from transformers import DeformableDetrImageProcessorPil  # noqa: E402
from transformers.image_transforms import get_size_with_aspect_ratio as hf_size_with_aspect_ratio  # noqa: E402
from transformers.image_utils import get_image_size_for_max_height_width as hf_size_for_max  # noqa: E402

PHOTO_NAMES = (
    "media_assets/images/cheetah.jpg",
    "media_assets/images/groot.jpeg",
    "media_assets/images/tower.jpg",
    "media_assets/images/lion.jpg",
    "test_data/cheetah2.jpg",
)


def _photo_paths() -> list[Path]:
    """Real photographs shipped inside the gradio wheel (a runtime dependency), so no download is needed."""
    spec = importlib.util.find_spec("gradio")
    if spec is None or not spec.submodule_search_locations:
        return []
    root = Path(next(iter(spec.submodule_search_locations)))
    return [root / name for name in PHOTO_NAMES if (root / name).is_file()]


PHOTOS = _photo_paths()
needs_photos = pytest.mark.skipif(len(PHOTOS) < 3, reason="gradio's sample photographs are not installed")


@pytest.fixture(scope="module")
def reference() -> DeformableDetrImageProcessorPil:
    return DeformableDetrImageProcessorPil(do_convert_rgb=True)


@pytest.fixture(scope="module")
def slow() -> DeformableDetrImageProcessor:
    return DeformableDetrImageProcessor()


@pytest.fixture(scope="module")
def fast() -> DeformableDetrImageProcessorFast:
    return DeformableDetrImageProcessorFast()


@pytest.fixture(scope="module")
def photos() -> list[PIL.Image.Image]:
    images = []
    for path in PHOTOS:
        with PIL.Image.open(path) as image:
            images.append(image.convert("RGB"))
    return images


def _difference(ours: torch.Tensor, theirs: torch.Tensor) -> tuple[float, float]:
    assert ours.shape == theirs.shape
    delta = (ours.float() - theirs.float()).abs()
    return float(delta.max()), float(delta.mean())


# --------------------------------------------------------------------------------------------------------------- #
# Resize rule and size forms


@pytest.mark.parametrize(
    ("image_size", "expected"),
    [
        ((480, 640), (800, 1066)),
        ((640, 480), (1066, 800)),
        ((427, 640), (800, 1199)),
        ((333, 500), (800, 1201)),
        ((100, 1000), (133, 1333)),
        ((1000, 200), (1333, 267)),
        ((2000, 3000), (800, 1200)),
        ((800, 1200), (800, 1200)),
    ],
)
def test_resize_rule_matches_documented_examples(image_size, expected):
    assert get_output_size(image_size, normalize_size(None)) == expected


def test_resize_rule_matches_transformers_on_random_sizes():
    rng = random.Random(0)
    for _ in range(3000):
        height, width = rng.randint(1, 6000), rng.randint(1, 6000)
        short, long = rng.choice([(800, 1333), (600, 1000), (512, 512), (480, 2000)])
        expected = hf_size_with_aspect_ratio((height, width), short, long)
        if min(expected) < 1:
            with pytest.raises(ImageInputError, match="aspect ratio"):
                get_output_size((height, width), {"shortest_edge": short, "longest_edge": long})
        else:
            assert get_output_size((height, width), {"shortest_edge": short, "longest_edge": long}) == expected
        max_h, max_w = rng.randint(1, 1500), rng.randint(1, 1500)
        expected = hf_size_for_max((height, width), max_h, max_w)
        if min(expected) >= 1:
            assert get_output_size((height, width), {"max_height": max_h, "max_width": max_w}) == expected


@pytest.mark.parametrize(
    "kwargs",
    [
        {},
        {"size": 800, "max_size": 1333},
        {"size": 600},
        {"size": {"shortest_edge": 512, "longest_edge": 900}},
        {"size": {"height": 480, "width": 640}},
        {"size": {"max_height": 600, "max_width": 600}},
        {"size": (320, 480)},
    ],
)
def test_size_forms_resolve_like_transformers(kwargs):
    theirs = DeformableDetrImageProcessorPil(**kwargs).size
    expected = {key: value for key, value in dict(theirs).items() if value is not None}
    assert DeformableDetrImageProcessor(**kwargs).size == expected


@pytest.mark.parametrize("size", [{"height": 333, "width": 517}, {"max_height": 600, "max_width": 600}])
@needs_photos
def test_other_size_forms_give_transformers_pixels(reference, slow, photos, size):
    theirs = reference(photos[:2], size=size, return_tensors="pt")
    ours = slow(photos[:2], size=size)
    assert _difference(ours["pixel_values"], theirs["pixel_values"])[0] < 1e-3
    assert torch.equal(ours["pixel_mask"], theirs["pixel_mask"])


@pytest.mark.parametrize("shape", [(1, 10000), (10000, 1), (2, 20000)])
def test_sizes_that_resize_to_zero_are_refused(slow, fast, shape):
    array = np.full((*shape, 3), 128, dtype=np.uint8)
    for processor in (slow, fast):
        with pytest.raises(ImageInputError, match="resized to"):
            processor(array)


def test_extreme_but_valid_aspect_ratio_is_processed(slow, fast, reference):
    image = PIL.Image.fromarray(np.random.default_rng(0).integers(0, 256, (3, 5000, 3), dtype=np.uint8))
    theirs = reference(image, return_tensors="pt")
    for processor in (slow, fast):
        ours = processor(image)
        assert ours["pixel_values"].shape == theirs["pixel_values"].shape == (1, 3, 1, 1333)
        assert torch.isfinite(ours["pixel_values"]).all()


# --------------------------------------------------------------------------------------------------------------- #
# Pixels on real photographs


@needs_photos
def test_photos_match_transformers_one_by_one(reference, slow, fast, photos):
    for photo in photos:
        theirs = reference(photo, return_tensors="pt")
        ours_slow, ours_fast = slow(photo), fast(photo)
        max_slow, _ = _difference(ours_slow["pixel_values"], theirs["pixel_values"])
        max_fast, mean_fast = _difference(ours_fast["pixel_values"], theirs["pixel_values"])
        assert max_slow < 1e-3, photo.size
        # torch's antialiased kernels land at most one 8-bit level away from Pillow's (1 / 255 / 0.225), and
        # rarely: upscaling a 256x256 photo to 800x800 is the worst case here.
        assert max_fast < 0.02 and mean_fast < 5e-4, photo.size
        assert torch.equal(ours_slow["pixel_mask"], theirs["pixel_mask"])
        assert torch.equal(ours_fast["pixel_mask"], theirs["pixel_mask"])


@needs_photos
def test_photo_batch_matches_transformers(reference, slow, fast, photos):
    theirs = reference(photos, return_tensors="pt")
    for processor in (slow, fast):
        ours = processor(photos)
        max_diff, mean_diff = _difference(ours["pixel_values"], theirs["pixel_values"])
        assert max_diff < (1e-3 if processor is slow else 0.02) and mean_diff < 5e-4
        assert ours["pixel_mask"].dtype == torch.int64
        assert torch.equal(ours["pixel_mask"], theirs["pixel_mask"])


@needs_photos
def test_fixed_pad_size_and_no_padding_match_transformers(reference, slow, photos):
    options = {"size": {"max_height": 500, "max_width": 500}, "pad_size": {"height": 512, "width": 512}}
    theirs = reference(photos[:3], return_tensors="pt", **options)
    ours = slow(photos[:3], **options)
    assert _difference(ours["pixel_values"], theirs["pixel_values"])[0] < 1e-3
    assert torch.equal(ours["pixel_mask"], theirs["pixel_mask"])
    theirs = reference(photos[0], do_pad=False, return_tensors="pt")
    ours = slow(photos[0], do_pad=False)
    assert "pixel_mask" not in ours and "pixel_mask" not in theirs
    assert _difference(ours["pixel_values"], theirs["pixel_values"])[0] < 1e-3


@needs_photos
def test_every_input_kind_gives_the_same_pixels(slow, fast, photos):
    photo = photos[0]
    buffer = io.BytesIO()
    photo.save(buffer, format="PNG")
    hwc = np.asarray(photo)
    inputs = [
        hwc,
        np.ascontiguousarray(np.moveaxis(hwc, -1, 0)),
        torch.from_numpy(hwc.copy()),
        torch.from_numpy(np.moveaxis(hwc, -1, 0).copy()),
        buffer.getvalue(),
        bytearray(buffer.getvalue()),
    ]
    expected = slow(photo)["pixel_values"]
    for item in inputs:
        assert torch.equal(slow(item)["pixel_values"], expected), type(item)
        assert _difference(fast(item)["pixel_values"], expected)[0] < 0.02, type(item)


def test_file_paths_are_read(tmp_path, slow):
    image = PIL.Image.fromarray(np.random.default_rng(1).integers(0, 256, (40, 60, 3), dtype=np.uint8))
    image.save(tmp_path / "photo.png")
    assert torch.equal(slow(tmp_path / "photo.png")["pixel_values"], slow(image)["pixel_values"])
    assert torch.equal(slow(str(tmp_path / "photo.png"))["pixel_values"], slow(image)["pixel_values"])
    with pytest.raises(ImageInputError, match="does not exist"):
        slow(tmp_path / "missing.png")


def test_float_arrays_follow_rescale_settings(slow, reference):
    rng = np.random.default_rng(2)
    unit = rng.random((60, 80, 3)).astype(np.float32)
    ours = slow(unit, do_rescale=False)["pixel_values"]
    # Independent computation: our float resize must stay close to resizing the 8-bit version with Pillow.
    theirs = reference((unit * 255).round().astype(np.uint8), return_tensors="pt")["pixel_values"]
    max_diff, mean_diff = _difference(ours, theirs)
    assert max_diff < 0.03 and mean_diff < 0.01


@pytest.mark.parametrize("native_uint8", [True, False])
@pytest.mark.parametrize("resample", [PIL.Image.Resampling.BILINEAR, PIL.Image.Resampling.BICUBIC])
def test_fast_resize_paths_stay_close_to_pillow(native_uint8, resample):
    """The float-then-round path is what runs on GPUs; check it here on CPU against Pillow directly."""
    image = _mode_images()["RGB"].resize((97, 71))
    if resample == PIL.Image.Resampling.BILINEAR:
        worst, typical = 1, 0.25
    else:
        # Bicubic overshoots: Pillow clamps to 8 bits between its two passes, a float pass does not.
        worst, typical = (2, 0.25) if native_uint8 else (16, 0.5)
    for size in [(300, 410), (40, 55)]:
        expected = np.asarray(image.resize(size[::-1], resample=resample)).astype(np.int16)
        batch = torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1)[None]
        resized = resize_batch(batch, size, int(resample), native_uint8=native_uint8)[0].permute(1, 2, 0)
        difference = np.abs(resized.numpy().astype(np.int16) - expected)
        assert difference.max() <= worst
        assert difference.mean() < typical


def test_numpy_outputs_and_batch_feature_moves(slow, fast):
    images = [np.zeros((20, 30, 3), dtype=np.uint8), np.zeros((30, 20, 3), dtype=np.uint8)]
    annotation = {"image_id": 1, "annotations": [{"bbox": [1, 1, 5, 5], "category_id": 3, "area": 25}]}
    for processor in (slow, fast):
        out = processor(images, annotations=[annotation, annotation], return_tensors="np")
        assert isinstance(out["pixel_values"], np.ndarray) and out["pixel_values"].shape == (2, 3, 1200, 1200)
        assert isinstance(out["labels"][0]["boxes"], np.ndarray)
    listed = slow(images, return_tensors=None)
    assert isinstance(listed["pixel_values"], list) and len(listed["pixel_values"]) == 2
    moved = slow(images, annotations=[annotation, annotation]).to(torch.float16)
    assert moved.pixel_values.dtype == torch.float16 and moved.pixel_mask.dtype == torch.int64
    assert moved.labels[0]["class_labels"].dtype == torch.int64


def test_legacy_pad_flag_is_understood():
    assert DeformableDetrImageProcessor(pad_and_return_pixel_mask=False).do_pad is False
    out = DeformableDetrImageProcessor(pad_and_return_pixel_mask=False)(np.zeros((20, 30, 3), dtype=np.uint8))
    assert "pixel_mask" not in out


def test_fast_processor_runs_on_the_requested_device(fast):
    image = torch.randint(0, 256, (2, 3, 48, 64), dtype=torch.uint8)
    out = fast(image, device="cpu")
    assert out["pixel_values"].device.type == "cpu" and out["pixel_values"].shape == (2, 3, 800, 1066)
    if torch.cuda.is_available():
        out_gpu = fast(image.cuda())
        assert out_gpu["pixel_values"].is_cuda and out_gpu["pixel_mask"].is_cuda
        assert _difference(out_gpu["pixel_values"].cpu(), out["pixel_values"])[0] < 0.02


# --------------------------------------------------------------------------------------------------------------- #
# Image modes


def _mode_images() -> dict[str, PIL.Image.Image]:
    rng = np.random.default_rng(3)
    rgb = PIL.Image.fromarray(rng.integers(0, 256, (37, 53, 3), dtype=np.uint8))
    alpha = PIL.Image.fromarray(rng.integers(0, 256, (37, 53), dtype=np.uint8))
    palette_transparent = rgb.convert("P")
    palette_transparent.info["transparency"] = 5
    rgba = rgb.copy()
    rgba.putalpha(alpha)
    la = rgb.convert("L")
    la.putalpha(alpha)
    return {
        "RGB": rgb,
        "1": rgb.convert("1"),
        "L": rgb.convert("L"),
        "LA": la,
        "P": rgb.convert("P"),
        "P+transparency": palette_transparent,
        "PA": rgba.convert("PA"),
        "RGBA": rgba,
        "CMYK": rgb.convert("CMYK"),
        "YCbCr": rgb.convert("YCbCr"),
        "HSV": rgb.convert("HSV"),
        "I(8-bit values)": rgb.convert("L").convert("I"),
    }


@pytest.mark.parametrize("mode", list(_mode_images()))
def test_eight_bit_modes_match_transformers(reference, slow, fast, mode):
    image = _mode_images()[mode]
    theirs = reference(image, return_tensors="pt")
    ours_slow, ours_fast = slow(image), fast(image)
    assert _difference(ours_slow["pixel_values"], theirs["pixel_values"])[0] < 1e-3
    max_fast, mean_fast = _difference(ours_fast["pixel_values"], theirs["pixel_values"])
    assert max_fast < 0.02 and mean_fast < 1e-3
    assert torch.equal(ours_slow["pixel_mask"], theirs["pixel_mask"])


def _deep_images() -> dict[str, tuple[PIL.Image.Image, np.ndarray]]:
    """Deep images and their expected 8-bit-scale gray values (computed here, independently)."""
    ramp16 = np.tile(np.linspace(0, 65535, 300).astype(np.uint16), (40, 1))
    floats = np.tile(np.linspace(0.0, 1.0, 300, dtype=np.float32), (40, 1))
    wide = np.tile(np.linspace(0, 60000, 300).astype(np.int32), (40, 1))
    return {
        "I;16": (PIL.Image.fromarray(ramp16), ramp16 / 65535 * 255),
        "I;16B": (PIL.Image.frombytes("I;16B", (300, 40), ramp16.astype(">u2").tobytes()), ramp16 / 65535 * 255),
        "I": (PIL.Image.fromarray(wide), wide / 65535 * 255),
        "F": (PIL.Image.fromarray(floats), floats * 255),
    }


@pytest.mark.parametrize("mode", list(_deep_images()))
def test_deep_modes_keep_their_range(reference, slow, fast, mode):
    image, gray = _deep_images()[mode]
    # transformers clips 16-bit data at 255; compare with it fed the correctly scaled 8-bit equivalent.
    eight_bit = PIL.Image.fromarray(np.clip(np.rint(gray), 0, 255).astype(np.uint8))
    theirs = reference(eight_bit, return_tensors="pt")["pixel_values"]
    for processor in (slow, fast):
        ours = processor(image)["pixel_values"]
        max_diff, mean_diff = _difference(ours, theirs)
        assert max_diff < 0.03 and mean_diff < 0.01, (mode, processor)
        # More distinct levels than the 8-bit route could give proves the precision was kept.
        assert len(torch.unique(ours[0, 0])) >= 200


def test_non_finite_float_image_becomes_finite(slow):
    values = np.ones((20, 30), dtype=np.float32)
    values[0, :5] = [np.nan, np.inf, -np.inf, 1e30, -5]
    out = slow(PIL.Image.fromarray(values))["pixel_values"]
    assert torch.isfinite(out).all()


def test_convert_rgb_off_keeps_channels(slow):
    gray = PIL.Image.fromarray(np.random.default_rng(4).integers(0, 256, (30, 40), dtype=np.uint8))
    out = slow(gray, do_convert_rgb=False, image_mean=[0.5], image_std=[0.25])["pixel_values"]
    assert out.shape[1] == 1
    with pytest.raises(ImageInputError, match="channel"):
        slow(gray, do_convert_rgb=False)


# --------------------------------------------------------------------------------------------------------------- #
# Guarding


def test_pixel_limit_is_configurable(slow):
    array = np.zeros((100, 120, 3), dtype=np.uint8)
    limited = DeformableDetrImageProcessor(max_image_pixels=10_000)
    with pytest.raises(ImageInputError, match="megapixels"):
        limited(array)
    with pytest.raises(ImageInputError, match="megapixels"):
        limited(PIL.Image.fromarray(array))
    assert slow(array, max_image_pixels=20_000)["pixel_values"].shape[0] == 1
    assert DeformableDetrImageProcessor(max_image_pixels=None)(array)["pixel_values"].shape[0] == 1


def test_only_image_input_error_escapes(slow, fast):
    bad_inputs = [None, [], "not/a/file.png", b"", 12, object(), np.zeros((0, 5, 3)), np.zeros((5, 5, 7)), [b"xx"]]
    for processor in (slow, fast):
        for item in bad_inputs:
            with pytest.raises(ImageInputError):
                processor(item)
        with pytest.raises(ImageInputError):
            processor(np.zeros((8, 8, 3), dtype=np.uint8), size={"bogus": 3})


def test_batch_errors_name_the_image(slow):
    good = np.zeros((8, 8, 3), dtype=np.uint8)
    with pytest.raises(ImageInputError, match="image 1"):
        slow([good, b"garbage"])


# --------------------------------------------------------------------------------------------------------------- #
# Annotations


def _annotation(image_id: int, width: int, height: int, seed: int) -> dict:
    rng = random.Random(seed)
    objects = []
    for number in range(8):
        x, y = rng.uniform(-20, width), rng.uniform(-20, height)
        objects.append(
            {
                "bbox": [x, y, rng.uniform(0, width / 2), rng.uniform(0, height / 2)],
                "category_id": rng.randint(0, 90),
                "area": rng.uniform(10, 1000),
                "iscrowd": 1 if number == 3 else 0,
            }
        )
    objects.append({"bbox": [5, 5, 0, 10], "category_id": 1, "area": 0.0, "iscrowd": 0})
    objects.append({"bbox": [width + 5, 5, 10, 10], "category_id": 2, "area": 100.0, "iscrowd": 0})
    return {"image_id": image_id, "annotations": objects}


def _absolute_xyxy(boxes: torch.Tensor, height: float, width: float) -> torch.Tensor:
    cx, cy, w, h = boxes.unbind(-1)
    return torch.stack([(cx - w / 2) * width, (cy - h / 2) * height, (cx + w / 2) * width, (cy + h / 2) * height], -1)


def test_labels_give_transformers_absolute_boxes(reference, slow, fast):
    rng = np.random.default_rng(5)
    images = [rng.integers(0, 256, (480, 640, 3), dtype=np.uint8), rng.integers(0, 256, (300, 200, 3), dtype=np.uint8)]
    annotations = [_annotation(7, 640, 480, 0), _annotation(9, 200, 300, 1)]
    theirs = reference(images, annotations=annotations, return_tensors="pt")
    for processor in (slow, fast):
        ours = processor(images, annotations=annotations)
        assert torch.equal(ours["pixel_mask"], theirs["pixel_mask"])
        for mine, hf, image in zip(ours["labels"], theirs["labels"], images):
            for key in ("class_labels", "iscrowd", "orig_size", "image_id"):
                assert torch.equal(mine[key], hf[key]), key
            assert torch.allclose(mine["area"], hf["area"])
            # Ours are relative to the resized image, transformers' to the padded canvas; in pixels they agree.
            resized = get_output_size(image.shape[:2], normalize_size(None))
            assert mine["size"].tolist() == list(resized)
            assert hf["size"].tolist() == list(theirs["pixel_values"].shape[-2:])
            assert torch.allclose(_absolute_xyxy(mine["boxes"], *resized), _absolute_xyxy(hf["boxes"], *hf["size"]))
            assert mine["boxes"].dtype == torch.float32 and mine["class_labels"].dtype == torch.int64
        assert len(ours["labels"][0]["boxes"]) < len(annotations[0]["annotations"])  # crowd and empty boxes dropped


def test_labels_without_padding_equal_transformers_exactly(reference, slow):
    image = np.random.default_rng(6).integers(0, 256, (333, 500, 3), dtype=np.uint8)
    annotation = _annotation(3, 500, 333, 2)
    theirs = reference(image, annotations=annotation, do_pad=False, return_tensors="pt")["labels"][0]
    ours = slow(image, annotations=annotation)["labels"][0]
    for key in theirs:
        assert torch.allclose(ours[key].float(), theirs[key].float(), atol=1e-6), key


def test_unconverted_annotations_are_absolute_corners(reference, slow):
    image = np.random.default_rng(7).integers(0, 256, (240, 320, 3), dtype=np.uint8)
    annotation = _annotation(1, 320, 240, 3)
    options = {"do_convert_annotations": False}
    theirs = reference(image, annotations=annotation, return_tensors="pt", **options)["labels"][0]
    ours = slow(image, annotations=annotation, **options)["labels"][0]
    assert torch.allclose(ours["boxes"], theirs["boxes"], atol=1e-4)


def test_bad_annotations_are_named(slow):
    image = np.zeros((10, 10, 3), dtype=np.uint8)
    cases = [
        ({"annotations": []}, "image_id"),
        ({"image_id": 1, "annotations": [{"category_id": 1}]}, "bbox"),
        ({"image_id": 1, "annotations": [{"bbox": [1, 2, "x", 4], "category_id": 1}]}, "number"),
        ({"image_id": 1, "annotations": [{"bbox": [1, 2, 3], "category_id": 1}]}, "bbox"),
        ([{"image_id": 1, "annotations": []}] * 2, "annotation"),
    ]
    for annotation, words in cases:
        with pytest.raises(AnnotationError, match=words):
            slow(image, annotations=annotation)


# --------------------------------------------------------------------------------------------------------------- #
# Configs


def test_saved_config_loads_in_transformers(tmp_path, photos):
    ours = DeformableDetrImageProcessor(size={"shortest_edge": 600, "longest_edge": 1000}, image_mean=[0.5, 0.4, 0.3])
    ours.save_pretrained(tmp_path)
    stored = json.loads((tmp_path / "preprocessor_config.json").read_text())
    assert stored["image_processor_type"] == "DeformableDetrImageProcessor"
    # The class named in the file (it falls back to the PIL backend when torchvision is absent) and the auto class.
    for loaded in (
        transformers.DeformableDetrImageProcessor.from_pretrained(tmp_path),
        transformers.AutoImageProcessor.from_pretrained(tmp_path, backend="pil"),
    ):
        assert dict(loaded.size)["shortest_edge"] == 600 and list(loaded.image_mean) == [0.5, 0.4, 0.3]
    theirs = DeformableDetrImageProcessorPil.from_pretrained(tmp_path)
    image = photos[0] if photos else PIL.Image.new("RGB", (64, 48), (10, 200, 30))
    expected = theirs(image, return_tensors="pt")["pixel_values"]
    reloaded = DeformableDetrImageProcessor.from_pretrained(tmp_path)
    assert _difference(reloaded(image)["pixel_values"], expected)[0] < 1e-3


def test_transformers_config_loads_here(tmp_path):
    DeformableDetrImageProcessorPil(size={"max_height": 640, "max_width": 640}, do_pad=False).save_pretrained(tmp_path)
    ours = DeformableDetrImageProcessorFast.from_pretrained(tmp_path)
    assert ours.size == {"max_height": 640, "max_width": 640} and ours.do_pad is False


def test_legacy_feature_extractor_config_loads(tmp_path):
    legacy = {
        "do_normalize": True,
        "do_resize": True,
        "feature_extractor_type": "DeformableDetrFeatureExtractor",
        "format": "coco_detection",
        "image_mean": [0.485, 0.456, 0.406],
        "image_std": [0.229, 0.224, 0.225],
        "max_size": 1333,
        "size": 800,
    }
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(legacy))
    theirs = DeformableDetrImageProcessorPil.from_pretrained(tmp_path)
    for cls in (DeformableDetrImageProcessor, DeformableDetrImageProcessorFast):
        ours = cls.from_pretrained(tmp_path)
        assert ours.size == {k: v for k, v in dict(theirs.size).items() if v is not None}
        assert ours.do_pad is True and ours.resample == int(theirs.resample)
    overridden = DeformableDetrImageProcessor.from_pretrained(tmp_path, size={"height": 10, "width": 10})
    assert overridden.size == {"height": 10, "width": 10}


def test_missing_hub_repo_names_it():
    with pytest.raises(OSError, match="no-such-user/no-such-repo") as info:
        DeformableDetrImageProcessor.from_pretrained("no-such-user/no-such-repo", local_files_only=True)
    assert "local directory" in str(info.value)


def test_feature_extractor_alias_warns_once_and_behaves_the_same(photos):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        extractor = DeformableDetrFeatureExtractor()
    assert [w.category for w in caught] == [FutureWarning]
    image = photos[0] if photos else PIL.Image.new("RGB", (64, 48))
    assert torch.equal(extractor(image)["pixel_values"], DeformableDetrImageProcessor()(image)["pixel_values"])


def test_load_image_for_display_is_oriented_rgb(tmp_path):
    image = PIL.Image.fromarray(np.random.default_rng(8).integers(0, 256, (30, 50, 3), dtype=np.uint8))
    exif = PIL.Image.Exif()
    exif[0x0112] = 6
    image.save(tmp_path / "rotated.jpg", exif=exif.tobytes(), quality=95)
    loaded = load_image(tmp_path / "rotated.jpg")
    assert loaded.mode == "RGB" and loaded.size == (30, 50)


def test_image_without_objects_gives_empty_labels(reference, slow, fast):
    image = np.zeros((20, 30, 3), dtype=np.uint8)
    annotation = {"image_id": 4, "annotations": []}
    theirs = reference(image, annotations=annotation, return_tensors="pt")["labels"][0]
    for processor in (slow, fast):
        ours = processor(image, annotations=annotation)["labels"][0]
        for key in ("class_labels", "boxes", "area", "iscrowd", "image_id", "orig_size"):
            assert ours[key].shape == theirs[key].shape and ours[key].dtype == theirs[key].dtype, key
