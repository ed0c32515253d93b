"""One commit to a Hugging Face Hub repo: the checks made before any request, ``create_repo`` + ``create_commit``,
and the Hub's refusals as ``HubPushError``. The dataset push (``finetune.data.hub_push``) and the model push
(``finetune.run.hub_model``) both go through here.

The token is only handed to ``huggingface_hub``, which sends it in the Authorization header: it is never logged,
never written to disk and never part of an error message (a refusal says what to fix, not what was sent).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

logger = logging.getLogger(__name__)

REPO_TYPES = ("model", "dataset")


class HubPushError(ValueError):
    """The push was refused or failed; the message says why (without the token)."""


@dataclass(frozen=True)
class HubCommit:
    """Where a push landed: the repo's page and the commit's."""

    repo_url: str
    commit_url: str


def check_push_target(repo_id: str, token: str | None) -> str:
    """The token to send (surrounding whitespace removed); HubPushError for a missing token or a repo id that is not
    ``owner/name``. Makes no request, so a command line can check its arguments before hours of training."""
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    if not isinstance(token, str) or not token.strip():
        raise HubPushError("a Hugging Face token with write access is needed to push (huggingface.co/settings/tokens)")
    if not isinstance(repo_id, str) or repo_id.count("/") != 1:
        raise HubPushError(f"{repo_id!r} is not a repo id: expected 'owner/name'")
    try:
        # The Hub's own name rules (letters, digits, '-', '_', '.'; no '..' or '--'; at most 96 characters).
        validate_repo_id(repo_id)
    except HFValidationError:
        raise HubPushError(f"{repo_id!r} is not a repo id: expected 'owner/name'") from None
    return token.strip()


def commit_files(
    repo_id: str,
    files: Mapping[str, Path | bytes],
    *,
    repo_type: str,
    token: str | None,
    private: bool,
    commit_message: str,
    endpoint: str | None = None,
) -> HubCommit:
    """Create ``repo_id`` if it does not exist (``private`` decides its visibility then; an existing repo keeps
    its own) and commit ``files`` (path in the repo -> a local file or the content) in one commit.

    ``endpoint`` defaults to ``HF_ENDPOINT`` (huggingface.co). HubPushError for a missing token or a bad repo id
    (before any request), or when the Hub refuses or cannot be reached.
    """
    from huggingface_hub import CommitOperationAdd, HfApi
    from huggingface_hub.errors import HfHubHTTPError

    if repo_type not in REPO_TYPES:
        raise ValueError(f"repo_type must be one of {REPO_TYPES}, got {repo_type!r}")
    secret = check_push_target(repo_id, token)
    if not files:
        raise HubPushError("nothing to push: no files")
    operations = [
        CommitOperationAdd(
            path_in_repo=path_in_repo, path_or_fileobj=content if isinstance(content, bytes) else str(content)
        )
        for path_in_repo, content in files.items()
    ]
    # HF_ENDPOINT read now, not when huggingface_hub was imported (a Space, or a test's stand-in, sets it).
    api = HfApi(endpoint=endpoint or os.environ.get("HF_ENDPOINT"), token=secret)
    visibility = "private" if private else "public"
    logger.info("pushing %d files to the %s repo %s (%s if new)", len(operations), repo_type, repo_id, visibility)
    try:
        repo_url = api.create_repo(repo_id, repo_type=repo_type, private=private, exist_ok=True)
        commit = api.create_commit(repo_id, repo_type=repo_type, operations=operations, commit_message=commit_message)
    except HfHubHTTPError as error:
        status = error.response.status_code if error.response is not None else None
        if status in (401, 403):
            raise HubPushError(
                f"the Hub refused the token ({status}): it needs write access to {repo_id.split('/')[0]}"
            ) from None
        raise HubPushError(f"the Hub answered {status} while pushing {repo_id}") from None
    except Exception as error:  # connection and protocol errors: their text may carry request details
        raise HubPushError(f"could not push to the Hub ({type(error).__name__})") from None
    return HubCommit(repo_url=str(repo_url), commit_url=str(commit.commit_url))
