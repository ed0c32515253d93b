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
import stat
import uuid
import zipfile
from pathlib import Path, PurePosixPath

from app_support.paths import is_inside

MAX_MEMBERS = 20_000
MAX_UNPACKED_BYTES = 1_000_000_000
MAX_MEMBER_RATIO = 200  # unpacked/packed: images barely compress, so a huge ratio means a bomb
_CHUNK = 1 << 20
_IGNORED_PREFIXES = ("__MACOSX/",)


class ArchiveError(ValueError):
    """The upload is not a zip we are willing to unpack; the message says why."""


def _member_target(name: str, destination: Path) -> Path | None:
    """Where a member goes, None for entries we skip, ArchiveError for names that try to escape."""
    if name.startswith(_IGNORED_PREFIXES) or name.endswith("/"):
        return None
    normalised = name.replace("\\", "/")
    pure = PurePosixPath(normalised)
    if normalised.startswith("/") or (pure.parts and ":" in pure.parts[0]) or ".." in pure.parts:
        raise ArchiveError(f"the zip contains an unsafe file name {name!r} (absolute or with '..')")
    if any(part.startswith(".") for part in pure.parts):
        return None  # hidden files (.DS_Store, ._resource forks) carry no data we need
    target = destination.joinpath(*pure.parts)
    if not is_inside(target, destination):
        raise ArchiveError(f"the zip member {name!r} would be written outside the upload folder")
    return target


def _is_regular_file(info: zipfile.ZipInfo) -> bool:
    # Zips written on Windows or by writestr carry no file type bits at all; those are plain files too.
    file_type = stat.S_IFMT(info.external_attr >> 16)
    return file_type in (0, stat.S_IFREG)


def extract_zip(
    archive_path: Path,
    parent: Path,
    *,
    max_members: int = MAX_MEMBERS,
    max_unpacked_bytes: int = MAX_UNPACKED_BYTES,
) -> Path:
    """Unpack into a new folder under ``parent`` and return the dataset root inside it.

    A zip holding a single top-level folder (what "compress folder" produces) yields that folder as the root. The
    contents go one level below a private folder, because dataset readers also look for images in the annotation
    file's parent folder: that parent must never be a folder shared with other uploads.
    """
    if not zipfile.is_zipfile(archive_path):
        raise ArchiveError("the upload is not a zip file (or it is truncated)")
    private = Path(parent) / f"upload-{uuid.uuid4().hex}"
    destination = private / "content"
    destination.mkdir(parents=True)
    try:
        _extract(Path(archive_path), destination, max_members, max_unpacked_bytes)
    except zipfile.BadZipFile as error:
        shutil.rmtree(private, ignore_errors=True)
        raise ArchiveError(f"the zip file is corrupt: {error}") from None
    except (ArchiveError, OSError) as error:
        shutil.rmtree(private, ignore_errors=True)
        if isinstance(error, ArchiveError):
            raise
        raise ArchiveError(f"could not unpack the zip: {error}") from None
    return _dataset_root(destination)


def _extract(archive_path: Path, destination: Path, max_members: int, max_unpacked_bytes: int) -> None:
    with zipfile.ZipFile(archive_path) as archive:
        members = archive.infolist()
        if len(members) > max_members:
            raise ArchiveError(f"the zip has {len(members)} entries; at most {max_members} are accepted")
        written = 0
        for info in members:
            if info.flag_bits & 0x1:
                raise ArchiveError("encrypted zips are not supported")
            target = _member_target(info.filename, destination)
            if target is None or not _is_regular_file(info):
                continue
            if info.compress_size and info.file_size / info.compress_size > MAX_MEMBER_RATIO:
                raise ArchiveError(f"the zip member {info.filename!r} is suspiciously compressible (a zip bomb?)")
            target.parent.mkdir(parents=True, exist_ok=True)
            with archive.open(info) as source, open(target, "wb") as sink:
                while chunk := source.read(_CHUNK):
                    written += len(chunk)
                    if written > max_unpacked_bytes:
                        raise ArchiveError(f"the zip unpacks to more than {max_unpacked_bytes // 1_000_000} MB")
                    sink.write(chunk)
        if written == 0:
            raise ArchiveError("the zip holds no files")


def _dataset_root(destination: Path) -> Path:
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
