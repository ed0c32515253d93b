"""The five ways to name a training dataset in the UI, turned into a source string ``finetune`` can open.

- the synthetic shapes dataset: sizes come from bounded sliders, never from free text, so nobody can ask the
  server to generate a million images;
- a Hugging Face Hub dataset id: checked to look like one, and refused when it also names a local path (the
  dataset reader tries local paths first, so ``data`` or ``.git`` must not slip through as "hub ids");
- a path under the allow-listed data folder (see ``paths.resolve_inside``);
- an uploaded zip, unpacked safely and once into its owner's part of the private work area (see ``uploads``);
- the visitor's own dataset from the Label tab (found through their browser token, never through a typed path).

Whatever a dataset's files name must lie inside its folder: the dataset readers refuse anything else (the app never
sets ``allow_outside_files``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from app_support.paths import AppPaths, resolve_inside
from app_support.uploads import UploadStore

DatasetKind = Literal["shapes", "hub", "folder", "upload", "labelled"]
DATASET_KINDS: tuple[tuple[str, DatasetKind], ...] = (
    ("Synthetic shapes", "shapes"),
    ("Hugging Face Hub dataset", "hub"),
    ("Folder under data/", "folder"),
    ("Upload a zip", "upload"),
    ("My labelled images (Label tab)", "labelled"),
)
SHAPES_TRAIN_RANGE = (8, 2000)
SHAPES_VALIDATION_RANGE = (2, 400)
SHAPES_SIZES = (128, 192, 256, 320)
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,95}(/[A-Za-z0-9][A-Za-z0-9._-]{0,95})?$")


class DatasetChoiceError(ValueError):
    """The dataset fields of the form do not name a usable dataset."""


@dataclass(frozen=True)
class DatasetChoice:
    """A dataset as ``finetune.data.sources.open_dataset`` takes it, and how to show it to the user."""

    source: str
    label: str


def shapes_choice(train_images: int, validation_images: int, image_size: int) -> DatasetChoice:
    train, validation, size = int(train_images), int(validation_images), int(image_size)
    if not SHAPES_TRAIN_RANGE[0] <= train <= SHAPES_TRAIN_RANGE[1]:
        raise DatasetChoiceError(f"shapes: training images must be in {SHAPES_TRAIN_RANGE}, got {train}")
    if not SHAPES_VALIDATION_RANGE[0] <= validation <= SHAPES_VALIDATION_RANGE[1]:
        raise DatasetChoiceError(f"shapes: validation images must be in {SHAPES_VALIDATION_RANGE}, got {validation}")
    if size not in SHAPES_SIZES:
        raise DatasetChoiceError(f"shapes: image size must be one of {SHAPES_SIZES}, got {size}")
    spec = f"shapes:train={train},validation={validation},test=0,size={size}"
    return DatasetChoice(spec, f"synthetic shapes ({train} train / {validation} validation, {size} px)")


def hub_choice(dataset_id: str, *, cwd: Path | None = None) -> DatasetChoice:
    text = (dataset_id or "").strip()
    if not _HUB_ID.match(text) or ".." in text:
        raise DatasetChoiceError(f"{text!r} is not a Hugging Face dataset id (expected 'name' or 'owner/name')")
    if text == "shapes" or text.startswith("shapes:"):
        raise DatasetChoiceError("'shapes' is the synthetic dataset; choose 'Synthetic shapes' instead")
    base = cwd if cwd is not None else Path.cwd()
    if (base / text).exists() or Path(text).exists():
        raise DatasetChoiceError(f"{text!r} is also a local path on the server; it cannot be used as a hub id")
    return DatasetChoice(text, f"hub dataset {text}")


def folder_choice(paths: AppPaths, relative_path: str) -> DatasetChoice:
    resolved = resolve_inside(paths.data, relative_path)
    return DatasetChoice(str(resolved), f"data/{resolved.relative_to(paths.data).as_posix()}")


def upload_choice(uploads: UploadStore, owner_key: str | None, uploaded_file: str | None) -> DatasetChoice:
    if not uploaded_file:
        raise DatasetChoiceError("upload a .zip with COCO JSON + images, or an image folder with metadata.jsonl")
    if owner_key is None:
        raise DatasetChoiceError("reload the page: this browser's session is not known to the server")
    root = uploads.unpack(owner_key, Path(uploaded_file))
    return DatasetChoice(str(root), f"uploaded {Path(uploaded_file).name}")


def labelled_choice(folder: Path | None) -> DatasetChoice:
    """The visitor's own Label-tab dataset (``folder`` is None when the browser's session is unknown)."""
    if folder is None or not (folder / "annotations.json").is_file():
        raise DatasetChoiceError("no labelled images yet: label some in the Label tab first")
    return DatasetChoice(str(folder), "your labelled images")


def data_folder_entries(paths: AppPaths) -> list[str]:
    """Top-level entries of the data folder, offered in the picker (a deeper relative path may also be typed)."""
    if not paths.data.is_dir():
        return []
    return sorted(
        p.name for p in paths.data.iterdir() if not p.name.startswith(".") and (p.is_dir() or p.suffix == ".json")
    )


def resolve_dataset(
    paths: AppPaths,
    kind: str,
    *,
    shapes_train: int = 200,
    shapes_validation: int = 40,
    shapes_size: int = 192,
    hub_id: str = "",
    folder: str = "",
    upload: str | None = None,
    uploads: UploadStore | None = None,
    owner_key: str | None = None,
    labelled: Path | None = None,
) -> DatasetChoice:
    """The dataset the form describes; ``DatasetChoiceError`` / ``PathNotAllowedError`` / ``ArchiveError`` if none."""
    if kind == "shapes":
        return shapes_choice(shapes_train, shapes_validation, shapes_size)
    if kind == "hub":
        return hub_choice(hub_id)
    if kind == "folder":
        return folder_choice(paths, folder)
    if kind == "upload":
        if uploads is None:
            raise DatasetChoiceError("this server takes no uploads")
        return upload_choice(uploads, owner_key, upload)
    if kind == "labelled":
        return labelled_choice(labelled)
    raise DatasetChoiceError(f"unknown dataset kind {kind!r}; choose one of {[k for _, k in DATASET_KINDS]}")
