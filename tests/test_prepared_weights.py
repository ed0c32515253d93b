"""Prepared (cast, folded) weights kept between inference calls: same outputs as preparing them afresh, refreshed
whenever a source changes in place, never kept outside the inference scope or where gradients are recorded."""

from __future__ import annotations

import gc

import numpy as np
import pytest
import torch

from ddetr import DeformableDetrForObjectDetection
from ddetr.ops import prepared_weights
from ddetr.ops.prepared_weights import cast, forget_prepared_weights, prepared, reusing_prepared_weights
from ddetr.pipeline import ObjectDetectionPipeline, detect_candidates
from ddetr.processing import DeformableDetrImageProcessorFast
from ddetr.runtime.precision import BF16, FP32
from finetune.data.shapes import SHAPE_CLASSES
from finetune.presets import preset_config


def _kept() -> int:
    return sum(len(entries) for entries in prepared_weights._cache.values())


@pytest.fixture(autouse=True)
def empty_cache():
    forget_prepared_weights()
    yield
    forget_prepared_weights()


def test_a_cast_is_kept_inside_the_scope_and_redone_after_an_in_place_change() -> None:
    weight = torch.nn.Parameter(torch.randn(4, 3))
    with torch.inference_mode(), reusing_prepared_weights():
        first = cast(weight, torch.bfloat16)
        assert cast(weight, torch.bfloat16) is first
        assert torch.equal(first, weight.detach().to(torch.bfloat16))
    with torch.no_grad():
        weight.mul_(2)  # what optimizers, EMA and load_state_dict do
    with torch.inference_mode(), reusing_prepared_weights():
        second = cast(weight, torch.bfloat16)
    assert second is not first and torch.equal(second, weight.detach().to(torch.bfloat16))
    assert not second.is_inference()  # usable outside inference_mode too, and has a version counter


def test_nothing_is_kept_outside_the_scope_or_where_gradients_are_recorded() -> None:
    weight = torch.nn.Parameter(torch.randn(4, 3))
    with torch.no_grad():
        assert cast(weight, torch.bfloat16) is not cast(weight, torch.bfloat16)
    with reusing_prepared_weights():
        recorded = cast(weight, torch.bfloat16)
        recorded.float().sum().backward()
    assert weight.grad is not None and torch.equal(weight.grad, torch.ones(4, 3))
    assert _kept() == 0
    assert cast(weight, torch.float32) is weight  # no cast, nothing to keep


def test_a_source_changed_through_data_is_seen_after_forgetting() -> None:
    weight = torch.randn(4, 3)
    calls = []

    def make() -> torch.Tensor:
        calls.append(1)
        return weight * 2

    with reusing_prepared_weights():
        prepared((weight,), "double", make)
        weight.data.add_(1)  # not tracked by the version counter: documented
        stale = prepared((weight,), "double", make)
        forget_prepared_weights()
        fresh = prepared((weight,), "double", make)
    assert len(calls) == 2
    assert not torch.equal(stale, weight * 2) and torch.equal(fresh, weight * 2)


def test_entries_die_with_their_source() -> None:
    weight = torch.randn(4, 3)
    with reusing_prepared_weights():
        cast(weight, torch.bfloat16)
    assert _kept() == 1
    del weight
    gc.collect()
    assert _kept() == 0


def _model() -> DeformableDetrForObjectDetection:
    torch.manual_seed(0)
    return DeformableDetrForObjectDetection(preset_config("tiny", list(SHAPE_CLASSES))).eval()


def _forward_afresh(model: DeformableDetrForObjectDetection, pixels: torch.Tensor, mask: torch.Tensor):
    with torch.inference_mode(), BF16.autocast(pixels.device):  # outside the scope: everything prepared anew
        return model(pixels, mask)


def test_bf16_detections_with_kept_weights_equal_those_prepared_afresh_and_follow_weight_updates() -> None:
    model = _model()
    pixels = torch.randn(1, 3, 96, 128, generator=torch.Generator().manual_seed(1))
    mask = torch.ones(1, 96, 128, dtype=torch.long)

    def detect():
        with reusing_prepared_weights():  # as ObjectDetectionPipeline.candidates does
            (found,) = detect_candidates(model, pixels, mask, image_sizes=[(96, 128)], precision=BF16, top_k=50)
        return found

    expected = _forward_afresh(model, pixels, mask)
    kept_values = []
    for _ in range(2):  # the second call runs on the kept weights
        found = detect()
        assert _kept() > 0
        kept_values.append({id(value) for entries in prepared_weights._cache.values() for _, value in entries.values()})
        reference = torch.topk(expected.logits.float().sigmoid().flatten(), 50).values.numpy()
        assert found.scores.tolist() == pytest.approx(reference.tolist(), abs=1e-6)
    assert kept_values[0] == kept_values[1]  # reused, not made again
    kept = _kept()
    # a fine-tuning step changes the weights in place: the next detection uses the new ones
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.01 * torch.randn_like(parameter))
    updated = _forward_afresh(model, pixels, mask)
    reference = torch.topk(updated.logits.float().sigmoid().flatten(), 50).values.numpy()
    found = detect()
    assert found.scores.tolist() == pytest.approx(reference.tolist(), abs=1e-6)
    assert not torch.equal(updated.logits, expected.logits)
    assert _kept() == kept  # refreshed in place, not piled up
    # so does loading other weights
    model.load_state_dict(_model().state_dict())
    found = detect()
    reference = torch.topk(expected.logits.float().sigmoid().flatten(), 50).values.numpy()
    assert found.scores.tolist() == pytest.approx(reference.tolist(), abs=1e-6)


def test_float32_inference_keeps_nothing() -> None:
    model = _model()
    pixels = torch.randn(1, 3, 64, 64)
    with reusing_prepared_weights():
        mask = torch.ones(1, 64, 64, dtype=torch.long)
        detect_candidates(model, pixels, mask, image_sizes=[(64, 64)], precision=FP32)
    assert _kept() == 0


def test_the_pipeline_keeps_casts_but_fine_tuning_evaluation_does_not() -> None:
    model = _model()
    pipeline = ObjectDetectionPipeline(model=model, processor=DeformableDetrImageProcessorFast(), precision=BF16)
    image = np.random.default_rng(0).integers(0, 255, (96, 128, 3), dtype=np.uint8)
    pipeline.candidates([image], size=96)
    assert _kept() > 0
    forget_prepared_weights()
    # Fine-tuning evaluates through detect_candidates between steps of a fused AdamW, which leaves the version
    # counters alone: nothing may be kept there, so every evaluation sees the current weights.
    pixels = torch.randn(1, 3, 96, 128, generator=torch.Generator().manual_seed(2))
    mask = torch.ones(1, 96, 128, dtype=torch.long)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.05, fused=True)
    before = detect_candidates(model, pixels, mask, image_sizes=[(96, 128)], precision=BF16, top_k=100)[0]
    assert _kept() == 0
    sum(parameter.float().square().sum() for parameter in model.parameters()).backward()
    optimizer.step()
    after = detect_candidates(model, pixels, mask, image_sizes=[(96, 128)], precision=BF16, top_k=100)[0]
    reference = torch.topk(_forward_afresh(model, pixels, mask).logits.float().sigmoid().flatten(), 100).values
    assert after.scores.tolist() == pytest.approx(reference.numpy().tolist(), abs=1e-6)
    assert after.scores.tolist() != pytest.approx(before.scores.tolist(), abs=1e-6)
