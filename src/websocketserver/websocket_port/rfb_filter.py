"""A tunnel of an RFB service through :class:`~..core.rfb.ClientStream`.

Every tunnel of a service that declares ``"protocol": "rfb"`` gets one: an owner's is
parsed only up to its ClientInit (whose shared flag it forces to 1, so that no page
disconnects the viewers), then leaves the tunnel's hot path; a ``view`` viewer's
stays, dropping every message that could change the session and counting them. The
server's bytes are read only up to its security types.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from picows import WSCloseCode
from prometheus_client import Counter

from ..core.rfb import ClientStream, Mode, Violation

if TYPE_CHECKING:
    from .tunnel import Tunnel


class RfbFilter:
    """The RFB stream of ``tunnel``'s browser, in ``mode``; ``dropped`` counts the
    input a viewer sent that never reached the application, by message type."""

    def __init__(self, tunnel: Tunnel, mode: Mode, dropped: Counter) -> None:
        self._tunnel = tunnel
        self._stream = ClientStream(mode)
        self._dropped = dropped
        self._counted = dict(self._stream.dropped)

    def upstream(self, data: bytes) -> bytes:
        """What of the browser's ``data`` goes to the server (b"": nothing; a
        violation closes the tunnel)."""
        out = self._stream.feed(data)
        if isinstance(out, Violation):
            self._tunnel.close(WSCloseCode(out.code), out.reason)
            return b""
        self._count()
        if self._stream.passthrough:  # an owner past its ClientInit: parsed no more
            self._tunnel.rfb = None
        return out

    def downstream(self, data: bytes) -> None:
        """The server's ``data``, before the browser gets it (its handshake only)."""
        if self._stream.needs_server and (
                violation := self._stream.feed_server(data)) is not None:
            self._tunnel.close(WSCloseCode(violation.code), violation.reason)

    def _count(self) -> None:
        for name, count in self._stream.dropped.items():
            if count != self._counted[name]:
                self._dropped.labels(name).inc(count - self._counted[name])
                self._counted[name] = count
