"""Any dataset ``open_dataset`` reads, written as one COCO zip that the COCO reader reads back to the same samples.

Layout of the zip (Roboflow's COCO layout, with the split names as folder names)::

    train/_annotations.coco.json      images, annotations, categories (ids 1..K in class order)
    train/<image files>               the original bytes of each image
    validation/_annotations.coco.json
    validation/...
    test/...

What is written is what validation kept: clipped boxes, no dropped objects or images, no crowd objects; boxes are
COCO ``[x, y, width, height]`` pixels exactly as the samples hold them (float32 values, written as JSON numbers).
Image files keep their names (``name-2.jpg`` for a repeated name within a split); images stored without a name
(Hugging Face rows) are numbered. The zip is written under a temporary name beside ``output_zip`` and renamed into
place, so it is either complete or absent.
"""

from __future__ import annotations

import io
import json
import os
import stat
import uuid
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import PIL.Image

from finetune.data.coco_format import ROBOFLOW_NAME
from finetune.data.formats.common import LoadedDataset
from finetune.data.prepare import PreparedData, validate_dataset
from finetune.data.records import DetectionSplit
from finetune.data.sources import open_dataset
from finetune.data.validation import ValidationReport

_SUFFIXES = {"JPEG": ".jpg", "PNG": ".png", "WEBP": ".webp", "BMP": ".bmp", "TIFF": ".tif", "GIF": ".gif"}


@dataclass
class CocoExport:
    """What ``export_coco`` wrote: the zip, images and objects per split, and the validation reports."""

    path: Path
    images: dict[str, int]
    objects: dict[str, int]
    reports: list[ValidationReport] = field(default_factory=list)

    def summary(self) -> str:
        parts = ", ".join(f"{name} {self.images[name]} images / {self.objects[name]} objects" for name in self.images)
        return f"wrote {self.path}: {parts}"


def _splits(
    dataset: Any, format: str, strict: bool, allow_outside_files: bool
) -> tuple[dict[str, DetectionSplit], list[str], list]:
    if isinstance(dataset, PreparedData):
        return dict(dataset.splits), list(dataset.class_names), list(dataset.reports)
    loaded = (
        dataset
        if isinstance(dataset, LoadedDataset)
        else open_dataset(dataset, format=format, allow_outside_files=allow_outside_files)
    )
    samples, reports = validate_dataset(loaded, strict=strict)
    splits = {
        name: DetectionSplit(name=name, samples=items, source=loaded.splits[name]) for name, items in samples.items()
    }
    return splits, list(loaded.categories.names), reports


def _read(source: bytes | str) -> bytes:
    if isinstance(source, str):
        with open(source, "rb") as handle:
            return handle.read()
    return bytes(source)


def _file_name(source: bytes | str, data: bytes, index: int, used: set[str]) -> str:
    if isinstance(source, str):
        name = os.path.basename(source)
    else:
        try:
            with PIL.Image.open(io.BytesIO(data)) as image:
                suffix = _SUFFIXES.get(image.format or "", ".img")
        except Exception:
            suffix = ".img"
        name = f"{index:06d}{suffix}"
    stem, suffix = os.path.splitext(name)
    candidate, number = name, 1
    while candidate.lower() in used:
        number += 1
        candidate = f"{stem}-{number}{suffix}"
    used.add(candidate.lower())
    return candidate


def _member(name: str) -> zipfile.ZipInfo:
    """A zip entry for a regular file readable by everyone (``rw-r--r--``)."""
    info = zipfile.ZipInfo(name, date_time=(2020, 1, 1, 0, 0, 0))
    info.external_attr = (stat.S_IFREG | 0o644) << 16
    return info


def _coco_json(split: DetectionSplit, class_names: list[str], file_names: list[str]) -> dict[str, Any]:
    ids = [sample.image_id for sample in split.samples]
    if len(set(ids)) != len(ids) or any(identifier < 0 for identifier in ids):
        ids = list(range(1, len(ids) + 1))
    images: list[dict[str, Any]] = []
    annotations: list[dict[str, Any]] = []
    for sample, identifier, file_name in zip(split.samples, ids, file_names):
        images.append({"id": identifier, "file_name": file_name, "width": sample.width, "height": sample.height})
        for box, label in zip(sample.boxes.tolist(), sample.labels.tolist()):
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": identifier,
                    "category_id": int(label) + 1,
                    "bbox": [float(value) for value in box],
                    "area": float(box[2]) * float(box[3]),
                    "iscrowd": 0,
                }
            )
    categories = [{"id": index + 1, "name": name, "supercategory": ""} for index, name in enumerate(class_names)]
    return {
        "info": {"description": "exported by finetune.data.export_coco"},
        "images": images,
        "annotations": annotations,
        "categories": categories,
    }


def export_coco(
    dataset: Any,
    output_zip: str | os.PathLike,
    *,
    format: str = "auto",
    strict: bool = False,
    allow_outside_files: bool = False,
) -> CocoExport:
    """Write ``dataset`` -- a source ``open_dataset`` takes (opened in ``format``; files it names outside its folder
    are refused unless ``allow_outside_files``), a ``LoadedDataset``, or a ``PreparedData`` (written as prepared,
    held-out validation split included) -- to ``output_zip`` as COCO."""
    output = Path(output_zip)
    splits, class_names, reports = _splits(dataset, format, strict, allow_outside_files)
    if not splits:
        raise ValueError("the dataset has no splits to export")
    output.parent.mkdir(parents=True, exist_ok=True)
    temporary = output.with_name(f".{output.name}.tmp-{uuid.uuid4().hex[:12]}")
    images: dict[str, int] = {}
    objects: dict[str, int] = {}
    try:
        with zipfile.ZipFile(temporary, "w") as archive:
            for name, split in splits.items():
                used: set[str] = {ROBOFLOW_NAME.lower()}
                file_names = []
                for index in range(len(split)):
                    source = split.image_source(index)
                    data = _read(source)
                    file_name = _file_name(source, data, index, used)
                    archive.writestr(_member(f"{name}/{file_name}"), data, compress_type=zipfile.ZIP_STORED)
                    file_names.append(file_name)
                coco = _coco_json(split, class_names, file_names)
                text = json.dumps(coco, ensure_ascii=False, allow_nan=False)
                archive.writestr(_member(f"{name}/{ROBOFLOW_NAME}"), text, compress_type=zipfile.ZIP_DEFLATED)
                images[name] = len(coco["images"])
                objects[name] = len(coco["annotations"])
        os.replace(temporary, output)
    finally:
        temporary.unlink(missing_ok=True)
    return CocoExport(path=output, images=images, objects=objects, reports=reports)
