"""Line charts of a run's curves (loss, mAP), drawn with Pillow so that no plotting library is needed."""

from __future__ import annotations

import math
import os
import uuid
from collections.abc import Mapping, Sequence
from pathlib import Path

import PIL.Image
import PIL.ImageDraw
import PIL.ImageFont

from finetune.run.metrics_log import read_metrics

Series = Sequence[tuple[float, float]]
_COLOURS = ((31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75))
_WIDTH, _HEIGHT = 800, 480
_MARGIN_LEFT, _MARGIN_RIGHT, _MARGIN_TOP, _MARGIN_BOTTOM = 70, 20, 40, 50


def _nice_ticks(low: float, high: float, count: int = 5) -> list[float]:
    if high <= low:
        high = low + 1.0
    raw = (high - low) / count
    magnitude = 10 ** math.floor(math.log10(raw))
    step = next(m * magnitude for m in (1, 2, 2.5, 5, 10) if m * magnitude >= raw)
    # From the last tick at or below ``low`` to the first at or above ``high``: the axis spans every point.
    first, last = math.floor(low / step + 1e-9), math.ceil(high / step - 1e-9)
    return [round(index * step, 10) for index in range(first, last + 1)]


def _label(value: float) -> str:
    if value == 0:
        return "0"
    if 1000 <= abs(value) < 1e6:
        # Step counts: "12,000" reads at a glance where "1.2e+04" does not.
        return f"{value:,.0f}"
    if abs(value) >= 1e6 or abs(value) < 0.01:
        return f"{value:.2g}"
    return f"{value:g}"


def draw_line_chart(series: Mapping[str, Series], path: Path, *, title: str, x_label: str, y_label: str) -> Path:
    """Write a PNG with one line per named series (points sorted by x; non-finite points skipped)."""
    font = PIL.ImageFont.load_default(size=13)
    image = PIL.Image.new("RGB", (_WIDTH, _HEIGHT), "white")
    draw = PIL.ImageDraw.Draw(image)
    cleaned = {
        name: sorted((float(x), float(y)) for x, y in points if math.isfinite(x) and math.isfinite(y))
        for name, points in series.items()
    }
    cleaned = {name: points for name, points in cleaned.items() if points}
    left, top = _MARGIN_LEFT, _MARGIN_TOP
    right, bottom = _WIDTH - _MARGIN_RIGHT, _HEIGHT - _MARGIN_BOTTOM
    draw.text((_WIDTH / 2, 12), title, fill="black", font=font, anchor="mt")
    draw.rectangle([left, top, right, bottom], outline=(120, 120, 120))
    if not cleaned:
        draw.text(((left + right) / 2, (top + bottom) / 2), "no data yet", fill="gray", font=font, anchor="mm")
        return _save(image, path)

    xs = [x for points in cleaned.values() for x, _ in points]
    ys = [y for points in cleaned.values() for _, y in points]
    x_ticks, y_ticks = _nice_ticks(min(xs), max(xs)), _nice_ticks(min(ys), max(ys))
    x_low, x_high = x_ticks[0], max(x_ticks[-1], x_ticks[0] + 1e-9)
    y_low, y_high = y_ticks[0], max(y_ticks[-1], y_ticks[0] + 1e-9)

    def to_pixel(x: float, y: float) -> tuple[float, float]:
        return (
            left + (x - x_low) / (x_high - x_low) * (right - left),
            bottom - (y - y_low) / (y_high - y_low) * (bottom - top),
        )

    for tick in x_ticks:
        px, _ = to_pixel(tick, y_low)
        draw.line([(px, top), (px, bottom)], fill=(232, 232, 232))
        draw.text((px, bottom + 6), _label(tick), fill="black", font=font, anchor="mt")
    for tick in y_ticks:
        _, py = to_pixel(x_low, tick)
        draw.line([(left, py), (right, py)], fill=(232, 232, 232))
        draw.text((left - 6, py), _label(tick), fill="black", font=font, anchor="rm")
    draw.text(((left + right) / 2, _HEIGHT - 14), x_label, fill="black", font=font, anchor="mb")
    draw.text((8, (top + bottom) / 2), y_label, fill="black", font=font, anchor="lm")

    for number, (name, points) in enumerate(cleaned.items()):
        colour = _COLOURS[number % len(_COLOURS)]
        pixels = [to_pixel(x, y) for x, y in points]
        if len(pixels) == 1:
            x, y = pixels[0]
            draw.ellipse([x - 3, y - 3, x + 3, y + 3], fill=colour)
        else:
            draw.line(pixels, fill=colour, width=2)
        legend_y = top + 8 + 18 * number
        draw.line([(right - 150, legend_y), (right - 125, legend_y)], fill=colour, width=3)
        draw.text((right - 118, legend_y), name, fill="black", font=font, anchor="lm")
    return _save(image, path)


def _save(image: PIL.Image.Image, path: Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.stem}-{uuid.uuid4().hex[:12]}.png")
    try:
        image.save(temporary, format="PNG")
        os.replace(temporary, path)
    finally:
        if temporary.exists():
            temporary.unlink()
    return path


def smooth(points: Series, window: int) -> list[tuple[float, float]]:
    """Trailing moving average, so a noisy per-step loss still shows its trend."""
    smoothed, values = [], []
    for x, y in points:
        values.append(y)
        recent = values[-window:]
        smoothed.append((x, sum(recent) / len(recent)))
    return smoothed


def plot_run(output_dir: Path) -> list[Path]:
    """``loss.png`` and ``map.png`` from a run's ``metrics.jsonl``."""
    metrics = Path(output_dir) / "metrics.jsonl"
    train = [(r["step"], r["loss"]) for r in read_metrics(metrics, kind="train") if r.get("loss") is not None]
    evals = read_metrics(metrics, kind="eval")
    loss_series: dict[str, Series] = {"loss": train}
    if len(train) >= 10:
        loss_series["loss (smoothed)"] = smooth(train, max(2, len(train) // 20))
    written = [
        draw_line_chart(
            loss_series, Path(output_dir) / "loss.png", title="Training loss", x_label="step", y_label="loss"
        )
    ]
    map_series = {
        name: [(r["step"], r[key]) for r in evals if r.get(key) is not None and r[key] >= 0]
        for name, key in (("mAP", "map"), ("mAP@0.5", "map_50"), ("mAP@0.75", "map_75"))
    }
    written.append(
        draw_line_chart(map_series, Path(output_dir) / "map.png", title="Validation mAP", x_label="step", y_label="mAP")
    )
    return written
