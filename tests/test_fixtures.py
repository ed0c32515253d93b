"""The shared fixtures in ``conftest.py`` do what the tests using them rely on."""

from __future__ import annotations

from pathlib import Path

import PIL.Image
import pytest

import ddetr


def test_tiny_model_scores_spread(tiny_model_dir: Path, shapes_image: Path) -> None:
    """The fixture is only useful if a 0.5 threshold keeps some boxes and drops others."""
    detector = ddetr.pipeline(model=tiny_model_dir)
    scores = [d["score"] for d in detector(shapes_image, threshold=0.0, top_k=60)]
    assert len(scores) == 60
    assert min(scores) < 0.3 and max(scores) > 0.7


def test_tiny_model_has_the_tiny_classes(tiny_model_dir: Path, tiny_classes: dict[int, str]) -> None:
    assert ddetr.DeformableDetrConfig.from_pretrained(tiny_model_dir).id2label == tiny_classes


def test_shapes_image_and_truncated_png(shapes_image: Path, truncated_png, tmp_path: Path) -> None:
    with PIL.Image.open(shapes_image) as image:
        assert image.size == (320, 240) and image.format == "PNG"
    cut = truncated_png(tmp_path / "cut.png")
    assert cut == tmp_path / "cut.png"
    with PIL.Image.open(cut) as image, pytest.raises(OSError):
        image.load()
