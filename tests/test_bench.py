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
    # The floor columns: MACs counted, rates measured, each timed row a multiple of its floor.
    assert results["setup"]["cpu"] and results["setup"]["bf16"]
    assert results["macs"]["train"]["matmul"] > 2 * results["macs"]["forward"]["matmul"] > 0
    assert all(rate > 0 for rates in results["gemm_rates"].values() for rate in rates.values())
    for key in ("forward fp32", "forward bf16 (vs theirs fp32)", "training step (forward + backward + AdamW)",
                "training step bf16 autocast (vs theirs fp32)"):  # fmt: skip
        row = results[key]
        assert row["floor_multiple"] == pytest.approx(row["ours"] / row["floor"]) and row["floor"] > 0
    assert results["kernels"]["linear/fp32-inference"]["option"] in ("onednn", "aten")


def test_macs_are_counted_as_the_layers_define_them():
    import torch
    import torch.nn.functional as F

    from benchmarks.floor import count_macs
    from ddetr.ops.conv import conv2d
    from ddetr.ops.linear import linear

    x = torch.randn(5, 7, 16)
    weight, bias = torch.randn(32, 16), torch.randn(32)
    image, kernel = torch.randn(2, 3, 10, 12), torch.randn(8, 3, 3, 3)
    query = torch.randn(1, 2, 6, 4)

    def forward() -> None:
        with torch.inference_mode():
            linear(x, weight, bias)  # oneDNN's op where it is chosen, else aten's linear: counted either way
            F.linear(x, weight, bias)
            F.conv2d(image, kernel, padding=1)  # in inference mode: aten's oneDNN convolution itself
            conv2d(image, kernel, None, stride=(1, 1), padding=(1, 1), dilation=(1, 1), groups=1, relu=True)
            # With a residual sum (oneDNN's op takes the residual before the weight where the fusion is chosen).
            conv2d(image, kernel, None, stride=(1, 1), padding=(1, 1), dilation=(1, 1), groups=1, relu=True,
                   residual=torch.ones(2, 8, 10, 12))  # fmt: skip
            F.scaled_dot_product_attention(query, query, query)

    counted = count_macs(forward)
    assert counted.matmul == 2 * (5 * 7 * 16 * 32) + 2 * 6 * 6 * (4 + 4)
    assert counted.convolution == 3 * (2 * 10 * 12 * 8 * 3 * 3 * 3)

    leaf, frozen_input, trained_input = weight.clone().requires_grad_(), x.clone(), x.clone().requires_grad_()

    # Backward: the weight gradient is one more GEMM, and the input gradient another where the input needs one.
    assert count_macs(lambda: F.linear(frozen_input, leaf, bias).sum().backward()).matmul == 2 * 5 * 7 * 16 * 32
    assert count_macs(lambda: F.linear(trained_input, leaf, bias).sum().backward()).matmul == 3 * 5 * 7 * 16 * 32


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


def test_the_benchmark_has_a_command_line_and_product_code_never_imports_it_or_transformers():
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    shown = subprocess.run(
        [sys.executable, "-m", "benchmarks", "--help"], cwd=root, capture_output=True, text=True, timeout=120
    )
    assert shown.returncode == 0, shown.stderr
    assert "--quick" in shown.stdout and "--json" in shown.stdout
    # Every module of the product, imported for real: none may pull in the oracle or the benchmark code.
    probe = (
        "import importlib, pkgutil, sys, ddetr, finetune, app_support\n"
        "for package in (ddetr, finetune, app_support):\n"
        "    for info in pkgutil.walk_packages(package.__path__, package.__name__ + '.'):\n"
        "        if not info.name.endswith('__main__'):\n"
        "            importlib.import_module(info.name)\n"
        "print(sorted(name for name in sys.modules if name.split('.')[0] in ('transformers', 'benchmarks', 'tests')))"
    )
    imported = subprocess.run([sys.executable, "-c", probe], cwd=root, capture_output=True, text=True, timeout=300)
    assert imported.returncode == 0, imported.stderr
    assert imported.stdout.strip() == "[]"


def test_library_layers_import_only_downwards():
    """ddetr imports nothing of ours but ddetr; finetune only ddetr and finetune (app -> engine -> model)."""
    import ast
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    allowed = {"ddetr": {"ddetr"}, "finetune": {"ddetr", "finetune"}}
    ours = {"ddetr", "finetune", "app_support", "app", "benchmarks", "tests"}
    offences = []
    for package, may_import in allowed.items():
        for path in sorted((root / package).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
                if isinstance(node, ast.Import):
                    names = [alias.name for alias in node.names]
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    names = [node.module]
                else:
                    continue
                for name in names:
                    top = name.split(".")[0]
                    if top in ours and top not in may_import:
                        offences.append(f"{path.relative_to(root)} imports {name}")
    assert offences == []
