"""This machine as ddetr's caches see it: where they live and what identifies the CPU they were made on."""

from __future__ import annotations

import os
import platform
import tempfile
from pathlib import Path

CACHE_ENV = "DDETR_CACHE_DIR"


def cache_root() -> Path:
    """``$DDETR_CACHE_DIR``, else ``$XDG_CACHE_HOME/ddetr`` or ``~/.cache/ddetr`` (not created)."""
    explicit = os.environ.get(CACHE_ENV)
    if explicit:
        return Path(explicit)
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "ddetr"


def cache_dir() -> Path:
    """:func:`cache_root`, created, or a private temp folder when it is not writable (read-only home in some
    containers). Code and kernel choices are loaded from here, so a shared fallback must be this user's alone."""
    preferred = cache_root()
    try:
        preferred.mkdir(parents=True, exist_ok=True)
        if os.access(preferred, os.W_OK):
            return preferred
    except OSError:
        pass
    user = os.getuid() if hasattr(os, "getuid") else os.environ.get("USERNAME", "user")
    fallback = Path(tempfile.gettempdir()) / f"ddetr-{user}"
    fallback.mkdir(mode=0o700, exist_ok=True)
    if hasattr(os, "getuid") and (fallback.stat().st_uid != os.getuid() or fallback.stat().st_mode & 0o022):
        raise RuntimeError(f"{preferred} is not writable and {fallback} is not private to this user")
    return fallback


def cpu_signature() -> str:
    """The architecture, CPU model and feature flags: what compiled code and kernel timings depend on."""
    signature = platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as cpuinfo:
            for line in cpuinfo:
                if line.startswith(("flags", "Features", "model name")):
                    signature += line
                if line.strip() == "":
                    break
    except OSError:
        pass
    return signature


def cpu_name() -> str:
    """The CPU's model name (``Intel(R) Xeon(R) Processor @ 2.60GHz``), else the architecture."""
    for line in cpu_signature().splitlines():
        if "model name" in line and ":" in line:
            return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()
