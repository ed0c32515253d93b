"""examples/onnx_detector.py: the torch-free onnxruntime detector detects what ddetr.pipeline detects."""

from __future__ import annotations

import importlib.util
import io
import json
import os
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
from PIL import Image

import ddetr
from ddetr.export import export_onnx

pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")
pytestmark = pytest.mark.usefixtures("single_thread")

ROOT = Path(__file__).resolve().parents[1]
MODULE_PATH = ROOT / "examples" / "onnx_detector.py"
BUNDLED = ROOT / "ddetr" / "bundled" / "ddetr-shapes"
IMAGES = sorted((ROOT / "examples" / "shapes").glob("*.jpg")) + sorted((ROOT / "examples" / "photos").glob("*.jpg"))
THRESHOLD = 0.3
LABELS = ("circle", "square", "triangle", "star", "cross", "ring")
# preprocessor_config.json spellings of size: the 2022 int + max_size form, none, and transformers' dicts.
SIZES = (
    (256, 427),
    (800, 1333),
    (None, None),
    ({"height": 64, "width": 96}, None),
    ({"max_height": 300, "max_width": 200}, None),
    ({"shortest_edge": 200}, None),
)


def load_module() -> ModuleType:
    spec = importlib.util.spec_from_file_location("onnx_detector", MODULE_PATH)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def onnx_detector() -> ModuleType:
    return load_module()


@pytest.fixture(scope="module")
def model_path(tmp_path_factory) -> Path:
    return export_onnx(BUNDLED, tmp_path_factory.mktemp("onnx") / "model.onnx").path


@pytest.fixture(scope="module")
def detector(onnx_detector, model_path):
    return onnx_detector.OnnxDetector(model_path, threads=1)


@pytest.fixture(scope="module")
def reference():
    return ddetr.pipeline(model=BUNDLED)


def assert_same_detections(ours: list[dict], theirs: list[dict]) -> None:
    """Same labels in the same order, every box side within 1 pixel, scores within 0.01."""
    assert [d["label"] for d in ours] == [d["label"] for d in theirs]
    for a, b in zip(ours, theirs):
        assert set(a) == {"score", "label", "box"} and set(a["box"]) == {"xmin", "ymin", "xmax", "ymax"}
        assert all(isinstance(a["box"][side], int) for side in a["box"])
        assert max(abs(a["box"][side] - b["box"][side]) for side in a["box"]) <= 1, (a, b)
        assert abs(a["score"] - b["score"]) < 0.01, (a, b)


@pytest.mark.parametrize("image", IMAGES, ids=[path.name for path in IMAGES])
def test_detections_match_the_pipeline(detector, reference, image):
    ours = detector(image, threshold=THRESHOLD)
    theirs = reference(image, threshold=THRESHOLD)
    assert theirs, "the bundled model should find something on every example image"
    assert_same_detections(ours, theirs)
    scores = [d["score"] for d in ours]
    assert scores == sorted(scores, reverse=True) and all(score > THRESHOLD for score in scores)
    width, height = Image.open(image).size
    for detection in ours:
        box = detection["box"]
        assert 0 <= box["xmin"] <= box["xmax"] <= width and 0 <= box["ymin"] <= box["ymax"] <= height


def test_inputs_lists_top_k_and_threshold(detector):
    path = IMAGES[0]
    from_path = detector(path, threshold=THRESHOLD)
    rgb = Image.open(path).convert("RGB")
    assert detector(str(path), threshold=THRESHOLD) == from_path
    assert detector(rgb, threshold=THRESHOLD) == from_path
    assert detector(np.asarray(rgb), threshold=THRESHOLD) == from_path
    assert detector(path.read_bytes(), threshold=THRESHOLD) == from_path
    assert detector([path, IMAGES[-1]], threshold=THRESHOLD) == [from_path, detector(IMAGES[-1], threshold=THRESHOLD)]
    assert detector(path, threshold=THRESHOLD, top_k=2) == from_path[:2]
    assert len(detector(path, threshold=0.0, top_k=7)) == 7
    assert detector(path, threshold=1.0) == []
    for bad in ({"threshold": 1.5}, {"threshold": -0.1}, {"top_k": 0}):
        with pytest.raises(ValueError):
            detector(path, **bad)


def test_exif_orientation_is_applied(detector):
    upright = Image.open(IMAGES[-2]).convert("RGB")
    exif = Image.Exif()
    exif[0x0112] = 6  # the stored pixels are to be turned 90 degrees clockwise for display
    tagged = io.BytesIO()
    upright.transpose(Image.Transpose.ROTATE_90).save(tagged, format="PNG", exif=exif)
    from_exif = detector(tagged.getvalue(), threshold=THRESHOLD)
    assert from_exif and from_exif == detector(upright, threshold=THRESHOLD)


def test_runs_without_torch_or_ddetr(detector):
    script = f"""
import json, sys, importlib.util
sys.modules["torch"] = None
sys.modules["ddetr"] = None
spec = importlib.util.spec_from_file_location("onnx_detector", {str(MODULE_PATH)!r})
module = importlib.util.module_from_spec(spec)
spec.loader.exec_module(module)
detections = module.OnnxDetector({str(detector.path)!r}, threads=1)({str(IMAGES[0])!r}, threshold={THRESHOLD})
loaded = sorted(name for name, value in sys.modules.items()
                if value is not None and name.split(".")[0] in ("torch", "torchvision", "ddetr", "transformers"))
print(json.dumps({{"detections": detections, "loaded": loaded}}))
"""
    environment = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120, env=environment, cwd=ROOT
    )
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["loaded"] == []
    assert result["detections"] == detector(IMAGES[0], threshold=THRESHOLD)


def test_metadata_stands_in_for_missing_json_files(onnx_detector, detector, tmp_path):
    alone = tmp_path / "model.onnx"
    alone.symlink_to(detector.path)
    from_metadata = onnx_detector.OnnxDetector(alone, threads=1)
    assert from_metadata.id2label == detector.id2label == dict(enumerate(LABELS))
    assert from_metadata.preprocessing == detector.preprocessing
    assert detector.preprocessing.size == {"shortest_edge": 256, "longest_edge": 427}
    assert from_metadata(IMAGES[0], threshold=THRESHOLD) == detector(IMAGES[0], threshold=THRESHOLD)


def test_bad_images_raise_value_error(detector, tmp_path):
    text = tmp_path / "notes.jpg"
    text.write_text("this is not an image\n")
    with pytest.raises(ValueError, match="not a recognised image"):
        detector(text)
    with pytest.raises(ValueError, match="does not exist"):
        detector(tmp_path / "missing.jpg")
    (tmp_path / "empty.jpg").write_bytes(b"")
    with pytest.raises(ValueError, match="empty"):
        detector(tmp_path / "empty.jpg")
    truncated = tmp_path / "truncated.jpg"
    truncated.write_bytes(IMAGES[0].read_bytes()[:300])
    with pytest.raises(ValueError, match="could not be"):
        detector(truncated)
    with pytest.raises(ValueError, match="uint8"):
        detector(np.zeros((32, 32, 3), dtype=np.float32))
    with pytest.raises(ValueError, match="cannot read an image"):
        detector(42)


def test_missing_or_invalid_model_file(onnx_detector, tmp_path):
    with pytest.raises(FileNotFoundError, match=r"no ONNX model at .*ddetr\.export"):
        onnx_detector.OnnxDetector(tmp_path / "missing.onnx")
    bogus = tmp_path / "bogus.onnx"
    bogus.write_text("not a model")
    with pytest.raises(ValueError, match="could not be loaded as an ONNX model"):
        onnx_detector.OnnxDetector(bogus)


def test_command_line(onnx_detector, detector, capsys):
    assert (
        onnx_detector.main([str(detector.path), str(IMAGES[0]), "--threshold", str(THRESHOLD), "--threads", "1"]) == 0
    )
    assert json.loads(capsys.readouterr().out) == detector(IMAGES[0], threshold=THRESHOLD)
    assert onnx_detector.main([str(detector.path) + ".missing", str(IMAGES[0])]) == 2
    assert "no ONNX model" in capsys.readouterr().err


def test_size_rule_matches_ddetr(onnx_detector):
    from ddetr.processing.resize import get_output_size, normalize_size

    for size, max_size in SIZES:
        ours = onnx_detector.Preprocessing.from_config({"size": size, "max_size": max_size})
        expected = normalize_size(size, max_size)
        assert ours.size == expected
        for shape in ((320, 320), (343, 502), (100, 1000), (1000, 101), (37, 1333), (2000, 1500)):
            assert ours.output_size(*shape) == get_output_size(shape, expected), (size, shape)
