"""Which detection models the app can offer, and which one it starts with.

The picker lists, in order: a model named on the command line, the bundled model
(``ddetr/bundled/ddetr-shapes``), the five SenseTime checkpoints (only when cached locally or the hub answers),
models fine-tuned in this app (each visitor sees only their own), and any other model directory directly under the
allow-listed models folder.

Every choice has an opaque ``key``. Keys coming back from a browser or an API client are looked up in the current
listing, never turned into a path, so no request can make the app load a directory it did not list itself.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from app_support.errors import UserFacingError
from app_support.paths import is_inside
from ddetr.checkpoint.default_model import (
    BUNDLED_MODEL_DIR,
    BUNDLED_MODEL_NAME,
    DEFAULT_HUB_MODEL,
    hub_cached,
    is_model_dir,
    probe_hub,
)

SENSETIME_CHECKPOINTS: tuple[str, ...] = (
    "SenseTime/deformable-detr",
    "SenseTime/deformable-detr-with-box-refine",
    "SenseTime/deformable-detr-with-box-refine-two-stage",
    "SenseTime/deformable-detr-single-scale",
    "SenseTime/deformable-detr-single-scale-dc5",
)
HUB_PROBE_TTL_S = 600.0

ModelKind = Literal["cli", "bundled", "hub", "finetuned", "local"]


class NoModelAvailableError(UserFacingError):
    """No model could be found to start the Detect tab with."""


class UnknownModelError(UserFacingError, ValueError):
    """A model key that is not in the current listing (stale page, or a crafted request)."""


@dataclass(frozen=True)
class ModelChoice:
    """One entry of the model picker. ``source`` is a hub repo id or an absolute directory."""

    key: str
    label: str
    source: str
    kind: ModelKind

    @property
    def is_local(self) -> bool:
        return self.kind != "hub"


class HubReachability:
    """Remembers for a while whether the hub is reachable, so building the picker never waits on the network twice."""

    def __init__(self, probe: Callable[[], bool] = probe_hub, ttl_s: float = HUB_PROBE_TTL_S) -> None:
        self._probe = probe
        self._ttl_s = ttl_s
        self._lock = threading.Lock()
        self._answer: bool | None = None
        self._when = 0.0

    def __call__(self) -> bool:
        with self._lock:
            if self._answer is None or time.monotonic() - self._when > self._ttl_s:
                self._answer = bool(self._probe())
                self._when = time.monotonic()
            return self._answer


class ModelRegistry:
    """Lists the models on offer and maps picker keys back to them.

    ``finetuned`` is a callable returning ``(name, directory)`` pairs of an owner's finished fine-tuning runs
    (given the owner's key; None: nobody's); it is injected so the registry does not depend on the training code.
    Every listing and lookup takes the requester's ``owner_key``: a fine-tuned model is found only for its owner.
    """

    def __init__(
        self,
        models_root: Path,
        *,
        cli_model: str | None = None,
        hub_reachable: Callable[[], bool] | None = None,
        finetuned: Callable[[str | None], Iterable[tuple[str, Path]]] | None = None,
        bundled_dir: Path = BUNDLED_MODEL_DIR,
    ) -> None:
        self.models_root = Path(models_root).resolve()
        self.bundled_dir = Path(bundled_dir)
        self.cli_model = cli_model
        self._hub_reachable = hub_reachable if hub_reachable is not None else HubReachability()
        self._finetuned = finetuned if finetuned is not None else (lambda owner_key: ())

    # -- listing ------------------------------------------------------------------------------------------------ #

    def choices(self, owner_key: str | None = None) -> list[ModelChoice]:
        local = self._local_listing(owner_key)
        # Hub checkpoints go after the bundled model, before fine-tuned and other local ones.
        split = sum(1 for choice in local if choice.kind in ("cli", "bundled"))
        return _unique([*local[:split], *self._hub_choices(), *local[split:]])

    def _local_listing(self, owner_key: str | None) -> list[ModelChoice]:
        """Every choice that needs no network: the --model one, the bundled model, fine-tuned and local models."""
        found: list[ModelChoice] = []
        if self.cli_model:
            found.append(self._cli_choice(self.cli_model))
        if is_model_dir(self.bundled_dir):
            label = f"{BUNDLED_MODEL_NAME} (bundled)"
            found.append(ModelChoice("bundled", label, str(self.bundled_dir.resolve()), "bundled"))
        for name, directory in self._finetuned(owner_key) if owner_key else ():
            if is_model_dir(Path(directory)):
                found.append(ModelChoice(f"run:{name}", f"{name} (fine-tuned here)", str(directory), "finetuned"))
        found.extend(self._local_choices())
        return _unique(found)

    def dropdown_choices(self, owner_key: str | None = None) -> list[tuple[str, str]]:
        """``(label, key)`` pairs for ``gr.Dropdown``: the shared models and ``owner_key``'s own."""
        return [(choice.label, choice.key) for choice in self.choices(owner_key)]

    def _cli_choice(self, model: str) -> ModelChoice:
        path = Path(model).expanduser()
        if path.is_dir():
            # Show the folder's name only: visitors have no business learning the server's directory layout.
            return ModelChoice("cli", f"{path.resolve().name} (--model)", str(path.resolve()), "cli")
        return ModelChoice("cli", f"{model} (--model)", model, "cli")

    def _hub_choices(self) -> list[ModelChoice]:
        cached = [repo for repo in SENSETIME_CHECKPOINTS if hub_cached(repo)]
        if len(cached) < len(SENSETIME_CHECKPOINTS) and self._hub_reachable():
            cached = list(SENSETIME_CHECKPOINTS)
        return [ModelChoice(f"hub:{repo}", repo, repo, "hub") for repo in cached]

    def _local_choices(self) -> list[ModelChoice]:
        if not self.models_root.is_dir():
            return []
        found = []
        for child in sorted(self.models_root.iterdir()):
            # A symlink pointing outside the folder would turn the allow-list into a pointer anywhere on disk.
            if child.name.startswith(".") or not is_inside(child, self.models_root):
                continue
            if child.resolve() == self.bundled_dir.resolve():  # listed once, as the bundled model
                continue
            if child.is_dir() and is_model_dir(child):
                found.append(ModelChoice(f"dir:{child.name}", f"models/{child.name}", str(child.resolve()), "local"))
        return found

    # -- lookup ------------------------------------------------------------------------------------------------- #

    def get(self, key: str, owner_key: str | None = None) -> ModelChoice:
        # Only a hub key may need to ask whether the hub is reachable; local keys never wait on the network.
        listing = self._hub_choices() if key.startswith("hub:") else self._local_listing(owner_key)
        for choice in listing:
            if choice.key == key:
                return choice
        raise UnknownModelError(f"model {key!r} is not available (refresh the model list)")

    def default(self) -> ModelChoice:
        """The model the Detect tab starts with; see :func:`resolve_default_model`."""
        return resolve_default_model(self.choices())

    def pick(self, key: str | None, owner_key: str | None = None) -> ModelChoice:
        """The picker's model: the one with ``key`` listed for ``owner_key``, the default when none is chosen."""
        return self.get(key, owner_key) if key else self.default()


def _unique(choices: list[ModelChoice]) -> list[ModelChoice]:
    unique: dict[str, ModelChoice] = {}
    for choice in choices:
        unique.setdefault(choice.key, choice)
    return list(unique.values())


def resolve_default_model(choices: list[ModelChoice]) -> ModelChoice:
    """The ``--model`` choice, else SenseTime/deformable-detr (cached or reachable), else the bundled model, else
    whatever else is listed (a fine-tuned or local model).

    Raises ``NoModelAvailableError`` with what to do when none of them is available.
    """
    by_key = {choice.key: choice for choice in choices}
    for key in ("cli", f"hub:{DEFAULT_HUB_MODEL}", "bundled"):
        if key in by_key:
            return by_key[key]
    if choices:
        return choices[0]
    raise NoModelAvailableError(
        f"No detection model is available: {DEFAULT_HUB_MODEL} is neither in the hub cache nor reachable, and "
        f"the bundled {BUNDLED_MODEL_NAME} model is missing from the installation. Start the app with --model DIR "
        "(a folder holding config.json and model.safetensors), download the checkpoint where the hub is reachable "
        f"(`hf download {DEFAULT_HUB_MODEL}`), or fine-tune a model in the Fine-tune tab."
    )
