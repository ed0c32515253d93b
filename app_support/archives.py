"""Unpacking an uploaded dataset zip without trusting anything in it.

Refused: files that are not zips, encrypted members, absolute or ``..`` member names (zip-slip), and archives whose
entry count or unpacked size exceeds the limits (zip bombs). The unpacked size is counted while streaming, since
the sizes declared in a zip's directory can lie. Symlinks and other special members are skipped, never created.

What the unpacked files name is the dataset readers' business: every image reference of every format must resolve
inside the dataset folder (``finetune.data.formats.paths``), which the app never lets a visitor switch off.
"""

from __future__ import annotations

import shutil
import uuid
from pathlib import Path

from finetune.data.formats.archive import ArchiveError, ArchiveLimits, extract_members

__all__ = ["UPLOAD_LIMITS", "ArchiveError", "dataset_root", "extract_zip"]

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
