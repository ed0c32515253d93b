"""Benchmark multi-scale deformable attention on a CUDA GPU: grid_sample reference vs the Triton kernels.

    python -m benchmarks.triton_kernels                               # encoder + decoder, batch 1 and 2, fp32 + bf16
    python -m benchmarks.triton_kernels --cases encoder --batches 2 --dtypes bfloat16 --repeats 50

Shapes are the default model's: d_model 256 = 8 heads x 32 channels, 4 levels x 4 points, the feature pyramid of an
800x1066 image (100x134, 50x67, 25x34, 13x17 = 17,821 tokens); the encoder has one query per token, the decoder 300.
Each measurement is the median over ``--repeats`` CUDA-event-timed runs after ``--warmup`` runs (the first Triton call
per shape class compiles and autotunes, so the warm-up must be at least 1). Before timing, each case checks the
Triton forward and gradients against the reference and prints the largest absolute differences.

The reference gets its locations and weights in value's dtype because ``grid_sample`` needs one dtype for input and
grid; the Triton kernels keep them in float32.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from collections.abc import Callable
from dataclasses import dataclass

import torch

from ddetr.ops.ms_deform_attn import ms_deform_attn_reference
from ddetr.ops.ms_deform_attn_triton import ms_deform_attn_triton, triton_available

HEADS = 8
HEAD_DIM = 32
POINTS = 4
SPATIAL_SHAPES = ((100, 134), (50, 67), (25, 34), (13, 17))
SEQUENCE = sum(height * width for height, width in SPATIAL_SHAPES)
QUERIES = {"encoder": SEQUENCE, "decoder": 300}

Inputs = tuple[torch.Tensor, list[tuple[int, int]], torch.Tensor, torch.Tensor]


@dataclass(frozen=True)
class Timing:
    forward_ms: float
    forward_backward_ms: float
    peak_mib: float


def make_inputs(
    case: str, batch: int, dtype: torch.dtype, locations: str, device: torch.device, generator: torch.Generator
) -> Inputs:
    """Random inputs; ``locations="local"`` mimics a trained model (points a few pixels around a reference point)."""
    shapes = list(SPATIAL_SHAPES)
    queries = QUERIES[case]
    levels = len(shapes)
    # (batch, sequence, heads, head_dim)
    value = torch.randn(batch, SEQUENCE, HEADS, HEAD_DIM, generator=generator)
    if locations == "uniform":
        # (batch, queries, heads, levels, points, 2); a margin outside [0, 1] exercises the zero padding
        sampling_locations = torch.rand(batch, queries, HEADS, levels, POINTS, 2, generator=generator) * 1.2 - 0.1
    else:
        if case == "encoder":
            # Encoder queries are the tokens themselves: the reference point is the token's own pixel centre.
            centres = []
            for height, width in shapes:
                ys, xs = torch.meshgrid(
                    (torch.arange(height) + 0.5) / height, (torch.arange(width) + 0.5) / width, indexing="ij"
                )
                centres.append(torch.stack((xs.flatten(), ys.flatten()), dim=-1))
            # (batch, queries, 2)
            reference = torch.cat(centres).unsqueeze(0).expand(batch, -1, -1)
        else:
            reference = torch.rand(batch, queries, 2, generator=generator) * 0.9 + 0.05
        # (levels, 2) as (width, height): offsets in pixels of each level, like sampling_offsets / (W_l, H_l)
        normaliser = torch.tensor([[width, height] for height, width in shapes], dtype=torch.float32)
        offsets = torch.randn(batch, queries, HEADS, levels, POINTS, 2, generator=generator) * 3.0
        sampling_locations = reference[:, :, None, None, None, :] + offsets / normaliser[:, None, :]
    logits = torch.randn(batch, queries, HEADS, levels * POINTS, generator=generator)
    # (batch, queries, heads, levels, points)
    attention_weights = logits.softmax(-1).view(batch, queries, HEADS, levels, POINTS)
    return (
        value.to(device=device, dtype=dtype),
        shapes,
        sampling_locations.to(device),
        attention_weights.to(device),
    )


def _reference_inputs(inputs: Inputs) -> Inputs:
    value, shapes, locations, weights = inputs
    return value, shapes, locations.to(value.dtype), weights.to(value.dtype)


def _leaves(inputs: Inputs) -> Inputs:
    value, shapes, locations, weights = inputs
    return (
        value.detach().requires_grad_(True),
        shapes,
        locations.detach().requires_grad_(True),
        weights.detach().requires_grad_(True),
    )


def _median_ms(run: Callable[[], object], warmup: int, repeats: int) -> float:
    for _ in range(warmup):
        run()
    times = []
    for _ in range(repeats):
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        start.record()
        run()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def time_implementation(
    function: Callable[..., torch.Tensor], inputs: Inputs, grad_output: torch.Tensor, warmup: int, repeats: int
) -> Timing:
    value, shapes, locations, weights = inputs

    def forward() -> None:
        with torch.no_grad():
            function(value, shapes, locations, weights)

    leaves = _leaves(inputs)
    differentiable = (leaves[0], leaves[2], leaves[3])

    def forward_backward() -> None:
        output = function(*leaves)
        torch.autograd.grad(output, differentiable, grad_output)

    forward_ms = _median_ms(forward, warmup, repeats)
    forward_backward_ms = _median_ms(forward_backward, warmup, repeats)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    baseline = torch.cuda.memory_allocated()
    forward_backward()
    torch.cuda.synchronize()
    peak_mib = (torch.cuda.max_memory_allocated() - baseline) / 2**20
    return Timing(forward_ms, forward_backward_ms, peak_mib)


def check_against_reference(inputs: Inputs, grad_output: torch.Tensor) -> dict[str, float]:
    """Largest absolute differences (output and the three gradients) between Triton and the fp32 reference."""
    value, shapes, locations, weights = inputs
    reference_leaves = _leaves((value.float(), shapes, locations.float(), weights.float()))
    triton_leaves = _leaves(inputs)
    errors = {}
    outputs = []
    gradients = []
    for function, leaves, grad in (
        (ms_deform_attn_reference, reference_leaves, grad_output.float()),
        (ms_deform_attn_triton, triton_leaves, grad_output),
    ):
        output = function(*leaves)
        outputs.append(output.float())
        gradients.append([g.float() for g in torch.autograd.grad(output, (leaves[0], leaves[2], leaves[3]), grad)])
    errors["output"] = (outputs[0] - outputs[1]).abs().max().item()
    for name, expected, actual in zip(("value", "locations", "weights"), gradients[0], gradients[1]):
        errors[f"grad_{name}"] = (expected - actual).abs().max().item()
    return errors


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", nargs="+", choices=sorted(QUERIES), default=["encoder", "decoder"])
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 2])
    parser.add_argument(
        "--dtypes", nargs="+", choices=["float32", "bfloat16", "float16"], default=["float32", "bfloat16"]
    )
    parser.add_argument("--repeats", type=int, default=20, help="timed runs per measurement (median reported)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed runs first (Triton compiles/autotunes here)")
    parser.add_argument(
        "--locations",
        choices=["local", "uniform"],
        default="local",
        help="local: points a few pixels around each query's reference point (realistic); uniform: anywhere",
    )
    parser.add_argument("--no-check", action="store_true", help="skip the correctness check against the reference")
    parser.add_argument("--device", default="cuda", help="CUDA device to run on (default: cuda)")
    args = parser.parse_args(argv)
    if args.warmup < 1 or args.repeats < 1:
        parser.error("--warmup and --repeats must be at least 1")
    if any(batch < 1 for batch in args.batches):
        parser.error("--batches must be positive")

    if not torch.cuda.is_available():
        print("benchmarks.triton_kernels: no CUDA device is available; this benchmark needs a GPU.", file=sys.stderr)
        return 2
    if not triton_available():
        print("benchmarks.triton_kernels: triton is not installed (pip install triton).", file=sys.stderr)
        return 2
    device = torch.device(args.device)
    if device.type != "cuda":
        parser.error("--device must be a CUDA device")

    print(
        f"torch {torch.__version__}, {torch.cuda.get_device_name(device)}, {args.locations} locations, "
        f"median of {args.repeats} after {args.warmup} warm-up runs; speed-up = reference time / time"
    )
    header = (
        f"{'case':<10} {'batch':>5} {'dtype':<9} {'impl':<9} {'fwd ms':>8} {'speed-up':>8} {'fwd+bwd ms':>11} "
        f"{'speed-up':>8} {'peak MiB':>9}"
    )
    generator = torch.Generator().manual_seed(0)
    rows = []
    for case in args.cases:
        for batch in args.batches:
            for dtype_name in args.dtypes:
                dtype = getattr(torch, dtype_name)
                with torch.cuda.device(device):
                    inputs = make_inputs(case, batch, dtype, args.locations, device, generator)
                    # (batch, queries, heads * head_dim)
                    grad_output = torch.randn(batch, QUERIES[case], HEADS * HEAD_DIM, device=device).to(dtype)
                    if not args.no_check:
                        errors = check_against_reference(inputs, grad_output)
                        listed = ", ".join(f"{name} {error:.2e}" for name, error in errors.items())
                        print(f"check {case} b{batch} {dtype_name}: max |triton - reference| {listed}")
                    reference = time_implementation(
                        ms_deform_attn_reference, _reference_inputs(inputs), grad_output, args.warmup, args.repeats
                    )
                    triton_timing = time_implementation(
                        ms_deform_attn_triton, inputs, grad_output, args.warmup, args.repeats
                    )
                rows.append((case, batch, dtype_name, reference, triton_timing))

    print(header)
    print("-" * len(header))
    for case, batch, dtype_name, reference, triton_timing in rows:
        for name, timing in (("reference", reference), ("triton", triton_timing)):
            forward_ratio = reference.forward_ms / timing.forward_ms
            both_ratio = reference.forward_backward_ms / timing.forward_backward_ms
            print(
                f"{case:<10} {batch:>5} {dtype_name:<9} {name:<9} {timing.forward_ms:>8.3f} {forward_ratio:>7.2f}x "
                f"{timing.forward_backward_ms:>11.3f} {both_ratio:>7.2f}x {timing.peak_mib:>9.1f}"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
