"""Who owns what on a shared server: visitors, their job tokens, and the admin.

A visitor is their Hugging Face login when the Space has OAuth (``gr.OAuthProfile``), else their browser's
server-issued token (``visitors.Visitors``, kept in ``gr.BrowserState``). Either becomes an ``Owner`` whose ``key``
is a hash of the identity: it names the owner's folders and is stored beside their runs, so it must never be
reversible to the token it came from.

API clients have no browser: ``/finetune_start`` hands them an unguessable job token, and holding that token is
owning the job. Only its hash is stored (``job.json`` in the run folder), so reading the runs folder does not give
control of anyone's job. The admin (``--admin-token`` / ``DDETR_ADMIN_TOKEN``, or the Space's author when logged in)
may stop any job.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
from dataclasses import dataclass
from typing import Any

from app_support.visitors import Visitors

ADMIN_TOKEN_ENV = "DDETR_ADMIN_TOKEN"
# The Space's owner, set by Spaces itself (not by the visitor).
SPACE_AUTHOR_ENV = "SPACE_AUTHOR_NAME"
_KEY_LENGTH = 24


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


@dataclass(frozen=True)
class Owner:
    """A visitor as the server knows them. ``key``: the non-secret name of their folders; ``label``: shown to them."""

    key: str
    label: str


def owner_of_login(username: str) -> Owner:
    return Owner(key="hf-" + _digest("hf:" + username)[:_KEY_LENGTH], label=username)


def owner_of_browser(token: str) -> Owner:
    return Owner(key="br-" + _digest("browser:" + token)[:_KEY_LENGTH], label="this browser")


def owner_of_job_token() -> tuple[str, Owner]:
    """A fresh job token and the owner it makes: an API client that holds nothing else owns its job by the token."""
    token = new_job_token()
    return token, Owner(key="tk-" + _digest("token:" + token)[:_KEY_LENGTH], label="the token's holder")


def new_job_token() -> str:
    """An unguessable token that controls one job (given once, to whoever started it)."""
    return secrets.token_urlsafe(24)


def token_hash(token: str) -> str:
    return _digest("job:" + token)


def token_matches(token: str | None, stored_hash: str | None) -> bool:
    if not isinstance(token, str) or not token or not isinstance(stored_hash, str):
        return False
    return hmac.compare_digest(token_hash(token), stored_hash)


class Identities:
    """Turns what a request carries (browser token, OAuth profile, a pasted admin token) into an owner and rights."""

    def __init__(
        self,
        visitors: Visitors,
        *,
        admin_token: str | None = None,
        space_author: str | None = None,
    ) -> None:
        self.visitors = visitors
        self._admin_hash = token_hash(admin_token) if admin_token else None
        self.space_author = space_author

    @classmethod
    def from_environment(cls, visitors: Visitors, *, admin_token: str | None = None) -> Identities:
        return cls(
            visitors,
            admin_token=admin_token or os.environ.get(ADMIN_TOKEN_ENV) or None,
            space_author=os.environ.get(SPACE_AUTHOR_ENV) or None,
        )

    def owner(self, browser_token: str | None, profile: Any = None) -> Owner | None:
        """The requester: their login when signed in, else their browser (a token this server issued), else None."""
        username = getattr(profile, "username", None)
        if isinstance(username, str) and username:
            return owner_of_login(username)
        if self.visitors.folder(browser_token) is not None and browser_token is not None:
            return owner_of_browser(browser_token)
        return None

    def owner_key(self, browser_token: str | None, profile: Any = None) -> str | None:
        owner = self.owner(browser_token, profile)
        return owner.key if owner is not None else None

    def is_admin(self, token: str | None, profile: Any = None) -> bool:
        username = getattr(profile, "username", None)
        if self.space_author and isinstance(username, str) and username == self.space_author:
            return True
        return token_matches(token, self._admin_hash)
