"""Benchmark multi-scale deformable attention on CPU: grid_sample reference vs the fast implementations.

    python -m benchmarks.msda                      # encoder / decoder / training shapes, 2 threads
    python -m benchmarks.msda --shapes encoder --repeats 20 --threads 4

Implementations are run interleaved (each repeat times every implementation once, in turn), so slow drifts of a shared
machine hit all of them alike; the table reports the median (or, with --statistic min, the best) time and the speed-up
over the reference.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from ddetr.ops.ms_deform_attn import ms_deform_attn_reference
from ddetr.ops.ms_deform_attn_cpu import cpp_extension_path, ms_deform_attn_cpu

HEADS = 8
HEAD_DIM = 32
POINTS = 4


@dataclass(frozen=True)
class Case:
    name: str
    batch: int
    spatial_shapes: tuple[tuple[int, int], ...]
    queries: int | None  # None: self-attention over the whole sequence (encoder)


ENCODER_SHAPES = ((100, 134), (50, 67), (25, 34), (13, 17))  # 800x1066 image, strides 8..64
TRAINING_SHAPES = ((64, 80), (32, 40), (16, 20), (8, 10))  # 512x640 image
CASES = {
    "encoder": Case("encoder 800x1066 b1", 1, ENCODER_SHAPES, None),
    "decoder": Case("decoder 300q b1", 1, ENCODER_SHAPES, 300),
    "training": Case("train enc 512x640 b2", 2, TRAINING_SHAPES, None),
    "training-decoder": Case("train dec 300q b2", 2, TRAINING_SHAPES, 300),
}


def make_inputs(
    case: Case, dtype: torch.dtype, locations: str, generator: torch.Generator
) -> tuple[torch.Tensor, list[tuple[int, int]], torch.Tensor, torch.Tensor]:
    """Random inputs; ``locations="local"`` mimics a trained model (points a few pixels around a reference point)."""
    shapes = list(case.spatial_shapes)
    sequence = sum(height * width for height, width in shapes)
    queries = sequence if case.queries is None else case.queries
    levels = len(shapes)
    # (batch, sequence, heads, head_dim)
    value = torch.randn(case.batch, sequence, HEADS, HEAD_DIM, generator=generator)
    if locations == "uniform":
        # (batch, queries, heads, levels, points, 2); a margin outside [0, 1] exercises the zero padding
        sampling_locations = torch.rand(case.batch, queries, HEADS, levels, POINTS, 2, generator=generator) * 1.2 - 0.1
    else:
        if case.queries is None:
            # Encoder queries are the tokens themselves: reference point = own pixel centre.
            centres = []
            for height, width in shapes:
                ys, xs = torch.meshgrid(
                    (torch.arange(height) + 0.5) / height, (torch.arange(width) + 0.5) / width, indexing="ij"
                )
                centres.append(torch.stack((xs.flatten(), ys.flatten()), dim=-1))
            # (queries, 2)
            reference = torch.cat(centres).unsqueeze(0).expand(case.batch, -1, -1)
        else:
            reference = torch.rand(case.batch, queries, 2, generator=generator) * 0.9 + 0.05
        # (levels, 2) as (width, height): offsets are drawn in pixels of each level, like the model's
        # sampling_offsets / (W_l, H_l)
        normaliser = torch.tensor([[width, height] for height, width in shapes], dtype=torch.float32)
        offsets = torch.randn(case.batch, queries, HEADS, levels, POINTS, 2, generator=generator) * 3.0
        sampling_locations = reference[:, :, None, None, None, :] + offsets / normaliser[:, None, :]
    logits = torch.randn(case.batch, queries, HEADS, levels * POINTS, generator=generator)
    # (batch, queries, heads, levels, points)
    attention_weights = logits.softmax(-1).view(case.batch, queries, HEADS, levels, POINTS)
    return value.to(dtype), shapes, sampling_locations, attention_weights


def _reference(
    value: torch.Tensor, spatial_shapes: list[tuple[int, int]], locations: torch.Tensor, weights: torch.Tensor
) -> torch.Tensor:
    # Sampled in float32 like the fast paths. Also, grid_sample in bfloat16 on the reference's non-contiguous
    # per-level views segfaulted on CPU with torch 2.13 for the decoder case.
    output = ms_deform_attn_reference(value.float(), spatial_shapes, locations.float(), weights.float())
    return output.to(value.dtype)


def _fresh(inputs: tuple) -> tuple:
    # In the model, value_proj writes value and the offset/weight heads write the rest just before the op; copying
    # them right before each timed call puts them in the same (partly cache-resident) state for every implementation,
    # instead of whatever the previous implementation's run left in the caches.
    value, shapes, locations, weights = inputs
    return value.clone(), shapes, locations.clone(), weights.clone()


def _time_forward(function: Callable, inputs: tuple) -> float:
    inputs = _fresh(inputs)
    with torch.no_grad():
        start = time.perf_counter()
        function(*inputs)
        return time.perf_counter() - start


def _time_forward_backward(function: Callable, inputs: tuple, grad_output: torch.Tensor) -> float:
    value, shapes, locations, weights = _fresh(inputs)
    leaves = [tensor.requires_grad_(True) for tensor in (value, locations, weights)]
    grad_output = grad_output.clone()
    start = time.perf_counter()
    output = function(leaves[0], shapes, leaves[1], leaves[2])
    torch.autograd.grad(output, leaves, grad_output)
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", nargs="+", choices=sorted(CASES), default=["encoder", "decoder", "training"])
    parser.add_argument(
        "--implementations",
        nargs="+",
        choices=["reference", "cpp", "torch"],
        default=["reference", "cpp", "torch"],
        help="reference = grid_sample oracle; cpp = compiled kernel; torch = pure-PyTorch embedding_bag path",
    )
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (default 2, like a free Space)")
    parser.add_argument("--repeats", type=int, default=7, help="timed repeats per implementation")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32", help="dtype of value")
    parser.add_argument(
        "--locations",
        choices=["local", "uniform"],
        default="local",
        help="local: points a few pixels around each query's reference point (realistic); uniform: anywhere",
    )
    parser.add_argument("--no-backward", action="store_true", help="time the forward pass only")
    parser.add_argument(
        "--statistic",
        choices=["median", "min"],
        default="median",
        help="summary of the repeats; min is the least disturbed by other load on a shared machine",
    )
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    implementations: dict[str, Callable] = {}
    for name in args.implementations:
        if name == "reference":
            implementations[name] = _reference
        elif name == "cpp":
            if cpp_extension_path() is None:
                print("cpp: kernel unavailable, skipped")
                continue
            implementations[name] = lambda *a: ms_deform_attn_cpu(*a, backend="cpp")
        else:
            implementations[name] = lambda *a: ms_deform_attn_cpu(*a, backend="torch")
    dtype = getattr(torch, args.dtype)
    print(
        f"torch {torch.__version__}, {args.threads} threads, value {args.dtype}, {args.locations} locations, "
        f"{args.statistic} of {args.repeats}; kernel: {cpp_extension_path()}"
    )
    header = f"{'case':<22} {'impl':<10} {'fwd ms':>9} {'speed-up':>9}"
    if not args.no_backward:
        header += f" {'fwd+bwd ms':>11} {'speed-up':>9}"
    print(header)
    print("-" * len(header))
    generator = torch.Generator().manual_seed(0)
    for shape_name in args.shapes:
        case = CASES[shape_name]
        inputs = make_inputs(case, dtype, args.locations, generator)
        queries = inputs[2].shape[1]
        grad_output = torch.randn(case.batch, queries, HEADS * HEAD_DIM).to(dtype)
        forward_times: dict[str, list[float]] = {name: [] for name in implementations}
        backward_times: dict[str, list[float]] = {name: [] for name in implementations}
        for repeat in range(args.warmup + args.repeats):
            for name, function in implementations.items():
                forward = _time_forward(function, inputs)
                both = None if args.no_backward else _time_forward_backward(function, inputs, grad_output)
                if repeat >= args.warmup:
                    forward_times[name].append(forward)
                    if both is not None:
                        backward_times[name].append(both)
        summary = statistics.median if args.statistic == "median" else min
        reference_forward = summary(forward_times.get("reference") or [float("nan")])
        reference_both = summary(backward_times.get("reference") or [float("nan")])
        for name in implementations:
            forward = summary(forward_times[name])
            line = f"{case.name:<22} {name:<10} {forward * 1e3:>9.2f} {reference_forward / forward:>8.1f}x"
            if not args.no_backward:
                both = summary(backward_times[name])
                line += f" {both * 1e3:>11.2f} {reference_both / both:>8.1f}x"
            print(line)


if __name__ == "__main__":
    main()
