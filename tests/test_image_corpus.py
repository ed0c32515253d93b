"""A generated corpus of malformed and odd image files: each is processed to finite values or refused with
``ImageInputError``, quickly and in bounded memory, by both processors.

Every file is built here from a small synthetic picture; the expectation for each says whether it must be
accepted, must be refused, or may go either way (corrupt data that a decoder may legitimately conceal).
"""

from __future__ import annotations

import io
import struct
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import PIL.Image
import PIL.ImageOps
import pytest
import torch
from PIL import features

from ddetr.processing import (
    DeformableDetrImageProcessor,
    DeformableDetrImageProcessorFast,
    ImageInputError,
    load_image,
)

ACCEPT, REJECT, EITHER = "accept", "reject", "either"
SECONDS_PER_FILE = 1.0
SECONDS_PER_BOMB = 0.1
MAX_RSS_GROWTH_BYTES = 200 * 2**20


@dataclass(frozen=True)
class CorpusFile:
    name: str
    expectation: str
    build: Callable[[], bytes | None]  # None: the path is not a regular file (missing, directory)
    is_bomb: bool = False


def _picture(width: int = 64, height: int = 48, seed: int = 0) -> PIL.Image.Image:
    """A photo-like RGB picture: smooth gradients plus noise, so codecs behave as on real images."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([x * 255 / max(width - 1, 1), y * 255 / max(height - 1, 1), (x + y) % 256], axis=-1)
    noisy = base + rng.normal(0, 12, base.shape)
    return PIL.Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8))


def _encode(image: PIL.Image.Image, format: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=format, **options)
    return buffer.getvalue()


def _png_declaring(width: int, height: int) -> bytes:
    """A valid small PNG whose IHDR (with a correct CRC) claims ``width`` x ``height``."""
    data = bytearray(_encode(_picture(), "PNG"))
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    return bytes(data)


def _jpeg_declaring(width: int, height: int) -> bytes:
    data = bytearray(_encode(_picture(), "JPEG"))
    sof = data.index(b"\xff\xc0")
    data[sof + 5 : sof + 9] = struct.pack(">HH", height, width)
    return bytes(data)


def _gif_declaring(width: int, height: int) -> bytes:
    data = bytearray(_encode(_picture(), "GIF"))
    data[6:10] = struct.pack("<HH", width, height)
    return bytes(data)


def _bmp_declaring(width: int, height: int) -> bytes:
    data = bytearray(_encode(_picture(), "BMP"))
    data[18:26] = struct.pack("<ii", width, height)
    return bytes(data)


def _truncated(data: bytes, fraction: float) -> bytes:
    return data[: max(1, int(len(data) * fraction))]


def _flip_byte(data: bytes, position: int) -> bytes:
    mutable = bytearray(data)
    mutable[position] ^= 0xFF
    return bytes(mutable)


def _with_orientation(orientation: int, format: str = "JPEG") -> bytes:
    exif = PIL.Image.Exif()
    exif[0x0112] = orientation
    return _encode(_picture(), format, exif=exif.tobytes())


def _raw_exif_jpeg(exif_payload: bytes) -> bytes:
    """A JPEG with an arbitrary APP1 payload spliced in after SOI (Pillow would refuse to write a malformed one)."""
    jpeg = _encode(_picture(), "JPEG")
    segment = b"\xff\xe1" + struct.pack(">H", len(exif_payload) + 2) + exif_payload
    return jpeg[:2] + segment + jpeg[2:]


def _exif_orientation_as_text() -> bytes:
    entry = struct.pack("<HHI", 0x0112, 2, 4) + b"abc\x00"
    return _raw_exif_jpeg(b"Exif\x00\x00II*\x00" + struct.pack("<I", 8) + struct.pack("<H", 1) + entry + b"\0" * 4)


def _exif_dangling_offset() -> bytes:
    return _raw_exif_jpeg(b"Exif\x00\x00II*\x00" + struct.pack("<I", 0xFFFFFF00))


def _animated(format: str, **options) -> bytes:
    frames = [PIL.Image.new("RGB", (40, 30), colour) for colour in ((250, 0, 0), (0, 250, 0), (0, 0, 250))]
    return _encode(frames[0], format, save_all=True, append_images=frames[1:], **options)


def _mode(mode: str) -> PIL.Image.Image:
    picture = _picture()
    if mode == "LA":
        image = picture.convert("L")
        image.putalpha(picture.convert("L"))
        return image
    if mode == "RGBA":
        image = picture.copy()
        image.putalpha(PIL.Image.linear_gradient("L").resize(picture.size))
        return image
    return picture.convert(mode)


def _array_image(values: np.ndarray) -> PIL.Image.Image:
    return PIL.Image.fromarray(values)


def _float_with_non_finite() -> bytes:
    values = np.linspace(0, 1, 48 * 64, dtype=np.float32).reshape(48, 64)
    values[0, :4] = [np.nan, np.inf, -np.inf, -3]
    return _encode(_array_image(values), "TIFF")


def _multi_page_tiff() -> bytes:
    pages = [PIL.Image.new("RGB", (40, 30), colour) for colour in ((250, 0, 0), (0, 250, 0))]
    return _encode(pages[0], "TIFF", save_all=True, append_images=pages[1:])


def _svg() -> bytes:
    return b'<?xml version="1.0"?>\n<svg xmlns="http://www.w3.org/2000/svg" width="64" height="48"><rect/></svg>'


def _corpus() -> list[CorpusFile]:
    jpeg = _encode(_picture(), "JPEG")
    png = _encode(_picture(), "PNG")
    rng = np.random.default_rng(1234)
    files = [
        CorpusFile("empty.jpg", REJECT, lambda: b""),
        CorpusFile("random.bin", REJECT, lambda: rng.bytes(4096)),
        CorpusFile("random_after_jpeg_magic.jpg", REJECT, lambda: b"\xff\xd8\xff\xe0" + rng.bytes(4096)),
        CorpusFile("random_after_png_signature.png", REJECT, lambda: b"\x89PNG\r\n\x1a\n" + rng.bytes(4096)),
        CorpusFile("jpeg_header_only.jpg", REJECT, lambda: jpeg[:20]),
        CorpusFile("png_header_only.png", REJECT, lambda: png[:40]),
        CorpusFile("png_bad_ihdr_crc.png", REJECT, lambda: _flip_byte(png, 30)),
        CorpusFile("png_bad_idat_byte.png", EITHER, lambda: _flip_byte(png, len(png) // 2)),
        CorpusFile("jpeg_corrupt_scan.jpg", EITHER, lambda: _flip_byte(jpeg, len(jpeg) // 2)),
        CorpusFile("missing.png", REJECT, lambda: None),
        CorpusFile("a_directory.png", REJECT, lambda: None),
        # Bombs: declared sizes far above the 50 MP limit; must be refused from the header.
        CorpusFile("bomb_png_60mp.png", REJECT, lambda: _png_declaring(10000, 6000), is_bomb=True),
        CorpusFile("bomb_png_200mp.png", REJECT, lambda: _png_declaring(20000, 10000), is_bomb=True),
        CorpusFile("bomb_png_1gp.png", REJECT, lambda: _png_declaring(40000, 25000), is_bomb=True),
        CorpusFile("bomb_jpeg_3.6gp.jpg", REJECT, lambda: _jpeg_declaring(60000, 60000), is_bomb=True),
        CorpusFile("bomb_gif_4gp.gif", REJECT, lambda: _gif_declaring(65535, 65535), is_bomb=True),
        CorpusFile("bomb_bmp_400mp.bmp", REJECT, lambda: _bmp_declaring(20000, 20000), is_bomb=True),
        CorpusFile(
            "bomb_real_1bit_64mp.png", REJECT, lambda: _encode(PIL.Image.new("1", (8000, 8000)), "PNG"), is_bomb=True
        ),
        # Odd but valid sizes and modes.
        CorpusFile("1x1.png", ACCEPT, lambda: _encode(_picture(1, 1), "PNG")),
        CorpusFile("2x2.png", ACCEPT, lambda: _encode(_picture(2, 2), "PNG")),
        CorpusFile("9x9.jpg", ACCEPT, lambda: _encode(_picture(9, 9), "JPEG")),
        CorpusFile("3x5000_wide.png", ACCEPT, lambda: _encode(_picture(5000, 3), "PNG")),
        CorpusFile("5000x3_tall.png", ACCEPT, lambda: _encode(_picture(3, 5000), "PNG")),
        CorpusFile("1x10000_wide.png", REJECT, lambda: _encode(_picture(10000, 1), "PNG")),
        CorpusFile("10000x1_tall.png", REJECT, lambda: _encode(_picture(1, 10000), "PNG")),
        CorpusFile("mode_1.png", ACCEPT, lambda: _encode(_mode("1"), "PNG")),
        CorpusFile("mode_L.png", ACCEPT, lambda: _encode(_mode("L"), "PNG")),
        CorpusFile("mode_LA.png", ACCEPT, lambda: _encode(_mode("LA"), "PNG")),
        CorpusFile("mode_P.png", ACCEPT, lambda: _encode(_mode("P"), "PNG")),
        CorpusFile("mode_P_transparent.png", ACCEPT, lambda: _encode(_mode("P"), "PNG", transparency=3)),
        CorpusFile("mode_RGBA.png", ACCEPT, lambda: _encode(_mode("RGBA"), "PNG")),
        CorpusFile("mode_RGBA_invisible.png", ACCEPT, lambda: _encode(PIL.Image.new("RGBA", (30, 20)), "PNG")),
        CorpusFile("mode_CMYK.jpg", ACCEPT, lambda: _encode(_mode("CMYK"), "JPEG")),
        CorpusFile("mode_CMYK.tif", ACCEPT, lambda: _encode(_mode("CMYK"), "TIFF")),
        CorpusFile("mode_LAB.tif", ACCEPT, lambda: _encode(_mode("LAB"), "TIFF")),
        CorpusFile("mode_L.jpg", ACCEPT, lambda: _encode(_mode("L"), "JPEG")),
        CorpusFile(
            "mode_I16.png",
            ACCEPT,
            lambda: _encode(_array_image(np.arange(48 * 64, dtype=np.uint16).reshape(48, 64) * 21), "PNG"),
        ),
        CorpusFile(
            "mode_I32.tif",
            ACCEPT,
            lambda: _encode(_array_image(np.arange(48 * 64, dtype=np.int32).reshape(48, 64) * 1000), "TIFF"),
        ),
        CorpusFile("mode_F_non_finite.tif", ACCEPT, _float_with_non_finite),
        CorpusFile("progressive.jpg", ACCEPT, lambda: _encode(_picture(), "JPEG", progressive=True)),
        # EXIF.
        *[CorpusFile(f"exif_orientation_{k}.jpg", ACCEPT, lambda k=k: _with_orientation(k)) for k in range(1, 9)],
        CorpusFile("exif_orientation_0.jpg", ACCEPT, lambda: _with_orientation(0)),
        CorpusFile("exif_orientation_9.jpg", ACCEPT, lambda: _with_orientation(9)),
        CorpusFile("exif_orientation_6.png", ACCEPT, lambda: _with_orientation(6, "PNG")),
        CorpusFile("exif_orientation_3.webp", ACCEPT, lambda: _with_orientation(3, "WEBP")),
        CorpusFile("exif_garbage.jpg", ACCEPT, lambda: _raw_exif_jpeg(b"Exif\x00\x00" + rng.bytes(64))),
        CorpusFile("exif_orientation_text.jpg", ACCEPT, _exif_orientation_as_text),
        CorpusFile("exif_dangling_offset.jpg", ACCEPT, _exif_dangling_offset),
        # Multi-frame files and other containers.
        CorpusFile("animated.gif", ACCEPT, lambda: _animated("GIF", duration=100, loop=0)),
        CorpusFile("animated.png", ACCEPT, lambda: _animated("PNG", duration=100)),
        CorpusFile("animated.webp", ACCEPT, lambda: _animated("WEBP", duration=100)),
        CorpusFile("multi_page.tif", ACCEPT, _multi_page_tiff),
        CorpusFile("lossy.webp", ACCEPT, lambda: _encode(_picture(), "WEBP", quality=70)),
        CorpusFile("lossless_alpha.webp", ACCEPT, lambda: _encode(_mode("RGBA"), "WEBP", lossless=True)),
        CorpusFile("rgb.bmp", ACCEPT, lambda: _encode(_picture(), "BMP")),
        CorpusFile("one_bit.bmp", ACCEPT, lambda: _encode(_mode("1"), "BMP")),
        CorpusFile("rgb.tga", ACCEPT, lambda: _encode(_picture(), "TGA")),
        CorpusFile("rgb.ppm", ACCEPT, lambda: _encode(_picture(), "PPM")),
        CorpusFile("icon.ico", ACCEPT, lambda: _encode(_picture(32, 32), "ICO", sizes=[(32, 32)])),
        CorpusFile("jpeg_named.png", ACCEPT, lambda: jpeg),
        CorpusFile("png_named.jpg", ACCEPT, lambda: png),
        # Truncations.
        *[
            CorpusFile(f"jpeg_truncated_{int(f * 100)}.jpg", REJECT, lambda f=f: _truncated(jpeg, f))
            for f in (0.1, 0.5)
        ],
        CorpusFile("jpeg_truncated_90.jpg", EITHER, lambda: _truncated(jpeg, 0.9)),
        *[
            CorpusFile(f"png_truncated_{int(f * 100)}.png", REJECT, lambda f=f: _truncated(png, f))
            for f in (0.1, 0.5, 0.9)
        ],
        CorpusFile("gif_truncated.gif", EITHER, lambda: _truncated(_encode(_picture(), "GIF"), 0.5)),
        CorpusFile("webp_truncated.webp", REJECT, lambda: _truncated(_encode(_picture(), "WEBP"), 0.5)),
        CorpusFile("tiff_truncated.tif", EITHER, lambda: _truncated(_encode(_picture(), "TIFF"), 0.5)),
        CorpusFile("bmp_truncated.bmp", REJECT, lambda: _truncated(_encode(_picture(), "BMP"), 0.5)),
        # Not (supported) raster images.
        CorpusFile("vector.svg", REJECT, _svg),
        CorpusFile("vector_named.png", REJECT, _svg),
        CorpusFile("postscript.eps", REJECT, lambda: _encode(_picture(), "EPS")),
        CorpusFile("document.pdf", REJECT, lambda: _encode(_picture(), "PDF")),
        CorpusFile("page.html", REJECT, lambda: b"<!DOCTYPE html><html><body>hi</body></html>"),
        CorpusFile("bitmap.xbm", REJECT, lambda: _encode(_mode("1"), "XBM")),
        CorpusFile("paintbrush.pcx", REJECT, lambda: _encode(_picture(), "PCX")),
        CorpusFile("silicon.sgi", REJECT, lambda: _encode(_picture(), "SGI")),
    ]
    if features.check("jpg_2000"):
        files.append(CorpusFile("jpeg2000.jp2", REJECT, lambda: _encode(_picture(), "JPEG2000")))
    if features.check("avif"):
        files.append(CorpusFile("photo.avif", ACCEPT, lambda: _encode(_picture(), "AVIF")))
    return files


CORPUS = _corpus()
PROCESSORS = {"slow": DeformableDetrImageProcessor, "fast": DeformableDetrImageProcessorFast}
# "load_image" is the pipeline's route: decode for display with load_image, then preprocess that picture.
KINDS = [*PROCESSORS, "load_image"]


@pytest.fixture(scope="module")
def corpus_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("image_corpus")
    for entry in CORPUS:
        data = entry.build()
        if data is not None:
            (directory / entry.name).write_bytes(data)
    (directory / "a_directory.png").mkdir()
    return directory


@pytest.fixture(scope="module")
def processors() -> dict[str, DeformableDetrImageProcessor]:
    made = {name: cls() for name, cls in PROCESSORS.items()}
    for processor in made.values():
        # The first call pays one-off costs (imports, thread pools) that are not what the time limit is about.
        processor(_picture())
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


def test_corpus_is_large_enough():
    assert len(CORPUS) >= 40
    assert len({entry.name for entry in CORPUS}) == len(CORPUS)


@pytest.mark.filterwarnings("ignore:Corrupt EXIF data:UserWarning")
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("entry", CORPUS, ids=[entry.name for entry in CORPUS])
def test_corpus_file_is_processed_or_refused(corpus_dir, processors, entry, kind):
    path = corpus_dir / entry.name
    limit = SECONDS_PER_BOMB if entry.is_bomb else SECONDS_PER_FILE
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
    if entry.expectation != EITHER:
        assert outcome == entry.expectation
    if output is not None:
        pixels = output["pixel_values"]
        assert pixels.ndim == 4 and pixels.shape[:2] == (1, 3) and min(pixels.shape[2:]) >= 1
        assert torch.isfinite(pixels).all()
        assert output["pixel_mask"].shape == (1, *pixels.shape[2:])


def test_bombs_are_refused_with_a_pixel_message(corpus_dir, processors):
    for entry in CORPUS:
        if entry.is_bomb:
            with pytest.raises(ImageInputError, match="pixels"):
                processors["slow"](corpus_dir / entry.name)


def test_refusals_name_the_problem(corpus_dir, processors):
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
            processors["slow"](corpus_dir / name)
        # The file name itself may contain the words; look at the explanation only.
        assert words in str(info.value).replace(name, ""), str(info.value)


def test_lazily_opened_corrupt_pil_images_are_refused(corpus_dir, processors):
    """An ``Image.open`` result is decoded only when used; a corrupt one must still give ``ImageInputError``."""
    checked = 0
    for entry in CORPUS:
        if "truncated" not in entry.name or entry.expectation != REJECT:
            continue
        try:
            image = PIL.Image.open(corpus_dir / entry.name)
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
def test_exif_orientation_is_applied(corpus_dir, processors, orientation):
    path = corpus_dir / f"exif_orientation_{orientation}.jpg"
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
def test_invalid_exif_leaves_the_image_unrotated(corpus_dir, name):
    with PIL.Image.open(corpus_dir / name) as raw:
        assert load_image(corpus_dir / name).size == raw.size


@pytest.mark.parametrize("name", ["animated.gif", "animated.png", "animated.webp", "multi_page.tif"])
def test_first_frame_is_used(corpus_dir, name):
    red, green, blue = np.asarray(load_image(corpus_dir / name)).reshape(-1, 3).mean(axis=0)
    assert red > 200 and green < 50 and blue < 50
