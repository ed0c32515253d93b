"""glibc malloc tuning: freed activations are reused instead of faulted in afresh; bad settings are refused."""

from __future__ import annotations

import subprocess
import sys

import pytest

from ddetr.runtime import allocator

FAULTS = """
import resource, torch
from ddetr.runtime.allocator import keep_freed_memory

def faults():
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(5):
        torch.empty(16 * 2**20).fill_(1.0)  # 64 MB, allocated, touched and freed
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

faults()
default = faults()
applied = keep_freed_memory()
faults()  # grows the heap once
print(applied, default, faults())
"""


@pytest.mark.skipif(allocator._glibc() is None, reason="glibc only")
def test_freed_memory_is_reused_without_page_faults() -> None:
    result = subprocess.run([sys.executable, "-c", FAULTS], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    applied, default, kept = result.stdout.split()
    assert applied == "True"
    # 5 x 64 MB of fresh pages by default (about 80k faults); once the heap has grown, reuse costs next to none
    assert int(default) > 50_000
    assert int(kept) < int(default) / 10


def test_disabled_by_environment_and_bad_thresholds_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(allocator.DISABLE_VARIABLE, "0")
    assert allocator.keep_freed_memory() is False
    for bad in (0, -5, 2**31, 1.5, True):
        with pytest.raises(ValueError, match="threshold"):
            allocator.keep_freed_memory(bad)  # type: ignore[arg-type]
