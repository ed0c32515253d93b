"""torchrun: a 2-process gloo run completes (training and sharded evaluation) and matches a 1-process run with the
same global batch and data order."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import datasets
import pytest
import torch
from safetensors.torch import load_file

from finetune.data.shapes import make_shapes_dataset
from finetune.run.metrics_log import read_metrics

ROOT = Path(__file__).resolve().parents[1]
COMMON = [
    "--model", "tiny", "--max-steps", "6", "--image-size", "64", "--augment", "flip", "--log-every", "1",
    "--eval-every", "1", "--save-every", "3", "--no-progress", "--seed", "3", "--device", "cpu",
    # float32: the default (auto) trains in bf16 on CPUs with AVX512-BF16 or AMX, where each process's weight
    # gradients are rounded to bf16 before they are averaged, so two half batches cannot match one whole batch.
    "--precision", "fp32",
]  # fmt: skip


def _run(command: list[str]) -> subprocess.CompletedProcess:
    environment = {
        **os.environ,
        "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
        "OMP_NUM_THREADS": "1",
    }
    result = subprocess.run(command, env=environment, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


@pytest.mark.slow
def test_two_process_gloo_run_matches_one_process(tmp_path: Path) -> None:
    datasets.DatasetDict(
        {
            "train": make_shapes_dataset(12, seed=4, image_size=64),
            "validation": make_shapes_dataset(5, seed=5, image_size=64),
        }
    ).save_to_disk(tmp_path / "data")
    dataset = ["--dataset", str(tmp_path / "data")]
    single = [sys.executable, "-m", "finetune", *dataset, "--output-dir", str(tmp_path / "one"), "--batch-size", "4"]
    _run([*single, *COMMON])
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    double = ["-m", "finetune", *dataset, "--output-dir", str(tmp_path / "two"), "--batch-size", "2"]
    _run([*launcher, *double, *COMMON])

    one, two = (load_file(str(tmp_path / name / "model" / "model.safetensors")) for name in ("one", "two"))
    assert one.keys() == two.keys()
    for name in one:
        torch.testing.assert_close(
            two[name], one[name], atol=2e-5, rtol=1e-4, msg=lambda text, name=name: f"{name}: {text}"
        )
    losses = {
        name: [r["loss"] for r in read_metrics(tmp_path / name / "metrics.jsonl", kind="train")]
        for name in ("one", "two")
    }
    assert len(losses["two"]) == 6
    assert losses["two"] == pytest.approx(losses["one"], rel=1e-4)
    # Evaluation ran sharded over both processes and covered every validation image once.
    evaluations = {name: read_metrics(tmp_path / name / "metrics.jsonl", kind="eval") for name in ("one", "two")}
    assert [e["images"] for e in evaluations["two"]] == [5] * len(evaluations["one"])
    assert evaluations["two"][-1]["map"] == pytest.approx(evaluations["one"][-1]["map"], abs=1e-3)
    # Only rank 0 wrote: one final model, one set of checkpoints.
    assert sorted(p.name for p in (tmp_path / "two" / "checkpoints").iterdir()) == ["step-00000003", "step-00000006"]
