"""COCO detection JSON, including Roboflow's export (``train/_annotations.coco.json``, ``valid/...``, ``test/...``
with the images beside each file) and the COCO 2017 layout (``annotations/instances_train2017.json`` with
``train2017/``); see ``finetune.data.coco_format`` for the reader.

Roboflow's exports carry a placeholder category (id 0, named after the project, the ``supercategory`` of every
real class) that no annotation uses; a category that no split's annotations use and that is the supercategory of
another is left out of the class list.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from finetune.data.categories import CategoryMap
from finetune.data.coco_format import CocoRecordSource, find_coco_files
from finetune.data.formats.common import LoadedDataset, absolute, canonical_split


def _used_ids(split: CocoRecordSource) -> set[Any]:
    used = set()
    for annotation in split._annotations:
        if isinstance(annotation, dict):
            try:
                used.add(annotation.get("category_id"))
            except TypeError:
                continue
    return used


def _without_placeholders(raw: list[Any], used: set[Any]) -> list[Any]:
    if not isinstance(raw, list):
        return raw
    # (name, supercategory) of each category: a placeholder is the supercategory of some *other* category.
    pairs = [(str(entry.get("name")), str(entry.get("supercategory"))) for entry in raw if isinstance(entry, dict)]
    kept = []
    for entry in raw:
        if isinstance(entry, dict) and isinstance(entry.get("id"), int) and entry["id"] not in used:
            name = str(entry.get("name"))
            if any(parent == name and child != name for child, parent in pairs):
                continue
        kept.append(entry)
    return kept if kept else raw


def open_coco(source: Path, *, dataset_root: Path | None = None, allow_outside_files: bool = False) -> LoadedDataset:
    """A COCO JSON file, or a folder in one of the COCO layouts. ``allow_outside_files``: image file names may lead
    outside the dataset folder (the user's own dataset)."""
    source = absolute(source)
    if source.is_file():
        files, description = {"train": source}, f"COCO file {source}"
    else:
        files, description = find_coco_files(source), f"COCO dataset {source}"
        if not files:
            raise ValueError(f"{source}: no COCO annotation file (JSON with 'images') found")
        dataset_root = dataset_root or source
    splits = {
        canonical_split(name): CocoRecordSource(
            name=canonical_split(name),
            annotation_file=path,
            dataset_root=dataset_root,
            allow_outside_files=allow_outside_files,
        )
        for name, path in files.items()
    }
    used: set[Any] = set()
    for split in splits.values():
        used |= _used_ids(split)
    reference_name = "train" if "train" in splits else next(iter(splits))
    for split in splits.values():
        split.categories = CategoryMap.from_coco(_without_placeholders(split.raw_categories, used))
    categories = splits[reference_name].categories
    for name, split in splits.items():
        if split.categories.names != categories.names:
            raise ValueError(
                f"{description}: split {name!r} has categories {list(split.categories.names)} but "
                f"{reference_name!r} has {list(categories.names)}; all splits must share one category list"
            )
    root = dataset_root or splits[reference_name].dataset_root
    return LoadedDataset(splits=dict(splits), categories=categories, description=description, format="coco", root=root)
