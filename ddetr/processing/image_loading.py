"""Turn whatever a user hands us (path, bytes, PIL image, array, tensor) into a 3-channel pixel array, safely.

Hostile or odd files are the norm for a public demo, so decoding is guarded:

- only a whitelist of raster formats is opened (Pillow detects formats by magic bytes, and some plugins, e.g. EPS,
  shell out to Ghostscript);
- the pixel count is checked from the header, before any pixel is decoded, against ``max_image_pixels``;
- every decoder failure (truncated, corrupt, bad CRC, unknown format) becomes ``ImageInputError``;
- EXIF orientation is applied to what we decode (paths, bytes) and by ``load_image``; a malformed EXIF block is
  ignored rather than fatal (``exif_transpose`` has crashed on bad tags in several Pillow releases). A PIL image
  handed straight to a processor is taken as the pixels the caller sees, as transformers does: boxes and sizes
  must match that object, and a tag left on an image the caller already rotated would rotate it twice;
- animated and multi-page files contribute their first frame.

Colour handling matches transformers' ``convert_to_rgb`` (transparency composited onto white, everything else via
Pillow's ``convert("RGB")``) so that pixel values agree with it, except for 16-bit and 32-bit modes, which Pillow
clips at 255: those are scaled into 0..255 as float32 so their range and precision survive.
"""

from __future__ import annotations

import io
import os
from collections.abc import Sequence
from typing import Any, BinaryIO

import numpy as np
import PIL.Image
import PIL.ImageOps
import torch

from ddetr.processing.errors import ImageInputError

DEFAULT_MAX_IMAGE_PIXELS = 50_000_000

# Raster formats with maintained decoders. Everything else (EPS via Ghostscript, PDF, SVG, PSD, exotic scientific
# formats) is refused with a message rather than handed to a rarely exercised plugin.
ALLOWED_IMAGE_FORMATS: tuple[str, ...] = (
    "JPEG",
    "MPO",
    "PNG",
    "GIF",
    "BMP",
    "DIB",
    "TIFF",
    "WEBP",
    "PPM",
    "TGA",
    "ICO",
    "AVIF",
)

_EXIF_ORIENTATION_TAG = 0x0112
_HIGH_DEPTH_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I", "F")

ImageSource = str | os.PathLike | bytes | bytearray | memoryview | PIL.Image.Image | np.ndarray | torch.Tensor


def _describe_non_image(head: bytes) -> str | None:
    """A specific reason for well-known non-raster content, so the user learns what to convert."""
    stripped = head.lstrip()
    if stripped.startswith(b"<svg") or (stripped.startswith(b"<?xml") and b"<svg" in head):
        return "SVG (vector) images are not supported; export it to PNG or JPEG first"
    if stripped.startswith(b"<"):
        return "the data is text/markup (HTML or XML), not an image"
    if head.startswith(b"%!PS") or head.startswith(b"\xc5\xd0\xd3\xc6"):
        return "PostScript/EPS files are not supported; export it to PNG or JPEG first"
    if head.startswith(b"%PDF"):
        return "PDF files are not supported; export the page to PNG or JPEG first"
    return None


def _available_formats() -> list[str]:
    PIL.Image.init()
    return [name for name in ALLOWED_IMAGE_FORMATS if name in PIL.Image.OPEN]


def open_image(source: ImageSource, *, max_image_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS) -> PIL.Image.Image:
    """Decode a path or encoded bytes (or take a PIL image), guarded, with EXIF orientation applied.

    The returned image is fully loaded, detached from any file, in its original mode (``"I;16"`` stays 16-bit).
    Raises ``ImageInputError`` for a missing/empty/unsupported/corrupt file or one above ``max_image_pixels``.
    """
    if isinstance(source, PIL.Image.Image):
        return apply_exif_orientation(_loaded(source, max_image_pixels))
    if isinstance(source, (bytes, bytearray, memoryview)):
        return _decode(io.BytesIO(source), "image bytes", max_image_pixels)
    if isinstance(source, (str, os.PathLike)):
        name = f"image file {os.fspath(source)!r}"
        # Decoding from the open file reads only the header and the first frame, however large the file is.
        with _open_file(source, name) as handle:
            return _decode(handle, name, max_image_pixels)
    raise ImageInputError(f"cannot open an image from {type(source).__name__}; pass a path, bytes or PIL image")


def _loaded(image: PIL.Image.Image, max_image_pixels: int | None) -> PIL.Image.Image:
    """A caller's PIL image, checked and decoded: one from ``Image.open`` may still hold an unread, corrupt file."""
    check_pixel_count(image.width, image.height, max_image_pixels)
    try:
        image.load()
    except Exception as error:
        raise ImageInputError(f"the PIL image could not be decoded: {_decode_failure(error)}") from None
    return image


def _open_file(path: str | os.PathLike, name: str) -> BinaryIO:
    try:
        return open(path, "rb")
    except FileNotFoundError:
        raise ImageInputError(f"{name} does not exist") from None
    except IsADirectoryError:
        raise ImageInputError(f"{name} is a directory, not an image file") from None
    except OSError as error:
        raise ImageInputError(f"{name} could not be read: {error}") from None


def _decode(handle: BinaryIO, name: str, max_image_pixels: int | None) -> PIL.Image.Image:
    try:
        head = handle.read(512)
        handle.seek(0)
    except OSError as error:
        raise ImageInputError(f"{name} could not be read: {error}") from None
    if not head:
        raise ImageInputError(f"{name} is empty (0 bytes)")
    reason = _describe_non_image(head)
    if reason is not None:
        raise ImageInputError(f"{name}: {reason}")
    formats = _available_formats()
    try:
        # Opening parses the header only; Pillow's own bomb check (about 179 MP) may already fire here.
        image = PIL.Image.open(handle, formats=formats)
    except PIL.Image.DecompressionBombError as error:
        raise ImageInputError(f"{name} declares too many pixels to decode safely: {error}") from None
    except PIL.UnidentifiedImageError:
        raise ImageInputError(
            f"{name} is not a recognised image (accepted formats: {', '.join(formats)}); "
            "the data may be corrupt or in another format"
        ) from None
    except Exception as error:
        raise ImageInputError(f"{name} could not be read as an image: {_decode_failure(error)}") from None
    with image:
        check_pixel_count(image.width, image.height, max_image_pixels, name=f"{name} ({image.format})")
        try:
            # Pillow opens multi-frame files on frame 0; loading decodes that frame only.
            image.load()
        except Exception as error:
            raise ImageInputError(f"{name} ({image.format}) could not be decoded: {_decode_failure(error)}") from None
        oriented = apply_exif_orientation(image)
        # Detach from the file so the caller owns a plain in-memory image.
        return oriented.copy() if oriented is image else oriented


def _decode_failure(error: Exception) -> str:
    message = str(error)
    if isinstance(error, MemoryError):
        return "not enough memory to decode it"
    if "truncated" in message.lower() or isinstance(error, EOFError):
        return f"the file is truncated ({message})"
    return f"{type(error).__name__}: {message}"


def check_pixel_count(width: int, height: int, max_image_pixels: int | None, *, name: str = "image") -> None:
    """Raise ``ImageInputError`` for an empty image or one with more than ``max_image_pixels`` pixels."""
    if width < 1 or height < 1:
        raise ImageInputError(f"{name} has no pixels: size {height}x{width} (height x width)")
    if max_image_pixels is not None and width * height > max_image_pixels:
        raise ImageInputError(
            f"{name} is {width}x{height} = {width * height / 1e6:.1f} megapixels, above the limit of "
            f"{max_image_pixels / 1e6:g} megapixels; downscale it, or raise the processor's max_image_pixels"
        )


def apply_exif_orientation(image: PIL.Image.Image) -> PIL.Image.Image:
    """Return the image rotated/flipped as its EXIF orientation says; unchanged if it has none or it is malformed."""
    try:
        orientation = image.getexif().get(_EXIF_ORIENTATION_TAG, 1)
    except Exception:
        return image
    if orientation not in (2, 3, 4, 5, 6, 7, 8):
        return image
    try:
        return PIL.ImageOps.exif_transpose(image)
    except Exception:
        # Pillow versions have raised TypeError/KeyError/ZeroDivisionError on odd EXIF; a wrongly oriented image
        # beats a rejected one.
        return image


def load_image(source: ImageSource, *, max_image_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS) -> PIL.Image.Image:
    """Open any accepted source as an 8-bit RGB PIL image, oriented, e.g. to draw detections on.

    Its ``size`` is the original size that post-processing should scale boxes to. PIL images are oriented by
    their EXIF tag here (the returned copy carries no tag, so it is never rotated twice). Float arrays whose
    values all lie in [0, 1] are read as unit-range colours, other arrays as 0..255.
    """
    try:
        if isinstance(source, (np.ndarray, torch.Tensor)):
            array = array_to_rgb(source)
            check_pixel_count(array.shape[1], array.shape[0], max_image_pixels, name="image array")
            if array.dtype != np.uint8 and float(array.max()) <= 1.0:
                array = array * np.float32(255.0)
        else:
            array = pil_to_rgb_array(open_image(source, max_image_pixels=max_image_pixels))
        if array.dtype != np.uint8:
            array = np.clip(np.rint(array), 0, 255).astype(np.uint8)
        return PIL.Image.fromarray(np.ascontiguousarray(array))
    except ImageInputError:
        raise
    except MemoryError:
        raise ImageInputError("not enough memory to load the image") from None
    except Exception as error:
        # Callers (a web demo) rely on one exception type for every unusable input.
        raise ImageInputError(f"could not load the image: {type(error).__name__}: {error}") from error


def pil_to_rgb_array(image: PIL.Image.Image) -> np.ndarray:
    """(H, W, 3) array of a PIL image of any mode: uint8 for 8-bit modes, float32 in 0..255 for deeper ones."""
    if image.mode in _HIGH_DEPTH_MODES:
        return np.repeat(_high_depth_to_float(image)[:, :, None], 3, axis=2)
    try:
        if "A" in image.getbands() or "a" in image.getbands() or image.info.get("transparency") is not None:
            # Same background as transformers' convert_to_rgb, so transparent pixels give the same values.
            rgba = image.convert("RGBA")
            background = PIL.Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            rgb = PIL.Image.alpha_composite(background, rgba).convert("RGB")
        else:
            rgb = image if image.mode == "RGB" else image.convert("RGB")
    except Exception as error:
        raise ImageInputError(f"cannot convert an image of mode {image.mode!r} to RGB: {error}") from None
    return np.asarray(rgb)


def pil_to_array(image: PIL.Image.Image) -> np.ndarray:
    """The image's samples as an (H, W) or (H, W, C) array with no colour conversion (``do_convert_rgb=False``)."""
    if image.mode in _HIGH_DEPTH_MODES:
        return _high_depth_to_float(image)
    if image.mode == "1":
        return np.asarray(image.convert("L"))
    return np.asarray(image)


def _high_depth_to_float(image: PIL.Image.Image) -> np.ndarray:
    """Map a 16/32-bit integer or float single-channel image into 0..255.

    16-bit modes scale 0..65535 onto 0..255. ``I`` and ``F`` carry no declared range, so the values decide:
    integers within 0..255 are taken as 8-bit (returned as uint8, exactly like an ``L`` image), floats within
    0..1 as unit range, values up to 65535 as 16-bit, anything larger is scaled by its maximum. Non-finite floats
    become 0 so no NaN can reach the model.
    """
    values = np.asarray(image).astype(np.float32)
    values = np.nan_to_num(values, nan=0.0, posinf=0.0, neginf=0.0)
    np.maximum(values, 0.0, out=values)
    peak = float(values.max()) if values.size else 0.0
    if image.mode.startswith("I;16"):
        return values * np.float32(255.0 / 65535.0)
    if peak <= 255.0 and np.array_equal(values, np.floor(values)):
        return values.astype(np.uint8)
    if image.mode == "F" and peak <= 1.0:
        return values * np.float32(255.0)
    if peak <= 65535.0:
        return values * np.float32(255.0 / 65535.0)
    return values * np.float32(255.0 / peak)


def infer_channels_last(shape: Sequence[int]) -> bool:
    """Whether a 3-d image array is (H, W, C) rather than (C, H, W); channel counts 1, 3 and 4 are recognised.

    Like transformers, an ambiguous shape (e.g. (3, 5, 3)) is read as channels-first.
    """
    if len(shape) != 3:
        raise ImageInputError(f"an image array must have 2 or 3 dimensions, got shape {tuple(shape)}")
    if shape[0] in (1, 3, 4):
        return False
    if shape[2] in (1, 3, 4):
        return True
    raise ImageInputError(
        f"cannot find the channel axis of an image array of shape {tuple(shape)}: expected 1, 3 or 4 channels "
        "first (C, H, W) or last (H, W, C)"
    )


def array_to_hwc(array: np.ndarray | torch.Tensor) -> np.ndarray:
    """A numpy (H, W, C) view of a 2-d or 3-d array/tensor in either channel layout, with a numeric dtype.

    Integer samples wider than 8 bits are taken as 16-bit when ``uint16`` and must otherwise lie in 0..255; floats
    are used as given (with ``do_rescale`` and ``rescale_factor`` deciding their scale), so a [0, 1] float image
    needs ``do_rescale=False``, as in transformers.
    """
    if isinstance(array, torch.Tensor):
        array = array.detach().to("cpu")
        if array.dtype in (torch.bfloat16, torch.float16):
            array = array.float()
        array = array.numpy()
    if not isinstance(array, np.ndarray):
        raise ImageInputError(f"expected an image array, got {type(array).__name__}")
    if array.ndim == 2:
        array = array[:, :, None]
    elif array.ndim == 3:
        if not infer_channels_last(array.shape):
            array = np.moveaxis(array, 0, -1)
    else:
        raise ImageInputError(f"an image array must have 2 or 3 dimensions, got shape {array.shape}")
    height, width = array.shape[:2]
    if height < 1 or width < 1:
        raise ImageInputError(f"image array has no pixels: shape {array.shape}")
    if array.dtype == np.bool_:
        return array.astype(np.uint8) * np.uint8(255)
    if array.dtype == np.uint8:
        return array
    if np.issubdtype(array.dtype, np.integer):
        if array.dtype == np.uint16:
            return array.astype(np.float32) * np.float32(255.0 / 65535.0)
        low, high = int(array.min()), int(array.max())
        if low < 0 or high > 255:
            raise ImageInputError(
                f"integer image array of dtype {array.dtype} has values in [{low}, {high}], outside 0..255; "
                "pass uint8 or uint16 data, or floats with a matching rescale_factor"
            )
        return array.astype(np.uint8)
    if np.issubdtype(array.dtype, np.floating):
        array = array.astype(np.float32, copy=False)
        if not np.isfinite(array).all():
            raise ImageInputError("image array contains NaN or infinite values")
        return array
    raise ImageInputError(f"image array has unsupported dtype {array.dtype}")


def array_to_rgb(array: np.ndarray | torch.Tensor) -> np.ndarray:
    """(H, W, 3) RGB of an array: gray is repeated, RGBA composited onto white (as transformers does)."""
    hwc = array_to_hwc(array)
    channels = hwc.shape[2]
    if channels == 3:
        return hwc
    if channels == 1:
        return np.repeat(hwc, 3, axis=2)
    if channels == 4:
        return _composite_on_white(hwc)
    raise ImageInputError(f"cannot convert an image with {channels} channels to RGB")


def _composite_on_white(rgba: np.ndarray) -> np.ndarray:
    if rgba.dtype == np.uint8:
        white = 255.0
    else:
        # Floats in 0..1 are read as unit-range colours; anything larger as 0..255.
        white = 1.0 if float(rgba.max()) <= 1.0 else 255.0
    alpha = rgba[:, :, 3:4].astype(np.float32) / white
    blended = alpha * rgba[:, :, :3] + (1.0 - alpha) * white
    if rgba.dtype == np.uint8:
        return np.round(blended).astype(np.uint8)
    return blended.astype(np.float32)


def to_pixel_array(source: ImageSource, *, convert_rgb: bool, max_image_pixels: int | None) -> np.ndarray:
    """Any accepted input as an (H, W, C) numpy array (uint8, or float32), guarded.

    Decoded files are oriented by their EXIF tag; PIL images and arrays are used as given (see the module doc).
    With ``convert_rgb`` the result always has 3 channels.
    """
    if isinstance(source, (np.ndarray, torch.Tensor)):
        array = array_to_rgb(source) if convert_rgb else array_to_hwc(source)
        check_pixel_count(array.shape[1], array.shape[0], max_image_pixels, name="image array")
        return array
    if isinstance(source, PIL.Image.Image):
        image = _loaded(source, max_image_pixels)
    else:
        image = open_image(source, max_image_pixels=max_image_pixels)
    if convert_rgb:
        return pil_to_rgb_array(image)
    array = pil_to_array(image)
    return array[:, :, None] if array.ndim == 2 else array


def split_batch(images: Any) -> list[Any]:
    """The list of single images in ``images``: one image, a list/tuple of images, or a 4-d batch array/tensor."""
    if isinstance(images, (np.ndarray, torch.Tensor)) and images.ndim == 4:
        return list(images)
    if isinstance(images, (list, tuple)):
        if not images:
            raise ImageInputError("no images were given (empty list)")
        return list(images)
    if images is None:
        raise ImageInputError("no images were given (got None)")
    return [images]
