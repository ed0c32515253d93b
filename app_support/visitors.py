"""Who a browser is, across reloads and server restarts, without a login: a server-issued, unguessable token.

The token lives in the browser (``gr.BrowserState``, i.e. localStorage) and names the visitor's own folder. Nothing
the browser sends is trusted beyond that: a token must have the exact shape the server issues (so it can never be a
path) and must name a folder the server created for it; anything else gets a fresh token and an empty folder.
Knowing a token is what owning its folder means, so tokens are never shown, logged or put in file names others see.
"""

from __future__ import annotations

import re
import secrets
from pathlib import Path

# 24 random bytes, URL-safe base64: 32 characters of [A-Za-z0-9_-].
_TOKEN = re.compile(r"^[A-Za-z0-9_-]{32}$")
BROWSER_STORAGE_KEY = "ddetr-visitor"
# BrowserState ships its secret to the browser: it keeps other sites' scripts from reading the value, not the
# visitor. It is fixed so that stored tokens survive a server restart.
BROWSER_SECRET = "ddetr-visitor-token-v1"


class Visitors:
    """Issues tokens and maps them to per-visitor folders under ``root``."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    def folder(self, token: str | None) -> Path | None:
        """The visitor's folder for a token this server issued, else None."""
        if not isinstance(token, str) or not _TOKEN.fullmatch(token):
            return None
        folder = self.root / token
        return folder if folder.is_dir() else None

    def claim(self, token: str | None) -> tuple[str, Path]:
        """The browser's token and folder when valid, else a newly issued pair."""
        folder = self.folder(token)
        if folder is not None and token is not None:
            return token, folder
        fresh = secrets.token_urlsafe(24)
        folder = self.root / fresh
        folder.mkdir(parents=True)
        return fresh, folder
