"""The bridge between the UI and ``finetune.api``: one training job per server, visible to every page.

The job runs in a thread of the server process (``finetune.api.start_run``), so it survives page reloads and every
visitor sees the same progress; only one runs at a time, and Stop/Resume act on it. Runs are written under the
app's runs folder with server-chosen names; requests name runs only by picking from ``resumable_runs()``.

Before a job starts, the dataset is opened and validated here, synchronously, so a broken dataset is a message on
the form rather than a failed background job, and a few validation images are kept to show predictions on. The
validated data is handed to the run, which does not validate it again; the data validated by "Check dataset" is
kept for the next Start on the same dataset, so Check then Start validates once.

The app trains with ``TrainConfig``'s defaults except for ``APP_OVERRIDES``; the form's initial values come from
``APP_TRAINING_DEFAULTS``.
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import PIL.Image
from safetensors.torch import load_model

import ddetr
from app_support.errors import UserFacingError
from ddetr.boxes import box_xywh_to_xyxy
from finetune.api import TrainingRun, prepare_dataset, read_run, resume_config, start_run
from finetune.config import TrainConfig
from finetune.data.prepare import PreparedData
from finetune.data.validation import format_reports
from finetune.presets import PRESETS
from finetune.run.checkpoints import MODEL_FILE, latest_checkpoint
from finetune.run.files import CHECKPOINTS, MODEL_CONFIG, MODEL_DIR, TRAIN_CONFIG
from finetune.run.setup import data_settings

PREVIEW_IMAGES = 4
PREDICTION_THRESHOLD = 0.3
ACTIVE_STATES = ("pending", "running")


class JobBusyError(UserFacingError):
    """A training job is already running; the server trains one at a time."""


# Where the app trains differently from ``python -m finetune`` (everything else is ``TrainConfig``'s default): a
# demo that finishes in minutes, logs every step for the live plots, checkpoints often enough to resume or to show
# predictions, draws no progress bar, and forks no loader workers from the web server.
APP_OVERRIDES: dict[str, Any] = {
    "epochs": 20,
    "batch_size": 4,
    "save_every": 50,
    "log_every": 1,
    "progress": False,
    "num_workers": 0,
}
# The app's settings before the form's: the form's initial values. dataset, model and output_dir are placeholders,
# always replaced by the form's choice and the server's runs folder.
APP_TRAINING_DEFAULTS = TrainConfig(dataset="shapes", **APP_OVERRIDES)


def training_config(*, dataset: str, model: str, output_dir: Path, **settings: Any) -> TrainConfig:
    """The app's run: ``APP_TRAINING_DEFAULTS`` with the chosen dataset, model, run folder and the form's settings
    (``TrainConfig`` field names; ValueError naming a bad or unknown one)."""
    return APP_TRAINING_DEFAULTS.with_overrides(dataset=dataset, model=model, output_dir=str(output_dir), **settings)


def prepare_for_app(config: TrainConfig, description: str) -> PreparedData:
    """Open and validate ``config.dataset`` as a run of ``config`` will train on it (``prepare_dataset``);
    ValueError if nothing is left to train on."""
    prepared = prepare_dataset(config)
    if "train" not in prepared.splits or len(prepared.splits["train"]) == 0:
        raise ValueError(f"{description} has no usable training images:\n{format_reports(prepared.reports)}")
    return prepared


@dataclass
class DataPreview:
    """A validated dataset: the class names, the validation report and a few images with their boxes."""

    description: str
    class_names: list[str]
    report: str
    samples: list[tuple[PIL.Image.Image, list[dict[str, Any]]]]  # image, ground truth in the detection schema
    split_sizes: dict[str, int]


def _ground_truth(boxes: Any, labels: Any, class_names: list[str]) -> list[dict[str, Any]]:
    truth = []
    for (xmin, ymin, xmax, ymax), label in zip(box_xywh_to_xyxy(boxes).tolist(), labels.tolist()):
        box = {"xmin": round(xmin), "ymin": round(ymin), "xmax": round(xmax), "ymax": round(ymax)}
        truth.append({"label": class_names[int(label)], "box": box})
    return truth


def _load_samples(prepared: PreparedData, split: str, count: int) -> list[tuple[PIL.Image.Image, list[dict]]]:
    if split not in prepared.splits:
        return []
    chosen = prepared.splits[split]
    samples = []
    for index in range(min(count, len(chosen))):
        sample = chosen.samples[index]
        image = ddetr.load_image(chosen.image_source(index))
        samples.append((image, _ground_truth(sample.boxes, sample.labels, prepared.class_names)))
    return samples


def preview_dataset(prepared: PreparedData, description: str) -> DataPreview:
    """What ``prepared`` holds, with a few training images for the preview (no validation here)."""
    return DataPreview(
        description=description,
        class_names=list(prepared.class_names),
        report=format_reports(prepared.reports),
        samples=_load_samples(prepared, "train", PREVIEW_IMAGES),
        split_sizes={name: len(split) for name, split in prepared.splits.items()},
    )


@dataclass
class JobSnapshot:
    """What the UI shows about the current (or last) job; ``version`` changes whenever anything in it does."""

    run_name: str | None
    state: str  # idle, pending, running, finished, stopped, diverged, failed
    step: int = 0
    total_steps: int = 0
    message: str = ""
    records: list[dict[str, Any]] = field(default_factory=list)
    model_dir: Path | None = None

    @property
    def active(self) -> bool:
        return self.state in ACTIVE_STATES

    @property
    def version(self) -> tuple[Any, ...]:
        return (self.run_name, self.state, len(self.records), self.step)


class TrainingJobs:
    """Starts, stops and resumes the server's single training job, and reports on it."""

    def __init__(self, runs_root: Path) -> None:
        self.runs_root = Path(runs_root)
        self.runs_root.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._predict_lock = threading.Lock()  # polls from several pages must not evaluate the same checkpoint twice
        self._run: TrainingRun | None = None
        self._run_name: str | None = None
        # The data the last "Check dataset" validated, for the next Start on the same dataset.
        self._checked: PreparedData | None = None
        self._validation_images: list[PIL.Image.Image] = []
        self._predictions: tuple[tuple[str | None, int], list[tuple[PIL.Image.Image, list[dict]]]] = ((None, -1), [])
        self._detector: tuple[tuple[str | None, int], ddetr.ObjectDetectionPipeline | None] = ((None, -1), None)
        self._detector_lock = threading.Lock()

    # -- control ------------------------------------------------------------------------------------------------ #

    def _check_idle(self) -> None:
        if self._run is not None and not self._run.done:
            raise JobBusyError(
                f"a training job ({self._run_name}) is already running; stop it or wait for it to finish"
            )

    def check_dataset(self, dataset_source: str, description: str) -> DataPreview:
        """Validate the dataset as a Start would, show it, and keep it for the next Start on the same dataset."""
        prepared = prepare_for_app(APP_TRAINING_DEFAULTS.with_overrides(dataset=dataset_source), description)
        with self._lock:
            self._checked = prepared
        return preview_dataset(prepared, description)

    def _take_checked(self, config: TrainConfig) -> PreparedData | None:
        """The checked data if it is what ``config`` trains on (used once: a later Start validates afresh)."""
        checked, self._checked = self._checked, None
        if checked is not None and checked.settings == data_settings(config):
            return checked
        return None

    def start(self, *, dataset_source: str, description: str, base_model: str, settings: Mapping[str, Any]) -> str:
        """Validate the dataset (unless "Check dataset" just did), then start training in the background on it;
        returns the new run's name. ``settings``: the form's ``TrainConfig`` settings."""
        with self._lock:
            self._check_idle()
            name = f"{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"
            config = training_config(
                dataset=dataset_source, model=base_model, output_dir=self.runs_root / name, **settings
            )
            prepared = self._take_checked(config) or prepare_for_app(config, description)
            self._validation_images = [image for image, _ in _load_samples(prepared, "validation", PREVIEW_IMAGES)]
            self._run, self._run_name = start_run(config, data=prepared), name
            return name

    def stop(self) -> bool:
        """Ask the running job to stop before its next step (it saves a resumable checkpoint first)."""
        with self._lock:
            if self._run is None or self._run.done:
                return False
            self._run.stop()
            return True

    def resume(self, run_name: str) -> str:
        with self._lock:
            self._check_idle()
            if run_name not in self.resumable_runs():
                raise ValueError(f"run {run_name!r} cannot be resumed (unknown, finished, or without a checkpoint)")
            directory = self.runs_root / run_name
            config = resume_config(directory)
            prepared = prepare_dataset(config)
            self._validation_images = [image for image, _ in _load_samples(prepared, "validation", PREVIEW_IMAGES)]
            self._run, self._run_name = start_run(config, data=prepared), run_name
            return run_name

    def wait(self, timeout: float | None = None) -> None:
        run = self._run
        if run is not None:
            run.wait(timeout)

    # -- listing ------------------------------------------------------------------------------------------------ #

    def _run_dirs(self) -> list[Path]:
        return sorted(p for p in self.runs_root.iterdir() if p.is_dir() and (p / TRAIN_CONFIG).is_file())

    def resumable_runs(self) -> list[str]:
        """Runs that stopped (or failed) with a checkpoint to continue from, newest first."""
        names = []
        for directory in self._run_dirs():
            status = read_run(directory)["status"] or {}
            active = directory.name == self._run_name and self._run is not None and not self._run.done
            if not active and status.get("state") != "finished" and latest_checkpoint(directory / CHECKPOINTS):
                names.append(directory.name)
        return sorted(names, reverse=True)

    def finished_models(self) -> list[tuple[str, Path]]:
        """(run name, model folder) of every run that exported a model, newest first."""
        found = []
        for directory in self._run_dirs():
            model_dir = directory / MODEL_DIR
            if (model_dir / "config.json").is_file() and (model_dir / "model.safetensors").is_file():
                found.append((directory.name, model_dir))
        return sorted(found, reverse=True)

    # -- reporting ---------------------------------------------------------------------------------------------- #

    def snapshot(self) -> JobSnapshot:
        run, name = self._run, self._run_name
        if run is None or name is None:
            return JobSnapshot(run_name=None, state="idle")
        records = run.records()
        status = read_run(run.output_dir)["status"] or {}
        train = [r for r in records if r.get("type") == "train"]
        step = int(train[-1]["step"]) if train else int(status.get("step", 0) or 0)
        total = int(status.get("total_steps", 0) or 0)
        state = run.state
        if state == "failed" and run.error is not None:
            message = f"{type(run.error).__name__}: {run.error}"
        else:
            message = ""
        model_dir = run.output_dir / MODEL_DIR if state == "finished" else None
        return JobSnapshot(name, state, step, max(total, step), message, records, model_dir)

    def checkpoint_detector(self) -> tuple[tuple[str | None, int], ddetr.ObjectDetectionPipeline] | None:
        """The current (or last) run's latest checkpoint as a detector, loaded once per checkpoint, with its
        (run name, step); None before the first checkpoint."""
        run, name = self._run, self._run_name
        if run is None:
            return None
        checkpoint = latest_checkpoint(run.output_dir / CHECKPOINTS)
        if checkpoint is None:
            return None
        key = (name, checkpoint.step)
        with self._detector_lock:
            cached_key, detector = self._detector
            if cached_key != key or detector is None:
                detector = _checkpoint_detector(run.output_dir, checkpoint.path)
                self._detector = (key, detector)
            return key, detector

    def predictions(self) -> list[tuple[PIL.Image.Image, list[dict[str, Any]]]]:
        """The latest checkpoint's detections on a few validation images (recomputed only for a new checkpoint)."""
        if not self._validation_images:
            return []
        found = self.checkpoint_detector()
        if found is None:
            return []
        key, detector = found
        with self._predict_lock:
            if self._predictions[0] != key:
                images = self._validation_images
                self._predictions = (
                    key,
                    # One image in, one list of detections out.
                    [
                        (image, cast(list[dict[str, Any]], detector(image, threshold=PREDICTION_THRESHOLD)))
                        for image in images
                    ],
                )
            return self._predictions[1]


def _checkpoint_detector(run_dir: Path, checkpoint_dir: Path) -> ddetr.ObjectDetectionPipeline:
    """A detector from a training checkpoint: architecture from the run, weights from the checkpoint only (the
    optimizer state beside them is not read)."""
    config = ddetr.DeformableDetrConfig.from_pretrained(run_dir / MODEL_CONFIG)
    model = ddetr.DeformableDetrForObjectDetection(config)
    missing, unexpected = load_model(model, str(checkpoint_dir / MODEL_FILE), strict=False)
    if missing or unexpected:
        raise ValueError(f"checkpoint {checkpoint_dir.name} does not fit its run's model")
    settings = json.loads((run_dir / TRAIN_CONFIG).read_text())
    size = {"shortest_edge": int(settings["image_size"]), "longest_edge": int(settings["max_size"])}
    processor = ddetr.DeformableDetrImageProcessorFast(size=size)
    return ddetr.ObjectDetectionPipeline(model=model.eval(), processor=processor)


def base_model_choices(registry_choices: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """Presets (trained from scratch) first, then every model the Detect tab lists (fine-tuned from)."""
    presets = [
        (f"{name} preset, from scratch ({preset.description})", f"preset:{name}") for name, preset in PRESETS.items()
    ]
    return presets + [(f"fine-tune {label}", key) for label, key in registry_choices]
