"""How much video a caller accepts: duration, frame count and frame size, each refusal naming its limit.

The library's defaults only stop what no machine should attempt; the demo app passes tighter ones, sized for a
shared 2-core Space, and names its own command-line flags in the refusals (``flags``).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field


class VideoInputError(ValueError):
    """A video file that cannot be used: the message names the file and what is wrong with it."""


class VideoLimitError(VideoInputError):
    """A video over one of the limits: the message names the limit (and the setting that raises it)."""


@dataclass(frozen=True)
class VideoLimits:
    """``None`` means unlimited. ``flags`` maps a field name to the option that sets it, quoted in refusals."""

    max_seconds: float | None = None
    max_frames: int | None = None
    max_side: int | None = 8192  # pixels, the longer side of a frame
    flags: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name in ("max_seconds", "max_frames", "max_side"):
            value = getattr(self, name)
            if value is not None and not value > 0:
                raise ValueError(f"{name} must be positive or None, got {value}")

    def _named(self, name: str) -> str:
        flag = self.flags.get(name)
        return f" ({flag})" if flag else ""

    def check_size(self, width: int, height: int) -> None:
        if self.max_side is not None and max(width, height) > self.max_side:
            raise VideoLimitError(
                f"the video is {width}×{height}: frames may be at most {self.max_side} px on their longer side"
                f"{self._named('max_side')}"
            )

    def check_declared(self, *, duration: float | None, frame_count: int | None) -> None:
        """Refuse what the container declares above a limit, before decoding anything."""
        if self.max_seconds is not None and duration is not None and duration > self.max_seconds:
            raise VideoLimitError(
                f"the video lasts {duration:.1f} s: at most {self.max_seconds:g} s are accepted"
                f"{self._named('max_seconds')}"
            )
        if self.max_frames is not None and frame_count is not None and frame_count > self.max_frames:
            raise VideoLimitError(
                f"the video has {frame_count} frames: at most {self.max_frames} are accepted{self._named('max_frames')}"
            )

    def check_progress(self, *, frames: int, seconds: float) -> None:
        """Enforce the limits while decoding, for files that declared no duration or frame count (or lied)."""
        if self.max_frames is not None and frames > self.max_frames:
            raise VideoLimitError(
                f"the video has more than {self.max_frames} frames: at most {self.max_frames} are accepted"
                f"{self._named('max_frames')}"
            )
        if self.max_seconds is not None and seconds > self.max_seconds:
            raise VideoLimitError(
                f"the video lasts more than {self.max_seconds:g} s: at most {self.max_seconds:g} s are accepted"
                f"{self._named('max_seconds')}"
            )
