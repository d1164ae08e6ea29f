"""The upgrade decision in-process, no socket: requests built from values, and the
bad-upgrade corpus of the end-to-end tests parsed from its bytes."""

from __future__ import annotations

import httptools
import pytest
from multidict import CIMultiDict

from corpora import BAD_UPGRADES
from websocketserver.core.errors import Refused
from websocketserver.core.protocol import (
    Accept,
    Policy,
    UpgradeRequest,
    cross_site_refusal,
    decide,
    host_refusal,
    protocol_refusal,
)

KEY = "dGhlIHNhbXBsZSBub25jZQ=="
GOOD = {"Host": "x", "Upgrade": "websocket", "Connection": "keep-alive, Upgrade",
        "Sec-WebSocket-Key": KEY, "Sec-WebSocket-Version": "13"}
BASIC = Policy(allowed_origins=(), basic_mode=True)


def request(target: bytes = b"/websockify", method: str = "GET", version: str = "1.1",
            **headers: str | None) -> UpgradeRequest:
    fields = CIMultiDict({**GOOD, **{k.replace("_", "-"): v for k, v in headers.items()
                                     if v is not None}})
    for name, value in headers.items():
        if value is None:
            fields.popall(name.replace("_", "-"), None)
    return UpgradeRequest.parse(method, version, target, fields, "127.0.0.1")


def test_a_good_upgrade_is_accepted() -> None:
    assert decide(request(), BASIC) == Accept(KEY.encode(), False, None)
    offered = request(b"/?token=abc&session_name=x", Sec_WebSocket_Protocol="chat, binary")
    assert decide(offered, BASIC) == Accept(KEY.encode(), True, "abc")


@pytest.mark.parametrize(("changed", "status"), [
    ({"method": "POST"}, 405),
    ({"version": "1.0"}, 400),
    ({"version": "2.0"}, 505),
    ({"Expect": "bogus"}, 417),
    ({"Upgrade": "h2c"}, 426),
    ({"Sec_WebSocket_Version": "8"}, 426),
    ({"Connection": "keep-alive"}, 400),
    ({"Sec_WebSocket_Key": "c2hvcnQ="}, 400),
    ({"Sec_WebSocket_Key": None}, 400),
    ({"Host": None}, 400),
])
def test_bad_upgrades_are_refused(changed: dict[str, str | None], status: int) -> None:
    method = str(changed.pop("method", "GET"))
    version = str(changed.pop("version", "1.1"))
    decision = decide(request(b"/websockify", method=method, version=version, **changed), BASIC)
    assert isinstance(decision, Refused) and decision.status == status, decision


def test_origin_closing_and_basic_mode() -> None:
    only = Policy(allowed_origins=("https://portal.example",), basic_mode=True)
    assert decide(request(Origin="https://evil.example"), only) == Refused(
        403, "origin not allowed: https://evil.example")
    assert isinstance(decide(request(Origin="https://portal.example/"), only), Accept)
    assert isinstance(decide(request(), only), Accept)  # no Origin: not a browser
    closing = Policy(allowed_origins=(), basic_mode=True, closing=True)
    assert decide(request(), closing) == Refused(503, "server is shutting down")
    no_backend = Policy(allowed_origins=(), basic_mode=False)
    assert decide(request(), no_backend).status == 404  # type: ignore[union-attr]
    assert isinstance(decide(request(b"/?token=t"), no_backend), Accept)


def test_limits_and_http_versions() -> None:
    assert Refused(429, "too many") == Refused(429, "too many") != Refused(503, "too many")
    assert protocol_refusal("1.1", None) is None
    assert protocol_refusal("1.1", "100-Continue") is None
    assert protocol_refusal("0.9", None) == Refused(505, "HTTP/0.9 is not supported")


class _Parsed:
    """httptools' callbacks, collecting a request as the handshake does."""

    def __init__(self) -> None:
        self.target = b""
        self.headers: CIMultiDict[str] = CIMultiDict()

    def on_url(self, url: bytes) -> None:
        self.target += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.add(name.decode("latin-1"), value.decode("utf-8", "surrogateescape"))


@pytest.mark.parametrize(("data", "status"), BAD_UPGRADES.values(), ids=BAD_UPGRADES)
def test_bad_upgrade_corpus_is_refused_by_the_decision(data: bytes, status: int) -> None:
    """The corpus the end-to-end test sends to a real server, decided in-process."""
    parsed = _Parsed()
    parser = httptools.HttpRequestParser(parsed)
    try:
        parser.feed_data(data)
    except httptools.HttpParserUpgrade:
        pass
    request = UpgradeRequest.parse(parser.get_method().decode("ascii"),
                                   parser.get_http_version(), parsed.target, parsed.headers,
                                   "127.0.0.1")
    decision = decide(request, Policy(allowed_origins=(), basic_mode=True))
    if isinstance(decision, Accept):  # refused later, by the store: a token it lacks
        assert status == 404 and decision.token is not None
    else:
        assert decision.status == status, decision


# -- what a page of another site can make a browser send (issue 22, finding 6) ----------

NAMES = frozenset({"viz.example.com", "10.0.0.5", "fd00::2"})


@pytest.mark.parametrize("host", [
    "viz.example.com", "VIZ.example.com:8080", "viz.example.com.", "10.0.0.5:9090",
    "[fd00::2]:8080", "localhost", "localhost:9090", "app.localhost", "127.0.0.1:1",
    "127.8.9.10", "[::1]:8080", None])
def test_the_names_the_server_answers_to(host: str | None) -> None:
    assert host_refusal(host, NAMES) is None


@pytest.mark.parametrize("host", ["attacker.example", "attacker.example:9090",
                                  "viz.example.com.attacker.example", "10.0.0.6",
                                  "[fd00::3]:80", "localhost.attacker.example", ""])
def test_other_host_names_get_421_naming_the_option(host: str) -> None:
    refusal = host_refusal(host, NAMES)
    assert refusal is not None and refusal.status == 421
    assert "--allowed_host" in refusal.reason


def test_no_host_check_with_a_star() -> None:
    assert host_refusal("attacker.example", None) is None


def test_the_upgrade_checks_host_unless_forwarded() -> None:
    """A forwarded upgrade carries the Host the browser gave the forwarding instance,
    which checked it; its signature is checked after the decision (forward.check)."""
    policy = Policy(allowed_origins=(), basic_mode=True, hosts=NAMES)
    assert decide(request(Host="viz.example.com:8080"), policy) == Accept(KEY.encode(), False,
                                                                          None)
    refused = decide(request(Host="rebind.attacker.example"), policy)
    assert isinstance(refused, Refused) and refused.status == 421
    forwarded = request(Host="node2.example.com", X_Websocketserver_Forward="n s")
    assert isinstance(decide(forwarded, policy), Accept)


PAGE = "http://127.0.0.1:9090"


@pytest.mark.parametrize("headers", [
    {},  # curl, PyEnSight, scripts
    {"Sec-Fetch-Site": "none"},  # typed in the address bar, a bookmark
    {"Sec-Fetch-Site": "same-origin"},  # the dashboard's buttons
    {"Sec-Fetch-Site": "same-origin", "Origin": PAGE},
    {"Host": "viz:9090", "Origin": "http://viz:9090"},  # plain http, no Sec-Fetch
    {"Host": "viz:9090", "Referer": "http://viz:9090/v1/status_view"},
    {"Host": "viz:9090", "Origin": "https://portal.example"},  # listed
    {"Sec-Fetch-Site": "cross-site", "Origin": "https://portal.example/"},
    {"Sec-Fetch-Site": "cross-site", "Referer": "https://portal.example/page?x=1"},
])
def test_requests_that_are_not_cross_site(headers: dict[str, str]) -> None:
    assert cross_site_refusal(CIMultiDict(headers), ("https://portal.example",)) is None


@pytest.mark.parametrize("headers", [
    {"Sec-Fetch-Site": "cross-site"},  # <img src=".../v1/stop" referrerpolicy=no-referrer>
    {"Sec-Fetch-Site": "cross-site", "Referer": "https://attacker.example/"},
    {"Sec-Fetch-Site": "cross-site", "Origin": "https://attacker.example"},
    {"Sec-Fetch-Site": "same-site", "Origin": "http://127.0.0.1:8888"},  # another port
    {"Sec-Fetch-Site": "cross-site", "Origin": "null"},  # a sandboxed frame
    {"Host": "viz:9090", "Origin": "http://attacker.example"},  # plain http
    {"Host": "viz:9090", "Referer": "http://attacker.example/x"},
    {"Host": "viz:9090", "Referer": "not a url"},
])
def test_cross_site_requests_are_refused(headers: dict[str, str]) -> None:
    refusal = cross_site_refusal(CIMultiDict(headers), ("https://portal.example",))
    assert refusal is not None and refusal.status == 403
    assert "--allowed_origin" in refusal.reason


def test_no_allowed_origin_allows_no_other_site() -> None:
    """Unlike websockets, where no --allowed_origin means any origin."""
    headers = CIMultiDict({"Sec-Fetch-Site": "cross-site", "Origin": "https://x.example"})
    assert cross_site_refusal(headers, ()) is not None
    assert cross_site_refusal(headers, ("*",)) is None
