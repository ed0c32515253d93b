"""Label Studio's JSON export: a list of tasks, ``{"id", "data": {"image": ...}, "annotations": [{"result": [...]}]}``,
with the images beside it (in ``images/`` or the same folder).

A ``rectanglelabels`` result holds ``value: {x, y, width, height, rotation, rectanglelabels: [name]}`` in percent of
``original_width`` / ``original_height``; ``x, y`` is the top-left corner before rotation. A rotated rectangle is
replaced by the axis-aligned box around it (rotated about that corner, as Label Studio does), and counted; other
result types (polygons, key points, brushes) are left out, and counted. The first annotation of a task that was not
cancelled is used (predictions are ignored); a task without one is a background image.

Images are found from ``data.image``: Label Studio's upload URLs (``/data/upload/3/1f2e3d4c-photo.jpg``) and web
URLs by file name, in ``images/`` or the export's folder (also without the upload's ``1f2e3d4c-`` prefix); local
storage URLs (``/data/local-files/?d=folder/photo.jpg``) by their path; plain relative paths from the export's
folder. Several exports named after splits (``train.json``, ``valid.json``, ``test.json``) are the splits; a single
export is ``train``. Class names are sorted alphabetically.

A ``data.image`` path that leads outside the dataset folder refuses the export when it is opened, before any image
is read (OutsidePathError naming the task and ``--allow-outside-files``).
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlparse

from finetune.data.categories import CategoryMap
from finetune.data.formats.common import (
    SPLIT_ALIASES,
    LoadedDataset,
    ParsedRecordSource,
    absolute,
    image_size,
    read_json,
    relative_name,
    rotated_bounds,
    split_from_label,
)
from finetune.data.formats.paths import OutsidePathError, UnsafePathError, files_under, resolve_inside
from finetune.data.records import RawObject, RawRecord

_UPLOAD_PREFIX = re.compile(r"^[0-9a-f]{8}-")


def looks_like_label_studio(path: Path) -> bool:
    """A JSON file holding a list (of tasks), checked on its first bytes."""
    try:
        with path.open("rb") as handle:
            head = handle.read(65536)
    except OSError:
        return False
    head = head.lstrip(b"\xef\xbb\xbf \t\r\n")
    return head.startswith(b"[") and (b'"data"' in head or head[1:].lstrip().startswith(b"]"))


def find_exports(root: Path) -> list[Path]:
    found = [item for item in files_under(root, root, suffixes=(".json",), max_depth=1) if item.path is not None]
    return [root / item.relative for item in found if looks_like_label_studio(root / item.relative)]


def _candidates(reference: str) -> tuple[list[str], bool]:
    """Relative names to look for, and whether they are bare file names (looked up in the image folders)."""
    parsed = urlparse(reference)
    if parsed.scheme in ("http", "https", "s3", "gs", "azure-blob") or reference.startswith("/data/"):
        query = parse_qs(parsed.query)
        if "d" in query:  # local storage: /data/local-files/?d=relative/path.jpg
            local = unquote(query["d"][0])
            return [local, os.path.basename(local)], False
        base = os.path.basename(unquote(parsed.path))
        names = [base]
        if _UPLOAD_PREFIX.match(base):
            names.append(_UPLOAD_PREFIX.sub("", base))
        return names, True
    return [reference], False


def _image_path(
    root: Path, folder: Path, reference: Any, where: str, allow_outside_files: bool
) -> tuple[str | None, str]:
    """(path, "") -- a missing file's path when none exists -- or (None, why) for a task without a usable
    reference. OutsidePathError when a path leads outside the dataset folder (a file name from a URL: when it
    does from every folder it is looked for in)."""
    if not isinstance(reference, str) or not reference:
        return None, f"{where} has no data.image"
    names, bare = _candidates(reference)
    bases = [folder / "images", folder] if bare else [folder]
    first = None
    refusal: OutsidePathError | None = None
    for name in names:
        for base in bases:
            try:
                candidate = resolve_inside(root, name, base=base, where=where, allow_outside_files=allow_outside_files)
            except OutsidePathError as error:
                if not bare:
                    raise
                refusal = refusal or error
                continue
            except UnsafePathError as error:  # a NUL in the name
                return None, str(error)
            first = first or candidate
            if os.path.isfile(candidate):
                return candidate, ""
    if first is None:
        if refusal is not None:
            raise refusal
        return None, f"{where}: data.image {reference!r} names no file inside the dataset folder"
    return first, ""


def _task_where(split: str, shown: str, position: int, task: dict[str, Any]) -> str:
    return f"{split}: {shown} task {position} (id {task.get('id')!r})"


def _reference(task: dict[str, Any]) -> Any:
    stored = task.get("data")
    data: dict[str, Any] = stored if isinstance(stored, dict) else {}
    return data.get("image") if "image" in data else next((v for v in data.values() if isinstance(v, str)), None)


def _task_images(
    root: Path, export: Path, split: str, tasks: Any, allow_outside_files: bool
) -> list[tuple[str | None, str]]:
    """Each task's image (see ``_image_path``), found before any image is read (sizes are read from some)."""
    shown = relative_name(root, export)
    if not isinstance(tasks, list):
        raise ValueError(f"{shown}: a Label Studio JSON export is a list of tasks, got {type(tasks).__name__}")
    images = []
    for position, task in enumerate(tasks):
        task = task if isinstance(task, dict) else {}
        where = _task_where(split, shown, position, task)
        images.append(_image_path(root, export.parent, _reference(task), where, allow_outside_files))
    return images


def _task_records(
    root: Path,
    export: Path,
    split: str,
    tasks: list[Any],
    images: list[tuple[str | None, str]],
    conversions: list[tuple[str, str]],
) -> tuple[list[RawRecord], list[str]]:
    shown = relative_name(root, export)
    records, labels = [], []
    for position, (task, (image, why)) in enumerate(zip(tasks, images, strict=True)):
        task = task if isinstance(task, dict) else {}
        where = _task_where(split, shown, position, task)
        annotations = [a for a in task.get("annotations") or [] if isinstance(a, dict) and not a.get("was_cancelled")]
        results = annotations[0].get("result") or [] if annotations else []
        objects: list[RawObject] = []
        width = height = None
        for number, result in enumerate(results if isinstance(results, list) else []):
            if not isinstance(result, dict):
                continue
            kind = result.get("type")
            if kind != "rectanglelabels":
                if isinstance(kind, str) and kind.endswith("labels"):
                    conversions.append(("non_rectangle_ignored", f"{where}: a {kind} result (only rectangles)"))
                continue
            width = result.get("original_width", width)
            height = result.get("original_height", height)
            stored_value = result.get("value")
            value: dict[str, Any] = stored_value if isinstance(stored_value, dict) else {}
            names = value.get("rectanglelabels") or []
            category = names[0] if isinstance(names, list) and names else None
            objects.append(_rectangle(value, width, height, image, category, f"{where} result {number}", conversions))
            if isinstance(category, str):
                labels.append(category)
        records.append(
            RawRecord(
                where=where,
                image=image,
                image_id=task.get("id", position),
                width=width,
                height=height,
                objects=objects,
                problem=None if image is not None else ("missing_image", why),
            )
        )
    return records, labels


def _rectangle(
    value: dict[str, Any],
    width: Any,
    height: Any,
    image: str | None,
    category: Any,
    where: str,
    conversions: list[tuple[str, str]],
) -> RawObject:
    percent = [value.get(key) for key in ("x", "y", "width", "height")]
    numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in percent)
    if not (isinstance(width, (int, float)) and isinstance(height, (int, float))) and image is not None:
        size = image_size(image) if os.path.isfile(image) else None
        width, height = size if size is not None else (None, None)
    if not numeric or not isinstance(width, (int, float)) or not isinstance(height, (int, float)):
        return RawObject(bbox=percent, category=category)  # validation reports it
    x, y, w, h = (float(v) for v in percent)  # type: ignore[arg-type]
    x0, y0 = x / 100 * width, y / 100 * height
    x1, y1 = x0 + w / 100 * width, y0 + h / 100 * height
    rotation = value.get("rotation") or 0
    if isinstance(rotation, (int, float)) and rotation % 360:
        conversions.append(("rotated_box_axis_aligned", f"{where}: a rectangle rotated by {rotation} degrees"))
        return RawObject(bbox=rotated_bounds(x0, y0, x1, y1, float(rotation), about_centre=False), category=category)
    return RawObject(bbox=[x0, y0, x1 - x0, y1 - y0], category=category)


def open_label_studio(path: Path, *, allow_outside_files: bool = False) -> LoadedDataset:
    """Open a Label Studio JSON export (the file, or the folder holding it and the images).
    ``allow_outside_files``: the tasks' image paths may lead outside the dataset folder (the user's own dataset)."""
    path = absolute(path)
    if path.is_file():
        root, exports = path.parent, [path]
    else:
        root, exports = path, find_exports(path)
        if not exports:
            raise ValueError(f"{root}: no Label Studio JSON export (a list of tasks) found")
    files: dict[str, Path] = {}
    for export in exports:
        label = split_from_label(export.stem) if len(exports) > 1 else SPLIT_ALIASES.get(export.stem.lower())
        split = label or "train"
        if split in files:
            raise ValueError(
                f"{root}: {files[split].name} and {export.name} both hold the {split!r} split; name several "
                "exports after their splits (train.json, valid.json, test.json)"
            )
        files[split] = export
    # Every export's images are found first: an image outside refuses the dataset before any image is read.
    found_images = {}
    for split, export in files.items():
        shown = relative_name(root, export)
        tasks = read_json(
            Path(resolve_inside(root, export, where=shown, allow_outside_files=allow_outside_files)), shown=shown
        )
        found_images[split] = (tasks, _task_images(root, export, split, tasks, allow_outside_files))
    splits: dict[str, ParsedRecordSource] = {}
    labels: list[str] = []
    for split, (tasks, images) in found_images.items():
        conversions: list[tuple[str, str]] = []
        records, found = _task_records(root, files[split], split, tasks, images, conversions)
        splits[split] = ParsedRecordSource(name=split, records=records, conversions=conversions)
        labels += found
    try:
        categories = CategoryMap.from_values(labels)
    except ValueError:
        raise ValueError(f"{root}: the Label Studio export has no labelled rectangles") from None
    return LoadedDataset(
        splits=dict(splits),
        categories=categories,
        description=f"Label Studio export {root}",
        format="label-studio",
        root=root,
    )
