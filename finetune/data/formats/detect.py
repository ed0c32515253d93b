"""Which format a dataset folder (or file) is in, from its layout: a format name, or ValueError naming what was
found (``mixed formats: data.yaml (YOLO) and annotations.xml (CVAT)``).

Signals, each looked for at the top of the folder (and in the split folders where the format puts files there):

====================  ======================================================================================
format                what is looked for
====================  ======================================================================================
``hf``                ``dataset_dict.json`` / ``state.json`` (save_to_disk), or ``metadata.jsonl`` (imagefolder)
``coco``              a COCO JSON (an object with ``images``): ``*/_annotations.coco.json``, ``annotations/*.json``
                      or a top-level ``*.json``
``yolo``              ``data.yaml`` (or a YAML file with ``names:``)
``voc``               ``Annotations/*.xml``, or ``<annotation>`` XML files at the top or in split folders
``cvat``              ``annotations.xml`` (an ``<annotations>`` document)
``label-studio``      a top-level JSON holding a list of tasks
====================  ======================================================================================

A folder holding nothing recognisable but one sub-folder (a zip of a folder) is looked into. A folder with no
signal at all is left to ``datasets.load_dataset`` (``hf``: parquet, arrow, csv ...).
"""

from __future__ import annotations

import os
from pathlib import Path

from finetune.data.coco_format import find_coco_files
from finetune.data.formats.common import absolute, relative_name, split_from_label
from finetune.data.formats.cvat import find_cvat_xml
from finetune.data.formats.label_studio import find_exports, looks_like_label_studio
from finetune.data.formats.voc import has_voc_files
from finetune.data.formats.xmlfiles import first_tag
from finetune.data.formats.yolo import find_yaml

FORMAT_TITLES = {
    "coco": "COCO",
    "yolo": "YOLO",
    "voc": "Pascal VOC",
    "label-studio": "Label Studio",
    "cvat": "CVAT",
    "hf": "Hugging Face datasets",
}
_METADATA = ("metadata.jsonl", "metadata.csv", "metadata.parquet")


def _visible_children(folder: Path) -> list[os.DirEntry]:
    try:
        with os.scandir(folder) as entries:
            return sorted(
                (entry for entry in entries if not entry.name.startswith(".") and entry.name != "__MACOSX"),
                key=lambda entry: entry.name,
            )
    except OSError:
        return []


def _present(path: Path) -> bool:
    """A file, or a symlink (not followed: one leading outside is refused when the dataset is opened, and the
    layout must not depend on what lies outside)."""
    return os.path.islink(path) or path.is_file()


def signals(root: Path) -> list[tuple[str, str]]:
    """``(format, evidence)`` for every format whose files are in ``root`` (evidence: a relative path)."""
    found: list[tuple[str, str]] = []
    children = _visible_children(root)
    names = {entry.name for entry in children}
    for marker in ("dataset_dict.json", "state.json"):
        if marker in names:
            found.append(("hf", f"{marker} (save_to_disk)"))
            break
    else:
        metadata = [name for name in _METADATA if name in names]
        metadata += [
            f"{entry.name}/{name}"
            for entry in children
            if entry.is_dir(follow_symlinks=False)
            for name in _METADATA
            if _present(root / entry.name / name)
        ]
        if metadata:
            found.append(("hf", f"{metadata[0]} (image folder)"))
    yaml = find_yaml(root)
    if yaml is not None:
        found.append(("yolo", relative_name(root, yaml)))
    cvat = find_cvat_xml(root)
    if cvat is not None:
        found.append(("cvat", relative_name(root, cvat)))
    if "Annotations" in names and has_voc_files(root, "Annotations"):
        found.append(("voc", "Annotations/*.xml"))
    else:
        folders = [
            entry.name
            for entry in children
            if entry.is_dir(follow_symlinks=False) and split_from_label(entry.name) and has_voc_files(root, entry.name)
        ]
        if folders:
            found.append(("voc", f"{folders[0]}/*.xml"))
        elif has_voc_files(root):
            found.append(("voc", "*.xml (<annotation>)"))
    try:
        coco = find_coco_files(root)
    except ValueError:
        coco = {"": root}
    if coco:
        found.append(("coco", relative_name(root, next(iter(coco.values())))))
    exports = find_exports(root)
    if exports:
        found.append(("label-studio", relative_name(root, exports[0])))
    return found


def detect(path: Path) -> tuple[str, Path]:
    """The format of ``path`` and the folder (or file) to open it from."""
    path = absolute(path)
    if path.is_file():
        return _detect_file(path), path
    for _ in range(3):
        found = signals(path)
        formats = list(dict.fromkeys(name for name, _ in found))
        if len(formats) > 1:
            shown = " and ".join(f"{evidence} ({FORMAT_TITLES[name]})" for name, evidence in found)
            raise ValueError(
                f"mixed formats in {path}: {shown}; keep one format per dataset folder, or choose one with the "
                "dataset format option (--dataset-format)"
            )
        if formats:
            return formats[0], path
        children = _visible_children(path)
        if len(children) == 1 and children[0].is_dir(follow_symlinks=False):
            path = path / children[0].name
            continue
        break
    return "hf", path


def unwrap(path: Path) -> Path:
    """``path``, or the folder it wraps when it holds nothing but one folder (a zip of a folder), up to 3 deep."""
    for _ in range(3):
        children = _visible_children(path)
        if len(children) != 1 or not children[0].is_dir(follow_symlinks=False):
            break
        path = path / children[0].name
    return path


def detect_format(path: str | os.PathLike) -> str:
    """The format name of a dataset folder or file (see the module doc)."""
    return detect(Path(path))[0]


def _detect_file(path: Path) -> str:
    suffix = path.suffix.lower()
    if suffix == ".json":
        return "label-studio" if looks_like_label_studio(path) else "coco"
    if suffix in (".yaml", ".yml"):
        return "yolo"
    if suffix == ".xml":
        tag = first_tag(path)
        if tag == "annotations":
            return "cvat"
        raise ValueError(
            f"{path} is an XML file whose document element is <{tag}>; a CVAT export is <annotations> "
            "(annotations.xml), and a Pascal VOC dataset is opened as its folder"
        )
    raise ValueError(
        f"{path} is a file but not COCO JSON or another dataset file: pass a dataset folder, a COCO or Label Studio "
        ".json, a YOLO data.yaml, a CVAT annotations.xml, a .zip of a dataset folder, or a hub id"
    )
