"""Opening a detection dataset from any supported source, as raw records per split plus the class names.

``open_dataset(source, format="auto")`` accepts:

* ``shapes`` or ``shapes:train=2000,validation=200,test=200,size=256`` -- the synthetic dataset (fixed seeds per
  split), generated once and cached under ``$DDETR_CACHE_DIR/shapes`` (default ``~/.cache/ddetr/shapes``);
* a dataset folder (or a ``.zip`` of one, unpacked once under ``$DDETR_CACHE_DIR/archives``) in any of the formats
  of ``finetune.data.formats``: COCO (also Roboflow's and COCO 2017's layouts), YOLO, Pascal VOC, Label Studio JSON,
  CVAT for images 1.1, detected from the layout (``finetune.data.formats.detect``) unless ``format`` names one;
* a COCO or Label Studio JSON file, a YOLO ``data.yaml`` or a CVAT ``annotations.xml``;
* a directory written by ``DatasetDict.save_to_disk`` or ``Dataset.save_to_disk`` (the latter has one split);
* an image folder with ``metadata.jsonl`` (``{"file_name", "objects": {"bbox": [[x, y, w, h]], "category": [...]}}``,
  optionally in ``train/``, ``validation/``, ``test/`` sub-folders), loaded by ``datasets``' ``imagefolder``;
* any other local folder ``datasets.load_dataset`` understands (parquet, arrow, ...), or a Hugging Face Hub id.

Hugging Face datasets need an image column and an ``objects`` column (a dict of lists or a list of dicts) in one
of these schemas, chosen from the features:

* ``objects.bbox`` as COCO ``[x, y, w, h]`` pixels (cppe-5);
* ``objects.boxes`` as ``[x_min, y_min, x_max, y_max]`` pixels (torchvision's convention);
* ``objects.xmin``, ``objects.ymin``, ``objects.xmax``, ``objects.ymax`` in pixels;

each with a category field (``category``, ``categories``, ``category_id``, ``label`` or ``labels``: a
``ClassLabel``, names, or integers) and optional ``image_id``, ``width``, ``height`` and ``objects.id``.

No file a dataset names is read unless it lies inside the dataset's folder (a hub dataset's: the datasets cache):
the image paths of every format, the files of a ``save_to_disk`` folder, symlinks among data files (see
``finetune.data.formats.paths`` and ``finetune.data.formats.hf_files``). ``allow_outside_files=True`` lifts this
for a user's own dataset that names their own files elsewhere.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import datasets

from ddetr.checkpoint.hub import looks_like_repo_id
from ddetr.runtime.machine import cache_root
from finetune.data.categories import CategoryMap
from finetune.data.formats import normalise_format
from finetune.data.formats.archive import unpack_zip
from finetune.data.formats.coco import open_coco
from finetune.data.formats.common import SPLIT_ALIASES, LoadedDataset, absolute, canonical_split
from finetune.data.formats.cvat import open_cvat
from finetune.data.formats.detect import detect, unwrap
from finetune.data.formats.hf_files import (
    FileScope,
    check_image_cells,
    check_links,
    check_saved_dataset,
    hub_scope,
)
from finetune.data.formats.label_studio import open_label_studio
from finetune.data.formats.voc import open_voc
from finetune.data.formats.yolo import open_yolo
from finetune.data.records import ImageRef, RawObject, RawRecord
from finetune.data.shapes import make_shapes_dataset

__all__ = ["SPLIT_ALIASES", "LoadedDataset", "canonical_split", "open_dataset"]

SHAPES_DEFAULTS = {"train": 2000, "validation": 200, "test": 200, "size": 256}
# Fixed seeds so that every ``--dataset shapes`` run sees the same images, and the splits never overlap.
SHAPES_SEEDS = {"train": 1, "validation": 2, "test": 3}
_CATEGORY_KEYS = ("category", "categories", "category_id", "label", "labels")
_OPENERS: dict[str, Callable[..., LoadedDataset]] = {
    "coco": open_coco,
    "yolo": open_yolo,
    "voc": open_voc,
    "label-studio": open_label_studio,
    "cvat": open_cvat,
}


def open_dataset(
    source: str | os.PathLike, *, format: str = "auto", allow_outside_files: bool = False
) -> LoadedDataset:
    """Open ``source`` (see the module doc) in ``format`` (one of ``finetune.data.formats.DATASET_FORMATS``;
    ``auto``: detected from the layout); ValueError with a readable reason when it cannot be used, also when the
    dataset names a file outside its folder, unless ``allow_outside_files``."""
    chosen = normalise_format(format)
    text = str(source)
    if text == "shapes" or text.startswith("shapes:"):
        if chosen not in ("auto", "hf"):
            raise ValueError(f"the synthetic {text!r} dataset has no {chosen!r} format; use format 'auto'")
        return _open_shapes(text)
    path = Path(text).expanduser()
    if path.exists():
        described = path
        if path.is_file() and path.suffix.lower() == ".zip":
            path = unpack_zip(path, archives_cache_dir())
            if chosen != "auto":
                path = unwrap(path)
        if chosen == "auto":
            chosen, path = detect(path)
        loaded = _open_local(path, chosen, allow_outside_files)
        order = {name: rank for rank, name in enumerate(("train", "validation", "test"))}
        loaded.splits = dict(sorted(loaded.splits.items(), key=lambda item: order.get(item[0], len(order))))
        if described.suffix.lower() == ".zip" and described.is_file():
            loaded.description = f"{loaded.description} (unpacked from {described})"
        return loaded
    if chosen not in ("auto", "hf"):
        raise ValueError(f"dataset path {text!r} does not exist (format {chosen!r} needs a local folder or file)")
    if not looks_like_repo_id(text):
        raise ValueError(f"dataset path {text!r} does not exist")
    try:
        loaded = datasets.load_dataset(text)
    except Exception as error:
        raise ValueError(
            f"{text!r} is not a local folder, and loading it from the Hugging Face Hub failed "
            f"({type(error).__name__}: {error}). Without network access, pass a local folder (save_to_disk output, "
            "COCO, YOLO, VOC, Label Studio or CVAT export, or an image folder) instead"
        ) from None
    return _from_hf(
        loaded, description=f"hub dataset {text}", scope=hub_scope(text, allow_outside_files=allow_outside_files)
    )


def _open_local(path: Path, chosen: str, allow_outside_files: bool) -> LoadedDataset:
    if chosen in _OPENERS:
        return _OPENERS[chosen](path, allow_outside_files=allow_outside_files)
    if path.is_file():
        raise ValueError(f"{path} is a file; a Hugging Face dataset is a folder (save_to_disk output or data files)")
    # Absolute, so that the paths datasets stores (image folders) and the checks below agree on the folder.
    path = absolute(path)
    scope = FileScope((path,), allow_outside_files)
    # lexists: the markers are looked at without following a symlink out (check_saved_dataset refuses those).
    if any(os.path.lexists(path / name) for name in ("dataset_dict.json", "state.json")):
        check_saved_dataset(path, allow_outside_files=allow_outside_files)
        return _from_hf(datasets.load_from_disk(str(path)), description=f"saved dataset {path}", scope=scope)
    check_links(path, allow_outside_files=allow_outside_files)
    if _has_metadata(path):
        try:
            loaded = datasets.load_dataset("imagefolder", data_dir=str(path))
        except Exception as error:
            cause = error.__cause__ or error
            raise ValueError(
                f"cannot read the image folder {path} ({type(cause).__name__}: {cause}); its metadata.jsonl must name "
                "image files inside the folder"
            ) from None
        return _from_hf(loaded, description=f"image folder {path}", scope=scope)
    try:
        loaded = datasets.load_dataset(str(path))
    except Exception as error:
        raise ValueError(
            f"cannot read {path} as a dataset ({type(error).__name__}: {error}); expected a COCO, YOLO (data.yaml), "
            "Pascal VOC (Annotations/), Label Studio (JSON task list) or CVAT (annotations.xml) export, a "
            "save_to_disk folder, or an image folder with metadata.jsonl"
        ) from None
    return _from_hf(loaded, description=f"dataset folder {path}", scope=scope)


def _has_metadata(path: Path) -> bool:
    names = ("metadata.jsonl", "metadata.csv", "metadata.parquet")
    return any((path / name).is_file() for name in names) or any(
        (child / name).is_file()
        for child in path.iterdir()
        if not child.is_symlink() and child.is_dir()  # a linked folder is not looked into (check_links)
        for name in names
    )


def archives_cache_dir() -> Path:
    """Where dataset zips are unpacked (one folder per zip content)."""
    return cache_root().absolute() / "archives"


# ---------------------------------------------------------------------------------------------------------------------
# Synthetic shapes


def parse_shapes_spec(spec: str) -> dict[str, int]:
    """``shapes`` or ``shapes:train=N,validation=N,test=N,size=PX`` -> the sizes (defaults for what is omitted)."""
    options = dict(SHAPES_DEFAULTS)
    _, _, tail = spec.partition(":")
    for item in filter(None, (part.strip() for part in tail.split(","))):
        key, equals, value = item.partition("=")
        key = canonical_split(key.strip()) if key.strip() != "size" else "size"
        if not equals or key not in options:
            raise ValueError(f"bad shapes option {item!r}; use e.g. shapes:train=500,validation=50,test=50,size=256")
        try:
            options[key] = int(value)
        except ValueError:
            raise ValueError(f"shapes option {item!r} needs an integer value") from None
        if options[key] < 0:
            raise ValueError(f"shapes option {item!r} must not be negative")
    return options


def shapes_cache_dir() -> Path:
    """``$DDETR_CACHE_DIR/shapes``, else under ``$XDG_CACHE_HOME`` or ``~/.cache`` (where ddetr caches too)."""
    return cache_root() / "shapes"


def shapes_dataset_dict(spec: str) -> datasets.DatasetDict:
    """The splits of a shapes spec, generated once and cached on disk (written aside, then renamed)."""
    options = parse_shapes_spec(spec)
    key = ",".join(f"{name}={options[name]}" for name in sorted(options))
    directory = shapes_cache_dir() / hashlib.sha256(f"v1:{key}".encode()).hexdigest()[:16]
    if (directory / "dataset_dict.json").is_file():
        return datasets.load_from_disk(str(directory))
    splits = {
        name: make_shapes_dataset(options[name], seed=seed, image_size=options["size"])
        for name, seed in SHAPES_SEEDS.items()
        if options[name] > 0
    }
    if "train" not in splits:
        raise ValueError("a shapes dataset needs train > 0 images")
    dataset_dict = datasets.DatasetDict(splits)
    directory.parent.mkdir(parents=True, exist_ok=True)
    staging = directory.with_name(f".tmp-{directory.name}-{uuid.uuid4().hex[:12]}")
    try:
        dataset_dict.save_to_disk(str(staging))
        try:
            os.replace(staging, directory)
        except OSError:
            # Another process finished the same cache first; theirs is identical.
            if not (directory / "dataset_dict.json").is_file():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return datasets.load_from_disk(str(directory))


def _open_shapes(spec: str) -> LoadedDataset:
    # Our own cache, written above with the images' bytes inline: nothing in it names another file.
    scope = FileScope((shapes_cache_dir().absolute(),))
    return _from_hf(shapes_dataset_dict(spec), description=f"synthetic {spec}", scope=scope)


# ---------------------------------------------------------------------------------------------------------------------
# Hugging Face datasets


def _from_hf(loaded: Any, *, description: str, scope: FileScope) -> LoadedDataset:
    if isinstance(loaded, datasets.Dataset):
        raw = {"train": loaded}
    elif isinstance(loaded, datasets.DatasetDict):
        raw = {canonical_split(name): dataset for name, dataset in loaded.items()}
    else:
        raise ValueError(f"{description}: expected a Dataset or DatasetDict, got {type(loaded).__name__}")
    if not raw:
        raise ValueError(f"{description} has no splits")
    splits = {
        name: HFRecordSource(name=name, dataset=dataset, scope=scope, description=description)
        for name, dataset in raw.items()
    }
    first = next(iter(splits.values()))
    names = first.class_names()
    if names is not None:
        categories = CategoryMap.from_names(names)
    else:
        categories = CategoryMap.from_values(value for split in splits.values() for value in split.category_values())
    return LoadedDataset(splits=dict(splits), categories=categories, description=description, format="hf")


def _describe_features(features: datasets.Features) -> str:
    """``image (Image), objects (id, bbox, category)``: the columns, and the fields of ``objects``-like ones."""
    shown = []
    for key, value in features.items():
        inner = getattr(value, "feature", value)
        if isinstance(inner, dict):
            shown.append(f"{key} ({', '.join(inner)})")
        else:
            shown.append(f"{key} ({type(value).__name__})")
    return ", ".join(shown)


_SCHEMAS = (
    "objects.bbox [x, y, w, h] (cppe-5)",
    "objects.boxes [x_min, y_min, x_max, y_max]",
    "objects.xmin/ymin/xmax/ymax",
)


def _unknown_schema(name: str, features: datasets.Features, missing: str) -> ValueError:
    return ValueError(
        f"split {name!r}: not a detection schema this reader knows ({missing}); found the features "
        f"{_describe_features(features)}. Expected an image column and 'objects' with one of "
        f"{'; '.join(_SCHEMAS)}, and a category field ({', '.join(_CATEGORY_KEYS)})"
    )


def _objects_feature(features: datasets.Features) -> dict[str, Any]:
    """The per-object fields of the ``objects`` column, whether stored as a dict of lists or a list of dicts."""
    feature = features["objects"]
    if isinstance(feature, (datasets.List, datasets.LargeList)) and isinstance(feature.feature, dict):
        return dict(feature.feature)
    if isinstance(feature, dict):
        return {key: getattr(value, "feature", value) for key, value in feature.items()}
    raise ValueError(f"the 'objects' column must hold per-object fields (bbox, category), got {feature}")


class HFRecordSource:
    """A split of a Hugging Face dataset in the object-detection schema; images stay encoded until used. Images
    stored as paths must lie in ``scope`` (checked here, before any is opened, and again when each is used: the
    path opened is the one the check resolved)."""

    def __init__(
        self, *, name: str, dataset: datasets.Dataset, scope: FileScope, description: str = "the dataset"
    ) -> None:
        self.name = name
        self.scope = scope
        self.description = description
        features = dataset.features
        image_columns = [key for key, value in features.items() if isinstance(value, datasets.Image)]
        if not image_columns:
            raise ValueError(f"split {name!r} has no image column (columns: {list(features)})")
        if "objects" not in features:
            raise _unknown_schema(name, features, "no 'objects' column")
        self.image_column = image_columns[0]
        object_fields = _objects_feature(features)
        # Which boxes: "bbox" (COCO xywh), "boxes" (xyxy) or "corners" (xmin/ymin/xmax/ymax fields).
        if "bbox" in object_fields:
            self.box_layout = "bbox"
        elif "boxes" in object_fields:
            self.box_layout = "boxes"
        elif all(key in object_fields for key in ("xmin", "ymin", "xmax", "ymax")):
            self.box_layout = "corners"
        else:
            raise _unknown_schema(name, features, f"'objects' has no box field among {list(object_fields)}")
        category_key = next((key for key in _CATEGORY_KEYS if key in object_fields), None)
        if category_key is None:
            raise _unknown_schema(name, features, f"'objects' has no category field among {list(object_fields)}")
        self.category_key: str = category_key
        self._category_feature = object_fields[category_key]
        self.dataset = dataset.cast_column(self.image_column, datasets.Image(decode=False))
        check_image_cells(self.dataset, self.image_column, scope, where=self._where)

    def _where(self, row: int) -> str:
        return f"{self.description}: split {self.name!r} row {row} (column {self.image_column!r})"

    def class_names(self) -> list[str] | None:
        feature = self._category_feature
        return list(feature.names) if isinstance(feature, datasets.ClassLabel) else None

    def category_values(self) -> Iterator[Any]:
        for objects in self.dataset["objects"]:
            yield from _object_rows(objects, self.category_key, self.name)[1]

    def records(self) -> Iterator[RawRecord]:
        columns = [c for c in ("image_id", "width", "height", "objects") if c in self.dataset.column_names]
        table = self.dataset.select_columns(columns)
        for row_index, row in enumerate(table):
            rows, categories = _object_rows(row["objects"], self.category_key, self.name)
            objects = [
                RawObject(
                    bbox=self._box(fields), category=category, id=fields.get("id"), iscrowd=fields.get("iscrowd", 0)
                )
                for fields, category in zip(rows, categories)
            ]
            image_id = row.get("image_id", row_index)
            yield RawRecord(
                where=f"{self.name}[{row_index}] (image_id {image_id!r})",
                image=row_index,
                image_id=image_id,
                width=row.get("width"),
                height=row.get("height"),
                objects=objects,
            )

    def _box(self, fields: dict[str, Any]) -> Any:
        """The object's box as COCO ``[x, y, w, h]``; what is stored when it is not four numbers (validation
        reports it)."""
        if self.box_layout == "bbox":
            return fields.get("bbox")
        corners = (
            fields.get("boxes")
            if self.box_layout == "boxes"
            else [fields.get(k) for k in ("xmin", "ymin", "xmax", "ymax")]
        )
        if (
            isinstance(corners, (list, tuple))
            and len(corners) == 4
            and all(isinstance(value, (int, float)) and not isinstance(value, bool) for value in corners)
        ):
            x0, y0, x1, y1 = (float(value) for value in corners)
            return [x0, y0, x1 - x0, y1 - y0]
        return corners

    def image_bytes(self, image: ImageRef) -> bytes | str:
        stored = self.dataset[int(image)][self.image_column]
        if stored is None:
            raise FileNotFoundError(f"{self.name}[{image}] has no image")
        if stored.get("bytes"):
            return stored["bytes"]
        if stored.get("path"):
            return self.scope.resolve(stored["path"], where=self._where(int(image)))
        raise FileNotFoundError(f"{self.name}[{image}] has neither image bytes nor a path")


def _object_rows(objects: Any, category_key: str, split: str) -> tuple[list[dict[str, Any]], list[Any]]:
    """Per-object field dicts and categories from a dict of lists (cppe-5) or a list of dicts."""
    if objects is None:
        return [], []
    if isinstance(objects, dict):
        count = max((len(v) for v in objects.values() if isinstance(v, list)), default=0)
        rows = [
            {
                key: (values[i] if isinstance(values, list) and i < len(values) else None)
                for key, values in objects.items()
            }
            for i in range(count)
        ]
    elif isinstance(objects, list):
        rows = [row if isinstance(row, dict) else {} for row in objects]
    else:
        raise ValueError(f"split {split!r}: 'objects' must be a dict of lists or a list of dicts, got {objects!r}")
    return rows, [row.get(category_key) for row in rows]
