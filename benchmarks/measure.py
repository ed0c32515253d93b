"""Timing, peak memory and detection agreement for the benchmark."""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

import torch

from ddetr.boxes import box_iou


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def interleaved_times(
    candidates: dict[str, Callable[[], Any]], repeats: int, device: torch.device, warmup: int = 1
) -> dict[str, float]:
    """Median seconds per call of each candidate, run in turns so load changes hit all of them alike."""
    for _ in range(warmup):
        for function in candidates.values():
            function()
            synchronize(device)
    samples: dict[str, list[float]] = {name: [] for name in candidates}
    for _ in range(repeats):
        for name, function in candidates.items():
            synchronize(device)
            started = time.perf_counter()
            function()
            synchronize(device)
            samples[name].append(time.perf_counter() - started)
    return {name: statistics.median(values) for name, values in samples.items()}


def matched_fraction(
    reference: dict[str, torch.Tensor], candidate: dict[str, torch.Tensor], iou_threshold: float = 0.95
) -> float:
    """Share of the reference detections that the candidate reproduces: same label and IoU >= threshold, one-to-one
    (greedy in reference score order)."""
    boxes, labels = reference["boxes"].float(), reference["labels"]
    if len(labels) == 0:
        return 1.0
    if len(candidate["labels"]) == 0:
        return 0.0
    iou, _ = box_iou(boxes, candidate["boxes"].float())
    same_label = labels[:, None] == candidate["labels"][None, :]
    available = torch.ones(len(candidate["labels"]), dtype=torch.bool)
    matched = 0
    for row in range(len(labels)):
        eligible = same_label[row] & available & (iou[row] >= iou_threshold)
        if eligible.any():
            best = torch.where(eligible, iou[row], torch.tensor(-1.0)).argmax()
            available[best] = False
            matched += 1
    return matched / len(labels)


def peak_memory_of(arguments: list[str]) -> float:
    """Peak resident memory in MiB of a fresh process running ``python -m benchmarks.memory_probe ARGUMENTS``."""
    # A fixed mmap threshold stops glibc from keeping freed tensors in the heap, so peaks are per call.
    environment = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "65536"}
    completed = subprocess.run(
        [sys.executable, "-m", "benchmarks.memory_probe", *arguments],
        capture_output=True,
        text=True,
        check=False,
        env=environment,
    )
    if completed.returncode != 0:
        raise RuntimeError(f"memory probe {arguments} failed:\n{completed.stderr[-2000:]}")
    return float(completed.stdout.strip().splitlines()[-1])
