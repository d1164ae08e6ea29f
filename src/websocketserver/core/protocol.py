"""The upgrade decision, without I/O: a parsed request in, an accept or a refusal out.

:class:`~.handshake.Handshake` parses the bytes (httptools) into an
:class:`UpgradeRequest`; :func:`decide` judges it against the :class:`Policy` (the
settings and whether the server is closing) and returns :class:`Accept` or a
:class:`~.errors.Refused` (the one error type, also raised by what needs state: the
token's claim in the store, the tunnel limits). Writing the answer is the I/O layer's
job (``handshake.write_refusal``, or picows' 101). Tests drive these with
values, no socket (``tests/test_protocol.py``).

Both ports also judge here what a browser could be made to send by a page of another
site: :func:`host_refusal` (DNS rebinding: a request for a name this server does not
answer to) and :func:`cross_site_refusal` (a state-changing REST call made by another
site's page, e.g. ``<img src=".../v1/stop">``).
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Mapping
from dataclasses import dataclass
from urllib.parse import parse_qsl, urlsplit

from multidict import CIMultiDict, MultiDict, MultiDictProxy

from ..startup import host_name, is_loopback
from .errors import Refused

_NO_QUERY: MultiDictProxy[str] = MultiDictProxy(MultiDict())
FORWARD_HEADER = "X-Websocketserver-Forward"
"""Marks a websocket that another cluster instance forwarded, signed
(:mod:`~..cluster.forward`); its ``Host`` was checked there."""


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
    hosts: frozenset[str] | None = None  # names the server answers to; None: any


def protocol_refusal(version: str, expect: str | None) -> Refused | None:
    """What neither port speaks: HTTP other than 1.0 and 1.1, an unknown ``Expect``."""
    if version not in ("1.0", "1.1"):
        return Refused(505, f"HTTP/{version} is not supported")
    if expect is not None and expect.lower() != "100-continue":
        return Refused(417, "unsupported Expect header")
    return None


def decide(request: UpgradeRequest, policy: Policy) -> Accept | Refused:
    """Whether the request is a websocket upgrade this server serves, and how."""
    if policy.closing:
        return Refused(503, "server is shutting down")
    headers = request.headers
    refusal = protocol_refusal(request.version, headers.get("Expect"))
    if refusal is not None:
        return refusal
    if request.version == "1.1" and len(headers.getall("Host", ())) != 1:
        return Refused(400, "an HTTP/1.1 request needs one Host header")
    if FORWARD_HEADER not in headers:  # a forward's signature is checked instead: its
        refusal = host_refusal(headers.get("Host"), policy.hosts)  # Host is the browser's
        if refusal is not None:  # to the forwarding instance, which checked it
            return refusal
    if request.method != "GET":
        return Refused(405, "websocket upgrades are GET requests")
    if (headers.get("Upgrade", "").lower() != "websocket"
            or headers.get("Sec-WebSocket-Version") != "13"):
        return Refused(426, "this port serves websocket upgrades only (version 13)")
    if request.version != "1.1":
        return Refused(400, "websocket upgrades need HTTP/1.1")
    connection = {t.strip().lower() for t in headers.get("Connection", "").split(",")}
    key = headers.get("Sec-WebSocket-Key")
    if "upgrade" not in connection or key is None or not valid_key(key):
        return Refused(400, "malformed websocket handshake")
    origin = headers.get("Origin")
    if not origin_allowed(origin, policy.allowed_origins):
        return Refused(403, f"origin not allowed: {origin}")
    token = request.query.get("token")
    if token is None and not policy.basic_mode:
        return Refused(404, "no service here: no --client_port configured and no ?token= given")
    offered = headers.get("Sec-WebSocket-Protocol", "")
    binary = "binary" in (p.strip() for p in offered.split(","))
    return Accept(key.encode("ascii"), binary, token)


def host_refusal(host: str | None, names: frozenset[str] | None) -> Refused | None:
    """421 for a ``Host`` this server does not answer to (``names``, and loopback).

    DNS rebinding: a page of another site, its name made to resolve to this server,
    is same-origin with it and can read its answers (``/v1/status`` and its tokens);
    its requests still carry its own name as ``Host``. ``names``: None checks nothing
    (``--allowed_host '*'``). A request without ``Host`` (HTTP/1.0) is not a browser's.
    """
    if names is None or host is None:
        return None
    name = host_name(host)
    if name in names or is_loopback(name):
        return None
    shown = name if len(name) <= 100 else name[:100] + "..."
    return Refused(421, f"this server does not answer to the host name {shown!r}: add it "
                        "with --allowed_host (the name users and front ends use for it)")


def _origin_of(url: str | None) -> str | None:
    """``scheme://host[:port]`` of a URL (a ``Referer``), None if it has none."""
    if not url:
        return None
    try:
        parts = urlsplit(url)
    except ValueError:
        return "null"  # unparsable: from somewhere, not from here
    return f"{parts.scheme}://{parts.netloc}" if parts.scheme and parts.netloc else "null"


def _listed(origin: str, allowed: tuple[str, ...]) -> bool:
    """Whether ``--allowed_origin`` names ``origin`` (``*``: every one)."""
    wanted = origin.rstrip("/").lower()
    return any(a == "*" or a.rstrip("/").lower() == wanted for a in allowed)


def cross_site_refusal(headers: Mapping[str, str],
                       allowed_origins: tuple[str, ...]) -> Refused | None:
    """403 for a request a page of another origin made (CSRF), unless that origin is
    in ``--allowed_origin``; None for a typed URL, a same-origin page, or a client
    that is not a browser (no ``Origin``, ``Referer``, ``Sec-Fetch-Site``: PyEnSight,
    curl, scripts).

    Browsers send ``Sec-Fetch-Site`` to https and loopback URLs; ``same-origin`` and
    ``none`` (typed, bookmarked) pass, anything else (``same-site``: another port of
    this host; ``cross-site``) needs a listed ``Origin``, else ``Referer``. Without it
    (plain http to another host) a request whose ``Origin`` (else ``Referer``) names
    another host than its ``Host`` is refused; one with neither passes, as a page
    can make a browser send neither (``referrerpolicy="no-referrer"``): there only the
    security token protects (SECURITY.md).
    """
    fetch_site = headers.get("Sec-Fetch-Site")
    if fetch_site in ("same-origin", "none"):
        return None
    source = headers.get("Origin") or _origin_of(headers.get("Referer"))
    if fetch_site is None:
        if source is None:
            return None
        netloc = source.partition("://")[2]
        if netloc and netloc.lower() == headers.get("Host", "").strip().lower():
            return None
    if source is not None and _listed(source, allowed_origins):
        return None
    return Refused(403, "refused: a page of another site made this request (a page's "
                        "origin may be allowed with --allowed_origin)")


def valid_key(key: str) -> bool:
    """RFC 6455 4.2.1: the key is 16 bytes in base64."""
    try:
        return len(base64.b64decode(key.encode("ascii"), validate=True)) == 16
    except (UnicodeEncodeError, binascii.Error):
        return False


def origin_allowed(origin: str | None, allowed: tuple[str, ...]) -> bool:
    """Whether a websocket with this ``Origin`` header may connect.

    No allow-list (the default, as in the original server) or ``*`` allows any
    origin; a request without ``Origin`` comes from a non-browser client and is
    allowed.
    """
    if not allowed or "*" in allowed or origin is None:
        return True
    return origin.rstrip("/").lower() in {a.rstrip("/").lower() for a in allowed}
