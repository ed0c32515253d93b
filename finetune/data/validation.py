"""Checking a dataset before training, on CPU: every problem is counted, fixable boxes are clipped, the rest dropped.

Problems, per object (each object is counted once, under the first that applies, in this order):

    non_finite             bbox is not four finite numbers (NaN, inf, strings, wrong length)
    unknown_category       the category is not one of the dataset's classes
    duplicate_object_id    the object id repeats an earlier one of the split (the later object is dropped)
    zero_or_negative_size  width or height <= 0 (dropped)
    outside_image          the box leaves the image by more than half a pixel: clipped when at least 1x1 px
                           of it lies inside, dropped otherwise

per image (the image is dropped, except for ``empty_image`` and ``size_mismatch``):

    missing_image          no image reference, or the file does not exist
    undecodable_image      the bytes are not a supported, intact image
    duplicate_image_id     the image id repeats an earlier one of the split
    size_mismatch          the stored width/height differ from the decoded image (boxes are checked against the
                           decoded size)
    empty_image            no usable object is left (kept: a negative example)

and ``orphan_annotation`` for COCO annotations whose image_id names no image. A second record of a split naming
the same image file is dropped as ``duplicate_image_id``; a path leading outside the dataset folder never gets
here: every reader refuses the dataset when it is opened (unless ``allow_outside_files``). Objects a reader
converted (a rotated box made axis-aligned, a polygon reduced to its box, a shape that is not a box left out) are
counted under ``conversions`` (documented behaviour of each reader, not problems: ``strict`` lets them through).
Crowd objects (``iscrowd=1``) are not problems; they are left out of training and counted as ``crowd_ignored``. With
``strict=True`` the first problem raises ``DatasetValidationError`` naming the record.
"""

from __future__ import annotations

import io
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import PIL.Image

from ddetr.processing import ALLOWED_IMAGE_FORMATS
from finetune.data.categories import CategoryMap
from finetune.data.records import RawRecord, RecordSource, Sample

PROBLEMS: tuple[str, ...] = (
    "non_finite",
    "unknown_category",
    "duplicate_object_id",
    "zero_or_negative_size",
    "outside_image",
    "missing_image",
    "undecodable_image",
    "duplicate_image_id",
    "size_mismatch",
    "empty_image",
    "orphan_annotation",
)
# Rounding in annotation tools puts boxes a fraction of a pixel past the border; that is not worth reporting.
OUTSIDE_TOLERANCE_PX = 0.5
MAX_IMAGE_PIXELS = 50_000_000
_EXAMPLES_PER_PROBLEM = 3
_EXIF_ORIENTATION_TAG = 0x0112


class DatasetValidationError(ValueError):
    """A dataset problem under ``strict``; the message names the split, the record and the problem."""


@dataclass
class ValidationReport:
    """Counts of one split's problems and of what was kept, clipped and dropped."""

    split: str
    images_seen: int = 0
    objects_seen: int = 0
    images_kept: int = 0
    objects_kept: int = 0
    boxes_clipped: int = 0
    boxes_dropped: int = 0
    images_dropped: int = 0
    crowd_ignored: int = 0
    counts: dict[str, int] = field(default_factory=lambda: dict.fromkeys(PROBLEMS, 0))
    conversions: dict[str, int] = field(default_factory=dict)
    examples: dict[str, list[str]] = field(default_factory=dict)

    @property
    def problem_count(self) -> int:
        return sum(self.counts.values())

    def to_dict(self) -> dict[str, Any]:
        return {
            "split": self.split,
            "images_seen": self.images_seen,
            "objects_seen": self.objects_seen,
            "images_kept": self.images_kept,
            "objects_kept": self.objects_kept,
            "boxes_clipped": self.boxes_clipped,
            "boxes_dropped": self.boxes_dropped,
            "images_dropped": self.images_dropped,
            "crowd_ignored": self.crowd_ignored,
            "counts": dict(self.counts),
            "conversions": dict(self.conversions),
            "examples": {key: list(value) for key, value in self.examples.items()},
        }

    def format(self) -> str:
        lines = [
            f"[{self.split}] {self.images_seen} images, {self.objects_seen} objects -> kept {self.images_kept} "
            f"images, {self.objects_kept} objects ({self.boxes_clipped} boxes clipped, {self.boxes_dropped} dropped, "
            f"{self.images_dropped} images dropped, {self.crowd_ignored} crowd ignored)"
        ]
        for problem in PROBLEMS:
            if self.counts[problem]:
                example = self.examples.get(problem, [""])[0]
                lines.append(f"    {problem:<22} {self.counts[problem]:>7}   e.g. {example}")
        for kind, count in self.conversions.items():
            example = self.examples.get(kind, [""])[0]
            lines.append(f"    {kind:<22} {count:>7}   e.g. {example}")
        if not self.problem_count:
            lines.append("    no problems found")
        return "\n".join(lines)


class _Recorder:
    """Counts problems; raises on the first one when strict."""

    def __init__(self, report: ValidationReport, strict: bool) -> None:
        self.report = report
        self.strict = strict

    def __call__(self, problem: str, where: str, detail: str) -> None:
        if self.strict:
            raise DatasetValidationError(f"{where}: {detail} ({problem}; run without --strict to drop or fix it)")
        self.report.counts[problem] += 1
        examples = self.report.examples.setdefault(problem, [])
        if len(examples) < _EXAMPLES_PER_PROBLEM:
            examples.append(f"{where}: {detail}")


class CheckBudgetExceeded(ValueError):
    """Validation took more time or images than its caller allowed (a shared server bounds every visitor's check)."""


@dataclass(frozen=True)
class CheckBudget:
    """How much validation a caller allows: at most ``max_images`` records and ``max_seconds`` of wall time over
    all the splits of one dataset (None: no bound). ``start()`` gives the meter one check uses."""

    max_images: int | None = None
    max_seconds: float | None = None

    def start(self) -> CheckMeter:
        return CheckMeter(self, time.monotonic())


@dataclass
class CheckMeter:
    budget: CheckBudget
    started: float
    images: int = 0

    def count(self) -> None:
        """One more record; CheckBudgetExceeded once the budget is spent."""
        self.images += 1
        limit, seconds = self.budget.max_images, self.budget.max_seconds
        if limit is not None and self.images > limit:
            raise CheckBudgetExceeded(f"the dataset has more than {limit} images, the most checked here")
        if seconds is not None and self.images % 64 == 0 and time.monotonic() - self.started > seconds:
            raise CheckBudgetExceeded(
                f"checking the dataset took longer than {seconds:g} s (stopped after {self.images} images)"
            )


def validate_split(
    source: RecordSource, categories: CategoryMap, *, strict: bool = False, meter: CheckMeter | None = None
) -> tuple[list[Sample], ValidationReport]:
    """Validate every record of ``source``; returns the usable samples and the report. ``meter``: the budget this
    check may spend (``CheckBudget.start()``; None: unbounded)."""
    report = ValidationReport(split=source.name)
    record = _Recorder(report, strict)
    samples: list[Sample] = []
    seen_image_ids: set[Any] = set()
    seen_object_ids: set[Any] = set()
    seen_files: dict[str, str] = {}
    for raw in source.records():
        if meter is not None:
            meter.count()
        report.images_seen += 1
        report.objects_seen += len(raw.objects)
        sample = _validate_record(raw, source, categories, record, seen_image_ids, seen_object_ids, seen_files)
        if sample is None:
            report.images_dropped += 1
            report.boxes_dropped += len(raw.objects)
            continue
        samples.append(sample)
    for description in getattr(source, "orphan_annotations", []):
        record("orphan_annotation", source.name, description)
        report.boxes_dropped += 1
    for kind, description in getattr(source, "conversions", []):
        report.conversions[kind] = report.conversions.get(kind, 0) + 1
        examples = report.examples.setdefault(kind, [])
        if len(examples) < _EXAMPLES_PER_PROBLEM:
            examples.append(description)
    report.images_kept = len(samples)
    report.objects_kept = sum(len(s.labels) for s in samples)
    return samples, report


def _validate_record(
    raw: RawRecord,
    source: RecordSource,
    categories: CategoryMap,
    record: _Recorder,
    seen_image_ids: set[Any],
    seen_object_ids: set[Any],
    seen_files: dict[str, str],
) -> Sample | None:
    if raw.image is None:
        kind, detail = raw.problem or ("missing_image", "the record names no image")
        record(kind, raw.where, detail)
        return None
    if isinstance(raw.image, str):
        if raw.image in seen_files:
            record(
                "duplicate_image_id",
                raw.where,
                f"the image file {raw.image} is already used by an earlier record ({seen_files[raw.image]})",
            )
            return None
        seen_files[raw.image] = raw.where
    try:
        width, height = probe_image(source.image_bytes(raw.image))
    except FileNotFoundError as error:
        record("missing_image", raw.where, f"image not found ({error})")
        return None
    except ValueError as error:
        record("undecodable_image", raw.where, str(error))
        return None
    try:
        duplicate = raw.image_id in seen_image_ids
        seen_image_ids.add(raw.image_id)
    except TypeError:
        duplicate = False
    if duplicate:
        record("duplicate_image_id", raw.where, f"image id {raw.image_id!r} was already used by an earlier image")
        return None
    # Evaluation numbers images itself, so an id that is not an integer is only a name.
    image_id = _as_int(raw.image_id)
    if image_id is None:
        image_id = -len(seen_image_ids)
    declared = (_as_int(raw.width), _as_int(raw.height))
    if raw.width is not None and raw.height is not None and declared != (width, height):
        record(
            "size_mismatch",
            raw.where,
            f"stored size {raw.width}x{raw.height} but the image is {width}x{height} (width x height)",
        )

    boxes, labels = [], []
    report = record.report
    for number, obj in enumerate(raw.objects):
        where = f"{raw.where} object {number} (id {obj.id!r})"
        if _as_int(obj.iscrowd) == 1:
            report.crowd_ignored += 1
            continue
        box = _finite_box(obj.bbox)
        if box is None:
            record("non_finite", where, f"bbox {obj.bbox!r} is not four finite numbers")
            report.boxes_dropped += 1
            continue
        label = categories.index(obj.category)
        if label is None:
            record("unknown_category", where, f"category {obj.category!r} is not a class ({categories.describe()})")
            report.boxes_dropped += 1
            continue
        if obj.id is not None:
            try:
                duplicate = obj.id in seen_object_ids
                seen_object_ids.add(obj.id)
            except TypeError:
                duplicate = False
            if duplicate:
                record("duplicate_object_id", where, f"object id {obj.id!r} was already used in this split")
                report.boxes_dropped += 1
                continue
        x, y, w, h = box
        if w <= 0 or h <= 0:
            record("zero_or_negative_size", where, f"bbox {list(box)} has width or height <= 0")
            report.boxes_dropped += 1
            continue
        tolerance = OUTSIDE_TOLERANCE_PX
        x0, y0, x1, y1 = x, y, x + w, y + h
        clipped = (max(x0, 0.0), max(y0, 0.0), min(x1, float(width)), min(y1, float(height)))
        if x0 < -tolerance or y0 < -tolerance or x1 > width + tolerance or y1 > height + tolerance:
            if clipped[2] - clipped[0] < 1 or clipped[3] - clipped[1] < 1:
                record("outside_image", where, f"bbox {list(box)} lies outside the {width}x{height} image")
                report.boxes_dropped += 1
                continue
            record("outside_image", where, f"bbox {list(box)} leaves the {width}x{height} image; clipped")
            report.boxes_clipped += 1
        elif clipped[2] - clipped[0] <= 0 or clipped[3] - clipped[1] <= 0:
            record("zero_or_negative_size", where, f"bbox {list(box)} has no area inside the image")
            report.boxes_dropped += 1
            continue
        boxes.append([clipped[0], clipped[1], clipped[2] - clipped[0], clipped[3] - clipped[1]])
        labels.append(label)
    if not labels:
        record("empty_image", raw.where, "no usable objects (kept as a negative example)")
    return Sample(
        where=raw.where,
        image=raw.image,
        image_id=image_id,
        width=width,
        height=height,
        boxes=np.asarray(boxes, dtype=np.float32).reshape(-1, 4),
        labels=np.asarray(labels, dtype=np.int64),
    )


def _as_int(value: Any) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)) and math.isfinite(value) and float(value).is_integer():
        return int(value)
    return None


def _finite_box(bbox: Any) -> tuple[float, float, float, float] | None:
    if isinstance(bbox, np.ndarray):
        bbox = bbox.tolist()
    if not isinstance(bbox, Sequence) or isinstance(bbox, (str, bytes)) or len(bbox) != 4:
        return None
    values = []
    for value in bbox:
        if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
            return None
        if not math.isfinite(float(value)):
            return None
        values.append(float(value))
    return values[0], values[1], values[2], values[3]


def probe_image(source: bytes | str) -> tuple[int, int]:
    """(width, height) of an encoded image as it will be used (EXIF orientation applied), after checking that it
    decodes. JPEGs are decoded at reduced scale (still reading every byte), which keeps checking big datasets fast.

    Raises FileNotFoundError for a missing file and ValueError for anything that is not a supported, intact image.
    """
    if isinstance(source, str):
        try:
            with open(source, "rb") as handle:
                data = handle.read()
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            raise FileNotFoundError(source) from None
        except OSError as error:
            raise ValueError(f"cannot read {source}: {error}") from None
    else:
        data = bytes(source)
    if not data:
        raise ValueError("the image is empty (0 bytes)")
    PIL.Image.init()
    formats = [name for name in ALLOWED_IMAGE_FORMATS if name in PIL.Image.OPEN]
    try:
        with PIL.Image.open(io.BytesIO(data), formats=formats) as image:
            width, height = image.size
            if width < 1 or height < 1 or width * height > MAX_IMAGE_PIXELS:
                raise ValueError(f"image size {width}x{height} is empty or above {MAX_IMAGE_PIXELS} pixels")
            try:
                orientation = image.getexif().get(_EXIF_ORIENTATION_TAG, 1)
            except Exception:
                orientation = 1
            if image.format == "JPEG":
                image.draft("RGB", (max(1, width // 8), max(1, height // 8)))
            image.load()
    except ValueError:
        raise
    except Exception as error:
        raise ValueError(f"not a decodable image ({type(error).__name__}: {error})") from None
    # Orientations 5-8 transpose the image: the model sees it with width and height swapped.
    return (height, width) if orientation in (5, 6, 7, 8) else (width, height)


def format_reports(reports: Sequence[ValidationReport]) -> str:
    return "\n".join(report.format() for report in reports)
