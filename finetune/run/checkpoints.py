"""Resumable checkpoints, written so that a crash at any moment never leaves one that looks complete but is not.

Layout of ``<output_dir>/checkpoints``::

    step-00000120/
        model.safetensors   model weights (in-memory names, tied tensors stored once)
        train_state.pt      optimizer, scheduler, scaler, EMA, RNG states, data position, counters (tensors and
                            plain Python values only: loaded with ``weights_only=True``)
        meta.json           written last: step, epoch, and the size of every file

A checkpoint is first written to a hidden ``.tmp-*`` folder, every file is flushed to disk, ``meta.json`` is added,
and only then is the folder renamed to ``step-N`` (a rename is atomic). Older checkpoints are deleted only after the
new one is in place, by renaming them to ``.trash-*`` before removing their files. ``latest_checkpoint`` accepts a
folder only if its ``meta.json`` parses and every file it lists exists with the recorded size.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
from safetensors.torch import load_model, save_model
from torch import nn

FORMAT_VERSION = 1
MODEL_FILE = "model.safetensors"
STATE_FILE = "train_state.pt"
META_FILE = "meta.json"
_NAME = re.compile(r"^step-(\d{8,})$")


class TrainingCheckpointError(ValueError):
    """A training checkpoint (``checkpoints/step-N`` of a run) whose weights or training state cannot be read, or
    whose weights do not fit the run's model. (``ddetr.CheckpointError`` is about model checkpoints.)"""


@dataclass(frozen=True)
class CheckpointInfo:
    path: Path
    step: int
    epoch: int


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())


def _fsync_directory(path: Path) -> None:
    # Makes the rename itself durable; not possible on every platform, and then the rename is still atomic.
    try:
        descriptor = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(descriptor)
    except OSError:
        pass
    finally:
        os.close(descriptor)


def checkpoint_name(step: int) -> str:
    return f"step-{step:08d}"


def save_checkpoint(
    directory: Path, *, step: int, epoch: int, model: nn.Module, train_state: dict[str, Any], keep: int = 2
) -> Path:
    """Write checkpoint ``step`` atomically, then delete all but the newest ``keep`` complete checkpoints."""
    directory.mkdir(parents=True, exist_ok=True)
    final = directory / checkpoint_name(step)
    # Not tempfile.mkdtemp: its private 0700 mode would stick to the renamed checkpoint.
    staging = directory / f".tmp-{checkpoint_name(step)}-{uuid.uuid4().hex[:12]}"
    staging.mkdir()
    try:
        save_model(model, str(staging / MODEL_FILE), metadata={"format": "pt", "step": str(step)})
        torch.save(train_state, staging / STATE_FILE)
        files = {}
        for name in (MODEL_FILE, STATE_FILE):
            _fsync_file(staging / name)
            files[name] = (staging / name).stat().st_size
        meta = {"format_version": FORMAT_VERSION, "step": step, "epoch": epoch, "files": files}
        (staging / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")
        _fsync_file(staging / META_FILE)
        _fsync_directory(staging)
        if _read_info(final) is not None:
            # The same step was saved before (a run stopped right after resuming): that state is this state.
            shutil.rmtree(staging)
        else:
            if final.exists():
                _discard(final)
            os.replace(staging, final)
            _fsync_directory(directory)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    prune_checkpoints(directory, keep=keep)
    return final


def _discard(path: Path) -> None:
    """Remove a folder so that no partly deleted copy ever carries a checkpoint name."""
    trash = path.with_name(f".trash-{path.name}-{uuid.uuid4().hex[:8]}")
    os.replace(path, trash)
    shutil.rmtree(trash, ignore_errors=True)


def prune_checkpoints(directory: Path, *, keep: int) -> None:
    """Keep the newest ``keep`` complete checkpoints; remove leftovers of interrupted writes and deletions."""
    for leftover in directory.glob(".tmp-*"):
        shutil.rmtree(leftover, ignore_errors=True)
    for leftover in directory.glob(".trash-*"):
        shutil.rmtree(leftover, ignore_errors=True)
    complete = list_checkpoints(directory)
    for info in complete[: max(0, len(complete) - keep)]:
        _discard(info.path)


def _read_info(path: Path) -> CheckpointInfo | None:
    match = _NAME.match(path.name)
    if match is None or not path.is_dir():
        return None
    try:
        meta = json.loads((path / META_FILE).read_text())
        if meta.get("format_version") != FORMAT_VERSION or int(meta["step"]) != int(match.group(1)):
            return None
        for name, size in meta["files"].items():
            if (path / name).stat().st_size != size:
                return None
        return CheckpointInfo(path=path, step=int(meta["step"]), epoch=int(meta["epoch"]))
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None


def list_checkpoints(directory: Path) -> list[CheckpointInfo]:
    """Complete checkpoints, oldest first; incomplete or foreign folders are ignored."""
    if not directory.is_dir():
        return []
    infos = [info for path in directory.iterdir() if (info := _read_info(path)) is not None]
    return sorted(infos, key=lambda info: info.step)


def latest_checkpoint(directory: Path) -> CheckpointInfo | None:
    checkpoints = list_checkpoints(directory)
    return checkpoints[-1] if checkpoints else None


def load_checkpoint(info: CheckpointInfo, model: nn.Module) -> dict[str, Any]:
    """Load the weights into ``model`` (strictly) and return the training state (safe loading only)."""
    try:
        missing, unexpected = load_model(model, str(info.path / MODEL_FILE), strict=False)
    except Exception as error:
        raise TrainingCheckpointError(
            f"{info.path}: cannot load the model weights ({type(error).__name__}: {error})"
        ) from None
    if missing or unexpected:
        raise TrainingCheckpointError(
            f"{info.path} does not fit the model: missing {sorted(missing)[:8]}, unexpected {sorted(unexpected)[:8]}"
        )
    try:
        return torch.load(info.path / STATE_FILE, map_location="cpu", weights_only=True)
    except Exception as error:
        raise TrainingCheckpointError(
            f"{info.path}: cannot read {STATE_FILE} ({type(error).__name__}: {error})"
        ) from None


# ---------------------------------------------------------------------------------------------------------------------
# Random number generator states, as tensors and plain values (what weights_only loading accepts)


def capture_rng_state() -> dict[str, Any]:
    # The legacy tuple (numpy's stubs also allow the dict form, which legacy=True never returns).
    name, keys, position, has_gauss, cached = cast(tuple[str, np.ndarray, int, int, float], np.random.get_state())
    version, python_state, gauss = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": {
            "name": name,
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "position": int(position),
            "has_gauss": int(has_gauss),
            "cached": float(cached),
        },
        "python": {"version": version, "state": list(python_state), "gauss": gauss},
    }


def restore_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    numpy_state = state["numpy"]
    np.random.set_state(
        (
            numpy_state["name"],
            numpy_state["keys"].numpy().astype(np.uint32),
            numpy_state["position"],
            numpy_state["has_gauss"],
            numpy_state["cached"],
        )
    )
    python_state = state["python"]
    random.setstate((python_state["version"], tuple(python_state["state"]), python_state["gauss"]))
