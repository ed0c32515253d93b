"""Encoding annotated frames into a file browsers play: H.264 in mp4 (default) or VP9 in webm.

The file appears only when it is complete: frames go to a hidden temporary name in the destination folder, which
is renamed on ``close`` and deleted when writing fails or is aborted, so no reader ever sees half a video.
H.264 with 4:2:0 chroma needs even frame sizes: an odd width or height gets one replicated edge column or row.
"""

from __future__ import annotations

import contextlib
import os
import uuid
from fractions import Fraction
from pathlib import Path
from types import TracebackType

import numpy as np

from ddetr.video.reader import require_av

# suffix -> (encoder, codec options): fast presets, since encoding shares the CPU with the model.
ENCODERS: dict[str, tuple[str, dict[str, str]]] = {
    ".mp4": ("libx264", {"preset": "ultrafast", "crf": "23"}),
    ".webm": ("libvpx-vp9", {"deadline": "realtime", "cpu-used": "8", "crf": "32", "b": "0"}),
}


def even_size(width: int, height: int) -> tuple[int, int]:
    """The encoded size of a ``width``×``height`` frame (4:2:0 chroma needs even sides)."""
    return width + width % 2, height + height % 2


class VideoWriter:
    """Write ``(height, width, 3)`` uint8 RGB frames of one size at ``fps`` to ``path`` (.mp4 or .webm)."""

    def __init__(self, path: str | Path, *, width: int, height: int, fps: float) -> None:
        self.path = Path(path)
        suffix = self.path.suffix.lower()
        if suffix not in ENCODERS:
            raise ValueError(f"video output must end in {' or '.join(ENCODERS)}, got {self.path.name!r}")
        if width < 1 or height < 1:
            raise ValueError(f"frame size must be positive, got {width}×{height}")
        if not (fps > 0 and np.isfinite(fps)):
            raise ValueError(f"fps must be positive, got {fps}")
        self.width, self.height = width, height
        self.frames = 0
        self._finished = False  # the file is in place
        self._dropped = False  # aborted: the temporary file is gone
        av = require_av()
        self._temporary = self.path.with_name(f".{self.path.stem}.{uuid.uuid4().hex[:8]}.partial{suffix}")
        encoder, options = ENCODERS[suffix]
        container_options = {"movflags": "faststart"} if suffix == ".mp4" else {}
        self._container = av.open(str(self._temporary), mode="w", format=suffix.lstrip("."), options=container_options)
        try:
            self._stream = self._container.add_stream(encoder, rate=Fraction(fps).limit_denominator(1001))
            self._stream.width, self._stream.height = even_size(width, height)
            self._stream.pix_fmt = "yuv420p"
            self._stream.options = options
        except BaseException:
            self.abort()
            raise
        self._av = av

    def write(self, image: np.ndarray) -> None:
        if self._finished or self._dropped:
            raise ValueError(f"{self.path.name}: the writer is already {'closed' if self._finished else 'aborted'}")
        if image.shape != (self.height, self.width, 3) or image.dtype != np.uint8:
            raise ValueError(f"frames must be ({self.height}, {self.width}, 3) uint8, got {image.shape} {image.dtype}")
        padded_width, padded_height = even_size(self.width, self.height)
        if (padded_width, padded_height) != (self.width, self.height):
            pad = ((0, padded_height - self.height), (0, padded_width - self.width), (0, 0))
            image = np.pad(image, pad, mode="edge")
        frame = self._av.VideoFrame.from_ndarray(np.ascontiguousarray(image), format="rgb24")
        for packet in self._stream.encode(frame):
            self._container.mux(packet)
        self.frames += 1

    def close(self) -> Path:
        """Flush, finish the file and move it into place; returns its path.

        Closing twice is harmless (a ``with`` block around an explicit ``close``). A writer given no frame writes
        nothing: no reader accepts a video without frames, so that is a ``ValueError``, not an empty file.
        """
        if self._finished:
            return self.path
        if self._dropped:
            raise ValueError(f"{self.path.name}: the writer was aborted, so no video was made")
        if self.frames == 0:
            self.abort()
            raise ValueError(f"{self.path.name}: no frames were written, so no video was made")
        try:
            for packet in self._stream.encode(None):
                self._container.mux(packet)
            self._container.close()
            os.replace(self._temporary, self.path)
        except BaseException:
            self.abort()
            raise
        self._finished = True
        return self.path

    def abort(self) -> None:
        """Drop the unfinished file (a finished one stays)."""
        if self._finished or self._dropped:
            return
        self._dropped = True
        with contextlib.suppress(Exception):  # the container may already be broken; the file goes either way
            self._container.close()
        self._temporary.unlink(missing_ok=True)

    def __enter__(self) -> VideoWriter:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, traceback: TracebackType | None
    ) -> None:
        if error is None:
            self.close()
        else:
            self.abort()
