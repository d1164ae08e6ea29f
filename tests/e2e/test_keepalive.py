"""Keep-alive connections on the HTTP port are bounded like new ones (issue 12, finding 3).

After one complete request, a connection that stays idle or sends a head that never
ends is closed within ``--handshake_timeout``; many such connections, even enough to
use up the server's descriptors, only delay other clients until that time has passed,
and running out of descriptors is logged.
"""

from __future__ import annotations

import contextlib
import socket
import ssl
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import psutil
import pytest
import trustme

from support import LAUNCHER, ROOT, ServerProcess, free_port, wait_until

TIMEOUT = 0.5
"""``--handshake_timeout`` of the servers here."""
BOUND = TIMEOUT + 2.0
"""Latest a stalled connection may be closed (the timeout plus slack for a busy machine)."""
REQUEST = b"GET /no-such-file HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"  # a small answer (404)
PARTIAL = b"GET /no-such-file HTTP/1.1\r\nHost: 127.0.0.1\r\n"  # a head that never ends
LIMIT_FILES = ("import os, resource, sys; "
               "resource.setrlimit(resource.RLIMIT_NOFILE, (256, 256)); "
               "os.execv(sys.executable, [sys.executable, *sys.argv[1:]])")
"""``python -c LIMIT_FILES program args``: the program with at most 256 open files."""


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture(scope="module")
def cert_files(ca: trustme.CA, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    cert = ca.issue_cert("127.0.0.1", "localhost")
    folder = tmp_path_factory.mktemp("cert")
    cert_path, key_path = folder / "cert.pem", folder / "key.pem"
    cert.cert_chain_pems[0].write_to_path(str(cert_path))
    cert.private_key_pem.write_to_path(str(key_path))
    return cert_path, key_path


@pytest.fixture(scope="module", params=["http", "https"])
def server(request: pytest.FixtureRequest, cert_files: tuple[Path, Path],
           tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """Shared by the tests of ``connect``, whose connections all end with the test."""
    tls = cert_files if request.param == "https" else None
    started = ServerProcess.start("--handshake_timeout", str(TIMEOUT), tls=tls,
                                  log_dir=tmp_path_factory.mktemp("keepalive"))
    yield started
    started.close()


@pytest.fixture
def connect(server: ServerProcess, ca: trustme.CA) -> Iterator[Callable[[], socket.socket]]:
    """Open connections to the server's HTTP port (TLS when it speaks https)."""
    context = ssl.create_default_context()
    ca.configure_trust(context)
    opened: list[socket.socket] = []

    def open_one() -> socket.socket:
        sock: socket.socket = socket.create_connection(("127.0.0.1", server.http_port))
        if server.tls is not None:
            sock = context.wrap_socket(sock, server_hostname="127.0.0.1")
        opened.append(sock)
        return sock

    yield open_one
    for sock in opened:
        sock.close()


def read_response(sock: socket.socket) -> bytes:
    """One whole response with a ``Content-Length`` body."""
    sock.settimeout(10)
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        assert chunk, f"connection closed before a response: {data!r}"
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n")
                  if line.lower().startswith(b"content-length:"))
    while len(body) < length:
        chunk = sock.recv(65536)
        assert chunk, "connection closed in a response body"
        body += chunk
    assert head.startswith(b"HTTP/1.1 404 ") and b"connection: close" not in head.lower()
    return head


def closed_within(sock: socket.socket, bound: float) -> float:
    """Seconds until the server closes ``sock``; fails if it is still open after ``bound``."""
    began = time.monotonic()
    sock.settimeout(bound)
    try:
        while sock.recv(65536):
            pass
    except TimeoutError:
        pytest.fail(f"connection still open after {bound} s")
    except (ConnectionResetError, ssl.SSLError):
        pass  # closed without a clean TLS close or with unread data: closed all the same
    return time.monotonic() - began


def test_partial_second_head_is_closed(connect: Callable[[], socket.socket]) -> None:
    sock = connect()
    sock.sendall(REQUEST)
    read_response(sock)
    sock.sendall(PARTIAL)
    assert closed_within(sock, BOUND) > TIMEOUT / 2
    other = connect()  # and the server still answers
    other.sendall(REQUEST)
    read_response(other)


def test_idle_keepalive_connection_is_closed(connect: Callable[[], socket.socket]) -> None:
    sock = connect()
    for _ in range(2):  # keep-alive works: a second request inside the bound is answered
        sock.sendall(REQUEST)
        read_response(sock)
    assert closed_within(sock, BOUND) > TIMEOUT / 2


def stall(port: int, count: int) -> list[socket.socket]:
    """``count`` connections, each with a complete request and a head that never ends."""
    stalled = []
    for _ in range(count):
        sock = socket.create_connection(("127.0.0.1", port))
        sock.sendall(REQUEST + PARTIAL)  # pipelined: no need to wait for the answer
        stalled.append(sock)
    return stalled


def status_answers(server: ServerProcess) -> bool:
    """Whether ``/v1/status`` answers 200 now (a dropped connection is a no)."""
    with contextlib.suppress(OSError):
        return server.get("/v1/status")[0] == 200
    return False


def test_many_stalled_keepalive_connections_are_all_closed(
        start_server: Callable[..., ServerProcess]) -> None:
    server = start_server("--handshake_timeout", str(TIMEOUT))
    assert server.http_port is not None
    stalled = stall(server.http_port, 200)
    try:
        for sock in stalled:
            closed_within(sock, BOUND)
        assert server.get("/v1/status")[0] == 200
    finally:
        for sock in stalled:
            sock.close()


def test_server_out_of_descriptors_recovers_and_says_why(tmp_path: Path) -> None:
    """At 256 descriptors, stalled connections fill the server; once the timeout has
    closed them it answers again, and it logged why it could not accept."""
    ws_port, http_port = free_port(), free_port()
    argv = [sys.executable, "-c", LIMIT_FILES, str(LAUNCHER), "--listen_address", "127.0.0.1",
            "--http_directory", str(ROOT / "demo" / "www"), "--http_port", str(http_port),
            "--security_token", "K", "--handshake_timeout", str(TIMEOUT), str(ws_port)]
    server = ServerProcess(argv, ws_port=ws_port, http_port=http_port, token="K",
                           log_dir=tmp_path)
    stalled: list[socket.socket] = []
    try:
        files = psutil.Process(server.serving_pid()).rlimit(psutil.RLIMIT_NOFILE)
        assert files == (256, 256)
        stalled = stall(http_port, 300)  # more than the server has descriptors for
        wait_until(lambda: status_answers(server), timeout=BOUND + 1.0)
        log = server.log()
        assert "Too many open files (open-file limit 256" in log
        assert log.count("cannot accept connections") == 1  # once per interval, no flood
    finally:
        for sock in stalled:
            sock.close()
        server.close()


def ws_port_answers(port: int) -> bool:
    """Whether the websocket port answers a plain GET (426) now."""
    with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port),
                                                                timeout=2) as sock:
        sock.sendall(b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        return sock.recv(64).startswith(b"HTTP/1.1 426 ")
    return False


def test_websocket_port_out_of_descriptors_recovers_and_says_why(tmp_path: Path) -> None:
    """At 256 descriptors, connections that send nothing fill the server through its
    websocket port, where uvloop drops new ones silently: the server says so (once),
    and answers again once the handshake timeout has closed them."""
    ws_port, timeout = free_port(), 3.0
    argv = [sys.executable, "-c", LIMIT_FILES, str(LAUNCHER), "--listen_address", "127.0.0.1",
            "--handshake_timeout", str(timeout), str(ws_port)]
    server = ServerProcess(argv, ws_port=ws_port, http_port=None, log_dir=tmp_path)
    stalled: list[socket.socket] = []
    try:
        stalled = [socket.create_connection(("127.0.0.1", ws_port)) for _ in range(300)]
        wait_until(lambda: "open files in use" in server.log(), timeout=timeout)
        wait_until(lambda: ws_port_answers(ws_port), timeout=timeout + 3)
        log = server.log()
        assert f"websocket port {ws_port}: " in log and " of 256 open files in use" in log
        assert log.count("open files in use") == 1  # once per interval, no flood
    finally:
        for sock in stalled:
            sock.close()
        server.close()
