"""COCO detection annotations to the ``labels`` the model's loss expects.

Input, per image: ``{"image_id": int, "annotations": [{"bbox": [x, y, w, h], "category_id": int, "area": float,
"iscrowd": 0 | 1}, ...]}`` with absolute pixel boxes in the original image.

Output, per image: ``class_labels`` (n,) int64, ``boxes`` (n, 4) float32, ``area`` (n,) float32, ``iscrowd`` (n,)
int64, ``orig_size`` (2,) and ``size`` (2,) int64 as (height, width), ``image_id`` (1,) int64.

The steps follow the DETR family's ``ConvertCocoPolysToMask``: crowd objects are dropped, boxes are converted to
corners and clipped to the image, and boxes with no width or height after clipping are dropped. Resizing scales
boxes and areas by the resize ratios. Normalised boxes are (cx, cy, w, h) divided by the **resized, unpadded** image
size, and ``size`` is that unpadded size -- the original Deformable DETR convention, which matches the valid-ratio
correction inside the model and post-processing by the original image size. transformers 5.x instead divides by
the padded canvas and reports the padded ``size`` (its PR #28363); the absolute boxes agree.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from ddetr.boxes import box_xywh_to_xyxy, box_xyxy_to_cxcywh
from ddetr.processing.errors import AnnotationError

Target = dict[str, np.ndarray]


def _number(value: Any, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise AnnotationError(f"{where} must be a number, got {value!r}")
    return float(value)


def _integer(value: Any, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        if isinstance(value, (float, np.floating)) and math.isfinite(value) and float(value).is_integer():
            return int(value)
        raise AnnotationError(f"{where} must be an integer, got {value!r}")
    return int(value)


def validate_coco_detection(annotation: Any, index: int = 0) -> None:
    """Raise ``AnnotationError`` naming the first structural problem of one image's COCO detection annotation."""
    where = f"annotations[{index}]"
    if not isinstance(annotation, Mapping):
        raise AnnotationError(
            f"{where} must be a dict with keys 'image_id' and 'annotations' (COCO detection format), "
            f"got {type(annotation).__name__}"
        )
    missing = [key for key in ("image_id", "annotations") if key not in annotation]
    if missing:
        raise AnnotationError(f"{where} is missing {missing} (COCO detection format needs image_id and annotations)")
    _integer(annotation["image_id"], f"{where}['image_id']")
    objects = annotation["annotations"]
    if not isinstance(objects, Sequence) or isinstance(objects, (str, bytes)):
        raise AnnotationError(f"{where}['annotations'] must be a list of objects, got {type(objects).__name__}")
    for number, obj in enumerate(objects):
        obj_where = f"{where}['annotations'][{number}]"
        if not isinstance(obj, Mapping):
            raise AnnotationError(f"{obj_where} must be a dict, got {type(obj).__name__}")
        for key in ("bbox", "category_id"):
            if key not in obj:
                raise AnnotationError(f"{obj_where} is missing {key!r}")
        bbox = obj["bbox"]
        if hasattr(bbox, "tolist"):  # numpy arrays and torch tensors
            bbox = bbox.tolist()
        if not isinstance(bbox, Sequence) or isinstance(bbox, (str, bytes)) or len(bbox) != 4:
            raise AnnotationError(f"{obj_where}['bbox'] must be [x, y, width, height], got {obj['bbox']!r}")
        for coordinate in bbox:
            _number(coordinate, f"{obj_where}['bbox']")
        _integer(obj["category_id"], f"{obj_where}['category_id']")
        if "area" in obj:
            _number(obj["area"], f"{obj_where}['area']")
        if "iscrowd" in obj:
            _integer(obj["iscrowd"], f"{obj_where}['iscrowd']")


def prepare_coco_detection(annotation: Mapping[str, Any], image_size: tuple[int, int]) -> Target:
    """One image's COCO annotation as absolute, clipped corner boxes in the original image (see module doc).

    ``area`` defaults to the box's width x height when absent (transformers requires it).
    """
    height, width = image_size
    objects = [obj for obj in annotation["annotations"] if int(obj.get("iscrowd", 0)) == 0]
    boxes = np.asarray([[float(v) for v in obj["bbox"]] for obj in objects], dtype=np.float32).reshape(-1, 4)
    areas = np.asarray(
        [float(obj["area"]) if "area" in obj else float(box[2] * box[3]) for obj, box in zip(objects, boxes)],
        dtype=np.float32,
    )
    classes = np.asarray([int(obj["category_id"]) for obj in objects], dtype=np.int64)
    boxes = box_xywh_to_xyxy(boxes)
    np.clip(boxes[:, 0::2], 0, width, out=boxes[:, 0::2])
    np.clip(boxes[:, 1::2], 0, height, out=boxes[:, 1::2])
    # NaN coordinates fail both comparisons, so they are dropped with the empty boxes.
    keep = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
    return {
        "image_id": np.asarray([int(annotation["image_id"])], dtype=np.int64),
        "class_labels": classes[keep],
        "boxes": boxes[keep],
        "area": areas[keep],
        "iscrowd": np.zeros(int(keep.sum()), dtype=np.int64),
        "orig_size": np.asarray([height, width], dtype=np.int64),
        "size": np.asarray([height, width], dtype=np.int64),
    }


def resize_target(target: Target, original_size: tuple[int, int], new_size: tuple[int, int]) -> Target:
    """Scale absolute boxes and areas from ``original_size`` to ``new_size`` (both (height, width))."""
    ratio_height = new_size[0] / original_size[0]
    ratio_width = new_size[1] / original_size[1]
    resized = dict(target)
    resized["boxes"] = target["boxes"] * np.asarray(
        [ratio_width, ratio_height, ratio_width, ratio_height], dtype=np.float32
    )
    resized["area"] = (target["area"] * (ratio_width * ratio_height)).astype(np.float32)
    resized["size"] = np.asarray(new_size, dtype=np.int64)
    return resized


def normalize_target_boxes(target: Target, image_size: tuple[int, int]) -> Target:
    """Absolute corner boxes to (cx, cy, w, h) relative to ``image_size`` (the unpadded image)."""
    height, width = image_size
    centred = box_xyxy_to_cxcywh(target["boxes"])
    normalised = dict(target)
    normalised["boxes"] = (centred / np.asarray([width, height, width, height], dtype=np.float32)).astype(np.float32)
    return normalised
