"""Which detection models the app can offer, and which one it starts with.

The picker lists, in order: a model named on the command line, the bundled model
(``ddetr/bundled/ddetr-shapes``), the five SenseTime checkpoints (only when cached locally or the hub answers),
models fine-tuned in this app (each visitor sees only their own), any other model directory directly under the
allow-listed models folder, and the hub models a visitor added by repo id (``fetch_hub_model`` downloads them,
``ModelRegistry.add_hub_model`` lists them for that visitor only).

Every choice has an opaque ``key``. Keys coming back from a browser or an API client are looked up in the current
listing, never turned into a path, so no request can make the app load a directory it did not list itself.
"""

from __future__ import annotations

import json
import logging
import os
import re
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from app_support.errors import UserFacingError
from app_support.paths import is_inside
from ddetr import DeformableDetrConfig
from ddetr.checkpoint.default_model import (
    BUNDLED_MODEL_DIR,
    BUNDLED_MODEL_NAME,
    DEFAULT_HUB_MODEL,
    WEIGHT_FILES,
    hub_cached,
    hub_offline,
    is_model_dir,
    probe_hub,
)
from ddetr.checkpoint.hub import looks_like_repo_id

SENSETIME_CHECKPOINTS: tuple[str, ...] = (
    "SenseTime/deformable-detr",
    "SenseTime/deformable-detr-with-box-refine",
    "SenseTime/deformable-detr-with-box-refine-two-stage",
    "SenseTime/deformable-detr-single-scale",
    "SenseTime/deformable-detr-single-scale-dc5",
)
logger = logging.getLogger("ddetr.app")

HUB_PROBE_TTL_S = 600.0
# Hub models added by repo id: a few per visitor (the oldest goes first), and a bounded number of visitors, so that
# the in-memory lists cannot grow without end on a long-running Space.
HUB_MODELS_PER_OWNER = 10
HUB_MODEL_OWNERS = 1000
# Deformable DETR checkpoints weigh 150-200 MB; a repo whose model files are far larger is not one, and would only
# fill the Space's disk.
HUB_MODEL_MAX_BYTES = 1 << 30
HUB_METADATA_TIMEOUT_S = 10.0
# The repo id's parts as the Hub allows them, ASCII only: what is typed here becomes part of a cache folder's name.
_REPO_PART = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,95}")

ModelKind = Literal["cli", "bundled", "hub", "finetuned", "local"]


class NoModelAvailableError(UserFacingError):
    """No model could be found to start the Detect tab with."""


class UnknownModelError(UserFacingError, ValueError):
    """A model key that is not in the current listing (stale page, or a crafted request)."""


class HubModelError(UserFacingError, ValueError):
    """A hub model could not be added: a bad repo id, a repo that is missing, private or not a Deformable DETR model,
    or a hub that could not be reached. The message says which (and never holds a token or a local path)."""


@dataclass(frozen=True)
class ModelChoice:
    """One entry of the model picker. ``source`` is a hub repo id or an absolute directory (for a hub model a visitor
    added, kind "hub" too: its snapshot folder in the hub cache, immutable like any cache entry)."""

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
    Every listing and lookup takes the requester's ``owner_key``: a fine-tuned model is found only for its owner, and
    so is a hub model the owner added (``add_hub_model``). Those added models are kept in memory only, at most
    ``hub_models_per_owner`` per owner: a restart of the app forgets them (their files stay in the hub cache, so
    adding one again downloads nothing).
    """

    def __init__(
        self,
        models_root: Path,
        *,
        cli_model: str | None = None,
        hub_reachable: Callable[[], bool] | None = None,
        finetuned: Callable[[str | None], Iterable[tuple[str, Path]]] | None = None,
        bundled_dir: Path = BUNDLED_MODEL_DIR,
        hub_models_per_owner: int = HUB_MODELS_PER_OWNER,
    ) -> None:
        if hub_models_per_owner < 1:
            raise ValueError(f"hub_models_per_owner must be at least 1, got {hub_models_per_owner}")
        self.models_root = Path(models_root).resolve()
        self.bundled_dir = Path(bundled_dir)
        self.cli_model = cli_model
        self.hub_models_per_owner = hub_models_per_owner
        self._hub_reachable = hub_reachable if hub_reachable is not None else HubReachability()
        self._finetuned = finetuned if finetuned is not None else (lambda owner_key: ())
        self._added_lock = threading.Lock()
        # owner key -> repo id -> choice, oldest first at both levels.
        self._added: OrderedDict[str, OrderedDict[str, ModelChoice]] = OrderedDict()

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
        found.extend(self._added_choices(owner_key))
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

    def _added_choices(self, owner_key: str | None) -> list[ModelChoice]:
        if not owner_key:
            return []
        with self._added_lock:
            added = list(self._added.get(owner_key, {}).values())
        # A snapshot deleted from the cache since (`hf cache delete`) is no longer offered.
        return [choice for choice in added if is_model_dir(Path(choice.source))]

    # -- hub models added by visitors --------------------------------------------------------------------------- #

    def add_hub_model(self, owner_key: str | None, repo_id: str, local_dir: Path) -> ModelChoice:
        """List the downloaded hub model ``repo_id`` (its files in ``local_dir``) for ``owner_key`` only, after the
        shared models and the owner's fine-tuned ones; returns its choice (key ``user-hub:<repo_id>``).

        Adding a repo again makes it the newest; past ``hub_models_per_owner`` the owner's oldest is dropped. Kept in
        memory only (a restart forgets it). HubModelError for a requester without an owner (an API client), a bad
        repo id, or a folder that is not a model directory.
        """
        if not owner_key:
            raise HubModelError(
                "adding a hub model needs a browser session or a Hugging Face login: the model is listed for you only"
            )
        choice = hub_model_choice(repo_id, local_dir)
        if not is_model_dir(Path(choice.source)):
            raise HubModelError(f"{repo_id} is not a Deformable DETR model: it has no config.json and weights")
        with self._added_lock:
            added = self._added.setdefault(owner_key, OrderedDict())
            self._added.move_to_end(owner_key)
            added.pop(repo_id, None)
            added[repo_id] = choice
            while len(added) > self.hub_models_per_owner:
                added.popitem(last=False)
            while len(self._added) > HUB_MODEL_OWNERS:
                self._added.popitem(last=False)
        return choice

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


def check_hub_model_id(text: str | None) -> str:
    """``text`` (surrounding whitespace removed) when it is a hub model's ``owner/name``; HubModelError otherwise.

    Only the Hub's name characters are accepted, so a path (``/etc``, ``../x``, ``C:\\x``), a URL or anything with
    more parts can neither reach the network nor become a local path.
    """
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    repo_id = text.strip() if isinstance(text, str) else ""
    if not repo_id:
        raise HubModelError("type a hub model's repo id, as owner/name (for example SenseTime/deformable-detr)")
    refused = HubModelError(
        f"{repo_id[:100]!r} is not a hub repo id: expected owner/name, such as SenseTime/deformable-detr"
    )
    parts = repo_id.split("/")
    if len(parts) != 2 or not looks_like_repo_id(repo_id) or not all(_REPO_PART.fullmatch(part) for part in parts):
        raise refused
    try:
        # The Hub's own rules on top (no '..' or '--', at most 96 characters).
        validate_repo_id(repo_id)
    except HFValidationError:
        raise refused from None
    return repo_id


def hub_model_choice(repo_id: str, local_dir: Path) -> ModelChoice:
    """The picker entry of a hub model a visitor added: kind "hub", its source the downloaded folder, so loading it
    never goes to the network again."""
    repo_id = check_hub_model_id(repo_id)
    return ModelChoice(f"user-hub:{repo_id}", f"{repo_id} (added from the Hub)", str(Path(local_dir).resolve()), "hub")


def fetch_hub_model(
    repo_id: str,
    token: str | None,
    *,
    cache_dir: Path | None = None,
    endpoint: str | None = None,
    max_bytes: int = HUB_MODEL_MAX_BYTES,
) -> Path:
    """Download hub model ``repo_id``'s model files into the hub cache and return their folder (a snapshot).

    ``token``: the signed-in visitor's own token, so their private repos work; None downloads anonymously, never
    with a token of the server's (``HF_TOKEN`` or a stored login would let anyone read its owner's private repos).
    The repo is asked about first, with that token: a repo it may not read is refused even when another visitor's
    download left it in the cache. Only config.json, the weights (model.safetensors, else pytorch_model.bin) and
    preprocessor_config.json are fetched, after checking they exist and stay under ``max_bytes``. ``endpoint``
    defaults to ``HF_ENDPOINT`` (huggingface.co), ``cache_dir`` to the hub cache. HubModelError says what went wrong.
    """
    import huggingface_hub
    from huggingface_hub.errors import RepositoryNotFoundError, RevisionNotFoundError

    repo_id = check_hub_model_id(repo_id)
    if hub_offline():
        raise HubModelError(f"cannot add {repo_id}: this app runs offline (HF_HUB_OFFLINE is set)")
    secret: str | bool = token.strip() if isinstance(token, str) and token.strip() else False
    # HF_ENDPOINT read now, not when huggingface_hub was imported (a Space, or a test's stand-in, sets it).
    api = huggingface_hub.HfApi(endpoint=endpoint or os.environ.get("HF_ENDPOINT"), token=secret)
    hidden = "sign in with an account that can read it" if secret is False else "your account cannot read it"
    try:
        info = api.model_info(repo_id, files_metadata=True, timeout=HUB_METADATA_TIMEOUT_S, token=secret)
        sizes = {sibling.rfilename: sibling.size or 0 for sibling in info.siblings or []}
        files = _model_files(repo_id, sizes, max_bytes)
        folder = api.snapshot_download(
            repo_id, revision=info.sha or "main", allow_patterns=files, cache_dir=cache_dir, token=secret
        )
    except HubModelError:
        raise
    except RepositoryNotFoundError:  # gated repos included: the Hub answers alike for missing and private ones
        raise HubModelError(f"{repo_id} was not found on the Hub, or it is private ({hidden})") from None
    except RevisionNotFoundError:
        raise HubModelError(f"{repo_id} has no main branch to download") from None
    except Exception as error:  # network failures come in many types (httpx, OSError, HTTP 5xx, offline mode)
        # For whoever runs the app: what the Hub answered (URLs and status, never the token, which is only a header).
        logger.warning("adding hub model %s failed: %s: %s", repo_id, type(error).__name__, error)
        status = getattr(getattr(error, "response", None), "status_code", None)
        if status in (401, 403):
            raise HubModelError(f"the Hub refused the login's token for {repo_id}: sign in again") from None
        raise HubModelError(
            f"could not download {repo_id}: the Hub did not answer ({type(error).__name__}); try again later"
        ) from None
    return _checked_model_folder(repo_id, Path(folder))


def _model_files(repo_id: str, sizes: dict[str, int], max_bytes: int) -> list[str]:
    """The files to download, from the repo's listing (name -> size); HubModelError when it is not a model."""
    weights = next((name for name in WEIGHT_FILES if name in sizes), None)
    if "config.json" not in sizes or weights is None:
        raise HubModelError(
            f"{repo_id} is not a Deformable DETR model: it has no config.json and model.safetensors (or "
            "pytorch_model.bin)"
        )
    files = ["config.json", weights] + (["preprocessor_config.json"] if "preprocessor_config.json" in sizes else [])
    total = sum(sizes[name] for name in files)
    if total > max_bytes:
        raise HubModelError(
            f"{repo_id}'s model files weigh {total / 2**20:.0f} MB, more than the {max_bytes / 2**20:.0f} MB this "
            "app downloads (a Deformable DETR checkpoint is about 160 MB)"
        )
    return files


def _checked_model_folder(repo_id: str, folder: Path) -> Path:
    """``folder`` when its config.json describes a Deformable DETR model ddetr can build; HubModelError otherwise."""
    not_detr = f"{repo_id} is not a Deformable DETR model"
    if not is_model_dir(folder):
        raise HubModelError(f"{not_detr}: its download lacks config.json or the weights")
    try:
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        raise HubModelError(f"{not_detr}: its config.json is not valid JSON") from None
    if not isinstance(config, dict) or config.get("model_type") != DeformableDetrConfig.model_type:
        found = config.get("model_type") if isinstance(config, dict) else None
        raise HubModelError(f"{not_detr}: its config.json has model_type {found!r}, not 'deformable_detr'")
    try:
        DeformableDetrConfig.from_dict(config)
    except (TypeError, ValueError) as error:
        raise HubModelError(f"{not_detr} that ddetr can build: {error}") from None
    return folder


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
