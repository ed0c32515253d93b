"""Generated test clips for the video and webcam benchmarks: shapes moving over a textured background.

The bundled shapes model was trained on textured backgrounds (on flat ones it is unsure), so the background is
blurred noise; the shapes move every frame so the tracker has real work. Nothing is downloaded and the clips are
deterministic. Benchmarks may not import from ``tests/``, hence this small generator of their own.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import PIL.Image
import PIL.ImageDraw

from ddetr.video.reader import require_av


def shape_frames(count: int, width: int = 640, height: int = 360, seed: int = 0) -> Iterator[np.ndarray]:
    """``count`` frames, (height, width, 3) uint8 RGB: two circles and two triangles drifting sideways and a square
    bobbing up and down, each about a sixth of the frame's short side (sizes the bundled model detects best)."""
    rng = np.random.default_rng(seed)
    unit = min(width, height) / 240  # the layout is designed for a 240-pixel short side and scaled to the frame
    # Smooth colour blotches plus fine noise: close to the training images' backgrounds.
    coarse = rng.uniform(0, 255, (5, 9, 3)).astype(np.uint8)
    blotches = np.asarray(PIL.Image.fromarray(coarse).resize((width, height), PIL.Image.Resampling.BICUBIC))
    background = (blotches + rng.normal(0, 8, (height, width, 3))).clip(0, 255).astype(np.uint8)
    side = 40 * unit
    span = width - side

    def across(start: float, speed: float, t: int) -> float:
        # Bounce between the edges, so long clips (and the looping fake camera) keep every shape in view.
        position = (start + speed * unit * t) % (2 * span)
        return position if position < span else 2 * span - position

    for t in range(count):
        image = PIL.Image.fromarray(background)
        draw = PIL.ImageDraw.Draw(image)
        bob = 30 * unit * abs((t % 40) / 20 - 1)
        for kind, x, y, colour in (
            ("circle", across(10 * unit, 5, t), 20 * unit, (230, 30, 30)),
            ("triangle", across(span - 10 * unit, -4, t), 120 * unit, (250, 220, 30)),
            ("square", width / 2 - side / 2, 60 * unit + bob, (30, 60, 230)),
            ("circle", across(span / 2, -3, t), 170 * unit, (40, 200, 60)),
            ("triangle", across(span / 3, 6, t), 70 * unit, (240, 240, 240)),
        ):
            box = (x, y, x + side, y + side)
            if kind == "circle":
                draw.ellipse(box, fill=colour)
            elif kind == "square":
                draw.rectangle(box, fill=colour)
            else:
                draw.polygon([(x, y + side), (x + side, y + side), (x + side / 2, y)], fill=colour)
        yield np.asarray(image)


def write_mp4(path: Path, count: int, width: int, height: int, fps: int = 30) -> Path:
    """An H.264 mp4 of :func:`shape_frames`, the kind of file a visitor uploads (dimensions must be even)."""
    av = require_av()
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height = width, height
        stream.pix_fmt = "yuv420p"
        stream.options = {"preset": "veryfast", "crf": "20"}
        for pixels in shape_frames(count, width, height):
            for packet in stream.encode(av.VideoFrame.from_ndarray(pixels, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode(None):
            container.mux(packet)
    return path


def write_y4m(path: Path, count: int, width: int = 640, height: int = 480, fps: int = 15) -> Path:
    """A raw 4:2:0 Y4M of :func:`shape_frames` for Chromium's fake camera, which loops it.

    Raw video is big (640x480: 460 KB a frame), so keep ``count`` small; the frame rate comes from the header.
    """
    av = require_av()
    with av.open(str(path), "w", format="yuv4mpegpipe") as container:
        stream = container.add_stream("rawvideo", rate=fps)
        stream.width, stream.height = width, height
        stream.pix_fmt = "yuv420p"
        for pixels in shape_frames(count, width, height):
            for packet in stream.encode(av.VideoFrame.from_ndarray(pixels, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode(None):
            container.mux(packet)
    return path
