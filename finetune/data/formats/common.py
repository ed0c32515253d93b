"""What every format reader shares: the opened dataset, split names, image suffixes and reading helpers."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import PIL.Image

from finetune.data.categories import CategoryMap
from finetune.data.records import ImageRef, RawRecord, RecordSource

SPLIT_ALIASES = {
    "train": "train",
    "training": "train",
    "validation": "validation",
    "valid": "validation",
    "val": "validation",
    "dev": "validation",
    "test": "test",
    "testing": "test",
}
# Image files that the readers which list folders (YOLO, VOC, Label Studio, CVAT) recognise.
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".gif")
_EXIF_ORIENTATION_TAG = 0x0112


class ParsedRecordSource:
    """One split whose annotation files were parsed when the dataset was opened (VOC, Label Studio, CVAT): its
    records, and the conversions made on the way (counted by validation); images are read from their paths."""

    def __init__(
        self, *, name: str, records: list[RawRecord], conversions: list[tuple[str, str]] | None = None
    ) -> None:
        self.name = name
        self._records = records
        self.conversions = conversions or []

    def records(self) -> Iterator[RawRecord]:
        yield from self._records

    def image_bytes(self, image: ImageRef) -> bytes | str:
        return str(image)


@dataclass
class LoadedDataset:
    """Raw splits (canonical names ``train``/``validation``/``test`` where recognised) and the class map."""

    splits: dict[str, RecordSource]
    categories: CategoryMap
    description: str
    format: str = ""
    root: Path | None = field(default=None, compare=False)


def canonical_split(name: str) -> str:
    return SPLIT_ALIASES.get(name.lower(), name)


def split_from_label(label: str) -> str | None:
    """train / validation / test when ``label`` (a folder or file name) names one, else None."""
    label = label.lower()
    if label in SPLIT_ALIASES:
        return SPLIT_ALIASES[label]
    for name, keys in (("train", ("train",)), ("validation", ("valid", "val", "dev")), ("test", ("test",))):
        if any(key in label for key in keys):
            return name
    return None


def absolute(path: str | os.PathLike) -> Path:
    """``path`` made absolute without resolving symlinks (the dataset folder may itself be a link)."""
    return Path(os.path.abspath(os.fspath(path)))


def read_json(path: Path, *, shown: str) -> Any:
    """Parsed JSON; ValueError naming the file and the line of a syntax error."""
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as error:
        raise ValueError(f"cannot read {shown}: {error}") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as error:
        raise ValueError(f"{shown} line {error.lineno}, column {error.colno}: not valid JSON ({error.msg})") from None


def image_size(path: str) -> tuple[int, int] | None:
    """(width, height) of an image file as it will be used (EXIF orientation applied), from its header only; None
    when it cannot be read (validation then reports the image)."""
    try:
        with PIL.Image.open(path) as image:
            width, height = image.size
            try:
                orientation = image.getexif().get(_EXIF_ORIENTATION_TAG, 1)
            except Exception:
                orientation = 1
    except Exception:
        return None
    return (height, width) if orientation in (5, 6, 7, 8) else (width, height)


def annotation_file(path: Path, find: Callable[[Path], Path | None], missing: str) -> tuple[Path, Path]:
    """(annotation file, dataset folder) for ``path``, the file itself or a folder in which ``find`` finds it;
    ValueError "<folder>: <missing>" when it finds none."""
    if path.is_file():
        return path, path.parent
    found = find(path)
    if found is None:
        raise ValueError(f"{path}: {missing}")
    return found, path


def relative_name(root: Path, path: str | os.PathLike) -> str:
    """``path`` relative to the dataset folder, with ``/`` (for messages)."""
    try:
        return Path(os.path.relpath(path, os.path.realpath(root))).as_posix()
    except ValueError:
        return str(path)


def rotated_bounds(x0: float, y0: float, x1: float, y1: float, degrees: float, *, about_centre: bool) -> list[float]:
    """The axis-aligned COCO box around the box ``x0 y0 x1 y1`` rotated clockwise by ``degrees`` (on screen, y
    down) about its centre, or about its top-left corner (Label Studio)."""
    cx, cy = ((x0 + x1) / 2, (y0 + y1) / 2) if about_centre else (x0, y0)
    angle = math.radians(degrees)
    cos, sin = math.cos(angle), math.sin(angle)
    xs, ys = [], []
    for x, y in ((x0, y0), (x1, y0), (x1, y1), (x0, y1)):
        dx, dy = x - cx, y - cy
        xs.append(cx + dx * cos - dy * sin)
        ys.append(cy + dx * sin + dy * cos)
    return [min(xs), min(ys), max(xs) - min(xs), max(ys) - min(ys)]
