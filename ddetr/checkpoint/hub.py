"""Locating checkpoint files: a local directory, or a Hugging Face hub repo id (local cache first).

Hub access goes through huggingface_hub, so its cache, ``HF_HUB_OFFLINE`` and tokens behave as users expect.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal, overload


class CheckpointNotFoundError(FileNotFoundError):
    """A checkpoint file could be found neither locally, nor in the hub cache, nor on the hub."""


def looks_like_repo_id(name: str) -> bool:
    parts = name.split("/")
    return 1 <= len(parts) <= 2 and all(part and not part.startswith(".") for part in parts)


@overload
def resolve_file(
    path_or_repo_id: str | os.PathLike,
    filename: str,
    revision: str | None = None,
    required: Literal[True] = True,
    *,
    cache_dir: str | os.PathLike | None = None,
    token: str | bool | None = None,
    local_files_only: bool = False,
) -> Path: ...


@overload
def resolve_file(
    path_or_repo_id: str | os.PathLike,
    filename: str,
    revision: str | None = None,
    *,
    required: bool,
    cache_dir: str | os.PathLike | None = None,
    token: str | bool | None = None,
    local_files_only: bool = False,
) -> Path | None: ...


def resolve_file(
    path_or_repo_id: str | os.PathLike,
    filename: str,
    revision: str | None = None,
    required: bool = True,
    *,
    cache_dir: str | os.PathLike | None = None,
    token: str | bool | None = None,
    local_files_only: bool = False,
) -> Path | None:
    """Return a local path to ``filename`` of a checkpoint directory or hub repo.

    With ``required=False`` a missing file gives None instead of an error (to probe for alternatives such as
    ``model.safetensors`` vs ``pytorch_model.bin``).
    """
    local = Path(path_or_repo_id)
    if local.is_dir():
        candidate = local / filename
        if candidate.is_file():
            return candidate
        if not required:
            return None
        raise CheckpointNotFoundError(f"{local} has no {filename}")
    name = str(path_or_repo_id)
    if not looks_like_repo_id(name):
        raise CheckpointNotFoundError(f"{name!r} is neither a local directory nor a hub repo id")
    options = {"revision": revision, "cache_dir": cache_dir, "token": token}
    return _hub_file(name, filename, options, required, local_files_only)


def _how_to_provide(repo_id: str) -> str:
    return (
        f"Download it where the hub is reachable (`hf download {repo_id}`) and copy the cache, or pass a local "
        "directory holding the checkpoint files (config.json, model.safetensors, preprocessor_config.json)."
    )


def _hub_file(
    repo_id: str, filename: str, options: dict[str, Any], required: bool, local_files_only: bool
) -> Path | None:
    import huggingface_hub
    from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError, RepositoryNotFoundError

    # Cache first: works offline and avoids a network round trip for every file.
    try:
        return Path(huggingface_hub.hf_hub_download(repo_id, filename, local_files_only=True, **options))
    except (LocalEntryNotFoundError, EntryNotFoundError, FileNotFoundError):
        pass
    except ValueError:  # raised by some versions for an invalid repo id
        raise CheckpointNotFoundError(f"{repo_id!r} is not a valid hub repo id") from None
    if local_files_only:
        if not required:
            return None
        raise CheckpointNotFoundError(
            f"{filename!r} of hub repo {repo_id!r} is not in the local cache (local_files_only=True). "
            + _how_to_provide(repo_id)
        )
    unreachable = (
        f"could not get {filename!r} of hub repo {repo_id!r}: the hub is unreachable (or HF_HUB_OFFLINE is set) and "
        f"the file is not in the local cache. {_how_to_provide(repo_id)}"
    )
    try:
        return Path(huggingface_hub.hf_hub_download(repo_id, filename, **options))
    except LocalEntryNotFoundError as error:  # offline: a subclass of EntryNotFoundError, so caught first
        if not required:
            return None
        raise CheckpointNotFoundError(unreachable) from error
    except EntryNotFoundError:
        if not required:
            return None
        raise CheckpointNotFoundError(f"hub repo {repo_id!r} has no file {filename!r}") from None
    except RepositoryNotFoundError:
        raise CheckpointNotFoundError(f"hub repo {repo_id!r} does not exist or is private (set HF_TOKEN)") from None
    except Exception as error:  # network failures come in many types (OSError, httpx errors, offline mode)
        if not required:
            # Offline we cannot tell "absent" from "unreachable"; the caller reports what it needed.
            return None
        raise CheckpointNotFoundError(f"{unreachable} ({type(error).__name__})") from error
