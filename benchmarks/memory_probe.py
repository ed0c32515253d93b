"""Run a forward or training step in a fresh process and print the peak memory its second call added, in MiB.

Used by ``python -m benchmarks``; a separate process keeps each measurement free of the others' allocations.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from benchmarks.workloads import forward_workload, load_model, training_workload


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--implementation", choices=["ours", "theirs"], required=True)
    parser.add_argument("--model-dir", type=Path, required=True)
    parser.add_argument("--mode", choices=["forward", "train"], required=True)
    parser.add_argument("--height", type=int, required=True)
    parser.add_argument("--width", type=int, required=True)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    model = load_model(args.implementation, args.model_dir, device)
    if args.mode == "forward":
        step = forward_workload(model, args.batch, args.height, args.width, device)
    else:
        step = training_workload(model, args.batch, args.height, args.width, device)
    # One call first: one-off costs (lazy imports, thread pools, kernel loading, optimizer state) are not per-call
    # memory. The parent sets MALLOC_MMAP_THRESHOLD_ so freed tensors go back to the OS and the second call's peak
    # is visible.
    step()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        step()
        torch.cuda.synchronize(device)
        print((torch.cuda.max_memory_allocated(device) - before) / 2**20)
        return
    Path("/proc/self/clear_refs").write_text("5")  # reset the peak-RSS counter (Linux)
    before = _status_kib("VmRSS")
    step()
    print((_status_kib("VmHWM") - before) / 1024)


if __name__ == "__main__":
    main()
