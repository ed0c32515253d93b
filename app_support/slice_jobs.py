"""Training on ZeroGPU: a job as a series of GPU slices, driven by its owner's page and charged to their quota.

ZeroGPU attaches a GPU only inside a ``spaces.GPU`` call, bills it to the visitor whose request made the call, and
ends the call at its time box. So a job here is not a process: it is ``SliceRun``, whose ``drive()`` runs one slice
after another (``finetune.run.slices.run_slice``: resume from the last complete checkpoint, train until the budget,
checkpoint) inside the owner's own event, while the page is open and their quota lasts. A spent quota, a failed or
refused GPU call, or a closed page leaves the job "waiting": resumable from its last checkpoint, with a message
saying why. Several visitors' jobs train at once: each call gets its own GPU.

Off ZeroGPU ``gpu`` is a plain call and the slices run in the server process: that is how the tests drive it.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from app_support.zerogpu import gpu
from finetune.config import TrainConfig
from finetune.run.files import METRICS
from finetune.run.metrics_log import read_metrics
from finetune.run.slices import SliceResult, SliceTimings, run_slice

# One slice's training budget, and the time box asked of ZeroGPU around it (the child's start, the transfer of the
# arguments and the result). spaces' default box is 60 s; a free account has 5 GPU minutes a day.
SLICE_SECONDS = 45
SLICE_BOX_SECONDS = SLICE_SECONDS + 15
# A job no page drives (its page closed before the first slice, an API start) waits, resumable, after this long
# instead of holding a place among the running ones.
UNDRIVEN_SECONDS = 120.0


@gpu(duration=SLICE_BOX_SECONDS)
def train_slice(config: TrainConfig, budget_seconds: float, timings: SliceTimings | None) -> SliceResult:
    """One GPU call: the slice's arguments and result are plain values (ZeroGPU pickles them)."""
    return run_slice(config, budget_seconds=budget_seconds, timings=timings)


class SliceRun:
    """A job trained in slices (the ``jobs.RunHandle`` of ZeroGPU). ``state``: pending until its owner's page
    drives it, running, then finished / stopped / diverged / failed, or waiting (resumable: quota, page closed)."""

    def __init__(self, config: TrainConfig, *, slice_seconds: float = SLICE_SECONDS) -> None:
        self.config = config
        self.slice_seconds = slice_seconds
        self.slices = 0
        self.gpu_seconds = 0.0
        self.message = ""
        self.error: str | None = None
        self._state = "pending"
        self._timings: SliceTimings | None = None
        self._stop = threading.Event()
        self._driving = threading.Lock()  # one page drives a job at a time
        self._ended = threading.Event()
        self._created = time.monotonic()

    @property
    def output_dir(self) -> Path:
        return Path(self.config.output_dir)

    @property
    def state(self) -> str:
        if (
            self._state == "pending"
            and time.monotonic() - self._created > UNDRIVEN_SECONDS
            and not self._driving.locked()
        ):
            self._wait("no open page of its owner trained it")
        return self._state

    @property
    def done(self) -> bool:
        return self.state not in ("pending", "running")

    def drive(self) -> Iterator[SliceResult]:
        """Run slices until the job ends, is stopped or a slice cannot run; yields each slice's result."""
        if not self._driving.acquire(blocking=False):
            raise ValueError("this job is already training (from another page of yours)")
        try:
            if self.done:
                return
            self._state = "running"
            config = self.config
            while not self._stop.is_set():
                try:
                    result = train_slice(config, float(self.slice_seconds), self._timings)
                except Exception as error:  # quota spent, a refused or aborted GPU call: resumable later
                    self._wait(f"the GPU call did not run ({type(error).__name__}: {error})")
                    return
                self.slices += 1
                self.gpu_seconds += result.seconds
                self._timings = result.timings
                yield result
                if result.state == "failed":
                    self.error = result.error or result.message or "the slice failed"
                    self._end("failed")
                    return
                if result.done:
                    self._end(result.state)
                    return
                if result.steps_done == 0:
                    self._wait(result.message or "a slice made no progress")
                    return
            self._end("stopped")
        finally:
            if not self.done:  # the page went away (Gradio closed this generator) with the job under way
                self._wait("the page that trained it was closed")
            self._driving.release()

    def _wait(self, why: str) -> None:
        self.message = f"waiting: {why}; Resume continues from the last checkpoint"
        self._end("waiting")

    def _end(self, state: str) -> None:
        self._state = state
        self._ended.set()

    def stop(self, *, wait: bool = False, timeout: float | None = None) -> None:
        """No further slice starts (the one running ends at its budget, with a checkpoint)."""
        self._stop.set()
        if self._state == "pending":
            self._end("stopped")
        if wait:
            self._ended.wait(timeout)

    def stop_then_kill(self, grace: float) -> str:
        self.stop(wait=True, timeout=grace)
        return self._state

    def wait(self, timeout: float | None = None) -> Any:
        self._ended.wait(timeout)
        return None

    def records(self, *, kind: str | None = None) -> list[dict[str, Any]]:
        records = read_metrics(self.output_dir / METRICS)
        return [r for r in records if kind is None or r.get("type") == kind]

    def log_tail(self, lines: int = 20) -> str:
        return self.message
