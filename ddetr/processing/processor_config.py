"""Reading and writing ``preprocessor_config.json``, in transformers' layout and the 2022 feature-extractor one.

The published SenseTime checkpoints carry the 2022 form (``"size": 800, "max_size": 1333,
"feature_extractor_type": "DeformableDetrFeatureExtractor"``); transformers 5.x writes ``size`` as a dict and
``image_processor_type``. Both load here; what we write loads in transformers 5.23's
``DeformableDetrImageProcessor.from_pretrained``.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

from ddetr.checkpoint.hub import resolve_file

PREPROCESSOR_CONFIG_NAME = "preprocessor_config.json"
IMAGE_PROCESSOR_TYPE = "DeformableDetrImageProcessor"

logger = logging.getLogger(__name__)

# Keys that describe the file rather than the processor; dropped without a warning.
_BOOKKEEPING_KEYS = frozenset(
    {
        "image_processor_type",
        "feature_extractor_type",
        "processor_class",
        "_processor_class",
        "auto_map",
        "default_to_square",
        "model_input_names",
        "backend",
        "transformers_version",
        "return_segmentation_masks",
    }
)


def resolve_config_file(
    pretrained_model_name_or_path: str | os.PathLike,
    *,
    revision: str | None = None,
    cache_dir: str | os.PathLike | None = None,
    local_files_only: bool = False,
    token: str | bool | None = None,
) -> Path:
    """The local path of ``preprocessor_config.json`` for a directory, a JSON file, or a Hub repo id."""
    path = Path(pretrained_model_name_or_path)
    if path.is_file():
        return path
    if path.is_dir():
        candidate = path / PREPROCESSOR_CONFIG_NAME
        if not candidate.is_file():
            raise OSError(f"{path} has no {PREPROCESSOR_CONFIG_NAME}; save one with save_pretrained({str(path)!r})")
        return candidate
    # required=True: resolve_file raises instead of returning None.
    return resolve_file(
        pretrained_model_name_or_path,
        PREPROCESSOR_CONFIG_NAME,
        revision=revision,
        cache_dir=cache_dir,
        token=token,
        local_files_only=local_files_only,
    )


def read_config(config_file: str | os.PathLike) -> dict[str, Any]:
    """Parse a processor config file, with a clear error for invalid JSON."""
    try:
        with open(config_file, encoding="utf-8") as handle:
            config = json.load(handle)
    except json.JSONDecodeError as error:
        raise OSError(f"{config_file} is not valid JSON: {error}") from None
    if not isinstance(config, dict):
        raise OSError(f"{config_file} must hold a JSON object, got {type(config).__name__}")
    return config


def config_to_init_kwargs(config: dict[str, Any], accepted: frozenset[str]) -> dict[str, Any]:
    """Constructor keyword arguments from a config dict, old spellings included; unknown keys are logged and dropped."""
    kwargs: dict[str, Any] = {}
    unknown = []
    for key, value in config.items():
        if key in accepted:
            kwargs[key] = value
        elif key not in _BOOKKEEPING_KEYS:
            unknown.append(key)
    if unknown:
        logger.warning("ignoring unknown image processor config keys: %s", ", ".join(sorted(unknown)))
    return kwargs


def write_config(config: dict[str, Any], save_directory: str | os.PathLike) -> Path:
    """Write ``config`` as ``preprocessor_config.json`` in ``save_directory`` (created if needed)."""
    directory = Path(save_directory)
    if directory.is_file():
        raise OSError(f"save_pretrained needs a directory, but {directory} is a file")
    directory.mkdir(parents=True, exist_ok=True)
    target = directory / PREPROCESSOR_CONFIG_NAME
    target.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return target
