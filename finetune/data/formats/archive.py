"""Opening a dataset zip: unpacked once, without trusting it, into a cache folder named after its content hash.

Refused: absolute or ``..`` member names (zip-slip), encrypted members, more than ``MAX_MEMBERS`` entries or more
than ``MAX_UNPACKED_BYTES`` unpacked (counted while unpacking: declared sizes can lie). Symlinks and other special
members are skipped, never created.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import stat
import uuid
import zipfile
from pathlib import Path, PurePosixPath

MAX_MEMBERS = 200_000
MAX_UNPACKED_BYTES = 64 * 1024**3
_CHUNK = 1024 * 1024


def _digest(path: Path) -> str:
    hasher = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(_CHUNK), b""):
            hasher.update(chunk)
    return hasher.hexdigest()


def _safe_name(name: str) -> PurePosixPath:
    pure = PurePosixPath(name.replace("\\", "/"))
    if name.startswith(("/", "\\")) or ".." in pure.parts or (pure.parts and ":" in pure.parts[0]):
        raise ValueError(f"the zip member {name!r} would be written outside the dataset folder")
    return pure


def unpack_zip(path: Path, cache_dir: Path) -> Path:
    """The folder ``path`` unpacks to (under ``cache_dir``), unpacking it first unless an earlier run did."""
    if not zipfile.is_zipfile(path):
        raise ValueError(f"{path} is not a zip file (or it is truncated)")
    target = cache_dir / _digest(path)[:24]
    if (target / ".unpacked").is_file():
        return target
    cache_dir.mkdir(parents=True, exist_ok=True)
    staging = cache_dir / f".tmp-{target.name}-{uuid.uuid4().hex[:12]}"
    try:
        with zipfile.ZipFile(path) as archive:
            members = archive.infolist()
            if len(members) > MAX_MEMBERS:
                raise ValueError(f"{path} has {len(members)} entries; at most {MAX_MEMBERS} are accepted")
            written = 0
            for info in members:
                relative = _safe_name(info.filename)
                if info.flag_bits & 0x1:
                    raise ValueError(f"{path}: encrypted zip members are not supported ({info.filename})")
                kind = stat.S_IFMT(info.external_attr >> 16)  # 0 when the zip stores no file type
                if info.is_dir() or (kind and kind != stat.S_IFREG) or not relative.parts:
                    continue
                destination = staging.joinpath(*relative.parts)
                destination.parent.mkdir(parents=True, exist_ok=True)
                with archive.open(info) as source, destination.open("wb") as sink:
                    for chunk in iter(lambda: source.read(_CHUNK), b""):
                        written += len(chunk)
                        if written > MAX_UNPACKED_BYTES:
                            raise ValueError(f"{path} unpacks to more than {MAX_UNPACKED_BYTES // 1024**3} GiB")
                        sink.write(chunk)
        (staging / ".unpacked").write_text(str(path.name) + "\n")
        try:
            os.replace(staging, target)
        except OSError:
            if not (target / ".unpacked").is_file():  # another process finished first: theirs is the same
                raise
    except zipfile.BadZipFile as error:
        raise ValueError(f"{path} is a corrupt zip: {error}") from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target
