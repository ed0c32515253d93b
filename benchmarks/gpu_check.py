"""One command for a CUDA machine: the Triton kernels and the model against their references, in one table.

    python -m benchmarks.gpu_check                        # CUDA: ResNet-50 at 800x1066 (meant for < 8 min)
    python -m benchmarks.gpu_check --quick                # tiny model, small shapes: a smoke run on the GPU
    python -m benchmarks.gpu_check --cpu-smoke --quick    # the same code on CPU, the CUDA-only rows skipped (CI)

The table's rows, in order (the same names on every device; a row that cannot run there says why):

- environment: GPU name, torch and triton versions, ``torch.backends.cuda.matmul.allow_tf32`` and
  ``torch.backends.cudnn.allow_tf32`` as the process found them, and the op shapes below.
- ``op {fp32,bf16} {encoder,decoder}: {output,grad_*}``: ``ms_deform_attn_triton`` forward and the gradients of
  value, sampling locations and attention weights against the ``grid_sample`` reference run in float32 on the same
  (rounded) inputs. Shapes are the model's: batch 2, the 4 levels the model builds for ``--size`` (100x134, 50x67,
  25x34, 13x17 at 800x1066), 8 heads x 32 channels, 4 points; every token a query for the encoder, 300 queries for
  the decoder; points a few pixels around each reference point, as a trained model puts them
  (``benchmarks.msda.make_inputs``); value in the dtype, locations and weights in float32, as the model passes them
  under autocast. ``abs`` = max |triton - reference|, ``rel`` = abs / max |reference|; a row passes when every
  element is within ``atol + rtol * |reference|`` (``TOLERANCES``). The location gradient leaves out coordinates
  within ``EDGE_PX`` of a pixel centre's row or column, where the bilinear derivative jumps and one ulp of
  difference in the coordinate picks the other side (the count is shown).
- ``op speed ...``: forward and forward + backward of the same inputs; ratio = triton / grid_sample.
- ``e2e ...``: a ResNet-50 Deformable DETR with the same random weights in ddetr and transformers
  (``benchmarks.model_pairs``), forward at batch 1: time per image in fp32 and under bf16 autocast (both sides),
  max |Δ logits| and |Δ boxes| in fp32 (TF32 off for these rows; limit 1e-4) and of our bf16 against their fp32, and
  the share of their fp32 top-100 detections that bf16 keeps (label and IoU >= 0.95, ``benchmarks.measure``; ours
  must keep 95% except with ``--quick``, whose tiny random model is not meaningful).
- ``train ...``: one training step (forward with labels, backward, AdamW; ``benchmarks.workloads``) at batch 2 and
  ``--size`` under bf16 autocast: time and whether the loss is finite.
- ``peak CUDA memory ...``: what one forward (batch 1, fp32 and bf16) and one training step add to the allocated
  memory, after a warm-up call.

Times are medians of runs interleaved with the compared implementation (``benchmarks.measure``) after warm-up calls
(Triton compiles and autotunes on its first call per shape class); ratio = ours / theirs and triton / grid_sample.
The table goes to stdout, progress and tracebacks to stderr.

Exit status: 0 when every checked row passes, 1 when a row fails or errors (the rest of the table still runs),
2 without a CUDA device (unless ``--cpu-smoke``).
"""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata
import json
import math
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from benchmarks.__main__ import CORRECTNESS_TOLERANCE
from benchmarks.measure import interleaved_times, matched_fraction, synchronize
from benchmarks.model_pairs import build_pair
from benchmarks.msda import HEAD_DIM, HEADS, Case, make_inputs
from benchmarks.workloads import forward_workload, random_batch, training_workload
from ddetr.export.cli import parse_size
from ddetr.model.geometry import spatial_size
from ddetr.ops.ms_deform_attn import SpatialShapes, ms_deform_attn_reference
from ddetr.processing import post_process_object_detection
from ddetr.runtime.precision import BF16

NO_CUDA = "no CUDA device: this check runs on a GPU machine"
SKIPPED_NO_CUDA = "skipped (no CUDA)"
OK, FAIL, INFO = "ok", "FAIL", "info"

OP_BATCH = 2
DECODER_QUERIES = 300
TRAIN_BATCH = 2
OP_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
OP_CASES = ("encoder", "decoder")
QUANTITIES = ("output", "grad_value", "grad_locations", "grad_weights")
# (atol, rtol): element passes when |triton - reference| <= atol + rtol * |reference|. Bugs (a wrong corner, level or
# stride) give errors of the size of the values; these bounds sit well above float32 accumulation-order noise at
# these shapes. bf16: the output and the value gradient are rounded once to bf16 (relative 2**-8 to nearest), the
# location and weight gradients are computed in float32 from exactly representable bf16 inputs. The location
# gradient scales with the level's width (up to 134 x the value differences), hence its larger atol.
_FP32_LEVEL = {"grad_locations": (1e-2, 1e-4), "grad_weights": (1e-4, 1e-4)}
TOLERANCES = {
    "fp32": {"output": (1e-4, 1e-4), "grad_value": (1e-4, 1e-4), **_FP32_LEVEL},
    "bf16": {"output": (1e-4, 2**-7), "grad_value": (1e-4, 2**-7), **_FP32_LEVEL},
}
EDGE_PX = 1e-4
TOP100_LIMIT = 0.95


def environment_names() -> list[str]:
    return [
        "GPU",
        "torch",
        "triton",
        "torch.backends.cuda.matmul.allow_tf32",
        "torch.backends.cudnn.allow_tf32",
        "op shapes",
    ]


def op_check_names(dtype: str, case: str) -> list[str]:
    return [f"op {dtype} {case}: {quantity}" for quantity in QUANTITIES]


def op_speed_names(dtype: str, case: str) -> list[str]:
    return [f"op speed {dtype} {case}: forward", f"op speed {dtype} {case}: forward+backward"]


E2E_NAMES = [
    "e2e forward fp32, batch 1: time per image",
    "e2e forward bf16 autocast, batch 1: time per image",
    "e2e fp32: max |Δ logits| ours vs theirs",
    "e2e fp32: max |Δ boxes| ours vs theirs",
    "e2e bf16: max |Δ logits| ours bf16 vs theirs fp32",
    "e2e bf16: max |Δ boxes| ours bf16 vs theirs fp32",
    "e2e bf16: top-100 kept, ours bf16 vs theirs fp32",
    "e2e bf16: top-100 kept, theirs bf16 vs theirs fp32",
]
FORWARD_MEMORY_NAMES = ["peak CUDA memory, forward fp32 batch 1", "peak CUDA memory, forward bf16 batch 1"]
TRAIN_NAMES = [
    f"train step bf16 autocast, batch {TRAIN_BATCH}: time",
    "train step bf16 autocast: loss finite",
    f"peak CUDA memory, train step bf16 batch {TRAIN_BATCH}",
]


def planned_names() -> list[str]:
    """Every row of the table, in order."""
    names = environment_names()
    for dtype in OP_DTYPES:
        for case in OP_CASES:
            names += op_check_names(dtype, case)
    for dtype in OP_DTYPES:
        for case in OP_CASES:
            names += op_speed_names(dtype, case)
    return [*names, *E2E_NAMES, *FORWARD_MEMORY_NAMES, *TRAIN_NAMES, "wall time"]


# ---------------------------------------------------------------------------------------------------------------------
# The table


@dataclass
class Row:
    name: str
    result: str = ""
    ratio: float | None = None
    limit: str = ""
    status: str = INFO
    numbers: dict[str, Any] = field(default_factory=dict)


class Table:
    """Rows by name, printed in the planned order; a planned row never filled in reads as an error."""

    def __init__(self, names: list[str]) -> None:
        self.names = names
        self.rows: dict[str, Row] = {}

    def add(
        self,
        name: str,
        result: str = "",
        *,
        ratio: float | None = None,
        limit: str = "",
        status: str = INFO,
        **numbers: Any,
    ) -> None:
        if name not in self.names:
            raise KeyError(f"row {name!r} is not in the table's plan")
        self.rows[name] = Row(name, result, ratio, limit, status, numbers)

    def check(self, name: str, result: str, ok: bool, limit: str, **numbers: Any) -> None:
        self.add(name, result, limit=limit, status=OK if ok else FAIL, **numbers)

    def skip(self, names: list[str], why: str) -> None:
        for name in names:
            self.add(name, status=why)

    def compare(
        self,
        name: str,
        ours: float,
        theirs: float | None,
        unit: str,
        labels: tuple[str, str] = ("ours", "theirs"),
        note: str = "",
    ) -> None:
        """A measurement of ours and (when there is one) of theirs; ratio = ours / theirs."""
        result = f"{labels[0]} {_number(ours)} {unit}"
        numbers: dict[str, Any] = {f"{labels[0]}_{unit}": ours}
        ratio = None
        if theirs is not None:
            result += f" | {labels[1]} {_number(theirs)} {unit}"
            numbers[f"{labels[1]}_{unit}"] = theirs
            ratio = ours / theirs if theirs > 0 else None
        if note:
            result += f" ({note})"
        self.add(name, result, ratio=ratio, **numbers)

    def section(self, names: list[str], body: Callable[[], None]) -> None:
        """Run ``body``; when it raises, its rows not yet filled in say so and the rest of the table goes on."""
        try:
            body()
        except Exception as error:  # one broken part must not cost the rest of a GPU run
            traceback.print_exc(file=sys.stderr)
            first_line = (str(error).strip().splitlines() or [""])[0][:120]
            for name in names:
                if name not in self.rows:
                    self.add(name, status=f"error: {type(error).__name__}: {first_line}")
            if torch.cuda.is_available():
                torch.cuda.empty_cache()

    def ordered(self) -> list[Row]:
        return [self.rows.get(name) or Row(name, status="error: not measured") for name in self.names]

    def failures(self) -> list[Row]:
        return [row for row in self.ordered() if row.status == FAIL or row.status.startswith("error")]

    def render(self) -> str:
        header = Row("row", "result", None, "limit", "status")
        rows = [header, *self.ordered()]
        ratios = ["ratio", *(_ratio(row.ratio) for row in rows[1:])]
        widths = [
            max(len(value) for value in column)
            for column in (
                [row.name for row in rows],
                [row.result for row in rows],
                ratios,
                [row.limit for row in rows],
            )
        ]
        lines = []
        for row, ratio in zip(rows, ratios):
            cells = (
                row.name.ljust(widths[0]),
                row.result.ljust(widths[1]),
                ratio.rjust(widths[2]),
                row.limit.ljust(widths[3]),
                row.status,
            )
            lines.append("  ".join(cells).rstrip())
        lines.insert(1, "-" * len(lines[0]))
        return "\n".join(lines)

    def as_json(self) -> list[dict[str, Any]]:
        return [
            {
                "name": row.name,
                "result": row.result,
                "ratio": row.ratio,
                "limit": row.limit,
                "status": row.status,
                **row.numbers,
            }
            for row in self.ordered()
        ]


def _number(value: float) -> str:
    return f"{value:.4g}" if abs(value) < 1e4 else f"{value:.0f}"


def _ratio(ratio: float | None) -> str:
    return "" if ratio is None else f"{ratio:.3f}"


# ---------------------------------------------------------------------------------------------------------------------
# The deformable-attention op


@dataclass(frozen=True)
class OpInputs:
    value: torch.Tensor  # (batch, sequence, heads, head_dim) in the checked dtype
    shapes: list[tuple[int, int]]
    locations: torch.Tensor  # (batch, queries, heads, levels, points, 2) float32
    weights: torch.Tensor  # (batch, queries, heads, levels, points) float32
    grad_output: torch.Tensor  # (batch, queries, heads * head_dim) in the checked dtype


@dataclass(frozen=True)
class Comparison:
    max_abs: float
    max_rel: float  # max_abs / max |reference|
    worst: float  # max of |error| / (atol + rtol * |reference|): > 1 fails
    left_out: int  # elements not compared (location gradients on pixel edges)

    @property
    def ok(self) -> bool:
        return self.worst <= 1.0  # False for NaN too


def model_level_shapes(model: Any, height: int, width: int, device: torch.device) -> list[tuple[int, int]]:
    """The (H_l, W_l) of the feature levels the model builds for a height x width image (what it passes the op)."""
    pixel_values, pixel_mask = random_batch(1, height, width, device)
    with torch.no_grad():
        sources, _ = model.model._multi_scale_sources(pixel_values, pixel_mask)
    return [spatial_size(source) for source in sources]


def op_inputs(case: str, shapes: SpatialShapes, dtype: torch.dtype, device: torch.device, seed: int = 0) -> OpInputs:
    """Batch 2, 8 heads x 32 channels, 4 points; every token a query (encoder) or 300 queries (decoder)."""
    generator = torch.Generator().manual_seed(seed)
    queries = None if case == "encoder" else DECODER_QUERIES
    value, level_shapes, locations, weights = make_inputs(
        Case(case, OP_BATCH, tuple(shapes), queries), dtype, "local", generator
    )
    grad_output = torch.randn(OP_BATCH, locations.shape[1], HEADS * HEAD_DIM, generator=generator).to(dtype)
    return OpInputs(value.to(device), level_shapes, locations.to(device), weights.to(device), grad_output.to(device))


def on_pixel_edges(locations: torch.Tensor, shapes: SpatialShapes, distance: float = EDGE_PX) -> torch.Tensor:
    """True for each (x or y) coordinate within ``distance`` pixels of a row or column of pixel centres."""
    # (levels, 1, 2) as (width, height), against the trailing (levels, points, 2)
    sizes = torch.tensor([[width, height] for height, width in shapes], dtype=torch.float64, device=locations.device)
    pixels = locations.double() * sizes[:, None, :] - 0.5
    return (pixels - pixels.round()).abs() < distance


def compare_with_reference(
    candidate: Callable[..., torch.Tensor], inputs: OpInputs, tolerances: dict[str, tuple[float, float]]
) -> dict[str, Comparison]:
    """Output and the three input gradients of ``candidate`` against the reference in float32 on the same values."""
    results = {}
    for name, function, dtype in (
        ("candidate", candidate, inputs.value.dtype),
        ("reference", ms_deform_attn_reference, torch.float32),
    ):
        leaves = [
            tensor.detach().to(dtype if index == 0 else tensor.dtype).clone().requires_grad_(True)
            for index, tensor in enumerate((inputs.value, inputs.locations, inputs.weights))
        ]
        output = function(leaves[0], inputs.shapes, leaves[1], leaves[2])
        gradients = torch.autograd.grad(output, leaves, inputs.grad_output.to(output.dtype))
        results[name] = [output.detach().float(), *(gradient.float() for gradient in gradients)]
    edges = on_pixel_edges(inputs.locations, inputs.shapes)
    comparisons = {}
    for quantity, actual, expected in zip(QUANTITIES, results["candidate"], results["reference"]):
        error = (actual - expected).abs()
        absolute, relative = tolerances[quantity]
        ratio = error / (absolute + relative * expected.abs())
        left_out = 0
        if quantity == "grad_locations":
            left_out = int(edges.sum())
            error, ratio, expected = error[~edges], ratio[~edges], expected[~edges]
        max_abs = _max(error)
        scale = _max(expected.abs())
        comparisons[quantity] = Comparison(max_abs, max_abs / scale if scale > 0 else max_abs, _max(ratio), left_out)
    return comparisons


def _max(tensor: torch.Tensor) -> float:
    return float(tensor.max()) if tensor.numel() else 0.0


def op_check(table: Table, dtype: str, case: str, candidate: Callable[..., torch.Tensor], inputs: OpInputs) -> None:
    tolerances = TOLERANCES[dtype]
    for quantity, comparison in compare_with_reference(candidate, inputs, tolerances).items():
        absolute, relative = tolerances[quantity]
        result = f"abs {comparison.max_abs:.2e}  rel {comparison.max_rel:.2e}"
        if quantity == "grad_locations":
            result += f"  ({comparison.left_out} on pixel edges left out)"
        table.check(
            f"op {dtype} {case}: {quantity}",
            result,
            comparison.ok,
            f"atol {absolute:.0e} rtol {relative:.1e}",
            max_abs=comparison.max_abs,
            max_rel=comparison.max_rel,
            worst_tolerance_ratio=comparison.worst,
            left_out=comparison.left_out,
        )


def op_speed(
    table: Table,
    dtype: str,
    case: str,
    candidate: Callable[..., torch.Tensor],
    inputs: OpInputs,
    repeats: int,
    warmup: int,
    device: torch.device,
) -> None:
    """Median forward and forward + backward times of the candidate and of grid_sample on the same inputs."""

    def forward(function: Callable[..., torch.Tensor]) -> Callable[[], None]:
        def run() -> None:
            with torch.no_grad():
                function(inputs.value, inputs.shapes, inputs.locations, inputs.weights)

        return run

    def forward_backward(function: Callable[..., torch.Tensor]) -> Callable[[], None]:
        leaves = [
            tensor.detach().clone().requires_grad_(True) for tensor in (inputs.value, inputs.locations, inputs.weights)
        ]

        def run() -> None:
            output = function(leaves[0], inputs.shapes, leaves[1], leaves[2])
            torch.autograd.grad(output, leaves, inputs.grad_output)

        return run

    for name, make in zip(op_speed_names(dtype, case), (forward, forward_backward)):
        times = interleaved_times(
            {"triton": make(candidate), "grid_sample": make(ms_deform_attn_reference)}, repeats, device, warmup=warmup
        )
        table.compare(name, times["triton"] * 1e3, times["grid_sample"] * 1e3, "ms", ("triton", "grid_sample"))


def triton_candidate(device: torch.device) -> tuple[Callable[..., torch.Tensor] | None, str]:
    """The Triton op, or None and why its rows are skipped on this device."""
    if device.type != "cuda":
        return None, SKIPPED_NO_CUDA
    from ddetr.ops.ms_deform_attn_triton import ms_deform_attn_triton, triton_available

    if not triton_available():
        return None, "skipped (triton not installed)"
    # ms_deform_attn_triton falls back to the reference when its kernels cannot load: fail loudly here instead.
    importlib.import_module("ddetr.ops._ms_deform_attn_triton_kernels")
    return ms_deform_attn_triton, ""


# ---------------------------------------------------------------------------------------------------------------------
# The model


@contextmanager
def tf32_off() -> Iterator[None]:
    """Plain float32 matmuls and convolutions (cuDNN allows TF32 convolutions by default)."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def under_bf16(run: Callable[[], Any], device: torch.device) -> Callable[[], Any]:
    def wrapped() -> Any:
        with BF16.autocast(device):
            return run()

    return wrapped


def top100(outputs: Any) -> dict[str, torch.Tensor]:
    """The top-100 (query, class) detections of image 0, on the CPU, as ``python -m benchmarks`` compares them."""
    logits_and_boxes = {"logits": outputs.logits.float(), "pred_boxes": outputs.pred_boxes.float()}
    detections = post_process_object_detection(logits_and_boxes, threshold=0.0, top_k=100)[0]
    return {key: value.cpu() for key, value in detections.items()}


def peak_cuda_mib(run: Callable[[], Any], device: torch.device) -> tuple[float, Any]:
    """CUDA memory one (warm) call of ``run`` allocates on top of what was allocated before it, and its result."""
    synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    result = run()
    synchronize(device)
    return (torch.cuda.max_memory_allocated(device) - before) / 2**20, result


def failure_of(run: Callable[[], Any]) -> str | None:
    """None when ``run()`` completes, else why not in one line (the traceback goes to stderr). For the reference
    implementation: where transformers cannot run a mode, its rows say so and ours still run."""
    try:
        run()
    except Exception as error:
        traceback.print_exc(file=sys.stderr)
        return f"{type(error).__name__}: {(str(error).strip().splitlines() or [''])[0][:100]}"
    return None


def end_to_end(
    table: Table,
    ours: Any,
    theirs: Any | None,
    theirs_missing: str,
    device: torch.device,
    size: tuple[int, int],
    repeats: int,
    quick: bool,
) -> None:
    height, width = size
    run_ours = forward_workload(ours, 1, height, width, device)
    run_theirs = forward_workload(theirs, 1, height, width, device) if theirs is not None else None
    theirs_bf16 = under_bf16(run_theirs, device) if run_theirs is not None else None
    theirs_bf16_failure = failure_of(theirs_bf16) if theirs_bf16 is not None else None
    for name, ours_run, theirs_run, failure in (
        (E2E_NAMES[0], run_ours, run_theirs, None),
        (E2E_NAMES[1], under_bf16(run_ours, device), theirs_bf16, theirs_bf16_failure),
    ):
        candidates = {"ours": ours_run}
        if theirs_run is not None and failure is None:
            candidates["theirs"] = theirs_run
        times = interleaved_times(candidates, repeats, device, warmup=2)
        table.compare(
            name,
            times["ours"] * 1e3,
            times["theirs"] * 1e3 if "theirs" in times else None,
            "ms",
            note=f"theirs failed: {failure}" if failure else "",
        )
    if run_theirs is None:
        table.skip(E2E_NAMES[2:], theirs_missing)
        return
    with tf32_off():
        expected, actual = run_theirs(), run_ours()
    ours_bf16 = under_bf16(run_ours, device)()
    limit = f"<= {CORRECTNESS_TOLERANCE:.0e}"
    for rows, candidate, checked in ((E2E_NAMES[2:4], actual, True), (E2E_NAMES[4:6], ours_bf16, False)):
        for row, field_name in zip(rows, ("logits", "pred_boxes")):
            error = (getattr(candidate, field_name).float() - getattr(expected, field_name).float()).abs().max().item()
            if checked:
                table.check(row, f"{error:.2e}", error <= CORRECTNESS_TOLERANCE, limit, max_abs=error)
            else:
                table.add(row, f"{error:.2e}", max_abs=error)
    reference = top100(expected)
    kept = matched_fraction(reference, top100(ours_bf16))
    result = f"{kept:.1%} (label, IoU >= 0.95)"
    if quick:
        table.add(E2E_NAMES[6], result, fraction=kept)
    else:
        table.check(E2E_NAMES[6], result, kept >= TOP100_LIMIT, f">= {TOP100_LIMIT:.0%}", fraction=kept)
    if theirs_bf16 is None or theirs_bf16_failure is not None:
        table.skip(E2E_NAMES[7:], f"skipped (theirs failed under bf16: {theirs_bf16_failure})")
    else:
        kept = matched_fraction(reference, top100(theirs_bf16()))
        table.add(E2E_NAMES[7], f"{kept:.1%} (label, IoU >= 0.95)", fraction=kept)


def forward_memory(table: Table, ours: Any, theirs: Any | None, device: torch.device, size: tuple[int, int]) -> None:
    if device.type != "cuda":
        table.skip(FORWARD_MEMORY_NAMES, SKIPPED_NO_CUDA)
        return
    for name, bf16 in zip(FORWARD_MEMORY_NAMES, (False, True)):
        peaks = []
        for model in (ours, theirs):
            if model is None:
                peaks.append(None)
                continue
            run = forward_workload(model, 1, size[0], size[1], device)
            run = under_bf16(run, device) if bf16 else run
            # The warm-up call loads kernels and fills caches (not per-call memory); theirs may fail under bf16.
            if model is ours:
                run()
            elif failure_of(run) is not None:
                peaks.append(None)
                continue
            peaks.append(peak_cuda_mib(run, device)[0])
        table.compare(name, peaks[0], peaks[1], "MiB")


def training(
    table: Table, ours: Any, theirs: Any | None, device: torch.device, size: tuple[int, int], repeats: int
) -> None:
    """Forward with labels + backward + AdamW under bf16 autocast (ours; theirs alongside when installed)."""
    height, width = size
    steps = {"ours": under_bf16(training_workload(ours, TRAIN_BATCH, height, width, device), device)}
    try:
        failure = None
        if theirs is not None:
            theirs_step = under_bf16(training_workload(theirs, TRAIN_BATCH, height, width, device), device)
            failure = failure_of(theirs_step)
            if failure is None:
                steps["theirs"] = theirs_step
        note = f"theirs failed: {failure}" if failure else ""
        times = interleaved_times(steps, repeats, device, warmup=1)  # the warm-up creates the optimizer state
        theirs_ms = times["theirs"] * 1e3 if "theirs" in times else None
        table.compare(TRAIN_NAMES[0], times["ours"] * 1e3, theirs_ms, "ms", note=note)
        losses: dict[str, float] = {}
        peaks: dict[str, float] = {}
        for name, step in steps.items():
            if device.type == "cuda":
                peaks[name], losses[name] = peak_cuda_mib(step, device)
            else:
                losses[name] = step()
        result = ", ".join(f"{name} loss {loss:.4g}" for name, loss in losses.items())
        table.check(
            TRAIN_NAMES[1],
            result,
            math.isfinite(losses["ours"]),
            "ours finite",
            **{f"{name}_loss": loss for name, loss in losses.items()},
        )
        if device.type == "cuda":
            table.compare(TRAIN_NAMES[2], peaks["ours"], peaks.get("theirs"), "MiB", note=note)
        else:
            table.skip(TRAIN_NAMES[2:], SKIPPED_NO_CUDA)
    finally:
        ours.eval()
        if theirs is not None:
            theirs.eval()


def build_models(directory: Path, tiny: bool, device: torch.device) -> tuple[Any, Any | None, str]:
    """Ours and theirs with the same weights (``benchmarks.model_pairs``), on ``device``, and why theirs is None.

    When transformers is installed but cannot build its model, ours is built alone (transformers hidden from the
    import) so that every row of ours still runs."""
    try:
        pair = build_pair(directory, quick=tiny)
        missing = "skipped (transformers not installed)"
    except Exception as error:
        traceback.print_exc(file=sys.stderr)
        missing = f"skipped (transformers could not build the model: {type(error).__name__})"
        hidden = sys.modules.get("transformers")
        sys.modules["transformers"] = None  # type: ignore[assignment]  # makes `import transformers` fail
        try:
            pair = build_pair(directory, quick=tiny)
        finally:
            if hidden is None:
                del sys.modules["transformers"]
            else:
                sys.modules["transformers"] = hidden
    theirs = pair.theirs.to(device) if pair.theirs is not None else None
    return pair.ours.to(device), theirs, missing


# ---------------------------------------------------------------------------------------------------------------------
# The command


def parse_arguments(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.gpu_check", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny model and small shapes: a smoke run")
    parser.add_argument("--device", default=None, help="the CUDA device (default cuda)")
    parser.add_argument(
        "--size", type=parse_size, default=None, help="image HxW (default 800x1066; --quick 128x160; --cpu-smoke 64x80)"
    )
    parser.add_argument("--json", type=Path, default=None, help="also write the rows here")
    parser.add_argument(
        "--cpu-smoke",
        action="store_true",
        help="run the table's code on CPU with a tiny model (CUDA-only rows skipped), for CI",
    )
    args = parser.parse_args(argv)
    if args.cpu_smoke and args.device not in (None, "cpu"):
        parser.error("--cpu-smoke runs on the CPU; leave out --device")
    return args


def resolve_device(args: argparse.Namespace) -> torch.device | str:
    """The device to run on, or the one-line reason there is none."""
    if args.cpu_smoke:
        return torch.device("cpu")
    if not torch.cuda.is_available():
        return NO_CUDA
    try:
        device = torch.device(args.device or "cuda")
    except RuntimeError as error:
        return f"bad --device {args.device!r}: {error}"
    if device.type != "cuda":
        return f"--device must be a CUDA device (or use --cpu-smoke), got {args.device!r}"
    if device.index is not None and device.index >= torch.cuda.device_count():
        return f"no CUDA device {device}: this machine has {torch.cuda.device_count()}"
    return device if device.index is not None else torch.device("cuda", torch.cuda.current_device())


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def main(argv: list[str] | None = None) -> int:
    args = parse_arguments(argv)
    device = resolve_device(args)
    if isinstance(device, str):
        print(device, file=sys.stderr)
        return 2
    started = time.perf_counter()
    if device.type == "cuda":
        torch.cuda.set_device(device)  # Triton launches on the current device
    tiny = args.quick or args.cpu_smoke
    height, width = args.size or ((64, 80) if args.cpu_smoke else (128, 160) if args.quick else (800, 1066))
    if device.type == "cpu":
        # Tiny shapes gain nothing from a second thread, and OpenMP barriers stall on a shared, busy CI machine.
        torch.set_num_threads(1)
        op_repeats = model_repeats = train_repeats = 1
    else:
        op_repeats, model_repeats, train_repeats = (5, 3, 2) if args.quick else (20, 10, 5)
    table = Table(planned_names())
    table.add(
        "GPU", torch.cuda.get_device_name(device) if device.type == "cuda" else "none (--cpu-smoke)", device=str(device)
    )
    table.add("torch", torch.__version__)
    table.add("triton", _version("triton"))
    table.add("torch.backends.cuda.matmul.allow_tf32", str(torch.backends.cuda.matmul.allow_tf32))
    table.add("torch.backends.cudnn.allow_tf32", str(torch.backends.cudnn.allow_tf32))

    def progress(message: str) -> None:
        print(f"[{time.perf_counter() - started:6.1f} s] {message}", file=sys.stderr, flush=True)

    with tempfile.TemporaryDirectory() as directory:
        model_name = "tiny model" if tiny else "ResNet-50"
        progress(f"building the {model_name} in ddetr and transformers (same weights)")
        ours, theirs, theirs_missing = build_models(Path(directory), tiny, device)

        shapes = model_level_shapes(ours, height, width, device)
        tokens = sum(h * w for h, w in shapes)
        table.add(
            "op shapes",
            f"batch {OP_BATCH}, {height}x{width} -> {' '.join(f'{h}x{w}' for h, w in shapes)} "
            f"({tokens} tokens); {HEADS} heads x {HEAD_DIM}, 4 points; decoder {DECODER_QUERIES} queries",
            levels=shapes,
            tokens=tokens,
        )

        candidate, why_not = None, SKIPPED_NO_CUDA
        try:
            candidate, why_not = triton_candidate(device)
        except Exception as error:  # the kernels do not import: every Triton row says why
            traceback.print_exc(file=sys.stderr)
            why_not = f"error: triton kernels do not load: {type(error).__name__}: {str(error)[:100]}"
        for dtype in OP_DTYPES:
            for case in OP_CASES:
                names = op_check_names(dtype, case) + op_speed_names(dtype, case)
                if candidate is None:
                    table.skip(names, why_not)
                    continue
                progress(f"op {dtype} {case}: triton vs grid_sample")

                def op_rows(dtype: str = dtype, case: str = case) -> None:
                    inputs = op_inputs(case, shapes, OP_DTYPES[dtype], device)
                    op_check(table, dtype, case, candidate, inputs)
                    op_speed(table, dtype, case, candidate, inputs, op_repeats, 3, device)

                table.section(names, op_rows)

        progress("end to end forward, fp32 and bf16")
        table.section(
            E2E_NAMES,
            lambda: end_to_end(table, ours, theirs, theirs_missing, device, (height, width), model_repeats, tiny),
        )
        progress("forward memory")
        table.section(FORWARD_MEMORY_NAMES, lambda: forward_memory(table, ours, theirs, device, (height, width)))
        progress("training step, bf16 autocast")
        table.section(TRAIN_NAMES, lambda: training(table, ours, theirs, device, (height, width), train_repeats))

    elapsed = time.perf_counter() - started
    table.add("wall time", f"{elapsed:.1f} s", seconds=elapsed)
    print(table.render(), flush=True)
    failures = table.failures()
    if args.json:
        setup = {
            "device": str(device),
            "size": [height, width],
            "quick": args.quick,
            "cpu_smoke": args.cpu_smoke,
            "repeats": {"op": op_repeats, "model": model_repeats, "train": train_repeats},
        }
        report = {"setup": setup, "rows": table.as_json(), "failures": [row.name for row in failures]}
        args.json.write_text(json.dumps(report, indent=2, ensure_ascii=False))
    if failures:
        print(f"{len(failures)} row(s) failed: " + "; ".join(row.name for row in failures), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
