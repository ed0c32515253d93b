"""A dataset is validated once per run: a run validates each split once, a run handed prepared data validates
nothing more, and data prepared from another source or with other settings is refused before anything is written."""

from __future__ import annotations

import shutil
from pathlib import Path

import datasets
import pytest

from finetune import cli
from finetune.api import prepare_dataset, start_run
from finetune.config import TrainConfig
from finetune.data.shapes import make_shapes_dataset
from finetune.run.launch import run_training

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("prepared") / "data"
    datasets.DatasetDict(
        {"train": make_shapes_dataset(4, seed=41, image_size=64), "validation": make_shapes_dataset(2, seed=42)}
    ).save_to_disk(folder)
    return folder


def _config(data_dir: Path, output: Path, **overrides: object) -> TrainConfig:
    settings: dict = {
        "dataset": str(data_dir),
        "model": "tiny",
        "output_dir": str(output),
        "max_steps": 1,
        "batch_size": 2,
        "image_size": 64,
        "augment": "none",
        "eval_every": 0,
        "save_every": 0,
        "progress": False,
    }
    return TrainConfig(**{**settings, **overrides})


def test_a_command_line_run_validates_each_split_once(data_dir: Path, tmp_path: Path, validations: list) -> None:
    arguments = ["--dataset", str(data_dir), "--model", "tiny", "--output-dir", str(tmp_path / "run"), "--max-steps",
                 "1", "--batch-size", "2", "--image-size", "64", "--eval-every", "0", "--no-progress"]  # fmt: skip
    assert cli.main(arguments) == 0
    assert len(validations) == 2  # train and validation, once each


def test_a_run_handed_prepared_data_validates_nothing_more(data_dir: Path, tmp_path: Path, validations: list) -> None:
    config = _config(data_dir, tmp_path / "direct")
    data = prepare_dataset(config)
    assert len(validations) == 2 and data.settings.source == str(data_dir)
    assert run_training(config, data=data).state == "finished"
    assert len(validations) == 2

    # Through the API's background run as well; and the run trains on exactly the data it was handed.
    config = _config(data_dir, tmp_path / "api")
    data = prepare_dataset(config)
    run = start_run(config, data=data)
    run.wait(timeout=120)
    assert run.state == "finished", run.error
    assert len(validations) == 4
    assert (tmp_path / "api" / "validation_report.json").is_file()


@pytest.mark.parametrize(
    "prepared_with",
    [{"seed": 1}, {"strict": True}, {"validation_fraction": 0.3}, {"dataset": "copy"}],
    ids=lambda overrides: next(iter(overrides)),
)
def test_data_prepared_with_other_settings_is_refused(
    data_dir: Path, tmp_path: Path, prepared_with: dict[str, object]
) -> None:
    config = _config(data_dir, tmp_path / "run")
    if prepared_with.get("dataset") == "copy":
        shutil.copytree(data_dir, tmp_path / "copy")
        prepared_with = {"dataset": str(tmp_path / "copy")}
    data = prepare_dataset(config.with_overrides(**prepared_with))
    setting = next(iter(prepared_with))
    with pytest.raises(
        ValueError, match=f"does not fit the run's settings.*{'source' if setting == 'dataset' else setting}"
    ):
        run_training(config, data=data)
    assert not (tmp_path / "run").exists()  # refused before anything was written
    run = start_run(config, data=data)
    run.wait(timeout=60)
    assert run.state == "failed" and isinstance(run.error, ValueError) and not (tmp_path / "run").exists()
