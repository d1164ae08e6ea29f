"""The viewers of one shared session on this instance (``/v1/share/{token}``).

A viewer is a websocket with a share token: its own TCP connection to the session's
running instance, in the share's mode (``view``: input dropped by the RFB filter;
``control``: passed on). Viewers neither start nor keep a session: they join a running
one, and leave when it ends (closed with its reason), when their share is revoked, or
by themselves, which changes nothing else. At most ``max_viewers`` at once.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

from ..core.errors import Refused


@dataclass(eq=False)
class Viewer:
    """One viewer: its share (a secret: never shown), mode, user, since when, and how
    to close its websocket with a reason."""

    share: str
    mode: str
    user: str | None
    close: Callable[[str], None]
    since: float = field(default_factory=time.time)


class Viewers:
    """The viewers of one session (see the module)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._viewers: list[Viewer] = []

    def check(self) -> None:
        """Refused (429) when all the places are taken (asked before a viewer's 101)."""
        if len(self._viewers) >= self.limit:
            raise Refused(429, f"all {self.limit} viewer places of this session are taken")

    @contextmanager
    def joined(self, viewer: Viewer) -> Iterator[Viewer]:
        """``viewer`` is one of them while the block runs; Refused (429) when all the
        places are taken (another viewer was quicker since :meth:`check`)."""
        self.check()
        self._viewers.append(viewer)
        try:
            yield viewer
        finally:
            self._viewers.remove(viewer)

    def close(self, reason: str, share: str | None = None) -> int:
        """Close every viewer (of ``share`` only, when given); how many."""
        closing = [v for v in self._viewers if share is None or v.share == share]
        for viewer in closing:
            viewer.close(reason)
        return len(closing)

    def describe(self) -> list[dict[str, object]]:
        """What ``/v1/status`` and the dashboard show of each (never the share token)."""
        return [{"mode": v.mode, "user": v.user, "since": round(v.since, 3)}
                for v in self._viewers]
