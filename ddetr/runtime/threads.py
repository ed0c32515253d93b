"""How many CPU threads torch uses: never more than the CPUs this process may actually run on.

A container (a Hugging Face Space among them) can show every CPU of its host while a cgroup quota lets it use
two. torch starts one thread per visible CPU, and threads beyond the quota only wait on each other: on a shared
2-core machine, oversubscribed threads made our kernels several times slower. :func:`configure_threads` caps the
count at the affinity mask and the cgroup quota, and leaves an explicit ``OMP_NUM_THREADS`` alone.

Even the usable count is not always the fastest: beside another busy process, fewer threads win.
:class:`AdaptiveThreads` times calls on each candidate count and runs them on the faster one.
"""

from __future__ import annotations

import math
import os
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Hashable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch

CGROUP_ROOT = Path("/sys/fs/cgroup")


def cgroup_cpu_quota(root: Path = CGROUP_ROOT) -> float | None:
    """CPUs' worth of time the cgroup may use (cgroup v2 ``cpu.max`` or v1 CFS quota), None when unlimited."""
    try:
        fields = (root / "cpu.max").read_text().split()
        if len(fields) == 2 and fields[0] != "max":
            return int(fields[0]) / int(fields[1])
        return None
    except (OSError, ValueError):
        pass
    try:
        quota = int((root / "cpu" / "cpu.cfs_quota_us").read_text())
        period = int((root / "cpu" / "cpu.cfs_period_us").read_text())
    except (OSError, ValueError):
        return None
    return quota / period if quota > 0 and period > 0 else None


def usable_cpus(root: Path = CGROUP_ROOT) -> int:
    """CPUs this process may run on: its affinity mask, capped by the cgroup quota (rounded up), at least 1."""
    visible = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    quota = cgroup_cpu_quota(root)
    if quota is not None:
        visible = min(visible, math.ceil(quota))
    return max(1, visible)


def configure_threads(threads: int | None = None) -> int:
    """Set torch's intra-op threads and return the count in effect.

    ``threads`` sets it explicitly. None keeps torch's choice unless that exceeds :func:`usable_cpus` (and
    ``OMP_NUM_THREADS`` is not set), in which case it is capped.
    """
    if threads is not None:
        if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
            raise ValueError(f"threads must be a positive int or None, got {threads!r}")
        torch.set_num_threads(threads)
    elif "OMP_NUM_THREADS" not in os.environ and torch.get_num_threads() > usable_cpus():
        torch.set_num_threads(usable_cpus())
    return torch.get_num_threads()


ADAPTIVE = "adaptive"


@dataclass
class _Timings:
    """What the tuner knows of one kind of call: smoothed seconds per thread count, and when each was last run."""

    calls: int = 0
    seconds: dict[int, float] = field(default_factory=dict)
    last_run: dict[int, int] = field(default_factory=dict)
    interval: int = 0  # calls between explorations
    next_exploration: int = 0  # the call that explores next (0: not every count measured yet)
    exploring: int | None = None  # the count an exploration runs on, until its time is recorded


class AdaptiveThreads:
    """Runs each call on whichever of a few torch thread counts has lately been the faster for that kind of call.

    Why: the best count depends on the load, not only on the CPU. Beside one other busy process (a browser, another
    visitor's video, a training child) two OpenMP threads on a 2-core machine wait on each other and took 2.7x
    longer than one thread; on an idle machine they were 1.5x faster. So each kind of call (its ``key``: e.g. the
    input's shape) is timed on every count, then runs on the count with the lowest smoothed time, and every
    ``explore_every``-th call runs on the count measured longest ago to notice when the load has changed (its time
    replaces that count's old estimate). An exploration that finds its count still slower doubles the interval to
    the next one, up to ``max_explore_every``, since each costs a slow call (one in 16 at 2.7x is 11% more time);
    a change of the faster count brings the interval back to ``explore_every``.

    The first call of a key is a warm-up (caches, allocations) and is not counted. ``torch.set_num_threads`` is
    process-wide: calls through one tuner should not overlap (the app serialises forward passes anyway); overlapping
    calls only blur the measurements.
    """

    def __init__(
        self,
        *,
        counts: Sequence[int],
        explore_every: int = 16,
        max_explore_every: int = 128,
        smoothing: float = 0.3,
        max_keys: int = 64,
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        if len(counts) < 1 or len(set(counts)) != len(counts):
            raise ValueError(f"counts must be distinct thread counts, got {counts!r}")
        for count in counts:
            if isinstance(count, bool) or not isinstance(count, int) or count < 1:
                raise ValueError(f"thread counts must be positive ints, got {count!r}")
        if explore_every < 2:
            raise ValueError(f"explore_every must be at least 2, got {explore_every}")
        if max_explore_every < explore_every:
            raise ValueError(f"max_explore_every must be at least explore_every, got {max_explore_every}")
        if not 0.0 < smoothing <= 1.0:
            raise ValueError(f"smoothing must be in (0, 1], got {smoothing}")
        if max_keys < 1:
            raise ValueError(f"max_keys must be at least 1, got {max_keys}")
        self.counts = tuple(counts)
        self.explore_every = explore_every
        self.max_explore_every = max_explore_every
        self.smoothing = smoothing
        self.max_keys = max_keys
        self._clock = clock
        self._lock = threading.Lock()
        self._timings: OrderedDict[Hashable, _Timings] = OrderedDict()
        self.last_count: int | None = None  # the count the latest call ran on (for display)

    def estimates(self, key: Hashable) -> dict[int, float]:
        """Smoothed seconds per thread count measured so far for ``key``."""
        with self._lock:
            timings = self._timings.get(key)
            return dict(timings.seconds) if timings is not None else {}

    def _next_count(self, key: Hashable) -> tuple[int, bool]:
        """The count the next call of ``key`` runs on, and whether its time is to be counted."""
        with self._lock:
            timings = self._timings.pop(key, None) or _Timings()
            self._timings[key] = timings  # most recently used last
            while len(self._timings) > self.max_keys:
                self._timings.popitem(last=False)
            timings.calls += 1
            if timings.calls == 1:
                return self.counts[0], False
            best = self._best(timings)
            if best is None:
                return next(count for count in self.counts if count not in timings.seconds), True
            if len(self.counts) > 1 and timings.calls >= timings.next_exploration > 0:
                others = [count for count in self.counts if count != best]
                timings.exploring = min(others, key=lambda count: timings.last_run.get(count, -1))
                return timings.exploring, True
            return best, True

    def _record(self, key: Hashable, count: int, seconds: float) -> None:
        with self._lock:
            timings = self._timings.get(key)
            if timings is None:  # evicted meanwhile
                return
            best_before = self._best(timings)
            previous = timings.seconds.get(count)
            explored = timings.exploring == count
            # An exploration's time replaces its count's estimate outright: that estimate is old by now.
            if previous is None or explored:
                timings.seconds[count] = seconds
            else:
                timings.seconds[count] = previous + self.smoothing * (seconds - previous)
            timings.last_run[count] = timings.calls
            best = self._best(timings)
            if explored:
                timings.exploring = None
            if best is None:
                return
            if best_before is None or best != best_before:
                timings.interval = self.explore_every  # new ground: look again soon
            elif explored:
                timings.interval = min(2 * timings.interval, self.max_explore_every)  # the same answer again
            else:
                return
            timings.next_exploration = timings.calls + timings.interval

    def _best(self, timings: _Timings) -> int | None:
        """The count with the lowest estimate, None until every count has one."""
        if len(timings.seconds) < len(self.counts):
            return None
        return min(self.counts, key=lambda count: timings.seconds[count])

    @contextmanager
    def running(self, key: Hashable) -> Iterator[int]:
        """Run the body on the chosen thread count (yielded) and time it; torch's count is restored afterwards. A
        body that raises is not counted."""
        count, counted = self._next_count(key)
        self.last_count = count
        previous = torch.get_num_threads()
        if count != previous:  # set_num_threads also drops oneDNN's cached computations: only when needed
            torch.set_num_threads(count)
        try:
            started = self._clock()
            yield count
            elapsed = self._clock() - started
        finally:
            if count != previous:
                torch.set_num_threads(previous)
        if counted:
            self._record(key, count, elapsed)


def parse_threads(text: str) -> int | str:
    """A command line's thread setting: a positive whole number, or ``"adaptive"``."""
    if text.strip() == ADAPTIVE:
        return ADAPTIVE
    try:
        count = int(text)
    except ValueError:
        count = 0
    if count < 1:
        raise ValueError(f"expected a positive whole number or {ADAPTIVE!r}, got {text!r}")
    return count


def adaptive_threads() -> AdaptiveThreads | None:
    """A tuner between :func:`configure_threads`' count and one thread; None when that count is already one."""
    count = configure_threads(None)
    return AdaptiveThreads(counts=(count, 1)) if count > 1 else None
