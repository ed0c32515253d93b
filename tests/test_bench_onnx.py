"""The reduced ONNX benchmark (``python -m benchmarks.onnx_runtime --quick``) runs end to end and prints its table."""

from __future__ import annotations

import pytest

from benchmarks.onnx_runtime import main

pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")
pytest.importorskip("transformers")


def test_quick_onnx_benchmark_prints_the_ratio_rows(capsys: pytest.CaptureFixture[str]):
    assert main(["--quick"]) == 0
    printed = capsys.readouterr().out
    assert "export:" in printed and " MB " in printed
    for size in ("128x160", "96x128"):
        table = printed.split(f"== {size}")[1].split("\n==")[0]
        assert "vs ddetr fp32" in table and "vs transformers" in table
        for candidate in ("onnxruntime", "ddetr fp32", "ddetr bf16", "transformers fp32", "onnxruntime spinning"):
            row = next(line for line in table.splitlines() if line.rsplit(maxsplit=3)[0].strip() == candidate)
            seconds, *ratios = (float(value) for value in row.split()[-3:])
            assert seconds > 0 and all(ratio > 0 for ratio in ratios), row
        logits = next(line for line in table.splitlines() if "max |logits onnxruntime - ddetr fp32|" in line)
        assert logits.split()[-1] == "ok" and float(logits.split()[-2]) < 1e-3, logits
