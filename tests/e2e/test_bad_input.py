"""Bad input against the real server, byte for byte, and what it must answer.

Malformed HTTP request lines and headers, bad websocket upgrades, invalid frames and
broken TLS go over raw sockets to a server process started on the real command line.
Each case asserts the exact answer (an HTTP status, a close code, or a dropped
connection) and then that the server still serves: its process is alive, a fresh
websocket echo round trip and a file GET work, and its log holds no traceback.

Cases marked ``xfail(strict=True)`` are server bugs found here; the reason names them.
The wire helpers (``Conn``, ``ws_open``, ...) are shared with ``test_fuzz.py``; the byte
corpora and the hand-built frames are in ``tests/corpora.py``, which the unit tests
``test_frames.py`` and ``test_protocol.py`` read too.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import socket
import ssl
import struct
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import trustme

from corpora import (
    BAD_UPGRADES,
    INVALID_FRAMES,
    MAX_MESSAGE,
    NORMAL,
    OP_BINARY,
    OP_CLOSE,
    OP_PING,
    OP_PONG,
    PROTOCOL_ERROR,
    UPGRADE_HEADERS,
    VALID_EDGES,
    WS_KEY,
    close_payload,
    frame,
    upgrade_request,
)
from support import ROOT, EchoBackend, ServerProcess

ANSWER_TIMEOUT = 5.0
"""Seconds the server has to answer or close; longer is a hang."""
HANDSHAKE_TIMEOUT = 1.0
"""``--handshake_timeout`` of the servers here."""
WS_ACCEPT = base64.b64encode(hashlib.sha1(
    WS_KEY + b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11").digest()).decode()
LEAKS = (b"Traceback", b'File "', str(ROOT).encode(), b"site-packages")
"""What an error body must never contain."""

StartServer = Callable[..., ServerProcess]

_STATUS_LINE = re.compile(rb"HTTP/(\d\.\d) ([1-5]\d\d) [^\r\n]*")


# -- the wire ------------------------------------------------------------------------


@dataclass
class Response:
    """One HTTP response as it came over the wire."""

    version: str
    status: int
    headers: dict[str, str]  # names in lower case
    body: bytes

    def json(self) -> Any:
        assert self.headers.get("content-type", "").startswith("application/json"), self
        return json.loads(self.body)


class Conn:
    """A client socket, its receive buffer, and one deadline for the whole exchange."""

    def __init__(self, sock: socket.socket, timeout: float = ANSWER_TIMEOUT) -> None:
        self.sock = sock
        self.buf = b""
        self.deadline = time.monotonic() + timeout

    @classmethod
    def open(cls, port: int, context: ssl.SSLContext | None = None,
             timeout: float = ANSWER_TIMEOUT) -> Conn:
        sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        if context is not None:
            sock = context.wrap_socket(sock, server_hostname="127.0.0.1")
        return cls(sock, timeout)

    def __enter__(self) -> Conn:
        return self

    def __exit__(self, *exc: object) -> None:
        self.sock.close()

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def fill(self) -> bool:
        """Receive more bytes; False when the server has closed the connection."""
        remaining = self.deadline - time.monotonic()
        assert remaining > 0, f"no answer and no close in time; received {self.buf[:200]!r}"
        self.sock.settimeout(remaining)
        try:
            chunk = self.sock.recv(65536)
        except TimeoutError:
            raise AssertionError("no answer and no close in time; received "
                                 f"{self.buf[:200]!r}") from None
        except (ConnectionResetError, ssl.SSLEOFError):
            chunk = b""
        self.buf += chunk
        return bool(chunk)

    def take(self, size: int) -> bytes | None:
        """Exactly ``size`` bytes, or None if the connection closes first."""
        while len(self.buf) < size:
            if not self.fill():
                return None
        data, self.buf = self.buf[:size], self.buf[size:]
        return data

    def until_closed(self) -> bytes:
        """Everything the server sends until it closes the connection."""
        while self.fill():
            pass
        data, self.buf = self.buf, b""
        return data

    def response(self, *, head_request: bool = False) -> Response | None:
        """The next final response (1xx interim ones skipped), or None if closed first."""
        while True:
            while (end := self.buf.find(b"\r\n\r\n")) < 0:
                if not self.fill():
                    assert not self.buf, f"connection closed mid-answer: {self.buf!r}"
                    return None
            head, self.buf = self.buf[:end], self.buf[end + 4:]
            status_line, *lines = head.split(b"\r\n")
            match = _STATUS_LINE.fullmatch(status_line)
            assert match, f"malformed status line {status_line!r}"
            headers = {}
            for line in lines:
                name, colon, value = line.partition(b":")
                assert colon and name and name == name.strip(), f"malformed header {line!r}"
                headers[name.decode("latin-1").lower()] = value.strip().decode("latin-1")
            status = int(match[2])
            if 100 <= status < 200 and status != 101:
                continue
            if head_request or status in (101, 204, 304):
                body = b""
            elif "content-length" in headers:
                taken = self.take(int(headers["content-length"]))
                assert taken is not None, f"connection closed mid-body: {self.buf!r}"
                body = taken
            elif headers.get("transfer-encoding", "").lower() == "chunked":
                body = self.chunked_body()
            else:
                body = self.until_closed()
            return Response(match[1].decode(), status, headers, body)

    def line(self) -> bytes:
        """The next CRLF-terminated line, without the CRLF."""
        while (end := self.buf.find(b"\r\n")) < 0:
            assert self.fill(), f"connection closed mid-line: {self.buf!r}"
        line, self.buf = self.buf[:end], self.buf[end + 2:]
        return line

    def chunked_body(self) -> bytes:
        """A body in chunked transfer coding (RFC 9112 §7.1), decoded."""
        body = b""
        while size := int(self.line().split(b";")[0], 16):
            chunk = self.take(size + 2)
            assert chunk is not None and chunk.endswith(b"\r\n"), f"bad chunk {chunk!r}"
            body += chunk[:-2]
        while self.line():  # trailer fields
            pass
        return body

    def frame(self) -> tuple[int, bytes] | None:
        """The next frame from the server (checked well-formed), or None when closed."""
        head = self.take(2)
        if head is None:
            assert not self.buf, f"connection closed mid-frame: {self.buf!r}"
            return None
        assert head[0] & 0x70 == 0, f"server frame with RSV bits: {head!r}"
        assert head[0] & 0x80, f"fragmented server frame: {head!r}"
        assert not head[1] & 0x80, f"masked server frame: {head!r}"
        opcode, length = head[0] & 0x0F, head[1] & 0x7F
        assert opcode in (OP_BINARY, OP_CLOSE, OP_PING, OP_PONG), f"server opcode {opcode}"
        if length >= 126:
            extended = self.take(2 if length == 126 else 8)
            assert extended is not None, "connection closed mid-frame"
            length = int.from_bytes(extended)
        payload = self.take(length)
        assert payload is not None, "connection closed mid-frame"
        return opcode, payload

    def frames_until_closed(self) -> list[tuple[int, bytes]]:
        """Every frame until the connection closes; nothing may follow a close frame."""
        frames: list[tuple[int, bytes]] = []
        while (next_frame := self.frame()) is not None:
            assert not frames or frames[-1][0] != OP_CLOSE, f"frame after close: {frames}"
            frames.append(next_frame)
        return frames


def close_code(frames: list[tuple[int, bytes]]) -> int | None:
    """The code of the server's close frame, which must be the last frame, if any."""
    if not frames or frames[-1][0] != OP_CLOSE:
        return None
    payload = frames[-1][1]
    assert len(payload) >= 2, f"close frame without a code: {payload!r}"
    code: int = struct.unpack("!H", payload[:2])[0]
    return code


def ws_open(port: int, context: ssl.SSLContext | None = None) -> Conn:
    """A websocket connection after a checked, valid handshake."""
    conn = Conn.open(port, context)
    conn.send(upgrade_request())
    response = conn.response()
    assert response is not None and response.status == 101, response
    assert response.headers["sec-websocket-accept"] == WS_ACCEPT
    return conn


def ws_exchange(port: int, data: bytes) -> list[tuple[int, bytes]]:
    """Send ``data`` after a valid handshake; the server's frames until it closes."""
    with ws_open(port) as conn:
        conn.send(data)
        return conn.frames_until_closed()


def http_exchange(port: int, request: bytes, context: ssl.SSLContext | None = None,
                  ) -> Response | None:
    """Send ``request``; the first final response, or None if closed without one."""
    with Conn.open(port, context) as conn:
        conn.send(request)
        return conn.response(head_request=request.lstrip(b"\r\n").startswith(b"HEAD "))


def port(server: ServerProcess, name: str = "http") -> int:
    """The server's ``http`` or ``ws`` port."""
    number = server.http_port if name == "http" else server.ws_port
    assert number is not None
    return number


def assert_no_leak(response: Response) -> None:
    for marker in LEAKS:
        assert marker not in response.body, f"{marker!r} in the body: {response.body[:300]!r}"


def echo_roundtrip(port: int, context: ssl.SSLContext | None = None) -> None:
    """A websocket through the server to the echo backend and back, closed cleanly."""
    data = os.urandom(64)
    with ws_open(port, context) as conn:
        conn.send(frame(OP_BINARY, data))
        received = b""
        while len(received) < len(data):
            next_frame = conn.frame()
            assert next_frame is not None and next_frame[0] == OP_BINARY, next_frame
            received += next_frame[1]
        assert received == data
        conn.send(frame(OP_CLOSE, close_payload(NORMAL)))
        assert close_code(conn.frames_until_closed()) == NORMAL


def assert_alive(server: ServerProcess, context: ssl.SSLContext | None = None) -> None:
    """The server process is alive, tunnels and serves files."""
    assert server.proc.poll() is None, f"server exited with {server.proc.returncode}"
    echo_roundtrip(port(server, "ws"), context)
    request = b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
    response = http_exchange(port(server), request, context)
    assert response is not None and response.status == 200, response


def assert_no_traceback(log: str) -> None:
    assert "Traceback" not in log, log[log.index("Traceback") - 200:][:3000]


def assert_serving(server: ServerProcess, context: ssl.SSLContext | None = None) -> None:
    """The server process is alive, tunnels, serves files and logged no traceback."""
    assert_alive(server, context)
    assert_no_traceback(server.log())


# -- servers ---------------------------------------------------------------------------


def start(log_dir: Path, backend: EchoBackend, *args: str,
          tls: tuple[Path, Path] | None = None) -> ServerProcess:
    """The server in basic mode in front of ``backend``, with small limits."""
    return ServerProcess.start("--client_port", str(backend.port), "--max_message_size",
                               str(MAX_MESSAGE), "--handshake_timeout", str(HANDSHAKE_TIMEOUT),
                               *args, tls=tls, log_dir=log_dir)


@pytest.fixture(scope="module")
def backend() -> Iterator[EchoBackend]:
    echo = EchoBackend()
    yield echo
    echo.close()


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory,
           backend: EchoBackend) -> Iterator[ServerProcess]:
    """One server for the plain corpus; every test checks it still serves."""
    process = start(tmp_path_factory.mktemp("bad_input"), backend)
    yield process
    process.close()


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture(scope="module")
def client_context(ca: trustme.CA) -> ssl.SSLContext:
    context = ssl.create_default_context()
    ca.configure_trust(context)
    return context


@pytest.fixture(scope="module")
def tls_server(tmp_path_factory: pytest.TempPathFactory, backend: EchoBackend,
               ca: trustme.CA) -> Iterator[ServerProcess]:
    """The same server speaking wss and https with a trustme certificate."""
    directory = tmp_path_factory.mktemp("bad_tls")
    cert = ca.issue_cert("127.0.0.1")
    cert_path, key_path = directory / "cert.pem", directory / "key.pem"
    cert.cert_chain_pems[0].write_to_path(cert_path)
    cert.private_key_pem.write_to_path(key_path)
    process = start(directory, backend, tls=(cert_path, key_path))
    yield process
    process.close()


# -- malformed HTTP: the parser answers 400 on either port ----------------------------

_HOST = b"Host: 127.0.0.1\r\n"
PARSE_ERRORS = {
    "binary garbage": b"\x00\x01\x02\xff garbage\r\n\r\n",
    "TLS ClientHello on a plain port": b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03"
                                       + bytes(40),
    "HTTP/2 connection preface": b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
    "lower-case method": b"get / HTTP/1.1\r\n" + _HOST + b"\r\n",
    "illegal character in method": b"G@T / HTTP/1.1\r\n" + _HOST + b"\r\n",
    "tab between method and target": b"GET\t/ HTTP/1.1\r\n" + _HOST + b"\r\n",
    "version HTTP/1.x": b"GET / HTTP/1.x\r\n" + _HOST + b"\r\n",
    "version HTTP/1.2": b"GET / HTTP/1.2\r\n" + _HOST + b"\r\n",
    "version HTTP/3.0": b"GET / HTTP/3.0\r\n" + _HOST + b"\r\n",
    "version HTTP/1.10": b"GET / HTTP/1.10\r\n" + _HOST + b"\r\n",
    "lower-case version": b"GET / http/1.1\r\n" + _HOST + b"\r\n",
    "bare LF line ends": b"GET / HTTP/1.1\n" + _HOST[:-2] + b"\n\n",
    "NUL in the target": b"GET /a\x00b HTTP/1.1\r\n" + _HOST + b"\r\n",
    "raw non-ASCII target": b"GET /\xff\xfe HTTP/1.1\r\n" + _HOST + b"\r\n",
    "request line over --max_header_size": b"GET /" + b"a" * 9000 + b" HTTP/1.1\r\n"
                                           + _HOST + b"\r\n",
    "method over --max_header_size": b"A" * 9000 + b" / HTTP/1.1\r\n" + _HOST + b"\r\n",
    "header over --max_header_size": b"GET / HTTP/1.1\r\n" + _HOST + b"X: " + b"a" * 9000
                                     + b"\r\n\r\n",
    "header name over --max_header_size": b"GET / HTTP/1.1\r\n" + _HOST + b"X" * 9000
                                          + b": y\r\n\r\n",
    "header without colon": b"GET / HTTP/1.1\r\n" + _HOST + b"NoColon\r\n\r\n",
    "space before colon": b"GET / HTTP/1.1\r\nHost : 127.0.0.1\r\n\r\n",
    "space in header name": b"GET / HTTP/1.1\r\n" + _HOST + b"X Y: z\r\n\r\n",
    "empty header name": b"GET / HTTP/1.1\r\n" + _HOST + b": x\r\n\r\n",
    "NUL in header value": b"GET / HTTP/1.1\r\n" + _HOST + b"X: a\x00b\r\n\r\n",
    "CR in header value": b"GET / HTTP/1.1\r\n" + _HOST + b"X: a\rb\r\n\r\n",
    "DEL in header value": b"GET / HTTP/1.1\r\n" + _HOST + b"X: a\x7fb\r\n\r\n",
    "obsolete line folding": b"GET / HTTP/1.1\r\n" + _HOST + b"X: a\r\n  folded\r\n\r\n",
    "too many headers": b"GET / HTTP/1.1\r\n" + _HOST
                        + b"".join(b"X-%d: y\r\n" % i for i in range(200)) + b"\r\n",
    "HTTP/1.1 without Host": b"GET / HTTP/1.1\r\nConnection: close\r\n\r\n",
    "two Host headers": b"GET / HTTP/1.1\r\n" + _HOST + b"Host: other\r\n\r\n",
    "Content-Length not a number": b"POST / HTTP/1.1\r\n" + _HOST + b"Content-Length: abc"
                                   b"\r\n\r\n",
    "negative Content-Length": b"POST / HTTP/1.1\r\n" + _HOST + b"Content-Length: -1\r\n\r\n",
    "Content-Length overflow": b"POST / HTTP/1.1\r\n" + _HOST + b"Content-Length: "
                               + b"9" * 30 + b"\r\n\r\n",
    "two different Content-Lengths": b"POST / HTTP/1.1\r\n" + _HOST + b"Content-Length: 1\r\n"
                                     b"Content-Length: 2\r\n\r\nab",
    "Content-Length with Transfer-Encoding": b"POST / HTTP/1.1\r\n" + _HOST
                                             + b"Content-Length: 3\r\nTransfer-Encoding: "
                                               b"chunked\r\n\r\n0\r\n\r\n",
    "Transfer-Encoding not ending in chunked": b"POST / HTTP/1.1\r\n" + _HOST
                                               + b"Transfer-Encoding: chunked, gzip\r\n\r\n",
    "bad chunk size": b"POST / HTTP/1.1\r\n" + _HOST + b"Transfer-Encoding: chunked\r\n\r\n"
                      b"zz\r\n",
}


@pytest.mark.parametrize("port_name", ["http", "ws"])
@pytest.mark.parametrize("request_bytes", PARSE_ERRORS.values(), ids=PARSE_ERRORS.keys())
def test_malformed_request_is_400(server: ServerProcess, port_name: str,
                                  request_bytes: bytes) -> None:
    response = http_exchange(port(server, port_name), request_bytes)
    assert response is not None and response.status == 400, response
    assert response.headers.get("connection", "").lower() != "keep-alive"
    assert_no_leak(response)
    assert_serving(server)


# -- well-formed but wrong requests on the HTTP port -----------------------------------

_CLOSE = _HOST + b"Connection: close\r\n"
HTTP_CORPUS = {  # request, the status it must get, whether the answer is JSON {"error"}
    "POST to a file": (b"POST /index.html HTTP/1.1\r\n" + _CLOSE + b"Content-Length: 2\r\n\r\n"
                       b"{}", 405, True),
    "DELETE to the API": (b"DELETE /v1/status?security_token=K HTTP/1.1\r\n" + _CLOSE
                          + b"\r\n", 405, True),
    "API without the security token": (b"GET /v1/status HTTP/1.1\r\n" + _CLOSE + b"\r\n",
                                       401, True),
    "API with a wrong bearer token": (b"GET /v1/status HTTP/1.1\r\n" + _CLOSE
                                      + b"Authorization: Bearer nope\r\n\r\n", 401, True),
    "API with a non-UTF-8 bearer token": (b"GET /v1/status HTTP/1.1\r\n" + _CLOSE
                                          + b"Authorization: Bearer \xff\xfe\r\n\r\n", 401, True),
    "API with a non-UTF-8 token escape": (b"GET /v1/status?security_token=%ff HTTP/1.1\r\n"
                                          + _CLOSE + b"\r\n", 401, True),
    "unknown API call": (b"GET /v1/nope?security_token=K HTTP/1.1\r\n" + _CLOSE + b"\r\n",
                         404, True),
    "unknown API version": (b"GET /v2/status?security_token=K HTTP/1.1\r\n" + _CLOSE
                            + b"\r\n", 404, True),
    "release with an empty token": (b"GET /v1/release/?security_token=K HTTP/1.1\r\n" + _CLOSE
                                    + b"\r\n", 404, True),
    "EnSight REST bridge": (b"GET /ensight/v1/x HTTP/1.1\r\n" + _CLOSE + b"\r\n", 501, True),
    "encoded dot-dot": (b"GET /%2e%2e/%2e%2e/etc/passwd HTTP/1.1\r\n" + _CLOSE + b"\r\n",
                        404, False),
    "encoded slash": (b"GET /..%2f..%2fetc/passwd HTTP/1.1\r\n" + _CLOSE + b"\r\n", 404, False),
    "encoded NUL": (b"GET /index.html%00.txt HTTP/1.1\r\n" + _CLOSE + b"\r\n", 404, False),
    "non-UTF-8 escape": (b"GET /%ff%fe HTTP/1.1\r\n" + _CLOSE + b"\r\n", 404, False),
    "invalid escape": (b"GET /%zz HTTP/1.1\r\n" + _CLOSE + b"\r\n", 404, False),
    "absolute-form target": (b"GET http://127.0.0.1/index.html HTTP/1.1\r\n" + _CLOSE + b"\r\n",
                             200, False),
    "version HTTP/2.0": (b"GET / HTTP/2.0\r\n" + _CLOSE + b"\r\n", 505, True),
    "HTTP/0.9 request line": (b"GET /\r\n" + _CLOSE + b"\r\n", 505, True),
    "asterisk-form target": (b"OPTIONS * HTTP/1.1\r\n" + _CLOSE + b"\r\n", 405, True),
    "authority-form target": (b"CONNECT 127.0.0.1:22 HTTP/1.1\r\n" + _CLOSE + b"\r\n", 405,
                              True),
    "unknown Expect": (b"GET / HTTP/1.1\r\n" + _CLOSE + b"Expect: bogus\r\n\r\n", 417, False),
    "unsatisfiable Range": (b"GET /index.html HTTP/1.1\r\n" + _CLOSE
                            + b"Range: bytes=99999999-\r\n\r\n", 416, False),
    # RFC 9110 §14.2: an invalid Range is ignored, the whole file is sent
    "malformed Range": (b"GET /index.html HTTP/1.1\r\n" + _CLOSE + b"Range: bytes=x-y\r\n\r\n",
                        200, False),
    # RFC 9110 §13.1: a recipient MUST ignore a conditional header it cannot parse
    "garbage If-Modified-Since": (b"GET /index.html HTTP/1.1\r\n" + _CLOSE
                                  + b"If-Modified-Since: garbage\r\n\r\n", 200, False),
    "non-ASCII If-None-Match": (b"GET /index.html HTTP/1.1\r\n" + _CLOSE
                                + b"If-None-Match: \xff\r\n\r\n", 200, False),
}


@pytest.mark.parametrize(("request_bytes", "status", "is_json"), HTTP_CORPUS.values(),
                         ids=HTTP_CORPUS.keys())
def test_wrong_http_request_gets_its_status(server: ServerProcess, request_bytes: bytes,
                                            status: int, is_json: bool) -> None:
    response = http_exchange(port(server), request_bytes)
    assert response is not None and response.status == status, response
    if is_json:
        assert "error" in response.json()
    assert_no_leak(response)
    assert_serving(server)


# -- bad websocket upgrades on the websocket port --------------------------------------

@pytest.mark.parametrize(("request_bytes", "status"), BAD_UPGRADES.values(),
                         ids=BAD_UPGRADES.keys())
def test_bad_upgrade_is_refused(server: ServerProcess, request_bytes: bytes,
                                status: int) -> None:
    response = http_exchange(port(server, "ws"), request_bytes)
    assert response is not None and response.status == status, response
    if status != 405:
        assert "error" in response.json()
    if status == 426:  # RFC 9110 §15.5.22, RFC 6455 §4.4
        assert response.headers["upgrade"] == "websocket", response.headers
        assert response.headers["sec-websocket-version"] == "13", response.headers
    assert "sec-websocket-accept" not in response.headers
    assert_no_leak(response)
    assert_serving(server)


@pytest.mark.parametrize("port_name", ["http", "ws"])
def test_non_utf8_user_key_is_anonymous(start_server: StartServer, echo: EchoBackend,
                                        tmp_path: Path, port_name: str) -> None:
    users = tmp_path / "users.json"
    users.write_text(json.dumps({"alice": "secret"}))
    fresh = start_server("--client_port", str(echo.port), "--users_file", str(users))
    if port_name == "http":
        response = http_exchange(port(fresh), b"GET /v1/status?security_token=K HTTP/1.1"
                                 b"\r\n" + _CLOSE + b"X-User-Key: \xff\r\n\r\n")
        assert response is not None and response.status == 200, response
    else:
        request = upgrade_request(headers=UPGRADE_HEADERS + b"X-User-Key: \xff\r\n")
        response = http_exchange(port(fresh, "ws"), request)
        assert response is not None and response.status == 101, response
    assert_serving(fresh)


@pytest.mark.parametrize("port_name", ["http", "ws"])
def test_incomplete_request_is_closed_after_handshake_timeout(server: ServerProcess,
                                                              port_name: str) -> None:
    started = time.monotonic()
    with Conn.open(port(server, port_name)) as conn:
        conn.send(b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: ")
        assert conn.until_closed() == b""
    assert time.monotonic() - started >= HANDSHAKE_TIMEOUT - 0.5
    assert_serving(server)


def test_internal_error_is_logged_at_default_verbosity(tmp_path: Path) -> None:
    """Malformed requests log one quiet line, but a handler's exception stays an ERROR."""
    log = tmp_path / "server.log"
    code = f"""if True:
        import logging
        from websocketserver.server import configure_logging
        from websocketserver.settings import Settings
        configure_logging(Settings(ws_port=1, log_file={str(log)!r}))
        try:
            raise RuntimeError("a bug in a request handler")
        except RuntimeError:  # what aiohttp does with it, then it answers 500
            logging.getLogger("aiohttp.server").exception("Error handling request from %s",
                                                          "127.0.0.1")
    """
    subprocess.run([sys.executable, "-c", code], check=True, timeout=30, cwd=tmp_path)
    assert "ERROR aiohttp.server" in log.read_text()
    assert "RuntimeError: a bug in a request handler" in log.read_text()


# -- invalid frames after a valid handshake ---------------------------------------------

_C = close_payload
@pytest.mark.parametrize(("data", "code"), INVALID_FRAMES.values(), ids=INVALID_FRAMES.keys())
def test_invalid_frame_is_closed_with_its_code(server: ServerProcess, data: bytes,
                                               code: int) -> None:
    frames = ws_exchange(port(server, "ws"), data)
    assert [opcode for opcode, _ in frames] == [OP_CLOSE], frames
    assert close_code(frames) == code
    assert_serving(server)


def test_pings_before_an_invalid_frame_are_answered(server: ServerProcess) -> None:
    data = frame(OP_PING, b"p1") + frame(OP_PING, b"p2") + frame(OP_BINARY, b"x", rsv=4)
    frames = ws_exchange(port(server, "ws"), data)
    assert frames[:2] == [(OP_PONG, b"p1"), (OP_PONG, b"p2")]
    assert close_code(frames) == PROTOCOL_ERROR and len(frames) == 3
    assert_serving(server)


@pytest.mark.parametrize(("data", "pongs", "echo"), VALID_EDGES.values(),
                         ids=VALID_EDGES.keys())
def test_valid_edge_case_is_served(server: ServerProcess, data: bytes, pongs: list[bytes],
                                   echo: bytes) -> None:
    with ws_open(port(server, "ws")) as conn:
        conn.send(data)
        got_pongs: list[bytes] = []
        got_echo = b""
        while len(got_pongs) < len(pongs) or len(got_echo) < len(echo):
            next_frame = conn.frame()
            assert next_frame is not None, "closed before answering"
            opcode, payload = next_frame
            assert opcode in (OP_PONG, OP_BINARY), next_frame
            if opcode == OP_PONG:
                got_pongs.append(payload)
            else:
                got_echo += payload
        assert (got_pongs, got_echo) == (pongs, echo)
        conn.send(frame(OP_CLOSE, close_payload(NORMAL)))
        assert conn.frames_until_closed() == [(OP_CLOSE, close_payload(NORMAL))]
    assert_serving(server)


@pytest.mark.parametrize("payload", [b"", _C(1000), _C(1001, b"going"), _C(1003), _C(1011),
                                     _C(3000), _C(4999, "é".encode())],
                         ids=["empty", "1000", "1001", "1003", "1011", "3000", "4999"])
def test_valid_close_is_answered_with_1000(server: ServerProcess, payload: bytes) -> None:
    assert ws_exchange(port(server, "ws"), frame(OP_CLOSE, payload)) == [(OP_CLOSE, _C(NORMAL))]
    assert_serving(server)


# -- broken TLS ----------------------------------------------------------------------------


def client_hello(context: ssl.SSLContext) -> bytes:
    """The ClientHello this client context would send."""
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = context.wrap_bio(incoming, outgoing, server_hostname="127.0.0.1")
    with pytest.raises(ssl.SSLWantReadError):
        tls.do_handshake()
    return outgoing.read()


def tls_handshake(sock: socket.socket, context: ssl.SSLContext,
                  ) -> tuple[ssl.SSLObject, ssl.MemoryBIO, ssl.MemoryBIO]:
    """A TLS handshake driven by hand, so that raw records can follow it."""
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = context.wrap_bio(incoming, outgoing, server_hostname="127.0.0.1")
    while True:
        try:
            tls.do_handshake()
            break
        except ssl.SSLWantReadError:
            sock.sendall(outgoing.read())
            incoming.write(sock.recv(65536))
    sock.sendall(outgoing.read())
    return tls, incoming, outgoing


def tls_session_end(sock: socket.socket, tls: ssl.SSLObject, incoming: ssl.MemoryBIO) -> str:
    """Read until the server ends the session: ``close_notify``, ``alert`` or ``eof``."""
    conn = Conn(sock)
    while conn.fill():
        incoming.write(conn.buf)
        conn.buf = b""
        try:
            data = tls.read(65536)
        except ssl.SSLWantReadError:
            continue
        except ssl.SSLZeroReturnError:
            return "close_notify"
        except ssl.SSLError:
            return "alert"
        assert data == b"", f"unexpected application data {data!r}"
        return "close_notify"
    return "eof"


@pytest.fixture(params=["https", "wss"])
def tls_port(request: pytest.FixtureRequest, tls_server: ServerProcess) -> int:
    return port(tls_server, "http" if request.param == "https" else "ws")


TLS_GARBAGE = {
    "plain HTTP request": b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n",
    "plain websocket upgrade": upgrade_request(),
    "zeros": bytes(100),
    "handshake record of garbage": b"\x16\x03\x01\x00\x40" + b"A" * 64,
    "application data before a handshake": b"\x17\x03\x03\x00\x05hello",
    "SSLv2 ClientHello": b"\x80\x2e\x01\x00\x02" + bytes(45),
}


@pytest.mark.parametrize("data", TLS_GARBAGE.values(), ids=TLS_GARBAGE.keys())
def test_tls_port_drops_garbage(tls_server: ServerProcess, client_context: ssl.SSLContext,
                                tls_port: int, data: bytes) -> None:
    with Conn.open(tls_port) as conn:
        conn.send(data)
        answer = conn.until_closed()
    assert answer == b"" or answer[0] == 0x15, f"not a TLS alert: {answer[:100]!r}"
    assert_serving(tls_server, client_context)


@pytest.mark.parametrize("cut", ["record header", "half", "all but one byte"])
def test_truncated_client_hello_is_dropped_after_handshake_timeout(
        tls_server: ServerProcess, client_context: ssl.SSLContext, tls_port: int,
        cut: str) -> None:
    hello = client_hello(client_context)
    size = {"record header": 5, "half": len(hello) // 2, "all but one byte": len(hello) - 1}
    started = time.monotonic()
    with Conn.open(tls_port) as conn:
        conn.send(hello[:size[cut]])
        assert conn.until_closed() == b""
    assert time.monotonic() - started >= HANDSHAKE_TIMEOUT - 0.5
    assert_serving(tls_server, client_context)


def test_forged_record_after_handshake_is_refused(tls_server: ServerProcess,
                                                  client_context: ssl.SSLContext,
                                                  tls_port: int) -> None:
    with socket.create_connection(("127.0.0.1", tls_port), timeout=ANSWER_TIMEOUT) as sock:
        tls, incoming, _ = tls_handshake(sock, client_context)
        sock.sendall(b"\x17\x03\x03\x00\x20" + b"x" * 32)  # fails its integrity check
        started = time.monotonic()
        assert tls_session_end(sock, tls, incoming) in ("alert", "eof")
    assert time.monotonic() - started < 1.0
    assert_serving(tls_server, client_context)


@pytest.mark.parametrize("truncation", ["record", "request"])
def test_truncated_tls_after_handshake_ends_at_handshake_timeout(
        tls_server: ServerProcess, client_context: ssl.SSLContext, tls_port: int,
        truncation: str) -> None:
    with socket.create_connection(("127.0.0.1", tls_port), timeout=ANSWER_TIMEOUT) as sock:
        started = time.monotonic()
        tls, incoming, outgoing = tls_handshake(sock, client_context)
        if truncation == "record":
            tls.write(b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
            sock.sendall(outgoing.read()[:-5])
        else:
            tls.write(b"GET / HTTP/1.1\r\nHost: 12")
            sock.sendall(outgoing.read())
        assert tls_session_end(sock, tls, incoming) in ("close_notify", "eof")
    assert time.monotonic() - started >= HANDSHAKE_TIMEOUT - 0.5
    assert_serving(tls_server, client_context)


def test_tls_connection_is_released_when_the_guard_fires(tls_server: ServerProcess,
                                                         client_context: ssl.SSLContext,
                                                         ) -> None:
    """A slowloris ignores close_notify: the TCP connection must end all the same."""
    with socket.create_connection(("127.0.0.1", port(tls_server))) as sock:
        tls_handshake(sock, client_context)
        Conn(sock, HANDSHAKE_TIMEOUT + 3).until_closed()


def test_abrupt_disconnects_during_tls_do_no_harm(tls_server: ServerProcess,
                                                  client_context: ssl.SSLContext,
                                                  tls_port: int) -> None:
    hello = client_hello(client_context)
    reset = struct.pack("ii", 1, 0)  # SO_LINGER on, 0 s: close with a RST
    with socket.create_connection(("127.0.0.1", tls_port)) as sock:
        sock.sendall(hello[: len(hello) // 2])
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, reset)
    with socket.create_connection(("127.0.0.1", tls_port)) as sock:
        tls, _, outgoing = tls_handshake(sock, client_context)
        tls.write(b"GET / HTTP/1.1\r\nHo")
        sock.sendall(outgoing.read())
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, reset)
    assert_serving(tls_server, client_context)


# -- server bugs found here (each strict xfail until it is fixed) --------------------------


@pytest.mark.parametrize("port_name", ["http", "ws"])
def test_non_ascii_expect_is_417(server: ServerProcess, port_name: str) -> None:
    request = upgrade_request(headers=b"Expect: \xff\r\n")
    response = http_exchange(port(server, port_name), request)
    assert response is not None and response.status == 417, response


@pytest.mark.xfail(strict=True, reason="the 505 for an HTTP/2.0 or HTTP/0.9 request line has an "
                   "'HTTP/2.0' / 'HTTP/0.9' status line (aiohttp echoes the request's version); "
                   "RFC 9112 §2.3: the server's own version, HTTP/1.1")
@pytest.mark.parametrize("request_line", [b"GET / HTTP/2.0\r\n", b"GET /\r\n"],
                         ids=["HTTP/2.0", "HTTP/0.9"])
def test_unsupported_http_version_is_answered_in_http11(server: ServerProcess,
                                                        request_line: bytes) -> None:
    response = http_exchange(port(server), request_line + _CLOSE + b"\r\n")
    assert response is not None and response.status == 505, response
    assert response.version == "1.1"
