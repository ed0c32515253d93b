"""CVAT for images 1.1: ``annotations.xml`` (``<annotations>``: ``<meta>`` with the label list, then one
``<image id name width height [subset]>`` per image holding ``<box label xtl ytl xbr ybr [rotation]>``\\ s) and the
images in ``images/`` (``images/<subset>/`` when the task has subsets).

Coordinates are pixel corners (``xtl, ytl`` top-left, ``xbr, ybr`` bottom-right). A box with ``rotation`` (degrees,
about its centre) is replaced by the axis-aligned box around it, and counted; polygons, polylines, points, masks,
ellipses, cuboids and skeletons are left out, and counted. The ``subset`` attribute gives the split (``Train``,
``Validation``, ``Test``; ``default`` is train). Class order is the label list of ``<meta>``. CVAT for video
(``<track>``) is refused. Parsed with defusedxml (DTDs and entities refused). An image ``name`` that leads outside
the dataset folder refuses the export (OutsidePathError naming the ``<image>`` and ``--allow-outside-files``).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from finetune.data.categories import CategoryMap
from finetune.data.formats.common import (
    LoadedDataset,
    ParsedRecordSource,
    absolute,
    annotation_file,
    canonical_split,
    relative_name,
    rotated_bounds,
)
from finetune.data.formats.paths import files_under, resolve_inside
from finetune.data.formats.xmlfiles import first_tag, number, parse_xml
from finetune.data.records import RawObject, RawRecord

CVAT_FILE = "annotations.xml"
_OTHER_SHAPES = ("polygon", "polyline", "points", "mask", "ellipse", "cuboid", "skeleton")


def find_cvat_xml(root: Path) -> Path | None:
    """``annotations.xml``, else the one top-level XML file whose document element is ``<annotations>``."""
    found = [item for item in files_under(root, root, suffixes=(".xml",), max_depth=1) if item.path is not None]
    matching = [root / item.relative for item in found if first_tag(Path(item.path or "")) == "annotations"]
    preferred = [path for path in matching if path.name == CVAT_FILE]
    chosen = preferred or matching
    return chosen[0] if chosen else None


def _int_or_raw(value: Any) -> Any:
    if isinstance(value, str):
        try:
            return int(value)
        except ValueError:
            return value
    return value


def _image_path(root: Path, name: str, subset: str | None, where: str, allow_outside_files: bool) -> str | None:
    """The image's path (a missing file's when none exists); OutsidePathError (UnsafePathError for a NUL) naming
    ``where`` when ``name`` leads outside the dataset folder from one of the image folders."""
    folders = [f"images/{subset}", "images", ""] if subset else ["images", ""]
    first = None
    for folder in folders:
        candidate = resolve_inside(
            root, name, base=root / folder if folder else root, where=where, allow_outside_files=allow_outside_files
        )
        first = first or candidate
        if os.path.isfile(candidate):
            return candidate
    return first


def open_cvat(path: Path, *, allow_outside_files: bool = False) -> LoadedDataset:
    """Open a CVAT for images 1.1 export: a folder with annotations.xml, or the XML file itself.
    ``allow_outside_files``: the images' names may lead outside the dataset folder (the user's own dataset)."""
    path = absolute(path)
    xml_path, root = annotation_file(
        path, find_cvat_xml, f"a CVAT for images export needs {CVAT_FILE} (<annotations> XML)"
    )
    shown = relative_name(root, xml_path)
    element = parse_xml(
        Path(resolve_inside(root, xml_path, where=shown, allow_outside_files=allow_outside_files)), shown=shown
    )
    if element.tag != "annotations":
        raise ValueError(f"{shown}: expected CVAT <annotations>, found <{element.tag}>")
    if element.find("track") is not None:
        raise ValueError(f"{shown} is a CVAT for video export (<track>); export the task as 'CVAT for images 1.1'")
    meta = element.find("meta")
    names: list[str] = []
    for label_element in meta.iter("label") if meta is not None else []:
        name = label_element.findtext("name")
        if name is not None and name.strip() and name.strip() not in names:
            names.append(name.strip())
    by_split: dict[str, list[RawRecord]] = {}
    conversions: dict[str, list[tuple[str, str]]] = {}
    seen_labels: list[str] = []
    for position, image in enumerate(element.iter("image")):
        attributes = image.attrib
        name = attributes.get("name", "")
        subset = attributes.get("subset") or None
        split = "train" if subset is None or subset.lower() == "default" else canonical_split(subset)
        where = f"{split}: {shown} <image> {position} (name {name!r})"
        element_where = f"{shown} <image> {position}"
        file_path = _image_path(root, name, subset, element_where, allow_outside_files) if name else None
        objects, notes = [], conversions.setdefault(split, [])
        for box in image.iter("box"):
            label = box.get("label")
            corners = [number(box.get(key)) for key in ("xtl", "ytl", "xbr", "ybr")]
            bbox: object = corners
            if all(isinstance(value, float) for value in corners):
                x0, y0, x1, y1 = (float(value) for value in corners)  # type: ignore[arg-type]
                rotation = number(box.get("rotation")) or 0.0
                if isinstance(rotation, float) and rotation % 360:
                    bbox = rotated_bounds(x0, y0, x1, y1, rotation, about_centre=True)
                    notes.append(("rotated_box_axis_aligned", f"{where}: a box rotated by {rotation} degrees"))
                else:
                    bbox = [x0, y0, x1 - x0, y1 - y0]
            objects.append(RawObject(bbox=bbox, category=label))
            if label is not None:
                seen_labels.append(label)
        for shape in _OTHER_SHAPES:
            for _ in image.iter(shape):
                notes.append(("non_box_shape_ignored", f"{where}: a {shape} (only boxes are used)"))
        by_split.setdefault(split, []).append(
            RawRecord(
                where=where,
                image=file_path,
                image_id=_int_or_raw(attributes.get("id", position)),
                width=_int_or_raw(attributes.get("width")),
                height=_int_or_raw(attributes.get("height")),
                objects=objects,
                problem=None if file_path is not None else ("missing_image", f"{where} has no name"),
            )
        )
    if not by_split:
        raise ValueError(f"{shown} has no <image> elements")
    if names:
        categories = CategoryMap(names=tuple(names), lookup={name: i for i, name in enumerate(names)})
    else:
        try:
            categories = CategoryMap.from_values(seen_labels)
        except ValueError:
            raise ValueError(f"{shown}: no labels in <meta> and no labelled boxes") from None
    splits = {
        split: ParsedRecordSource(name=split, records=records, conversions=conversions.get(split, []))
        for split, records in by_split.items()
    }
    return LoadedDataset(
        splits=dict(splits), categories=categories, description=f"CVAT dataset {root}", format="cvat", root=root
    )
