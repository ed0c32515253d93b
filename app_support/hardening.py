"""Server settings for running as a public demo: bounded uploads, bounded queues, nothing served by accident.

- ``max_file_size`` caps upload bytes (Gradio answers 413 above it); Pillow's pixel limit is lowered too, because a
  12 KB PNG can declare 100 megapixels and bytes do not bound decoded size.
- The monitoring dashboard (``/monitoring``) is switched off: queue analytics are nobody's business on a Space.
- ``allowed_paths`` holds only the example images; the model, data and runs folders are never served directly
  (downloads are copies written to the private work area), and the repository's ``.git``, virtual environments and
  the hub cache are explicitly blocked.
- The queue has a maximum size, so a burst of requests is turned away with "queue full" instead of piling up.
- The server's own Hugging Face token (``HF_TOKEN``, a stored login) is never sent implicitly: a hub id a visitor
  typed (a dataset, a base model) must not reach the Space owner's private repos. What the app sends on a visitor's
  behalf carries the visitor's own token, explicitly. A private ``--model`` repo is passed as a downloaded folder.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import huggingface_hub.constants
import PIL.Image

from app_support.paths import REPO_ROOT, AppPaths

MAX_UPLOAD = "50mb"
MAX_IMAGE_PIXELS = 50_000_000  # ddetr refuses more anyway; this also bounds Gradio's own header checks
QUEUE_MAX_SIZE = 32
DEFAULT_CONCURRENCY = 1
DELETE_CACHE = (1800, 3600)  # every 30 min, delete cached files older than an hour


def no_implicit_hub_token() -> None:
    """No request of this process, or of the training processes it starts, sends the server's token unless
    given it explicitly."""
    os.environ["HF_HUB_DISABLE_IMPLICIT_TOKEN"] = "1"  # children read it at import
    huggingface_hub.constants.HF_HUB_DISABLE_IMPLICIT_TOKEN = True  # this process read it at its import


def limit_pillow() -> None:
    """Make Pillow refuse pixel bombs from the header (above twice this it raises instead of warning)."""
    PIL.Image.MAX_IMAGE_PIXELS = MAX_IMAGE_PIXELS


def blocked_paths() -> list[str]:
    hub_cache = Path(os.environ.get("HF_HOME", Path.home() / ".cache" / "huggingface"))
    candidates = [REPO_ROOT / ".git", REPO_ROOT / ".venv", REPO_ROOT / ".ci-venv", hub_cache]
    return [str(path) for path in candidates]


def queue_options() -> dict[str, Any]:
    return {"max_size": QUEUE_MAX_SIZE, "default_concurrency_limit": DEFAULT_CONCURRENCY}


def launch_options(
    paths: AppPaths, *, server_name: str | None = None, server_port: int | None = None, share: bool = False
) -> dict[str, Any]:
    """Keyword arguments for ``Blocks.launch``; ``None`` server settings defer to GRADIO_SERVER_NAME/PORT."""
    return {
        "server_name": server_name,
        "server_port": server_port,
        "share": share,
        "max_file_size": MAX_UPLOAD,
        "enable_monitoring": False,
        "allowed_paths": [str(paths.examples)],
        "blocked_paths": blocked_paths(),
        # gr.Error messages (ours, written for users) are always shown; other exception text could leak internals.
        "show_error": False,
        "footer_links": ["api", "gradio"],
    }
