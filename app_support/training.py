"""What the app trains and shows: its training settings, dataset previews, and detectors from checkpoints.

Before a job is queued (``jobs.TrainingJobs``), the dataset is opened and validated here, in the server, so a broken
dataset is a message on the form rather than a failed background job, and a few validation images are kept to show
the latest checkpoint's predictions on. The child process that trains validates it again for itself.

The app trains with ``TrainConfig``'s defaults except for ``APP_OVERRIDES``; the form's initial values come from
``APP_TRAINING_DEFAULTS``.
"""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import PIL.Image
from safetensors.torch import load_model

import ddetr
from ddetr.boxes import box_xywh_to_xyxy
from finetune.api import CheckBudget, CheckBudgetExceeded, prepare_dataset
from finetune.config import TrainConfig
from finetune.data.formats.paths import OUTSIDE_HINT, OutsidePathError
from finetune.data.prepare import PreparedData
from finetune.data.validation import format_reports
from finetune.presets import PRESETS
from finetune.run.checkpoints import MODEL_FILE
from finetune.run.files import MODEL_CONFIG, TRAIN_CONFIG

PREVIEW_IMAGES = 4
PREVIEW_SIDE = 640
PREDICTION_THRESHOLD = 0.3
# A visitor's Check/Start validates in the server: bounded, so that no dataset holds a worker for minutes. (The
# training child validates again for itself, unbounded: it has its own process.)
CHECK_BUDGET = CheckBudget(max_images=50_000, max_seconds=60.0)
APP_OUTSIDE_HINT = "a dataset on this server must keep all its files inside its zip or folder"
PREVIEW_CACHE = 4  # checkpoint detectors kept loaded (one per recently polled job)

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
    try:
        prepared = prepare_dataset(config, budget=CHECK_BUDGET)
    except OutsidePathError as error:
        # The engine's advice is for someone training on their own machine; a visitor cannot switch it off here.
        raise ValueError(str(error).replace(OUTSIDE_HINT, APP_OUTSIDE_HINT)) from None
    except CheckBudgetExceeded as error:
        raise ValueError(
            f"{description}: {error}; this server checks datasets of up to {CHECK_BUDGET.max_images} images in "
            f"{CHECK_BUDGET.max_seconds:g} s. Train larger ones with `python -m finetune` on your own machine"
        ) from None
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


def validation_images(prepared: PreparedData) -> list[PIL.Image.Image]:
    """A few validation images to show a job's predictions on, at most ``PREVIEW_SIDE`` pixels on their longer
    side: every job the server remembers keeps them in memory."""
    images = [image for image, _ in _load_samples(prepared, "validation", PREVIEW_IMAGES)]
    for image in images:
        image.thumbnail((PREVIEW_SIDE, PREVIEW_SIDE))
    return images


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


class CheckpointPreviews:
    """Detectors from jobs' latest checkpoints and their predictions on the jobs' validation images, each computed
    once per (run, step): every poll of every page showing the job reuses them."""

    def __init__(self, *, keep: int = PREVIEW_CACHE) -> None:
        self._keep = keep
        self._lock = threading.Lock()  # two polls must not load or evaluate the same checkpoint twice
        self._detectors: dict[tuple[str, int], ddetr.ObjectDetectionPipeline] = {}
        self._predictions: dict[tuple[str, int], list[tuple[PIL.Image.Image, list[dict[str, Any]]]]] = {}

    def detector(self, key: tuple[str, int], run_dir: Path, checkpoint_dir: Path) -> ddetr.ObjectDetectionPipeline:
        with self._lock:
            return self._detector(key, run_dir, checkpoint_dir)

    def _detector(self, key: tuple[str, int], run_dir: Path, checkpoint_dir: Path) -> ddetr.ObjectDetectionPipeline:
        if key not in self._detectors:
            self._detectors[key] = _checkpoint_detector(run_dir, checkpoint_dir)
            _trim(self._detectors, self._keep)
        return self._detectors[key]

    def predictions(
        self, key: tuple[str, int], run_dir: Path, checkpoint_dir: Path, images: list[PIL.Image.Image]
    ) -> list[tuple[PIL.Image.Image, list[dict[str, Any]]]]:
        with self._lock:
            if key not in self._predictions:
                detector = self._detector(key, run_dir, checkpoint_dir)
                # One image in, one list of detections out.
                self._predictions[key] = [
                    (image, cast(list[dict[str, Any]], detector(image, threshold=PREDICTION_THRESHOLD)))
                    for image in images
                ]
                _trim(self._predictions, self._keep)
            return self._predictions[key]


def _trim(cache: dict[Any, Any], keep: int) -> None:
    while len(cache) > keep:
        cache.pop(next(iter(cache)))


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
