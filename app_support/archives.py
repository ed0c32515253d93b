"""Unpacking an uploaded dataset zip without trusting anything in it.

Refused: files that are not zips, encrypted members, absolute or ``..`` member names (zip-slip), and archives whose
entry count or unpacked size exceeds the limits (zip bombs). The unpacked size is counted while streaming, since
the sizes declared in a zip's directory can lie. Symlinks and other special members are skipped, never created.

After unpacking, :func:`check_dataset_references` makes sure that the annotation files only name images inside the
dataset folder: a COCO ``file_name`` of ``../../etc/passwd`` must not make training read a server file.
"""

from __future__ import annotations

import json
import shutil
import uuid
from pathlib import Path, PurePosixPath

from app_support.paths import is_inside
from finetune.data.formats.archive import ArchiveError, ArchiveLimits, extract_members

__all__ = ["UPLOAD_LIMITS", "ArchiveError", "check_dataset_references", "extract_zip"]

# An upload to a shared server: tighter than a local user's own zip.
UPLOAD_LIMITS = ArchiveLimits(max_members=20_000, max_unpacked_bytes=1_000_000_000, max_ratio=200)


def extract_zip(
    archive_path: Path, parent: Path, *, limits: ArchiveLimits = UPLOAD_LIMITS, name: str | None = None
) -> Path:
    """Unpack into a new folder under ``parent`` (``name``, default a fresh one) and return the dataset root
    inside it; nothing is left behind when the zip is refused.

    A zip holding a single top-level folder (what "compress folder" produces) yields that folder as the root. The
    contents go one level below a private folder, because dataset readers also look for images in the annotation
    file's parent folder: that parent must never be a folder shared with other uploads.
    """
    private = Path(parent) / (name or f"upload-{uuid.uuid4().hex}")
    destination = private / "content"
    destination.mkdir(parents=True)
    try:
        extract_members(Path(archive_path), destination, limits)
    except ArchiveError:
        shutil.rmtree(private, ignore_errors=True)
        raise
    except OSError as error:
        shutil.rmtree(private, ignore_errors=True)
        raise ArchiveError(f"could not unpack the zip: {error}") from None
    return dataset_root(destination)


def dataset_root(destination: Path) -> Path:
    """The dataset inside an unpacked zip's content folder (its single top-level folder, if that is all it holds)."""
    entries = [p for p in destination.iterdir() if not p.name.startswith(".")]
    if len(entries) == 1 and entries[0].is_dir():
        return entries[0]
    return destination


def _referenced_names(dataset_root: Path) -> list[tuple[Path, str]]:
    """(annotation file, image name) pairs from COCO JSON files and metadata.jsonl files under the root."""
    found: list[tuple[Path, str]] = []
    for json_file in dataset_root.rglob("*.json"):
        try:
            data = json.loads(json_file.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            continue  # not our business here; the dataset reader reports unreadable annotations
        if isinstance(data, dict) and isinstance(data.get("images"), list):
            for entry in data["images"]:
                if isinstance(entry, dict) and isinstance(entry.get("file_name"), str):
                    found.append((json_file, entry["file_name"]))
    for metadata in dataset_root.rglob("metadata.jsonl"):
        try:
            lines = metadata.read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError):
            continue
        for line in lines:
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(row, dict) and isinstance(row.get("file_name"), str):
                found.append((metadata, row["file_name"]))
    return found


def check_dataset_references(dataset_root: Path) -> None:
    """Refuse a dataset whose annotations name image files outside ``dataset_root`` (or through symlinks)."""
    root = Path(dataset_root).resolve()
    for link in root.rglob("*"):
        if link.is_symlink() and not is_inside(link, root):
            raise ArchiveError(f"{link.relative_to(root)} is a symlink pointing outside the dataset folder")
    for annotation_file, name in _referenced_names(root):
        pure = PurePosixPath(name.replace("\\", "/"))
        unsafe = name.startswith(("/", "\\", "~")) or ".." in pure.parts or (pure.parts and ":" in pure.parts[0])
        if unsafe or not is_inside(annotation_file.parent / name, root):
            where = annotation_file.relative_to(root)
            raise ArchiveError(f"{where} names the image {name!r}, which lies outside the dataset folder")
