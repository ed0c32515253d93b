"""The command line of the ONNX export."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from ddetr.export.onnx_export import DEFAULT_OPSET, SUPPORTED_OPSETS, ExportError, export_onnx

_EPILOG = """\
The file takes pixel_values (batch, 3, height, width) and pixel_mask (batch, height, width) and returns logits
(batch, queries, classes) and pred_boxes (batch, queries, 4); batch, height and width are dynamic unless --static.
config.json (label map) and preprocessor_config.json are written next to it.

examples:
  python -m ddetr.export --model ddetr/bundled/ddetr-shapes --output exported/model.onnx
  python -m ddetr.export --model SenseTime/deformable-detr --output detr.onnx --static 800x1066
"""


def parse_size(text: str) -> tuple[int, int]:
    """``HEIGHTxWIDTH`` (e.g. 640x640) as two positive ints; argparse shows the error."""
    parts = text.lower().split("x")
    try:
        height, width = (int(part) for part in parts)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected HEIGHTxWIDTH such as 640x640, got {text!r}") from None
    if height < 1 or width < 1:
        raise argparse.ArgumentTypeError(f"sizes must be positive, got {text!r}")
    return height, width


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m ddetr.export",
        description="Export a Deformable DETR to ONNX (onnxruntime runs it at any batch and image size).",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--model", required=True, help="a model folder, hub id or paper .pth checkpoint")
    parser.add_argument("--output", required=True, help="the .onnx file to write")
    parser.add_argument(
        "--opset",
        type=int,
        default=DEFAULT_OPSET,
        help=f"ONNX opset, {SUPPORTED_OPSETS.start}..{SUPPORTED_OPSETS.stop - 1} (default {DEFAULT_OPSET})",
    )
    parser.add_argument("--static", type=parse_size, metavar="HEIGHTxWIDTH", help="fix batch 1 and this input size")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        result = export_onnx(args.model, args.output, opset=args.opset, static_size=args.static)
    except ExportError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    shape = "static " + "x".join(map(str, result.static_size)) if result.static_size else "dynamic batch and size"
    print(
        f"wrote {result.path} ({result.bytes / 1e6:.1f} MB, opset {result.opset}, {shape}) in {result.seconds:.1f} s; "
        f"{result.config_path.name} and {result.preprocessor_path.name} beside it"
    )
    return 0
