"""finetune: a datasets-backed training engine for ddetr's Deformable DETR, with COCO evaluation, exact resume and
torchrun support. The command line is ``python -m finetune`` (evaluation: ``python -m finetune.evaluate``; any
dataset as a COCO zip: ``python -m finetune.export_coco``); apps drive :mod:`finetune.api`. Dataset formats:
:mod:`finetune.data.formats`."""

from finetune.api import TrainingRun, prepare_dataset, read_run, resume_config, resume_run, start_run
from finetune.config import TrainConfig
from finetune.data.shapes import SHAPE_CLASSES, make_shapes_dataset
from finetune.run.launch import run_training
from finetune.run.trainer import RunResult, Trainer

__all__ = [
    "SHAPE_CLASSES",
    "RunResult",
    "TrainConfig",
    "Trainer",
    "TrainingRun",
    "make_shapes_dataset",
    "prepare_dataset",
    "read_run",
    "resume_config",
    "resume_run",
    "run_training",
    "start_run",
]
