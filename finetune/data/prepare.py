"""From a dataset source to validated train / validation / test splits and the class names."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field, fields

import numpy as np

from finetune.data.formats import normalise_format
from finetune.data.records import DetectionSplit, Sample
from finetune.data.sources import LoadedDataset, open_dataset
from finetune.data.validation import CheckBudget, ValidationReport, validate_split

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class DataSettings:
    """What prepared data was made from: the same source and settings always give the same splits.
    ``allow_outside_files``: the dataset may name files outside its folder (kept, as it decides what is read)."""

    source: str
    strict: bool = False
    seed: int = 0
    validation_fraction: float = 0.15
    format: str = "auto"
    allow_outside_files: bool = False

    def differences(self, other: DataSettings) -> list[str]:
        """``name: ours -> theirs`` for every setting that differs from ``other``."""
        names = [setting.name for setting in fields(self)]
        return [
            f"{name}: {getattr(self, name)!r} -> {getattr(other, name)!r}"
            for name in names
            if getattr(self, name) != getattr(other, name)
        ]


@dataclass
class PreparedData:
    """Validated splits by name (``train``, ``validation``, ``test`` and any others), class names, and reports.

    ``settings`` records the source and the settings it was prepared with, so that a run handed this data can
    refuse it when its own settings would have prepared something else."""

    class_names: list[str]
    splits: dict[str, DetectionSplit]
    settings: DataSettings
    reports: list[ValidationReport] = field(default_factory=list)
    description: str = ""

    def split(self, name: str) -> DetectionSplit:
        if name not in self.splits:
            raise ValueError(f"the dataset has no {name!r} split (it has {sorted(self.splits)})")
        return self.splits[name]

    def check_settings(self, expected: DataSettings) -> None:
        """ValueError unless this data was prepared from ``expected``'s source with its settings."""
        differences = self.settings.differences(expected)
        if differences:
            raise ValueError(
                "the prepared data does not fit the run's settings (prepared with -> the run's): "
                + ", ".join(differences)
            )


def validate_dataset(
    loaded: LoadedDataset, *, strict: bool, budget: CheckBudget | None = None
) -> tuple[dict[str, list[Sample]], list[ValidationReport]]:
    samples, reports = {}, []
    meter = budget.start() if budget is not None else None
    for name, source in loaded.splits.items():
        samples[name], report = validate_split(source, loaded.categories, strict=strict, meter=meter)
        reports.append(report)
    return samples, reports


def assemble(
    loaded: LoadedDataset,
    samples: dict[str, list[Sample]],
    *,
    settings: DataSettings,
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
    if "train" in splits and "validation" not in splits and settings.validation_fraction > 0:
        train = splits["train"]
        count = round(len(train) * settings.validation_fraction)
        if len(train) >= 2 and count >= 1:
            # A fixed permutation: the same seed always holds out the same images, also on resume.
            rng = np.random.default_rng(np.random.SeedSequence([settings.seed, 0xDA7A]))
            order = rng.permutation(len(train)).tolist()
            splits["validation"] = train.subset("validation", sorted(order[:count]))
            splits["train"] = train.subset("train", sorted(order[count:]))
            logger.info("no validation split: held out %d of %d training images", count, len(train))
    return PreparedData(
        class_names=list(loaded.categories.names),
        splits=splits,
        settings=settings,
        reports=list(reports or []),
        description=loaded.description,
    )


def prepare_data(
    source: str,
    *,
    strict: bool = False,
    seed: int = 0,
    validation_fraction: float = 0.15,
    format: str = "auto",
    allow_outside_files: bool = False,
) -> PreparedData:
    """Open ``source`` in ``format`` (see ``finetune.data.sources``; ``auto``: detected from the layout), validate
    every split and assemble the splits. ``allow_outside_files``: read files the dataset names outside its folder
    (refused otherwise)."""
    settings = DataSettings(
        source=str(source),
        strict=strict,
        seed=seed,
        validation_fraction=validation_fraction,
        format=normalise_format(format),
        allow_outside_files=allow_outside_files,
    )
    return prepare(settings)


def prepare(settings: DataSettings, *, budget: CheckBudget | None = None) -> PreparedData:
    """``prepare_data`` for the source and settings in ``settings``; ``budget`` bounds the validation
    (``CheckBudgetExceeded``, a ValueError, once it is spent)."""
    if not 0 <= settings.validation_fraction < 1:
        raise ValueError(f"validation_fraction must be in [0, 1), got {settings.validation_fraction}")
    loaded = open_dataset(settings.source, format=settings.format, allow_outside_files=settings.allow_outside_files)
    samples, reports = validate_dataset(loaded, strict=settings.strict, budget=budget)
    return assemble(loaded, samples, settings=settings, reports=reports)
