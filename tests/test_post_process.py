"""post_process_object_detection against transformers 5.23 and against a direct computation."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from ddetr.processing import (
    DeformableDetrImageProcessor,
    DeformableDetrImageProcessorFast,
    post_process_object_detection,
)

transformers = pytest.importorskip("transformers")
from transformers import DeformableDetrImageProcessorPil  # noqa: E402


def _outputs(batch: int = 3, queries: int = 50, classes: int = 7, seed: int = 0) -> SimpleNamespace:
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(batch, queries, classes, generator=generator) * 3
    centres = torch.rand(batch, queries, 2, generator=generator)
    sizes = torch.rand(batch, queries, 2, generator=generator) * 0.5
    return SimpleNamespace(logits=logits, pred_boxes=torch.cat([centres, sizes], dim=-1))


TARGET_SIZES = [(480, 640), (333, 500), (1000, 200)]


@pytest.mark.parametrize("threshold", [0.0, 0.3, 0.5, 0.9])
@pytest.mark.parametrize("top_k", [1, 10, 100, 1000])
@pytest.mark.parametrize("sizes", ["none", "list", "tensor"])
def test_matches_transformers(threshold, top_k, sizes):
    outputs = _outputs()
    target_sizes = {"none": None, "list": TARGET_SIZES, "tensor": torch.tensor(TARGET_SIZES)}[sizes]
    theirs = DeformableDetrImageProcessorPil().post_process_object_detection(
        outputs, threshold=threshold, target_sizes=target_sizes, top_k=top_k
    )
    candidates = [
        post_process_object_detection(outputs, threshold=threshold, target_sizes=target_sizes, top_k=top_k),
        DeformableDetrImageProcessor().post_process_object_detection(outputs, threshold, target_sizes, top_k),
        DeformableDetrImageProcessorFast().post_process_object_detection(outputs, threshold, target_sizes, top_k),
    ]
    for ours in candidates:
        assert len(ours) == len(theirs)
        for mine, hf in zip(ours, theirs):
            assert torch.equal(mine["labels"], hf["labels"])
            assert mine["labels"].dtype == torch.int64
            assert torch.allclose(mine["scores"], hf["scores"])
            assert torch.allclose(mine["boxes"], hf["boxes"], atol=1e-4)


def test_direct_computation_for_one_image():
    outputs = _outputs(batch=1, queries=4, classes=3, seed=1)
    result = post_process_object_detection(outputs, threshold=0.2, target_sizes=[(100, 200)], top_k=5)[0]
    probabilities = outputs.logits[0].sigmoid()
    expected = sorted(
        ((float(probabilities[q, c]), q, c) for q in range(4) for c in range(3)),
        reverse=True,
    )[:5]
    expected = [item for item in expected if item[0] > 0.2]
    assert result["scores"].tolist() == pytest.approx([item[0] for item in expected])
    assert result["labels"].tolist() == [item[2] for item in expected]
    for box, (_, query, _) in zip(result["boxes"], expected):
        cx, cy, w, h = outputs.pred_boxes[0, query].tolist()
        corners = [(cx - w / 2) * 200, (cy - h / 2) * 100, (cx + w / 2) * 200, (cy + h / 2) * 100]
        assert box.tolist() == pytest.approx(corners, abs=1e-4)


def test_accepts_a_dict_and_few_candidates():
    outputs = _outputs(batch=2, queries=3, classes=2)
    as_dict = {"logits": outputs.logits, "pred_boxes": outputs.pred_boxes}
    results = post_process_object_detection(as_dict, threshold=0.0, top_k=100)
    assert [len(r["scores"]) for r in results] == [6, 6]


def test_half_precision_boxes_are_scaled_in_float32():
    outputs = _outputs(batch=1)
    half = SimpleNamespace(logits=outputs.logits.bfloat16(), pred_boxes=outputs.pred_boxes.bfloat16())
    result = post_process_object_detection(half, threshold=0.0, target_sizes=[(4000, 6000)])[0]
    assert result["boxes"].dtype == torch.float32


def test_bad_arguments_are_named():
    outputs = _outputs(batch=2)
    with pytest.raises(ValueError, match="target sizes"):
        post_process_object_detection(outputs, target_sizes=[(10, 10)])
    with pytest.raises(ValueError, match="top_k"):
        post_process_object_detection(outputs, top_k=0)
    with pytest.raises(ValueError, match="pred_boxes"):
        post_process_object_detection(SimpleNamespace(logits=outputs.logits))
    with pytest.raises(ValueError, match="logits"):
        post_process_object_detection({"pred_boxes": outputs.pred_boxes})


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_results_stay_on_the_outputs_device():
    outputs = _outputs()
    on_gpu = SimpleNamespace(logits=outputs.logits.cuda(), pred_boxes=outputs.pred_boxes.cuda())
    results = DeformableDetrImageProcessorFast().post_process_object_detection(
        on_gpu, threshold=0.3, target_sizes=TARGET_SIZES
    )
    expected = post_process_object_detection(outputs, threshold=0.3, target_sizes=TARGET_SIZES)
    for result, reference in zip(results, expected):
        assert all(value.is_cuda for value in result.values())
        assert torch.equal(result["labels"].cpu(), reference["labels"])
        assert torch.allclose(result["boxes"].cpu(), reference["boxes"], atol=1e-3)
