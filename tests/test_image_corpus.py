"""A generated corpus of malformed and odd image files: each is processed to finite values or refused with
``ImageInputError``, quickly and in bounded memory, by both processors.

The corpus is built in conftest.py (fixtures ``image_corpus`` and ``image_corpus_dir``; a test taking
``corpus_entry`` runs once per file), from small synthetic pictures; the expectation of each file says whether it
must be accepted, must be refused, or may go either way (corrupt data that a decoder may legitimately conceal).
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import PIL.Image
import PIL.ImageOps
import pytest
import torch

from ddetr.processing import (
    DeformableDetrImageProcessor,
    DeformableDetrImageProcessorFast,
    ImageInputError,
    load_image,
)

ACCEPT, REJECT, EITHER = "accept", "reject", "either"  # the expectations of conftest's corpus files
SECONDS_PER_FILE = 1.0
SECONDS_PER_BOMB = 0.1
MAX_RSS_GROWTH_BYTES = 200 * 2**20


PROCESSORS = {"slow": DeformableDetrImageProcessor, "fast": DeformableDetrImageProcessorFast}
# "load_image" is the pipeline's route: decode for display with load_image, then preprocess that picture.
KINDS = [*PROCESSORS, "load_image"]


@pytest.fixture(scope="module")
def processors() -> dict[str, DeformableDetrImageProcessor]:
    made = {name: cls() for name, cls in PROCESSORS.items()}
    for processor in made.values():
        # The first call pays one-off costs (imports, thread pools) that are not what the time limit is about.
        processor(PIL.Image.new("RGB", (64, 48), (120, 60, 200)))
    return made


def _reset_peak_rss() -> int | None:
    """Reset the kernel's peak-RSS counter (Linux) and return the current RSS in bytes, or None elsewhere."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return _status_bytes("VmRSS")
    except OSError:
        return None


def _status_bytes(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(field)


def test_corpus_is_large_enough(image_corpus):
    assert len(image_corpus) >= 40
    assert len({entry.name for entry in image_corpus}) == len(image_corpus)


@pytest.mark.filterwarnings("ignore:Corrupt EXIF data:UserWarning")
@pytest.mark.parametrize("kind", KINDS)
def test_corpus_file_is_processed_or_refused(image_corpus_dir, processors, corpus_entry, kind):
    path = image_corpus_dir / corpus_entry.name
    limit = SECONDS_PER_BOMB if corpus_entry.is_bomb else SECONDS_PER_FILE
    # A second attempt absorbs a load spike from other processes on a shared CI machine.
    for _attempt in range(2):
        rss_before = _reset_peak_rss()
        started = time.perf_counter()
        try:
            output = processors["fast"](load_image(path)) if kind == "load_image" else processors[kind](path)
            outcome = ACCEPT
        except ImageInputError as error:
            outcome, output = REJECT, None
            assert str(error), "a rejection must say why"
        elapsed = time.perf_counter() - started
        if rss_before is not None:
            assert _status_bytes("VmHWM") - rss_before < MAX_RSS_GROWTH_BYTES
        if elapsed < limit:
            break
    assert elapsed < limit, f"took {elapsed:.3f} s"
    if corpus_entry.expectation != EITHER:
        assert outcome == corpus_entry.expectation
    if output is not None:
        pixels = output["pixel_values"]
        assert pixels.ndim == 4 and pixels.shape[:2] == (1, 3) and min(pixels.shape[2:]) >= 1
        assert torch.isfinite(pixels).all()
        assert output["pixel_mask"].shape == (1, *pixels.shape[2:])


def test_bombs_are_refused_with_a_pixel_message(image_corpus_dir, image_corpus, processors):
    for entry in image_corpus:
        if entry.is_bomb:
            with pytest.raises(ImageInputError, match="pixels"):
                processors["slow"](image_corpus_dir / entry.name)


def test_refusals_name_the_problem(image_corpus_dir, processors):
    expected_words = {
        "empty.jpg": "empty",
        "random.bin": "not a recognised image",
        "jpeg_truncated_50.jpg": "truncated",
        "png_truncated_50.png": "truncated",
        "jpeg_truncated_10.jpg": "truncated",
        "bomb_png_60mp.png": "megapixels",
        "page.html": "not an image",
        "vector.svg": "SVG",
        "vector_named.png": "SVG",
        "postscript.eps": "PostScript",
        "document.pdf": "PDF",
        "missing.png": "does not exist",
        "a_directory.png": "directory",
        "1x10000_wide.png": "aspect ratio",
    }
    for name, words in expected_words.items():
        with pytest.raises(ImageInputError) as info:
            processors["slow"](image_corpus_dir / name)
        # The file name itself may contain the words; look at the explanation only.
        assert words in str(info.value).replace(name, ""), str(info.value)


def test_lazily_opened_corrupt_pil_images_are_refused(image_corpus_dir, image_corpus, processors):
    """An ``Image.open`` result is decoded only when used; a corrupt one must still give ``ImageInputError``."""
    checked = 0
    for entry in image_corpus:
        if "truncated" not in entry.name or entry.expectation != REJECT:
            continue
        try:
            image = PIL.Image.open(image_corpus_dir / entry.name)
        except Exception:
            continue  # Pillow could not even read the header; nothing lazy to test
        with image:
            for consumer in (processors["slow"], processors["fast"], load_image):
                with pytest.raises(ImageInputError):
                    consumer(image)
        checked += 1
    assert checked >= 3


# The transposition each EXIF orientation asks for (EXIF 2.32, tag 0x0112), written out independently of Pillow.
ORIENTATION_TRANSPOSE = {
    1: None,
    2: PIL.Image.Transpose.FLIP_LEFT_RIGHT,
    3: PIL.Image.Transpose.ROTATE_180,
    4: PIL.Image.Transpose.FLIP_TOP_BOTTOM,
    5: PIL.Image.Transpose.TRANSPOSE,
    6: PIL.Image.Transpose.ROTATE_270,
    7: PIL.Image.Transpose.TRANSVERSE,
    8: PIL.Image.Transpose.ROTATE_90,
}


@pytest.mark.parametrize("orientation", list(ORIENTATION_TRANSPOSE))
def test_exif_orientation_is_applied(image_corpus_dir, processors, orientation):
    path = image_corpus_dir / f"exif_orientation_{orientation}.jpg"
    with PIL.Image.open(path) as raw:
        raw.load()
    # A PIL image is taken as given (like transformers), tag or not; decoding the file applies the tag.
    assert torch.equal(processors["slow"](raw)["pixel_values"], processors["slow"](np.asarray(raw))["pixel_values"])
    upright = raw.convert("RGB")
    if ORIENTATION_TRANSPOSE[orientation] is not None:
        upright = upright.transpose(ORIENTATION_TRANSPOSE[orientation])
    assert np.array_equal(np.asarray(load_image(path)), np.asarray(upright))
    expected = processors["slow"](upright)["pixel_values"]
    assert torch.equal(processors["slow"](path)["pixel_values"], expected)
    assert (processors["fast"](path)["pixel_values"] - expected).abs().max() < 0.02


@pytest.mark.parametrize("name", ["exif_orientation_0.jpg", "exif_orientation_9.jpg", "exif_garbage.jpg"])
def test_invalid_exif_leaves_the_image_unrotated(image_corpus_dir, name):
    with PIL.Image.open(image_corpus_dir / name) as raw:
        assert load_image(image_corpus_dir / name).size == raw.size


@pytest.mark.parametrize("name", ["animated.gif", "animated.png", "animated.webp", "multi_page.tif"])
def test_first_frame_is_used(image_corpus_dir, name):
    red, green, blue = np.asarray(load_image(image_corpus_dir / name)).reshape(-1, 3).mean(axis=0)
    assert red > 200 and green < 50 and blue < 50
