"""Forwarding a websocket to the cluster instance that runs its reservation.

A websocket may land on any instance (browsers do not follow redirects on an upgrade,
and balancers are not token-aware). When its reservation runs on another instance
and this one cannot take it over, the upgrade request is passed on to the owner over
TCP, signed with the cluster secret, and the bytes are spliced both ways with
backpressure: the owner answers 101 and tunnels as it would for the browser itself.

The forwarding instance adds three headers, and signs them:
``X-Websocketserver-Forward: NONCE TIME SIGNATURE``, ``X-Websocketserver-Client`` (the
browser's address, for the owner's limits and log) and ``X-Websocketserver-User``
(who the browser is, for the owner's token binding). TIME is Redis's clock (ms) as the
forwarding instance read it with the owner's address; SIGNATURE is HMAC-SHA256 of the
token, nonce, time, client and user under ``--cluster_secret``. The owner checks it in
constant time, then has the shared store check that TIME is under a minute old and
record the nonce for that minute: a forged, replayed or stale forward is refused with
403, and the nonces kept are those of one minute. A forwarded request is never
forwarded again.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import secrets
from collections.abc import Callable
from dataclasses import dataclass

from ..core.errors import Refused
from ..core.protocol import FORWARD_HEADER, UpgradeRequest
from ..core.upstream import HIGH_WATER
from ..websocket_port import backend

log = logging.getLogger("websocketserver.forward")

CLIENT_HEADER = "X-Websocketserver-Client"
USER_HEADER = "X-Websocketserver-User"
_OURS = {FORWARD_HEADER.lower(), CLIENT_HEADER.lower(), USER_HEADER.lower()}


@dataclass(frozen=True, slots=True)
class Forwarded:
    """A forward whose signature holds: who the browser behind it is."""

    nonce: str
    at: int
    """When it was signed: Redis's clock, in ms."""
    client: str
    user: str | None


def sign(secret: bytes, token: str, nonce: str, at: int, client: str,
         user: str | None) -> str:
    message = "\n".join((token, nonce, str(at), client, user or "")).encode(
        "utf-8", "surrogateescape")
    return hmac.new(secret, message, hashlib.sha256).hexdigest()


def signed_headers(secret: bytes, token: str, at: int, client: str,
                   user: str | None) -> list[str]:
    """The header lines a forwarding instance adds to the request, signed at ``at``."""
    nonce = secrets.token_hex(16)
    lines = [f"{FORWARD_HEADER}: {nonce} {at} {sign(secret, token, nonce, at, client, user)}",
             f"{CLIENT_HEADER}: {client}"]
    if user is not None:
        lines.append(f"{USER_HEADER}: {user}")
    return lines


def check(request: UpgradeRequest, secret: bytes | None) -> Forwarded | Refused | None:
    """None: not a forward. A :class:`Refused` (403) if it claims to be one but its
    signature does not hold (or no cluster is configured); else who it forwards."""
    value = request.headers.get(FORWARD_HEADER)
    if value is None:
        return None
    token = request.query.get("token")
    nonce, _, rest = value.partition(" ")
    at_text, _, signature = rest.partition(" ")
    at = int(at_text) if at_text.isdigit() and len(at_text) <= 16 else -1
    client = request.headers.get(CLIENT_HEADER, "")
    user = request.headers.get(USER_HEADER)
    if secret is None or token is None or not nonce or at < 0 or not hmac.compare_digest(
            signature.encode("ascii", "replace"),
            sign(secret, token, nonce, at, client, user).encode("ascii")):
        return Refused(403, "forwarded websocket with a wrong signature")
    return Forwarded(nonce, at, client, user)


def request_head(request: UpgradeRequest, extra: list[str]) -> bytes:
    """The request as the browser sent it (less any forwarding headers), plus ``extra``."""
    lines = [f"{request.method} {request.target.decode('latin-1')} HTTP/{request.version}"]
    lines += [f"{name}: {value}" for name, value in request.headers.items()
              if name.lower() not in _OURS]
    lines += extra
    return ("\r\n".join(lines) + "\r\n\r\n").encode("utf-8", "surrogateescape")


HALF_CLOSED_TIMEOUT = 5.0
"""Seconds a splice stays half-closed (one side sent FIN) before both sides are closed:
a websocket's closing handshake is over by then, and the slot is given back."""


class _Half(asyncio.Protocol):
    """One direction of a splice: what this side receives is written to the other;
    a full other side pauses this one (backpressure), and either end ends both.

    A FIN is passed on as a FIN (the other side may still answer); once both sides
    have sent one, or one has for :data:`HALF_CLOSED_TIMEOUT`, both transports close,
    which is what gives the forward's limits back (``connection_lost``).
    """

    def __init__(self, ended: Callable[[], None]) -> None:
        self.other: asyncio.Transport | None = None
        self.peer: _Half | None = None
        self.eof = False
        self._ended = ended

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport.set_write_buffer_limits(high=HIGH_WATER)  # type: ignore[attr-defined]

    def data_received(self, data: bytes) -> None:
        if self.other is not None:
            self.other.write(data)

    def eof_received(self) -> bool:
        self.eof = True
        other = self.other
        if other is None or (self.peer is not None and self.peer.eof) \
                or not other.can_write_eof():
            return False  # both ways ended: this transport closes, and the other with it
        other.write_eof()
        asyncio.get_running_loop().call_later(HALF_CLOSED_TIMEOUT, other.close)
        return True

    def pause_writing(self) -> None:
        if self.other is not None:
            self.other.pause_reading()

    def resume_writing(self) -> None:
        if self.other is not None and not self.other.is_closing():
            self.other.resume_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        if self.other is not None:
            self.other.close()
        self._ended()


async def splice(browser: asyncio.Transport, host: str, port: int, head: bytes,
                 tail: bytes, ended: Callable[[], None]) -> None:
    """Connect to the owner at ``host:port``, send it ``head`` and ``tail``, and relay
    both ways until either side closes; ``ended`` is called once, at the end.

    Raises :class:`~.backend.BackendError` if the owner cannot be reached.
    """
    loop = asyncio.get_running_loop()
    browser.pause_reading()
    sock = await backend.connect(host, port)
    done = False

    def end_once() -> None:
        nonlocal done
        if not done:
            done = True
            ended()

    towards_owner = _Half(end_once)
    towards_browser = _Half(end_once)
    owner, _ = await loop.create_connection(lambda: towards_browser, sock=sock)
    towards_browser.other = browser
    towards_owner.other = owner
    towards_browser.peer, towards_owner.peer = towards_owner, towards_browser
    towards_owner.connection_made(browser)
    browser.set_protocol(towards_owner)
    owner.write(head + tail)
    if browser.is_closing():
        owner.close()
        return
    browser.resume_reading()
