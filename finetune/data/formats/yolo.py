"""YOLO (Ultralytics / Darknet text labels): a ``data.yaml`` naming the classes and the splits, images, and one
``.txt`` label file per image.

Layouts (the splits' paths come from ``data.yaml``, else from these conventions):

* Ultralytics: ``images/train/*.jpg`` with ``labels/train/*.txt``, likewise ``val`` and ``test``;
* Roboflow: ``train/images/*.jpg`` with ``train/labels/*.txt``, likewise ``valid`` and ``test`` (its ``data.yaml``
  says ``train: ../train/images``, relative to a folder above the dataset: leading ``../`` are dropped when the path
  would otherwise leave the dataset folder);
* a split given as a list file (``train: train.txt``, one image path per line, as CVAT exports) or a list of
  folders and files.

``names`` is a list or a ``{id: name}`` mapping; ``path`` (the dataset root) is used when it lies inside the
dataset folder and ignored otherwise. A label file mirrors its image's path with the last ``images`` folder
replaced by ``labels`` and the suffix by ``.txt``. Each line is ``class cx cy w h``, normalised to 0-1 by the image
size (after EXIF orientation); a line with more coordinate pairs is a segment, reduced to its box (counted). An
image without a label file is a background image; a label file without an image is counted as a missing image.

An image the split names (a list file's line, a symlink among the images) or a label file (a symlink) that leads
outside the dataset folder refuses the dataset when it is opened, before any image or label file is read
(OutsidePathError naming the file and ``--allow-outside-files``).
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from finetune.data.categories import CategoryMap
from finetune.data.formats.common import (
    IMAGE_SUFFIXES,
    LoadedDataset,
    absolute,
    annotation_file,
    canonical_split,
    image_size,
    relative_name,
)
from finetune.data.formats.paths import FoundFile, OutsidePathError, UnsafePathError, files_under, resolve_inside
from finetune.data.records import ImageRef, RawObject, RawRecord

logger = logging.getLogger(__name__)

YAML_NAMES = ("data.yaml", "data.yml", "dataset.yaml", "dataset.yml")
_SPLIT_KEYS = ("train", "val", "valid", "validation", "test")
_NAMES_LINE = re.compile(rb"^names\s*:", re.MULTILINE)
_MAX_YAML_BYTES = 16 * 1024 * 1024
_MAX_LABEL_BYTES = 64 * 1024 * 1024


def looks_like_yolo_yaml(path: Path) -> bool:
    """A data.yaml by name, or any YAML file with a top-level ``names:`` key (checked on the text)."""
    if path.name.lower() in YAML_NAMES:
        return True
    try:
        with path.open("rb") as handle:
            return _NAMES_LINE.search(handle.read(65536)) is not None
    except OSError:
        return False


def find_yaml(root: Path) -> Path | None:
    found = [item for item in files_under(root, root, suffixes=(".yaml", ".yml"), max_depth=1) if item.path]
    by_name = {item.relative.lower(): root / item.relative for item in found}
    for name in YAML_NAMES:
        if name in by_name:
            return by_name[name]
    candidates = [root / item.relative for item in found if looks_like_yolo_yaml(root / item.relative)]
    return candidates[0] if candidates else None


def _load_yaml(path: Path, shown: str) -> dict[str, Any]:
    try:
        if path.stat().st_size > _MAX_YAML_BYTES:
            raise ValueError(f"{shown} is larger than {_MAX_YAML_BYTES} bytes")
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as error:
        raise ValueError(f"cannot read {shown}: {error}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.MarkedYAMLError as error:
        mark = error.problem_mark or error.context_mark
        line = f" line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        raise ValueError(f"{shown}{line}: malformed YAML ({error.problem or error.context})") from None
    except yaml.YAMLError as error:
        raise ValueError(f"{shown}: malformed YAML ({error})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{shown} must be a mapping with 'names' and the split paths, got {type(data).__name__}")
    return data


def _categories(data: dict[str, Any], shown: str) -> CategoryMap:
    names = data.get("names")
    if isinstance(names, list) and names:
        pairs = list(enumerate(names))
    elif isinstance(names, dict) and names:
        pairs = []
        for key, name in names.items():
            try:
                pairs.append((int(key), name))
            except (TypeError, ValueError):
                raise ValueError(f"{shown}: names has a non-integer class id {key!r}") from None
        pairs.sort()
    else:
        raise ValueError(f"{shown} needs 'names': a list of class names or a mapping {{id: name}}")
    try:
        return CategoryMap(names=tuple(str(name) for _, name in pairs), lookup={i: n for n, (i, _) in enumerate(pairs)})
    except ValueError as error:
        raise ValueError(f"{shown}: {error}") from None


def _strip_parents(text: str) -> str:
    parts = [part for part in re.split(r"[\\/]", text) if part]
    while parts and parts[0] in ("..", "."):
        parts.pop(0)
    return "/".join(parts)


@dataclass(frozen=True)
class _Entry:
    """An image of a split: its path as listed (relative to the dataset folder), its real path, or why it has none
    (a list file's name holding a NUL: counted as a missing image)."""

    listed: str
    path: str | None
    refusal: str | None = None


def _label_name(listed: str) -> str:
    parts = listed.split("/")
    for index in range(len(parts) - 2, -1, -1):
        if parts[index] == "images":
            parts[index] = "labels"
            break
    stem, _ = os.path.splitext(parts[-1])
    parts[-1] = stem + ".txt"
    return "/".join(parts)


class YoloRecordSource:
    """One split of a YOLO dataset; label files are read (and boxes scaled by the image size) in ``records()``.
    Every label file's path is resolved here, so that one leading outside the dataset folder (a symlink) refuses
    the split (OutsidePathError) before any image or label file is read."""

    def __init__(
        self,
        *,
        name: str,
        root: Path,
        entries: list[_Entry],
        orphan_labels: list[str],
        lookup: dict,
        allow_outside_files: bool = False,
    ) -> None:
        self.name = name
        self.root = root
        self.allow_outside_files = allow_outside_files
        self.entries = entries
        self.orphan_labels = orphan_labels
        self.lookup = lookup
        self.conversions: list[tuple[str, str]] = []
        labels = [_label_name(entry.listed) for entry in entries if entry.path is not None] + list(orphan_labels)
        # Label file (relative to the dataset folder) -> the real path that records() reads.
        self._label_paths = {
            label: resolve_inside(root, label, where=label, allow_outside_files=allow_outside_files)
            for label in dict.fromkeys(labels)
        }

    def records(self) -> Iterator[RawRecord]:
        self.conversions = []
        owners: dict[str, str] = {}
        for position, entry in enumerate(self.entries):
            where = f"{self.name}: {entry.listed}"
            if entry.path is None:
                yield RawRecord(where, None, position, None, None, problem=("missing_image", entry.refusal or ""))
                continue
            label = _label_name(entry.listed)
            if label in owners:
                detail = f"{entry.listed} and {owners[label]} share the label file {label} (duplicate file names)"
                yield RawRecord(where, None, position, None, None, problem=("duplicate_image_id", detail))
                continue
            owners[label] = entry.listed
            size = image_size(entry.path)
            objects = self._objects(label, size)
            width, height = size if size is not None else (None, None)
            yield RawRecord(where, entry.path, position, width, height, objects)
        for offset, label in enumerate(self.orphan_labels):
            detail = f"label file {label} has no image (no {Path(label).stem}.* among the split's images)"
            where = f"{self.name}: {label}"
            try:
                objects = self._objects(label, None)
            except ValueError:
                objects = []
            yield RawRecord(where, None, len(self.entries) + offset, None, None, objects, ("missing_image", detail))

    def _objects(self, label: str, size: tuple[int, int] | None) -> list[RawObject]:
        path = self._label_paths[label]
        try:
            if os.path.getsize(path) > _MAX_LABEL_BYTES:
                raise ValueError(f"{label} is larger than {_MAX_LABEL_BYTES} bytes")
            with open(path, "rb") as handle:
                data = handle.read()
        except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
            return []  # no label file: a background image
        except OSError as error:
            raise ValueError(f"cannot read {label}: {error}") from None
        try:
            text = data.decode("utf-8-sig")
        except UnicodeDecodeError as error:
            raise ValueError(f"{label} is not a text label file ({error})") from None
        objects = []
        for number, line in enumerate(text.splitlines(), start=1):
            tokens = line.split()
            if not tokens:
                continue
            identifier = f"{label}:{number}"
            category = _class_id(tokens[0])
            values: list[Any] = [_float(token) for token in tokens[1:]]
            numeric = all(isinstance(value, float) for value in values)
            if len(values) >= 6 and len(values) % 2 == 0 and numeric:
                xs, ys = values[0::2], values[1::2]
                left, top, right, bottom = min(xs), min(ys), max(xs), max(ys)
                values = [(left + right) / 2, (top + bottom) / 2, right - left, bottom - top]
                self.conversions.append(
                    ("segment_to_box", f"{identifier}: a segment of {len(xs)} points reduced to its box")
                )
            if len(values) != 4 or not numeric or size is None:
                # Validation reports it (not four finite numbers), naming the file and line through the id.
                objects.append(RawObject(bbox=tokens[1:], category=category, id=identifier))
                continue
            cx, cy, w, h = values
            width, height = size
            bbox = [(cx - w / 2) * width, (cy - h / 2) * height, w * width, h * height]
            objects.append(RawObject(bbox=bbox, category=category, id=identifier))
        return objects

    def image_bytes(self, image: ImageRef) -> bytes | str:
        return str(image)


def _float(token: str) -> float | str:
    try:
        return float(token)
    except ValueError:
        return token


def _class_id(token: str) -> int | str:
    try:
        return int(token)
    except ValueError:
        value = _float(token)
        return int(value) if isinstance(value, float) and value.is_integer() else token


class _SplitMissing(Exception):
    """A split's path names nothing inside the dataset folder; the message says what was tried."""


def _tails(text: str) -> list[str]:
    """``text`` without its leading ``..``/``.`` parts, then its shorter tails of two or more parts: the spellings
    tried when a data.yaml path written for another machine (``../train/images``, ``/content/ds/train/images``)
    does not lead to a folder of this dataset."""
    parts = _strip_parents(text).split("/")
    return ["/".join(parts)] + ["/".join(parts[start:]) for start in range(1, len(parts) - 1)]


def _split_images(
    root: Path, base: Path, key: str, value: Any, shown: str, allow_outside_files: bool
) -> tuple[list[_Entry], list[str]]:
    """The images of one split and the label files that have no image."""
    items = value if isinstance(value, list) else [value]
    entries: list[_Entry] = []
    orphans: list[str] = []
    for item in items:
        if not isinstance(item, str) or not item.strip():
            raise ValueError(f"{shown}: {key} must be a path or a list of paths, got {item!r}")
        text = item.strip()
        target, refusal = None, None
        written_elsewhere = os.path.isabs(text) or text.startswith("..")
        for candidate in dict.fromkeys([text, *(_tails(text) if written_elsewhere else [])]):
            if not candidate:
                continue
            try:
                resolved = resolve_inside(
                    root, candidate, base=base, where=f"{shown} ({key})", allow_outside_files=allow_outside_files
                )
            except UnsafePathError as error:
                refusal = refusal or str(error)
                continue
            if os.path.exists(resolved):
                target = resolved
                break
        if target is None:
            raise _SplitMissing(refusal or f"{shown}: {key} path {text!r} does not exist in the dataset folder {root}")
        listed = relative_name(root, target)
        if os.path.isdir(target):
            images = files_under(root, target, suffixes=IMAGE_SUFFIXES, allow_outside_files=allow_outside_files)
            _refuse_links(images)
            entries += [_Entry(item.relative, item.path) for item in images]
            orphans += _orphan_labels(root, listed, {item.relative for item in images}, allow_outside_files)
        elif target.lower().endswith(".txt"):
            entries += _list_file(root, Path(target), listed, allow_outside_files)
        else:
            entries.append(_Entry(listed, target))
    return entries, orphans


def _orphan_labels(root: Path, folder: str, images: set[str], allow_outside_files: bool) -> list[str]:
    """Label files of the folder mirroring ``folder`` whose image is not among ``images``."""
    label_folder = _label_name(folder + "/x")
    label_folder = label_folder.rsplit("/", 1)[0] if "/" in label_folder else ""
    if label_folder == folder:
        return []
    expected = {_label_name(image) for image in images}
    found = (
        files_under(root, root / label_folder, suffixes=(".txt",), allow_outside_files=allow_outside_files)
        if label_folder
        else []
    )
    _refuse_links(found)
    return [
        item.relative for item in found if item.relative not in expected and Path(item.relative).name != "classes.txt"
    ]


def _refuse_links(found: list[FoundFile]) -> None:
    """OutsidePathError for the first file of a split's folder that is a symlink leading outside the dataset."""
    for item in found:
        if item.refusal is not None:
            raise OutsidePathError(item.refusal)


def _list_file(root: Path, path: Path, listed: str, allow_outside_files: bool) -> list[_Entry]:
    try:
        lines = path.read_text(encoding="utf-8-sig").splitlines()
    except (OSError, UnicodeDecodeError) as error:
        raise ValueError(f"cannot read the image list {listed}: {error}") from None
    entries = []
    for number, line in enumerate(lines, start=1):
        name = line.strip()
        if not name or name.startswith("#"):
            continue
        where = f"{listed} line {number}"
        base = path.parent
        try:
            resolved = resolve_inside(root, name, base=base, where=where, allow_outside_files=allow_outside_files)
        except OutsidePathError:
            raise
        except UnsafePathError as error:  # a NUL in the name: counted as a missing image
            entries.append(_Entry(name, None, str(error)))
            continue
        entries.append(_Entry(relative_name(root, resolved), resolved))
    return entries


def open_yolo(path: Path, *, allow_outside_files: bool = False) -> LoadedDataset:
    """Open a YOLO dataset folder (or its data.yaml). ``allow_outside_files``: the paths data.yaml and the image
    lists name, and symlinked images and labels, may lead outside the dataset folder (the user's own dataset)."""
    path = absolute(path)
    yaml_path, root = annotation_file(
        path, find_yaml, "a YOLO dataset needs a data.yaml naming its classes ('names') and splits"
    )
    shown = relative_name(root, yaml_path)
    resolve_inside(root, yaml_path, where=shown, allow_outside_files=allow_outside_files)
    data = _load_yaml(yaml_path, shown)
    categories = _categories(data, shown)
    base = root
    declared_root = data.get("path")
    if isinstance(declared_root, str) and declared_root.strip():
        try:
            candidate = resolve_inside(
                root, declared_root.strip(), base=yaml_path.parent, where=shown, allow_outside_files=allow_outside_files
            )
            if os.path.isdir(candidate):
                base = Path(candidate)
        except UnsafePathError:
            logger.info("%s: path %r lies outside the dataset folder; using %s", shown, declared_root, root)
    declared = {key: data[key] for key in _SPLIT_KEYS if data.get(key)}
    if not declared:
        declared = _conventional_splits(root)
        if not declared:
            raise ValueError(f"{shown} names no train/val/test paths and {root} has no images/train or train/images")
    splits: dict[str, YoloRecordSource] = {}
    for key, value in declared.items():
        name = canonical_split(key)
        if name in splits:
            raise ValueError(f"{shown}: both {key!r} and another key name the {name!r} split")
        try:
            entries, orphans = _split_images(root, base, key, value, shown, allow_outside_files)
        except _SplitMissing as missing:
            if name == "train":
                raise ValueError(str(missing)) from None
            logger.warning("%s; the %s split is left out", missing, name)
            continue
        splits[name] = YoloRecordSource(
            name=name,
            root=root,
            entries=entries,
            orphan_labels=orphans,
            lookup=dict(categories.lookup),
            allow_outside_files=allow_outside_files,
        )
    if not splits:
        raise ValueError(f"{shown}: none of the split paths exists")
    return LoadedDataset(
        splits=dict(splits), categories=categories, description=f"YOLO dataset {root}", format="yolo", root=root
    )


def _conventional_splits(root: Path) -> dict[str, str]:
    found = {}
    for key in ("train", "val", "valid", "validation", "test"):
        for folder in (f"images/{key}", f"{key}/images"):
            if (root / folder).is_dir():
                found[key] = folder
                break
    return found
