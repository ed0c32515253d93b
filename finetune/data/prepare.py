"""From a dataset source to validated train / validation / test splits and the class names."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np

from finetune.data.records import DetectionSplit, Sample
from finetune.data.sources import LoadedDataset, open_dataset
from finetune.data.validation import ValidationReport, validate_split

logger = logging.getLogger(__name__)


@dataclass
class PreparedData:
    """Validated splits by name (``train``, ``validation``, ``test`` and any others), class names, and reports."""

    class_names: list[str]
    splits: dict[str, DetectionSplit]
    reports: list[ValidationReport] = field(default_factory=list)
    description: str = ""

    def split(self, name: str) -> DetectionSplit:
        if name not in self.splits:
            raise ValueError(f"the dataset has no {name!r} split (it has {sorted(self.splits)})")
        return self.splits[name]


def validate_dataset(loaded: LoadedDataset, *, strict: bool) -> tuple[dict[str, list[Sample]], list[ValidationReport]]:
    samples, reports = {}, []
    for name, source in loaded.splits.items():
        samples[name], report = validate_split(source, loaded.categories, strict=strict)
        reports.append(report)
    return samples, reports


def assemble(
    loaded: LoadedDataset,
    samples: dict[str, list[Sample]],
    *,
    seed: int,
    validation_fraction: float,
    reports: list[ValidationReport] | None = None,
) -> PreparedData:
    """Splits from validated samples; without a validation split, ``validation_fraction`` of train becomes one."""
    splits = {
        name: DetectionSplit(name=name, samples=list(items), source=loaded.splits[name])
        for name, items in samples.items()
    }
    if "train" not in splits and len(splits) == 1:
        only = next(iter(splits))
        splits = {"train": DetectionSplit(name="train", samples=splits[only].samples, source=splits[only].source)}
    if "train" in splits and "validation" not in splits and validation_fraction > 0:
        train = splits["train"]
        count = round(len(train) * validation_fraction)
        if len(train) >= 2 and count >= 1:
            # A fixed permutation: the same seed always holds out the same images, also on resume.
            order = np.random.default_rng(np.random.SeedSequence([seed, 0xDA7A])).permutation(len(train)).tolist()
            splits["validation"] = train.subset("validation", sorted(order[:count]))
            splits["train"] = train.subset("train", sorted(order[count:]))
            logger.info("no validation split: held out %d of %d training images", count, len(train))
    return PreparedData(
        class_names=list(loaded.categories.names),
        splits=splits,
        reports=list(reports or []),
        description=loaded.description,
    )


def prepare_data(
    source: str, *, strict: bool = False, seed: int = 0, validation_fraction: float = 0.15
) -> PreparedData:
    """Open ``source`` (see ``finetune.data.sources``), validate every split and assemble the splits."""
    if not 0 <= validation_fraction < 1:
        raise ValueError(f"validation_fraction must be in [0, 1), got {validation_fraction}")
    loaded = open_dataset(source)
    samples, reports = validate_dataset(loaded, strict=strict)
    return assemble(loaded, samples, seed=seed, validation_fraction=validation_fraction, reports=reports)
