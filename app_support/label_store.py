"""A visitor's labelled images, kept as a COCO dataset on disk and saved atomically after every change.

Layout in a visitor's folder (``dataset/`` is what ``finetune`` reads, as COCO: one annotation file, the images
in ``images/`` beside it)::

    dataset/images/000001.png ...      copies of the uploads, under server-chosen names
    dataset/annotations.json           COCO: categories = the class list; images = the labelled ones (a labelled
                                       image without boxes is background); annotations = their boxes
    progress.json                      every uploaded image's status (unlabelled / labelled / background) and boxes
                                       (outside dataset/, where a COCO reader would take it for a second split)

``progress.json`` is the source of truth and ``annotations.json`` is written from it on every save, both through a
temporary file and a rename, so a reload or a server restart finds exactly the last saved state and a crash
mid-write leaves the previous one.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import threading
import uuid
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ddetr.processing import load_image

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
MAX_IMAGES = 500  # per visitor: a labelling session, not a dataset host
MAX_CLASSES = 100
STATUSES = ("unlabelled", "labelled", "background")


@dataclass
class LabelledImage:
    file: str  # name under images/
    width: int
    height: int
    digest: str  # sha256 of the upload, so the same photo is not added twice
    status: str = "unlabelled"
    boxes: list[dict[str, Any]] = field(default_factory=list)  # {"label", "xmin", "ymin", "xmax", "ymax"} pixels


def dataset_folder(visitor_folder: Path) -> Path:
    """Where a visitor's Label-tab dataset lives inside their folder."""
    return Path(visitor_folder) / "dataset"


def progress_file(visitor_folder: Path) -> Path:
    return Path(visitor_folder) / "progress.json"


def _write_atomically(path: Path, payload: Any) -> None:
    temporary = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.partial")
    temporary.write_text(json.dumps(payload, indent=1) + "\n", encoding="utf-8")
    os.replace(temporary, path)


def clean_box(box: dict[str, Any], width: int, height: int, classes: list[str]) -> dict[str, Any] | None:
    """A box from the annotator clamped to the image, or None when it has no area or an unknown class."""
    label = str(box.get("label") or "")
    if label not in classes:
        return None
    xmin, xmax = sorted(min(max(float(box[key]), 0.0), width) for key in ("xmin", "xmax"))
    ymin, ymax = sorted(min(max(float(box[key]), 0.0), height) for key in ("ymin", "ymax"))
    if xmax - xmin < 1 or ymax - ymin < 1:
        return None
    return {"label": label, "xmin": xmin, "ymin": ymin, "xmax": xmax, "ymax": ymax}


class LabelStore:
    """One visitor's dataset: add images, set classes, save boxes; every method leaves the files consistent."""

    def __init__(self, visitor_folder: Path) -> None:
        self.folder = dataset_folder(visitor_folder)
        self.progress = progress_file(visitor_folder)
        self.images_dir = self.folder / "images"
        self._lock = threading.Lock()
        self.classes: list[str] = []
        self.images: list[LabelledImage] = []
        if self.progress.is_file():
            state = json.loads(self.progress.read_text(encoding="utf-8"))
            self.classes = [str(name) for name in state.get("classes", [])]
            self.images = [LabelledImage(**entry) for entry in state.get("images", [])]

    # -- changes ------------------------------------------------------------------------------------------------ #

    def add_images(self, paths: list[Path]) -> tuple[int, list[str]]:
        """Copy new images in (duplicates by content are skipped); returns (added, problems by file name)."""
        problems: list[str] = []
        added = 0
        with self._lock:
            self.images_dir.mkdir(parents=True, exist_ok=True)
            known = {image.digest for image in self.images}
            for path in paths:
                if len(self.images) >= MAX_IMAGES:
                    problems.append(f"{path.name}: skipped, a dataset holds at most {MAX_IMAGES} images")
                    continue
                data = path.read_bytes()
                digest = hashlib.sha256(data).hexdigest()
                if digest in known:
                    continue
                try:
                    picture = load_image(data)
                except ValueError as error:
                    problems.append(f"{path.name}: {error}")
                    continue
                name = f"{len(self.images) + 1:06d}.png"
                target = self.images_dir / name
                partial = target.with_name(f".{name}.partial")
                picture.save(partial, format="PNG")  # decoded once here: orientation applied, one format
                os.replace(partial, target)
                self.images.append(LabelledImage(name, picture.width, picture.height, digest))
                known.add(digest)
                added += 1
            self._save()
        return added, problems

    def set_classes(self, names: list[str]) -> None:
        cleaned = list(dict.fromkeys(name.strip() for name in names if name.strip()))
        if not cleaned:
            raise ValueError("give at least one class name (comma-separated)")
        if len(cleaned) > MAX_CLASSES:
            raise ValueError(f"at most {MAX_CLASSES} classes, got {len(cleaned)}")
        with self._lock:
            self.classes = cleaned
            for image in self.images:  # boxes of a class that is gone go with it
                image.boxes = [box for box in image.boxes if box["label"] in cleaned]
                if image.status == "labelled" and not image.boxes:
                    image.status = "unlabelled"
            self._save()

    def save_boxes(self, index: int, boxes: list[dict[str, Any]], *, background: bool) -> LabelledImage:
        """Store an image's boxes (clamped; unknown classes dropped). Boxes mark it labelled, ``background``
        marks it labelled with none; no boxes and no background mark leaves it unlabelled."""
        with self._lock:
            image = self.images[self._checked(index)]
            kept = [clean_box(box, image.width, image.height, self.classes) for box in boxes]
            image.boxes = [box for box in kept if box is not None]
            image.status = "labelled" if image.boxes else "background" if background else "unlabelled"
            self._save()
            return image

    def clear(self) -> None:
        with self._lock:
            shutil.rmtree(self.images_dir, ignore_errors=True)
            self.images = []
            self._save()

    # -- reading ------------------------------------------------------------------------------------------------ #

    def _checked(self, index: int) -> int:
        if not 0 <= index < len(self.images):
            raise ValueError(f"no image {index + 1}: the dataset has {len(self.images)}")
        return index

    def image_path(self, index: int) -> Path:
        return self.images_dir / self.images[self._checked(index)].file

    def labelled_count(self) -> int:
        return sum(image.status != "unlabelled" for image in self.images)

    def class_counts(self) -> dict[str, int]:
        counts = Counter(box["label"] for image in self.images for box in image.boxes)
        return {name: counts.get(name, 0) for name in self.classes}

    def coco(self) -> dict[str, Any]:
        """The labelled part as COCO (``bbox`` = ``[x, y, w, h]`` pixels; category ids from 1)."""
        category_ids = {name: number for number, name in enumerate(self.classes, start=1)}
        images, annotations = [], []
        for image_id, image in enumerate(self.images, start=1):
            if image.status == "unlabelled":
                continue
            images.append({"id": image_id, "file_name": image.file, "width": image.width, "height": image.height})
            for box in image.boxes:
                w, h = box["xmax"] - box["xmin"], box["ymax"] - box["ymin"]
                annotations.append(
                    {
                        "id": len(annotations) + 1,
                        "image_id": image_id,
                        "category_id": category_ids[box["label"]],
                        "bbox": [box["xmin"], box["ymin"], w, h],
                        "area": w * h,
                        "iscrowd": 0,
                    }
                )
        categories = [{"id": number, "name": name} for name, number in category_ids.items()]
        return {"images": images, "annotations": annotations, "categories": categories}

    def _save(self) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        state = {"classes": self.classes, "images": [asdict(image) for image in self.images]}
        _write_atomically(self.progress, state)
        _write_atomically(self.folder / "annotations.json", self.coco())
