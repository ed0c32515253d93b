"""``DeformableDetrImageProcessor``: the PIL + numpy image processor (transformers' "slow"/PIL backend numerics)."""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
import PIL.Image
import torch

from ddetr.processing.batch_feature import BatchFeature
from ddetr.processing.errors import ImageInputError
from ddetr.processing.image_loading import split_batch, to_pixel_array
from ddetr.processing.image_processing_base import DeformableDetrImageProcessorBase, ProcessingSettings
from ddetr.processing.resize import get_output_size


def resize_with_pil(array: np.ndarray, size: tuple[int, int], resample: int) -> np.ndarray:
    """Resize an (H, W, C) array to ``size`` (height, width) with Pillow.

    8-bit images with 1, 3 or 4 channels go through Pillow as 8-bit images, exactly as transformers' PIL backend
    does (its output is rounded to 8 bits, and we want identical pixels). Anything else (16-bit, float, other
    channel counts) is resized channel by channel as 32-bit float images, so no precision is lost.
    """
    height, width = size
    if array.dtype == np.uint8 and array.shape[2] in (1, 3, 4):
        image = PIL.Image.fromarray(np.ascontiguousarray(array[:, :, 0] if array.shape[2] == 1 else array))
        return np.asarray(image.resize((width, height), resample=resample)).reshape(height, width, -1)
    planes = [
        np.asarray(
            PIL.Image.fromarray(np.ascontiguousarray(array[:, :, c], dtype=np.float32)).resize(
                (width, height), resample=resample
            )
        )
        for c in range(array.shape[2])
    ]
    return np.stack(planes, axis=2)


def padded_size(sizes: Sequence[tuple[int, int]], pad_size: dict[str, int] | None) -> tuple[int, int]:
    """The canvas (height, width): ``pad_size`` if fixed (checked to fit every image), else the batch maximum."""
    if pad_size is None:
        return max(s[0] for s in sizes), max(s[1] for s in sizes)
    canvas = (pad_size["height"], pad_size["width"])
    for index, (height, width) in enumerate(sizes):
        if height > canvas[0] or width > canvas[1]:
            raise ImageInputError(
                f"image {index} is {height}x{width} after resizing, larger than pad_size {canvas[0]}x{canvas[1]}; "
                "enlarge pad_size or resize to fit it (e.g. size={'max_height': ..., 'max_width': ...})"
            )
    return canvas


class DeformableDetrImageProcessor(DeformableDetrImageProcessorBase):
    """Prepares images (and COCO annotations) for Deformable DETR with Pillow and numpy.

    Same options and defaults as transformers' Deformable DETR image processor: resize so the short side is 800
    and the long side at most 1333 (bilinear), rescale by 1/255, normalise with the ImageNet mean/std, pad
    bottom/right with 0 to the largest image of the batch and return ``pixel_mask`` (1 = image, 0 = padding).
    ``do_convert_rgb`` defaults to True, so grayscale, palette, CMYK, alpha and 16-bit images all work.
    ``max_image_pixels`` (default 50 MP, ``None`` for no limit) refuses larger images from their header.

    Inputs: a path, encoded bytes, a PIL image of any mode, an (H, W[, C]) or (C, H, W) numpy array or torch
    tensor, or a list of these / a 4-d batch. Every rejected input raises ``ImageInputError``. Files and bytes are
    oriented by their EXIF tag; PIL images are used as given (``load_image`` orients them).
    Label boxes are normalised to the unpadded image (see ``ddetr.processing.annotations``).
    """

    def preprocess(
        self,
        images: Any,
        annotations: Any = None,
        *,
        return_tensors: str | None = "pt",
        do_resize: bool | None = None,
        size: int | Sequence[int] | dict[str, int] | None = None,
        resample: int | PIL.Image.Resampling | None = None,
        do_rescale: bool | None = None,
        rescale_factor: float | None = None,
        do_normalize: bool | None = None,
        image_mean: float | Sequence[float] | None = None,
        image_std: float | Sequence[float] | None = None,
        do_convert_annotations: bool | None = None,
        do_pad: bool | None = None,
        pad_size: dict[str, int] | None = None,
        format: str | None = None,
        do_convert_rgb: bool | None = None,
        max_image_pixels: int | None = None,
    ) -> BatchFeature:
        """``pixel_values`` (B, 3, H, W) float32, ``pixel_mask`` (B, H, W) int64 when padding, and ``labels`` (a
        list of dicts, see ``ddetr.processing.annotations``) when annotations are given.

        Keyword options override the processor's for this call. ``return_tensors``: ``"pt"`` (torch), ``"np"``
        (stacked numpy) or ``None`` (lists of numpy arrays, as transformers).
        """
        overrides = {
            "do_resize": do_resize,
            "size": size,
            "resample": resample,
            "do_rescale": do_rescale,
            "rescale_factor": rescale_factor,
            "do_normalize": do_normalize,
            "image_mean": image_mean,
            "image_std": image_std,
            "do_convert_annotations": do_convert_annotations,
            "do_pad": do_pad,
            "pad_size": pad_size,
            "format": format,
            "do_convert_rgb": do_convert_rgb,
            "max_image_pixels": max_image_pixels,
        }
        return self._run_guarded(self._preprocess, images, annotations, return_tensors, overrides)

    def _preprocess(
        self, images: Any, annotations: Any, return_tensors: str | None, overrides: dict[str, Any]
    ) -> BatchFeature:
        if return_tensors not in ("pt", "np", None):
            raise ValueError(f"return_tensors must be 'pt', 'np' or None, got {return_tensors!r}")
        settings = self._settings(**overrides)
        items = split_batch(images)
        annotation_list = self._annotation_list(annotations, len(items))
        arrays, targets = [], []
        for index, item in enumerate(items):
            try:
                array, original = self._resized_array(item, settings)
            except ImageInputError as error:
                if len(items) == 1:
                    raise
                raise ImageInputError(f"image {index}: {error}") from None
            arrays.append(array)
            if annotation_list is not None:
                targets.append(self._target(annotation_list[index], original, array.shape[:2], settings))

        sizes = [array.shape[:2] for array in arrays]
        channels = {array.shape[2] for array in arrays}
        if len(channels) > 1:
            raise ImageInputError(f"images of one batch must have the same number of channels, got {sorted(channels)}")
        if settings.do_pad:
            canvas = padded_size(sizes, settings.pad_size)
        elif len(set(sizes)) == 1:
            canvas = sizes[0]
        elif return_tensors is not None:
            raise ImageInputError(
                f"images have different sizes after resizing ({sorted(set(sizes))}) and do_pad=False, so they "
                "cannot be stacked; enable do_pad, or use return_tensors=None for a list"
            )
        else:
            canvas = None

        data = BatchFeature()
        if canvas is None:
            data["pixel_values"] = [self._normalised(array, settings) for array in arrays]
        else:
            pixel_values = np.zeros((len(arrays), channels.pop(), *canvas), dtype=np.float32)
            for index, array in enumerate(arrays):
                self._normalised(array, settings, out=pixel_values[index])
            data["pixel_values"] = pixel_values
            if settings.do_pad:
                pixel_mask = np.zeros((len(arrays), *canvas), dtype=np.int64)
                for index, (height, width) in enumerate(sizes):
                    pixel_mask[index, :height, :width] = 1
                data["pixel_mask"] = pixel_mask
        if return_tensors == "pt":
            for key in ("pixel_values", "pixel_mask"):
                if key in data:
                    data[key] = torch.from_numpy(data[key])
        elif return_tensors is None and canvas is not None:
            # transformers returns per-image lists when no tensor type is asked for.
            for key in ("pixel_values", "pixel_mask"):
                if key in data:
                    data[key] = list(data[key])
        if annotation_list is not None:
            data["labels"] = self._label_dicts(targets, return_tensors)
        return data

    @staticmethod
    def _resized_array(item: Any, settings: ProcessingSettings) -> tuple[np.ndarray, tuple[int, int]]:
        array = to_pixel_array(item, convert_rgb=settings.do_convert_rgb, max_image_pixels=settings.max_image_pixels)
        original = (int(array.shape[0]), int(array.shape[1]))
        if settings.do_resize:
            array = resize_with_pil(array, get_output_size(original, settings.size), settings.resample)
        return array, original

    @staticmethod
    def _normalised(array: np.ndarray, settings: ProcessingSettings, out: np.ndarray | None = None) -> np.ndarray:
        """Rescale and normalise (H, W, C) into (C, H, W) float32, written into the top-left of ``out`` if given."""
        height, width, channels = array.shape
        scale, offset = settings.scale_and_offset(channels)
        if out is None:
            out = np.empty((channels, height, width), dtype=np.float32)
        for c in range(channels):
            plane = out[c, :height, :width]
            np.multiply(array[:, :, c], scale[c], out=plane, casting="unsafe")
            plane -= offset[c]
        return out


class DeformableDetrFeatureExtractor(DeformableDetrImageProcessor):
    """Deprecated name of ``DeformableDetrImageProcessor`` (as in transformers 4.x); identical behaviour."""

    def __init__(self, **kwargs: Any) -> None:
        warnings.warn(
            "DeformableDetrFeatureExtractor is deprecated; use DeformableDetrImageProcessor, which behaves the same.",
            FutureWarning,
            stacklevel=2,
        )
        super().__init__(**kwargs)
