"""The video and live-webcam benchmarks: the quick video run works end to end, and both command lines answer --help.

The live benchmark needs Chromium and streams for real, so only its --help is run here.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

pytest.importorskip("av")


def run_module(*arguments: str, timeout: float) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", *arguments], cwd=ROOT, capture_output=True, text=True, timeout=timeout, check=False
    )


@pytest.mark.slow
def test_quick_video_benchmark_reports_throughput_and_where_the_time_goes(tmp_path: Path):
    output = tmp_path / "video.json"
    completed = run_module("benchmarks.video", "--quick", "--skip", "r50", "--json", str(output), timeout=300)
    assert completed.returncode == 0, completed.stderr[-3000:]
    results = json.loads(output.read_text())
    assert results["setup"]["torch_threads"] == 2 and results["setup"]["cpu"]
    shapes = results["shapes"]
    assert shapes["fps"] > 0 and shapes["annotate_video"]["fps"] > 0
    assert shapes["annotate_video"]["frames"] == shapes["clip"]["frames"]
    assert shapes["batch_sizes"] and all(fps > 0 for fps in shapes["batch_sizes"].values())
    assert shapes["precision"] in ("fp32", "bf16")
    stages = shapes["stages"]
    for stage in ("decode", "preprocess+model", "track", "draw", "encode"):
        assert stages[stage]["ms_per_frame"] > 0, stage
    assert sum(row["percent"] for row in stages.values()) == pytest.approx(100.0, abs=0.5)
    assert "r50" not in results
    assert "where the time goes" in completed.stdout


@pytest.mark.parametrize("module", ["benchmarks.video", "benchmarks.live_webcam", "benchmarks.shared_load"])
def test_benchmark_help(module: str):
    completed = run_module(module, "--help", timeout=120)
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert "--json" in completed.stdout
