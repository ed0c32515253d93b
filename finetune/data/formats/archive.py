"""Unpacking a dataset zip without trusting anything in it: the one extractor (``finetune`` and the app use it).

Refused: files that are not zips, encrypted members, absolute or ``..`` member names (zip-slip), and archives whose
entry count or unpacked size exceeds the limits, or whose members compress suspiciously well (zip bombs). The
unpacked size is counted while streaming, since the sizes declared in a zip's directory can lie. Symlinks and other
special members, hidden files and ``__MACOSX/`` are skipped, never created.

``unpack_zip`` (``open_dataset`` on a ``.zip``) unpacks once into a cache folder named after the zip's content hash;
the app's uploads go through ``extract_members`` into folders of their own, under its tighter limits.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import stat
import uuid
import zipfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

_CHUNK = 1024 * 1024
_IGNORED_PREFIXES = ("__MACOSX/",)


class ArchiveError(ValueError):
    """A zip we are not willing to unpack; the message says why."""


@dataclass(frozen=True)
class ArchiveLimits:
    max_members: int = 200_000
    max_unpacked_bytes: int = 64 * 1024**3
    max_ratio: float | None = None  # unpacked / packed size of one member; images barely compress


LOCAL_LIMITS = ArchiveLimits()  # a user's own zip on their own machine


def _digest(path: Path) -> str:
    hasher = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(_CHUNK), b""):
            hasher.update(chunk)
    return hasher.hexdigest()


def _member_target(name: str, destination: Path) -> Path | None:
    """Where a member goes, None for entries that are skipped, ArchiveError for names that try to escape."""
    if name.startswith(_IGNORED_PREFIXES) or name.endswith("/"):
        return None
    normalised = name.replace("\\", "/")
    pure = PurePosixPath(normalised)
    if normalised.startswith("/") or (pure.parts and ":" in pure.parts[0]) or ".." in pure.parts:
        raise ArchiveError(
            f"the zip contains an unsafe file name {name!r} (absolute or with '..'): it would be written outside "
            "the dataset folder"
        )
    if not pure.parts or any(part.startswith(".") for part in pure.parts):
        return None  # hidden files (.DS_Store, ._resource forks) carry no data we need
    return destination.joinpath(*pure.parts)


def _is_regular_file(info: zipfile.ZipInfo) -> bool:
    # Zips written on Windows or by writestr carry no file type bits at all; those are plain files too.
    return stat.S_IFMT(info.external_attr >> 16) in (0, stat.S_IFREG)


def extract_members(archive_path: Path, destination: Path, limits: ArchiveLimits) -> None:
    """Unpack ``archive_path`` into the existing folder ``destination`` (ArchiveError, possibly part way: the
    caller removes the folder)."""
    if not zipfile.is_zipfile(archive_path):
        raise ArchiveError(f"{Path(archive_path).name} is not a zip file (or it is truncated)")
    try:
        with zipfile.ZipFile(archive_path) as archive:
            members = archive.infolist()
            if len(members) > limits.max_members:
                raise ArchiveError(f"the zip has {len(members)} entries; at most {limits.max_members} are accepted")
            written = 0
            for info in members:
                if info.flag_bits & 0x1:
                    raise ArchiveError(f"encrypted zips are not supported ({info.filename})")
                target = _member_target(info.filename, destination)
                if target is None or not _is_regular_file(info):
                    continue
                ratio = info.file_size / info.compress_size if info.compress_size else 0.0
                if limits.max_ratio is not None and ratio > limits.max_ratio:
                    raise ArchiveError(f"the zip member {info.filename!r} is suspiciously compressible (a zip bomb?)")
                target.parent.mkdir(parents=True, exist_ok=True)
                with archive.open(info) as source, open(target, "wb") as sink:
                    while chunk := source.read(_CHUNK):
                        written += len(chunk)
                        if written > limits.max_unpacked_bytes:
                            raise ArchiveError(
                                f"the zip unpacks to more than {limits.max_unpacked_bytes // 1_000_000} MB"
                            )
                        sink.write(chunk)
    except zipfile.BadZipFile as error:
        raise ArchiveError(f"the zip file is corrupt: {error}") from None
    if written == 0:
        raise ArchiveError("the zip holds no files")


def unpack_zip(path: Path, cache_dir: Path, limits: ArchiveLimits = LOCAL_LIMITS) -> Path:
    """The folder ``path`` unpacks to (under ``cache_dir``), unpacking it first unless an earlier run did."""
    if not zipfile.is_zipfile(path):
        raise ArchiveError(f"{path} is not a zip file (or it is truncated)")
    target = cache_dir / _digest(path)[:24]
    if (target / ".unpacked").is_file():
        return target
    cache_dir.mkdir(parents=True, exist_ok=True)
    staging = cache_dir / f".tmp-{target.name}-{uuid.uuid4().hex[:12]}"
    staging.mkdir()
    try:
        extract_members(path, staging, limits)
        (staging / ".unpacked").write_text(str(path.name) + "\n")
        try:
            os.replace(staging, target)
        except OSError:
            if not (target / ".unpacked").is_file():  # another process finished first: theirs is the same
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target
