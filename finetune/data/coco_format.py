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
import os
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from finetune.data.categories import CategoryMap
from finetune.data.formats.common import SPLIT_ALIASES
from finetune.data.formats.paths import OutsidePathError, UnsafePathError, files_under, resolve_inside
from finetune.data.records import ImageRef, RawObject, RawRecord

ROBOFLOW_NAME = "_annotations.coco.json"
# The files ``datasets.save_to_disk`` writes (their feature lists may name "annotations" or "images").
_NOT_COCO = frozenset({"dataset_info.json", "state.json", "dataset_dict.json"})


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
    """Whether a JSON file holds COCO detection lists (checked cheaply, on the first few KB): an object naming
    them. A Label Studio export, a list of tasks with their own "annotations", is not COCO."""
    try:
        with path.open("rb") as handle:
            head = handle.read(65536)
    except OSError:
        return False
    if not head.lstrip(b"\xef\xbb\xbf \t\r\n").startswith(b"{"):
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


def _json_files(directory: Path, folder: str, depth: int) -> list[Path]:
    """JSON files ``depth`` levels below ``directory/folder`` (1: in it), never through a symlink that leads
    outside ``directory``."""
    found = files_under(directory, directory / folder, suffixes=(".json",), max_depth=depth)
    wanted = depth - 1 + (folder.count("/") + 1 if folder else 0)
    return [
        directory / item.relative
        for item in found
        if item.path is not None and item.relative.count("/") == wanted and Path(item.relative).name not in _NOT_COCO
    ]


def find_coco_files(directory: Path) -> dict[str, Path]:
    """COCO annotation files of a dataset folder by split name; empty if the folder is not a COCO dataset. A single
    file is the ``train`` split unless its folder or file name is a split name (``test/_annotations.coco.json``,
    ``validation.json``)."""
    directory = Path(os.path.abspath(directory))
    top_level = _json_files(directory, "", 1)
    candidates = [p for p in top_level + _json_files(directory, "", 2) if p.name == ROBOFLOW_NAME]
    if not candidates:
        candidates = [p for p in _json_files(directory, "annotations", 1) if looks_like_coco(p)]
        candidates = [p for p in candidates if not p.name.startswith(("person_keypoints", "captions"))]
    if not candidates:
        candidates = [p for p in top_level if looks_like_coco(p)]
    if len(candidates) == 1:
        path = candidates[0]
        if path.name == ROBOFLOW_NAME:
            label = "" if path.parent == directory else path.parent.name
        else:
            label = path.stem
        return {SPLIT_ALIASES.get(label.lower(), "train"): path}
    files: dict[str, Path] = {}
    for path in candidates:
        name = "train" if path.parent == directory and path.name == ROBOFLOW_NAME else split_name_for(path)
        if name in files:
            raise ValueError(f"{directory}: both {files[name]} and {path} look like the {name!r} split")
        files[name] = path
    return files


class CocoRecordSource:
    """One COCO annotation file as raw records; ``image_bytes`` returns the image path. An image ``file_name`` that
    leads outside the dataset folder (from every folder images are looked for in) refuses the whole file with
    OutsidePathError when it is opened, before any image is looked at, unless ``allow_outside_files``."""

    def __init__(
        self,
        *,
        name: str,
        annotation_file: Path,
        image_root: Path | None = None,
        dataset_root: Path | None = None,
        allow_outside_files: bool = False,
    ) -> None:
        self.name = name
        # The user's opt-out for their own dataset: file names may then lead anywhere.
        self.allow_outside_files = allow_outside_files
        self.annotation_file = Path(os.path.abspath(annotation_file))
        # Images must lie inside the dataset folder: the folder that was opened, else the annotation file's folder
        # (its parent for a file inside ``annotations/``, the COCO 2017 layout).
        here = self.annotation_file.parent
        default_root = here.parent if here.name == "annotations" else here
        self.dataset_root = Path(os.path.abspath(dataset_root)) if dataset_root is not None else default_root
        data = load_coco_json(self.annotation_file)
        self.raw_categories: list[Any] = data.get("categories", [])
        self.categories = CategoryMap.from_coco(self.raw_categories)
        self._images: list[Any] = data["images"]
        self._annotations: list[Any] = data.get("annotations", [])
        self._roots = self._image_roots(image_root)
        if not allow_outside_files:
            self._check_file_names()
        # Descriptions of annotations whose image_id names no image; validation counts them.
        self.orphan_annotations: list[str] = []

    def _image_roots(self, image_root: Path | None) -> list[Path]:
        if image_root is not None:
            return [Path(image_root)]
        here, parent = self.annotation_file.parent, self.annotation_file.parent.parent
        tail = self.annotation_file.stem.split("_")[-1]  # instances_val2017 -> val2017
        roots = [here, here / "images", parent, parent / "images", parent / tail, parent / "images" / tail]
        top = os.path.abspath(self.dataset_root)
        return [root for root in dict.fromkeys(roots) if os.path.commonpath([os.path.abspath(root), top]) == top]

    def _where(self, position: int) -> str:
        return f"{self.annotation_file.name} images[{position}]"

    def _check_file_names(self) -> None:
        """OutsidePathError for the first image whose file_name leads outside the dataset folder from every root:
        judged as text and by looking only inside the dataset folder, so the same whether or not the file exists."""
        for position, entry in enumerate(self._images):
            file_name = entry.get("file_name") if isinstance(entry, dict) else None
            if not isinstance(file_name, str) or not file_name:
                continue
            refusal: OutsidePathError | None = None
            for root in self._roots:
                try:
                    resolve_inside(self.dataset_root, file_name, base=root, where=self._where(position))
                except OutsidePathError as error:
                    refusal = refusal or error
                    continue
                except UnsafePathError:
                    pass  # a NUL in the name: records() counts it as a missing image
                refusal = None
                break
            if refusal is not None:
                raise refusal

    def _resolve(self, file_name: str, position: int) -> tuple[str | None, str | None]:
        """The image's path inside one of the roots (a missing file's when none holds it), or (None, why) for a
        name that cannot be a path (a NUL). A name that would leave the dataset folder from every root, such as
        ``../../etc/passwd`` or an absolute path elsewhere, raises OutsidePathError without looking at what it
        names (``_check_file_names`` refused it already when the file was opened)."""
        first: str | None = None
        refusal: UnsafePathError | None = None
        for root in list(self._roots):
            try:
                candidate = resolve_inside(
                    self.dataset_root,
                    file_name,
                    base=root,
                    where=self._where(position),
                    allow_outside_files=self.allow_outside_files,
                )
            except UnsafePathError as error:
                refusal = refusal if isinstance(refusal, OutsidePathError) else error
                continue
            first = first or candidate
            if os.path.isfile(candidate):
                # The next image most likely lives in the same folder.
                self._roots.remove(root)
                self._roots.insert(0, root)
                return candidate, None
        if first is None and isinstance(refusal, OutsidePathError):
            raise refusal
        return first, (None if first is not None or refusal is None else str(refusal))

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
            image: ImageRef | None = None
            problem: tuple[str, str] | None = None
            if isinstance(file_name, str) and file_name:
                image, refusal = self._resolve(file_name, position)
                if refusal is not None:
                    problem = ("missing_image", refusal)
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
                problem=problem,
            )

    def image_bytes(self, image: ImageRef) -> bytes | str:
        return str(image)
