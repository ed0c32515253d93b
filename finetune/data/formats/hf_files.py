"""The files a Hugging Face dataset makes us read, each checked to lie inside the dataset's folder before it is read.

A Hugging Face dataset names files in three places, and each is user input like any annotation file:

* a ``save_to_disk`` folder: ``dataset_dict.json`` names the split folders and each split's ``state.json`` its Arrow
  files (``_data_files[].filename``). ``datasets.load_from_disk`` joins them to the folder unchecked, so ``../x``
  or an absolute name would map a file from anywhere: :func:`check_saved_dataset` checks them before it is called.
* a folder of data files (parquet, arrow, an image folder with ``metadata.jsonl``/``.csv``/``.parquet``), which
  ``datasets`` lists and reads following symlinks: :func:`check_links` refuses a symlink in it that leads out.
* an image cell without bytes holds a ``path`` that is opened when the image is used (``save_to_disk`` embeds the
  bytes, but a crafted Arrow or parquet file may hold ``{"bytes": None, "path": "/home/me/x.png"}``):
  :func:`check_image_cells` checks every such path when a split is opened, reading the paths from the Arrow table
  without the image bytes, and the image is later opened at the path :meth:`FileScope.resolve` gives, never at the
  stored text (a relative path is relative to the dataset folder, not to the working directory). An image folder's
  metadata file names become such paths (``datasets`` refuses ``..`` and absolute ones itself), so a name that is
  a symlink leading out is caught here too.

A Hub dataset's folder is where its files were downloaded: the datasets cache (``datasets.config.HF_DATASETS_CACHE``
and its downloads and extracted folders, wherever they are configured) and the dataset's folder in the Hub cache.
``allow_outside_files`` (the user's own dataset, naming their own files) turns every check off.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import datasets
import huggingface_hub.constants
import pyarrow as pa
import pyarrow.compute as pc
from huggingface_hub.file_download import repo_folder_name

from finetune.data.formats.common import absolute, read_json
from finetune.data.formats.paths import UnsafePathError, outside_refusal, resolve_inside

_STATE = "state.json"
_INFO = "dataset_info.json"
_SPLITS = "dataset_dict.json"


@dataclass(frozen=True)
class FileScope:
    """Where the files a dataset names may lie: its folders (the first is the one relative paths start from and
    refusals name), unless ``allow_outside_files``."""

    folders: tuple[Path, ...]
    allow_outside_files: bool = False

    def __post_init__(self) -> None:
        if not self.folders:
            raise ValueError("a dataset's file scope needs at least one folder")

    def resolve(self, name: str, *, where: str) -> str:
        """The real path of ``name`` inside one of the folders; UnsafePathError naming ``where`` and the first
        folder otherwise (the same whether or not the file exists)."""
        refusals: list[UnsafePathError] = []
        for folder in self.folders:
            try:
                return resolve_inside(folder, name, where=where, allow_outside_files=self.allow_outside_files)
            except UnsafePathError as error:
                refusals.append(error)
        raise refusals[0]


def hub_scope(repo_id: str, *, allow_outside_files: bool) -> FileScope:
    """The folders a Hub dataset's files are downloaded to (read now: tests and users may move the caches)."""
    folders = [
        Path(datasets.config.HF_DATASETS_CACHE),
        Path(datasets.config.DOWNLOADED_DATASETS_PATH),
        Path(datasets.config.EXTRACTED_DATASETS_PATH),
        Path(huggingface_hub.constants.HF_HUB_CACHE) / repo_folder_name(repo_id=repo_id, repo_type="dataset"),
    ]
    return FileScope(tuple(dict.fromkeys(absolute(folder) for folder in folders)), allow_outside_files)


def _inside_file(folder: Path, name: str, *, base: Path, where: str) -> Path | None:
    """``base/name`` when it is a file inside ``folder``; None when missing (``datasets`` then says what is)."""
    path = resolve_inside(folder, name, base=base, where=where)
    return Path(path) if os.path.isfile(path) else None


def _check_split_folder(folder: Path, split: Path, prefix: str) -> None:
    """A ``Dataset.save_to_disk`` folder: its state.json and dataset_info.json, and the Arrow files state.json
    names, all inside ``folder``."""
    _inside_file(folder, _INFO, base=split, where=f"{prefix}{_INFO}")
    state_path = _inside_file(folder, _STATE, base=split, where=f"{prefix}{_STATE}")
    if state_path is None:
        return
    shown = f"{prefix}{_STATE}"
    state = read_json(state_path, shown=shown)
    files = state.get("_data_files") if isinstance(state, dict) else None
    if not isinstance(files, list):
        raise ValueError(f"{shown}: '_data_files' must be a list of the split's Arrow files")
    for position, entry in enumerate(files):
        name = entry.get("filename") if isinstance(entry, dict) else None
        where = f"{shown} (_data_files[{position}])"
        if not isinstance(name, str) or not name.strip():
            raise ValueError(f"{where}: 'filename' must name an Arrow file of the split, got {name!r}")
        resolve_inside(folder, name, base=split, where=where)


def check_saved_dataset(folder: Path, *, allow_outside_files: bool) -> None:
    """Before ``datasets.load_from_disk(folder)``: every file it would read lies inside ``folder`` (UnsafePathError
    naming the file that names one outside). Mirrors its choice: state.json with dataset_info.json is one split,
    else dataset_dict.json lists the split folders."""
    if allow_outside_files:
        return
    folder = absolute(folder)
    single = all(_inside_file(folder, name, base=folder, where=name) is not None for name in (_STATE, _INFO))
    if single:
        _check_split_folder(folder, folder, "")
        return
    listing = _inside_file(folder, _SPLITS, base=folder, where=_SPLITS)
    if listing is None:
        return
    data = read_json(listing, shown=_SPLITS)
    splits = data.get("splits") if isinstance(data, dict) else None
    if not isinstance(splits, list):
        raise ValueError(f"{_SPLITS}: 'splits' must be a list of the split folders' names")
    for name in splits:
        where = f"{_SPLITS} (split {name!r})"
        if not isinstance(name, str) or not name.strip():
            raise ValueError(f"{where}: a split must be named by the name of its folder")
        # load_from_disk hands the joined name to fsspec, which reads "a::b" and "proto://" as other file systems.
        if "::" in name or "://" in name:
            raise outside_refusal(where, name, folder)
        split = Path(resolve_inside(folder, name, where=where))
        _check_split_folder(folder, split, f"{name}/")


def check_links(folder: Path, *, allow_outside_files: bool) -> None:
    """UnsafePathError for the first symlink in ``folder`` (a folder of data files or images that ``datasets``
    lists and reads) that leads outside it. Hidden entries (and ``__pycache__``-like folders) are skipped, as
    ``datasets`` skips them."""
    if allow_outside_files:
        return
    folder = absolute(folder)
    for current, directories, files in os.walk(folder, followlinks=False):
        directories[:] = sorted(name for name in directories if not name.startswith((".", "__")))
        for name in sorted(directories + [name for name in files if not name.startswith(".")]):
            path = os.path.join(current, name)
            if os.path.islink(path):
                relative = Path(os.path.relpath(path, folder)).as_posix()
                resolve_inside(folder, relative, where=relative)


def _named_paths(column: pa.ChunkedArray) -> list[tuple[int, str]]:
    """(row, path) of every image cell stored as a path without bytes, from the Arrow column alone (the image
    bytes are never copied into Python)."""
    found: list[tuple[int, str]] = []
    offset = 0
    for chunk in column.chunks:
        if pa.types.is_struct(chunk.type) and chunk.type.get_field_index("path") >= 0:
            paths = chunk.field("path")
            named = pc.and_(chunk.is_valid(), paths.is_valid())
            if chunk.type.get_field_index("bytes") >= 0:
                has_bytes = pc.fill_null(pc.greater(pc.binary_length(chunk.field("bytes")), 0), False)
                named = pc.and_(named, pc.invert(has_bytes))
        elif pa.types.is_string(chunk.type) or pa.types.is_large_string(chunk.type):
            paths, named = chunk, chunk.is_valid()
        else:
            offset += len(chunk)
            continue
        rows = pc.indices_nonzero(named)
        found += [
            (offset + row, path)
            for row, path in zip(rows.to_pylist(), paths.take(rows).to_pylist())
            if isinstance(path, str) and path
        ]
        offset += len(chunk)
    return found


def check_image_cells(dataset: datasets.Dataset, column: str, scope: FileScope, *, where: Callable[[int], str]) -> None:
    """UnsafePathError for the first image of ``column`` stored as a path that leads outside ``scope``; ``where``
    names the record of a row."""
    if scope.allow_outside_files:
        return
    for row, path in _named_paths(dataset.data.column(column)):
        scope.resolve(path, where=where(row))
