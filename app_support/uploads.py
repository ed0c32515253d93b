"""Visitors' uploaded dataset zips, unpacked once each, in their owner's folder, within disk quotas.

An upload is named by the SHA-256 of its bytes, so Check then Start (or the same zip uploaded twice) unpacks it
once: ``<root>/<owner key>/<digest>/``, complete only once its ``content`` folder is renamed into place. A refused
zip leaves nothing behind; ``release`` deletes an owner's uploads when their session ends (except those a job
still trains on), and ``clear`` deletes everything at exit.

Quotas are checked twice: against the sizes the zip declares before unpacking (cheap, and a refusal costs no disk),
and against what was really written after it (declared sizes can lie; the unpacker also stops at its own limit).
"""

from __future__ import annotations

import hashlib
import shutil
import threading
import uuid
import zipfile
from collections.abc import Iterable
from pathlib import Path

from app_support.archives import UPLOAD_LIMITS, ArchiveError, dataset_root, extract_zip
from app_support.errors import UserFacingError
from finetune.data.formats.archive import ArchiveLimits

PER_OWNER_BYTES = 2_000_000_000
TOTAL_BYTES = 10_000_000_000
_CONTENT = "content"


class UploadQuotaError(UserFacingError):
    """Unpacking an upload would take more disk than its owner (or the server) may use."""


def _digest(path: Path) -> str:
    hasher = hashlib.sha256()
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            hasher.update(block)
    return hasher.hexdigest()[:32]


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file() and not p.is_symlink())


def _declared_bytes(archive: Path) -> int:
    try:
        with zipfile.ZipFile(archive) as opened:
            return sum(info.file_size for info in opened.infolist())
    except (zipfile.BadZipFile, OSError):
        return 0  # the unpacker reports what is wrong with it


class UploadStore:
    def __init__(
        self,
        root: Path,
        *,
        per_owner_bytes: int = PER_OWNER_BYTES,
        total_bytes: int = TOTAL_BYTES,
        limits: ArchiveLimits = UPLOAD_LIMITS,
    ) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.per_owner_bytes = per_owner_bytes
        self.total_bytes = total_bytes
        self.limits = limits
        self._lock = threading.Lock()  # one unpack at a time: quotas are checked against a settled disk

    def _owner_folder(self, owner_key: str) -> Path:
        if not owner_key or "/" in owner_key or owner_key.startswith("."):
            raise ValueError("not an owner key")
        return self.root / owner_key

    def unpack(self, owner_key: str, archive: Path) -> Path:
        """The dataset root of ``archive`` unpacked for ``owner_key`` (reused when it already was)."""
        archive = Path(archive)
        digest = _digest(archive)
        owner_folder = self._owner_folder(owner_key)
        final = owner_folder / digest
        with self._lock:
            if (final / _CONTENT).is_dir():
                return dataset_root(final / _CONTENT)
            self._check_quota(owner_folder, _declared_bytes(archive))
            staging = f".partial-{uuid.uuid4().hex}"
            extract_zip(archive, owner_folder, limits=self.limits, name=staging)  # removes its folder on refusal
            written = folder_bytes(owner_folder / staging)
            try:
                self._check_quota(owner_folder, written, exclude=owner_folder / staging)
            except UploadQuotaError:
                shutil.rmtree(owner_folder / staging, ignore_errors=True)
                raise
            (owner_folder / staging).rename(final)
            return dataset_root(final / _CONTENT)

    def _check_quota(self, owner_folder: Path, incoming: int, *, exclude: Path | None = None) -> None:
        def used(folder: Path) -> int:
            if not folder.is_dir():
                return 0
            return sum(folder_bytes(p) for p in folder.iterdir() if p != exclude and p.is_dir())

        mine = used(owner_folder)
        if mine + incoming > self.per_owner_bytes:
            raise UploadQuotaError(
                f"this upload unpacks to {incoming / 1e6:.0f} MB and your uploads already use {mine / 1e6:.0f} MB; "
                f"each visitor may use {self.per_owner_bytes / 1e6:.0f} MB (uploads are deleted when you leave)"
            )
        everyone = sum(used(folder) for folder in self.root.iterdir() if folder.is_dir())
        if everyone + incoming > self.total_bytes:
            raise UploadQuotaError("the server's upload space is full right now; try again later or use a smaller zip")

    def discard(self, dataset: Path, *, keep: Iterable[Path] = ()) -> None:
        """Delete the unpacked upload holding ``dataset`` (a refused dataset), unless it holds a path in ``keep``
        (a job still trains on it)."""
        kept = [Path(path) for path in keep]
        for owner_folder in self.root.iterdir():
            for upload in owner_folder.iterdir() if owner_folder.is_dir() else ():
                if dataset == upload or upload in Path(dataset).parents:
                    if not any(path == upload or upload in path.parents for path in kept):
                        shutil.rmtree(upload, ignore_errors=True)
                    return

    def release(self, owner_key: str, *, keep: Iterable[Path] = ()) -> None:
        """Delete ``owner_key``'s uploads except those holding a path in ``keep`` (datasets jobs train on)."""
        try:
            owner_folder = self._owner_folder(owner_key)
        except ValueError:
            return
        if not owner_folder.is_dir():
            return
        kept = [Path(path) for path in keep]
        with self._lock:
            for upload in owner_folder.iterdir():
                if not any(path == upload or upload in path.parents for path in kept):
                    shutil.rmtree(upload, ignore_errors=True)

    def clear(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)


__all__ = ["ArchiveError", "UploadQuotaError", "UploadStore", "folder_bytes"]
