"""The precision policy is applied where it is promised: bf16 inside the network under bf16, float32 where the policy
keeps it (sampling offsets and locations, boxes, loss), in the pipeline, the app's Detect tab and the training engine;
and the fused fast paths agree with the module calls that hooks observe."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

import ddetr
from app_support.detect_tab import DetectTab
from app_support.detector_cache import DetectorCache, load_detector
from app_support.downloads import DownloadFolder
from app_support.model_choices import ModelRegistry
from app_support.owners import Identities
from app_support.visitors import Visitors
from ddetr.model.deformable_attention import MultiscaleDeformableAttention
from ddetr.model.feed_forward import feed_forward
from ddetr.ops.linear import Linear, fusable
from ddetr.pipeline import detect_candidates
from ddetr.runtime import precision as precision_module
from ddetr.runtime.precision import BF16, FP32, native_bf16, resolve_precision
from finetune.data.collate import Batch
from finetune.evaluate.sharded import predict
from finetune.run.distributed import DistributedContext
from finetune.run.step import train_step

CPU = torch.device("cpu")


@contextmanager
def dtypes_seen(model: torch.nn.Module) -> Iterator[Counter[tuple[str, torch.dtype]]]:
    """Counts (layer kind, output dtype) for every deformable-attention projection and feed-forward fc1 call."""
    seen: Counter[tuple[str, torch.dtype]] = Counter()
    handles = []
    for module in model.modules():
        if isinstance(module, MultiscaleDeformableAttention):
            for name in ("value_proj", "sampling_offsets", "output_proj"):

                def record(_module, _inputs, output, name=name):
                    seen[(name, output.dtype)] += 1

                handles.append(getattr(module, name).register_forward_hook(record))
    for name, module in model.named_modules():
        if name.endswith("fc1"):
            handles.append(module.register_forward_hook(lambda _m, _i, out: seen.update([("fc1", out.dtype)])))
    try:
        yield seen
    finally:
        for handle in handles:
            handle.remove()


def assert_bf16_policy(seen: Counter[tuple[str, torch.dtype]]) -> None:
    assert seen[("value_proj", torch.bfloat16)] > 0 and seen[("output_proj", torch.bfloat16)] > 0
    assert seen[("fc1", torch.bfloat16)] > 0
    # The sampling offsets are float32 under bf16 autocast: the reason the policy exists.
    assert seen[("sampling_offsets", torch.float32)] > 0
    assert seen[("sampling_offsets", torch.bfloat16)] == 0


def test_pipeline_runs_bf16_inside_and_keeps_offsets_and_boxes_float32(tiny_model_dir: Path, shapes_image: Path):
    detector = ddetr.pipeline(model=tiny_model_dir, precision="bf16")
    with dtypes_seen(detector.model) as seen:
        (candidates,) = detector.candidates([shapes_image])
    assert_bf16_policy(seen)
    assert candidates.boxes.dtype.name == "float32" and candidates.scores.dtype.name == "float32"

    full = ddetr.pipeline(model=tiny_model_dir, precision="fp32")
    with dtypes_seen(full.model) as seen:
        full.candidates([shapes_image])
    assert {dtype for _, dtype in seen} == {torch.float32}


def test_auto_means_bf16_exactly_where_it_is_native(tiny_model_dir: Path):
    expected = "bf16" if native_bf16(CPU) else "fp32"
    assert ddetr.pipeline(model=tiny_model_dir, precision="auto").precision.name == expected
    assert resolve_precision("auto", CPU, training=True).name == expected
    with pytest.raises(ValueError, match="precision"):
        resolve_precision("int8", CPU)


@pytest.mark.parametrize("native", [True, False])
def test_auto_trains_in_bf16_on_a_cpu_exactly_when_it_is_native(native: bool, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(precision_module, "native_bf16", lambda device: native)
    assert resolve_precision("auto", CPU, training=True) == (BF16 if native else FP32)
    assert not resolve_precision("auto", CPU, training=True).scale_loss


@pytest.mark.parametrize("precision", ["bf16", "auto"])
def test_the_detect_tab_runs_at_the_apps_precision(
    tiny_model_dir: Path, shapes_image: Path, tmp_path: Path, precision: str, monkeypatch: pytest.MonkeyPatch
):
    if precision == "auto" and not native_bf16(CPU):
        # What "auto" does on an AVX512-BF16 / AMX CPU (bf16 still runs here, emulated and slower).
        monkeypatch.setattr(precision_module, "native_bf16", lambda device: True)
    registry = ModelRegistry(tmp_path / "models", cli_model=str(tiny_model_dir), hub_reachable=lambda: False)
    cache = DetectorCache(loader=lambda source: load_detector(source, precision=precision))
    tab = DetectTab(registry, cache, DownloadFolder(tmp_path / "downloads"), Identities(Visitors(tmp_path / "v")))
    detector = cache.get(registry.get("cli"))
    with dtypes_seen(detector.model) as seen:
        *_, summary, view = tab.detect(str(shapes_image), "cli", 0, 0.3, 100, [])
    assert_bf16_policy(seen)
    assert "bf16" in summary and len(view.candidates) > 0


def _batch(model: ddetr.DeformableDetrForObjectDetection) -> Batch:
    generator = torch.Generator().manual_seed(0)
    pixel_values = torch.randn(2, 3, 64, 80, generator=generator)
    labels = [
        {"class_labels": torch.tensor([0, 2]), "boxes": torch.tensor([[0.3, 0.4, 0.2, 0.3], [0.7, 0.6, 0.3, 0.2]])},
        {"class_labels": torch.tensor([1]), "boxes": torch.tensor([[0.5, 0.5, 0.4, 0.4]])},
    ]
    mask = torch.ones(2, 64, 80, dtype=torch.long)
    return Batch(pixel_values, mask, labels, indices=[0, 1], original_sizes=[(64, 80), (64, 80)])


def test_the_training_step_and_evaluation_apply_bf16(tiny_model_dir: Path):
    model = ddetr.DeformableDetrForObjectDetection.from_pretrained(tiny_model_dir, auxiliary_loss=True).train()
    parameters = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(parameters, lr=1e-4)
    context = DistributedContext(rank=0, world_size=1, local_rank=0, device=CPU, owns_group=False)
    with dtypes_seen(model) as seen:
        outcome = train_step(
            model=model,
            batches=[_batch(model)],
            optimizer=optimizer,
            parameters=parameters,
            precision=BF16,
            scaler=None,
            clip_grad_norm=0.1,
            context=context,
        )
    assert not outcome.skipped and outcome.loss > 0
    assert_bf16_policy(seen)

    with dtypes_seen(model) as seen:
        detections = predict(model=model, batches=[_batch(model)], precision=BF16, device=CPU)
    assert_bf16_policy(seen)
    assert [d.index for d in detections] == [0, 1] and detections[0].boxes.shape == (60, 4)  # 20 queries x 3 classes
    assert model.training  # evaluation restores the mode it found


def test_candidates_are_the_pipeline_results_and_clamped(tiny_model_dir: Path, shapes_image: Path):
    detector = ddetr.pipeline(model=tiny_model_dir)
    inputs = detector.processor([detector.processor.load_image(shapes_image)])
    (candidates,) = detect_candidates(
        detector.model, inputs["pixel_values"], inputs["pixel_mask"], image_sizes=[(240, 320)], precision=FP32
    )
    assert (candidates.boxes[:, 0::2] >= 0).all() and (candidates.boxes[:, 0::2] <= 320).all()
    assert (candidates.boxes[:, 1::2] >= 0).all() and (candidates.boxes[:, 1::2] <= 240).all()
    assert (candidates.scores[:-1] >= candidates.scores[1:]).all()
    with pytest.raises(ValueError, match="image sizes"):
        detect_candidates(detector.model, inputs["pixel_values"], inputs["pixel_mask"], image_sizes=[], precision=FP32)
    empty = inputs["pixel_values"][:0], inputs["pixel_mask"][:0]
    assert detect_candidates(detector.model, *empty, image_sizes=[], precision=FP32) == []
    with pytest.raises(ValueError, match="at least one image"):
        detector.candidates([])


# -- fused paths and module calls --------------------------------------------------------------------------------- #


def test_a_hook_sends_sampling_offsets_through_the_module_with_the_same_result():
    torch.manual_seed(0)
    attention = MultiscaleDeformableAttention(d_model=32, levels=2, heads=4, points=2).double()
    torch.nn.init.normal_(attention.sampling_offsets.weight, std=0.05)
    shapes = [(6, 8), (3, 4)]
    value = torch.randn(2, 60, 32, dtype=torch.float64)
    query = torch.randn(2, 5, 32, dtype=torch.float64)
    for corners in (2, 4):
        reference = torch.rand(2, 5, 2, corners, dtype=torch.float64)
        fused = attention(query, value, None, reference, shapes)
        calls: list[torch.Tensor] = []
        handle = attention.sampling_offsets.register_forward_hook(
            lambda _m, inputs, _o, calls=calls: calls.append(inputs[0])
        )
        try:
            assert not fusable(attention.sampling_offsets)
            observed = attention(query, value, None, reference, shapes)
        finally:
            handle.remove()
        assert len(calls) == 1 and calls[0].shape == query.shape
        torch.testing.assert_close(observed, fused, rtol=1e-12, atol=1e-12)


def test_feed_forward_fuses_relu_only_when_nobody_watches_fc1():
    torch.manual_seed(0)
    fc1, fc2 = Linear(16, 64), Linear(64, 16)
    x = torch.randn(3, 7, 16)
    assert fusable(fc1)
    fused = feed_forward(x, fc1, fc2, "relu", 0.0, training=False)
    outputs = []
    handle = fc1.register_forward_hook(lambda _m, _i, out: outputs.append(out))
    try:
        observed = feed_forward(x, fc1, fc2, "relu", 0.0, training=False)
    finally:
        handle.remove()
    assert len(outputs) == 1 and (outputs[0] < 0).any()  # the hook sees fc1's own output, before the ReLU
    torch.testing.assert_close(observed, fused)
    reference = fc2(torch.relu(torch.nn.functional.linear(x, fc1.weight, fc1.bias)))
    torch.testing.assert_close(fused, reference, rtol=1e-5, atol=1e-5)


def test_global_hooks_and_replaced_layers_turn_fusion_off():
    layer = Linear(4, 4)
    handle = torch.nn.modules.module.register_module_forward_hook(lambda *_: None)
    try:
        assert not fusable(layer)
    finally:
        handle.remove()
    assert fusable(layer)
    assert not fusable(torch.nn.Linear(4, 4))
