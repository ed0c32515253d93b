"""The Detect tab's pieces, called directly: model listing, one-pass detection with re-filtering, drawing, errors."""

from __future__ import annotations

import json
import os
from pathlib import Path

import gradio as gr
import numpy as np
import PIL.Image
import pytest
import torch

import ddetr
from app_support.detect_tab import DetectTab
from app_support.detector_cache import DetectorCache, ModelLoadError
from app_support.downloads import DownloadFolder
from app_support.model_choices import (
    SENSETIME_CHECKPOINTS,
    ModelRegistry,
    NoModelAvailableError,
    UnknownModelError,
    resolve_default_model,
)
from app_support.owners import Identities
from app_support.visitors import Visitors
from ddetr.drawing import PALETTE, class_color, display_copy, draw_detections
from ddetr.pipeline import MAX_CANDIDATES, inference_size


def nobody(tmp_path: Path) -> Identities:
    """Identities for a tab called directly: no visitor, so only the shared models are offered."""
    return Identities(Visitors(tmp_path / "visitors"))


@pytest.fixture(scope="module")
def image_path(shapes_image: Path) -> Path:
    return shapes_image  # conftest's 320x240 test image


@pytest.fixture(scope="module")
def detector(tiny_model_dir: Path) -> ddetr.ObjectDetectionPipeline:
    return ddetr.pipeline(model=tiny_model_dir)


class CountingLoader:
    """Loads real detectors and counts forward passes, to prove which events run the model."""

    def __init__(self) -> None:
        self.loads = 0
        self.forwards = 0

    def __call__(self, source: str) -> ddetr.ObjectDetectionPipeline:
        self.loads += 1
        detector = ddetr.pipeline(model=source)
        forward = detector.model.forward

        def counted(*args, **kwargs):
            self.forwards += 1
            return forward(*args, **kwargs)

        detector.model.forward = counted
        return detector


def offline_registry(models_root: Path, **kwargs) -> ModelRegistry:
    """No hub, and the bundled model looked for in ``models_root/ddetr-shapes`` (absent unless a test puts it there)."""
    kwargs.setdefault("bundled_dir", models_root / "ddetr-shapes")
    return ModelRegistry(models_root, hub_reachable=lambda: False, **kwargs)


def link_model(source: Path, target: Path) -> Path:
    target.mkdir(parents=True)
    for name in ("config.json", "model.safetensors"):
        os.symlink(source / name, target / name)
    return target


# -- model registry --------------------------------------------------------------------------------------------- #


def test_registry_lists_bundled_local_and_finetuned_models_but_not_escapes(tmp_path: Path, tiny_model_dir: Path):
    models = tmp_path / "models"
    link_model(tiny_model_dir, models / "ddetr-shapes")
    link_model(tiny_model_dir, models / "other")
    (models / "no-weights").mkdir()
    (models / "no-weights" / "config.json").write_text("{}")
    outside = link_model(tiny_model_dir, tmp_path / "outside")
    os.symlink(outside, models / "escape")  # a symlinked folder pointing out of the allow-list
    run_dir = link_model(tiny_model_dir, tmp_path / "runs" / "run-1" / "model")
    registry = offline_registry(models, finetuned=lambda owner: [("run-1", run_dir)] if owner == "owner-a" else [])

    keys = [choice.key for choice in registry.choices("owner-a")]
    assert keys == ["bundled", "run:run-1", "dir:other"]
    # A fine-tuned model is listed and found for its owner only.
    assert [choice.key for choice in registry.choices("owner-b")] == ["bundled", "dir:other"]
    assert [choice.key for choice in registry.choices()] == ["bundled", "dir:other"]
    assert registry.get("run:run-1", "owner-a").source == str(run_dir)
    for stranger in ("owner-b", None):
        with pytest.raises(UnknownModelError):
            registry.pick("run:run-1", stranger)
    assert registry.default().key == "bundled"
    assert registry.get("dir:other").source == str((models / "other").resolve())
    for bad in ("dir:escape", "dir:no-weights", "dir:../outside", str(outside), "hub:SenseTime/deformable-detr"):
        with pytest.raises(UnknownModelError):
            registry.get(bad)


def test_registry_offers_sensetime_checkpoints_only_when_reachable(tmp_path: Path):
    reachable = ModelRegistry(tmp_path, hub_reachable=lambda: True, bundled_dir=tmp_path / "ddetr-shapes")
    assert [c.source for c in reachable.choices()] == list(SENSETIME_CHECKPOINTS)
    assert reachable.default().source == "SenseTime/deformable-detr"
    assert offline_registry(tmp_path).choices() == []


def test_local_models_are_looked_up_without_asking_the_hub(tmp_path: Path, tiny_model_dir: Path):
    probes = []
    link_model(tiny_model_dir, tmp_path / "ddetr-shapes")
    registry = ModelRegistry(
        tmp_path, hub_reachable=lambda: probes.append(1) or True, bundled_dir=tmp_path / "ddetr-shapes"
    )
    assert registry.get("bundled").kind == "bundled"
    assert probes == []
    assert registry.get("hub:SenseTime/deformable-detr-single-scale").kind == "hub" and probes == [1]


def test_default_model_order_and_message(tmp_path: Path, tiny_model_dir: Path):
    link_model(tiny_model_dir, tmp_path / "ddetr-shapes")
    both = ModelRegistry(tmp_path, hub_reachable=lambda: True, bundled_dir=tmp_path / "ddetr-shapes")
    assert both.default().key == "hub:SenseTime/deformable-detr"  # the COCO model wins when available
    assert offline_registry(tmp_path).default().key == "bundled"
    assert offline_registry(tmp_path, cli_model=str(tiny_model_dir)).default().key == "cli"
    # Installed from a wheel, the bundled model is package data: found without any models folder.
    assert ModelRegistry(tmp_path / "empty", hub_reachable=lambda: False).default().key == "bundled"
    with pytest.raises(NoModelAvailableError, match="--model"):
        resolve_default_model([])


def test_detector_cache_loads_once_and_reports_failures(tmp_path: Path, tiny_model_dir: Path):
    loader = CountingLoader()
    cache = DetectorCache(max_loaded=1, loader=loader)
    registry = offline_registry(tmp_path, cli_model=str(tiny_model_dir))
    choice = registry.get("cli")
    assert cache.get(choice) is cache.get(choice)
    assert loader.loads == 1
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text("{not json")
    (broken / "model.safetensors").write_bytes(b"garbage")
    with pytest.raises(ModelLoadError, match="could not load model"):
        cache.get(offline_registry(tmp_path, cli_model=str(broken)).get("cli"))


# -- detection and re-filtering --------------------------------------------------------------------------------- #


@pytest.mark.parametrize(("threshold", "top_k"), [(0.0, 60), (0.3, 100), (0.5, 10), (0.9, 300), (1.0, 5)])
def test_selection_matches_the_post_processing(detector, image_path: Path, threshold: float, top_k: int, tiny_classes):
    (candidates,) = detector.candidates([image_path])
    assert len(candidates) == min(MAX_CANDIDATES, 20 * len(tiny_classes))
    # The oracle: transformers' post-processing API on the raw outputs, clamped and rounded here.
    picture = detector.processor.load_image(image_path)
    inputs = detector.processor(picture)
    with torch.no_grad():
        outputs = detector.model(inputs["pixel_values"], inputs["pixel_mask"])
    (result,) = detector.processor.post_process_object_detection(
        outputs, threshold=threshold, target_sizes=[picture.size[::-1]], top_k=top_k
    )
    limits = (picture.width, picture.height) * 2
    expected = [
        {
            "score": round(score, 4),
            "label": tiny_classes[label],
            "box": dict(zip(("xmin", "ymin", "xmax", "ymax"), (round(min(max(v, 0), m)) for v, m in zip(box, limits)))),
        }
        for score, label, box in zip(result["scores"].tolist(), result["labels"].tolist(), result["boxes"].tolist())
    ]
    assert candidates.detections(threshold, top_k) == expected
    assert detector(str(image_path), threshold=threshold, top_k=top_k) == expected


def test_class_filter_and_limits(detector, image_path: Path):
    (candidates,) = detector.candidates([image_path])
    everything = candidates.detections(0.2, 300)
    squares = candidates.detections(0.2, 300, classes=["square"])
    assert squares == [d for d in everything if d["label"] == "square"] and squares
    assert len(candidates.detections(0.0, 3)) == 3
    assert candidates.detections(1.0, 300) == []
    with pytest.raises(ValueError, match="threshold"):
        candidates.detections(1.5, 10)
    with pytest.raises(ValueError, match="max detections"):
        candidates.detections(0.5, 0)


def test_inference_resolution_changes_the_model_input(detector, image_path: Path):
    picture = detector.processor.load_image(image_path)  # 320x240
    assert detector.candidates([picture])[0].input_size == (800, 1066)
    assert detector.candidates([picture], size=320)[0].input_size == (320, 426)
    assert inference_size(480) == {"shortest_edge": 480, "longest_edge": 800}
    with pytest.raises(ValueError):
        inference_size(8)


# -- drawing ---------------------------------------------------------------------------------------------------- #


def test_class_colours_are_stable_and_distinct_per_model(tiny_classes):
    colours = [class_color(name, tiny_classes) for name in tiny_classes.values()]
    assert len(set(colours)) == len(tiny_classes)
    assert class_color("square", tiny_classes) == PALETTE[1]
    assert class_color("zebra") == class_color("zebra") and class_color("zebra") in PALETTE


def test_drawn_box_has_the_class_colour(tiny_classes):
    image = PIL.Image.new("RGB", (200, 100), "white")
    box = {"xmin": 20, "ymin": 30, "xmax": 120, "ymax": 90}
    drawn = draw_detections(image, [{"score": 0.9, "label": "square", "box": box}], id2label=tiny_classes)
    expected = PIL.ImageColor.getrgb(PALETTE[1])
    assert drawn.getpixel((70, 89)) == expected  # bottom edge of the box
    assert drawn.getpixel((70, 60)) == (255, 255, 255)  # the inside stays untouched
    assert image.getpixel((70, 89)) == (255, 255, 255)  # the input is not modified


def test_display_copy_downscales_large_images():
    copy, scale = display_copy(PIL.Image.new("RGB", (4000, 1000)), max_side=1000)
    assert copy.size == (1000, 250) and scale == pytest.approx(0.25)
    small, one = display_copy(PIL.Image.new("L", (40, 30)))
    assert small.mode == "RGB" and one == 1.0


# -- the tab's event handlers ----------------------------------------------------------------------------------- #


@pytest.fixture
def tab_and_loader(tmp_path: Path, tiny_model_dir: Path) -> tuple[DetectTab, CountingLoader]:
    loader = CountingLoader()
    registry = offline_registry(tmp_path / "models", cli_model=str(tiny_model_dir))
    tab = DetectTab(registry, DetectorCache(loader=loader), DownloadFolder(tmp_path / "downloads"), nobody(tmp_path))
    return tab, loader


def test_sliders_refilter_without_running_the_model(tab_and_loader, image_path: Path):
    tab, loader = tab_and_loader
    annotated, rows, json_file, summary, view = tab.detect(str(image_path), "cli", 0, 0.5, 100, [])
    assert loader.forwards == 1
    assert isinstance(annotated, PIL.Image.Image) and annotated.size == (320, 240)
    assert f"**{len(rows)} detections**" in summary
    assert json.loads(Path(json_file).read_text()) == view.candidates.detections(0.5, 100)

    counts = []
    for threshold in (0.1, 0.5, 0.8, 0.95):
        _, rows, _, summary, *_ = (*tab.refilter(view, threshold, 100, []),)
        counts.append(len(rows))
    assert counts == sorted(counts, reverse=True) and counts[0] > counts[-1]
    _, rows, _, _ = tab.refilter(view, 0.0, 100, ["triangle"])
    assert rows and {row[0] for row in rows} == {"triangle"}
    _, rows, _, _ = tab.refilter(view, 0.0, 4, [])
    assert len(rows) == 4
    assert loader.forwards == 1 and loader.loads == 1


def test_detect_reports_bad_images_and_keeps_working(tab_and_loader, tmp_path: Path, image_path: Path, truncated_png):
    tab, _ = tab_and_loader
    with pytest.raises(gr.Error, match=r"(?i)truncated|image") as caught:
        tab.detect(str(truncated_png(tmp_path / "cut.png")), "cli", 0, 0.5, 100, [])
    assert "cut.png" in caught.value.message and str(tmp_path) not in caught.value.message  # no server paths
    (tmp_path / "text.png").write_text("<html>not an image</html>")
    with pytest.raises(gr.Error, match="not an image"):
        tab.detect(str(tmp_path / "text.png"), "cli", 0, 0.5, 100, [])
    with pytest.raises(gr.Error, match="not available"):
        tab.detect(str(image_path), "dir:../../etc", 0, 0.5, 100, [])
    *_, summary, view = tab.detect(str(image_path), "cli", 0, 0.5, 100, [])
    assert view is not None and "detections" in summary
    *_, message, empty = tab.detect(None, "cli", 0, 0.5, 100, [])
    assert empty is None and "Upload" in message


def test_model_selection_shows_classes_and_api_matches_pipeline(
    tab_and_loader, image_path: Path, detector, tiny_classes
):
    tab, _ = tab_and_loader
    info, classes_update = tab.select_model("cli")
    assert "3 classes" in info and "circle, square, triangle" in info
    assert classes_update["choices"] == [(name, name) for name in sorted(tiny_classes.values())] or classes_update[
        "choices"
    ] == sorted(tiny_classes.values())
    assert tab.api_detect(str(image_path), 0.4) == detector(str(image_path), threshold=0.4)
    with pytest.raises(gr.Error, match="no image"):
        tab.api_detect(None, 0.4)


def test_no_model_is_a_message_not_a_crash(tmp_path: Path, image_path: Path):
    tab = DetectTab(offline_registry(tmp_path), DetectorCache(), DownloadFolder(tmp_path / "d"), nobody(tmp_path))
    info, _ = tab.select_model(None)
    assert "No model loaded" in info and "--model" in info
    with pytest.raises(gr.Error, match="No detection model is available"):
        tab.detect(str(image_path), None, 0, 0.5, 100, [])


def test_annotated_output_marks_boxes(tab_and_loader, image_path: Path):
    tab, _ = tab_and_loader
    annotated, rows, *_ = tab.detect(str(image_path), "cli", 0, 0.0, 300, [])
    original = np.asarray(PIL.Image.open(image_path).convert("RGB"), dtype=np.int16)
    changed = np.abs(np.asarray(annotated, dtype=np.int16) - original).sum(axis=2) > 0
    assert rows and changed.mean() > 0.01


def test_the_app_loads_detectors_at_the_fastest_precision_within_tolerance(tiny_model_dir: Path):
    from app_support.detector_cache import load_detector
    from ddetr.runtime.precision import resolve_precision

    assert load_detector(str(tiny_model_dir)).precision == resolve_precision("auto", torch.device("cpu"))
    assert load_detector(str(tiny_model_dir), precision="fp32").precision.name == "fp32"
