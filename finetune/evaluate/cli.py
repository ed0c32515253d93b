"""``python -m finetune.evaluate --model SRC --dataset SRC [--split NAME]``: COCO metrics of a saved model.

Prints the metrics table (AP, AP50, AP75, AP S/M/L, AR@1/10/100, AP per class); the last line of standard output is
one JSON object with ``map``, ``map_50``, ``map_75``, ``map_small``, ``map_medium``, ``map_large`` and ``mar_100``
(-1 where a size bucket has no ground truth, as pycocotools reports). Runs under ``torchrun`` too (images are
sharded across processes).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path

from ddetr import DeformableDetrForObjectDetection
from ddetr.processing import DeformableDetrImageProcessor
from ddetr.runtime.precision import resolve_precision
from finetune.data.collate import make_processor
from finetune.data.formats import DATASET_FORMATS
from finetune.data.prepare import PreparedData, prepare_data
from finetune.data.records import DetectionSplit
from finetune.evaluate.coco import CocoMetrics
from finetune.evaluate.sharded import evaluate_model
from finetune.run.distributed import DistributedContext, cleanup_distributed, setup_distributed

logger = logging.getLogger(__name__)


def choose_split(data: PreparedData, requested: str | None) -> DetectionSplit:
    """``requested``, else test, validation or train, whichever exists first."""
    if requested is not None:
        return data.split(requested)
    for name in ("test", "validation", "train"):
        if name in data.splits:
            return data.splits[name]
    return next(iter(data.splits.values()))


def label_mapping(model_labels: dict[int, str], dataset_names: list[str]) -> dict[int, int]:
    """Model label index -> dataset label index, matched by name; by position when the names differ but the
    counts agree (a checkpoint trained with generic LABEL_i names)."""
    by_name = {name: index for index, name in model_labels.items()}
    if all(name in by_name for name in dataset_names):
        return {by_name[name]: index for index, name in enumerate(dataset_names)}
    if len(model_labels) == len(dataset_names):
        warnings.warn(
            f"model classes {list(model_labels.values())} do not name the dataset's {dataset_names}; "
            "matching them by position",
            UserWarning,
            stacklevel=2,
        )
        return {index: index for index in range(len(dataset_names))}
    raise ValueError(
        f"the model's {len(model_labels)} classes {list(model_labels.values())[:10]} cannot be matched to the "
        f"dataset's {len(dataset_names)} classes {dataset_names[:10]}"
    )


def load_processor(model_source: str, image_size: int | None) -> DeformableDetrImageProcessor:
    """The model's own preprocessing when it has a preprocessor_config.json, unless ``image_size`` overrides it."""
    if image_size is not None:
        return make_processor(image_size, round(image_size * 1333 / 800))
    try:
        return DeformableDetrImageProcessor.from_pretrained(
            model_source, local_files_only=not Path(model_source).exists()
        )
    except OSError:
        logger.warning("%s has no preprocessor_config.json: evaluating at the default 800 px", model_source)
        return DeformableDetrImageProcessor()


def evaluate(
    *,
    model_source: str,
    dataset_source: str,
    split: str | None = None,
    batch_size: int = 2,
    image_size: int | None = None,
    device: str = "auto",
    precision: str = "fp32",
    strict: bool = False,
    num_workers: int = 0,
    validation_fraction: float = 0.0,
    seed: int = 42,
    context: DistributedContext | None = None,
    dataset_format: str = "auto",
    allow_outside_files: bool = False,
) -> CocoMetrics:
    """COCO metrics of the model at ``model_source`` on a split of ``dataset_source``.

    ``validation_fraction`` and ``seed`` re-create the validation split a training run held out of a dataset that
    has none (use the run's values, e.g. from its train_config.json). ``dataset_format``: the dataset's format
    (``auto``: detected from its layout). ``allow_outside_files``: read files the dataset names outside its folder
    (refused otherwise).
    """
    own_context = context is None
    context = context or setup_distributed(device)
    try:
        data = prepare_data(
            dataset_source,
            strict=strict,
            validation_fraction=validation_fraction,
            seed=seed,
            format=dataset_format,
            allow_outside_files=allow_outside_files,
        )
        chosen = choose_split(data, split)
        model = DeformableDetrForObjectDetection.from_pretrained(model_source).to(context.device).eval()
        return evaluate_model(
            model=model,
            split=chosen,
            class_names=data.class_names,
            processor=load_processor(model_source, image_size),
            context=context,
            precision=resolve_precision(precision, context.device),
            batch_size=batch_size,
            num_workers=num_workers,
            label_map=label_mapping(model.config.id2label, data.class_names),
        )
    finally:
        if own_context:
            cleanup_distributed(context)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m finetune.evaluate",
        description="COCO box metrics of a saved Deformable DETR on a dataset split. The last output line is JSON.",
    )
    parser.add_argument(
        "--model", required=True, metavar="SRC", help="model folder (config.json, model.safetensors) or hub id"
    )
    parser.add_argument(
        "--dataset",
        required=True,
        metavar="SRC",
        help="dataset: a folder or .zip in COCO (also Roboflow), YOLO, Pascal VOC, Label Studio or CVAT format, a "
        "save_to_disk folder (with or without splits), COCO JSON file, image folder with metadata.jsonl, hub id, or "
        "shapes[:...]",
    )
    parser.add_argument(
        "--dataset-format",
        default="auto",
        choices=DATASET_FORMATS,
        help="format of --dataset (default: auto, detected from the folder's layout)",
    )
    parser.add_argument(
        "--allow-outside-files",
        action="store_true",
        help="read files the dataset names outside its own folder (absolute or ../ image paths, symlinks leading "
        "out); refused by default. Only for your own dataset pointing at your own files",
    )
    parser.add_argument("--split", default=None, help="split to evaluate (default: test, else validation, else train)")
    parser.add_argument("--batch-size", type=int, default=2, help="images per batch (default: 2)")
    parser.add_argument(
        "--image-size",
        type=int,
        default=None,
        help="short side in pixels (default: the model's preprocessor_config.json, else 800)",
    )
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default: auto)")
    parser.add_argument(
        "--precision",
        default="fp32",
        choices=("auto", "fp32", "bf16", "fp16"),
        help="inference precision (default: fp32)",
    )
    parser.add_argument("--num-workers", type=int, default=0, help="data loading worker processes (default: 0)")
    parser.add_argument("--strict", action="store_true", help="treat any dataset problem as an error")
    parser.add_argument("--validation-fraction", type=float, default=0.0,
                        help="hold out this share of train as 'validation', as a training run without a validation "
                             "split did (default: 0)")  # fmt: skip
    parser.add_argument("--seed", type=int, default=42, help="seed of that hold-out (default: 42, training's default)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    arguments = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    context = setup_distributed(arguments.device)
    try:
        metrics = evaluate(
            model_source=arguments.model,
            dataset_source=arguments.dataset,
            split=arguments.split,
            batch_size=arguments.batch_size,
            image_size=arguments.image_size,
            precision=arguments.precision,
            strict=arguments.strict,
            num_workers=arguments.num_workers,
            validation_fraction=arguments.validation_fraction,
            seed=arguments.seed,
            context=context,
            dataset_format=arguments.dataset_format,
            allow_outside_files=arguments.allow_outside_files,
        )
    except (ValueError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    finally:
        cleanup_distributed(context)
    if context.is_main:
        print(metrics.format())
        print(json.dumps(metrics.headline(), sort_keys=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
