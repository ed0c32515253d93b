"""``TrainConfig``: every setting of a training run, validated, and stored with the run for resuming."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ddetr.runtime.precision import PRECISIONS
from finetune.data.augment import AUGMENT_MODES
from finetune.data.formats import DATASET_FORMATS, normalise_format

SCHEDULES = ("step", "cosine")
# The paper's backbone learning rate is a tenth of the rest's (2e-5 for 2e-4).
BACKBONE_LR_DIVISOR = 10
# Settings a resumed run may change: they affect speed or reporting, never the numbers it computes.
RESUMABLE_OVERRIDES = frozenset({"device", "num_workers", "threads", "progress", "output_dir", "resume"})


@dataclass
class TrainConfig:
    """A training run. Defaults follow the paper's recipe (AdamW 2e-4, backbone 2e-5, weight decay 1e-4, gradient
    clipping 0.1, LR x0.1 after 80% of training, auxiliary losses); sizes fit a CPU unless a preset says more.

    ``lr_backbone`` None means ``lr / 10`` (the paper's ratio); ``backbone_lr`` is the rate in use either way.

    ``max_steps`` (optimizer steps) overrides ``epochs`` when set. ``save_every`` is in optimizer steps,
    ``eval_every`` in epochs (0: only at the end). ``image_size`` is the short side at evaluation; ``None`` takes the
    model's default (the preset's, or the checkpoint's preprocessor). ``dropout`` overrides the model's
    transformer dropout. ``threads`` sets torch's CPU threads for the whole process (None: torch's default); on a
    CPU shared with other jobs one thread per process is often much faster than several that wait on each other.
    Bit-exact resume on CPU needs the same thread count as the interrupted run. ``dataset_format`` is the format
    of ``dataset`` (``auto``: detected from its layout; or coco, yolo, voc, label-studio, cvat, hf).
    ``allow_outside_files`` lets the dataset name files outside its own folder (a hub dataset's: the datasets
    cache); off, such a dataset is refused before any of those files is read. Turn it on only for your own dataset
    that points at your own files: a dataset from elsewhere could otherwise make the server read any file.
    """

    dataset: str
    model: str = "tiny"
    output_dir: str = "runs/finetune"
    epochs: int = 50
    max_steps: int | None = None
    batch_size: int = 2
    grad_accum_steps: int = 1
    lr: float = 2e-4
    lr_backbone: float | None = None
    lr_linear_proj_mult: float = 0.1
    weight_decay: float = 1e-4
    clip_grad_norm: float = 0.1
    lr_schedule: str = "step"
    lr_drop: float = 0.8
    warmup_steps: int = 0
    image_size: int | None = None
    max_size: int | None = None
    dropout: float | None = None
    augment: str = "paper"
    seed: int = 42
    save_every: int = 500
    eval_every: int = 1
    log_every: int = 10
    keep_checkpoints: int = 2
    precision: str = "auto"
    ema: bool = False
    ema_decay: float = 0.9997
    device: str = "auto"
    num_workers: int = 0
    threads: int | None = None
    strict: bool = False
    validation_fraction: float = 0.15
    eval_batch_size: int | None = None
    max_nonfinite_steps: int = 3
    progress: bool = True
    resume: bool = False
    dataset_format: str = "auto"
    allow_outside_files: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.dataset_format, str):
            with contextlib.suppress(ValueError):  # validate() names the field
                self.dataset_format = normalise_format(self.dataset_format)
        self.validate()

    @property
    def backbone_lr(self) -> float:
        """The backbone's learning rate: ``lr_backbone``, or ``lr / 10`` when that is None."""
        return self.lr / BACKBONE_LR_DIVISOR if self.lr_backbone is None else self.lr_backbone

    def validate(self) -> None:
        """Raise ValueError naming the first bad field."""
        if not isinstance(self.dataset, str) or not self.dataset:
            raise ValueError(
                "dataset must name a source (a dataset folder or zip, a COCO JSON file, a hub id or 'shapes')"
            )
        if not isinstance(self.dataset_format, str) or self.dataset_format not in DATASET_FORMATS:
            raise ValueError(f"dataset_format must be one of {DATASET_FORMATS}, got {self.dataset_format!r}")
        # A security switch: a value such as the string "false" must not turn it on.
        if not isinstance(self.allow_outside_files, bool):
            raise ValueError(f"allow_outside_files must be True or False, got {self.allow_outside_files!r}")
        if not isinstance(self.model, str) or not self.model:
            raise ValueError("model must be a preset name, a checkpoint folder or a hub id")
        positive_ints = (
            "epochs",
            "batch_size",
            "grad_accum_steps",
            "log_every",
            "keep_checkpoints",
            "max_nonfinite_steps",
        )
        for name in positive_ints:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        for name in ("save_every", "eval_every", "warmup_steps", "num_workers"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} must be a non-negative integer, got {value!r}")
        for name in ("max_steps", "image_size", "max_size", "eval_batch_size", "threads"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"{name} must be a positive integer or None, got {value!r}")
        for name in ("lr", "lr_backbone", "lr_linear_proj_mult", "weight_decay", "clip_grad_norm"):
            value = getattr(self, name)
            if name == "lr_backbone" and value is None:
                continue
            if not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
                raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
        if self.lr <= 0:
            raise ValueError(f"lr must be positive, got {self.lr}")
        if not 0 < self.lr_drop <= 1:
            raise ValueError(f"lr_drop is the fraction of training after which the LR drops; got {self.lr_drop}")
        if self.dropout is not None and not 0 <= self.dropout < 1:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if not 0 <= self.ema_decay < 1:
            raise ValueError(f"ema_decay must be in [0, 1), got {self.ema_decay}")
        if not 0 <= self.validation_fraction < 1:
            raise ValueError(f"validation_fraction must be in [0, 1), got {self.validation_fraction}")
        if self.image_size is not None and self.image_size < 16:
            raise ValueError(f"image_size must be at least 16 pixels, got {self.image_size}")
        if self.image_size is not None and self.max_size is not None and self.max_size < self.image_size:
            raise ValueError(f"max_size={self.max_size} must be at least image_size={self.image_size}")
        choices = (("lr_schedule", SCHEDULES), ("precision", PRECISIONS), ("augment", AUGMENT_MODES))
        for name, allowed in choices:
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {getattr(self, name)!r}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> TrainConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown training settings {unknown}")
        return cls(**values)

    def save(self, path: Path) -> None:
        temporary = path.with_name(path.name + ".tmp")
        temporary.write_text(json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n")
        temporary.replace(path)

    @classmethod
    def load(cls, path: Path) -> TrainConfig:
        try:
            return cls.from_dict(json.loads(path.read_text()))
        except (OSError, json.JSONDecodeError) as error:
            raise ValueError(f"cannot read the run's settings {path}: {error}") from None

    def with_overrides(self, **overrides: Any) -> TrainConfig:
        values = self.to_dict()
        values.update(overrides)
        return TrainConfig.from_dict(values)
