"""How many CPU threads torch uses: never more than the CPUs this process may actually run on.

A container (a Hugging Face Space among them) can show every CPU of its host while a cgroup quota lets it use
two. torch starts one thread per visible CPU, and threads beyond the quota only wait on each other: on a shared
2-core machine, oversubscribed threads made our kernels several times slower. :func:`configure_threads` caps the
count at the affinity mask and the cgroup quota, and leaves an explicit ``OMP_NUM_THREADS`` alone.
"""

from __future__ import annotations

import math
import os
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
