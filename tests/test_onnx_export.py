"""ONNX export: one file per variant that onnxruntime runs at any batch and image size with ddetr's fp32 outputs."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch

import ddetr
from ddetr.export import ExportError, OnnxExport, export_onnx
from ddetr.export.cli import main as export_main

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

ROOT = Path(__file__).resolve().parents[1]
PHOTOS = sorted((ROOT / "examples" / "photos").glob("*.jpg"))
VARIANTS = {
    "multi-scale": {},
    "single-scale": {"num_feature_levels": 1},
    "single-scale-dc5": {"num_feature_levels": 1, "dilation": True},
    "with-box-refine": {"with_box_refine": True},
    "with-box-refine-two-stage": {"with_box_refine": True, "two_stage": True, "two_stage_num_proposals": 10},
}


def run_onnx(path: Path, pixel_values: torch.Tensor, pixel_mask: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 2
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    logits, boxes = session.run(None, {"pixel_values": pixel_values.numpy(), "pixel_mask": pixel_mask.numpy()})
    return logits, boxes


def photo_batches() -> list[tuple[str, dict[str, torch.Tensor]]]:
    """Real photos at two sizes, one at a time, and two different photos in one padded batch of 2."""
    images = [ddetr.load_image(path) for path in PHOTOS]
    batches = []
    for shortest in (192, 288):
        processor = ddetr.DeformableDetrImageProcessorFast(size={"shortest_edge": shortest, "longest_edge": 480})
        batches.append((f"one photo at {shortest}", processor(images[:1])))
    # A different size per photo, so the batch pads one of them bottom and right.
    processor = ddetr.DeformableDetrImageProcessorFast(size={"shortest_edge": 224, "longest_edge": 400})
    batches.append(("two photos, padded", processor([images[0], images[1].resize((300, 260))])))
    return batches


@pytest.fixture(scope="module")
def photo_inputs() -> list[tuple[str, dict[str, torch.Tensor]]]:
    return photo_batches()


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_one_file_matches_pytorch_at_every_size_and_batch(
    variant: str,
    tiny_config: Callable[..., ddetr.DeformableDetrConfig],
    perturb_: Callable[..., torch.nn.Module],
    photo_inputs: list[tuple[str, dict[str, torch.Tensor]]],
    tmp_path: Path,
) -> None:
    torch.manual_seed(0)
    model = ddetr.DeformableDetrForObjectDetection(tiny_config(**VARIANTS[variant]))
    perturb_(model)
    model.eval()
    exported = export_onnx(model, tmp_path / "model.onnx")
    assert not model.training
    assert any(inputs["pixel_mask"].min() == 0 for _, inputs in photo_inputs)  # padding really is exercised
    for description, inputs in photo_inputs:
        with torch.no_grad():
            expected = model(inputs["pixel_values"], inputs["pixel_mask"])
        logits, boxes = run_onnx(exported.path, inputs["pixel_values"], inputs["pixel_mask"])
        assert logits.shape == tuple(expected.logits.shape), description
        np.testing.assert_allclose(logits, expected.logits.numpy(), atol=1e-4, rtol=0, err_msg=description)
        np.testing.assert_allclose(boxes, expected.pred_boxes.numpy(), atol=1e-4, rtol=0, err_msg=description)


def test_the_file_is_valid_deterministic_and_carries_its_configs(tiny_model_dir: Path, tmp_path: Path) -> None:
    first = export_onnx(tiny_model_dir, tmp_path / "a" / "model.onnx")
    second = export_onnx(tiny_model_dir, tmp_path / "b" / "model.onnx")
    assert isinstance(first, OnnxExport) and first.bytes > 0 and first.opset == 17
    digest = [hashlib.sha256(result.path.read_bytes()).hexdigest() for result in (first, second)]
    assert digest[0] == digest[1]
    proto = onnx.load(first.path)
    onnx.checker.check_model(proto)
    assert [i.name for i in proto.graph.input] == ["pixel_values", "pixel_mask"]
    assert [o.name for o in proto.graph.output] == ["logits", "pred_boxes"]
    dims = [[d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in proto.graph.input]
    assert dims == [["batch", 3, "height", "width"], ["batch", "height", "width"]]
    metadata = {entry.key: entry.value for entry in proto.metadata_props}
    assert json.loads(metadata["id2label"]) == {"0": "circle", "1": "square", "2": "triangle"}
    assert json.loads(metadata["preprocessor_config"]) == json.loads(first.preprocessor_path.read_text())
    config = ddetr.DeformableDetrConfig.from_pretrained(first.config_path.parent)
    assert config.id2label == {0: "circle", 1: "square", 2: "triangle"}
    # Nothing half-written or temporary is left beside the outputs.
    assert sorted(p.name for p in first.path.parent.iterdir()) == [
        "config.json",
        "model.onnx",
        "preprocessor_config.json",
    ]


def test_a_static_export_fixes_batch_and_size(tiny_model_dir: Path, tmp_path: Path) -> None:
    result = export_onnx(tiny_model_dir, tmp_path / "static.onnx", static_size=(96, 128), opset=16)
    proto = onnx.load(result.path)
    dims = [d.dim_value for d in proto.graph.input[0].type.tensor_type.shape.dim]
    assert dims == [1, 3, 96, 128] and result.opset == 16
    model = ddetr.DeformableDetrForObjectDetection.from_pretrained(tiny_model_dir).eval()
    pixel_values, pixel_mask = torch.randn(1, 3, 96, 128), torch.ones(1, 96, 128, dtype=torch.long)
    pixel_mask[:, 70:, :] = 0
    with torch.no_grad():
        expected = model(pixel_values, pixel_mask)
    logits, boxes = run_onnx(result.path, pixel_values, pixel_mask)
    np.testing.assert_allclose(logits, expected.logits.numpy(), atol=1e-4, rtol=0)
    np.testing.assert_allclose(boxes, expected.pred_boxes.numpy(), atol=1e-4, rtol=0)


def test_bad_requests_are_clear_errors(tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ExportError, match="cannot load a model"):
        export_onnx(tmp_path / "no-such-model", tmp_path / "out.onnx")
    for opset in (11, 21, "17", True):
        with pytest.raises(ExportError, match="opset"):
            export_onnx(tiny_model_dir, tmp_path / "out.onnx", opset=opset)  # type: ignore[arg-type]
    for size in ((0, 64), (64, -1), (64,), (64.5, 64)):
        with pytest.raises(ExportError, match="static size"):
            export_onnx(tiny_model_dir, tmp_path / "out.onnx", static_size=size)  # type: ignore[arg-type]
    assert not (tmp_path / "out.onnx").exists()


def test_the_command_line(tiny_model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    output = tmp_path / "cli" / "model.onnx"
    assert export_main(["--model", str(tiny_model_dir), "--output", str(output), "--static", "64x96"]) == 0
    assert "static 64x96" in capsys.readouterr().out and output.is_file()
    assert export_main(["--model", str(tiny_model_dir), "--output", str(output), "--opset", "9"]) == 2
    assert "opset 9 is not supported" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        export_main(["--model", str(tiny_model_dir), "--output", str(output), "--static", "0x64"])
    assert exit_info.value.code == 2 and "positive" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        export_main(["--help"])
    assert exit_info.value.code == 0 and "--static" in capsys.readouterr().out


@pytest.mark.slow
def test_a_paper_sized_model_exports_with_parity(tmp_path: Path) -> None:
    torch.manual_seed(0)
    config = ddetr.DeformableDetrConfig(with_box_refine=True)  # ResNet-50, 6 + 6 layers, 300 queries
    model = ddetr.DeformableDetrForObjectDetection(config).eval()
    result = export_onnx(model, tmp_path / "r50.onnx")
    pixel_values = torch.randn(2, 3, 320, 416)
    pixel_mask = torch.ones(2, 320, 416, dtype=torch.long)
    pixel_mask[1, 256:, :] = 0
    pixel_mask[1, :, 352:] = 0
    with torch.no_grad():
        expected = model(pixel_values, pixel_mask)
    logits, boxes = run_onnx(result.path, pixel_values, pixel_mask)
    np.testing.assert_allclose(logits, expected.logits.numpy(), atol=1e-4, rtol=0)
    np.testing.assert_allclose(boxes, expected.pred_boxes.numpy(), atol=1e-4, rtol=0)


def test_exports_from_two_threads_at_once_both_succeed(tiny_model_dir: Path, tmp_path: Path) -> None:
    # torch's exporter state is process-wide: a web app's concurrent requests must not break each other.
    import threading

    results: dict[str, object] = {}

    def export(name: str) -> None:
        try:
            results[name] = export_onnx(tiny_model_dir, tmp_path / name / "model.onnx")
        except Exception as error:  # recorded for the assertion below
            results[name] = error

    threads = [threading.Thread(target=export, args=(name,)) for name in ("first", "second")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=300)
    assert all(isinstance(result, OnnxExport) for result in results.values()), results
    assert len(results) == 2
