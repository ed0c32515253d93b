"""Settings, argument handling, config I/O and post-processing shared by the PIL and the torch image processors."""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Sequence
from typing import Any, TypeVar

import numpy as np
import PIL.Image
import torch

from ddetr.processing.annotations import (
    Target,
    normalize_target_boxes,
    prepare_coco_detection,
    resize_target,
    validate_coco_detection,
)
from ddetr.processing.batch_feature import BatchFeature
from ddetr.processing.errors import AnnotationError, ImageInputError
from ddetr.processing.image_loading import DEFAULT_MAX_IMAGE_PIXELS, ImageSource, load_image
from ddetr.processing.post_process import post_process_object_detection
from ddetr.processing.processor_config import (
    IMAGE_PROCESSOR_TYPE,
    config_to_init_kwargs,
    read_config,
    resolve_config_file,
    write_config,
)
from ddetr.processing.resize import normalize_pad_size, normalize_size

IMAGENET_DEFAULT_MEAN = (0.485, 0.456, 0.406)
IMAGENET_DEFAULT_STD = (0.229, 0.224, 0.225)
SUPPORTED_FORMATS = ("coco_detection",)

# The processor class a classmethod is called on, so from_dict / from_pretrained return that subclass.
_Processor = TypeVar("_Processor", bound="DeformableDetrImageProcessorBase")


@dataclasses.dataclass(frozen=True)
class ProcessingSettings:
    """The fully resolved options of one ``preprocess`` call (processor defaults with per-call overrides)."""

    do_resize: bool
    size: dict[str, int]
    resample: int
    do_rescale: bool
    rescale_factor: float
    do_normalize: bool
    image_mean: tuple[float, ...]
    image_std: tuple[float, ...]
    do_convert_annotations: bool
    do_pad: bool
    pad_size: dict[str, int] | None
    format: str
    do_convert_rgb: bool
    max_image_pixels: int | None

    def scale_and_offset(self, channels: int) -> tuple[np.ndarray, np.ndarray]:
        """Per-channel (scale, offset) so that rescale then normalise is one ``x * scale - offset``."""
        scale = np.full(channels, self.rescale_factor if self.do_rescale else 1.0, dtype=np.float64)
        offset = np.zeros(channels, dtype=np.float64)
        if self.do_normalize:
            mean = _per_channel(self.image_mean, channels, "image_mean")
            std = _per_channel(self.image_std, channels, "image_std")
            scale, offset = scale / std, mean / std
        return scale.astype(np.float32), offset.astype(np.float32)


def _per_channel(values: tuple[float, ...], channels: int, name: str) -> np.ndarray:
    if len(values) == 1:
        return np.full(channels, values[0], dtype=np.float64)
    if len(values) != channels:
        raise ImageInputError(
            f"the image has {channels} channel(s) but {name} has {len(values)} values; "
            "keep do_convert_rgb=True or give one value per channel"
        )
    return np.asarray(values, dtype=np.float64)


def _float_tuple(values: Any, name: str) -> tuple[float, ...]:
    if isinstance(values, (int, float)) and not isinstance(values, bool):
        return (float(values),)
    if isinstance(values, (np.ndarray, torch.Tensor)):
        values = values.tolist()
    if isinstance(values, Sequence) and not isinstance(values, str) and values:
        try:
            return tuple(float(v) for v in values)
        except (TypeError, ValueError):
            pass
    raise ValueError(f"{name} must be a number or a list of numbers, got {values!r}")


def _check_std(image_std: Sequence[float]) -> None:
    if any(not std > 0 for std in image_std):
        raise ValueError(f"image_std must be positive numbers, got {list(image_std)}")


def _resample_code(resample: Any) -> int:
    try:
        return int(PIL.Image.Resampling(resample))
    except (ValueError, TypeError):
        names = ", ".join(f"{r.name}={int(r)}" for r in PIL.Image.Resampling)
        raise ValueError(f"resample must be a PIL resampling filter ({names}), got {resample!r}") from None


class DeformableDetrImageProcessorBase:
    """Options and everything except the pixel arithmetic; see the concrete processors for the arguments."""

    model_input_names = ("pixel_values", "pixel_mask")
    _init_keys = frozenset(
        {
            "do_resize",
            "size",
            "max_size",
            "resample",
            "do_rescale",
            "rescale_factor",
            "do_normalize",
            "image_mean",
            "image_std",
            "do_convert_annotations",
            "do_pad",
            "pad_size",
            "pad_and_return_pixel_mask",
            "format",
            "do_convert_rgb",
            "max_image_pixels",
        }
    )

    def __init__(
        self,
        *,
        do_resize: bool = True,
        size: int | Sequence[int] | dict[str, int] | None = None,
        max_size: int | None = None,
        resample: int | PIL.Image.Resampling = PIL.Image.Resampling.BILINEAR,
        do_rescale: bool = True,
        rescale_factor: float = 1 / 255,
        do_normalize: bool = True,
        image_mean: float | Sequence[float] | None = None,
        image_std: float | Sequence[float] | None = None,
        do_convert_annotations: bool | None = None,
        do_pad: bool | None = None,
        pad_size: dict[str, int] | None = None,
        pad_and_return_pixel_mask: bool | None = None,
        format: str = "coco_detection",
        do_convert_rgb: bool = True,
        max_image_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS,
    ) -> None:
        self.do_resize = bool(do_resize)
        self.size = normalize_size(size, max_size)
        self.resample = _resample_code(resample)
        self.do_rescale = bool(do_rescale)
        self.rescale_factor = float(rescale_factor)
        self.do_normalize = bool(do_normalize)
        self.image_mean = list(_float_tuple(IMAGENET_DEFAULT_MEAN if image_mean is None else image_mean, "image_mean"))
        self.image_std = list(_float_tuple(IMAGENET_DEFAULT_STD if image_std is None else image_std, "image_std"))
        _check_std(self.image_std)
        # As in transformers: boxes are normalised exactly when pixels are, unless said otherwise.
        self.do_convert_annotations = (
            self.do_normalize if do_convert_annotations is None else bool(do_convert_annotations)
        )
        if do_pad is None:
            do_pad = True if pad_and_return_pixel_mask is None else pad_and_return_pixel_mask
        self.do_pad = bool(do_pad)
        self.pad_size = normalize_pad_size(pad_size)
        self.format = self._check_format(format)
        self.do_convert_rgb = bool(do_convert_rgb)
        self.max_image_pixels = self._check_max_pixels(max_image_pixels)

    @staticmethod
    def _check_format(format: Any) -> str:
        format = getattr(format, "value", format)
        if format not in SUPPORTED_FORMATS:
            raise ValueError(f"format must be one of {SUPPORTED_FORMATS} (panoptic is not supported), got {format!r}")
        return format

    @staticmethod
    def _check_max_pixels(max_image_pixels: Any) -> int | None:
        if max_image_pixels is None:
            return None
        if isinstance(max_image_pixels, bool) or not isinstance(max_image_pixels, int) or max_image_pixels < 1:
            raise ValueError(f"max_image_pixels must be a positive int or None, got {max_image_pixels!r}")
        return max_image_pixels

    # ----------------------------------------------------------------------------------------------------------- #
    # Per-call options and the shared annotation path

    def _settings(self, **overrides: Any) -> ProcessingSettings:
        """The processor's options with the non-None per-call ``overrides`` applied and validated."""
        value = {key: getattr(self, key) for key in (f.name for f in dataclasses.fields(ProcessingSettings))}
        given = {key: item for key, item in overrides.items() if item is not None}
        unknown = set(given) - set(value)
        if unknown:
            raise ValueError(f"unknown preprocess option(s): {sorted(unknown)}")
        value.update(given)
        if "size" in given:
            value["size"] = normalize_size(given["size"])
        if "pad_size" in given:
            value["pad_size"] = normalize_pad_size(given["pad_size"])
        if "resample" in given:
            value["resample"] = _resample_code(given["resample"])
        if "format" in given:
            value["format"] = self._check_format(given["format"])
        if "max_image_pixels" in given:
            value["max_image_pixels"] = self._check_max_pixels(given["max_image_pixels"])
        value["image_mean"] = _float_tuple(value["image_mean"], "image_mean")
        value["image_std"] = _float_tuple(value["image_std"], "image_std")
        _check_std(value["image_std"])
        return ProcessingSettings(**value)

    @staticmethod
    def _annotation_list(annotations: Any, count: int) -> list[Any] | None:
        if annotations is None:
            return None
        if isinstance(annotations, dict):
            annotations = [annotations]
        if not isinstance(annotations, (list, tuple)):
            raise AnnotationError(f"annotations must be a dict or a list of dicts, got {type(annotations).__name__}")
        if len(annotations) != count:
            raise AnnotationError(f"got {count} image(s) but {len(annotations)} annotation(s); give one per image")
        for index, annotation in enumerate(annotations):
            validate_coco_detection(annotation, index)
        return list(annotations)

    @staticmethod
    def _target(
        annotation: Any, original_size: tuple[int, int], resized_size: tuple[int, int], settings: ProcessingSettings
    ) -> Target:
        target = prepare_coco_detection(annotation, original_size)
        if resized_size != original_size:
            target = resize_target(target, original_size, resized_size)
        if settings.do_convert_annotations:
            target = normalize_target_boxes(target, resized_size)
        return target

    @staticmethod
    def _label_dicts(targets: list[Target], return_tensors: str | None, device: Any = None) -> list[BatchFeature]:
        if return_tensors == "pt":
            return [BatchFeature({k: torch.from_numpy(v).to(device) for k, v in t.items()}) for t in targets]
        return [BatchFeature(t) for t in targets]

    def _run_guarded(self, function: Any, *args: Any) -> BatchFeature:
        """Call ``function``, turning anything but ``ImageInputError`` into one, so callers need one except clause."""
        try:
            return function(*args)
        except ImageInputError:
            raise
        except MemoryError:
            raise ImageInputError("not enough memory to preprocess the image(s); try smaller images") from None
        except ValueError as error:
            # Our own argument checks already explain themselves.
            raise ImageInputError(str(error)) from error
        except Exception as error:
            raise ImageInputError(f"could not preprocess the image(s): {type(error).__name__}: {error}") from error

    def __call__(self, images: Any, annotations: Any = None, **kwargs: Any) -> BatchFeature:
        """Same as ``preprocess``."""
        return self.preprocess(images, annotations, **kwargs)

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
        """The options every processor takes; the concrete processors implement it (and may add their own)."""
        raise NotImplementedError

    # ----------------------------------------------------------------------------------------------------------- #
    # Loading and post-processing

    def load_image(self, source: ImageSource) -> PIL.Image.Image:
        """Open a path/bytes/PIL/array as an oriented 8-bit RGB image under this processor's pixel limit.

        ``image.size[::-1]`` is the (height, width) to pass as ``target_sizes`` when post-processing.
        """
        return load_image(source, max_image_pixels=self.max_image_pixels)

    def post_process_object_detection(
        self,
        outputs: Any,
        threshold: float = 0.5,
        target_sizes: torch.Tensor | Sequence[Sequence[float]] | None = None,
        top_k: int = 100,
    ) -> list[dict[str, torch.Tensor]]:
        """Scored xyxy boxes per image; see ``ddetr.processing.post_process_object_detection``."""
        return post_process_object_detection(outputs, threshold=threshold, target_sizes=target_sizes, top_k=top_k)

    # ----------------------------------------------------------------------------------------------------------- #
    # Config I/O

    def to_dict(self) -> dict[str, Any]:
        """The options as stored in ``preprocessor_config.json`` (loadable by transformers 5.23 too)."""
        return {
            "do_convert_annotations": self.do_convert_annotations,
            "do_convert_rgb": self.do_convert_rgb,
            "do_normalize": self.do_normalize,
            "do_pad": self.do_pad,
            "do_rescale": self.do_rescale,
            "do_resize": self.do_resize,
            "format": self.format,
            "image_mean": list(self.image_mean),
            "image_processor_type": IMAGE_PROCESSOR_TYPE,
            "image_std": list(self.image_std),
            "max_image_pixels": self.max_image_pixels,
            "pad_size": None if self.pad_size is None else dict(self.pad_size),
            "resample": self.resample,
            "rescale_factor": self.rescale_factor,
            "size": dict(self.size),
        }

    def to_json_string(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"

    def __repr__(self) -> str:
        return f"{type(self).__name__} {self.to_json_string()}"

    def save_pretrained(self, save_directory: str | os.PathLike) -> list[str]:
        """Write ``preprocessor_config.json`` into ``save_directory``; returns the written paths."""
        return [str(write_config(self.to_dict(), save_directory))]

    @classmethod
    def from_dict(cls: type[_Processor], config: dict[str, Any], **kwargs: Any) -> _Processor:
        """Build from a config dict (any of its historical spellings); ``kwargs`` override its values."""
        init_kwargs = config_to_init_kwargs(config, cls._init_keys)
        if "size" in kwargs:
            init_kwargs.pop("max_size", None)
        init_kwargs.update(kwargs)
        return cls(**init_kwargs)

    @classmethod
    def from_pretrained(
        cls: type[_Processor],
        pretrained_model_name_or_path: str | os.PathLike,
        *,
        revision: str | None = None,
        cache_dir: str | os.PathLike | None = None,
        local_files_only: bool = False,
        token: str | bool | None = None,
        **kwargs: Any,
    ) -> _Processor:
        """Load from a local directory (or its JSON file) or a Hub repo id; ``kwargs`` override config values."""
        config_file = resolve_config_file(
            pretrained_model_name_or_path,
            revision=revision,
            cache_dir=cache_dir,
            local_files_only=local_files_only,
            token=token,
        )
        return cls.from_dict(read_config(config_file), **kwargs)
