"""The command lines: ``python -m finetune`` and ``python -m finetune.evaluate``."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import datasets
import pytest

from finetune import cli
from finetune.data.shapes import make_shapes_dataset
from finetune.evaluate import cli as evaluate
from finetune.evaluate.cli import label_mapping
from finetune.run.metrics_log import read_metrics

ROOT = Path(__file__).resolve().parents[1]
HEADLINE = ["map", "map_50", "map_75", "map_small", "map_medium", "map_large", "mar_100"]


pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A dataset folder and a finished 3-step run made through the command line."""
    folder = tmp_path_factory.mktemp("cli")
    datasets.DatasetDict(
        {
            "train": make_shapes_dataset(6, seed=31, image_size=64),
            "test": make_shapes_dataset(3, seed=32, image_size=64),
        }
    ).save_to_disk(folder / "data")
    code = cli.main(["--dataset", str(folder / "data"), "--model", "tiny", "--output-dir", str(folder / "run"),
                     "--max-steps", "3", "--batch-size", "2", "--image-size", "64", "--no-progress", "--log-every", "1",
                     "--validation-fraction", "0.34"])  # fmt: skip
    assert code == 0
    return folder / "data", folder / "run"


def test_training_command_writes_every_output(trained_run: tuple[Path, Path]) -> None:
    _, run = trained_run
    records = read_metrics(run / "metrics.jsonl")
    train = [r for r in records if r["type"] == "train"]
    assert [r["step"] for r in train] == [1, 2, 3] and all("loss" in r for r in train)
    assert any(r["type"] == "eval" for r in records)
    for name in (
        "loss.png",
        "map.png",
        "model/config.json",
        "model/model.safetensors",
        "model/preprocessor_config.json",
        "checkpoints/step-00000003/meta.json",
    ):
        assert (run / name).is_file(), name
    saved = json.loads((run / "train_config.json").read_text())
    assert saved["image_size"] == 64 and saved["max_size"] == 107


def test_help_lists_the_options(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        cli.main(["--help"])
    assert exited.value.code == 0
    text = capsys.readouterr().out
    for flag in (
        "--dataset",
        "--model",
        "--output-dir",
        "--epochs",
        "--max-steps",
        "--batch-size",
        "--lr",
        "--image-size",
        "--seed",
        "--save-every",
        "--eval-every",
        "--resume",
        "--device",
        "--strict",
        "tiny",
        "small",
        "r50",
    ):
        assert flag in text, flag
    assert "backbone learning rate (default: --lr / 10)" in " ".join(text.split())


def test_bad_command_lines_exit_2(
    trained_run: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data, run = trained_run
    assert cli.main(["--dataset", str(data)]) == cli.EXIT_BAD_INPUT
    assert "--output-dir" in capsys.readouterr().err
    assert cli.main(["--resume", "--output-dir", str(tmp_path / "none")]) == cli.EXIT_BAD_INPUT
    assert "nothing to resume" in capsys.readouterr().err
    assert cli.main(["--resume", "--output-dir", str(run), "--lr", "0.5"]) == cli.EXIT_BAD_INPUT
    assert "cannot change ['lr']" in capsys.readouterr().err
    assert cli.main(["--dataset", str(data), "--output-dir", str(tmp_path / "x"), "--model", "huge"]) == 2
    assert cli.main(["--dataset", str(data), "--output-dir", str(run)]) == cli.EXIT_BAD_INPUT


def test_resuming_a_finished_run_is_a_no_op(trained_run: tuple[Path, Path]) -> None:
    _, run = trained_run
    before = read_metrics(run / "metrics.jsonl")
    assert cli.main(["--resume", "--output-dir", str(run), "--no-progress"]) == 0
    after = read_metrics(run / "metrics.jsonl")
    assert [r for r in after if r["type"] != "status"] == [r for r in before if r["type"] != "status"]


def test_evaluate_prints_a_json_last_line(trained_run: tuple[Path, Path], capsys: pytest.CaptureFixture[str]) -> None:
    data, run = trained_run
    assert evaluate.main(["--model", str(run / "model"), "--dataset", str(data)]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert "AP per class" in "\n".join(lines) and "AR @10" in "\n".join(lines)
    metrics = json.loads(lines[-1])
    assert list(metrics) == HEADLINE
    assert all(-1.0 <= value <= 1.0 for value in metrics.values())
    # The validation images the run held out of train, re-created from its settings, give its last evaluation.
    arguments = ["--model", str(run / "model"), "--dataset", str(data), "--split", "validation"]
    assert evaluate.main([*arguments, "--validation-fraction", "0.34"]) == 0
    held_out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    last_eval = read_metrics(run / "metrics.jsonl", kind="eval")[-1]
    assert held_out["map"] == pytest.approx(last_eval["map"], abs=1e-6)
    assert evaluate.main(arguments) == 2


def test_evaluate_command_on_a_saved_dataset_without_splits(trained_run: tuple[Path, Path], tmp_path: Path) -> None:
    _, run = trained_run
    make_shapes_dataset(3, seed=40, image_size=64).save_to_disk(tmp_path / "flat")
    environment = {
        **os.environ,
        "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
        "OMP_NUM_THREADS": "1",
    }
    result = subprocess.run(
        [sys.executable, "-m", "finetune.evaluate", "--model", str(run / "model"), "--dataset", str(tmp_path / "flat"),
         "--batch-size", "3"],
        env=environment, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    assert list(json.loads(result.stdout.strip().splitlines()[-1])) == HEADLINE
    missing = subprocess.run(
        [sys.executable, "-m", "finetune.evaluate", "--model", str(run / "model"), "--dataset", str(tmp_path / "flat"),
         "--split", "test"],
        env=environment, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert missing.returncode == 2 and "no 'test' split" in missing.stderr


def test_labels_are_matched_by_name() -> None:
    assert label_mapping({0: "a", 1: "b", 2: "c"}, ["c", "a"]) == {2: 0, 0: 1}
    with pytest.warns(UserWarning, match="by position"):
        assert label_mapping({0: "LABEL_0", 1: "LABEL_1"}, ["x", "y"]) == {0: 0, 1: 1}
    with pytest.raises(ValueError, match="cannot be matched"):
        label_mapping({0: "a"}, ["x", "y"])
