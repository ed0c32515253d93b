"""``DeformableDetrImageProcessorFast``: the same processor on torch tensors, batched, on any device."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from typing import Any

import numpy as np
import PIL.Image
import torch
import torch.nn.functional as F

from ddetr.processing.batch_feature import BatchFeature
from ddetr.processing.errors import ImageInputError
from ddetr.processing.image_loading import check_pixel_count, infer_channels_last, split_batch, to_pixel_array
from ddetr.processing.image_processing_base import DeformableDetrImageProcessorBase, ProcessingSettings
from ddetr.processing.image_processor import padded_size
from ddetr.processing.resize import get_output_size

# Pillow filters with a torch equivalent. "nearest-exact" is the one that picks the same pixels as Pillow.
_TORCH_MODES = {
    int(PIL.Image.Resampling.NEAREST): "nearest-exact",
    int(PIL.Image.Resampling.BILINEAR): "bilinear",
    int(PIL.Image.Resampling.BICUBIC): "bicubic",
}


def _torch_mode(resample: int) -> str:
    if resample not in _TORCH_MODES:
        name = PIL.Image.Resampling(resample).name
        raise ValueError(
            f"resample={name} has no torch equivalent; the fast processor supports NEAREST, BILINEAR and BICUBIC "
            "(use DeformableDetrImageProcessor for the others)"
        )
    return _TORCH_MODES[resample]


def resize_batch(
    images: torch.Tensor, size: tuple[int, int], resample: int, *, native_uint8: bool | None = None
) -> torch.Tensor:
    """Resize (B, C, H, W) to ``size`` with Pillow-like antialiasing; uint8 input gives uint8-valued output.

    On CPU (``native_uint8`` defaults to that), uint8 is resized natively: torch's uint8 kernels reproduce Pillow
    to within 1 level. Elsewhere uint8 is resized in float and rounded back to whole levels, as torchvision does,
    so both paths see 8-bit inputs.
    """
    mode = _torch_mode(resample)
    options: dict[str, Any] = {} if mode == "nearest-exact" else {"antialias": True, "align_corners": False}
    if tuple(images.shape[-2:]) == tuple(size):
        return images
    if images.dtype == torch.uint8:
        if native_uint8 if native_uint8 is not None else images.device.type == "cpu":
            return F.interpolate(images.contiguous(memory_format=torch.channels_last), size=size, mode=mode, **options)
        resized = F.interpolate(images.float(), size=size, mode=mode, **options)
        return resized.round_().clamp_(0, 255)
    return F.interpolate(images, size=size, mode=mode, **options)


def tensor_to_chw(tensor: torch.Tensor, *, convert_rgb: bool, max_image_pixels: int | None) -> torch.Tensor:
    """A (C, H, W) uint8 or float32 tensor on the input's device, with the same rules as arrays on the PIL path."""
    tensor = tensor.detach()
    if tensor.ndim == 2:
        tensor = tensor[None]
    elif tensor.ndim == 3:
        if infer_channels_last(tuple(tensor.shape)):
            tensor = tensor.permute(2, 0, 1)
    else:
        raise ImageInputError(f"an image tensor must have 2 or 3 dimensions, got shape {tuple(tensor.shape)}")
    check_pixel_count(tensor.shape[2], tensor.shape[1], max_image_pixels, name="image tensor")
    if tensor.dtype == torch.bool:
        tensor = tensor.to(torch.uint8) * 255
    elif tensor.dtype == torch.uint16:
        tensor = tensor.to(torch.float32) * (255.0 / 65535.0)
    elif tensor.is_floating_point():
        tensor = tensor.to(torch.float32)
        if not torch.isfinite(tensor).all():
            raise ImageInputError("image tensor contains NaN or infinite values")
    elif tensor.dtype != torch.uint8:
        low, high = int(tensor.min()), int(tensor.max())
        if low < 0 or high > 255:
            raise ImageInputError(
                f"integer image tensor of dtype {tensor.dtype} has values in [{low}, {high}], outside 0..255"
            )
        tensor = tensor.to(torch.uint8)
    if convert_rgb:
        if tensor.shape[0] == 1:
            tensor = tensor.expand(3, -1, -1)
        elif tensor.shape[0] == 4:
            tensor = _composite_on_white(tensor)
    return tensor


def _composite_on_white(rgba: torch.Tensor) -> torch.Tensor:
    is_byte = rgba.dtype == torch.uint8
    white = 255.0 if is_byte or float(rgba.max()) > 1.0 else 1.0
    values = rgba.to(torch.float32)
    alpha = values[3:4] / white
    blended = alpha * values[:3] + (1.0 - alpha) * white
    return blended.round().to(torch.uint8) if is_byte else blended


class DeformableDetrImageProcessorFast(DeformableDetrImageProcessorBase):
    """Same options, inputs and outputs as ``DeformableDetrImageProcessor``, computed with torch.

    Decoding and colour conversion are shared with the PIL processor; resizing (antialiased interpolation),
    normalisation and padding run on ``device`` (the input tensors' device by default), with equally sized images
    resized as one batch. Pixels differ from the PIL processor by at most one 8-bit level before normalisation
    (about 0.017 after), with a mean difference around 1e-5.
    """

    def preprocess(
        self,
        images: Any,
        annotations: Any = None,
        *,
        return_tensors: str | None = "pt",
        device: str | torch.device | None = None,
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
        """Like ``DeformableDetrImageProcessor.preprocess``; tensors are returned on ``device``.

        ``return_tensors`` may be ``"pt"`` (or ``None``, the same here) or ``"np"``.
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
        return self._run_guarded(self._preprocess, images, annotations, return_tensors, device, overrides)

    def _preprocess(
        self, images: Any, annotations: Any, return_tensors: str | None, device: Any, overrides: dict[str, Any]
    ) -> BatchFeature:
        if return_tensors not in ("pt", "np", None):
            raise ValueError(f"return_tensors must be 'pt', 'np' or None, got {return_tensors!r}")
        settings = self._settings(**overrides)
        if settings.do_resize:
            _torch_mode(settings.resample)
        items = split_batch(images)
        annotation_list = self._annotation_list(annotations, len(items))
        if device is None:
            device = next((item.device for item in items if isinstance(item, torch.Tensor)), torch.device("cpu"))
        device = torch.device(device)

        tensors, originals = [], []
        for index, item in enumerate(items):
            try:
                tensor = self._to_tensor(item, settings, device)
            except ImageInputError as error:
                if len(items) == 1:
                    raise
                raise ImageInputError(f"image {index}: {error}") from None
            tensors.append(tensor)
            originals.append((int(tensor.shape[1]), int(tensor.shape[2])))
        channels = {int(t.shape[0]) for t in tensors}
        if len(channels) > 1:
            raise ImageInputError(f"images of one batch must have the same number of channels, got {sorted(channels)}")
        num_channels = channels.pop()

        sizes = originals
        if settings.do_resize:
            sizes = []
            for index, original in enumerate(originals):
                try:
                    sizes.append(get_output_size(original, settings.size))
                except ImageInputError as error:
                    if len(items) == 1:
                        raise
                    raise ImageInputError(f"image {index}: {error}") from None
        resized = self._resize_grouped(tensors, sizes, settings) if settings.do_resize else tensors

        if settings.do_pad:
            canvas = padded_size(sizes, settings.pad_size)
        elif len(set(sizes)) == 1:
            canvas = sizes[0]
        else:
            raise ImageInputError(
                f"images have different sizes after resizing ({sorted(set(sizes))}) and do_pad=False, so they "
                "cannot be stacked; enable do_pad or process them one at a time"
            )
        scale, offset = (torch.from_numpy(v).to(device)[:, None, None] for v in settings.scale_and_offset(num_channels))
        pixel_values = torch.empty((len(items), num_channels, *canvas), dtype=torch.float32, device=device)
        for index, tensor in enumerate(resized):
            height, width = sizes[index]
            # Written in place (uint8 * float promotes into the float32 canvas) with only the padding zeroed:
            # each full-canvas temporary costs as much as the arithmetic itself.
            image = pixel_values[index, :, :height, :width]
            torch.mul(tensor, scale, out=image).sub_(offset)
            pixel_values[index, :, height:, :].zero_()
            pixel_values[index, :, :height, width:].zero_()
        data = BatchFeature(pixel_values=pixel_values)
        if settings.do_pad:
            pixel_mask = torch.zeros((len(items), *canvas), dtype=torch.int64, device=device)
            for index, (height, width) in enumerate(sizes):
                pixel_mask[index, :height, :width] = 1
            data["pixel_mask"] = pixel_mask
        if annotation_list is not None:
            targets = [self._target(a, originals[i], sizes[i], settings) for i, a in enumerate(annotation_list)]
            data["labels"] = self._label_dicts(targets, "np" if return_tensors == "np" else "pt", device)
        if return_tensors == "np":
            for key in ("pixel_values", "pixel_mask"):
                if key in data:
                    data[key] = data[key].cpu().numpy()
        return data

    @staticmethod
    def _to_tensor(item: Any, settings: ProcessingSettings, device: torch.device) -> torch.Tensor:
        if isinstance(item, torch.Tensor):
            return tensor_to_chw(
                item.to(device), convert_rgb=settings.do_convert_rgb, max_image_pixels=settings.max_image_pixels
            )
        array = to_pixel_array(item, convert_rgb=settings.do_convert_rgb, max_image_pixels=settings.max_image_pixels)
        # Pillow hands out read-only buffers, which torch.from_numpy refuses to wrap without a warning.
        array = np.ascontiguousarray(array) if array.flags.writeable else np.array(array, order="C")
        return torch.from_numpy(array).to(device).permute(2, 0, 1)

    @staticmethod
    def _resize_grouped(
        tensors: list[torch.Tensor], sizes: list[tuple[int, int]], settings: ProcessingSettings
    ) -> list[torch.Tensor]:
        """Resize each image to its size, batching images that share input shape, dtype and output size."""
        groups: dict[tuple[Any, ...], list[int]] = defaultdict(list)
        for index, tensor in enumerate(tensors):
            groups[(tuple(tensor.shape), tensor.dtype, sizes[index])].append(index)
        resized: list[torch.Tensor | None] = [None] * len(tensors)
        for (_, _, size), indices in groups.items():
            batch = tensors[indices[0]][None] if len(indices) == 1 else torch.stack([tensors[i] for i in indices])
            for i, image in zip(indices, resize_batch(batch, size, settings.resample)):
                resized[i] = image
        return resized  # type: ignore[return-value]
