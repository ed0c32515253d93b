"""Serve an exported Deformable DETR with onnxruntime, numpy and Pillow only: no torch, no ddetr.

Export a model first (``python -m ddetr.export --model SRC --output out/model.onnx``); that writes ``model.onnx``
with ``config.json`` (the label map) and ``preprocessor_config.json`` (the image processor settings) beside it, and
copies both JSONs into the file's metadata. Then::

    from onnx_detector import OnnxDetector

    detector = OnnxDetector("out/model.onnx")
    detector("photo.jpg", threshold=0.5)
    # [{"score": 0.97, "label": "cat", "box": {"xmin": 12, "ymin": 40, "xmax": 230, "ymax": 310}}, ...]

or from a shell: ``python examples/onnx_detector.py out/model.onnx photo.jpg --threshold 0.5`` (prints JSON).

This file is the torch-free mirror of ddetr's inference path, step by step:

- loading: ``ddetr.processing.load_image`` (EXIF orientation applied, transparency composited onto white, 16-bit
  gray scaled to 8 bits, everything else through Pillow's ``convert("RGB")``);
- resizing: ``ddetr.processing.resize.get_output_size`` / ``get_size_with_aspect_ratio`` (short side to
  ``shortest_edge`` unless the long side would pass ``longest_edge``; sides truncated with ``int()``), with
  Pillow's resampling filter from the config (bilinear by default). ddetr's pipeline resizes with the *fast*
  processor (``DeformableDetrImageProcessorFast``: torch's antialiased bilinear interpolation), whose pixels are
  within one 8-bit level of Pillow's; Pillow's resize is exactly what the PIL processor
  (``DeformableDetrImageProcessor``) does. The detections agree with ``ddetr.pipeline`` to a pixel;
- normalising: ``ProcessingSettings.scale_and_offset`` (``x * rescale_factor / std - mean / std`` in float32),
  channels first, zero padding with a ``pixel_mask`` (1 = image);
- post-processing: ``ddetr.processing.post_process_object_detection`` and ``ddetr.pipeline.detect_candidates``
  (sigmoid over every (query, class) logit, the top ``top_k`` of the flattened scores, boxes from normalised
  cx, cy, w, h to corners scaled by the *original* image's width and height, clamped to the image), then
  ``ddetr.pipeline.Candidates.detections`` (scores strictly above the threshold, rounded to 4 digits; box sides
  rounded with ``round()``).

A list of images gives a list of results, with one ``session.run`` per image, as ``ddetr.pipeline`` does: padding
images to a common size changes the outputs slightly, so a batch would make each result depend on the others.

Only numpy, Pillow, onnxruntime and the standard library are imported.
"""

import argparse
import io
import json
import os
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import PIL.Image
import PIL.ImageOps

# transformers' (and ddetr's) defaults, used when the export carries no preprocessor config.
DEFAULT_SIZE = {"shortest_edge": 800, "longest_edge": 1333}
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
DEFAULT_MAX_IMAGE_PIXELS = 50_000_000
_EXIF_ORIENTATION_TAG = 0x0112

Detection = dict[str, Any]


class ImageInputError(ValueError):
    """An image could not be used (unreadable, not an image, wrong array shape, too many pixels)."""


@dataclass(frozen=True)
class Preprocessing:
    """The image processor settings of ``preprocessor_config.json`` that inference uses."""

    do_resize: bool = True
    size: Mapping[str, int] | None = None  # one of the size dicts of ``normalize_size``; None: DEFAULT_SIZE
    resample: int = int(PIL.Image.Resampling.BILINEAR)
    do_rescale: bool = True
    rescale_factor: float = 1 / 255
    do_normalize: bool = True
    image_mean: tuple[float, ...] = IMAGENET_MEAN
    image_std: tuple[float, ...] = IMAGENET_STD
    pad_size: tuple[int, int] | None = None  # a fixed (height, width) canvas; None: the resized image itself
    max_image_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> "Preprocessing":
        """Settings from a ``preprocessor_config.json`` dict (transformers' layout or the 2022 feature extractor's)."""
        size = _size_dict(config.get("size"), config.get("max_size"))
        pad_size = config.get("pad_size")
        return cls(
            do_resize=bool(config.get("do_resize", True)),
            size=size,
            resample=int(config.get("resample", PIL.Image.Resampling.BILINEAR)),
            do_rescale=bool(config.get("do_rescale", True)),
            rescale_factor=float(config.get("rescale_factor", 1 / 255)),
            do_normalize=bool(config.get("do_normalize", True)),
            image_mean=_three(config.get("image_mean", IMAGENET_MEAN), "image_mean"),
            image_std=_three(config.get("image_std", IMAGENET_STD), "image_std"),
            pad_size=None if pad_size is None else (int(pad_size["height"]), int(pad_size["width"])),
            max_image_pixels=config.get("max_image_pixels", DEFAULT_MAX_IMAGE_PIXELS),
        )

    def output_size(self, height: int, width: int) -> tuple[int, int]:
        """The resized (height, width): ``ddetr.processing.resize.get_output_size``."""
        if not self.do_resize:
            return height, width
        size = self.size or DEFAULT_SIZE
        if "height" in size:
            output = (int(size["height"]), int(size["width"]))
        elif "max_height" in size:
            scale = min(size["max_height"] / height, size["max_width"] / width)
            output = (int(height * scale), int(width * scale))
        else:
            output = get_size_with_aspect_ratio((height, width), size["shortest_edge"], size.get("longest_edge"))
        if output[0] < 1 or output[1] < 1:
            raise ImageInputError(
                f"image of {height}x{width} (height x width) would be resized to {output[0]}x{output[1]}: its "
                "aspect ratio is too extreme; crop or pad it closer to 1:1 first"
            )
        return output

    def scale_and_offset(self) -> tuple[np.ndarray, np.ndarray]:
        """Per-channel float32 (scale, offset) so that rescaling then normalising is ``x * scale - offset``."""
        scale = np.full(3, self.rescale_factor if self.do_rescale else 1.0, dtype=np.float64)
        offset = np.zeros(3, dtype=np.float64)
        if self.do_normalize:
            mean = np.asarray(self.image_mean, dtype=np.float64)
            std = np.asarray(self.image_std, dtype=np.float64)
            scale, offset = scale / std, mean / std
        return scale.astype(np.float32), offset.astype(np.float32)


def _size_dict(size: Any, max_size: Any) -> dict[str, int]:
    """``ddetr.processing.resize.normalize_size`` for the spellings a saved config can hold."""
    if size is None:
        return {"shortest_edge": 800, "longest_edge": int(max_size or 1333)}
    if isinstance(size, int):  # the 2022 feature extractor: "size": 800, "max_size": 1333
        return {"shortest_edge": size, "longest_edge": int(max_size or 1333)}
    if isinstance(size, Mapping):
        return {key: int(value) for key, value in size.items() if value is not None}
    if isinstance(size, Sequence) and len(size) == 2:
        return {"height": int(size[0]), "width": int(size[1])}
    raise ValueError(f"unsupported preprocessor size {size!r}")


def _three(values: Any, name: str) -> tuple[float, ...]:
    values = [values] if isinstance(values, (int, float)) else list(values)
    if len(values) == 1:
        values = values * 3
    if len(values) != 3:
        raise ValueError(f"{name} must have 1 or 3 values, got {values!r}")
    return tuple(float(v) for v in values)


def get_size_with_aspect_ratio(image_size: tuple[int, int], size: int, max_size: int | None = None) -> tuple[int, int]:
    """Output (height, width) for short side ``size``, long side capped at ``max_size`` (ddetr's/transformers' rule).

    When capped, the short side is the rounded capped value and the long side follows from the unrounded one;
    sides are truncated with ``int()``.
    """
    height, width = image_size
    short, long = min(height, width), max(height, width)
    capped_short: float | None = None
    if max_size is not None and long / short * size > max_size:
        capped_short = max_size * short / long
        size = round(capped_short)
    if short == size:
        return height, width
    scale_from = capped_short if capped_short is not None else size
    if width < height:
        return int(scale_from * height / width), size
    return size, int(scale_from * width / height)


def _check_pixels(width: int, height: int, max_image_pixels: int | None, name: str) -> None:
    if width < 1 or height < 1:
        raise ImageInputError(f"{name} has no pixels: size {height}x{width} (height x width)")
    if max_image_pixels is not None and width * height > max_image_pixels:
        raise ImageInputError(
            f"{name} is {width}x{height} = {width * height / 1e6:.1f} megapixels, above the limit of "
            f"{max_image_pixels / 1e6:g} megapixels; downscale it first"
        )


def _oriented(image: PIL.Image.Image) -> PIL.Image.Image:
    """The image turned as its EXIF orientation says (``ddetr.processing.image_loading.apply_exif_orientation``)."""
    try:
        orientation = image.getexif().get(_EXIF_ORIENTATION_TAG, 1)
        if orientation in (2, 3, 4, 5, 6, 7, 8):
            return PIL.ImageOps.exif_transpose(image)
    except Exception:  # malformed EXIF: a wrongly oriented image beats a rejected one
        pass
    return image


def _to_rgb(image: PIL.Image.Image) -> PIL.Image.Image:
    """8-bit RGB as ``ddetr.processing.image_loading.pil_to_rgb_array`` makes it."""
    if image.mode.startswith("I;16"):
        values = np.asarray(image).astype(np.float32) * np.float32(255.0 / 65535.0)
        return PIL.Image.fromarray(np.clip(np.rint(values), 0, 255).astype(np.uint8)).convert("RGB")
    if "A" in image.getbands() or "a" in image.getbands() or image.info.get("transparency") is not None:
        rgba = image.convert("RGBA")
        background = PIL.Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return PIL.Image.alpha_composite(background, rgba).convert("RGB")
    return image if image.mode == "RGB" else image.convert("RGB")


def load_image(source: Any, max_image_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS) -> PIL.Image.Image:
    """A path, encoded bytes, PIL image or (H, W[, 1|3|4]) uint8 array as an oriented 8-bit RGB PIL image.

    Raises ``ImageInputError`` (a ValueError) for anything that is not a readable image.
    """
    if isinstance(source, np.ndarray):
        array = source[:, :, 0] if source.ndim == 3 and source.shape[2] == 1 else source
        if array.dtype != np.uint8 or not (array.ndim == 2 or (array.ndim == 3 and array.shape[2] in (3, 4))):
            raise ImageInputError(
                f"an image array must be uint8 of shape (H, W), (H, W, 3) or (H, W, 4); got {source.dtype} "
                f"{source.shape}"
            )
        _check_pixels(array.shape[1], array.shape[0], max_image_pixels, "image array")
        return _to_rgb(PIL.Image.fromarray(np.ascontiguousarray(array)))
    if isinstance(source, PIL.Image.Image):
        name, image = "the PIL image", source
    elif isinstance(source, (bytes, bytearray, memoryview)):
        name, image = "image bytes", _open(io.BytesIO(bytes(source)), "image bytes")
    elif isinstance(source, (str, os.PathLike)):
        name = f"image file {os.fspath(source)!r}"
        if not os.path.isfile(source):
            raise ImageInputError(f"{name} does not exist or is not a file")
        with open(source, "rb") as handle:
            image = _open(io.BytesIO(handle.read()), name)
    else:
        raise ImageInputError(f"cannot read an image from {type(source).__name__}; pass a path, PIL image or array")
    _check_pixels(image.width, image.height, max_image_pixels, name)
    try:
        image.load()  # the header is checked first: pixels are decoded only now
        return _to_rgb(_oriented(image))
    except ImageInputError:
        raise
    except Exception as error:
        raise ImageInputError(f"{name} could not be decoded: {type(error).__name__}: {error}") from None


def _open(handle: io.BytesIO, name: str) -> PIL.Image.Image:
    if not handle.getbuffer().nbytes:
        raise ImageInputError(f"{name} is empty (0 bytes)")
    try:
        return PIL.Image.open(handle)
    except PIL.UnidentifiedImageError:
        raise ImageInputError(
            f"{name} is not a recognised image; the data may be corrupt or in another format"
        ) from None
    except Exception as error:  # DecompressionBombError, truncated headers, ...
        raise ImageInputError(f"{name} could not be read as an image: {type(error).__name__}: {error}") from None


def preprocess(
    image: PIL.Image.Image, settings: Preprocessing, canvas: tuple[int, int] | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """``pixel_values`` (1, 3, H, W) float32 and ``pixel_mask`` (1, H, W) int64 for one RGB image.

    ``canvas`` (height, width) pads to a fixed size (a statically shaped export); otherwise ``settings.pad_size``
    or the resized image's own size.
    """
    height, width = settings.output_size(image.height, image.width)
    if (height, width) != (image.height, image.width):
        image = image.resize((width, height), resample=settings.resample)
    canvas = canvas or settings.pad_size or (height, width)
    if height > canvas[0] or width > canvas[1]:
        raise ImageInputError(
            f"the image is {height}x{width} after resizing, larger than the model's {canvas[0]}x{canvas[1]} input; "
            "export the model with a larger static size, or without one"
        )
    scale, offset = settings.scale_and_offset()
    pixels = np.asarray(image, dtype=np.uint8)
    pixel_values = np.zeros((1, 3, *canvas), dtype=np.float32)
    pixel_values[0, :, :height, :width] = pixels.transpose(2, 0, 1) * scale[:, None, None] - offset[:, None, None]
    pixel_mask = np.zeros((1, *canvas), dtype=np.int64)
    pixel_mask[0, :height, :width] = 1
    return pixel_values, pixel_mask


def postprocess(
    logits: np.ndarray,
    pred_boxes: np.ndarray,
    image_size: tuple[int, int],
    id2label: Mapping[int, str],
    threshold: float,
    top_k: int,
) -> list[Detection]:
    """One image's (queries, classes) logits and (queries, 4) cx, cy, w, h boxes as the hub's detections."""
    num_classes = logits.shape[-1]
    with np.errstate(over="ignore"):
        scores = (1.0 / (1.0 + np.exp(-logits.astype(np.float32)))).reshape(-1)
    # The best top_k (query, class) pairs, best first; a stable sort keeps equal scores in index order.
    order = np.argsort(-scores, kind="stable")[: min(top_k, scores.size)]
    height, width = image_size
    cx, cy, w, h = (pred_boxes[order // num_classes].astype(np.float32)).T
    corners = np.stack([cx - 0.5 * w, cy - 0.5 * h, cx + 0.5 * w, cy + 0.5 * h], axis=1)
    limits = np.array([width, height, width, height], dtype=np.float32)
    boxes = np.minimum(np.maximum(corners * limits, 0.0), limits)
    detections = []
    for score, index, box in zip(scores[order], order, boxes):
        if float(score) <= threshold:
            break  # sorted: nothing after this passes either
        label = int(index % num_classes)
        xmin, ymin, xmax, ymax = (round(float(v)) for v in box)
        detections.append(
            {
                "score": round(float(score), 4),
                "label": id2label.get(label, str(label)),
                "box": {"xmin": xmin, "ymin": ymin, "xmax": xmax, "ymax": ymax},
            }
        )
    return detections


def _read_json(path: Path) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise ValueError(f"{path} is not valid JSON: {error}") from None
    if not isinstance(value, dict):
        raise ValueError(f"{path} must hold a JSON object, got {type(value).__name__}")
    return value


class OnnxDetector:
    """An exported Deformable DETR on onnxruntime: ``detector(image, threshold=0.5, top_k=100)`` → detections.

    ``path`` is the ``.onnx`` file; ``config.json`` (``id2label``) and ``preprocessor_config.json`` are read from
    its directory, or from the file's metadata when they are missing (then transformers' default preprocessing,
    and class indices as labels, if the metadata has nothing either). ``threads`` sets onnxruntime's intra-op
    threads (None: its default, one per core).
    """

    def __init__(
        self, path: str | os.PathLike, *, threads: int | None = None, providers: Sequence[str] | None = None
    ) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(
                f"no ONNX model at {str(self.path)!r}; export one with "
                f"`python -m ddetr.export --model SRC --output {self.path}`"
            )
        options = ort.SessionOptions()
        if threads is not None:
            if int(threads) < 1:
                raise ValueError(f"threads must be at least 1, got {threads}")
            options.intra_op_num_threads = int(threads)
        try:
            self.session = ort.InferenceSession(
                str(self.path), options, providers=list(providers or ["CPUExecutionProvider"])
            )
        except Exception as error:  # onnxruntime raises its own types for unreadable or invalid files
            raise ValueError(f"{self.path} could not be loaded as an ONNX model: {error}") from None
        inputs = {node.name: node for node in self.session.get_inputs()}
        if set(inputs) != {"pixel_values", "pixel_mask"}:
            raise ValueError(f"{self.path} has inputs {sorted(inputs)}, not pixel_values and pixel_mask")
        # A statically shaped export (--static-size) needs every image padded to its one size.
        static = inputs["pixel_values"].shape[2:]
        self.canvas = (static[0], static[1]) if all(isinstance(side, int) for side in static) else None

        metadata = self.session.get_modelmeta().custom_metadata_map
        config = _read_json(self.path.with_name("config.json"))
        if config is not None and "id2label" in config:
            id2label = config["id2label"]
        else:
            id2label = json.loads(metadata.get("id2label", "{}"))
        self.id2label = {int(index): str(name) for index, name in id2label.items()}
        processor = _read_json(self.path.with_name("preprocessor_config.json"))
        if processor is None:
            processor = json.loads(metadata.get("preprocessor_config", "{}"))
        self.preprocessing = Preprocessing.from_config(processor)

    def __call__(
        self, images: Any, threshold: float = 0.5, top_k: int = 100
    ) -> list[Detection] | list[list[Detection]]:
        """One image (path, bytes, PIL image, uint8 array) gives its detections, a list of images a list of
        lists (one ``session.run`` per image)."""
        threshold = float(threshold)
        if not 0.0 <= threshold <= 1.0:
            raise ValueError(f"threshold must be in [0, 1], got {threshold}")
        if isinstance(top_k, bool) or int(top_k) != top_k or top_k < 1:
            raise ValueError(f"top_k must be a positive int, got {top_k!r}")
        if isinstance(images, (list, tuple)):
            return [self.detect(image, threshold, int(top_k)) for image in images]
        return self.detect(images, threshold, int(top_k))

    def detect(self, image: Any, threshold: float = 0.5, top_k: int = 100) -> list[Detection]:
        """The detections of one image, best first, boxes in pixels of the (EXIF-oriented) image."""
        picture = load_image(image, self.preprocessing.max_image_pixels)
        pixel_values, pixel_mask = preprocess(picture, self.preprocessing, self.canvas)
        logits, pred_boxes = self.session.run(
            ["logits", "pred_boxes"], {"pixel_values": pixel_values, "pixel_mask": pixel_mask}
        )
        return postprocess(logits[0], pred_boxes[0], (picture.height, picture.width), self.id2label, threshold, top_k)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Detect objects with an ONNX model exported by ddetr (no torch).")
    parser.add_argument("model", help="the .onnx file written by `python -m ddetr.export`")
    parser.add_argument("images", nargs="+", help="image files")
    parser.add_argument("--threshold", type=float, default=0.5, help="keep scores strictly above this (default 0.5)")
    parser.add_argument("--top-k", type=int, default=100, help="at most this many detections per image")
    parser.add_argument("--threads", type=int, default=None, help="onnxruntime intra-op threads")
    args = parser.parse_args(argv)
    try:
        detector = OnnxDetector(args.model, threads=args.threads)
        results = {image: detector(image, threshold=args.threshold, top_k=args.top_k) for image in args.images}
    except (OSError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    output = results[args.images[0]] if len(args.images) == 1 else results
    print(json.dumps(output, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
