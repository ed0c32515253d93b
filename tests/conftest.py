"""Fixtures shared by several test modules: the only builders of tiny models, test images and test data sets.

Test modules import nothing from one another (nor from this file): what two modules need in common is a fixture
here. Helpers that tests call with arguments are fixtures that return the function (``perturb_``,
``batch_of_two``, ``tiny_config``, ``transformers_model``, ``write_bad_coco``, ``truncated_png``). Sets that tests
are parametrized over come from ``pytest_generate_tests``: a test taking ``transformers_variant`` runs once per
transformers model variant, one taking ``corpus_entry`` once per file of the malformed-image corpus.
"""

from __future__ import annotations

import contextlib
import functools
import io
import json
import math
import os
import shutil
import struct
import sys
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import PIL.Image
import PIL.ImageDraw
import PIL.ImageFilter
import pytest
import torch
from PIL import features

import ddetr
import finetune.data.prepare as prepare_module

# Kernel choices are measured per machine and cached in $DDETR_CACHE_DIR, which many tests point at a folder of
# their own: a child process could then measure anew and choose differently from its parent, and tests that
# compare runs across processes bit for bit would depend on timing noise. The suite pins them (every process it
# starts inherits this); tests/test_kernel_choice.py clears it and tests the measurement and both choices.
os.environ["DDETR_KERNELS"] = "linear=onednn,conv_layout=channels_last,conv_relu=fused"


@pytest.fixture(scope="module")
def single_thread() -> Iterator[None]:
    """torch on one thread for a module: tiny models gain nothing from a second one, and OpenMP barriers stall
    badly on a shared, busy CPU. Use with ``pytestmark = pytest.mark.usefixtures("single_thread")``."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def isolated_shapes_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """The synthetic dataset generated into the module's own cache, not the user's (``usefixtures`` it)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("DDETR_CACHE_DIR", str(tmp_path_factory.mktemp("cache")))
        yield


@pytest.fixture(scope="session")
def finished_tiny_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished 2-step run of the tiny preset with a final evaluation, as a fine-tuning job leaves it (``model/``
    holds what is pushed to the Hub). Shared: tests read it, never change it."""
    from finetune.config import TrainConfig
    from finetune.run.launch import run_training

    folder = tmp_path_factory.mktemp("finished-run") / "run"
    config = TrainConfig(dataset="shapes:train=4,validation=2,test=0,size=64", model="tiny", output_dir=str(folder),
                         max_steps=2, batch_size=2, image_size=64, log_every=1, progress=False)  # fmt: skip
    previous = torch.get_num_threads()
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("DDETR_CACHE_DIR", str(tmp_path_factory.mktemp("finished-run-cache")))
        torch.set_num_threads(1)
        try:
            assert run_training(config).state == "finished"
        finally:
            torch.set_num_threads(previous)
    return folder


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "transformers_variant" in metafunc.fixturenames:
        metafunc.parametrize("transformers_variant", list(TRANSFORMERS_VARIANTS))
    if "corpus_entry" in metafunc.fixturenames:
        corpus = _image_corpus()
        metafunc.parametrize("corpus_entry", corpus, ids=[entry.name for entry in corpus])


# -- the app's tiny detector and test images -------------------------------------------------------------------- #

TINY_CLASSES = {0: "circle", 1: "square", 2: "triangle"}


@pytest.fixture(scope="session")
def tiny_classes() -> dict[int, str]:
    """The classes of ``tiny_model_dir``'s detector."""
    return dict(TINY_CLASSES)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A saved tiny random detector whose scores spread over (0, 1), deterministic (seed 0).

    A freshly initialised Deformable DETR scores everything near its 1 % class prior, so thresholds would have
    nothing to separate; zeroing the class-head bias and scaling its weights by 8 spreads the scores, giving the
    threshold slider something to do. Shared by the whole session: link or copy it before changing anything.
    """
    directory = tmp_path_factory.mktemp("tiny") / "model"
    with torch.random.fork_rng():
        torch.manual_seed(0)
        config = ddetr.DeformableDetrConfig(
            backbone="resnet18",
            d_model=32,
            encoder_layers=1,
            decoder_layers=1,
            encoder_attention_heads=2,
            decoder_attention_heads=2,
            num_queries=20,
            id2label=dict(TINY_CLASSES),
        )
        model = ddetr.DeformableDetrForObjectDetection(config)
    with torch.no_grad():
        for head in {id(m): m for m in model.class_embed}.values():
            head.bias.zero_()
            head.weight.mul_(8.0)
    model.save_pretrained(directory)
    return directory


@pytest.fixture(scope="session")
def shapes_image(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 320x240 PNG: a red circle, a blue square and a green triangle on a light background."""
    path = tmp_path_factory.mktemp("images") / "shapes.png"
    image = PIL.Image.new("RGB", (320, 240), (235, 235, 230))
    draw = PIL.ImageDraw.Draw(image)
    draw.ellipse((20, 30, 90, 100), fill=(200, 30, 30))
    draw.rectangle((150, 60, 220, 130), fill=(30, 30, 200))
    draw.polygon([(240, 200), (300, 200), (270, 140)], fill=(30, 160, 30))
    image.save(path)
    return path


@pytest.fixture(scope="session")
def truncated_png() -> Callable[[Path], Path]:
    """``truncated_png(path) -> path`` writes a PNG whose header is intact and pixel data cut: it opens but fails
    to decode. A factory, because tests choose the file name (error messages must name the upload)."""
    buffer = io.BytesIO()
    PIL.Image.new("RGB", (64, 48), (10, 200, 30)).save(buffer, format="PNG")
    cut = buffer.getvalue()[:60]

    def write(path: Path) -> Path:
        path.write_bytes(cut)
        return path

    return write


# -- tiny models and inputs for the model tests ----------------------------------------------------------------- #


def _tiny_config(**fields) -> ddetr.DeformableDetrConfig:
    base = dict(
        backbone="resnet18", d_model=64, encoder_layers=1, decoder_layers=3, encoder_attention_heads=4,
        decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64, num_queries=10,
        two_stage_num_proposals=10, num_labels=3, auxiliary_loss=True,
    )  # fmt: skip
    return ddetr.DeformableDetrConfig(**{**base, **fields})


@pytest.fixture(scope="session")
def tiny_config() -> Callable[..., ddetr.DeformableDetrConfig]:
    """``tiny_config(**fields)``: our config for a small detector (resnet18, d_model 64, 1 encoder and 3 decoder
    layers, 4 heads, 10 queries, 3 labels, auxiliary loss), ``fields`` overriding any of it."""
    return _tiny_config


@torch.no_grad()
def _perturb(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    generator = torch.Generator().manual_seed(seed)
    for name, tensor in list(model.named_parameters()) + list(model.named_buffers()):
        if not tensor.is_floating_point():
            continue
        noise = torch.randn(tensor.shape, generator=generator, dtype=tensor.dtype)
        if name.endswith("running_var"):
            tensor.copy_(0.5 + noise.abs())
        elif name.endswith("running_mean"):
            tensor.copy_(0.1 * noise)
        elif tensor.dim() > 1:
            tensor.add_(0.05 * noise)
        else:
            tensor.add_(0.1 * noise)
    return model


@pytest.fixture(scope="session")
def perturb_() -> Callable[..., torch.nn.Module]:
    """``perturb_(model, seed=0) -> model``: make every parameter and buffer distinct and non-trivial, in place,
    so that any mis-loaded tensor changes the outputs."""
    return _perturb


def _batch_of_two(seed: int = 0, sizes=((96, 128), (80, 72))) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    height = max(h for h, _ in sizes)
    width = max(w for _, w in sizes)
    pixel_values = torch.zeros(len(sizes), 3, height, width)
    pixel_mask = torch.zeros(len(sizes), height, width, dtype=torch.long)
    for index, (h, w) in enumerate(sizes):
        pixel_values[index, :, :h, :w] = torch.randn(3, h, w, generator=generator)
        pixel_mask[index, :h, :w] = 1
    return pixel_values, pixel_mask


@pytest.fixture(scope="session")
def batch_of_two() -> Callable[..., tuple[torch.Tensor, torch.Tensor]]:
    """``batch_of_two(seed=0, sizes=((96, 128), (80, 72))) -> (pixel_values, pixel_mask)``: random images of
    those sizes padded bottom/right to one canvas, with their pixel mask."""
    return _batch_of_two


# -- transformers models (the reference oracle) ----------------------------------------------------------------- #

TRANSFORMERS_VARIANTS = {
    "multi-scale": {},
    "single-scale": {"num_feature_levels": 1},
    "box-refine": {"with_box_refine": True},
    "two-stage": {"with_box_refine": True, "two_stage": True},
}
TINY_HF_RESNET = {"embedding_size": 8, "hidden_sizes": [16, 32, 64, 128], "depths": [1, 1, 2, 1]}


def _tiny_transformers_config(variant: str = "multi-scale", layer_type: str = "basic", **overrides):
    from transformers import DeformableDetrConfig, ResNetConfig

    fields = {**TRANSFORMERS_VARIANTS[variant], **overrides}
    levels = fields.get("num_feature_levels", 4)
    backbone = dict(TINY_HF_RESNET, layer_type=layer_type)
    if layer_type == "bottleneck":
        backbone["hidden_sizes"] = [32, 64, 128, 256]
    out_features = ["stage2", "stage3", "stage4"] if levels > 1 else ["stage4"]
    return DeformableDetrConfig(
        backbone_config=ResNetConfig(**backbone, out_features=out_features),
        d_model=64,
        encoder_layers=2,
        decoder_layers=3,
        encoder_attention_heads=4,
        decoder_attention_heads=4,
        encoder_ffn_dim=48,
        decoder_ffn_dim=40,
        num_queries=12,
        two_stage_num_proposals=12,
        encoder_n_points=3,
        decoder_n_points=2,
        num_labels=5,
        auxiliary_loss=True,
        **fields,
    )


def _transformers_model(variant: str = "multi-scale", seed: int = 0, layer_type: str = "basic", **overrides):
    from transformers import DeformableDetrForObjectDetection

    torch.manual_seed(seed)
    model = DeformableDetrForObjectDetection(_tiny_transformers_config(variant, layer_type, **overrides))
    return _perturb(model, seed).eval()


@pytest.fixture(scope="session")
def tiny_transformers_config() -> Callable[..., object]:
    """``tiny_transformers_config(variant="multi-scale", layer_type="basic", **overrides)``: a transformers
    DeformableDetrConfig with a tiny HF-ResNet backbone (timm is not installed in CI). ``variant`` is one of
    those ``transformers_variant`` runs over."""
    pytest.importorskip("transformers")
    return _tiny_transformers_config


@pytest.fixture(scope="session")
def transformers_model() -> Callable[..., torch.nn.Module]:
    """``transformers_model(variant="multi-scale", seed=0, layer_type="basic", **overrides)``: a transformers
    detector of ``tiny_transformers_config``, seeded, perturbed and in eval mode."""
    pytest.importorskip("transformers")
    return _transformers_model


# -- a COCO annotation file with every defect ------------------------------------------------------------------- #


def _coco_object(identifier: int, image_id: int, bbox: list, category: int = 1, **extra: object) -> dict:
    return {"id": identifier, "image_id": image_id, "category_id": category, "bbox": bbox, "iscrowd": 0, **extra}


def _write_bad_coco(folder: Path) -> Path:
    nan, inf = math.nan, math.inf
    width, height = 64, 48
    folder.mkdir(parents=True, exist_ok=True)
    for name in ("ok.png", "empty.png", "mismatch.png", "dup.png"):
        PIL.Image.new("RGB", (width, height), (10, 200, 30)).save(folder / name)
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 20)
    images = [
        {"id": 1, "file_name": "ok.png", "width": width, "height": height},
        {"id": 2, "file_name": "missing.png", "width": width, "height": height},
        {"id": 3, "file_name": "broken.png", "width": width, "height": height},
        {"id": 4, "file_name": "empty.png", "width": width, "height": height},
        {"id": 1, "file_name": "dup.png", "width": width, "height": height},
        {"id": 6, "file_name": "mismatch.png", "width": 100, "height": 100},
    ]
    annotations = [
        _coco_object(1, 1, [4, 4, 20, 20]),  # fine
        _coco_object(2, 1, [10, 10, 0, 5]),  # zero width
        _coco_object(3, 1, [10, 10, 5, -3], category=2),  # negative height
        _coco_object(4, 1, [50, 30, 30, 30]),  # partly outside: clipped
        _coco_object(5, 1, [100, 100, 10, 10]),  # entirely outside: dropped
        _coco_object(6, 1, [nan, 1, 2, 3]),  # NaN
        _coco_object(7, 1, ["a", 1, 2, 3]),  # a string coordinate
        _coco_object(8, 1, [1, 1, inf, 3]),  # inf
        _coco_object(9, 1, [1, 1, 5, 5], category=99),  # unknown category
        _coco_object(1, 1, [30, 5, 10, 10]),  # repeats object id 1
        _coco_object(11, 1, [2, 2, 9, 9], iscrowd=1),  # crowd: ignored, not a problem
        _coco_object(12, 1, [40, 20, 24.3, 10]),  # 0.3 px past the border: rounding, clipped silently
        _coco_object(13, 2, [1, 1, 5, 5]),  # belongs to the missing image
        _coco_object(14, 3, [1, 1, 5, 5]),  # belongs to the undecodable image
        _coco_object(15, 6, [1, 1, 10, 10]),  # on the image whose stored size is wrong (really 64x48)
        _coco_object(16, 999, [1, 1, 5, 5]),  # image 999 does not exist
    ]
    categories = [{"id": 1, "name": "thing"}, {"id": 2, "name": "other"}]
    path = folder / "annotations.json"
    # json writes NaN / Infinity tokens, which is what broken exporters produce.
    path.write_text(json.dumps({"images": images, "annotations": annotations, "categories": categories}))
    return path


@pytest.fixture(scope="session")
def write_bad_coco() -> Callable[[Path], Path]:
    """``write_bad_coco(folder) -> annotations.json``: one COCO file with each defect the validation counts,
    over 64x48 images in ``folder`` (classes "thing" and "other"); tests/test_finetune_validation.py lists the
    expected counts."""
    return _write_bad_coco


# -- a corpus of malformed and odd image files ------------------------------------------------------------------ #
#
# Every file is built from a small synthetic picture; each says whether it must be accepted ("accept"), must be
# refused ("reject"), or may go either way ("either": corrupt data that a decoder may legitimately conceal).

ACCEPT, REJECT, EITHER = "accept", "reject", "either"


@dataclass(frozen=True)
class CorpusFile:
    name: str
    expectation: str  # "accept", "reject" or "either"
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


@functools.cache
def _image_corpus() -> tuple[CorpusFile, ...]:
    return tuple(_corpus())


@pytest.fixture(scope="session")
def image_corpus() -> tuple[CorpusFile, ...]:
    """Every corpus file (the same entries ``corpus_entry`` runs over)."""
    return _image_corpus()


@pytest.fixture(scope="session")
def image_corpus_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A directory holding every corpus file under its name; ``a_directory.png`` is a directory, ``missing.png``
    is absent."""
    directory = tmp_path_factory.mktemp("image_corpus")
    for entry in _image_corpus():
        data = entry.build()
        if data is not None:
            (directory / entry.name).write_bytes(data)
    (directory / "a_directory.png").mkdir()
    return directory


@pytest.fixture
def validations(monkeypatch: pytest.MonkeyPatch) -> list[object]:
    """The split sources validated (every image decoded) while the test runs, one entry per validation."""
    validated: list[object] = []
    original = prepare_module.validate_split

    def counting(source, categories, **settings):
        validated.append(source)
        return original(source, categories, **settings)

    monkeypatch.setattr(prepare_module, "validate_split", counting)
    return validated


# -- moving shapes: video clips and fake-camera files (written with PyAV directly, not with ddetr.video) ------- #


@dataclass(frozen=True)
class MovingShapes:
    """A generated clip: its file, and per frame the true ``(label, (xmin, ymin, xmax, ymax))`` of each shape."""

    path: Path
    fps: int
    width: int
    height: int
    truth: tuple[tuple[tuple[str, tuple[float, float, float, float]], ...], ...]


def _moving_shapes_frames(
    count: int, width: int = 320, height: int = 240
) -> list[tuple[np.ndarray, tuple[tuple[str, tuple[float, float, float, float]], ...]]]:
    """A circle moving right, a square moving left and a bobbing triangle on a blurred-noise background, which
    the bundled shapes model detects (it was trained on textured backgrounds; on flat ones it is unsure)."""
    rng = np.random.default_rng(0)
    # Laid out for 320x240 and scaled with the frame, so every size looks the same to the model.
    scale = width / 320
    noise = rng.normal(128, 40, (round(240 * scale), width, 3)).clip(0, 255).astype(np.uint8)
    background = PIL.Image.fromarray(noise).filter(PIL.ImageFilter.GaussianBlur(2 * scale)).crop((0, 0, width, height))
    frames = []

    def scaled(box: tuple[float, ...]) -> tuple[float, float, float, float]:
        return tuple(round(v * scale) for v in box)  # type: ignore[return-value]

    for t in range(count):
        image = background.copy()
        draw = PIL.ImageDraw.Draw(image)
        circle = scaled((20.0 + 6 * t, 30.0, 90.0 + 6 * t, 100.0))
        square = scaled((220.0 - 4 * t, 140.0, 290.0 - 4 * t, 210.0))
        bob = float(t % 10)
        triangle = scaled((120.0, 120.0 + bob, 190.0, 190.0 + bob))
        draw.ellipse(circle, fill=(230, 30, 30))
        draw.rectangle(square, fill=(30, 60, 230))
        draw.polygon(
            [(triangle[0], triangle[3]), (triangle[2], triangle[3]), ((triangle[0] + triangle[2]) / 2, triangle[1])],
            fill=(250, 220, 30),
        )
        # Pillow's ellipse/rectangle include their end pixel: the true box ends one pixel further.
        truth = (
            ("circle", (circle[0], circle[1], circle[2] + 1, circle[3] + 1)),
            ("square", (square[0], square[1], square[2] + 1, square[3] + 1)),
            ("triangle", (triangle[0], triangle[1], triangle[2] + 1, triangle[3] + 1)),
        )
        frames.append((np.asarray(image), truth))
    return frames


def _write_clip(path: Path, frames: list[np.ndarray], fps: int, codec: str = "libx264") -> Path:
    import av

    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=fps)
        stream.height, stream.width = frames[0].shape[:2]
        stream.pix_fmt = "yuv420p"
        for pixels in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(pixels, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode(None):
            container.mux(packet)
    return path


@pytest.fixture(scope="session")
def moving_shapes_clip(tmp_path_factory: pytest.TempPathFactory) -> MovingShapes:
    """A 30-frame, 15 fps, 320x240 H.264 mp4 of moving shapes, with the true boxes of every frame."""
    frames = _moving_shapes_frames(30)
    path = _write_clip(tmp_path_factory.mktemp("clips") / "moving.mp4", [pixels for pixels, _ in frames], fps=15)
    return MovingShapes(path, 15, 320, 240, tuple(truth for _, truth in frames))


@pytest.fixture(scope="session")
def write_clip() -> Callable[..., Path]:
    """``write_clip(path, frames, fps, codec="libx264") -> path``: frames (height, width, 3) uint8 into a video."""
    return _write_clip


@pytest.fixture(scope="session")
def moving_shapes_y4m(tmp_path_factory: pytest.TempPathFactory) -> MovingShapes:
    """The moving shapes as a 640x480 Y4M file for Chromium's fake camera (it loops the file)."""
    import av

    frames = _moving_shapes_frames(40, width=640, height=480)
    path = tmp_path_factory.mktemp("camera") / "moving.y4m"
    with av.open(str(path), "w", format="yuv4mpegpipe") as container:
        stream = container.add_stream("rawvideo", rate=15)
        stream.width, stream.height = 640, 480
        stream.pix_fmt = "yuv420p"
        for pixels, _ in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(pixels, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode(None):
            container.mux(packet)
    return MovingShapes(path, 15, 640, 480, tuple(truth for _, truth in frames))


@pytest.fixture(scope="session")
def chromium_executable() -> str:
    """Debian's Chromium (``CHROMIUM_PATH`` overrides) for the Playwright tests; they are skipped without one."""
    configured = os.environ.get("CHROMIUM_PATH")
    if configured:
        return configured
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        found = shutil.which(name)
        if found:
            return found
    pytest.skip("no Chromium found (apt-get install -y chromium, or set CHROMIUM_PATH)")


# -- one small detection dataset, written independently in every supported export format ------------------------ #
#
# The writers below follow each format's documentation (not finetune's readers or exporter), so that a reader test
# compares what the reader makes of a file with what the test meant to write.

DETECTION_CLASSES = ("circle", "square", "triangle")
# Layout name -> the format name ``finetune.data.formats.detect`` should report for it.
DETECTION_LAYOUTS = {
    "coco": "coco",
    "coco-roboflow": "coco",
    "yolo-ultralytics": "yolo",
    "yolo-roboflow": "yolo",
    "voc": "voc",
    "voc-roboflow": "voc",
    "label-studio": "label-studio",
    "cvat": "cvat",
    "hf-cppe5": "hf",
    "hf-xyxy": "hf",
}
_ROBOFLOW_FOLDERS = {"train": "train", "validation": "valid", "test": "test"}
_COCO_FOLDERS = {"train": "train", "validation": "val", "test": "test"}
_CVAT_SUBSETS = {"train": "Train", "validation": "Validation", "test": "Test"}


@dataclass(frozen=True)
class SpecImage:
    """One image of the spec: file name, size, PNG bytes and ``(class name, (x, y, w, h))`` objects in pixels."""

    name: str
    width: int
    height: int
    png: bytes
    objects: tuple[tuple[str, tuple[float, float, float, float]], ...]


@dataclass(frozen=True)
class DetectionSpec:
    """Three splits of small PNGs with float boxes of three classes, one background image (in test), and
    ``write(layout, folder)`` to write them in one of ``DETECTION_LAYOUTS``."""

    classes: tuple[str, ...]
    splits: dict[str, tuple[SpecImage, ...]]

    def write(self, layout: str, folder: Path) -> Path:
        folder.mkdir(parents=True, exist_ok=True)
        _DETECTION_WRITERS[layout](self, folder)
        return folder


def _spec_image(name: str, width: int, height: int, seed: int, objects) -> SpecImage:
    rng = np.random.default_rng(seed)
    noise = rng.normal(128, 40, (height, width, 3)).clip(0, 255).astype(np.uint8)
    image = PIL.Image.fromarray(noise).filter(PIL.ImageFilter.GaussianBlur(1.5))
    draw = PIL.ImageDraw.Draw(image)
    for label, (x, y, w, h) in objects:
        colour = tuple(int(c) for c in rng.integers(0, 255, 3))
        if label == "circle":
            draw.ellipse((x, y, x + w, y + h), fill=colour)
        elif label == "square":
            draw.rectangle((x, y, x + w, y + h), fill=colour)
        else:
            draw.polygon([(x, y + h), (x + w, y + h), (x + w / 2, y)], fill=colour)
    return SpecImage(name, width, height, _encode(image, "PNG"), tuple(objects))


@functools.cache
def _detection_spec() -> DetectionSpec:
    # Coordinates with two decimals (not exact in binary), never on the border, never 0.
    splits = {
        "train": (
            _spec_image(
                "a_train.png",
                160,
                120,
                1,
                [("circle", (12.37, 20.5, 40.25, 38.11)), ("square", (80.5, 30.25, 50.0, 44.75))],
            ),
            _spec_image("b_train.png", 144, 128, 2, [("triangle", (30.13, 40.87, 60.5, 50.25))]),
            _spec_image(
                "c_train.png",
                176,
                112,
                3,
                [
                    ("square", (5.5, 6.25, 30.75, 28.5)),
                    ("circle", (100.31, 50.69, 44.44, 40.4)),
                    ("triangle", (60.2, 10.1, 30.3, 35.35)),
                ],
            ),
        ),
        "validation": (
            _spec_image("d_val.png", 128, 96, 4, [("circle", (20.2, 15.15, 50.5, 48.48))]),
            _spec_image(
                "e_val.png", 150, 110, 5, [("triangle", (70.7, 30.3, 60.6, 55.5)), ("square", (10.1, 10.1, 40.4, 40.4))]
            ),
        ),
        "test": (
            _spec_image(
                "f_test.png",
                160,
                128,
                6,
                [("square", (15.75, 25.25, 55.5, 50.125)), ("circle", (90.9, 40.4, 50.05, 52.52))],
            ),
            _spec_image("g_test.png", 136, 104, 7, [("triangle", (40.4, 20.2, 64.64, 60.06))]),
            _spec_image("h_test_background.png", 120, 90, 8, []),
        ),
    }
    return DetectionSpec(classes=DETECTION_CLASSES, splits=splits)


@pytest.fixture(scope="session")
def detection_spec() -> DetectionSpec:
    """The spec dataset (see ``DetectionSpec``); ``detection_spec.write(layout, folder)`` writes one layout."""
    return _detection_spec()


@pytest.fixture(scope="session")
def detection_layouts() -> dict[str, str]:
    """Layout name -> the format name it should be detected as."""
    return dict(DETECTION_LAYOUTS)


def _put(path: Path, data: bytes | str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(data, bytes):
        path.write_bytes(data)
    else:
        path.write_text(data, encoding="utf-8")


def _coco_document(spec: DetectionSpec, images: tuple[SpecImage, ...], first_id: int, categories: list[dict]) -> dict:
    ids = {category["name"]: category["id"] for category in categories}
    entries, annotations = [], []
    for offset, image in enumerate(images):
        image_id = first_id + offset
        entries.append({"id": image_id, "file_name": image.name, "width": image.width, "height": image.height})
        for label, (x, y, w, h) in image.objects:
            identifier = len(annotations) + 1 + first_id * 100
            annotations.append({"id": identifier, "image_id": image_id, "category_id": ids[label],
                                "bbox": [x, y, w, h], "area": w * h, "iscrowd": 0})  # fmt: skip
    return {"images": entries, "annotations": annotations, "categories": categories}


def _write_coco(spec: DetectionSpec, root: Path) -> None:
    categories = [{"id": index + 1, "name": name, "supercategory": "shape"} for index, name in enumerate(spec.classes)]
    for number, (split, images) in enumerate(spec.splits.items()):
        folder = _COCO_FOLDERS[split]
        for image in images:
            _put(root / folder / image.name, image.png)
        document = _coco_document(spec, images, 1 + 10 * number, categories)
        _put(root / "annotations" / f"instances_{folder}.json", json.dumps(document))


def _write_coco_roboflow(spec: DetectionSpec, root: Path) -> None:
    # Roboflow's placeholder category 0, named after the project and unused, parent of the real ones.
    categories = [{"id": 0, "name": "shapes-abc", "supercategory": "none"}]
    categories += [{"id": i + 1, "name": name, "supercategory": "shapes-abc"} for i, name in enumerate(spec.classes)]
    for number, (split, images) in enumerate(spec.splits.items()):
        folder = root / _ROBOFLOW_FOLDERS[split]
        for image in images:
            _put(folder / image.name, image.png)
        _put(folder / "_annotations.coco.json", json.dumps(_coco_document(spec, images, 10 * number, categories)))


def _yolo_lines(spec: DetectionSpec, image: SpecImage) -> str:
    lines = []
    for label, (x, y, w, h) in image.objects:
        cx, cy = (x + w / 2) / image.width, (y + h / 2) / image.height
        lines.append(f"{spec.classes.index(label)} {cx!r} {cy!r} {w / image.width!r} {h / image.height!r}")
    return "\n".join(lines) + "\n"


def _write_yolo(spec: DetectionSpec, root: Path, *, roboflow: bool) -> None:
    for split, images in spec.splits.items():
        for image in images:
            stem = Path(image.name).stem
            if roboflow:
                folder = _ROBOFLOW_FOLDERS[split]
                image_path, label_path = f"{folder}/images/{image.name}", f"{folder}/labels/{stem}.txt"
            else:
                folder = _COCO_FOLDERS[split]
                image_path, label_path = f"images/{folder}/{image.name}", f"labels/{folder}/{stem}.txt"
            _put(root / image_path, image.png)
            if image.objects:  # a background image has no label file
                _put(root / label_path, _yolo_lines(spec, image))
    if roboflow:
        names = "{" + ", ".join(f"{i}: {name}" for i, name in enumerate(spec.classes)) + "}"
        text = f"train: ../train/images\nval: ../valid/images\ntest: ../test/images\n\nnc: {len(spec.classes)}\n"
        text += f"names: {names}\n"
    else:
        text = "path: .\ntrain: images/train\nval: images/val\ntest: images/test\nnames:\n"
        text += "".join(f"  - {name}\n" for name in spec.classes)
    _put(root / "data.yaml", text)


def _voc_xml(image: SpecImage, folder: str) -> str:
    objects = "".join(
        f"<object><name>{label}</name><pose>Unspecified</pose><truncated>0</truncated><difficult>0</difficult>"
        f"<bndbox><xmin>{x!r}</xmin><ymin>{y!r}</ymin><xmax>{x + w!r}</xmax><ymax>{y + h!r}</ymax></bndbox></object>"
        for label, (x, y, w, h) in image.objects
    )
    return (
        f"<?xml version='1.0' encoding='utf-8'?>\n<annotation><folder>{folder}</folder>"
        f"<filename>{image.name}</filename>"
        f"<size><width>{image.width}</width><height>{image.height}</height><depth>3</depth></size>"
        f"<segmented>0</segmented>{objects}</annotation>\n"
    )


def _write_voc(spec: DetectionSpec, root: Path) -> None:
    for split, images in spec.splits.items():
        for image in images:
            _put(root / "JPEGImages" / image.name, image.png)
            _put(root / "Annotations" / f"{Path(image.name).stem}.xml", _voc_xml(image, "JPEGImages"))
        ids = "".join(f"{Path(image.name).stem}\n" for image in images)
        _put(root / "ImageSets" / "Main" / f"{_COCO_FOLDERS[split]}.txt", ids)


def _write_voc_roboflow(spec: DetectionSpec, root: Path) -> None:
    for split, images in spec.splits.items():
        folder = _ROBOFLOW_FOLDERS[split]
        for image in images:
            _put(root / folder / image.name, image.png)
            _put(root / folder / f"{Path(image.name).stem}.xml", _voc_xml(image, folder))


def _write_label_studio(spec: DetectionSpec, root: Path) -> None:
    task_id = 1
    for split, images in spec.splits.items():
        tasks = []
        for image in images:
            _put(root / "images" / image.name, image.png)
            results = [
                {"id": f"r{task_id}-{n}", "type": "rectanglelabels", "from_name": "label", "to_name": "image",
                 "original_width": image.width, "original_height": image.height, "image_rotation": 0,
                 "value": {"x": x / image.width * 100, "y": y / image.height * 100, "width": w / image.width * 100,
                           "height": h / image.height * 100, "rotation": 0, "rectanglelabels": [label]}}
                for n, (label, (x, y, w, h)) in enumerate(image.objects)
            ]  # fmt: skip
            tasks.append({"id": task_id, "data": {"image": f"/data/upload/1/{image.name}"},
                          "annotations": [{"id": task_id, "result": results, "was_cancelled": False}],
                          "predictions": []})  # fmt: skip
            task_id += 1
        _put(root / f"{_ROBOFLOW_FOLDERS[split]}.json", json.dumps(tasks, indent=1))


def _write_cvat(spec: DetectionSpec, root: Path) -> None:
    labels = "".join(f"<label><name>{name}</name><color>#ff0000</color><type>rectangle</type><attributes/></label>"
                     for name in spec.classes)  # fmt: skip
    parts = [f"<?xml version='1.0' encoding='utf-8'?>\n<annotations><version>1.1</version><meta><task><id>7</id>"
             f"<name>shapes</name><labels>{labels}</labels></task></meta>"]  # fmt: skip
    image_id = 0
    for split, images in spec.splits.items():
        subset = _CVAT_SUBSETS[split]
        for image in images:
            _put(root / "images" / subset / image.name, image.png)
            boxes = "".join(
                f'<box label="{label}" source="manual" occluded="0" xtl="{x!r}" ytl="{y!r}" xbr="{x + w!r}" '
                f'ybr="{y + h!r}" z_order="0"></box>'
                for label, (x, y, w, h) in image.objects
            )
            parts.append(f'<image id="{image_id}" name="{image.name}" subset="{subset}" width="{image.width}" '
                         f'height="{image.height}">{boxes}</image>')  # fmt: skip
            image_id += 1
    parts.append("</annotations>\n")
    _put(root / "annotations.xml", "\n".join(parts))


def _write_hf(spec: DetectionSpec, root: Path, *, xyxy: bool) -> None:
    import datasets

    label = datasets.ClassLabel(names=list(spec.classes))
    box = datasets.List(datasets.List(datasets.Value("float32"), length=4))
    if xyxy:
        objects = {"boxes": box, "labels": datasets.List(label)}
        features = datasets.Features({"image": datasets.Image(), "objects": objects})
    else:
        objects = {"id": datasets.List(datasets.Value("int64")), "area": datasets.List(datasets.Value("float32")),
                   "bbox": box, "category": datasets.List(label)}  # fmt: skip
        features = datasets.Features({"image": datasets.Image(), "image_id": datasets.Value("int64"),
                                      "width": datasets.Value("int32"), "height": datasets.Value("int32"),
                                      "objects": objects})  # fmt: skip
    splits = {}
    object_id = 1
    for split, images in spec.splits.items():
        rows: dict[str, list] = {name: [] for name in features}
        for number, image in enumerate(images):
            rows["image"].append({"bytes": image.png, "path": None})
            classes = [spec.classes.index(name) for name, _ in image.objects]
            if xyxy:
                rows["objects"].append({"boxes": [[x, y, x + w, y + h] for _, (x, y, w, h) in image.objects],
                                        "labels": classes})  # fmt: skip
                continue
            rows["image_id"].append(number)
            rows["width"].append(image.width)
            rows["height"].append(image.height)
            rows["objects"].append({"id": list(range(object_id, object_id + len(classes))),
                                    "area": [w * h for _, (_, _, w, h) in image.objects],
                                    "bbox": [list(b) for _, b in image.objects], "category": classes})  # fmt: skip
            object_id += len(classes)
        splits[split] = datasets.Dataset.from_dict(rows, features=features)
    datasets.DatasetDict(splits).save_to_disk(str(root))


_DETECTION_WRITERS: dict[str, Callable[[DetectionSpec, Path], None]] = {
    "coco": _write_coco,
    "coco-roboflow": _write_coco_roboflow,
    "yolo-ultralytics": functools.partial(_write_yolo, roboflow=False),
    "yolo-roboflow": functools.partial(_write_yolo, roboflow=True),
    "voc": _write_voc,
    "voc-roboflow": _write_voc_roboflow,
    "label-studio": _write_label_studio,
    "cvat": _write_cvat,
    "hf-cppe5": functools.partial(_write_hf, xyxy=False),
    "hf-xyxy": functools.partial(_write_hf, xyxy=True),
}


# -- a local stand-in of the Hub's HTTP API (repo creation, pre-upload, commits), on 127.0.0.1 ------------------ #


def _blob_id(data: bytes) -> str:
    """Git's id of a file's content: the Hub's ETag and tree ``oid`` of a file stored without LFS. (Not its length:
    two files of one size would share a blob in the download cache.)"""
    import hashlib

    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


class HubStandIn:
    """Answers the calls ``HfApi.create_repo`` / ``create_commit`` make; every file is uploaded inline ("regular").
    Committed files can be downloaded again (``hf_hub_download``: HEAD and GET of ``/{repo}/resolve/{rev}/{path}``;
    ``model_info`` / ``snapshot_download``: GET of ``/api/models/{repo}/revision/{rev}`` and ``.../tree/{rev}``), with
    the token unless the repo was created public. Like the Hub, a repo one may not read is "not found" (404,
    ``X-Error-Code: RepoNotFound``), whether it is missing or private; every commit is ``"a" * 40``."""

    def __init__(self, token: str) -> None:
        import http.server
        import threading

        self.token = token
        self.repos: dict[str, dict] = {}
        self.commits: list[tuple[str, list[dict]]] = []
        self.requests: list[tuple[str, str, str]] = []  # method, path, authorization header
        self.stored: dict[str, dict[str, bytes]] = {}  # "datasets/owner/name" or "owner/name" (a model) -> files
        hub = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                pass

            def _send(self, code: int, payload: object) -> None:
                body = json.dumps(payload).encode()
                self.send_response(code)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(body)))
                self.end_headers()
                if self.command != "HEAD":  # a HEAD answer has headers only
                    self.wfile.write(body)

            def _readable(self, repo: str) -> dict[str, bytes] | None:
                """The repo's files when this request may read them (the token, or a public repo), else None."""
                public = hub.repos.get(repo, {}).get("visibility") == "public"
                if self.headers.get("authorization") != f"Bearer {hub.token}" and not public:
                    return None
                return hub.stored.get(repo)

            def _repo_api(self) -> None:
                """``/api/models/{repo}[/revision/{rev}]`` (model_info) and ``/api/models/{repo}/tree/{rev}``."""
                path = self.path.partition("?")[0].removeprefix("/api/models/")
                tree = "/tree/" in path
                repo = path.partition("/tree/" if tree else "/revision/")[0]
                files = self._readable(repo)
                if files is None:
                    self.send_response(404)
                    self.send_header("x-error-code", "RepoNotFound")
                    self.send_header("content-length", "0")
                    return self.end_headers()
                if not tree:
                    siblings = [{"rfilename": name, "size": len(data)} for name, data in sorted(files.items())]
                    private = hub.repos.get(repo, {}).get("visibility") != "public"
                    return self._send(200, {"id": repo, "sha": "a" * 40, "private": private, "siblings": siblings})
                tree = [{"type": "file", "path": name, "size": len(data), "oid": _blob_id(data)}
                        for name, data in sorted(files.items())]  # fmt: skip
                return self._send(200, tree)

            def _resolve(self, method: str) -> None:
                hub.requests.append((method, self.path, self.headers.get("authorization", "")))
                if self.path.startswith("/api/models/"):
                    return self._repo_api()
                repo, _, rest = self.path.partition("/resolve/")
                content = (self._readable(repo.strip("/")) or {}).get(rest.partition("/")[2])
                if content is None:
                    return self._send(404, {"error": "not found"})
                self.send_response(200)
                for name, value in (("x-repo-commit", "a" * 40), ("etag", f'"{_blob_id(content)}"'),
                                    ("content-length", str(len(content)))):  # fmt: skip
                    self.send_header(name, value)
                self.end_headers()
                if method == "GET":
                    self.wfile.write(content)

            def do_HEAD(self) -> None:
                self._resolve("HEAD")

            def do_GET(self) -> None:
                self._resolve("GET")

            def do_POST(self) -> None:
                data = self.rfile.read(int(self.headers.get("content-length", 0)))
                hub.requests.append(("POST", self.path, self.headers.get("authorization", "")))
                if self.headers.get("authorization") != f"Bearer {hub.token}":
                    return self._send(401, {"error": "Invalid credentials in Authorization header"})
                if self.path == "/api/repos/create":
                    body = json.loads(data)
                    name = f"{body.get('organization') or 'tester'}/{body['name']}"
                    hub.repos[name] = body
                    prefix = {"dataset": "datasets/", "space": "spaces/"}.get(body.get("type") or "model", "")
                    return self._send(200, {"url": f"{hub.url}/{prefix}{name}", "name": name})
                if self.path == "/api/validate-yaml":  # huggingface_hub checks a README's front matter first
                    return self._send(200, {"errors": [], "warnings": []})
                if "/preupload/" in self.path:
                    files = json.loads(data)["files"]
                    modes = [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False} for f in files]
                    return self._send(200, {"files": modes})
                if "/commit/" in self.path:
                    lines = [json.loads(line) for line in data.decode().splitlines() if line.strip()]
                    hub.commits.append((self.path, lines))
                    kind, _, repo = self.path.removeprefix("/api/").split("/commit/")[0].partition("/")
                    prefix = "" if kind == "models" else f"{kind}/"
                    hub.stored.setdefault(prefix + repo, {}).update(hub.files())
                    url = f"{hub.url}/{prefix}{repo}/commit/{'a' * 40}"
                    return self._send(200, {"commitUrl": url, "commitOid": "a" * 40, "success": True})
                return self._send(404, {"error": "unknown endpoint"})

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"

    def files(self, commit: int = -1) -> dict[str, bytes]:
        """Path -> content of a commit's files."""
        import base64

        _, lines = self.commits[commit]
        return {
            line["value"]["path"]: base64.b64decode(line["value"]["content"]) for line in lines if line["key"] == "file"
        }

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def hub_standin(monkeypatch: pytest.MonkeyPatch) -> Iterator[HubStandIn]:
    """A stand-in Hub on 127.0.0.1 accepting the token ``hf_standin_write_token``; HF_ENDPOINT points at it."""
    hub = HubStandIn("hf_standin_write_token")
    monkeypatch.setenv("HF_ENDPOINT", hub.url)
    monkeypatch.setenv("HF_HUB_DISABLE_XET", "1")
    yield hub
    hub.close()


@contextlib.contextmanager
def _launched_app(config: object) -> Iterator[tuple[object, str]]:
    from app import launch  # here, not at the top: most test modules never start the app (gradio is slow to load)

    patcher = pytest.MonkeyPatch()
    patcher.setenv("HF_HUB_OFFLINE", "1")  # hermetic: the model list must not depend on the network
    try:
        launched = launch(config, host="127.0.0.1", block=False)  # type: ignore[arg-type]
        try:
            yield launched.demo, launched.url
        finally:
            launched.close(grace=30)
    finally:
        patcher.undo()


@pytest.fixture(scope="session")
def launched_app() -> Callable[[object], contextlib.AbstractContextManager[tuple[object, str]]]:
    """``with launched_app(AppConfig(...)) as (demo, url):`` the app served on 127.0.0.1, offline, closed after."""
    return _launched_app


# -- what a test opens (audit hooks) ------------------------------------------------------------------------------ #

# An audit hook cannot be removed: one is installed once per session and records only while a test asks for it.
_OPENED = None  # the recording list while a test runs, else None


def _record_open(event: str, arguments: tuple[object, ...]) -> None:
    recording = _OPENED
    if event == "open" and recording is not None and arguments and isinstance(arguments[0], (str, bytes, os.PathLike)):
        recording.append(os.path.abspath(os.fsdecode(arguments[0])))


class OpenedPaths(list):
    """Every path opened (``open`` audit events: builtins.open, os.open, io.open, PIL) while the test runs."""

    def within(self, folder: Path) -> list[str]:
        top = os.path.abspath(folder)
        return [path for path in self if os.path.commonpath([path, top]) == top]


_HOOK_INSTALLED = [False]


@pytest.fixture
def opened() -> Iterator[OpenedPaths]:
    """The paths opened while the test runs; ``opened.clear()`` once the test has written its own files, then
    ``opened.within(folder)`` lists those read from ``folder``."""
    global _OPENED
    if not _HOOK_INSTALLED[0]:
        sys.addaudithook(_record_open)
        _HOOK_INSTALLED[0] = True
    recording = OpenedPaths()
    _OPENED = recording
    try:
        yield recording
    finally:
        _OPENED = None
