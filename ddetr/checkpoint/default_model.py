"""Which model ``ddetr.pipeline()`` (and the demo app) use when none is named.

SenseTime/deformable-detr when it is in the hub cache or the hub answers; otherwise the model this repository
ships, trained on synthetic shapes (``ddetr/bundled/ddetr-shapes``), so detection works offline on a fresh machine.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

DEFAULT_HUB_MODEL = "SenseTime/deformable-detr"
BUNDLED_MODEL_NAME = "ddetr-shapes"
BUNDLED_MODEL_DIR = Path(__file__).resolve().parent.parent / "bundled" / BUNDLED_MODEL_NAME
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
HUB_PROBE_TIMEOUT_S = 3.0


@dataclass(frozen=True)
class DefaultModel:
    source: str  # a hub repo id or a local directory
    reason: str  # why this one, to show users


def is_model_dir(path: Path) -> bool:
    """A directory that ``from_pretrained`` can load: a config and a weights file."""
    return (path / "config.json").is_file() and any((path / name).is_file() for name in WEIGHT_FILES)


def hub_cached(repo_id: str) -> bool:
    """Whether the config and weights of a hub checkpoint are in the local hub cache (no network)."""
    import huggingface_hub

    def cached(filename: str) -> bool:
        try:
            found = huggingface_hub.try_to_load_from_cache(repo_id, filename)
        except Exception:  # a corrupt cache entry must not break the lookup
            return False
        return isinstance(found, str)

    return cached("config.json") and any(cached(name) for name in WEIGHT_FILES)


def hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def probe_hub(repo_id: str = DEFAULT_HUB_MODEL, timeout: float = HUB_PROBE_TIMEOUT_S) -> bool:
    """Whether the hub answers for ``repo_id`` right now (one metadata request)."""
    if hub_offline():
        return False
    import huggingface_hub

    try:
        huggingface_hub.model_info(repo_id, timeout=timeout)
    except Exception:  # offline, DNS failure, timeout, rate limit: all mean "not reachable now"
        return False
    return True


def default_model(bundled_dir: Path = BUNDLED_MODEL_DIR) -> DefaultModel:
    """The COCO checkpoint when available, else the bundled shapes model; ValueError when neither is."""
    if hub_cached(DEFAULT_HUB_MODEL):
        return DefaultModel(DEFAULT_HUB_MODEL, f"{DEFAULT_HUB_MODEL} (from the local hub cache)")
    if probe_hub(DEFAULT_HUB_MODEL):
        return DefaultModel(DEFAULT_HUB_MODEL, f"{DEFAULT_HUB_MODEL} (downloaded from the hub)")
    if is_model_dir(bundled_dir):
        return DefaultModel(
            str(bundled_dir), f"the bundled {BUNDLED_MODEL_NAME} model ({DEFAULT_HUB_MODEL} is not reachable)"
        )
    raise ValueError(
        f"no default model: {DEFAULT_HUB_MODEL} is neither cached nor reachable and {bundled_dir} does not exist; "
        "pass model= a checkpoint directory"
    )
