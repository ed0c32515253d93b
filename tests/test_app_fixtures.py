"""Shared helpers for the app tests: a tiny random detector whose scores spread over (0, 1), and test images.

A freshly initialised Deformable DETR scores everything near its 1 % class prior, so thresholds would have nothing
to separate; zeroing the class-head bias and scaling its weights spreads the scores, giving the threshold slider
something to do while staying deterministic (fixed seed).
"""

from __future__ import annotations

import io
from pathlib import Path

import PIL.Image
import PIL.ImageDraw
import torch

import ddetr

CLASSES = {0: "circle", 1: "square", 2: "triangle"}


def make_tiny_model(directory: Path, seed: int = 0) -> Path:
    torch.manual_seed(seed)
    config = ddetr.DeformableDetrConfig(
        backbone="resnet18",
        d_model=32,
        encoder_layers=1,
        decoder_layers=1,
        encoder_attention_heads=2,
        decoder_attention_heads=2,
        num_queries=20,
        id2label=dict(CLASSES),
    )
    model = ddetr.DeformableDetrForObjectDetection(config)
    with torch.no_grad():
        for head in {id(m): m for m in model.class_embed}.values():
            head.bias.zero_()
            head.weight.mul_(8.0)
    model.save_pretrained(directory)
    return directory


def draw_shapes(path: Path, size: tuple[int, int] = (320, 240)) -> Path:
    image = PIL.Image.new("RGB", size, (235, 235, 230))
    draw = PIL.ImageDraw.Draw(image)
    draw.ellipse((20, 30, 90, 100), fill=(200, 30, 30))
    draw.rectangle((150, 60, 220, 130), fill=(30, 30, 200))
    draw.polygon([(240, 200), (300, 200), (270, 140)], fill=(30, 160, 30))
    image.save(path)
    return path


def truncated_png(path: Path) -> Path:
    buffer = io.BytesIO()
    PIL.Image.new("RGB", (64, 48), (10, 200, 30)).save(buffer, format="PNG")
    path.write_bytes(buffer.getvalue()[:60])  # header intact, pixel data cut: opens, fails to decode
    return path


def test_tiny_model_scores_spread(tmp_path: Path) -> None:
    """The fixture is only useful if a 0.5 threshold keeps some boxes and drops others."""
    detector = ddetr.pipeline(model=make_tiny_model(tmp_path / "model"))
    scores = [d["score"] for d in detector(draw_shapes(tmp_path / "a.png"), threshold=0.0, top_k=60)]
    assert len(scores) == 60
    assert min(scores) < 0.3 and max(scores) > 0.7
