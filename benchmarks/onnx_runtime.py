"""onnxruntime on the CPU against ddetr (fp32 and bf16) and transformers, on the same weights.

    python -m benchmarks.onnx_runtime                 # ResNet-50, 640x640 and 800x1066, 2 threads
    python -m benchmarks.onnx_runtime --quick         # tiny model, small images, one repeat: a smoke test

The weights are random (``build_pair``: nothing is downloaded). Ours is exported with ``export_onnx`` (dynamic batch
and size, so one file serves every size; the export's time and the file's size are reported) and run by onnxruntime
on the CPU provider with ``--threads`` intra-op threads. At each size the four candidates run interleaved
(onnxruntime, ddetr fp32, ddetr bf16, transformers fp32, again, ...), batch 1, on the same input; the table shows
median seconds per forward and ratios, time / reference time (below 1 is faster), against ddetr fp32 and against
transformers fp32, and how far onnxruntime's outputs are from ddetr fp32's.

In the interleaved runs onnxruntime's workers sleep between runs rather than spin-wait (onnxruntime's default),
since spinning workers keep the cores busy after each run and slow the torch candidate timed next several times
over. Spinning makes onnxruntime itself faster, though, so the row "onnxruntime spinning" times a session with
onnxruntime's default settings on its own, after the interleaved runs.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from benchmarks.measure import interleaved_times
from benchmarks.model_pairs import build_pair
from benchmarks.workloads import forward_workload, random_batch
from ddetr.export import export_onnx
from ddetr.export.cli import parse_size
from ddetr.runtime.allocator import keep_freed_memory
from ddetr.runtime.precision import BF16, native_bf16

DEFAULT_SIZES = ("640x640", "800x1066")
QUICK_SIZES = ("128x160", "96x128")
# onnxruntime fuses and reorders differently from torch: float32 agreement, not bit equality, is what is checked.
OUTPUT_TOLERANCE = 1e-3
REFERENCES = ("ddetr fp32", "transformers fp32")


def parse_arguments(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.onnx_runtime",
        description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--quick", action="store_true", help="tiny model, small images, 1 repeat (a smoke test)")
    parser.add_argument(
        "--sizes",
        nargs="+",
        type=parse_size,
        metavar="HEIGHTxWIDTH",
        help=f"image sizes (default {' '.join(DEFAULT_SIZES)}; quick {' '.join(QUICK_SIZES)})",
    )
    parser.add_argument("--threads", type=int, default=2, help="torch and onnxruntime threads (default 2)")
    parser.add_argument("--repeats", type=int, default=None, help="timed repeats per candidate (default 3, quick 1)")
    parser.add_argument("--variant", default="multi-scale", choices=["multi-scale", "box-refine", "two-stage"])
    parser.add_argument("--opset", type=int, default=17, help="ONNX opset of the export (default 17)")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    return parser.parse_args(argv)


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def onnx_session(path: Path, threads: int, *, spinning: bool) -> Any:
    """An onnxruntime CPU session with ``threads`` intra-op threads; ``spinning=False``: its idle workers sleep
    (spin-waiting ones would keep the cores busy after each run, starving the candidate timed next)."""
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    if not spinning:
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def onnx_workload(session: Any, height: int, width: int) -> Callable[[], list[np.ndarray]]:
    """onnxruntime on the input ``forward_workload`` gives the PyTorch models (``random_batch``, batch 1)."""
    pixel_values, pixel_mask = random_batch(1, height, width, torch.device("cpu"))
    feeds = {"pixel_values": pixel_values.numpy(), "pixel_mask": pixel_mask.numpy()}

    def run() -> list[np.ndarray]:
        return session.run(["logits", "pred_boxes"], feeds)

    return run


def print_table(times: dict[str, float]) -> dict[str, dict[str, float | None]]:
    print(f"  {'candidate':<22} {'median s':>10} {'vs ddetr fp32':>15} {'vs transformers':>16}")
    rows: dict[str, dict[str, float | None]] = {}
    for name, seconds in times.items():
        ratios = {reference: seconds / times[reference] if reference in times else None for reference in REFERENCES}
        shown = [f"{ratio:.3f}" if ratio is not None else "n/a" for ratio in ratios.values()]
        print(f"  {name:<22} {seconds:10.4f} {shown[0]:>15} {shown[1]:>16}")
        rows[name] = {"seconds": seconds, **{f"vs {reference}": ratio for reference, ratio in ratios.items()}}
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_arguments(argv)
    try:
        import onnx  # noqa: F401 - the export needs it
        import onnxruntime
    except ImportError as error:
        print(f"this benchmark needs onnx and onnxruntime (pip install 'ddetr[export]'): {error}", file=sys.stderr)
        return 2
    sizes = args.sizes or [parse_size(text) for text in (QUICK_SIZES if args.quick else DEFAULT_SIZES)]
    repeats = args.repeats or (1 if args.quick else 3)
    torch.set_num_threads(args.threads)
    kept = keep_freed_memory()  # what ddetr.pipeline does; process-wide, so every torch candidate gets it
    device = torch.device("cpu")
    model = "tiny quick model" if args.quick else "ResNet-50"
    print(
        f"onnxruntime {onnxruntime.__version__} vs ddetr (torch {torch.__version__}) on the CPU: {cpu_name()}\n"
        f"{args.threads} threads, {model}, variant {args.variant}, repeats {repeats}, batch 1; "
        f"native bf16: {native_bf16(device)}; freed memory kept: {kept}"
    )
    results: dict[str, Any] = {
        "setup": {
            "cpu": cpu_name(),
            "threads": args.threads,
            "quick": args.quick,
            "variant": args.variant,
            "repeats": repeats,
            "sizes": [list(size) for size in sizes],
            "torch": torch.__version__,
            "onnxruntime": onnxruntime.__version__,
        }
    }
    failures: list[str] = []

    with tempfile.TemporaryDirectory() as directory:
        weights = Path(directory) / "weights"
        pair = build_pair(weights, quick=args.quick, variant=args.variant)
        ours, theirs = pair.ours.to(device), pair.theirs
        if theirs is None:
            print("transformers is not installed: its column is n/a")
        exported = export_onnx(ours, Path(directory) / "onnx" / "model.onnx", opset=args.opset)
        megabytes = exported.bytes / 2**20
        print(f"export: {exported.seconds:.1f} s, {megabytes:.1f} MB (opset {exported.opset}, dynamic batch and size)")
        results["export"] = {"seconds": exported.seconds, "megabytes": megabytes, "opset": exported.opset}
        session = onnx_session(exported.path, args.threads, spinning=False)
        spinning = onnx_session(exported.path, args.threads, spinning=True)

        for height, width in sizes:
            print(f"\n== {height}x{width}: median seconds per forward; ratio = time / reference (below 1 is faster)")
            run_ours = forward_workload(ours, 1, height, width, device)

            def run_ours_bf16(run_ours: Callable[[], Any] = run_ours) -> Any:
                with BF16.autocast(device):
                    return run_ours()

            candidates: dict[str, Callable[[], Any]] = {
                "onnxruntime": onnx_workload(session, height, width),
                "ddetr fp32": run_ours,
                "ddetr bf16": run_ours_bf16,
            }
            if theirs is not None:
                candidates["transformers fp32"] = forward_workload(theirs, 1, height, width, device)
            times = interleaved_times(candidates, repeats, device)
            alone = {"onnxruntime spinning": onnx_workload(spinning, height, width)}
            times.update(interleaved_times(alone, repeats, device))
            rows = print_table(times)

            logits, boxes = candidates["onnxruntime"]()  # the two sessions run the same graph
            expected = run_ours()
            logits_error = float(np.abs(logits - expected.logits.numpy()).max())
            boxes_error = float(np.abs(boxes - expected.pred_boxes.numpy()).max())
            for what, difference in (("logits", logits_error), ("boxes", boxes_error)):
                ok = difference <= OUTPUT_TOLERANCE
                label = f"max |{what} onnxruntime - ddetr fp32|"
                print(f"  {label:<40} {difference:.3g} {'ok' if ok else 'FAIL'}")
                if not ok:
                    failures.append(f"{height}x{width}: max |{what} difference| {difference:.3g} > {OUTPUT_TOLERANCE}")
            results[f"{height}x{width}"] = {**rows, "max_logits_error": logits_error, "max_boxes_error": boxes_error}

    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    if failures:
        print("\nonnxruntime disagrees with ddetr fp32:\n  " + "\n  ".join(failures), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
