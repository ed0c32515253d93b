"""``python -m finetune.export_coco --dataset SRC [--dataset-format F] --output out.zip``: any supported dataset as a
COCO zip (see ``finetune.data.export_coco``). Prints the validation report, then what was written."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from finetune.data.export_coco import export_coco
from finetune.data.formats import DATASET_FORMATS
from finetune.data.validation import format_reports


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m finetune.export_coco",
        description="Write a detection dataset (COCO, Roboflow, YOLO, Pascal VOC, Label Studio, CVAT, Hugging Face) "
        "as one COCO zip: <split>/_annotations.coco.json plus the images. What is written is what validation keeps "
        "(the report is printed first).",
    )
    parser.add_argument("--dataset", required=True, metavar="SRC", help="dataset folder, zip, file or hub id")
    parser.add_argument(
        "--dataset-format",
        default="auto",
        choices=DATASET_FORMATS,
        help="format of --dataset (default: auto, detected from the folder's layout)",
    )
    parser.add_argument("--output", required=True, metavar="ZIP", help="the COCO zip to write")
    parser.add_argument("--overwrite", action="store_true", help="replace --output if it exists")
    parser.add_argument("--strict", action="store_true", help="treat any dataset problem as an error")
    parser.add_argument(
        "--allow-outside-files",
        action="store_true",
        help="read files the dataset names outside its own folder (absolute or ../ image paths, symlinks leading "
        "out); refused by default. Only for your own dataset pointing at your own files",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    arguments = build_parser().parse_args(argv)
    output = Path(arguments.output)
    if output.exists() and not arguments.overwrite:
        print(f"error: {output} exists; pass --overwrite to replace it", file=sys.stderr)
        return 2
    try:
        result = export_coco(
            arguments.dataset,
            output,
            format=arguments.dataset_format,
            strict=arguments.strict,
            allow_outside_files=arguments.allow_outside_files,
        )
    except (ValueError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(format_reports(result.reports))
    print(result.summary())
    return 0


if __name__ == "__main__":
    sys.exit(main())
