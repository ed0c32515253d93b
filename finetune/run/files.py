"""The files of a run directory other than checkpoints and metrics: settings, status, reports and the final model.

train_config.json       the run's settings, with the image size resolved (what ``--resume`` continues with)
model_config.json       the model's DeformableDetrConfig (so a resumed run never needs the original source)
status.json             state (running, finished, stopped, diverged, failed), step, message
validation_report.json  the dataset check, per split
model/                  final weights: config.json, model.safetensors, preprocessor_config.json
"""

from __future__ import annotations

import json
import os
import shutil
import time
import uuid
from pathlib import Path
from typing import Any

from ddetr import DeformableDetrForObjectDetection
from ddetr.processing import DeformableDetrImageProcessor

TRAIN_CONFIG = "train_config.json"
MODEL_CONFIG = "model_config.json"
STATUS = "status.json"
VALIDATION_REPORT = "validation_report.json"
METRICS = "metrics.jsonl"
CHECKPOINTS = "checkpoints"
MODEL_DIR = "model"
STATES = ("running", "finished", "stopped", "diverged", "failed")


def write_json(path: Path, value: Any) -> None:
    """Write JSON aside and rename it into place, so readers never see half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}-{uuid.uuid4().hex[:12]}.tmp")
    try:
        with open(temporary, "w", encoding="utf-8") as stream:
            json.dump(value, stream, indent=2, sort_keys=True)
            stream.write("\n")
        os.replace(temporary, path)
    finally:
        if temporary.exists():
            temporary.unlink()


def write_status(output_dir: Path, *, state: str, step: int, total_steps: int, message: str = "") -> None:
    if state not in STATES:
        raise ValueError(f"unknown run state {state!r}")
    write_json(
        Path(output_dir) / STATUS,
        {"state": state, "step": step, "total_steps": total_steps, "message": message, "updated": time.time()},
    )


def read_status(output_dir: Path) -> dict[str, Any] | None:
    try:
        return json.loads((Path(output_dir) / STATUS).read_text())
    except (OSError, json.JSONDecodeError):
        return None


def export_model(
    model: DeformableDetrForObjectDetection, processor: DeformableDetrImageProcessor, directory: Path
) -> Path:
    """Save weights, config and preprocessor config to ``directory``, replacing any earlier export only once the
    new one is complete."""
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    staging = directory.with_name(f".{directory.name}-{uuid.uuid4().hex[:12]}")
    staging.mkdir()
    try:
        was_training = model.training
        model.eval()
        model.save_pretrained(staging)
        model.train(was_training)
        processor.save_pretrained(staging)
        if directory.exists():
            trash = directory.with_name(f".trash-{directory.name}-{uuid.uuid4().hex[:8]}")
            os.replace(directory, trash)
            os.replace(staging, directory)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.replace(staging, directory)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return directory
