"""The one place where a path named by a dataset's files becomes a file to read: it must stay inside the dataset.

Annotation files are user input: an image name like ``../../etc/passwd``, an absolute path, or a symlink inside the
dataset that points elsewhere must not make us read (or even stat) anything outside the dataset folder. So
:func:`resolve_inside` walks the name one component at a time from the dataset folder: ``..`` is applied to the
real path reached so far, each component is ``lstat``-ed only once the path up to it is known to be inside, and a
symlink's target is checked as text before anything beneath it is looked at. A name that would leave is refused
with the same message whether or not its target exists, and the message names the opt-out: a local user whose own
dataset names their own files elsewhere passes ``allow_outside_files=True`` (``--allow-outside-files``), and the
name is then resolved as the operating system would resolve it.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass
from pathlib import Path

_MAX_SYMLINKS = 40
# Appended to every refusal, so that whoever meets it learns how to read their own files anyway.
OUTSIDE_HINT = "pass --allow-outside-files / allow_outside_files=True if this is your own dataset"


class UnsafePathError(ValueError):
    """A path named by the dataset cannot be used: it leads outside the dataset folder (:class:`OutsidePathError`)
    or holds a NUL character."""


class OutsidePathError(UnsafePathError):
    """A path named by the dataset leads outside the dataset folder. The importers refuse the whole dataset with
    it (an attack or a mistake, not a missing image) unless ``allow_outside_files``."""


def _within(path: str, root: str) -> bool:
    try:
        return os.path.commonpath([path, root]) == root
    except ValueError:  # different drives (Windows) or a mix of absolute and relative paths
        return False


def _components(text: str) -> list[str]:
    return [part for part in text.split(os.sep) if part not in ("", ".")]


def _relative_to_root(path: Path | str, root: Path, root_real: str) -> list[str] | None:
    """``path``'s components below the dataset folder, judged as text; None when it is not below it."""
    absolute = os.path.normpath(os.path.abspath(path))
    for top in dict.fromkeys((os.path.normpath(os.path.abspath(root)), root_real)):
        if _within(absolute, top):
            return _components(os.path.relpath(absolute, top))
    return None


def outside_refusal(where: str, text: str, root: Path | str) -> OutsidePathError:
    """The refusal of ``text`` (named by ``where``) for leading outside ``root``; it never depends on the target."""
    return OutsidePathError(f"{where}: the path {text!r} leads outside the dataset folder {root} ({OUTSIDE_HINT})")


def resolve_inside(
    root: Path | str,
    name: str | os.PathLike,
    *,
    base: Path | str | None = None,
    where: str,
    allow_outside_files: bool = False,
) -> str:
    """The real path of ``name`` (relative to ``base``, a folder inside ``root``; default ``root``) when it lies
    inside the dataset folder ``root`` after resolving ``..`` and symlinks; OutsidePathError naming ``where`` (the
    file that names the path) otherwise, UnsafePathError for a name holding a NUL. Missing files resolve too
    (validation reports them missing); nothing outside ``root`` is opened or stat-ed. ``allow_outside_files``: no
    check, the real path wherever it leads."""
    root = Path(root)
    text = os.fspath(name)
    if "\x00" in text:
        raise UnsafePathError(f"{where}: the path {text!r} holds a NUL character")
    if allow_outside_files:
        return os.path.realpath(os.path.join(os.path.abspath(root if base is None else base), text))
    root_real = os.path.realpath(root)
    refusal = outside_refusal(where, text, root)
    if os.path.isabs(text):
        components = _relative_to_root(text, root, root_real)
    else:
        prefix = [] if base is None else _relative_to_root(base, root, root_real)
        components = None if prefix is None else prefix + _components(text)
    if components is None:
        raise refusal
    pending = list(reversed(components))
    current = root_real
    links = 0
    while pending:
        part = pending.pop()
        if part in ("", "."):
            continue
        if part == "..":
            if current == root_real:
                raise refusal
            current = os.path.dirname(current)
            continue
        candidate = os.path.join(current, part)
        try:
            mode = os.lstat(candidate).st_mode
        except OSError:
            current = candidate  # missing (or unreadable): the rest of the name is taken as text
            continue
        if not stat.S_ISLNK(mode):
            current = candidate
            continue
        links += 1
        if links > _MAX_SYMLINKS:
            raise refusal
        try:
            target = os.readlink(candidate)
        except OSError:
            raise refusal from None
        if os.path.isabs(target):
            target = os.path.normpath(target)
            if not _within(target, root_real):
                raise refusal
            current = root_real
            pending.extend(reversed(_components(os.path.relpath(target, root_real))))
        else:
            pending.extend(reversed(target.split(os.sep)))
    return current


@dataclass(frozen=True)
class FoundFile:
    """A file met while listing a folder: ``relative`` (to the dataset folder, with ``/``), and its real ``path``,
    or ``refusal`` (the message) when it is a symlink leading outside the dataset folder."""

    relative: str
    path: str | None
    refusal: str | None = None


def files_under(
    root: Path | str,
    directory: Path | str,
    *,
    suffixes: tuple[str, ...] | None = None,
    max_depth: int | None = None,
    allow_outside_files: bool = False,
) -> list[FoundFile]:
    """The files below ``directory`` (a folder inside ``root``), sorted by relative path, without following
    symlinked folders; symlinked files are resolved with :func:`resolve_inside` (never followed outside unless
    ``allow_outside_files``). ``suffixes``: lower-case extensions to keep (``(".jpg", ".png")``); None keeps every
    file. ``max_depth``: how many folder levels to list (1: ``directory``'s own files)."""
    root = Path(root)
    try:
        start = resolve_inside(root, directory, where=str(root), allow_outside_files=allow_outside_files)
    except UnsafePathError:
        return []
    root_real = os.path.realpath(root)
    found: list[FoundFile] = []
    stack = [(start, 1)]
    while stack:
        folder, depth = stack.pop()
        try:
            with os.scandir(folder) as entries:
                listed = sorted(entries, key=lambda entry: entry.name)
        except OSError:
            continue
        for entry in listed:
            if entry.name.startswith(".") or entry.name == "__MACOSX":
                continue
            relative = os.path.relpath(entry.path, root_real).replace(os.sep, "/")
            if entry.is_dir(follow_symlinks=False):
                if max_depth is None or depth < max_depth:
                    stack.append((entry.path, depth + 1))
            elif suffixes is not None and os.path.splitext(entry.name)[1].lower() not in suffixes:
                continue
            elif entry.is_symlink():
                try:
                    real = resolve_inside(root, relative, where=relative, allow_outside_files=allow_outside_files)
                except UnsafePathError as error:
                    found.append(FoundFile(relative, None, str(error)))
                    continue
                if os.path.isfile(real):
                    found.append(FoundFile(relative, real))
            elif entry.is_file(follow_symlinks=False):
                found.append(FoundFile(relative, entry.path))
    found.sort(key=lambda item: item.relative)
    return found


def safe_file(
    root: Path | str,
    name: str | os.PathLike,
    *,
    base: Path | str | None = None,
    where: str,
    allow_outside_files: bool = False,
) -> Path | None:
    """``resolve_inside`` for a file that should exist: its path, or None when it is missing or not a file."""
    path = resolve_inside(root, name, base=base, where=where, allow_outside_files=allow_outside_files)
    return Path(path) if os.path.isfile(path) else None
