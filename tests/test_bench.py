"""The reduced benchmark (``python -m benchmarks --quick``): runs end to end and checks correctness only."""

from __future__ import annotations

import json

import pytest

from benchmarks.__main__ import main
from benchmarks.measure import matched_fraction

pytest.importorskip("transformers")


@pytest.mark.slow
def test_quick_benchmark_runs_and_agrees_with_transformers(tmp_path):
    output = tmp_path / "bench.json"
    assert main(["--quick", "--json", str(output)]) == 0
    results = json.loads(output.read_text())
    assert results["max |logits ours - theirs| fp32"] < 1e-4
    assert results["max |fast - reference| op output"] < 1e-4
    for key in ("forward fp32", "e2e per image, batch 4", "training step (forward + backward + AdamW)",
                "peak memory, train batch 2"):  # fmt: skip
        assert results[key]["ours"] > 0 and results[key]["theirs"] > 0 and results[key]["ratio"] > 0


def test_detection_matching_is_one_to_one_and_label_aware():
    import torch

    reference = {"boxes": torch.tensor([[0.0, 0, 10, 10], [20, 20, 30, 30]]), "labels": torch.tensor([1, 2])}
    same = {"boxes": torch.tensor([[20.0, 20, 30, 30], [0, 0, 10, 10]]), "labels": torch.tensor([2, 1])}
    assert matched_fraction(reference, same) == 1.0
    relabelled = {"boxes": same["boxes"], "labels": torch.tensor([1, 1])}
    assert matched_fraction(reference, relabelled) == 0.5
    duplicate = {"boxes": torch.tensor([[0.0, 0, 10, 10]]), "labels": torch.tensor([1])}
    assert matched_fraction({"boxes": reference["boxes"][:1].repeat(2, 1), "labels": torch.tensor([1, 1])},
                            duplicate) == 0.5  # fmt: skip
    shifted = {"boxes": torch.tensor([[1.0, 0, 11, 10]]), "labels": torch.tensor([1])}
    assert matched_fraction({"boxes": reference["boxes"][:1], "labels": torch.tensor([1])}, shifted) == 0.0


def test_ddetr_bench_forwards_to_the_benchmark_and_product_code_never_imports_transformers():
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    shown = subprocess.run(
        [sys.executable, "-m", "ddetr.bench", "--help"], cwd=root, capture_output=True, text=True, timeout=120
    )
    assert shown.returncode == 0, shown.stderr
    assert "--quick" in shown.stdout and "--json" in shown.stdout
    probe = (
        "import sys, ddetr, finetune, finetune.cli, finetune.evaluate, app_support; "
        "print(sorted(name for name in sys.modules if name.split('.')[0] in ('transformers', 'benchmarks')))"
    )
    imported = subprocess.run([sys.executable, "-c", probe], cwd=root, capture_output=True, text=True, timeout=120)
    assert imported.returncode == 0, imported.stderr
    assert imported.stdout.strip() == "[]"
