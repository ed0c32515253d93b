"""The folders the app may read from or write to, and the one function that turns user text into a path.

A public demo must never read or serve a file because a visitor named it. Every user-supplied location therefore
goes through :func:`resolve_inside`, which accepts only a relative path that, after resolving symlinks and ``..``,
still lies inside one allow-listed root.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent


class PathNotAllowedError(ValueError):
    """A user-supplied path is absolute, escapes its allow-listed folder, or does not exist there."""


@dataclass(frozen=True)
class AppPaths:
    """Where the app keeps things. Every folder is absolute; ``work`` is private scratch space for this process."""

    models: Path  # allow-listed: model directories (the bundled model lives here)
    data: Path  # allow-listed: datasets a user may point the fine-tune tab at
    runs: Path  # fine-tuning runs written by this app
    examples: Path  # example images shipped with the repo
    labels: Path  # visitors' Label-tab datasets, one folder per browser token (never listed or served)
    work: Path  # extracted uploads, JSON downloads, zipped models

    @classmethod
    def from_root(
        cls,
        root: Path = REPO_ROOT,
        *,
        models: Path | None = None,
        data: Path | None = None,
        runs: Path | None = None,
        labels: Path | None = None,
        work: Path | None = None,
    ) -> AppPaths:
        work_dir = work if work is not None else Path(tempfile.gettempdir()) / f"ddetr-app-{os.getpid()}"
        paths = cls(
            models=Path(models or root / "models").resolve(),
            data=Path(data or root / "data").resolve(),
            runs=Path(runs or root / "runs").resolve(),
            examples=(root / "examples").resolve(),
            labels=Path(labels or root / "labels").resolve(),
            work=Path(work_dir).resolve(),
        )
        for folder in (paths.runs, paths.labels, paths.work):
            folder.mkdir(parents=True, exist_ok=True)
        return paths

    def redact(self, text: str) -> str:
        """``text`` with the app's absolute folders replaced by short names, for messages shown to visitors."""
        for folder, name in (
            (self.work, "<upload>"),
            (self.runs, "runs"),
            (self.labels, "labels"),
            (self.data, "data"),
            (self.models, "models"),
        ):
            text = text.replace(str(folder), name)
        return text.replace(str(REPO_ROOT), ".")

    def scratch(self, name: str) -> Path:
        """A sub-folder of the private work area (created on demand)."""
        folder = self.work / name
        folder.mkdir(parents=True, exist_ok=True)
        return folder


def is_inside(path: Path, root: Path) -> bool:
    """Whether ``path`` (resolved, symlinks followed) lies in ``root`` or is ``root`` itself."""
    try:
        path.resolve().relative_to(root.resolve())
    except (ValueError, OSError, RuntimeError):
        return False
    return True


def resolve_inside(root: Path, user_path: str, *, must_exist: bool = True) -> Path:
    """Turn a path typed by a user into an absolute path inside ``root``, or refuse with a reason.

    Absolute paths, ``~``, and anything that resolves outside ``root`` (``..``, symlinks pointing out) are refused,
    so the message never confirms whether a file outside the root exists.
    """
    text = (user_path or "").strip()
    if not text:
        raise PathNotAllowedError(f"give a path relative to the allowed folder {root.name}/")
    if "\x00" in text:
        raise PathNotAllowedError("the path contains a NUL character")
    candidate = Path(text)
    if candidate.is_absolute() or text.startswith("~") or candidate.drive:
        raise PathNotAllowedError(f"{text!r} is absolute; give a path relative to the allowed folder {root.name}/")
    resolved = (root / candidate).resolve()
    if not is_inside(resolved, root):
        raise PathNotAllowedError(f"{text!r} points outside the allowed folder {root.name}/")
    if must_exist and not resolved.exists():
        raise PathNotAllowedError(f"{text!r} does not exist in the allowed folder {root.name}/")
    return resolved
