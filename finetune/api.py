"""Python API for applications: start a run in the background, stream its metrics, stop it, resume it.

    config = TrainConfig(dataset="shapes", model="small", output_dir="runs/a", progress=False)
    run = start_run(config)
    for record in run.stream():          # metrics records as they are written; ends when the run does
        show(record)
    run.stop()                            # takes effect before the next step; saves a resumable checkpoint
    run = resume_run("runs/a")            # continues from the latest complete checkpoint

    data = prepare_dataset(config)        # validate (e.g. to show the report first), then train on it as it is:
    run = start_run(config, data=data)    # the run does not validate it again

Datasets in any supported format (COCO, Roboflow, YOLO, Pascal VOC, Label Studio, CVAT, Hugging Face) are named by
``config.dataset`` and, when detection from the layout is not wanted, ``config.dataset_format`` (one of
``DATASET_FORMATS``); ``detect_format(folder)`` tells the format a folder would be read in, and
``export_dataset(config, "out.zip")`` writes the dataset as a COCO zip.

The run executes in a thread of this process (torch releases the interpreter lock in its kernels, so a web UI
stays responsive). ``start_process_run(config)`` runs it in a child process instead (``ProcessRun``, the same
interface): a crash or an out-of-memory kill there leaves this process running; see ``finetune.run.process``.
Nothing here imports a UI library.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from finetune.config import RESUMABLE_OVERRIDES, TrainConfig
from finetune.data.export_coco import CocoExport, export_coco
from finetune.data.formats import DATASET_FORMATS
from finetune.data.formats.detect import detect_format
from finetune.data.prepare import PreparedData, prepare
from finetune.data.validation import CheckBudget, CheckBudgetExceeded
from finetune.run.files import METRICS, TRAIN_CONFIG, read_status
from finetune.run.launch import run_training
from finetune.run.metrics_log import read_metrics
from finetune.run.process import ProcessRun, start_process_run
from finetune.run.setup import data_settings
from finetune.run.trainer import RunResult

__all__ = [
    "DATASET_FORMATS",
    "CheckBudget",
    "CheckBudgetExceeded",
    "CocoExport",
    "ProcessRun",
    "TrainingRun",
    "detect_format",
    "export_dataset",
    "prepare_dataset",
    "read_run",
    "resume_config",
    "resume_run",
    "start_process_run",
    "start_run",
]

logger = logging.getLogger(__name__)


class TrainingRun:
    """One training run on a background thread. ``state``: pending, running, then finished, stopped, diverged or
    failed (with ``error`` set). ``data``: the dataset already prepared for ``config`` (see ``prepare_dataset``),
    trained on without validating it again; None: the run prepares it."""

    def __init__(self, config: TrainConfig, *, data: PreparedData | None = None) -> None:
        self.config = config
        self._data = data
        self._stop = threading.Event()
        self._records: list[dict[str, Any]] = []
        self._changed = threading.Condition()
        self._thread: threading.Thread | None = None
        self._state = "pending"
        self.result: RunResult | None = None
        self.error: BaseException | None = None

    @property
    def output_dir(self) -> Path:
        return Path(self.config.output_dir)

    @property
    def state(self) -> str:
        return self._state

    @property
    def done(self) -> bool:
        return self._state not in ("pending", "running")

    def start(self) -> TrainingRun:
        if self._thread is not None:
            raise ValueError("this run was already started; use resume_run() to continue it")
        self._state = "running"
        self._thread = threading.Thread(target=self._execute, name=f"finetune:{self.output_dir.name}", daemon=True)
        self._thread.start()
        return self

    def _execute(self) -> None:
        data, self._data = self._data, None  # the run holds it while it trains, this handle not after
        try:
            self.result = run_training(self.config, stop_event=self._stop, on_record=self._receive, data=data)
            state = self.result.state
        except BaseException as error:  # reported through .error / .state; the thread must not die silently
            logger.exception("training run %s failed", self.output_dir)
            self.error = error
            state = "failed"
        with self._changed:
            self._state = state
            self._changed.notify_all()

    def _receive(self, record: dict[str, Any]) -> None:
        with self._changed:
            self._records.append(record)
            self._changed.notify_all()

    def stop(self, *, wait: bool = False, timeout: float | None = None) -> None:
        """Ask the run to stop before its next step (it saves a checkpoint first)."""
        self._stop.set()
        if wait:
            self.wait(timeout)

    def wait(self, timeout: float | None = None) -> RunResult | None:
        """Block until the run ends (or ``timeout`` seconds); returns its result, None if still running or failed."""
        if self._thread is not None:
            self._thread.join(timeout)
        return self.result

    def records(self, *, kind: str | None = None) -> list[dict[str, Any]]:
        """The metrics records received so far (optionally only ``train``, ``eval`` or ``status``)."""
        with self._changed:
            return [r for r in self._records if kind is None or r.get("type") == kind]

    def stream(self, *, poll: float = 1.0, timeout: float | None = None) -> Iterator[dict[str, Any]]:
        """Yield each record as it arrives until the run ends (or ``timeout`` seconds pass)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        position = 0
        while True:
            with self._changed:
                while position >= len(self._records) and not self.done:
                    remaining = poll if deadline is None else min(poll, deadline - time.monotonic())
                    if remaining <= 0:
                        return
                    self._changed.wait(remaining)
                fresh = self._records[position:]
                position = len(self._records)
                finished = self.done
            yield from fresh
            if finished and position >= len(self.records()):
                return


def prepare_dataset(config: TrainConfig, *, budget: CheckBudget | None = None) -> PreparedData:
    """Open and validate ``config.dataset`` as a run of ``config`` would (its ``strict``, ``seed`` and
    ``validation_fraction``): the splits, class names and validation reports, to show and then to hand to
    ``start_run(config, data=...)``. ``budget``: at most so many images or seconds of checking (a ValueError
    saying which, beyond)."""
    return prepare(data_settings(config), budget=budget)


def export_dataset(config: TrainConfig, output_zip: str | Path) -> CocoExport:
    """Write ``config.dataset`` (read in ``config.dataset_format``, validated with ``config.strict``) as a COCO zip;
    see ``finetune.data.export_coco``."""
    return export_coco(
        config.dataset,
        output_zip,
        format=config.dataset_format,
        strict=config.strict,
        allow_outside_files=config.allow_outside_files,
    )


def start_run(config: TrainConfig, data: PreparedData | None = None) -> TrainingRun:
    """Start ``config`` in the background and return its handle. ``data``: the dataset already prepared for this
    config (``prepare_dataset``), so that the run does not validate it again; data prepared from another source or
    with other settings makes the run fail with ValueError before it writes anything."""
    return TrainingRun(config, data=data).start()


def resume_config(output_dir: str | Path, **overrides: Any) -> TrainConfig:
    """The saved settings of the run in ``output_dir`` with ``resume=True``; only device, worker count and
    progress display may change (anything else would make the resumed run differ from the original)."""
    path = Path(output_dir) / TRAIN_CONFIG
    if not path.is_file():
        raise ValueError(f"nothing to resume in {output_dir}: it has no {TRAIN_CONFIG}")
    saved = TrainConfig.load(path)
    refused = sorted(
        key for key, value in overrides.items() if key not in RESUMABLE_OVERRIDES and getattr(saved, key) != value
    )
    if refused:
        raise ValueError(f"a resumed run keeps its settings; cannot change {refused}")
    return saved.with_overrides(**{**overrides, "output_dir": str(output_dir), "resume": True})


def resume_run(output_dir: str | Path, **overrides: Any) -> TrainingRun:
    """Continue the run in ``output_dir`` from its latest complete checkpoint, in the background."""
    return start_run(resume_config(output_dir, **overrides))


def read_run(output_dir: str | Path) -> dict[str, Any]:
    """A run's status and metrics from its files (for showing runs started elsewhere or before a restart)."""
    directory = Path(output_dir)
    return {"status": read_status(directory), "metrics": read_metrics(directory / METRICS)}
