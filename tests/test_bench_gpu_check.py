"""``python -m benchmarks.gpu_check``: the GPU machine's one-table check, exercised on CPU (``--cpu-smoke``).

The command runs in a subprocess, as a person runs it; the comparison and table helpers are checked in-process on
tiny CPU inputs (the fast CPU kernel stands in for Triton, a deliberately wrong op must fail).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from benchmarks import gpu_check
from ddetr.ops import ms_deform_attn

REPOSITORY = Path(__file__).resolve().parents[1]
TINY_SHAPES = [(4, 5), (2, 3), (1, 2), (1, 1)]


def _run(*arguments: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "benchmarks.gpu_check", *arguments],
        cwd=REPOSITORY,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_cpu_smoke_prints_every_row_and_writes_the_same_rows_as_json(tmp_path: Path):
    output = tmp_path / "gpu_check.json"
    completed = _run("--cpu-smoke", "--quick", "--json", str(output))
    assert completed.returncode == 0, completed.stdout + completed.stderr
    lines = completed.stdout.splitlines()
    assert lines[0].split() == ["row", "result", "ratio", "limit", "status"]
    rows = lines[2:]
    names = gpu_check.planned_names()
    assert len(rows) == len(names)
    for name, line in zip(names, rows):
        assert line.startswith(name + " "), (name, line)
    printed = dict(zip(names, rows))
    for name in names:
        if (name.startswith("op ") and name != "op shapes") or name.startswith("peak CUDA memory"):
            assert printed[name].endswith("skipped (no CUDA)"), printed[name]
    for name in ("e2e fp32: max |Δ logits| ours vs theirs", "train step bf16 autocast: loss finite"):
        assert printed[name].endswith(" ok") or "skipped (transformers" in printed[name], printed[name]
    assert " ms" in printed["e2e forward bf16 autocast, batch 1: time per image"]
    assert "8x10 4x5 2x3 1x2" in printed["op shapes"]  # the tiny model's levels at 64x80

    report = json.loads(output.read_text(encoding="utf-8"))
    assert [row["name"] for row in report["rows"]] == names
    assert report["failures"] == []
    assert report["setup"]["cpu_smoke"] is True and report["setup"]["size"] == [64, 80]
    statuses = {row["name"]: row["status"] for row in report["rows"]}
    for name, line in printed.items():
        assert line.endswith(statuses[name]), (line, statuses[name])
    assert (
        next(row for row in report["rows"] if row["name"] == "train step bf16 autocast, batch 2: time")["ours_ms"] > 0
    )


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA device")
def test_without_cuda_it_exits_2_with_one_line_unless_cpu_smoke():
    completed = _run("--quick")
    assert completed.returncode == 2
    assert completed.stderr.strip() == "no CUDA device: this check runs on a GPU machine"
    assert completed.stdout == ""


def test_the_comparison_passes_a_correct_op_and_fails_a_wrong_one():
    for dtype in (torch.float32, torch.bfloat16):
        inputs = gpu_check.op_inputs("encoder", TINY_SHAPES, dtype, torch.device("cpu"))
        tolerances = gpu_check.TOLERANCES["fp32" if dtype == torch.float32 else "bf16"]
        compared = gpu_check.compare_with_reference(ms_deform_attn, inputs, tolerances)
        assert set(compared) == set(gpu_check.QUANTITIES)
        assert all(comparison.ok for comparison in compared.values()), compared

    def half_a_pixel_off(value, shapes, locations, weights):
        return ms_deform_attn(value, shapes, locations + 0.5 / torch.tensor(shapes[0][::-1]), weights)

    inputs = gpu_check.op_inputs("decoder", TINY_SHAPES, torch.float32, torch.device("cpu"))
    wrong = gpu_check.compare_with_reference(half_a_pixel_off, inputs, gpu_check.TOLERANCES["fp32"])
    assert not wrong["output"].ok and wrong["output"].max_abs > 1e-2


def test_location_gradients_on_pixel_edges_are_left_out():
    shapes = [(4, 5)]
    # (batch 1, queries 3, heads 1, levels 1, points 1, 2): a pixel centre, one on a column only, one off both
    locations = torch.tensor([[0.5 / 5, 1.5 / 4], [2.5 / 5, 0.3], [0.33, 0.61]]).view(1, 3, 1, 1, 1, 2)
    edges = gpu_check.on_pixel_edges(locations, shapes).view(3, 2)
    assert edges.tolist() == [[True, True], [True, False], [False, False]]


def test_a_failing_section_marks_its_rows_and_the_table_goes_on():
    names = gpu_check.op_check_names("fp32", "encoder")
    table = gpu_check.Table([*names, "after"])

    def broken() -> None:
        table.check(names[0], "abs 0", True, "atol 1")
        raise RuntimeError("out of memory\nmore")

    table.section(names, broken)
    table.add("after", "fine")
    statuses = [row.status for row in table.ordered()]
    assert statuses == ["ok", *["error: RuntimeError: out of memory"] * 3, "info"]
    assert [row.name for row in table.failures()] == names[1:]
    assert table.render().splitlines()[2].startswith(names[0])
