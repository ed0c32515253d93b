"""The ``size`` argument of the image processors and the rule that turns it into an output (height, width).

The rule is transformers' (``get_size_with_aspect_ratio``): scale the short side to ``shortest_edge`` unless that
would push the long side past ``longest_edge``, in which case the long side is capped and the short side follows
from the *unrounded* capped value. Output sides are truncated with ``int()``, not rounded, so that a checkpoint
sees exactly the resolutions it saw in transformers.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from ddetr.processing.errors import ImageInputError

DEFAULT_SHORTEST_EDGE = 800
DEFAULT_LONGEST_EDGE = 1333
DEFAULT_SIZE: dict[str, int] = {"shortest_edge": DEFAULT_SHORTEST_EDGE, "longest_edge": DEFAULT_LONGEST_EDGE}

# The key sets the Deformable DETR processors know how to resize with.
_SIZE_FORMS: tuple[frozenset[str], ...] = (
    frozenset({"shortest_edge", "longest_edge"}),
    frozenset({"shortest_edge"}),
    frozenset({"height", "width"}),
    frozenset({"max_height", "max_width"}),
)


def normalize_size(size: Any = None, max_size: int | None = None) -> dict[str, int]:
    """Turn any accepted spelling of ``size`` into one of the size dicts.

    Accepted: ``None`` (the default 800/1333), a dict with one of the key sets ``{shortest_edge, longest_edge}``,
    ``{shortest_edge}``, ``{height, width}``, ``{max_height, max_width}``, a ``(height, width)`` pair, or the 2022
    feature-extractor spelling ``size=800`` with ``max_size=1333``. An int without ``max_size`` gets a 1333 cap, as
    transformers' Deformable DETR processor does; ``max_size`` is ignored for dicts and pairs, as there.
    """
    if size is None:
        if max_size is not None:
            return {"shortest_edge": DEFAULT_SHORTEST_EDGE, "longest_edge": _positive_int(max_size, "max_size")}
        return dict(DEFAULT_SIZE)
    if isinstance(size, bool):
        raise ValueError(f"size must be an int, a (height, width) pair or a dict, got {size!r}")
    if isinstance(size, int):
        longest = DEFAULT_LONGEST_EDGE if max_size is None else max_size
        return {"shortest_edge": _positive_int(size, "size"), "longest_edge": _positive_int(longest, "max_size")}
    if isinstance(size, Mapping):
        keys = frozenset(key for key, value in size.items() if value is not None)
        if keys not in _SIZE_FORMS:
            forms = ", ".join("{" + ", ".join(sorted(form)) + "}" for form in _SIZE_FORMS)
            raise ValueError(f"size must have one of the key sets {forms}; got keys {sorted(size)}")
        return {key: _positive_int(size[key], f"size[{key!r}]") for key in sorted(keys)}
    if isinstance(size, Sequence) and not isinstance(size, str) and len(size) == 2:
        return {"height": _positive_int(size[0], "size[0]"), "width": _positive_int(size[1], "size[1]")}
    raise ValueError(f"size must be an int, a (height, width) pair or a dict, got {size!r}")


def normalize_pad_size(pad_size: Any) -> dict[str, int] | None:
    """``None`` (pad to the largest image of the batch) or a fixed ``{height, width}`` canvas."""
    if pad_size is None:
        return None
    if isinstance(pad_size, Mapping) and set(pad_size) == {"height", "width"}:
        height, width = pad_size["height"], pad_size["width"]
    elif isinstance(pad_size, Sequence) and not isinstance(pad_size, str) and len(pad_size) == 2:
        height, width = pad_size
    else:
        raise ValueError(f"pad_size must be None or a dict with keys height and width, got {pad_size!r}")
    return {"height": _positive_int(height, "pad_size['height']"), "width": _positive_int(width, "pad_size['width']")}


def _positive_int(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


def get_size_with_aspect_ratio(image_size: tuple[int, int], size: int, max_size: int | None = None) -> tuple[int, int]:
    """Output (height, width) for short side ``size`` with the long side capped at ``max_size`` (see module doc)."""
    height, width = image_size
    short, long = min(height, width), max(height, width)
    capped_short: float | None = None
    if max_size is not None and long / short * size > max_size:
        capped_short = max_size * short / long
        size = round(capped_short)
    if short == size:
        return height, width
    # When capped, the long side comes from the unrounded short side; the 2022 feature extractor used the rounded
    # one (100x1000 -> 133x1330 there, 133x1333 here).
    scale_from = capped_short if capped_short is not None else size
    if width < height:
        return int(scale_from * height / width), size
    return size, int(scale_from * width / height)


def get_size_for_max_height_width(image_size: tuple[int, int], max_height: int, max_width: int) -> tuple[int, int]:
    """Largest (height, width) with the input's aspect ratio inside ``max_height`` x ``max_width`` (upscales too)."""
    height, width = image_size
    scale = min(max_height / height, max_width / width)
    return int(height * scale), int(width * scale)


def get_output_size(image_size: tuple[int, int], size: Mapping[str, int]) -> tuple[int, int]:
    """The resized (height, width) for an image of ``image_size`` under a normalised ``size`` dict.

    Raises ``ImageInputError`` when a side would become 0 rows or columns, e.g. 1x10000 under the 1333 cap, which
    transformers lets through to fail deep inside the resize.
    """
    height, width = image_size
    if height < 1 or width < 1:
        raise ImageInputError(f"image has no pixels: size {height}x{width} (height x width)")
    if "height" in size:
        output = (size["height"], size["width"])
    elif "max_height" in size:
        output = get_size_for_max_height_width(image_size, size["max_height"], size["max_width"])
    else:
        output = get_size_with_aspect_ratio(image_size, size["shortest_edge"], size.get("longest_edge"))
    if output[0] < 1 or output[1] < 1:
        raise ImageInputError(
            f"image of {height}x{width} (height x width) would be resized to {output[0]}x{output[1]} under "
            f"size={dict(size)}: its aspect ratio is too extreme; crop or pad it closer to 1:1 first"
        )
    return output
