"""Small parts of the engine: batch order, LR schedule, optimiser groups, settings, metrics file, plots, EMA."""

from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import PIL.Image
import pytest
import torch

from ddetr import DeformableDetrForObjectDetection
from ddetr.loss.matcher import NonFinitePredictionError
from ddetr.runtime.precision import resolve_precision
from finetune.config import TrainConfig
from finetune.data.sampler import ResumableBatchSampler, epoch_permutation, shard_indices
from finetune.presets import PRESETS, parameter_groups, preset_config
from finetune.run.distributed import DistributedContext
from finetune.run.ema import ModelEma
from finetune.run.metrics_log import MetricsLog, read_metrics
from finetune.run.optim import LrSchedule, build_optimizer
from finetune.run.plots import draw_line_chart, plot_run
from finetune.run.step import train_step

pytestmark = pytest.mark.usefixtures("single_thread")


def test_two_processes_see_the_batches_of_one() -> None:
    single = list(ResumableBatchSampler(dataset_size=23, batch_size=4, seed=3, epoch=2))
    ranks = [
        list(ResumableBatchSampler(dataset_size=23, batch_size=2, seed=3, epoch=2, rank=r, world_size=2))
        for r in range(2)
    ]
    assert len(single) == len(ranks[0]) == len(ranks[1]) == 5  # 23 // 4, the incomplete batch dropped
    for whole, first, second in zip(single, *ranks):
        assert whole == first + second
    assert sorted(i for batch in single for _, i in batch) == sorted(epoch_permutation(23, 3, 2)[:20].tolist())


def test_resuming_mid_epoch_continues_the_same_order() -> None:
    full = list(ResumableBatchSampler(dataset_size=17, batch_size=3, seed=1, epoch=0))
    tail = list(ResumableBatchSampler(dataset_size=17, batch_size=3, seed=1, epoch=0, start_batch=2))
    assert tail == full[2:]
    other_epoch = list(ResumableBatchSampler(dataset_size=17, batch_size=3, seed=1, epoch=1))
    assert other_epoch != full
    with pytest.raises(ValueError, match="lower --batch-size"):
        ResumableBatchSampler(dataset_size=3, batch_size=2, seed=0, epoch=0, world_size=2)
    assert shard_indices(7, 1, 3) == [1, 4]


def test_lr_schedules() -> None:
    step = LrSchedule(total_steps=100, schedule="step", drop_fraction=0.8)
    assert [step(s) for s in (0, 79, 80, 99)] == [1.0, 1.0, 0.1, 0.1]
    warm = LrSchedule(total_steps=100, schedule="cosine", warmup_steps=10)
    assert warm(0) == pytest.approx(0.001) and warm(5) == pytest.approx(0.5005)
    assert warm(10) == pytest.approx(1.0) and warm(100) == pytest.approx(0.01)
    assert warm(10) > warm(50) > warm(90)


def test_paper_parameter_groups() -> None:
    model = DeformableDetrForObjectDetection(preset_config("tiny", ["a"]))
    groups = {
        g["name"]: g
        for g in parameter_groups(model, lr=2e-4, lr_backbone=2e-5, lr_linear_proj_mult=0.1, weight_decay=1e-4)
    }
    assert groups["backbone"]["lr"] == 2e-5 and groups["linear_proj"]["lr"] == pytest.approx(2e-5)
    assert groups["rest"]["lr"] == 2e-4
    names = {id(p): n for n, p in model.named_parameters()}
    assert all(
        "sampling_offsets" in names[id(p)] or "reference_points" in names[id(p)]
        for p in groups["linear_proj"]["params"]
    )
    assert all(".backbone." in "." + names[id(p)] for p in groups["backbone"]["params"])
    counted = sum(len(g["params"]) for g in groups.values())
    assert counted == len([p for p in model.parameters() if p.requires_grad])
    optimizer = build_optimizer(model, TrainConfig(dataset="x"))
    assert len(optimizer.param_groups) == 3


def test_presets_build_and_train_with_auxiliary_losses() -> None:
    for name in PRESETS:
        config = preset_config(name, ["a", "b", "c"])
        assert config.auxiliary_loss and config.num_labels == 3
        assert config.d_model % 32 == 0


def test_settings_are_validated() -> None:
    with pytest.raises(ValueError, match="batch_size"):
        TrainConfig(dataset="x", batch_size=0)
    with pytest.raises(ValueError, match="precision"):
        TrainConfig(dataset="x", precision="int8")
    with pytest.raises(ValueError, match="lr_drop"):
        TrainConfig(dataset="x", lr_drop=1.5)
    with pytest.raises(ValueError, match="unknown training settings"):
        TrainConfig.from_dict({"dataset": "x", "colour": "red"})
    config = TrainConfig(dataset="x", epochs=3)
    assert TrainConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config


def test_backbone_lr_is_a_tenth_of_lr_unless_given() -> None:
    assert TrainConfig(dataset="x").backbone_lr == pytest.approx(2e-5)  # the paper's pair
    derived = TrainConfig(dataset="x", lr=1e-3)
    assert derived.lr_backbone is None and derived.backbone_lr == pytest.approx(1e-4)
    assert derived.with_overrides(lr=5e-4).backbone_lr == pytest.approx(5e-5)  # follows a new lr
    explicit = TrainConfig(dataset="x", lr=1e-3, lr_backbone=3e-4)
    assert explicit.with_overrides(lr=5e-4).backbone_lr == 3e-4  # given: kept
    reloaded = TrainConfig.from_dict(json.loads(json.dumps(derived.to_dict())))
    assert reloaded == derived and reloaded.backbone_lr == pytest.approx(1e-4)
    # The optimizer trains the backbone at that rate.
    model = DeformableDetrForObjectDetection(preset_config("tiny", ["a"]))
    groups = {group["name"]: group["lr"] for group in build_optimizer(model, derived).param_groups}
    assert groups["backbone"] == pytest.approx(1e-4) and groups["rest"] == pytest.approx(1e-3)
    with pytest.raises(ValueError, match="lr_backbone"):
        TrainConfig(dataset="x", lr_backbone=-1.0)


def test_runs_saved_before_the_derived_backbone_lr_resume_with_their_own(tmp_path: Path) -> None:
    from finetune.api import resume_config
    from finetune.run.setup import check_run_directory

    # An older run's settings: every field written out, lr changed and the backbone LR left at its old 2e-5 default.
    saved = {**TrainConfig(dataset="x").to_dict(), "lr": 1e-3, "lr_backbone": 2e-5, "output_dir": str(tmp_path)}
    (tmp_path / "train_config.json").write_text(json.dumps(saved))
    config = resume_config(tmp_path)
    assert config.backbone_lr == 2e-5 and config.with_overrides(threads=1).backbone_lr == 2e-5
    assert check_run_directory(config) is None  # accepted (no checkpoint yet: it would start at step 0)
    # Settings built afresh derive lr / 10 = 1e-4: a different run, refused.
    fresh = TrainConfig(**{**saved, "lr_backbone": None, "resume": True})
    with pytest.raises(ValueError, match=r"keep its settings; changed: lr_backbone: 2e-05 -> None"):
        check_run_directory(fresh)


class _Raising(torch.nn.Module):
    def __init__(self, error: Exception) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.ones(2))
        self.error = error

    def forward(self, pixel_values, pixel_mask, labels=None):
        raise self.error


def test_a_step_skips_non_finite_predictions_by_type_and_surfaces_other_value_errors() -> None:
    cpu = torch.device("cpu")
    context = DistributedContext(rank=0, world_size=1, local_rank=0, device=cpu, owns_group=False)
    batch = SimpleNamespace(pixel_values=torch.zeros(1, 3, 8, 8), pixel_mask=torch.ones(1, 8, 8), labels=[{}])

    def step(error: Exception):
        model = _Raising(error)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        return train_step(
            model=model,
            batches=[batch],
            optimizer=optimizer,
            parameters=list(model.parameters()),
            precision=resolve_precision("fp32", cpu, training=True),
            scaler=None,
            clip_grad_norm=0.1,
            context=context,
        )

    # As the criterion re-raises the matcher's refusal: the same type, naming the layer.
    matcher_error = NonFinitePredictionError("predictions: image 0 has 1 queries with non-finite logits\nmore")
    wrapped = NonFinitePredictionError(f"last decoder layer: {matcher_error}")
    for error in (matcher_error, wrapped):
        outcome = step(error)
        assert outcome.skipped and outcome.counts_as_divergence and math.isnan(outcome.loss)
        assert outcome.reason.startswith("non-finite predictions (") and "more" not in outcome.reason
    assert "last decoder layer: predictions: image 0" in step(wrapped).reason
    # A bad target says "non-finite" too, but it is bad data, not divergence: it must surface, not be skipped.
    with pytest.raises(ValueError, match="target 0"):
        step(ValueError("target 0: 1 box(es) are non-finite or have width/height <= 0 (cxcywh): [[nan]]"))


def test_precision_resolution_on_cpu() -> None:
    cpu = torch.device("cpu")
    assert resolve_precision("fp32", cpu, training=True).dtype is None
    assert resolve_precision("bf16", cpu).dtype == torch.bfloat16
    assert resolve_precision("fp16", cpu).scale_loss


def test_metrics_log_truncation_and_torn_lines(tmp_path: Path) -> None:
    log = MetricsLog(tmp_path / "metrics.jsonl")
    for step in (1, 2, 3):
        log.append({"type": "train", "step": step, "loss": float(step)})
    log.append({"type": "eval", "step": 3, "map": 0.5})
    log.append({"type": "train", "step": 4, "loss": float("nan")})
    with open(tmp_path / "metrics.jsonl", "a") as handle:
        handle.write('{"type": "train", "st')  # a line cut short by a crash
    records = read_metrics(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in records] == [1, 2, 3, 3, 4] and records[-1]["loss"] is None
    log.truncate_after(2)
    assert [r["step"] for r in read_metrics(tmp_path / "metrics.jsonl")] == [1, 2]
    assert read_metrics(tmp_path / "absent.jsonl") == []


def test_plots_are_pngs(tmp_path: Path) -> None:
    log = MetricsLog(tmp_path / "metrics.jsonl")
    for step in range(1, 31):
        log.append({"type": "train", "step": step, "loss": 10.0 / step})
    for step in (10, 20, 30):
        log.append({"type": "eval", "step": step, "map": step / 40, "map_50": step / 35, "map_75": -1.0})
    written = plot_run(tmp_path)
    assert [p.name for p in written] == ["loss.png", "map.png"]
    for path in written:
        image = PIL.Image.open(path)
        assert image.format == "PNG" and image.size == (800, 480)
        assert len(np.unique(np.asarray(image).reshape(-1, 3), axis=0)) > 5  # something was drawn
    empty = draw_line_chart({}, tmp_path / "empty.png", title="t", x_label="x", y_label="y")
    assert PIL.Image.open(empty).size == (800, 480)


def test_chart_axes_span_every_point(tmp_path: Path) -> None:
    from finetune.run import plots

    # A resumed run's loss: steps from 10, values falling from 3.03, ends not on round ticks.
    points = [(10 + step, 3.03 - 1.5 * step / 10990) for step in range(0, 10991, 10)]
    path = draw_line_chart({"loss": points}, tmp_path / "loss.png", title="t", x_label="step", y_label="loss")
    pixels = np.asarray(PIL.Image.open(path).convert("RGB"))
    rows, columns = np.nonzero((pixels == np.array(plots._COLOURS[0])).all(-1))
    left, right = plots._MARGIN_LEFT, plots._WIDTH - plots._MARGIN_RIGHT
    top, bottom = plots._MARGIN_TOP, plots._HEIGHT - plots._MARGIN_BOTTOM
    assert columns.min() >= left - 2 and columns.max() <= right + 2
    assert rows.min() >= top - 2 and rows.max() <= bottom + 2
    assert columns.min() <= left + 5  # the first point sits at the left edge, not off the chart


def test_tick_labels_are_short_and_plain() -> None:
    from finetune.run.plots import _label

    assert [_label(v) for v in (0, 0.25, 1.5, 500, 2500, 12000, 250000)] == [
        "0", "0.25", "1.5", "500", "2,500", "12,000", "250,000",
    ]  # fmt: skip
    assert [_label(v) for v in (0.001, 3e6, -12000)] == ["0.001", "3e+06", "-12,000"]


def test_ema_follows_the_weights() -> None:
    model = torch.nn.Linear(2, 2)
    ema = ModelEma(model, decay=0.5, warmup=1)
    with torch.no_grad():
        model.weight.add_(1.0)
    before = ema.shadow.weight.clone()
    ema.update(model)
    decay = ema.current_decay()
    assert torch.allclose(ema.shadow.weight, decay * before + (1 - decay) * model.weight)
    restored = ModelEma(torch.nn.Linear(2, 2), decay=0.5, warmup=1)
    restored.load_state_dict(ema.state_dict())
    assert torch.equal(restored.shadow.weight, ema.shadow.weight) and restored.updates == 1
