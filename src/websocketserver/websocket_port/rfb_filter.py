"""A tunnel of an RFB service through :class:`~..core.rfb.ClientStream`.

Every tunnel of a service that declares ``"protocol": "rfb"`` gets one: an owner's is
parsed only up to its ClientInit (whose shared flag it forces to 1, so that no page
disconnects the viewers), then leaves the tunnel's hot path; a ``view`` viewer's
stays, dropping every message that could change the session and counting them. The
server's bytes are read only up to its security types; with the session's VNC
password, the proxy logs in to the server for the browser (:mod:`~..core.vnc_login`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from picows import WSCloseCode
from prometheus_client import Counter

from ..core.rfb import ClientStream, Mode, Violation
from ..core.vnc_login import ServerLogin

if TYPE_CHECKING:
    from .tunnel import Tunnel


class RfbFilter:
    """The RFB stream of ``tunnel``'s browser, in ``mode``; ``dropped`` counts the
    input a viewer sent that never reached the application, by message type."""

    def __init__(self, tunnel: Tunnel, mode: Mode, dropped: Counter,
                 password: str | None = None,
                 offered: Callable[[frozenset[int]], None] | None = None) -> None:
        self._tunnel = tunnel
        self._stream = ClientStream(mode)
        self._offered = offered  # told the security types the server offers, once
        self._login = ServerLogin(password) if password is not None else None
        self._dropped = dropped
        self._counted = dict(self._stream.dropped)

    def upstream(self, data: bytes) -> bytes:
        """What of the browser's ``data`` goes to the server (b"": nothing; a
        violation closes the tunnel)."""
        out = self._stream.feed(data)
        if self._login is not None and not isinstance(out, Violation):
            out = self._login.from_browser(out)  # its None is the proxy's login
        if isinstance(out, Violation):
            self._tunnel.close(WSCloseCode(out.code), out.reason)
            return b""
        self._count()
        if self._stream.passthrough and (self._login is None or self._login.done):
            self._tunnel.rfb = None  # an owner past its ClientInit: parsed no more
        return out

    def downstream(self, data: bytes) -> bytes:
        """What of the server's ``data`` the browser gets (its handshake is read, and
        rewritten while the proxy logs in)."""
        if self._login is not None and not self._login.done:
            login = self._login.from_server(data)
            if isinstance(login, Violation):
                self._tunnel.close(WSCloseCode(login.code), login.reason)
                return b""
            data, answer = login
            if answer:
                self._tunnel.inject(answer)
        if self._stream.needs_server and (
                violation := self._stream.feed_server(data)) is not None:
            self._tunnel.close(WSCloseCode(violation.code), violation.reason)
        if self._offered is not None and self._stream.offered:
            self._offered(self._stream.offered)  # (with the proxy's login: None)
            self._offered = None
        return data

    def _count(self) -> None:
        for name, count in self._stream.dropped.items():
            if count != self._counted[name]:
                self._dropped.labels(name).inc(count - self._counted[name])
                self._counted[name] = count
