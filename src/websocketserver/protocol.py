"""The upgrade decision, without I/O: a parsed request in, an accept or a refusal out.

:class:`~.handshake.Handshake` parses the bytes (httptools) into an
:class:`UpgradeRequest`; :func:`decide` judges it against the :class:`Policy` (the
settings and whether the server is closing); the outcomes of what needs state — the
token's claim in the store, the tunnel limits — become refusals through
:func:`claim_refusal` and :func:`limit_refusal`. Writing the answer is the I/O
layer's job (``handshake.write_refusal``, or picows' 101). Tests drive these with
values, no socket (``tests/test_protocol.py``).
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Mapping
from dataclasses import dataclass
from urllib.parse import parse_qsl

from multidict import CIMultiDict, MultiDict, MultiDictProxy

from .limits import LimitExceeded, origin_allowed

_NO_QUERY: MultiDictProxy[str] = MultiDictProxy(MultiDict())


@dataclass(frozen=True, slots=True)
class UpgradeRequest:
    """The parts of an upgrade request the server looks at (see also :mod:`.identity`).

    ``remote`` is the TCP peer's address (an IP), as aiohttp's ``request.remote``.
    """

    method: str
    version: str
    target: bytes
    headers: CIMultiDict[str]
    remote: str | None
    query: Mapping[str, str]

    @classmethod
    def parse(cls, method: str, version: str, target: bytes, headers: CIMultiDict[str],
              remote: str | None) -> UpgradeRequest:
        """A request with its query read from ``target`` (UTF-8, like the headers)."""
        query = target.partition(b"?")[2]
        parsed = (MultiDictProxy(MultiDict(parse_qsl(
            query.decode("utf-8", "surrogateescape"), keep_blank_values=True)))
            if query else _NO_QUERY)
        return cls(method, version, target, headers, remote, parsed)


@dataclass(frozen=True, slots=True)
class Refusal:
    """Refuse the request with ``status`` and the JSON ``{"error": reason}``."""

    status: int
    reason: str


@dataclass(frozen=True, slots=True)
class Accept:
    """Answer 101; ``token``: the reservation to claim first (None: basic mode)."""

    key: bytes
    binary: bool  # the client offered the "binary" subprotocol (noVNC does)
    token: str | None


@dataclass(frozen=True, slots=True)
class Policy:
    """What the decision depends on besides the request."""

    allowed_origins: tuple[str, ...]
    basic_mode: bool  # a --client_port is configured
    closing: bool = False


def protocol_refusal(version: str, expect: str | None) -> Refusal | None:
    """What neither port speaks: HTTP other than 1.0 and 1.1, an unknown ``Expect``."""
    if version not in ("1.0", "1.1"):
        return Refusal(505, f"HTTP/{version} is not supported")
    if expect is not None and expect.lower() != "100-continue":
        return Refusal(417, "unsupported Expect header")
    return None


def decide(request: UpgradeRequest, policy: Policy) -> Accept | Refusal:
    """Whether the request is a websocket upgrade this server serves, and how."""
    if policy.closing:
        return Refusal(503, "server is shutting down")
    headers = request.headers
    refusal = protocol_refusal(request.version, headers.get("Expect"))
    if refusal is not None:
        return refusal
    if request.version == "1.1" and len(headers.getall("Host", ())) != 1:
        return Refusal(400, "an HTTP/1.1 request needs one Host header")
    if request.method != "GET":
        return Refusal(405, "websocket upgrades are GET requests")
    if (headers.get("Upgrade", "").lower() != "websocket"
            or headers.get("Sec-WebSocket-Version") != "13"):
        return Refusal(426, "this port serves websocket upgrades only (version 13)")
    if request.version != "1.1":
        return Refusal(400, "websocket upgrades need HTTP/1.1")
    connection = {t.strip().lower() for t in headers.get("Connection", "").split(",")}
    key = headers.get("Sec-WebSocket-Key")
    if "upgrade" not in connection or key is None or not valid_key(key):
        return Refusal(400, "malformed websocket handshake")
    origin = headers.get("Origin")
    if not origin_allowed(origin, policy.allowed_origins):
        return Refusal(403, f"origin not allowed: {origin}")
    token = request.query.get("token")
    if token is None and not policy.basic_mode:
        return Refusal(404, "no service here: no --client_port configured and no ?token= given")
    offered = headers.get("Sec-WebSocket-Protocol", "")
    binary = "binary" in (p.strip() for p in offered.split(","))
    return Accept(key.encode("ascii"), binary, token)


def valid_key(key: str) -> bool:
    """RFC 6455 4.2.1: the key is 16 bytes in base64."""
    try:
        return len(base64.b64decode(key.encode("ascii"), validate=True)) == 16
    except (UnicodeEncodeError, binascii.Error):
        return False


def limit_refusal(exc: LimitExceeded) -> Refusal:
    """The refusal for a tunnel over a limit (429 per client or user, 503 in all)."""
    return Refusal(exc.status, str(exc))
