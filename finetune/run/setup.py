"""Everything a run needs before its first step: the run directory, the data and the model."""

from __future__ import annotations

import logging
import random
from pathlib import Path

import numpy as np
import torch

from ddetr import DeformableDetrConfig, DeformableDetrForObjectDetection
from finetune.config import RESUMABLE_OVERRIDES, TrainConfig
from finetune.data.prepare import DataSettings, PreparedData, assemble, validate_dataset
from finetune.data.sources import LoadedDataset, open_dataset
from finetune.data.validation import DatasetValidationError
from finetune.presets import build_model, is_preset
from finetune.run.checkpoints import CheckpointInfo, latest_checkpoint
from finetune.run.distributed import DistributedContext, broadcast_object
from finetune.run.files import CHECKPOINTS, MODEL_CONFIG, MODEL_DIR, TRAIN_CONFIG, write_json

logger = logging.getLogger(__name__)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def check_run_directory(config: TrainConfig) -> CheckpointInfo | None:
    """The checkpoint to resume from (None: start at step 0); refuses to overwrite a run unless resuming."""
    output_dir = Path(config.output_dir)
    checkpoint = latest_checkpoint(output_dir / CHECKPOINTS)
    if not config.resume:
        if checkpoint is not None or (output_dir / MODEL_DIR / "model.safetensors").is_file():
            raise ValueError(
                f"{output_dir} already holds a training run (checkpoint or final model); pass --resume to continue "
                "it, or choose another --output-dir"
            )
        return None
    saved_path = output_dir / TRAIN_CONFIG
    if not saved_path.is_file():
        raise ValueError(f"nothing to resume in {output_dir}: it has no {TRAIN_CONFIG}")
    saved = TrainConfig.load(saved_path).to_dict()
    current = config.to_dict()
    changed = sorted(key for key in saved if key not in RESUMABLE_OVERRIDES and saved[key] != current[key])
    if changed:
        details = ", ".join(f"{key}: {saved[key]!r} -> {current[key]!r}" for key in changed)
        raise ValueError(f"a resumed run must keep its settings; changed: {details}")
    if checkpoint is None:
        logger.warning("no complete checkpoint in %s: starting again from step 0", output_dir / CHECKPOINTS)
    return checkpoint


def data_settings(config: TrainConfig) -> DataSettings:
    """The dataset source and the settings that decide a run's splits."""
    return DataSettings(
        source=config.dataset,
        format=config.dataset_format,
        strict=config.strict,
        seed=config.seed,
        validation_fraction=config.validation_fraction,
        allow_outside_files=config.allow_outside_files,
    )


def check_prepared_data(data: PreparedData, config: TrainConfig) -> None:
    """ValueError unless ``data`` was prepared as ``prepare_run_data`` would prepare it for ``config``."""
    data.check_settings(data_settings(config))


def _open(config: TrainConfig) -> LoadedDataset:
    return open_dataset(config.dataset, format=config.dataset_format, allow_outside_files=config.allow_outside_files)


def prepare_run_data(config: TrainConfig, context: DistributedContext) -> PreparedData:
    """Open and validate the dataset. Under torchrun rank 0 validates (and builds any cache) first; the others
    receive its verdict, so every process trains on exactly the same samples."""
    payload: tuple | None = None
    if context.is_main:
        try:
            loaded = _open(config)
            samples, reports = validate_dataset(loaded, strict=config.strict)
            payload = ("ok", samples, reports)
        except (ValueError, DatasetValidationError) as error:
            payload = ("error", type(error).__name__, str(error))
            if not context.distributed:
                raise
    payload = broadcast_object(payload, context)
    if payload[0] == "error":
        raise (DatasetValidationError if payload[1] == "DatasetValidationError" else ValueError)(payload[2])
    _, samples, reports = payload
    if not context.is_main:
        loaded = _open(config)
    return assemble(loaded, samples, settings=data_settings(config), reports=reports)


def build_run_model(
    config: TrainConfig, class_names: list[str], *, resuming: bool
) -> tuple[DeformableDetrForObjectDetection, int | None]:
    """The model (same initial weights on every process) and, for a new run, its default image size.

    A resumed run rebuilds the architecture from ``model_config.json``; its weights come from the checkpoint.
    """
    output_dir = Path(config.output_dir)
    torch.manual_seed(config.seed)
    model_config_path = output_dir / MODEL_CONFIG
    if resuming and model_config_path.is_file():
        model = DeformableDetrForObjectDetection(DeformableDetrConfig.from_pretrained(model_config_path))
        if list(model.config.id2label.values()) != class_names:
            raise ValueError(
                f"the run was trained on classes {list(model.config.id2label.values())}, the dataset now has "
                f"{class_names}"
            )
        if is_preset(config.model):
            model.model.backbone.requires_grad_(True)
        model.train()
        return model, None
    built = build_model(config.model, class_names, dropout=config.dropout)
    built.model.train()
    return built.model, built.default_image_size


def save_run_settings(config: TrainConfig, model: DeformableDetrForObjectDetection) -> None:
    output_dir = Path(config.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    config.save(output_dir / TRAIN_CONFIG)
    write_json(output_dir / MODEL_CONFIG, model.config.to_dict())
