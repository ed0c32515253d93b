"""Pascal VOC: one XML file per image (``<annotation>`` with ``<filename>``, ``<size>`` and ``<object>``\\ s, each
``<name>`` and ``<bndbox>`` ``xmin ymin xmax ymax``).

Layouts:

* classic: ``Annotations/*.xml``, images in ``JPEGImages/``, splits from ``ImageSets/Main/train.txt``, ``val.txt``
  and ``test.txt`` (one image id per line; ``trainval.txt`` stands for train when there is no ``train.txt``);
  without ``ImageSets`` every image is in ``train``;
* Roboflow: split folders ``train/``, ``valid/``, ``test/``, each holding the images and their XML files side by
  side;
* flat: XML files and images in one folder (or the images in ``images/``): one ``train`` split.

Coordinates are pixel corners (``xmin, ymin`` the top-left corner, ``xmax, ymax`` the bottom-right one, as CVAT,
Roboflow and LabelImg write them), so the COCO box is ``[xmin, ymin, xmax - xmin, ymax - ymin]``; fractional values
are kept. Class names are sorted alphabetically (VOC files carry no class list). ``difficult`` objects are kept
as ordinary objects. The XML is parsed with defusedxml (DTDs and entities refused).

An image ``<filename>`` (or an ImageSets id) that leads outside the dataset folder refuses the dataset when it is
opened (OutsidePathError naming the XML file or ImageSets line and ``--allow-outside-files``); nothing it names
is looked at.
"""

from __future__ import annotations

import os
from pathlib import Path

from finetune.data.categories import CategoryMap
from finetune.data.formats.common import (
    IMAGE_SUFFIXES,
    LoadedDataset,
    ParsedRecordSource,
    absolute,
    split_from_label,
)
from finetune.data.formats.paths import OutsidePathError, UnsafePathError, files_under, resolve_inside
from finetune.data.formats.xmlfiles import first_tag, number, parse_xml, text_of
from finetune.data.records import RawObject, RawRecord

_IMAGE_SETS = {"train": ("train.txt", "trainval.txt"), "validation": ("val.txt",), "test": ("test.txt",)}


def _xml_files(root: Path, folder: str) -> list[str]:
    """The VOC XML files directly in ``folder`` (relative to the dataset folder), by relative path."""
    directory = root / folder if folder else root
    found = files_under(root, directory, suffixes=(".xml",), max_depth=1)
    return [item.relative for item in found if item.path is not None and first_tag(Path(item.path)) == "annotation"]


def has_voc_files(root: Path, folder: str = "") -> bool:
    """Whether ``folder`` holds a VOC XML file (it sniffs files only until it finds one)."""
    directory = root / folder if folder else root
    for item in files_under(root, directory, suffixes=(".xml",), max_depth=1):
        if item.path is not None and first_tag(Path(item.path)) == "annotation":
            return True
    return False


def _find_image(
    root: Path, folders: list[str], file_name: str | None, stem: str, where: str, allow_outside_files: bool
) -> tuple[str | None, str]:
    """The image of an annotation: ``file_name`` in one of ``folders``, else a file named after the XML's stem.
    Returns (path, "") -- a missing file's path when none exists -- or (None, why) when no name can be a path (a
    NUL). OutsidePathError when ``file_name`` leads outside the dataset folder from one of the folders, or every
    name tried does (the folders are symlinks leading out)."""
    names = [file_name] if file_name else []
    names += [stem + suffix for suffix in IMAGE_SUFFIXES if stem + suffix != file_name]
    first: str | None = None
    refusal: OutsidePathError | None = None
    unusable = f"{where} names no image"
    for name in names:
        for folder in folders:
            try:
                candidate = resolve_inside(
                    root,
                    name,
                    base=root / folder if folder else root,
                    where=where,
                    allow_outside_files=allow_outside_files,
                )
            except OutsidePathError as error:
                if name == file_name:
                    raise
                refusal = refusal or error
                continue
            except UnsafePathError as error:  # a NUL in the name
                unusable = str(error)
                continue
            first = first or candidate
            if os.path.isfile(candidate):
                return candidate, ""
    if first is not None:
        return first, ""
    if refusal is not None:
        raise refusal
    return None, unusable


def _parse(
    root: Path, xml_relative: str, folders: list[str], split: str, allow_outside_files: bool
) -> tuple[RawRecord, list[str]]:
    path = Path(resolve_inside(root, xml_relative, where=xml_relative, allow_outside_files=allow_outside_files))
    element = parse_xml(path, shown=xml_relative)
    if element.tag != "annotation":
        raise ValueError(f"{xml_relative}: expected a Pascal VOC <annotation>, found <{element.tag}>")
    file_name = text_of(element, "filename")
    stem = Path(xml_relative).stem
    image, why = _find_image(root, folders, file_name, stem, xml_relative, allow_outside_files)
    size = element.find("size")
    width, height = number(text_of(size, "width")), number(text_of(size, "height"))
    objects, names = [], []
    for obj in element.iter("object"):
        name = text_of(obj, "name")
        box = obj.find("bndbox")
        corners = [number(text_of(box, key)) for key in ("xmin", "ymin", "xmax", "ymax")]
        if all(isinstance(value, float) for value in corners):
            x0, y0, x1, y1 = (float(value) for value in corners)  # type: ignore[arg-type]
            bbox: object = [x0, y0, x1 - x0, y1 - y0]
        else:
            bbox = corners  # not four numbers: validation counts it
        objects.append(RawObject(bbox=bbox, category=name))
        if name is not None:
            names.append(name)
    record = RawRecord(
        where=f"{split}: {xml_relative} (image {file_name!r})",
        image=image,
        image_id=stem,
        width=int(width) if isinstance(width, float) and width.is_integer() else width,
        height=int(height) if isinstance(height, float) and height.is_integer() else height,
        objects=objects,
        problem=None if image is not None else ("missing_image", why),
    )
    return record, names


def _image_set(root: Path, split: str) -> tuple[str, list[tuple[int, str]]] | None:
    for file_name in _IMAGE_SETS[split]:
        relative = f"ImageSets/Main/{file_name}"
        try:
            path = resolve_inside(root, relative, where=relative)
        except UnsafePathError:
            continue  # a symlink leading out: not read, as if absent
        if os.path.isfile(path):
            try:
                lines = Path(path).read_text(encoding="utf-8-sig").splitlines()
            except (OSError, UnicodeDecodeError) as error:
                raise ValueError(f"cannot read {relative}: {error}") from None
            ids = [(number, line.split()[0]) for number, line in enumerate(lines, start=1) if line.split()]
            return relative, ids
    return None


def _classic(root: Path) -> dict[str, list[tuple[str, str | None]]]:
    """Split -> (xml relative path, or the image id for ids without an XML file) for the classic layout."""
    listed = {split: _image_set(root, split) for split in _IMAGE_SETS}
    if not any(listed.values()):
        return {"train": [(xml, None) for xml in _xml_files(root, "Annotations")]}
    validation_ids = {image_id for _, image_id in (listed["validation"] or ("", []))[1]}
    splits: dict[str, list[tuple[str, str | None]]] = {}
    for split, found in listed.items():
        if found is None:
            continue
        set_file, ids = found
        if split == "train" and set_file.endswith("trainval.txt"):
            ids = [(line, image_id) for line, image_id in ids if image_id not in validation_ids]
        splits[split] = [
            (f"Annotations/{image_id}.xml", f"{set_file} line {line}:{image_id}") for line, image_id in ids
        ]
    return splits


def open_voc(path: Path, *, allow_outside_files: bool = False) -> LoadedDataset:
    """Open a Pascal VOC dataset folder (see the module doc for the layouts). ``allow_outside_files``: the image
    file names of the XML files (and the ids of ImageSets) may lead outside the dataset folder (the user's own
    dataset)."""
    root = absolute(path)
    if not root.is_dir():
        raise ValueError(f"{root}: a Pascal VOC dataset is a folder (Annotations/ and JPEGImages/, or XML files)")
    entries: dict[str, list[tuple[str, str | None]]]
    if (root / "Annotations").is_dir():
        entries = _classic(root)
        folders = ["JPEGImages", "images", ""]
    else:
        entries = {}
        for item in sorted(os.scandir(root), key=lambda entry: entry.name):
            split = split_from_label(item.name) if item.is_dir(follow_symlinks=False) else None
            if split is not None and has_voc_files(root, item.name):
                if split in entries:
                    raise ValueError(f"{root}: two folders hold the {split!r} split ({item.name} and another)")
                entries[split] = [(xml, None) for xml in _xml_files(root, item.name)]
        if not entries:
            entries = {"train": [(xml, None) for xml in _xml_files(root, "")]}
        folders = []
    splits: dict[str, ParsedRecordSource] = {}
    all_names: list[str] = []
    for split, items in entries.items():
        records = []
        for xml_relative, listed in items:
            image_folders = folders or [os.path.dirname(xml_relative), "images", ""]
            if listed is not None and not _exists(root, xml_relative, listed, allow_outside_files):
                records.append(_without_xml(root, xml_relative, listed, image_folders, split, allow_outside_files))
                continue
            record, names = _parse(root, xml_relative, list(dict.fromkeys(image_folders)), split, allow_outside_files)
            records.append(record)
            all_names += names
        splits[split] = ParsedRecordSource(name=split, records=records)
    if not any(split._records for split in splits.values()):
        raise ValueError(f"{root}: no Pascal VOC annotation files (<annotation> XML) found")
    try:
        categories = CategoryMap.from_values(all_names)
    except ValueError:
        raise ValueError(f"{root}: the VOC annotations name no object classes") from None
    return LoadedDataset(
        splits=dict(splits), categories=categories, description=f"Pascal VOC dataset {root}", format="voc", root=root
    )


def _exists(root: Path, relative: str, listed: str, allow_outside_files: bool) -> bool:
    """Whether the XML file of an ImageSets id exists; OutsidePathError naming the ImageSets line when the id
    leads outside the dataset folder."""
    where = listed.partition(":")[0]  # "ImageSets/Main/train.txt line 3" (the id may hold a colon)
    try:
        return os.path.isfile(resolve_inside(root, relative, where=where, allow_outside_files=allow_outside_files))
    except OutsidePathError:
        raise
    except UnsafePathError:  # a NUL in the id: _without_xml counts it as a missing image
        return False


def _without_xml(
    root: Path, xml_relative: str, listed: str, folders: list[str], split: str, allow_outside_files: bool
) -> RawRecord:
    """An id listed in ImageSets without an XML file: its image is a background image if it exists."""
    where, _, image_id = listed.partition(":")
    image, why = _find_image(root, folders, None, image_id, where, allow_outside_files)
    problem = None if image is not None else ("missing_image", why)
    if image is not None and not os.path.isfile(image):
        image, problem = None, ("missing_image", f"{where}: no {xml_relative} and no image named {image_id!r}")
    return RawRecord(f"{split}: {where} ({image_id!r})", image, image_id, None, None, [], problem)
