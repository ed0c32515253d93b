"""Training end to end on the tiny preset: overfitting, non-finite steps, divergence, stop and exact resume,
outputs loadable by ddetr and transformers."""

from __future__ import annotations

import json
import math
import threading
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from ddetr import DeformableDetrForObjectDetection
from finetune.api import read_run, resume_run, start_run
from finetune.config import TrainConfig
from finetune.data.shapes import make_shapes_dataset
from finetune.presets import build_model, preset_config
from finetune.run.checkpoints import latest_checkpoint, load_checkpoint, save_checkpoint
from finetune.run.launch import run_training
from finetune.run.metrics_log import read_metrics

IMAGE_SIZE = 64


pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def shapes_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("shapes")
    datasets.DatasetDict(
        {
            "train": make_shapes_dataset(8, seed=21, image_size=IMAGE_SIZE),
            "validation": make_shapes_dataset(4, seed=22, image_size=IMAGE_SIZE),
        }
    ).save_to_disk(folder)
    return folder


def _config(dataset: Path | str, output: Path, **overrides: object) -> TrainConfig:
    settings: dict = {
        "dataset": str(dataset),
        "model": "tiny",
        "output_dir": str(output),
        "batch_size": 2,
        "image_size": IMAGE_SIZE,
        "augment": "flip",
        "log_every": 1,
        "eval_every": 0,
        "save_every": 0,
        "progress": False,
        "max_steps": 8,
    }
    settings.update(overrides)
    return TrainConfig(**settings)


def _weights(directory: Path) -> dict[str, torch.Tensor]:
    return load_file(str(directory / "model" / "model.safetensors"))


def test_tiny_model_overfits_a_handful_of_images(tmp_path: Path) -> None:
    images = make_shapes_dataset(3, seed=7, image_size=IMAGE_SIZE)
    datasets.DatasetDict({"train": images, "validation": images}).save_to_disk(tmp_path / "data")
    config = _config(
        tmp_path / "data",
        tmp_path / "run",
        max_steps=100,
        batch_size=3,
        lr=2e-3,
        lr_backbone=2e-3,
        augment="none",
        lr_drop=1.0,
        log_every=10,
    )
    result = run_training(config)
    losses = [record["loss"] for record in read_metrics(tmp_path / "run" / "metrics.jsonl", kind="train")]
    assert result.state == "finished"
    assert losses[-1] < 0.25 * losses[0], losses
    # Chance is ~0: random boxes almost never reach IoU 0.5 with the right class among 6.
    assert result.metrics["map_50"] > 0.6, result.metrics
    assert result.metrics["map"] > 0.3


def _nan_forward(
    monkeypatch: pytest.MonkeyPatch, poisoned_calls: set[int], snapshots: dict[int, dict], poison: str
) -> None:
    """Poison the training forward passes ``poisoned_calls``: a NaN ``loss``, or NaN ``predictions`` (the class
    head's bias for that call only), which the matcher refuses with NonFinitePredictionError."""
    original = DeformableDetrForObjectDetection.forward
    calls = {"count": 0}

    def forward(self, pixel_values, pixel_mask=None, labels=None, **kwargs):
        if labels is None:
            return original(self, pixel_values, pixel_mask, labels, **kwargs)
        calls["count"] += 1
        snapshots[calls["count"]] = {k: v.detach().clone() for k, v in self.state_dict().items()}
        if calls["count"] in poisoned_calls and poison == "predictions":
            bias = self.class_embed[-1].bias
            kept = bias.detach().clone()
            with torch.no_grad():
                bias.fill_(float("nan"))
            try:
                return original(self, pixel_values, pixel_mask, labels, **kwargs)
            finally:
                with torch.no_grad():
                    bias.copy_(kept)
        outputs = original(self, pixel_values, pixel_mask, labels, **kwargs)
        if calls["count"] in poisoned_calls:
            outputs.loss = outputs.loss * float("nan")
        return outputs

    monkeypatch.setattr(DeformableDetrForObjectDetection, "forward", forward)


@pytest.mark.parametrize("poison", ["loss", "predictions"])
def test_non_finite_step_is_skipped_and_repeated_divergence_stops_the_run(
    shapes_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, poison: str
) -> None:
    snapshots: dict[int, dict] = {}
    _nan_forward(monkeypatch, {4, 6, 7, 8}, snapshots, poison)
    result = run_training(_config(shapes_dir, tmp_path, max_steps=20, save_every=5))
    assert result.state == "diverged" and result.step == 8
    # Why the last step was skipped: the loss itself, or the matcher refusing NaN predictions (by its type).
    assert f"(last: non-finite {poison}" in result.message, result.message
    # Step 4 was skipped: the weights entering step 5 are those that entered step 4, bit for bit.
    for name, value in snapshots[4].items():
        assert torch.equal(value, snapshots[5][name]), name
    assert any(not torch.equal(snapshots[2][n], snapshots[3][n]) for n in snapshots[2])
    records = {r["step"]: r for r in read_metrics(tmp_path / "metrics.jsonl", kind="train")}
    assert records[4]["skipped_steps"] == 1 and records[5]["skipped_steps"] == 1
    assert records[4]["loss"] is None and math.isfinite(records[5]["loss"])
    status = read_run(tmp_path)["status"]
    assert status["state"] == "diverged" and "step 5" in status["message"]
    # The last good checkpoint is intact, loads, and holds only finite numbers.
    info = latest_checkpoint(tmp_path / "checkpoints")
    assert info is not None and info.step == 5
    model = DeformableDetrForObjectDetection(preset_config("tiny", ["x"] * 0 + _class_names(shapes_dir)))
    state = load_checkpoint(info, model)
    assert all(torch.isfinite(p).all() for p in model.state_dict().values())
    assert state["skipped_steps"] == 1
    assert not (tmp_path / "model").exists()


def _class_names(folder: Path) -> list[str]:
    return datasets.load_from_disk(str(folder))["train"].features["objects"]["category"].feature.names


def test_stop_takes_effect_within_one_step_and_resume_is_exact(shapes_dir: Path, tmp_path: Path) -> None:
    reference = run_training(_config(shapes_dir, tmp_path / "straight", max_steps=12, save_every=4))
    assert reference.state == "finished"

    run = start_run(_config(shapes_dir, tmp_path / "stopped", max_steps=12, save_every=4))
    seen_at_stop = None
    for record in run.stream(timeout=120):
        if record["type"] == "train" and record["step"] >= 3:
            run.stop()
            seen_at_stop = max(r["step"] for r in run.records(kind="train"))
            break
    result = run.wait(timeout=120)
    assert run.state == "stopped" and result is not None
    assert seen_at_stop is not None and result.step <= seen_at_stop + 1
    assert latest_checkpoint(tmp_path / "stopped" / "checkpoints").step == result.step
    assert read_run(tmp_path / "stopped")["status"]["state"] == "stopped"

    resumed = resume_run(tmp_path / "stopped")
    resumed.wait(timeout=300)
    assert resumed.state == "finished", resumed.error
    straight, again = _weights(tmp_path / "straight"), _weights(tmp_path / "stopped")
    assert straight.keys() == again.keys()
    for name in straight:
        assert torch.equal(straight[name], again[name]), name
    losses = {r["step"]: r["loss"] for r in read_metrics(tmp_path / "straight" / "metrics.jsonl", kind="train")}
    resumed_losses = {r["step"]: r["loss"] for r in read_metrics(tmp_path / "stopped" / "metrics.jsonl", kind="train")}
    assert losses == resumed_losses


def test_outputs_and_export_load_in_ddetr_and_transformers(shapes_dir: Path, tmp_path: Path) -> None:
    records = []
    result = run_training(_config(shapes_dir, tmp_path, max_steps=4, eval_every=1), on_record=records.append)
    assert result.state == "finished"
    for name in ("metrics.jsonl", "loss.png", "map.png", "train_config.json", "status.json", "validation_report.json"):
        assert (tmp_path / name).is_file(), name
    assert {"config.json", "model.safetensors", "preprocessor_config.json"} <= {
        p.name for p in (tmp_path / "model").iterdir()
    }
    train = [r for r in records if r["type"] == "train"]
    assert [r["step"] for r in train] == [1, 2, 3, 4] and all(math.isfinite(r["loss"]) for r in train)
    evals = [r for r in records if r["type"] == "eval"]
    assert evals and {"map", "map_50", "map_75", "mar_100", "per_class_ap"} <= set(evals[-1])
    assert records[-1] == {**records[-1], "type": "status", "state": "finished"}
    assert read_metrics(tmp_path / "metrics.jsonl") == json.loads(json.dumps(records))

    ours = DeformableDetrForObjectDetection.from_pretrained(tmp_path / "model")
    assert ours.config.id2label == dict(enumerate(_class_names(shapes_dir)))
    transformers = pytest.importorskip("transformers")
    theirs = transformers.DeformableDetrForObjectDetection.from_pretrained(tmp_path / "model").eval()
    processor = transformers.AutoImageProcessor.from_pretrained(tmp_path / "model", backend="pil")
    assert processor.size["shortest_edge"] == IMAGE_SIZE
    pixels = torch.randn(1, 3, IMAGE_SIZE, IMAGE_SIZE, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected, actual = ours(pixels), theirs(pixel_values=pixels)
    torch.testing.assert_close(actual.logits, expected.logits, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(actual.pred_boxes, expected.pred_boxes, atol=1e-4, rtol=1e-4)


def test_ema_accumulation_cosine_and_bf16_run(shapes_dir: Path, tmp_path: Path) -> None:
    config = _config(
        shapes_dir,
        tmp_path,
        max_steps=4,
        ema=True,
        ema_decay=0.9,
        grad_accum_steps=2,
        lr_schedule="cosine",
        warmup_steps=2,
        precision="bf16",
        augment="paper",
        save_every=2,
        num_workers=1,
    )
    result = run_training(config)
    assert result.state == "finished"
    losses = [r["loss"] for r in read_metrics(tmp_path / "metrics.jsonl", kind="train")]
    assert len(losses) == 4 and all(math.isfinite(v) for v in losses)
    state = torch.load(latest_checkpoint(tmp_path / "checkpoints").path / "train_state.pt", weights_only=True)
    assert state["ema"]["updates"] == 4
    exported = _weights(tmp_path)
    shadow = state["ema"]["shadow"]
    assert any(torch.equal(exported[name], shadow[name]) for name in exported if name in shadow)
    lrs = [r["lr"] for r in read_metrics(tmp_path / "metrics.jsonl", kind="train")]
    assert lrs[0] < lrs[1] and lrs[-1] < lrs[1]  # warm-up, then cosine decay


def test_training_on_a_dataset_with_bad_annotations_stays_finite(tmp_path: Path, write_bad_coco) -> None:
    path = write_bad_coco(tmp_path / "data")
    result = run_training(_config(path, tmp_path / "run", max_steps=20, validation_fraction=0.0, augment="paper"))
    losses = [r["loss"] for r in read_metrics(tmp_path / "run" / "metrics.jsonl", kind="train")]
    assert result.state == "finished" and len(losses) == 20 and all(math.isfinite(v) for v in losses)
    report = json.loads((tmp_path / "run" / "validation_report.json").read_text())
    assert report[0]["counts"]["non_finite"] == 3


def test_run_directory_guards(shapes_dir: Path, tmp_path: Path) -> None:
    run_training(_config(shapes_dir, tmp_path, max_steps=2))
    with pytest.raises(ValueError, match="already holds a training run"):
        run_training(_config(shapes_dir, tmp_path, max_steps=2))
    assert read_run(tmp_path)["status"]["state"] == "finished"  # the refused start left the old run alone
    with pytest.raises(ValueError, match="keep its settings"):
        run_training(_config(shapes_dir, tmp_path, max_steps=3, resume=True))
    with pytest.raises(ValueError, match="nothing to resume"):
        resume_run(tmp_path / "elsewhere")


def test_a_failing_run_reports_failed(tmp_path: Path) -> None:
    run = start_run(_config(tmp_path / "no-such-dataset", tmp_path / "run"))
    run.wait(timeout=60)
    assert run.state == "failed" and isinstance(run.error, ValueError)


def test_stop_before_the_first_step_saves_a_resumable_checkpoint(shapes_dir: Path, tmp_path: Path) -> None:
    stop = threading.Event()
    stop.set()
    result = run_training(_config(shapes_dir, tmp_path, max_steps=3), stop_event=stop)
    assert result.state == "stopped" and result.step == 0
    assert latest_checkpoint(tmp_path / "checkpoints").step == 0
    finished = resume_run(tmp_path)
    finished.wait(timeout=120)
    assert finished.state == "finished" and finished.result.step == 3


def test_saving_the_same_step_twice_keeps_one_checkpoint(tmp_path: Path) -> None:
    model = DeformableDetrForObjectDetection(preset_config("tiny", ["a"]))
    first = save_checkpoint(tmp_path, step=3, epoch=0, model=model, train_state={"step": 3})
    second = save_checkpoint(tmp_path, step=3, epoch=0, model=model, train_state={"step": 3})
    assert first == second and len([p for p in tmp_path.iterdir()]) == 1
    np.testing.assert_array_equal(
        sorted(p.name for p in first.iterdir()), ["meta.json", "model.safetensors", "train_state.pt"]
    )


def test_fine_tuning_a_checkpoint_keeps_or_reinitialises_the_class_heads(
    shapes_dir: Path, tmp_path: Path, write_bad_coco
) -> None:
    run_training(_config(shapes_dir, tmp_path / "base", max_steps=2))
    source = str(tmp_path / "base" / "model")
    base = DeformableDetrForObjectDetection.from_pretrained(source)
    names = _class_names(shapes_dir)

    same = build_model(source, names)
    assert not same.from_scratch and same.default_image_size == IMAGE_SIZE
    assert same.model.config.auxiliary_loss
    for (name, value), (_, expected) in zip(same.model.state_dict().items(), base.state_dict().items()):
        assert torch.equal(value, expected), name

    other = build_model(source, ["cat", "dog"])
    assert other.model.config.id2label == {0: "cat", 1: "dog"}
    assert other.model.class_embed[0].weight.shape[0] == 2
    torch.testing.assert_close(other.model.model.backbone.state_dict(), base.model.backbone.state_dict())

    # A run started from the checkpoint trains on the new classes and exports them.
    result = run_training(_config(write_bad_coco(tmp_path / "coco"), tmp_path / "tuned", model=source, max_steps=2,
                                  validation_fraction=0.0))  # fmt: skip
    assert result.state == "finished"
    tuned = DeformableDetrForObjectDetection.from_pretrained(tmp_path / "tuned" / "model")
    assert tuned.config.id2label == {0: "thing", 1: "other"}
    with pytest.raises(ValueError, match="neither a preset"):
        build_model("tinyy", names)
