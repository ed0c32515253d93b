"""``metrics.jsonl``: one JSON object per line, per logged training step and per evaluation.

Every record has ``type`` (``train``, ``eval`` or ``status``) and ``step``; training records carry ``loss``. A line
torn by a crash is skipped when reading. On resume the file is cut back to the checkpoint's step, so the steps that
are trained again are not listed twice.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any


def _jsonable(value: Any) -> Any:
    # JSON has no NaN/inf; a diverged loss is written as null rather than as invalid JSON.
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: _jsonable(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(item) for item in value]
    return value


class MetricsLog:
    """Appends records to a JSON-lines file, flushed line by line so readers see them at once."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def append(self, record: dict[str, Any]) -> None:
        line = json.dumps(_jsonable(record), sort_keys=True)
        with open(self.path, "a", encoding="utf-8") as handle:
            handle.write(line + "\n")
            handle.flush()

    def truncate_after(self, step: int) -> None:
        """Drop the records of steps after ``step`` (written aside, then renamed into place)."""
        kept = [record for record in read_metrics(self.path) if int(record.get("step", 0)) <= step]
        temporary = self.path.with_name(self.path.name + ".tmp")
        with open(temporary, "w", encoding="utf-8") as handle:
            for record in kept:
                handle.write(json.dumps(record, sort_keys=True) + "\n")
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, self.path)


def read_metrics(path: Path, *, kind: str | None = None) -> list[dict[str, Any]]:
    """The records of a metrics file (optionally only those of ``kind``); missing file -> empty list."""
    records = []
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        return []
    for line in text.splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict) and (kind is None or record.get("type") == kind):
            records.append(record)
    return records
