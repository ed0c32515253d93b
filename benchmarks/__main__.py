"""Side-by-side benchmark of ddetr and transformers on the same weights.

    python -m benchmarks                      # full run: ResNet-50, one 800x1066 image, 2 threads by default
    python -m benchmarks --quick              # reduced run (tiny model, small images): checks correctness only

Every comparison runs interleaved in one process (ours, theirs, ours, ...) and reports medians and ratios
ours / theirs. transformers is optional: without it only our numbers are printed. Results also go to JSON.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from benchmarks.floor import count_macs, measure_rates
from benchmarks.measure import interleaved_times, matched_fraction, peak_memory_of
from benchmarks.model_pairs import build_pair
from benchmarks.workloads import forward_workload, random_batch, training_workload
from ddetr.export.cli import parse_size
from ddetr.model.deformable_attention import sampling_locations
from ddetr.ops import ms_deform_attn
from ddetr.ops.conv import conv_layout_choice, conv_relu_choice
from ddetr.ops.linear import linear_choice
from ddetr.pipeline import ObjectDetectionPipeline
from ddetr.processing import DeformableDetrImageProcessorFast, post_process_object_detection
from ddetr.runtime.allocator import keep_freed_memory
from ddetr.runtime.kernel_choice import Choice, mode_name
from ddetr.runtime.machine import cpu_name
from ddetr.runtime.precision import BF16, native_bf16

CORRECTNESS_TOLERANCE = 1e-4


def parse_arguments(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny model and images; exits 1 on a correctness failure")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2, like a free Space)")
    parser.add_argument(
        "--size", type=parse_size, default=None, help="inference image HxW (default 800x1066, quick 128x160)"
    )
    parser.add_argument(
        "--train-size", type=parse_size, default=None, help="training image HxW (default 512x640, quick 96x128)"
    )
    parser.add_argument("--repeats", type=int, default=None, help="timed repeats per candidate (default 3, quick 1)")
    parser.add_argument("--variant", default="multi-scale", choices=["multi-scale", "box-refine", "two-stage"])
    parser.add_argument("--skip", nargs="*", default=[], choices=["e2e", "train", "op", "memory", "bf16"])
    parser.add_argument("--json", type=Path, default=None, help="write the results here")
    return parser.parse_args(argv)


def photos(count: int, height: int, width: int) -> list[Image.Image]:
    """Real photographs from the gradio package when installed (the demo's own assets), else textured noise."""
    images: list[Image.Image] = []
    try:
        import gradio

        folder = Path(gradio.__file__).parent / "media_assets" / "images"
        for path in sorted(folder.glob("*.jp*g"))[:count]:
            images.append(Image.open(path).convert("RGB").resize((width, height)))
    except ImportError:
        pass
    rng = np.random.default_rng(0)
    while len(images) < count:
        coarse = rng.integers(0, 255, (height // 16 + 1, width // 16 + 1, 3), dtype=np.uint8)
        images.append(Image.fromarray(coarse).resize((width, height), Image.Resampling.BILINEAR))
    return images


class Report:
    def __init__(self) -> None:
        self.results: dict[str, Any] = {}
        self.failures: list[str] = []

    def section(self, title: str) -> None:
        print(f"\n== {title}")

    def row(self, key: str, ours: float, theirs: float | None, unit: str = "s", floor: float | None = None) -> None:
        """``floor``: the GEMM floor of this work in seconds; the row then shows ours as a multiple of it."""
        entry: dict[str, Any] = {"ours": ours, "theirs": theirs}
        line = f"  {key:<44} ours {ours:10.4f} {unit}"
        if theirs is not None:
            entry["ratio"] = ours / theirs
            line += f"   theirs {theirs:10.4f} {unit}   ratio {ours / theirs:6.3f}"
        if floor is not None:
            entry["floor"], entry["floor_multiple"] = floor, ours / floor
            line += f"   floor {floor:7.3f} {unit} = x{ours / floor:5.2f}"
        self.results[key] = entry
        print(line)

    def value(self, key: str, value: float, limit: float | None = None, below: bool = True) -> None:
        self.results[key] = value
        status = ""
        if limit is not None:
            ok = value <= limit if below else value >= limit
            status = "ok" if ok else "FAIL"
            if not ok:
                self.failures.append(f"{key} = {value:.3g} (limit {limit})")
        print(f"  {key:<44} {value:.4g} {status}")


def main(argv: list[str] | None = None) -> int:
    args = parse_arguments(argv)
    torch.set_num_threads(args.threads)
    # What ddetr.pipeline does; process-wide, so both implementations run under the same allocator settings.
    kept = keep_freed_memory()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("no CUDA device is available; run with --device cpu", file=sys.stderr)
        return 2
    height, width = args.size or ((128, 160) if args.quick else (800, 1066))
    train_height, train_width = args.train_size or ((96, 128) if args.quick else (512, 640))
    repeats = args.repeats or (1 if args.quick else 3)
    report = Report()
    report.results["setup"] = {
        "device": str(device),
        "threads": args.threads,
        "size": [height, width],
        "train_size": [train_height, train_width],
        "repeats": repeats,
        "variant": args.variant,
        "torch": torch.__version__,
        "keep_freed_memory": kept,
    }
    bf16_kind = "native" if native_bf16(device) else "emulated (no AVX512-BF16/AMX)"
    report.results["setup"] |= {"cpu": cpu_name(), "bf16": bf16_kind}
    print(f"ddetr benchmark on {device} with {args.threads} threads; image {height}x{width}, repeats {repeats}; "
          f"freed memory kept: {kept}")  # fmt: skip
    print(f"CPU: {cpu_name()}; bf16 {bf16_kind}; torch {torch.__version__}")

    with tempfile.TemporaryDirectory() as directory:
        pair = build_pair(Path(directory), quick=args.quick, variant=args.variant)
        ours, theirs = pair.ours.to(device), pair.theirs.to(device) if pair.theirs is not None else None
        if theirs is None:
            print("transformers is not installed: only ddetr is timed")

        run_ours = forward_workload(ours, 1, height, width, device)
        floors = gemm_floor(report, ours, run_ours, args, device, (height, width), (train_height, train_width))
        report.section(f"forward, batch 1, {height}x{width}")
        candidates = {"ours fp32": run_ours}
        if "bf16" not in args.skip:

            def run_ours_bf16() -> Any:
                with BF16.autocast(device):
                    return run_ours()

            candidates["ours bf16"] = run_ours_bf16
        if theirs is not None:
            candidates["theirs fp32"] = forward_workload(theirs, 1, height, width, device)
        times = interleaved_times(candidates, repeats, device)
        theirs_time = times.get("theirs fp32")
        report.row("forward fp32", times["ours fp32"], theirs_time, floor=floors.get("forward fp32"))
        if "ours bf16" in times:
            report.row("forward bf16 (vs theirs fp32)", times["ours bf16"], theirs_time,
                       floor=floors.get("forward bf16"))  # fmt: skip

        if theirs is not None:
            expected, actual = candidates["theirs fp32"](), run_ours()
            logits_error = (expected.logits - actual.logits).abs().max().item()
            boxes_error = (expected.pred_boxes - actual.pred_boxes).abs().max().item()
            report.value("max |logits ours - theirs| fp32", logits_error, CORRECTNESS_TOLERANCE)
            report.value("max |boxes ours - theirs| fp32", boxes_error, CORRECTNESS_TOLERANCE)
            if "ours bf16" in candidates:
                bf16_outputs = candidates["ours bf16"]()
                reference = post_process_object_detection(expected, threshold=0.0, top_k=100)[0]
                candidate = post_process_object_detection(bf16_outputs, threshold=0.0, top_k=100)[0]
                report.value("bf16 top-100 matched (label, IoU>=0.95)", matched_fraction(reference, candidate),
                             None if args.quick else 0.95, below=False)  # fmt: skip

        if "e2e" not in args.skip:
            end_to_end(report, ours, theirs, device, repeats, height, width)
        if "train" not in args.skip:
            report.section(f"training step, batch 2, {train_height}x{train_width}")
            candidates = {"ours": training_workload(ours, 2, train_height, train_width, device)}
            if "bf16" not in args.skip:
                candidates["ours bf16"] = training_workload(ours, 2, train_height, train_width, device, BF16)
            if theirs is not None:
                candidates["theirs"] = training_workload(theirs, 2, train_height, train_width, device)
            times = interleaved_times(candidates, repeats, device)
            report.row("training step (forward + backward + AdamW)", times["ours"], times.get("theirs"),
                       floor=floors.get("train fp32"))  # fmt: skip
            if "ours bf16" in times:
                report.row("training step bf16 autocast (vs theirs fp32)", times["ours bf16"], times.get("theirs"),
                           floor=floors.get("train bf16"))  # fmt: skip
            ours.eval()
            if theirs is not None:
                theirs.eval()
        if "op" not in args.skip:
            attention_op(report, ours, device, repeats, height, width)
        if "memory" not in args.skip:
            memory(report, pair.directory, theirs is not None, args, (height, width), (train_height, train_width))
        if device.type == "cpu":
            kernel_choices(report, "bf16" not in args.skip)

    if args.json:
        args.json.write_text(json.dumps(report.results, indent=2))
    if report.failures:
        print("\ncorrectness failures:\n  " + "\n  ".join(report.failures), file=sys.stderr)
        return 1
    return 0


def gemm_floor(
    report: Report, ours: Any, run_forward: Any, args: argparse.Namespace, device: torch.device, size, train_size
) -> dict[str, float]:
    """Count the MACs of a forward and a training step, time this CPU's GEMMs, and return each floor in seconds."""
    if device.type != "cpu":
        return {}
    report.section("GEMM floor: MACs counted, GEMM rates measured now (GMAC/s)")
    forward_macs = count_macs(run_forward)
    # A copy: the optimizer steps must not change the weights both implementations share.
    train_macs = count_macs(training_workload(copy.deepcopy(ours), 2, *train_size, device))
    tokens = sum(-(-size[0] // 2**s) * -(-size[1] // 2**s) for s in (3, 4, 5, 6))
    rates = measure_rates(network_rows=tokens, size=512 if args.quick else 2048, bf16="bf16" not in args.skip)
    report.results["macs"] = {"forward": forward_macs.__dict__, "train": train_macs.__dict__}
    report.results["gemm_rates"] = rates.rates
    print(
        f"  forward batch 1 {size[0]}x{size[1]}: {forward_macs.total / 1e9:.1f} GMAC "
        f"(convolutions {forward_macs.convolution / 1e9:.1f}, matrix products {forward_macs.matmul / 1e9:.1f})"
    )
    print(f"  training step batch 2 {train_size[0]}x{train_size[1]}: {train_macs.total / 1e9:.1f} GMAC "
          "(forward + backward)")  # fmt: skip
    for dtype, kernels in rates.rates.items():
        print(f"  {dtype}: " + ", ".join(f"{label} {rate:.0f}" for label, rate in kernels.items()))
    floors = {}
    for dtype in rates.rates:
        floors[f"forward {dtype}"] = rates.floor_seconds(forward_macs.total, dtype)
        floors[f"train {dtype}"] = rates.floor_seconds(train_macs.total, dtype)
    print("  floors (MACs / best rate): " + ", ".join(f"{key} {value:.3f} s" for key, value in floors.items()))
    report.results["floors"] = floors
    return floors


def kernel_choices(report: Report, bf16: bool) -> None:
    """Which library each CPU path used in this run (measured on this machine, cached, or overridden)."""
    report.section("kernels chosen on this machine (DDETR_KERNELS overrides)")
    chosen = {}
    modes = [(torch.float32, False), (torch.float32, True)] + ([(torch.bfloat16, False)] if bf16 else [])
    for dtype, training in modes:
        families: list[tuple[str, Callable[..., Choice]]] = [
            ("linear", linear_choice),
            ("conv_layout", conv_layout_choice),
        ]
        if not training:  # the fused convolution + ReLU is an inference path
            families.append(("conv_relu", lambda dtype, training: conv_relu_choice(dtype)))
        for family, choice in families:
            picked = choice(dtype, training=training)
            mode = mode_name(dtype, training=training)
            timings = ", ".join(f"{name} {seconds * 1e3:.1f} ms" for name, seconds in picked.seconds.items())
            chosen[f"{family}/{mode}"] = {"option": picked.option, "source": picked.source, "seconds": picked.seconds}
            print(f"  {family:<12} {mode:<15} {picked.option:<14} ({picked.source}{'; ' + timings if timings else ''})")
    report.results["kernels"] = chosen


def end_to_end(report: Report, ours: Any, theirs: Any, device: torch.device, repeats: int, height: int, width: int):
    """Preprocess + forward + post-process per image, from decoded photographs, at batch 1 and 4."""
    images = photos(4, height, width)
    # The photos are resized like a user's would be: shortest edge to the benchmark's height (800 by default).
    size = {"shortest_edge": height, "longest_edge": max(1333, width)}
    processor = DeformableDetrImageProcessorFast(size=size)
    their_processor = None
    if theirs is not None:
        import transformers

        their_processor = transformers.DeformableDetrImageProcessorPil(size=size)

    # Ours through the pipeline's batched path: load, preprocess, forward, post-process, clamp, name the labels.
    detector = ObjectDetectionPipeline(model=ours, processor=processor, precision="fp32")

    def ours_on(batch: list[Image.Image]) -> Any:
        return [found.detections(0.3, 100) for found in detector.candidates(batch, top_k=100)]

    def theirs_on(batch: list[Image.Image]) -> Any:
        with torch.inference_mode():
            inputs = their_processor(batch, return_tensors="pt").to(device)
            outputs = theirs(**inputs)
            return their_processor.post_process_object_detection(
                outputs, 0.3, target_sizes=[im.size[::-1] for im in batch]
            )

    for batch_size in (1, 4):
        batch = images[:batch_size]
        report.section(f"end to end (preprocess + forward + post-process), batch {batch_size}, photos {height}x{width}")
        candidates = {"ours": lambda batch=batch: ours_on(batch)}
        if theirs is not None:
            candidates["theirs"] = lambda batch=batch: theirs_on(batch)
        times = interleaved_times(candidates, repeats, device)
        report.row(f"e2e per image, batch {batch_size}", times["ours"] / batch_size,
                   times["theirs"] / batch_size if "theirs" in times else None)  # fmt: skip


def attention_op(report: Report, model: Any, device: torch.device, repeats: int, height: int, width: int) -> None:
    """The encoder's deformable attention sampling at this image size: fast path vs the grid_sample reference."""
    pixel_values, pixel_mask = random_batch(1, height, width, device)
    with torch.no_grad():
        sources, _ = model.model._multi_scale_sources(pixel_values, pixel_mask)
    shapes = [(int(s.shape[-2]), int(s.shape[-1])) for s in sources]
    attention = model.model.encoder.layers[0].self_attn
    sequence = sum(h * w for h, w in shapes)
    generator = torch.Generator().manual_seed(0)
    heads, head_dim = attention.heads, attention.d_model // attention.heads
    value = torch.randn(1, sequence, heads, head_dim, generator=generator).to(device)
    references = torch.rand(1, sequence, len(shapes), 2, generator=generator).to(device)
    offsets = torch.randn(1, sequence, heads, len(shapes), attention.points, 2, generator=generator).to(device)
    locations = sampling_locations(references, offsets, shapes)
    weights = torch.rand(1, sequence, heads, len(shapes), attention.points, generator=generator).to(device)
    weights = weights / weights.sum((-1, -2), keepdim=True)
    report.section(f"deformable attention op, encoder shape ({sequence} queries, levels {shapes})")
    fast = ms_deform_attn(value, shapes, locations, weights)
    reference = ms_deform_attn(value, shapes, locations, weights, implementation="reference")
    report.value("max |fast - reference| op output", (fast - reference).abs().max().item(), 1e-4)

    def timed(implementation: str, backward: bool) -> Any:
        inputs = [t.clone().requires_grad_(backward) for t in (value, locations, weights)]

        def run() -> None:
            with torch.set_grad_enabled(backward):
                output = ms_deform_attn(inputs[0], shapes, inputs[1], inputs[2], implementation=implementation)
                if backward:
                    output.sum().backward()

        return run

    for backward in (False, True):
        label = "forward + backward" if backward else "forward"
        times = interleaved_times({"fast": timed("auto", backward), "reference": timed("reference", backward)},
                                  repeats, device)  # fmt: skip
        report.row(f"op {label} (vs grid_sample reference)", times["fast"], times["reference"])


def memory(report: Report, directory: Path, with_theirs: bool, args: argparse.Namespace, size, train_size) -> None:
    report.section("peak memory added by one call (fresh process each)")
    for mode, (height, width), batch in (("forward", size, 1), ("train", train_size, 2)):
        common = ["--model-dir", str(directory), "--mode", mode, "--height", str(height), "--width", str(width),
                  "--batch", str(batch), "--device", args.device, "--threads", str(args.threads)]  # fmt: skip
        ours = peak_memory_of(["--implementation", "ours", *common])
        theirs = peak_memory_of(["--implementation", "theirs", *common]) if with_theirs else None
        report.row(f"peak memory, {mode} batch {batch}", ours, theirs, unit="MiB")


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
