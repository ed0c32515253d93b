"""Reading COCO detection JSON (``images``, ``annotations``, ``categories``) plus an image folder.

Layouts found in the wild, all accepted by :func:`find_coco_files`:

* one JSON file, images beside it or in ``images/``;
* Roboflow: ``train/_annotations.coco.json``, ``valid/...``, ``test/...`` with the images in each folder;
* COCO 2017: ``annotations/instances_train2017.json`` with the images in ``train2017/`` (or ``images/train2017``).

The reader keeps what the file says, problems included; validation decides what to keep.
"""

from __future__ import annotations

import contextlib
import json
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from finetune.data.categories import CategoryMap
from finetune.data.records import ImageRef, RawObject, RawRecord

ROBOFLOW_NAME = "_annotations.coco.json"


def load_coco_json(path: Path) -> dict[str, Any]:
    """The parsed file, checked to have the three COCO lists; ValueError naming the file otherwise."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as error:
        raise ValueError(f"cannot read COCO annotations {path}: {error}") from None
    except json.JSONDecodeError as error:
        raise ValueError(f"{path} is not valid JSON: {error}") from None
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise ValueError(f"{path} is not COCO detection JSON: it needs an 'images' list")
    if not isinstance(data.get("annotations", []), list):
        raise ValueError(f"{path}: 'annotations' must be a list")
    return data


def looks_like_coco(path: Path) -> bool:
    """Whether a JSON file holds COCO detection lists (checked cheaply, on the first few KB)."""
    try:
        with path.open("rb") as handle:
            head = handle.read(65536)
    except OSError:
        return False
    return b'"images"' in head or b'"annotations"' in head or b'"categories"' in head


def split_name_for(path: Path) -> str:
    """A split name from a Roboflow folder name or a COCO file name (instances_val2017.json -> validation)."""
    label = path.parent.name if path.name == ROBOFLOW_NAME else path.stem
    label = label.lower()
    for name, keys in (("train", ("train",)), ("validation", ("valid", "val", "dev")), ("test", ("test",))):
        if any(key in label for key in keys):
            return name
    return label or "train"


def find_coco_files(directory: Path) -> dict[str, Path]:
    """COCO annotation files of a dataset folder by split name; empty if the folder is not a COCO dataset."""
    candidates = sorted(directory.glob(f"*/{ROBOFLOW_NAME}"))
    if (directory / ROBOFLOW_NAME).is_file():
        candidates.append(directory / ROBOFLOW_NAME)
    if not candidates:
        candidates = [p for p in sorted((directory / "annotations").glob("*.json")) if looks_like_coco(p)]
        candidates = [p for p in candidates if not p.name.startswith(("person_keypoints", "captions"))]
    if not candidates:
        candidates = [p for p in sorted(directory.glob("*.json")) if looks_like_coco(p)]
    files: dict[str, Path] = {}
    for path in candidates:
        name = split_name_for(path) if len(candidates) > 1 else "train"
        if name in files:
            raise ValueError(f"{directory}: both {files[name]} and {path} look like the {name!r} split")
        files[name] = path
    return files


class CocoRecordSource:
    """One COCO annotation file as raw records; ``image_bytes`` returns the image path."""

    def __init__(self, *, name: str, annotation_file: Path, image_root: Path | None = None) -> None:
        self.name = name
        self.annotation_file = Path(annotation_file)
        data = load_coco_json(self.annotation_file)
        self.categories = CategoryMap.from_coco(data.get("categories", []))
        self._images: list[Any] = data["images"]
        self._annotations: list[Any] = data.get("annotations", [])
        self._roots = self._image_roots(image_root)
        # Descriptions of annotations whose image_id names no image; validation counts them.
        self.orphan_annotations: list[str] = []

    def _image_roots(self, image_root: Path | None) -> list[Path]:
        if image_root is not None:
            return [Path(image_root)]
        here, parent = self.annotation_file.parent, self.annotation_file.parent.parent
        tail = self.annotation_file.stem.split("_")[-1]  # instances_val2017 -> val2017
        roots = [here, here / "images", parent, parent / "images", parent / tail, parent / "images" / tail]
        return list(dict.fromkeys(roots))

    def _resolve(self, file_name: str) -> str | None:
        """The image's path inside one of the roots; None (a missing image) for names that would leave them,
        such as ``../../etc/passwd`` or an absolute path: annotation files are user input."""
        inside = False
        for root in self._roots:
            candidate = root / file_name
            if not candidate.resolve().is_relative_to(root.resolve()):
                continue
            inside = True
            if candidate.is_file():
                # The next image most likely lives in the same folder.
                self._roots.remove(root)
                self._roots.insert(0, root)
                return str(candidate)
        return str(self._roots[0] / file_name) if inside else None

    def records(self) -> Iterator[RawRecord]:
        by_image: dict[Any, list[RawObject]] = defaultdict(list)
        image_ids = set()
        for entry in self._images:
            if isinstance(entry, dict):
                with contextlib.suppress(TypeError):
                    image_ids.add(entry.get("id"))
        self.orphan_annotations = []
        for position, annotation in enumerate(self._annotations):
            if not isinstance(annotation, dict):
                self.orphan_annotations.append(f"annotations[{position}] is not an object")
                continue
            owner = annotation.get("image_id")
            try:
                known = owner in image_ids
            except TypeError:
                known = False
            if not known:
                self.orphan_annotations.append(
                    f"annotation id {annotation.get('id')!r} refers to image_id {owner!r}, which is not in 'images'"
                )
                continue
            by_image[owner].append(
                RawObject(
                    bbox=annotation.get("bbox"),
                    category=annotation.get("category_id"),
                    id=annotation.get("id"),
                    iscrowd=annotation.get("iscrowd", 0),
                )
            )
        for position, entry in enumerate(self._images):
            entry = entry if isinstance(entry, dict) else {}
            file_name = entry.get("file_name")
            image: ImageRef | None = self._resolve(file_name) if isinstance(file_name, str) and file_name else None
            identifier = entry.get("id")
            try:
                objects = by_image.get(identifier, [])
                # Each image's objects once, even when its id repeats: the duplicate record is dropped anyway.
                by_image.pop(identifier, None)
            except TypeError:
                objects = []
            yield RawRecord(
                where=f"{self.name}: images[{position}] (id {identifier!r}, file {file_name!r})",
                image=image,
                image_id=identifier,
                width=entry.get("width"),
                height=entry.get("height"),
                objects=objects,
            )

    def image_bytes(self, image: ImageRef) -> bytes | str:
        return str(image)
