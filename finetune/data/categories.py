"""Class names and the map from a dataset's stored category values to contiguous label indices 0..K-1."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class CategoryMap:
    """``names[i]`` is class ``i``; ``lookup`` maps each stored category value (ClassLabel index, COCO category id,
    or name) to its index. Values absent from ``lookup`` are unknown categories."""

    names: tuple[str, ...]
    lookup: dict[Any, int]

    def __post_init__(self) -> None:
        if not self.names:
            raise ValueError("a detection dataset needs at least one class")
        if len(set(self.names)) != len(self.names):
            duplicates = sorted({name for name in self.names if self.names.count(name) > 1})
            raise ValueError(f"class names must be unique, got duplicates {duplicates}")

    def index(self, value: Any) -> int | None:
        if isinstance(value, bool):
            return None
        try:
            return self.lookup.get(value)
        except TypeError:  # unhashable (a list, a dict): certainly not a category
            return None

    def describe(self) -> str:
        shown = ", ".join(f"{key!r}->{self.names[index]}" for key, index in list(self.lookup.items())[:12])
        more = "" if len(self.lookup) <= 12 else f", ... ({len(self.lookup)} in all)"
        return shown + more

    @classmethod
    def from_names(cls, names: Iterable[str]) -> CategoryMap:
        """Categories stored as indices into ``names`` (a ``ClassLabel``)."""
        names = tuple(str(name) for name in names)
        return cls(names=names, lookup={index: index for index in range(len(names))})

    @classmethod
    def from_coco(cls, categories: list[dict[str, Any]]) -> CategoryMap:
        """COCO ``categories``: ids are often 1-based or sparse (COCO's 1..90); sorted ids become 0..K-1."""
        if not isinstance(categories, list) or not categories:
            raise ValueError("the COCO file has no 'categories' list; it is needed for the class names")
        by_id: dict[int, str] = {}
        for position, category in enumerate(categories):
            if not isinstance(category, dict) or "id" not in category:
                raise ValueError(f"COCO categories[{position}] must be an object with 'id' and 'name'")
            identifier = category["id"]
            if isinstance(identifier, bool) or not isinstance(identifier, int):
                raise ValueError(f"COCO categories[{position}] has a non-integer id {identifier!r}")
            if identifier in by_id:
                raise ValueError(f"COCO category id {identifier} appears twice in 'categories'")
            by_id[identifier] = str(category.get("name", identifier))
        ids = sorted(by_id)
        return cls(names=tuple(by_id[i] for i in ids), lookup={identifier: i for i, identifier in enumerate(ids)})

    @classmethod
    def from_values(cls, values: Iterable[Any]) -> CategoryMap:
        """Categories stored without names (e.g. an imagefolder ``metadata.jsonl``): names sort alphabetically,
        integers become classes 0..max (named by their number)."""
        seen = {value for value in values if not isinstance(value, bool)}
        strings = sorted(value for value in seen if isinstance(value, str))
        if strings:
            return cls(names=tuple(strings), lookup={name: index for index, name in enumerate(strings)})
        integers = [int(value) for value in seen if isinstance(value, int) and value >= 0]
        if not integers:
            raise ValueError("the dataset has no usable category values (non-negative integers or names)")
        count = max(integers) + 1
        return cls(names=tuple(str(i) for i in range(count)), lookup={i: i for i in range(count)})
