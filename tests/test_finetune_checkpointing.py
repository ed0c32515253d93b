"""Checkpoints: exact round trip, atomic writes (a crash at any stage never yields a 'complete' checkpoint), pruning,
safe loading."""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

import numpy as np
import pytest
import torch

import finetune.run.checkpoints as checkpointing
from ddetr import DeformableDetrForObjectDetection
from finetune.presets import preset_config
from finetune.run.checkpoints import (
    TrainingCheckpointError,
    capture_rng_state,
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    restore_rng_state,
    save_checkpoint,
)

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def trained() -> tuple[DeformableDetrForObjectDetection, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = DeformableDetrForObjectDetection(preset_config("tiny", ["a", "b"]))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    boxes = torch.tensor([[0.3, 0.3, 0.2, 0.2], [0.6, 0.5, 0.3, 0.4]])
    labels = [{"class_labels": torch.tensor([0, 1]), "boxes": boxes}]
    model(torch.randn(1, 3, 64, 64), torch.ones(1, 64, 64, dtype=torch.long), labels=labels).loss.backward()
    optimizer.step()
    return model, optimizer


def _fresh() -> DeformableDetrForObjectDetection:
    torch.manual_seed(123)
    return DeformableDetrForObjectDetection(preset_config("tiny", ["a", "b"]))


def test_round_trip_is_exact(tmp_path: Path, trained) -> None:
    model, optimizer = trained
    path = save_checkpoint(
        tmp_path, step=7, epoch=1, model=model, train_state={"step": 7, "optimizer": optimizer.state_dict()}
    )
    assert path.name == "step-00000007"
    info = latest_checkpoint(tmp_path)
    assert info is not None and (info.step, info.epoch) == (7, 1)
    restored = _fresh()
    state = load_checkpoint(info, restored)
    for (name, a), (_, b) in zip(model.state_dict().items(), restored.state_dict().items()):
        assert torch.equal(a, b), name
    original = optimizer.state_dict()["state"]
    for key, values in state["optimizer"]["state"].items():
        for name, value in values.items():
            assert torch.equal(value, original[key][name])
    # Tied heads stay tied after loading.
    assert restored.class_embed[0].weight.data_ptr() == restored.class_embed[1].weight.data_ptr()


def test_rng_states_are_restored(tmp_path: Path) -> None:
    torch.manual_seed(5)
    np.random.seed(5)
    random.seed(5)
    state = capture_rng_state()
    expected = (torch.rand(3), np.random.rand(3), random.random())
    path = tmp_path / "rng.pt"
    torch.save(state, path)
    torch.manual_seed(99)
    np.random.seed(99)
    random.seed(99)
    restore_rng_state(torch.load(path, weights_only=True))
    assert torch.equal(torch.rand(3), expected[0])
    assert np.array_equal(np.random.rand(3), expected[1])
    assert random.random() == expected[2]


@pytest.mark.parametrize("stage", ["model", "state", "meta", "rename"])
def test_a_crash_at_any_stage_leaves_the_previous_checkpoint_latest(
    tmp_path: Path, trained, monkeypatch: pytest.MonkeyPatch, stage: str
) -> None:
    model, _ = trained
    save_checkpoint(tmp_path, step=1, epoch=0, model=model, train_state={"step": 1})

    def crash(*args, **kwargs):
        raise OSError("disk full (simulated)")

    if stage == "model":
        monkeypatch.setattr(checkpointing, "save_model", crash)
    elif stage == "state":
        monkeypatch.setattr(checkpointing.torch, "save", crash)
    elif stage == "meta":
        monkeypatch.setattr(checkpointing, "_fsync_file", lambda path: crash() if path.name == "meta.json" else None)
    else:
        monkeypatch.setattr(checkpointing.os, "replace", crash)
    with pytest.raises(OSError, match="simulated"):
        save_checkpoint(tmp_path, step=2, epoch=0, model=model, train_state={"step": 2})
    monkeypatch.undo()
    assert [info.step for info in list_checkpoints(tmp_path)] == [1]
    assert not (tmp_path / "step-00000002").exists()


def test_half_written_folders_are_never_picked(tmp_path: Path, trained) -> None:
    model, _ = trained
    save_checkpoint(tmp_path, step=3, epoch=0, model=model, train_state={"step": 3})
    good = save_checkpoint(tmp_path, step=4, epoch=0, model=model, train_state={"step": 4}, keep=5)
    # What a SIGKILL could leave: a staging folder, a checkpoint-named folder without meta.json, one whose file is
    # truncated, and one whose meta.json is torn.
    (tmp_path / ".tmp-step-00000009-abc").mkdir()
    no_meta = tmp_path / "step-00000006"
    no_meta.mkdir()
    (no_meta / "model.safetensors").write_bytes(b"partial")
    truncated = tmp_path / "step-00000007"
    truncated.mkdir()
    for item in good.iterdir():
        (truncated / item.name).write_bytes(item.read_bytes())
    meta = json.loads((truncated / "meta.json").read_text())
    meta["step"] = 7
    (truncated / "meta.json").write_text(json.dumps(meta))
    (truncated / "train_state.pt").write_bytes((truncated / "train_state.pt").read_bytes()[:-10])
    torn = tmp_path / "step-00000008"
    torn.mkdir()
    (torn / "meta.json").write_text('{"format_version": 1, "st')
    assert latest_checkpoint(tmp_path).step == 4
    assert [info.step for info in list_checkpoints(tmp_path)] == [3, 4]


def test_pruning_keeps_the_newest(tmp_path: Path, trained) -> None:
    model, _ = trained
    for step in range(1, 6):
        save_checkpoint(tmp_path, step=step, epoch=0, model=model, train_state={"step": step}, keep=2)
    assert [info.step for info in list_checkpoints(tmp_path)] == [4, 5]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith((".tmp", ".trash"))]


def test_checkpoint_of_another_architecture_is_refused(tmp_path: Path, trained) -> None:
    model, _ = trained
    save_checkpoint(tmp_path, step=1, epoch=0, model=model, train_state={"step": 1})
    other = DeformableDetrForObjectDetection(preset_config("tiny", ["a", "b", "c"]))
    with pytest.raises(TrainingCheckpointError):
        load_checkpoint(latest_checkpoint(tmp_path), other)


def test_pickles_are_never_executed(tmp_path: Path, trained) -> None:
    model, _ = trained
    info_path = save_checkpoint(tmp_path, step=1, epoch=0, model=model, train_state={"step": 1})
    marker = tmp_path / "pwned"

    class Exploit:
        def __reduce__(self):
            return (Path.touch, (marker,))

    torch.save({"step": 1, "payload": Exploit()}, info_path / "train_state.pt")
    meta = json.loads((info_path / "meta.json").read_text())
    meta["files"]["train_state.pt"] = (info_path / "train_state.pt").stat().st_size
    (info_path / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(TrainingCheckpointError):
        load_checkpoint(latest_checkpoint(tmp_path), _fresh())
    assert not marker.exists()


def test_every_torch_load_in_finetune_is_weights_only() -> None:
    package = Path(__file__).resolve().parents[1] / "finetune"
    for path in package.rglob("*.py"):
        for call in re.findall(r"torch\.load\(([^)]*)\)", path.read_text()):
            assert "weights_only=True" in call, f"{path.name}: torch.load({call})"
