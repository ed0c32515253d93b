"""The data types between the dataset formats, validation and training.

A format reader yields :class:`RawRecord`\\ s exactly as the files say (values may be missing, strings, NaN, out of
range); validation turns them into :class:`Sample`\\ s, whose boxes are finite, inside the image and of a known
class. A :class:`DetectionSplit` holds the samples of one split and knows how to fetch their image bytes.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

# A record's image: a file path, or the row of the split's Hugging Face dataset.
ImageRef = str | int


@dataclass
class RawObject:
    """One annotated object as stored: ``bbox`` should be COCO ``[x, y, width, height]`` in pixels."""

    bbox: Any
    category: Any
    id: Any = None
    iscrowd: Any = 0


@dataclass
class RawRecord:
    """One image and its objects as stored. ``where`` names it in messages (split, position, id, file).

    ``problem``: why a record has no usable image, as the reader found it -- ``(kind, detail)`` with ``kind`` one
    of validation's per-image problems (e.g. ``missing_image`` for a name that cannot be a path);
    validation counts it and drops the record."""

    where: str
    image: ImageRef | None
    image_id: Any
    width: Any
    height: Any
    objects: list[RawObject] = field(default_factory=list)
    problem: tuple[str, str] | None = None


@dataclass(frozen=True)
class Sample:
    """A validated image: ``boxes`` (n, 4) float32 COCO xywh inside the image, ``labels`` (n,) int64 in 0..K-1."""

    where: str
    image: ImageRef
    image_id: int
    width: int
    height: int
    boxes: np.ndarray
    labels: np.ndarray

    def __post_init__(self) -> None:
        if self.boxes.shape != (len(self.labels), 4):
            raise ValueError(f"{self.where}: boxes {self.boxes.shape} do not match {len(self.labels)} labels")


class RecordSource(Protocol):
    """One split of a dataset, as a format reader provides it.

    A reader may also have ``orphan_annotations`` (descriptions of annotations that name no image) and
    ``conversions`` (``(kind, description)`` pairs for objects it had to convert, such as a rotated box made
    axis-aligned), both filled while ``records()`` runs; validation counts them."""

    name: str

    def records(self) -> Iterator[RawRecord]: ...

    def image_bytes(self, image: ImageRef) -> bytes | str:
        """Encoded bytes, or a file path, for an image reference of this split."""
        ...


@dataclass
class DetectionSplit:
    """The validated samples of one split plus the means to read their images (picklable for loader workers)."""

    name: str
    samples: list[Sample]
    source: RecordSource

    def __len__(self) -> int:
        return len(self.samples)

    def image_source(self, index: int) -> bytes | str:
        return self.source.image_bytes(self.samples[index].image)

    def subset(self, name: str, indices: list[int]) -> DetectionSplit:
        return DetectionSplit(name=name, samples=[self.samples[i] for i in indices], source=self.source)


CategoryIndex = Callable[[Any], "int | None"]
