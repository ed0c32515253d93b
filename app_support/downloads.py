"""Files the app hands out for download, written under server-chosen names in the app's private work area.

Names never contain user text, and the folder is pruned to its newest files so a busy Space does not fill its disk
(Gradio copies each returned file into its own cache, which ``gr.Blocks(delete_cache=...)`` ages out).
"""

from __future__ import annotations

import json
import shutil
import threading
import uuid
import zipfile
from pathlib import Path
from typing import Any


class DownloadFolder:
    def __init__(self, folder: Path, keep: int = 200) -> None:
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.keep = keep
        self._lock = threading.Lock()

    def _new_path(self, stem: str, suffix: str) -> Path:
        directory = self.folder / uuid.uuid4().hex
        directory.mkdir()
        return directory / f"{stem}{suffix}"

    def new_folder(self) -> Path:
        """A fresh, empty folder of its own, for outputs that come in several files (older ones pruned first)."""
        self._prune()
        return self._new_path("", "").parent

    def write_json(self, payload: Any, stem: str = "detections") -> Path:
        path = self._new_path(stem, ".json")
        path.write_text(json.dumps(payload, indent=2) + "\n", encoding="utf-8")
        self._prune()
        return path

    def zip_directory(self, source: Path, stem: str) -> Path:
        """Zip ``source`` with its files at the archive's top level under ``stem/``; symlinks are left out."""
        path = self._new_path(stem, ".zip")
        with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as archive:
            for file in sorted(Path(source).rglob("*")):
                if file.is_file() and not file.is_symlink():
                    archive.write(file, f"{stem}/{file.relative_to(source).as_posix()}")
        self._prune()
        return path

    def _prune(self) -> None:
        with self._lock:
            entries = sorted(self.folder.iterdir(), key=lambda p: p.stat().st_mtime, reverse=True)
            for stale in entries[self.keep :]:
                shutil.rmtree(stale, ignore_errors=True)
