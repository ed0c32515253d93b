"""Thread configuration: cgroup quotas are read (v1 and v2), explicit settings win, bad values are refused."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from ddetr.runtime import threads


def write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def test_cgroup_quota_v2_v1_and_unlimited(tmp_path: Path) -> None:
    v2 = tmp_path / "v2"
    write(v2 / "cpu.max", "150000 100000\n")
    assert threads.cgroup_cpu_quota(v2) == pytest.approx(1.5)
    write(v2 / "cpu.max", "max 100000\n")
    assert threads.cgroup_cpu_quota(v2) is None
    v1 = tmp_path / "v1"
    write(v1 / "cpu" / "cpu.cfs_quota_us", "200000\n")
    write(v1 / "cpu" / "cpu.cfs_period_us", "100000\n")
    assert threads.cgroup_cpu_quota(v1) == pytest.approx(2.0)
    write(v1 / "cpu" / "cpu.cfs_quota_us", "-1\n")
    assert threads.cgroup_cpu_quota(v1) is None
    assert threads.cgroup_cpu_quota(tmp_path / "missing") is None
    write(tmp_path / "garbled" / "cpu.max", "lots\n")
    assert threads.cgroup_cpu_quota(tmp_path / "garbled") is None


def test_usable_cpus_is_capped_by_the_quota(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(threads.os, "sched_getaffinity", lambda pid: set(range(16)), raising=False)
    write(tmp_path / "cpu.max", "150000 100000\n")
    assert threads.usable_cpus(tmp_path) == 2
    write(tmp_path / "cpu.max", "max 100000\n")
    assert threads.usable_cpus(tmp_path) == 16


def test_configure_threads_caps_explicit_and_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    before = torch.get_num_threads()
    try:
        assert threads.configure_threads(1) == 1 and torch.get_num_threads() == 1
        monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
        monkeypatch.setattr(threads, "usable_cpus", lambda root=threads.CGROUP_ROOT: 1)
        torch.set_num_threads(2)
        assert threads.configure_threads() == 1
        monkeypatch.setenv("OMP_NUM_THREADS", "2")
        torch.set_num_threads(2)
        assert threads.configure_threads() == 2  # the user's explicit choice stands
        for bad in (0, -1, 1.5, True, "2"):
            with pytest.raises(ValueError, match="threads"):
                threads.configure_threads(bad)  # type: ignore[arg-type]
    finally:
        torch.set_num_threads(before)
