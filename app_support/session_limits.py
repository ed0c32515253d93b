"""Limits that keep one page (or one API client) from taking the server from everyone else.

Gradio's queue has one global size: forty long-lived events from one session fill it, and then every visitor's
Detect is turned away. So the long-lived and the frequent endpoints are not queued behind a concurrency slot at
all; instead each event takes a ``SessionLimits`` slot for its session as it starts (refused at once beyond the
per-session or total cap, so it never waits in the queue), and frequent cheap calls pass a ``RateLimit``.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections import defaultdict, deque
from collections.abc import Iterator

from app_support.errors import UserFacingError


class TooManyRequestsError(UserFacingError):
    """A session asked for more at once, or more often, than the server allows one session."""


def session_key(request: object) -> str:
    """The session a request belongs to (Gradio's ``session_hash``; one key for requests without one)."""
    key = getattr(request, "session_hash", None)
    return key if isinstance(key, str) and key else "-"


class SessionLimits:
    """At most ``per_session`` events of one kind at once per session, and ``total`` over all sessions."""

    def __init__(self, what: str, *, per_session: int, total: int) -> None:
        self.what = what
        self.per_session = per_session
        self.total = total
        self._lock = threading.Lock()
        self._held: dict[str, int] = defaultdict(int)

    @contextlib.contextmanager
    def hold(self, request: object) -> Iterator[None]:
        key = session_key(request)
        with self._lock:
            if self._held[key] >= self.per_session:
                raise TooManyRequestsError(
                    f"this page already has {self._held[key]} {self.what} open; close one first "
                    f"(at most {self.per_session} per visitor)"
                )
            if sum(self._held.values()) >= self.total:
                raise TooManyRequestsError(f"the server has {self.total} {self.what} open; try again in a minute")
            self._held[key] += 1
        try:
            yield
        finally:
            with self._lock:
                self._held[key] -= 1
                if self._held[key] <= 0:
                    del self._held[key]


class RateLimit:
    """At most ``calls`` per ``seconds`` per session (a sliding window)."""

    MAX_SESSIONS = 10_000  # forget the oldest sessions beyond this, so the table itself stays small

    def __init__(self, what: str, *, calls: int, seconds: float) -> None:
        self.what = what
        self.calls = calls
        self.seconds = seconds
        self._lock = threading.Lock()
        self._times: dict[str, deque[float]] = {}

    def check(self, request: object) -> None:
        key = session_key(request)
        now = time.monotonic()
        with self._lock:
            times = self._times.pop(key, None) or deque()
            while times and now - times[0] > self.seconds:
                times.popleft()
            self._times[key] = times  # re-inserted: the dict stays ordered by last use
            if len(times) >= self.calls:
                raise TooManyRequestsError(
                    f"too many {self.what} requests: at most {self.calls} every {self.seconds:g} s per visitor"
                )
            times.append(now)
            while len(self._times) > self.MAX_SESSIONS:
                self._times.pop(next(iter(self._times)))
