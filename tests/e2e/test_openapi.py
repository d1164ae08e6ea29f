"""``GET /v1/openapi.json`` (issue 25) held to the live server: the document is valid
OpenAPI 3.1; it describes exactly the calls the router answers (the list comes from
the router, not from a copy); and every answer, errors included, is one the document
lists for its call, its body in the schema the document gives for that status and
content type. A status the document lists is produced here, or named in
:data:`NOT_PRODUCIBLE` with the reason.

One server for the module: a security token, a users file (another user's token), a
one-instance ``"command"`` echo service. The tests that reserve release before they end.
"""

from __future__ import annotations

import asyncio
import http.client
import json
import sys
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from typing import Any

import openapi_spec_validator
import pytest
import websockets
from jsonschema import Draft202012Validator
from referencing import Registry
from referencing.jsonschema import DRAFT202012

from support import ServerProcess, StartServer, wait_until
from websocketserver.http_port import openapi
from websocketserver.http_port.api import RestApi
from websocketserver.http_port.events import MAX_PER_CLIENT
from websocketserver.identity import Identity
from websocketserver.sessions.job_launcher import HEADER
from websocketserver.sessions.jobs import REPORT_MAX_SIZE
from websocketserver.sessions.reservations import MemoryStore
from websocketserver.sessions.services import ServiceManager
from websocketserver.settings import Settings

ECHO = ("import socket, sys\n"
        "with socket.create_server(('127.0.0.1', int(sys.argv[1]))) as server:\n"
        "    while True:\n"
        "        conn, _ = server.accept()\n"
        "        with conn:\n"
        "            while data := conn.recv(65536):\n"
        "                conn.sendall(data)\n")
USERS = {"alice": "alice-key", "bob": "bob-key"}
DOC_URI = "urn:websocketserver:openapi"
CROSS_SITE = {"Origin": "http://evil.example"}
UNKNOWN = {"token": "no-such-token", "service": "no-such-service"}
"""Path arguments the server knows nothing of."""
Operation = tuple[str, str]

NOT_PRODUCIBLE: dict[Operation, set[str]] = {
    # the reservation store unavailable: a Redis outage (tests/e2e/test_cluster.py);
    # a loopback server with its memory store has none
    ("GET", "/v1/status"): {"503"},
    ("GET", "/v1/status/{token}"): {"503"},
    ("GET", "/v1/status_view"): {"503"},
    ("GET", "/v1/metrics"): {"503"},
    ("GET", "/v1/release/{token}"): {"503"},
    ("GET", "/v1/share/{token}"): {"503"},
    # also 1000 streams open on the instance
    ("GET", "/v1/events/{token}"): {"503"},
    # a Slurm service's job submitted at the reserve ("start": "reserve"), refused or
    # raced by a release (tests/e2e/test_slurm_sessions.py)
    ("GET", "/v1/reserve/{service}"): {"410", "502"},
    # only during a shutdown, over in a moment
    ("GET", "/v1/health"): {"503"},
    # a report signed by a running Slurm job's secret (tests/e2e/test_slurm_sessions.py)
    ("POST", "/v1/job_report"): {"200", "503"},
}


def _pointer(*keys: str) -> str:
    return "#/" + "/".join(key.replace("~", "~0").replace("/", "~1") for key in keys)


class Checker:
    """Requests to a server, each answer checked against the document: the expected
    status, which the document lists for the call (else its ``default``), and a body
    in the schema given for that status and content type. ``seen``: the responses
    (status or ``default``) produced, by call."""

    def __init__(self, server: ServerProcess, doc: dict[str, Any],
                 seen: dict[Operation, set[str]] | None = None) -> None:
        self.server, self.doc = server, doc
        self.registry: Registry[Any] = Registry().with_resource(
            DOC_URI, DRAFT202012.create_resource(doc))
        self.seen = defaultdict(set) if seen is None else seen

    def on(self, server: ServerProcess) -> Checker:
        """The same checks, counted here, on another server."""
        return Checker(server, self.doc, self.seen)

    def validate(self, instance: Any, *keys: str) -> None:
        """``instance`` is in the schema at ``keys`` of the document."""
        Draft202012Validator({"$ref": DOC_URI + _pointer(*keys)},
                             registry=self.registry).validate(instance)

    def at(self, *keys: str) -> Any:
        """The document's part at ``keys``."""
        part: Any = self.doc
        for key in keys:
            part = part[key]
        return part

    def response(self, method: str, template: str, status: int) -> tuple[str, ...]:
        """The keys of the document's response to ``status`` of the call; recorded."""
        responses = self.at("paths", template, method.lower(), "responses")
        code = str(status) if str(status) in responses else "default"
        self.seen[method, template].add(code)
        return "paths", template, method.lower(), "responses", code

    def open(self, method: str, template: str, *, args: dict[str, str] | None = None,
             query: str = "", auth: bool = True, headers: dict[str, str] | None = None,
             body: bytes | None = None, send: str | None = None) -> http.client.HTTPResponse:
        """Send the request (``auth``: with the security token as a bearer token;
        ``send``: another method than the call's); the answer holds the connection."""
        path = template.format(**(args or {})) + (f"?{query}" if query else "")
        headers = {"Connection": "close", **({"Authorization": "Bearer K"} if auth else {}),
                   **(headers or {})}
        connection = http.client.HTTPConnection("127.0.0.1", self.server.http_port or 0,
                                                timeout=30)
        connection.request(send or method, path, body=body, headers=headers)
        return connection.getresponse()

    def call(self, status: int, method: str, template: str, **kwargs: Any) -> Any:
        """The call answers ``status`` as documented; its body (JSON decoded)."""
        with self.open(method, template, **kwargs) as answer:
            data = answer.read()
        assert answer.status == status, (method, template, kwargs, answer.status, data)
        keys = self.response(method, template, status)
        media_type = (answer.getheader("Content-Type") or "").partition(";")[0]
        assert media_type in self.at(*keys)["content"], (method, template, status, media_type)
        body = json.loads(data) if media_type == "application/json" else data.decode()
        self.validate(body, *keys, "content", media_type, "schema")
        return body

    def reserve(self, user: str | None = None) -> str:
        """A token of the echo service, reserved by ``user`` (a known user) if given."""
        query = f"user_key={USERS[user]}" if user else ""
        token: str = self.call(200, "GET", "/v1/reserve/{service}",
                               args={"service": "echo"}, query=query)["token"]
        return token

    def release(self, token: str) -> None:
        self.call(200, "GET", "/v1/release/{token}", args={"token": token}, auth=False)


def next_event(answer: http.client.HTTPResponse) -> dict[str, str] | None:
    """The next server-sent event's fields (comments skipped); None at the end."""
    fields: dict[str, str] = {}
    while line := answer.readline().decode():
        if line == "\n" and fields:
            return fields
        name, _, value = line.rstrip("\n").partition(": ")
        if name:
            fields[name] = value
    return None


def check_event(check: Checker, answer: http.client.HTTPResponse, event: str) -> None:
    """The stream's next event is ``event``, in the shape the document gives."""
    assert answer.status == 200
    keys = (*check.response("GET", "/v1/events/{token}", 200), "content",
            "text/event-stream", "x-itemSchema")
    fields = next_event(answer)
    assert fields is not None
    check.validate(fields, *keys)
    data = json.loads(fields["data"])
    check.validate(data, *keys, "properties", "data", "contentSchema")
    assert data["event"] == event, data


def in_process_routes() -> list[Operation]:
    """What the router of a REST API built here answers, read from its dispatch."""
    settings = Settings(ws_port=1, security_token="K")
    api = RestApi(ServiceManager(settings, MemoryStore(), Identity(settings)), "K",
                  lambda: None)
    return api.routes()


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    folder = tmp_path_factory.mktemp("openapi")
    config = folder / "services.json"
    config.write_text(json.dumps({"echo": {
        "command": [sys.executable, "-c", ECHO, "{port}"], "count": 1,
        "options": {"file_ext": [".txt"]}}}))
    (folder / "users.json").write_text(json.dumps(USERS))
    server = ServerProcess.start("--remote_session_config", str(config), "--users_file",
                                 str(folder / "users.json"), log_dir=folder)
    yield server
    server.close()


@pytest.fixture(scope="module")
def doc(server: ServerProcess) -> dict[str, Any]:
    status, body = server.get_json("/v1/openapi.json", auth=False)
    assert status == 200
    document: dict[str, Any] = body
    return document


def test_the_document_is_valid_openapi_3_1(doc: dict[str, Any]) -> None:
    openapi_spec_validator.validate(doc)
    assert doc["openapi"] == "3.1.0"


def test_the_document_describes_the_routers_calls_and_no_other(doc: dict[str, Any]) -> None:
    """The served document is the one of the routes the router lists; a route it does
    not describe fails the document, one it leaves out is not described."""
    routes = in_process_routes()
    assert {(method.upper(), path) for path, ops in doc["paths"].items()
            for method in ops} == set(routes)
    assert json.loads(json.dumps(openapi.document(routes))) == doc
    with pytest.raises(KeyError, match="GET /v1/nothing"):
        openapi.document([*routes, ("GET", "/v1/nothing")])
    method, path = routes[0]
    assert method.lower() not in openapi.document(routes[1:])["paths"].get(path, {})


def test_the_server_answers_the_documented_calls_and_no_other(server: ServerProcess,
                                                              doc: dict[str, Any]) -> None:
    """Each documented call is routed (no credentials: nothing changes); any other
    method, a longer path and unknown calls are 404 "unknown API call", or the 405 the
    path's call documents."""
    def answer(method: str, path: str) -> tuple[int, str]:
        with Checker(server, doc).open(method, path, args=UNKNOWN, auth=False) as response:
            return response.status, json.loads(response.read()).get("error", "")

    for path, operations in doc["paths"].items():
        for method in ("GET", "POST", "PUT", "DELETE", "PATCH", "OPTIONS"):
            status, error = answer(method, path)
            if method.lower() in operations:
                assert not error.startswith("unknown API call"), (method, path)
            else:
                assert (status == 404 and error.startswith("unknown API call")) or str(
                    status) in next(iter(operations.values()))["responses"], (method, path)
        if not any(other.startswith(path + "/") for other in doc["paths"]):
            assert answer("GET", path + "/x")[0] == 404
    for path in ("/v1/nothing", "/v1/", "/v2/status", "/v1/reserve", "/v1/status/a/b"):
        assert answer("GET", path) == (404, f"unknown API call: {path}")


def _stop(check: Checker, start_server: StartServer) -> None:
    """A page of another site may not stop the server; the 200 stops another one."""
    check.call(403, "GET", "/v1/stop", auth=False, headers=CROSS_SITE)
    other = start_server()
    check.on(other).call(200, "GET", "/v1/stop")
    assert other.wait_exit() == 0


def _status_calls(check: Checker, start_server: StartServer) -> None:
    """The status calls of a reserved, an active (bytes counted) and an ended instance,
    by the administrator (the security token as query or bearer) and by the token's
    holder (alone, or as the user who reserved it); another user's (403)."""
    token = check.reserve("alice")
    args = {"token": token}
    check.call(200, "GET", "/v1/status", query="security_token=K")
    check.call(200, "GET", "/v1/status/{token}", args=args, auth=False)

    async def while_active() -> None:
        async with websockets.connect(check.server.ws_url(token=token)) as ws:
            await ws.send(b"x")
            assert await asyncio.wait_for(ws.recv(), 30) == b"x"
            (echo,) = check.call(200, "GET", "/v1/status")
            assert echo["instances"][0]["state"] == "active"
            assert check.call(200, "GET", "/v1/status/{token}", args=args, auth=False,
                              query=f"user_key={USERS['alice']}")["state"] == "active"
            assert "<html" in check.call(200, "GET", "/v1/status_view")
            check.call(200, "GET", "/v1/status_view", query="fragment=1")
            assert "websocketserver_tunnels_open 1" in check.call(200, "GET", "/v1/metrics")
            check.release(token)
            await ws.wait_closed()

    asyncio.run(while_active())
    wait_until(lambda: check.call(200, "GET", "/v1/status/{token}", args=args)["state"]
               == "ended")
    check.call(403, "GET", "/v1/status/{token}", args=args, auth=False,
               query=f"user_key={USERS['bob']}")
    check.call(404, "GET", "/v1/status/{token}", args=UNKNOWN)


def _events(check: Checker, start_server: StartServer) -> None:
    """A stream (its holder's) of the state now, then the end; another user's (403),
    an unknown token's (404), and one over the per-client limit (429)."""
    token, template = check.reserve("alice"), "/v1/events/{token}"
    args = {"token": token}
    with ExitStack() as streams:
        answer = streams.enter_context(check.open("GET", template, args=args, auth=False))
        check_event(check, answer, "state")
        for _ in range(MAX_PER_CLIENT - 1):
            streams.enter_context(check.open("GET", template, args=args))
        check.call(429, "GET", template, args=args)
        check.call(403, "GET", template, args=args, auth=False,
                   query=f"user_key={USERS['bob']}")
        check.release(token)
        check_event(check, answer, "ended")
        assert next_event(answer) is None
    check.call(404, "GET", template, args=UNKNOWN)


def _reserve(check: Checker, start_server: StartServer) -> None:
    """The one instance reserved, then all in use (503); a page of another site (403);
    an unknown service (404)."""
    template = "/v1/reserve/{service}"
    token = check.reserve()
    check.call(503, "GET", template, args={"service": "echo"}, query="title=x")
    check.call(403, "GET", template, args={"service": "echo"}, auth=False,
               headers=CROSS_SITE)
    check.call(404, "GET", template, args=UNKNOWN)
    check.release(token)


def _release(check: Checker, start_server: StartServer) -> None:
    """Another user (403), a page of another site (403), an unknown token (404); the
    token's holder (200)."""
    token, template = check.reserve("alice"), "/v1/release/{token}"
    check.call(403, "GET", template, args={"token": token}, auth=False,
               query=f"user_key={USERS['bob']}")
    check.call(403, "GET", template, args={"token": token}, auth=False, headers=CROSS_SITE)
    check.call(404, "GET", template, args=UNKNOWN)
    check.release(token)


def _share(check: Checker, start_server: StartServer) -> None:
    """A control share (200), which a release revokes; a bad mode (400); view on a
    service that is not RFB (409); another user, another site (403); unknown (404)."""
    token, template = check.reserve("alice"), "/v1/share/{token}"
    share = check.call(200, "GET", template, args={"token": token}, query="mode=control")
    check.call(200, "GET", "/v1/release/{token}", args={"token": share["token"]}, auth=False)
    check.call(400, "GET", template, args={"token": token}, query="mode=x")
    check.call(409, "GET", template, args={"token": token}, query="mode=view")
    check.call(403, "GET", template, args={"token": token}, auth=False,
               query=f"user_key={USERS['bob']}")
    check.call(403, "GET", template, args={"token": token}, auth=False, headers=CROSS_SITE)
    check.call(404, "GET", template, args=UNKNOWN)
    check.release(token)


def _job_report(check: Checker, start_server: StartServer) -> None:
    """Refused bodies: no job's report here can be signed."""
    def report(status: int, body: bytes, headers: dict[str, str] | None = None) -> None:
        check.call(status, "POST", "/v1/job_report", auth=False, body=body,
                   headers={"Content-Type": "application/json", **(headers or {})})

    report(400, b"not json")
    report(403, b"{}", CROSS_SITE)
    report(410, json.dumps({"job_id": "123", "host": "n1", "port": 1, "time": 1.0}).encode(),
           {HEADER: "1.0 0123"})
    report(413, b" " * (REPORT_MAX_SIZE + 1))


PRODUCERS: dict[Operation, Callable[[Checker, StartServer], None]] = {
    ("GET", "/v1/stop"): _stop,
    ("GET", "/v1/status"): _status_calls,
    ("GET", "/v1/status/{token}"): _status_calls,
    ("GET", "/v1/status_view"): _status_calls,
    ("GET", "/v1/metrics"): _status_calls,
    ("GET", "/v1/events/{token}"): _events,
    ("GET", "/v1/reserve/{service}"): _reserve,
    ("GET", "/v1/release/{token}"): _release,
    ("GET", "/v1/share/{token}"): _share,
    ("GET", "/v1/health"): lambda check, _: check.call(200, "GET", "/v1/health"),
    ("GET", "/v1/openapi.json"): lambda check, _: check.call(200, "GET", "/v1/openapi.json",
                                                             auth=False),
    ("POST", "/v1/job_report"): _job_report,
}
"""What produces each call's own answers; the port's (421, default) and the dispatch's
(401, 405) are produced for every call that documents them."""


@pytest.fixture
def released(server: ServerProcess) -> Iterator[None]:
    """A test that fails half-way leaves the echo service's one instance to the next."""
    yield
    for instance in server.get_json("/v1/status")[1][0]["instances"]:
        server.get(f"/v1/release/{instance['token']}")


@pytest.mark.parametrize("operation", sorted(PRODUCERS), ids=" ".join)
@pytest.mark.usefixtures("released")
def test_every_answer_is_documented(operation: Operation, server: ServerProcess,
                                    doc: dict[str, Any], start_server: StartServer) -> None:
    """The call's answers, each as documented; every status it documents is produced
    (the port's and the dispatch's for every call, then its own) or not producible."""
    method, template = operation
    documented = set(doc["paths"][template][method.lower()]["responses"])
    check = Checker(server, doc)
    check.call(421, method, template, args=UNKNOWN, headers={"Host": "evil.example"})
    check.call(417, method, template, args=UNKNOWN, headers={"Expect": "nothing"})
    if "401" in documented:
        check.call(401, method, template, args=UNKNOWN, auth=False)
    if "405" in documented:
        check.call(405, method, template, args=UNKNOWN,
                   send="GET" if method == "POST" else "POST")
    PRODUCERS[operation](check, start_server)
    assert check.seen[operation] == documented - NOT_PRODUCIBLE.get(operation, set())
    assert NOT_PRODUCIBLE.get(operation, set()) <= documented


def test_every_documented_call_has_its_answers_produced(doc: dict[str, Any]) -> None:
    """A call added to the router (and so to the document) needs its producer here."""
    assert set(PRODUCERS) == {(method.upper(), path) for path, ops in doc["paths"].items()
                              for method in ops}
