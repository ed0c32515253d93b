"""ONNX export: one file that onnxruntime runs at any batch and image size, equal to the PyTorch model.

The model is traced by torch's TorchScript exporter (``dynamo=False``) with batch, height and width dynamic. Under
tracing the model code keeps feature-map sizes as graph values (``ddetr.model.geometry.spatial_size``), takes the
general padded path, and runs deformable attention through the ``grid_sample`` reference (ONNX ``GridSample``) and
linear layers through ``F.linear``; so no size of the traced image is baked into the graph. (torch's default dynamo
exporter specialises the sizes silently and, with its default optimisation, writes an invalid file for this model.)

Next to ``model.onnx`` go ``config.json`` (the architecture and the label map) and ``preprocessor_config.json``, so a
consumer can pre- and post-process without ddetr; both are also in the file's metadata (``id2label``,
``preprocessor_config``).
"""

from __future__ import annotations

import json
import os
import threading
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ddetr.model.object_detection import DeformableDetrForObjectDetection
from ddetr.pipeline import load_processor
from ddetr.processing import DeformableDetrImageProcessorFast

# GridSample entered ONNX at opset 16; the TorchScript exporter writes up to opset 20.
SUPPORTED_OPSETS = range(16, 21)
DEFAULT_OPSET = 17
INPUT_NAMES = ("pixel_values", "pixel_mask")
OUTPUT_NAMES = ("logits", "pred_boxes")
# The traced example's size: any size works afterwards; a small one keeps the trace fast.
_TRACE_SIZE = (256, 320)
# torch's ONNX exporter keeps its state in process-wide globals: two exports at once (two requests of a web app)
# break each other ("GLOBALS.in_onnx_export must be False").
_EXPORTER_LOCK = threading.Lock()


class ExportError(ValueError):
    """The model or the settings cannot be exported; the message says why."""


@dataclass(frozen=True)
class OnnxExport:
    """What ``export_onnx`` wrote: the model file, its two companions, and what the export took."""

    path: Path
    config_path: Path
    preprocessor_path: Path
    opset: int
    static_size: tuple[int, int] | None
    seconds: float

    @property
    def bytes(self) -> int:
        return self.path.stat().st_size


class _DetectionGraph(nn.Module):
    """The model with plain tensor outputs, ``(logits, pred_boxes)``, as an exported graph returns them."""

    def __init__(self, model: DeformableDetrForObjectDetection) -> None:
        super().__init__()
        self.model = model

    def forward(self, pixel_values: torch.Tensor, pixel_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        outputs = self.model(pixel_values, pixel_mask)
        return outputs.logits, outputs.pred_boxes


def _check_settings(opset: int, static_size: tuple[int, int] | None) -> None:
    if isinstance(opset, bool) or not isinstance(opset, int) or opset not in SUPPORTED_OPSETS:
        raise ExportError(
            f"opset {opset!r} is not supported: use {SUPPORTED_OPSETS.start}..{SUPPORTED_OPSETS.stop - 1} "
            "(GridSample needs 16; torch's TorchScript exporter writes at most 20)"
        )
    bad_sides = static_size is not None and (
        len(static_size) != 2 or any(isinstance(side, bool) or int(side) != side or side < 1 for side in static_size)
    )
    if bad_sides:
        raise ExportError(f"a static size must be two positive integers (height, width), got {static_size!r}")


def _load(
    model: str | os.PathLike | DeformableDetrForObjectDetection,
) -> tuple[DeformableDetrForObjectDetection, DeformableDetrImageProcessorFast]:
    if isinstance(model, DeformableDetrForObjectDetection):
        return model, DeformableDetrImageProcessorFast()
    try:
        loaded = DeformableDetrForObjectDetection.from_pretrained(model)
    except (OSError, ValueError) as error:
        raise ExportError(f"cannot load a model from {os.fspath(model)!r}: {error}") from error
    return loaded, load_processor(model)


def _metadata(model: DeformableDetrForObjectDetection, processor: DeformableDetrImageProcessorFast) -> dict[str, str]:
    id2label = {str(index): name for index, name in sorted(model.config.id2label.items())}
    return {
        "id2label": json.dumps(id2label, sort_keys=True),
        "preprocessor_config": json.dumps(processor.to_dict(), sort_keys=True),
        "producer": "ddetr",
    }


def export_onnx(
    model: str | os.PathLike | DeformableDetrForObjectDetection,
    output: str | os.PathLike,
    *,
    opset: int = DEFAULT_OPSET,
    static_size: tuple[int, int] | None = None,
    processor: DeformableDetrImageProcessorFast | None = None,
) -> OnnxExport:
    """Export ``model`` (a loaded model, or anything ``from_pretrained`` takes) to the ONNX file ``output``.

    Inputs ``pixel_values`` (batch, 3, height, width) float32 and ``pixel_mask`` (batch, height, width) int64
    (1 = image, 0 = padding); outputs ``logits`` (batch, queries, classes) and ``pred_boxes`` (batch, queries, 4,
    normalised cx, cy, w, h), as the PyTorch model returns them. Batch, height and width are dynamic unless
    ``static_size=(height, width)`` fixes them (batch 1) for runtimes that need static shapes. The files are
    written atomically; the same model and settings give the same bytes. Raises ``ExportError`` (a ValueError)
    naming the problem.
    """
    _check_settings(opset, static_size)
    import onnx  # an optional dependency: pip install "ddetr[export]"

    started = time.perf_counter()
    loaded, default_processor = _load(model)
    processor = processor or default_processor
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    height, width = static_size or _TRACE_SIZE
    device = next(loaded.parameters()).device
    example = (
        torch.zeros(1, 3, height, width, device=device),
        torch.ones(1, height, width, dtype=torch.long, device=device),
    )
    dynamic_axes = None
    if static_size is None:
        dynamic_axes = {
            "pixel_values": {0: "batch", 2: "height", 3: "width"},
            "pixel_mask": {0: "batch", 1: "height", 2: "width"},
            "logits": {0: "batch"},
            "pred_boxes": {0: "batch"},
        }
    graph = _DetectionGraph(loaded).eval()
    was_training = loaded.training
    traced = output.with_name(f".{output.name}.trace-{os.getpid()}")
    try:
        with _EXPORTER_LOCK, warnings.catch_warnings(), torch.no_grad():
            # The TorchScript exporter is deprecated in favour of dynamo, which cannot keep these sizes dynamic;
            # its tracer warnings name Python-side checks that the graph does not need.
            warnings.simplefilter("ignore", category=DeprecationWarning)
            warnings.simplefilter("ignore", category=torch.jit.TracerWarning)
            torch.onnx.export(
                graph,
                example,
                traced,
                dynamo=False,
                opset_version=opset,
                input_names=list(INPUT_NAMES),
                output_names=list(OUTPUT_NAMES),
                dynamic_axes=dynamic_axes,
                do_constant_folding=True,
            )
        proto = onnx.load(traced)
    except Exception as error:  # the exporter raises many types; all mean "this model cannot be exported"
        raise ExportError(f"the model could not be exported to ONNX: {type(error).__name__}: {error}") from error
    finally:
        # The exporter restores the wrapper's mode, not the model's.
        loaded.train(was_training)
        traced.unlink(missing_ok=True)
    for key, value in _metadata(loaded, processor).items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.checker.check_model(proto)
    config_path = output.with_name("config.json")
    preprocessor_path = output.with_name("preprocessor_config.json")
    _write_atomically(output, proto.SerializeToString())
    _write_atomically(config_path, loaded.config.to_json_string().encode())
    _write_atomically(preprocessor_path, processor.to_json_string().encode())
    return OnnxExport(
        path=output,
        config_path=config_path,
        preprocessor_path=preprocessor_path,
        opset=opset,
        static_size=static_size,
        seconds=time.perf_counter() - started,
    )


def _write_atomically(path: Path, data: bytes) -> None:
    temporary = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(temporary, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)
