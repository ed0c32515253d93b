"""``shapes``: a synthetic object-detection dataset, generated offline and deterministically from a seed.

Each image holds 1-15 filled shapes of 6 classes on a textured, noisy background with unlabelled clutter (lines,
arcs, dots, scribbles). Colour is drawn independently of class, sizes are log-uniform from 12 px to half the image,
shapes are stretched and rotated, and later shapes occlude earlier ones. A placement is refused when it would hide
more than half of an earlier shape, so every labelled shape stays at least half visible; its box is the tight box
of its *visible* pixels, as COCO annotates.

The result is a ``datasets.Dataset`` in the cppe-5 schema (``image``, ``image_id``, ``width``, ``height``,
``objects`` with ``id``, ``area``, ``bbox`` as COCO ``[x, y, w, h]`` and ``category`` as a ``ClassLabel``). Image
``i`` of seed ``s`` depends on ``(s, i)`` only, so a larger dataset extends a smaller one.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass

import datasets
import numpy as np
import PIL.Image
import PIL.ImageDraw
import PIL.ImageFilter

SHAPE_CLASSES: tuple[str, ...] = ("circle", "square", "triangle", "star", "cross", "ring")
MIN_OBJECT_SIZE = 12
MAX_OBJECTS = 15
# Fraction of a shape that must stay visible after later shapes are drawn over it.
MIN_VISIBLE_FRACTION = 0.5
# Masks are drawn at this multiple of the image size and averaged down, which anti-aliases the edges.
_SUPERSAMPLE = 2
_PLACEMENT_ATTEMPTS = 12


def shapes_features() -> datasets.Features:
    """The cppe-5 object-detection schema with the shape classes as ``ClassLabel`` names."""
    return datasets.Features(
        {
            "image": datasets.Image(),
            "image_id": datasets.Value("int64"),
            "width": datasets.Value("int32"),
            "height": datasets.Value("int32"),
            "objects": {
                "id": datasets.List(datasets.Value("int64")),
                "area": datasets.List(datasets.Value("int64")),
                "bbox": datasets.List(datasets.List(datasets.Value("float32"), length=4)),
                "category": datasets.List(datasets.ClassLabel(names=list(SHAPE_CLASSES))),
            },
        }
    )


@dataclass(frozen=True)
class ShapesImage:
    """One generated image and its annotations (boxes are COCO ``[x, y, w, h]`` in pixels)."""

    image: PIL.Image.Image
    boxes: list[list[float]]
    categories: list[int]
    areas: list[int]


def make_shapes_dataset(num_images: int, seed: int, image_size: int = 256) -> datasets.Dataset:
    """Generate ``num_images`` square images of ``image_size`` pixels; same arguments, same bytes."""
    if isinstance(num_images, bool) or not isinstance(num_images, int) or num_images < 0:
        raise ValueError(f"num_images must be a non-negative int, got {num_images!r}")
    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 2 * MIN_OBJECT_SIZE + 8:
        raise ValueError(f"image_size must be an int of at least {2 * MIN_OBJECT_SIZE + 8}, got {image_size!r}")
    columns: dict[str, list] = {"image": [], "image_id": [], "width": [], "height": [], "objects": []}
    next_object_id = 0
    for index in range(num_images):
        sample = generate_image(seed, index, image_size)
        buffer = io.BytesIO()
        sample.image.save(buffer, format="PNG")
        ids = list(range(next_object_id, next_object_id + len(sample.boxes)))
        next_object_id += len(ids)
        columns["image"].append({"bytes": buffer.getvalue(), "path": None})
        columns["image_id"].append(index)
        columns["width"].append(image_size)
        columns["height"].append(image_size)
        columns["objects"].append(
            {"id": ids, "area": sample.areas, "bbox": sample.boxes, "category": sample.categories}
        )
    return datasets.Dataset.from_dict(columns, features=shapes_features())


def generate_image(seed: int, index: int, image_size: int) -> ShapesImage:
    """Image ``index`` of the dataset with ``seed``: a pure function of its arguments."""
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), int(index), 0x5AE5]))
    canvas = _background(rng, image_size)
    _draw_clutter(rng, canvas, image_size)
    pixels = np.asarray(canvas, dtype=np.float32)

    masks: list[np.ndarray] = []
    categories: list[int] = []
    # Shapes first, then the paint: a placement must be checked against every earlier shape's visible area.
    for _ in range(int(rng.integers(1, MAX_OBJECTS + 1))):
        for _attempt in range(_PLACEMENT_ATTEMPTS):
            category = int(rng.integers(len(SHAPE_CLASSES)))
            alpha = _shape_mask(rng, SHAPE_CLASSES[category], image_size)
            if _keeps_others_visible(alpha > 0.5, [m > 0.5 for m in masks]):
                masks.append(alpha)
                categories.append(category)
                break

    for alpha in masks:
        colour = _object_colour(rng, pixels, alpha > 0.5)
        window = _support(alpha)
        _paint(pixels, alpha, colour, window)
        if rng.random() < 0.3:
            # An outline in a contrasting shade, so some shapes have a border, as drawings and stickers do.
            edge = np.clip(alpha - _erode(alpha), 0, 1)
            _paint(pixels, edge, np.clip(colour * rng.uniform(0.2, 0.6), 0, 255), window)

    noise = rng.normal(0.0, rng.uniform(3.0, 12.0), size=pixels.shape)
    image = PIL.Image.fromarray(np.clip(pixels + noise, 0, 255).astype(np.uint8))
    if rng.random() < 0.3:
        image = image.filter(PIL.ImageFilter.GaussianBlur(radius=float(rng.uniform(0.3, 0.9))))

    boxes, areas, kept = [], [], []
    hidden = np.zeros((image_size, image_size), dtype=bool)
    # Walk from the top shape down: what lies under the union of later shapes is hidden.
    for alpha, category in zip(reversed(masks), reversed(categories)):
        visible = (alpha > 0.5) & ~hidden
        hidden |= alpha > 0.5
        rows, cols = np.nonzero(visible)
        if rows.size == 0:
            continue
        x0, y0, x1, y1 = int(cols.min()), int(rows.min()), int(cols.max()) + 1, int(rows.max()) + 1
        boxes.append([float(x0), float(y0), float(x1 - x0), float(y1 - y0)])
        areas.append(int(rows.size))
        kept.append(category)
    boxes.reverse()
    areas.reverse()
    kept.reverse()
    return ShapesImage(image=image, boxes=boxes, categories=kept, areas=areas)


def _support(alpha: np.ndarray) -> tuple[slice, slice]:
    """Rows and columns where ``alpha`` is non-zero (painting elsewhere changes nothing)."""
    rows = np.flatnonzero(alpha.any(axis=1))
    cols = np.flatnonzero(alpha.any(axis=0))
    if rows.size == 0:
        return slice(0, 0), slice(0, 0)
    return slice(rows[0], rows[-1] + 1), slice(cols[0], cols[-1] + 1)


def _paint(pixels: np.ndarray, alpha: np.ndarray, colour: np.ndarray, window: tuple[slice, slice]) -> None:
    """Blend ``colour`` into ``pixels`` (in place) with coverage ``alpha``."""
    region, weight = pixels[window], alpha[window][..., None]
    region *= 1 - weight
    region += colour[None, None, :] * weight


def _keeps_others_visible(new: np.ndarray, earlier: list[np.ndarray]) -> bool:
    """Whether drawing ``new`` on top still leaves every earlier shape (and itself) mostly visible."""
    if not new.any():
        return False
    above = new.copy()
    # From the newest earlier shape down, each shape is covered by everything drawn after it.
    for mask in reversed(earlier):
        area = mask.sum()
        if area and (mask & ~above).sum() < MIN_VISIBLE_FRACTION * area:
            return False
        above |= mask
    return True


# --------------------------------------------------------------------------------------------------------------------
# Backgrounds and clutter


def _random_colour(rng: np.random.Generator) -> np.ndarray:
    return rng.uniform(0, 255, size=3).astype(np.float32)


def _background(rng: np.random.Generator, size: int) -> PIL.Image.Image:
    kind = int(rng.integers(4))
    y, x = np.mgrid[0:size, 0:size].astype(np.float32) / size
    first, second = _random_colour(rng), _random_colour(rng)
    if kind == 0:
        # Linear gradient in a random direction.
        angle = rng.uniform(0, 2 * math.pi)
        t = (x * math.cos(angle) + y * math.sin(angle) + 1.5) / 3.0
        pixels = first * (1 - t[..., None]) + second * t[..., None]
    elif kind == 1:
        # Smooth blotches: coarse random noise upsampled.
        coarse = rng.uniform(0, 1, size=(int(rng.integers(3, 9)),) * 2).astype(np.float32)
        blotch = np.asarray(PIL.Image.fromarray(coarse, mode="F").resize((size, size), PIL.Image.Resampling.BICUBIC))
        t = np.clip(blotch, 0, 1)
        pixels = first * (1 - t[..., None]) + second * t[..., None]
    elif kind == 2:
        # Low-contrast stripes at a random angle and period.
        angle = rng.uniform(0, math.pi)
        period = rng.uniform(0.03, 0.2)
        t = 0.5 + 0.5 * np.sin(2 * math.pi * (x * math.cos(angle) + y * math.sin(angle)) / period)
        second = first + (second - first) * rng.uniform(0.15, 0.45)
        pixels = first * (1 - t[..., None]) + second * t[..., None]
    else:
        # Checkerboard of two close colours.
        cells = int(rng.integers(4, 16))
        t = ((np.floor(x * cells) + np.floor(y * cells)) % 2).astype(np.float32)
        second = first + (second - first) * rng.uniform(0.15, 0.45)
        pixels = first * (1 - t[..., None]) + second * t[..., None]
    grain = rng.normal(0, rng.uniform(2, 10), size=(size, size, 3))
    return PIL.Image.fromarray(np.clip(pixels + grain, 0, 255).astype(np.uint8))


def _draw_clutter(rng: np.random.Generator, canvas: PIL.Image.Image, size: int) -> None:
    """Unlabelled distractors: thin lines, arcs, dots and scribbles, never filled shapes."""
    draw = PIL.ImageDraw.Draw(canvas)
    for _ in range(int(rng.integers(3, 20))):
        colour = tuple(int(c) for c in _random_colour(rng))
        kind = int(rng.integers(4))
        x0, y0 = rng.uniform(0, size, size=2)
        if kind == 0:
            length, angle = rng.uniform(0.1, 0.6) * size, rng.uniform(0, 2 * math.pi)
            end = (x0 + length * math.cos(angle), y0 + length * math.sin(angle))
            draw.line([(x0, y0), end], fill=colour, width=int(rng.integers(1, 3)))
        elif kind == 1:
            radius = rng.uniform(0.05, 0.3) * size
            start = rng.uniform(0, 360)
            box = [x0 - radius, y0 - radius, x0 + radius, y0 + radius]
            draw.arc(box, start, start + rng.uniform(40, 200), fill=colour, width=int(rng.integers(1, 3)))
        elif kind == 2:
            for _dot in range(int(rng.integers(3, 12))):
                cx, cy = rng.uniform(0, size, size=2)
                r = rng.uniform(0.5, 2.5)
                draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=colour)
        else:
            points = [(float(x0), float(y0))]
            for _step in range(int(rng.integers(3, 8))):
                dx, dy = rng.normal(0, 0.06 * size, size=2)
                points.append((points[-1][0] + float(dx), points[-1][1] + float(dy)))
            draw.line(points, fill=colour, width=1)


def _object_colour(rng: np.random.Generator, pixels: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """A random colour, redrawn a few times if it is too close to the background it covers."""
    under = pixels[mask].mean(axis=0) if mask.any() else pixels.reshape(-1, 3).mean(axis=0)
    colour = _random_colour(rng)
    for _ in range(8):
        if np.linalg.norm(colour - under) > 80:
            break
        colour = _random_colour(rng)
    return colour


# --------------------------------------------------------------------------------------------------------------------
# Shapes


def _unit_outline(name: str, rng: np.random.Generator) -> list[np.ndarray]:
    """Polygons (each (k, 2), in [-1, 1]) whose union is the shape; ``ring`` is handled by the caller."""
    if name == "square":
        return [np.array([[-1, -1], [1, -1], [1, 1], [-1, 1]], dtype=np.float64)]
    if name == "triangle":
        angles = np.deg2rad([90, 210, 330])
        return [np.stack([np.cos(angles), -np.sin(angles)], axis=1)]
    if name == "star":
        inner = rng.uniform(0.38, 0.5)
        angles = np.deg2rad(90 + 36 * np.arange(10))
        radii = np.where(np.arange(10) % 2 == 0, 1.0, inner)
        return [np.stack([radii * np.cos(angles), -radii * np.sin(angles)], axis=1)]
    if name == "cross":
        arm = rng.uniform(0.28, 0.4)
        return [
            np.array([[-1, -arm], [1, -arm], [1, arm], [-1, arm]], dtype=np.float64),
            np.array([[-arm, -1], [arm, -1], [arm, 1], [-arm, 1]], dtype=np.float64),
        ]
    raise ValueError(f"unknown shape {name!r}")


def _shape_mask(rng: np.random.Generator, name: str, size: int) -> np.ndarray:
    """(size, size) float alpha in [0, 1] of one randomly sized, stretched, rotated and placed shape."""
    extent = math.exp(rng.uniform(math.log(MIN_OBJECT_SIZE), math.log(size / 2)))
    stretch = math.exp(rng.uniform(math.log(0.75), math.log(1.33)))
    half_x, half_y = extent / 2 * math.sqrt(stretch), extent / 2 / math.sqrt(stretch)
    angle = rng.uniform(0, 2 * math.pi)
    margin = max(half_x, half_y)
    centre = rng.uniform(margin * 0.6, size - margin * 0.6, size=2)

    scale = _SUPERSAMPLE
    mask = PIL.Image.new("L", (size * scale, size * scale), 0)
    draw = PIL.ImageDraw.Draw(mask)
    rotation = np.array([[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]])

    def to_pixels(points: np.ndarray) -> list[tuple[float, float]]:
        placed = (points * [half_x, half_y]) @ rotation.T + centre
        return [(float(px) * scale, float(py) * scale) for px, py in placed]

    if name in ("circle", "ring"):
        angles = np.linspace(0, 2 * math.pi, 64, endpoint=False)
        circle = np.stack([np.cos(angles), np.sin(angles)], axis=1)
        draw.polygon(to_pixels(circle), fill=255)
        if name == "ring":
            hole = rng.uniform(0.4, 0.6)
            draw.polygon(to_pixels(circle * hole), fill=0)
    else:
        for polygon in _unit_outline(name, rng):
            draw.polygon(to_pixels(polygon), fill=255)
    small = mask.resize((size, size), PIL.Image.Resampling.BOX)
    return np.asarray(small, dtype=np.float32) / 255.0


def _erode(alpha: np.ndarray) -> np.ndarray:
    image = PIL.Image.fromarray((alpha * 255).astype(np.uint8))
    return np.asarray(image.filter(PIL.ImageFilter.MinFilter(3)), dtype=np.float32) / 255.0
