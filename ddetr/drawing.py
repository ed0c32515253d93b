"""Boxes, labels and scores drawn onto the image, in one colour per class that stays the same between runs.

Drawing happens server-side with Pillow (rather than ``gr.AnnotatedImage``, which renders one full-size mask per box)
on a copy scaled to at most ``DISPLAY_MAX_SIDE`` pixels, so re-drawing after a slider move stays cheap even for
large photos.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from functools import lru_cache
from typing import Any

import PIL.Image
import PIL.ImageDraw
import PIL.ImageFont

DISPLAY_MAX_SIDE = 1280

# Tableau-like qualitative palette: distinguishable on photos and on the flat shapes images.
PALETTE: tuple[str, ...] = (
    "#e6194b",
    "#3cb44b",
    "#4363d8",
    "#f58231",
    "#911eb4",
    "#42d4f4",
    "#f032e6",
    "#bfef45",
    "#fabed4",
    "#469990",
    "#dcbeff",
    "#9a6324",
    "#fffac8",
    "#800000",
    "#aaffc3",
    "#808000",
    "#ffd8b1",
    "#000075",
    "#a9a9a9",
    "#ffe119",
)


def class_color(label: str, id2label: Mapping[int, str] | None = None) -> str:
    """The hex colour of a class: by its id in the model's label map (so a model's classes get distinct colours),
    or by a hash of its name for labels the map does not know. Python's ``hash`` is salted per process, so md5."""
    if id2label:
        for class_id, name in id2label.items():
            if name == label:
                return PALETTE[int(class_id) % len(PALETTE)]
    digest = hashlib.md5(label.encode("utf-8")).digest()
    return PALETTE[digest[0] % len(PALETTE)]


def display_copy(image: PIL.Image.Image, max_side: int = DISPLAY_MAX_SIDE) -> tuple[PIL.Image.Image, float]:
    """An RGB copy no larger than ``max_side`` and the factor that maps original pixels onto it."""
    scale = min(1.0, max_side / max(image.size))
    copy = image.convert("RGB")
    if scale < 1.0:
        size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
        copy = copy.resize(size, PIL.Image.Resampling.BILINEAR)
    return copy, scale


@lru_cache(maxsize=16)
def _font(size: int) -> PIL.ImageFont.ImageFont | PIL.ImageFont.FreeTypeFont:
    # Pillow's built-in scalable font: no dependency on fonts installed on the host.
    return PIL.ImageFont.load_default(size=size)


def _text_color(fill: str) -> str:
    red, green, blue = (int(fill[i : i + 2], 16) for i in (1, 3, 5))
    return "#000000" if 0.299 * red + 0.587 * green + 0.114 * blue > 150 else "#ffffff"


def draw_detections(
    image: PIL.Image.Image,
    detections: Sequence[Mapping[str, Any]],
    *,
    scale: float = 1.0,
    id2label: Mapping[int, str] | None = None,
) -> PIL.Image.Image:
    """A copy of ``image`` with each box and a "label score" tag ("label #7 score" for a box with a ``track_id``,
    "label" for ground truth without a score); ``scale`` maps box pixels onto the image.

    Lower-scoring boxes are drawn first so the most confident ones end up on top.
    """
    canvas = image.convert("RGB")
    draw = PIL.ImageDraw.Draw(canvas)
    line = max(2, round(max(canvas.size) / 320))
    font = _font(max(11, round(max(canvas.size) / 45)))
    for detection in sorted(detections, key=lambda d: d.get("score", 1.0)):
        box = detection["box"]
        x0, y0, x1, y1 = (box[k] * scale for k in ("xmin", "ymin", "xmax", "ymax"))
        color = class_color(detection["label"], id2label)
        draw.rectangle((x0, y0, x1, y1), outline=color, width=line)
        # Ground truth (dataset previews) has no score; detections show theirs.
        score = detection.get("score")
        track_id = detection.get("track_id", -1)
        name = f"{detection['label']} #{track_id}" if track_id is not None and track_id >= 0 else detection["label"]
        text = name if score is None else f"{name} {score:.2f}"
        left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
        tag_w, tag_h = right - left + 2 * line, bottom - top + 2 * line
        # Put the tag above the box, or inside it when the box touches the top edge.
        tag_y = y0 - tag_h if y0 - tag_h >= 0 else y0
        tag_x = min(max(0.0, x0), max(0.0, canvas.width - tag_w))
        draw.rectangle((tag_x, tag_y, tag_x + tag_w, tag_y + tag_h), fill=color)
        draw.text((tag_x + line - left, tag_y + line - top), text, fill=_text_color(color), font=font)
    return canvas
