"""Secrets stay out of the log and the answers; client text cannot forge log lines.

Through the real command line with ``--security_token``, ``--log_file`` and
``--verbose``: malformed requests carrying the token (plain and over TLS), a path with
encoded line breaks, and the log file's mode.
"""

from __future__ import annotations

import asyncio
import json
import re
import ssl
import stat
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import trustme
import websockets

from e2e.test_bad_input import Response, http_exchange, port
from support import EXAMPLES, ServerProcess, wait_until

TOKEN = "Tok3n-s3cret-9f2c"
GUID = "0b6e3c1e-5d7a-4c1f-9e2b-7a4d2c9f1e80"  # shaped like a reservation token
StartServer = Callable[..., ServerProcess]

MALFORMED = {  # requests aiohttp's parser refuses, each quoting the token
    "raw non-ASCII byte in the request line":
        f"GET /v1/status?security_token={TOKEN}".encode() + b"\xff HTTP/1.1\r\n"
        b"Host: 127.0.0.1\r\n\r\n",
    "over-long request line":
        f"GET /v1/status?security_token={TOKEN}&x=".encode() + b"a" * 9000
        + b" HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n",
    "control character in Authorization":
        f"GET /v1/status HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {TOKEN}\x01"
        "\r\n\r\n".encode(),
    "control character in the reservation token":
        f"GET /websockify?token={GUID}\x7f HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode(),
}
_RECORD = re.compile(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} (DEBUG|INFO|WARNING|ERROR|CRITICAL) ")


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture
def cert_files(ca: trustme.CA, tmp_path: Path) -> tuple[Path, Path]:
    cert = ca.issue_cert("127.0.0.1")
    cert_path, key_path = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert.cert_chain_pems[0].write_to_path(cert_path)
    cert.private_key_pem.write_to_path(key_path)
    return cert_path, key_path


def start_logging(start_server: StartServer, log_file: Path, verbose: int,
                  **kwargs: object) -> ServerProcess:
    return start_server("--log_file", str(log_file), "--verbose", str(verbose), token=TOKEN,
                        **kwargs)


def assert_no_secret(text: bytes | str) -> None:
    data = text.encode() if isinstance(text, str) else text
    assert TOKEN.encode() not in data and GUID.encode() not in data, data[-3000:]


def assert_generic_400(response: Response | None) -> None:
    assert response is not None and response.status == 400, response
    assert_no_secret(response.body)
    assert response.json() == {"error": "malformed HTTP request"}


def http_400s(server: ServerProcess) -> float:
    """The /v1/metrics count of 400 answers on the HTTP port."""
    status, _, body = server.get("/v1/metrics")
    assert status == 200
    found = re.search(rb'websocketserver_http_requests_total\{port="http",status="400"\} (\S+)',
                      body)
    return float(found.group(1)) if found else 0.0


@pytest.fixture(scope="module")
def logging_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """A server at ``--verbose 1`` logging to ``server.log`` beside its own log, shared by
    the tests that only send it malformed requests (each looks at the log lines it caused)."""
    folder = tmp_path_factory.mktemp("secrets")
    server = start_logging(lambda *a, **k: ServerProcess.start(*a, log_dir=folder, **k),
                           folder / "server.log", 1)
    yield server
    server.close()


@pytest.mark.parametrize("request_bytes", MALFORMED.values(), ids=MALFORMED.keys())
def test_malformed_request_echoes_and_logs_no_secret(logging_server: ServerProcess,
                                                     request_bytes: bytes) -> None:
    log_file = logging_server.log_path.with_name("server.log")
    before = log_file.read_text().count("Error handling request")
    assert_generic_400(http_exchange(port(logging_server), request_bytes))
    logged = wait_until(lambda: log_file.read_text().count("Error handling request") > before
                        and log_file.read_text())
    assert_no_secret(logged)
    assert stat.S_IMODE(log_file.stat().st_mode) == 0o600


def test_malformed_request_over_tls(start_server: StartServer, tmp_path: Path, ca: trustme.CA,
                                    cert_files: tuple[Path, Path]) -> None:
    """Over TLS too; an existing world-readable log file is made 0600."""
    log_file = tmp_path / "server.log"
    log_file.touch(mode=0o644)
    log_file.chmod(0o644)
    server = start_logging(start_server, log_file, 1, tls=cert_files)
    context = ssl.create_default_context()
    ca.configure_trust(context)
    for request_bytes in MALFORMED.values():
        assert_generic_400(http_exchange(port(server), request_bytes, context))
    logged = wait_until(lambda: log_file.read_text().count("Error handling request")
                        == len(MALFORMED) and log_file.read_text())
    assert_no_secret(logged)
    assert stat.S_IMODE(log_file.stat().st_mode) == 0o600


def test_malformed_requests_are_counted(logging_server: ServerProcess) -> None:
    server = logging_server
    before = http_400s(server)
    for request_bytes in MALFORMED.values():
        http_exchange(port(server), request_bytes)
    assert http_400s(server) == before + len(MALFORMED)


def test_websocket_port_echoes_and_logs_no_secret(start_server: StartServer,
                                                  tmp_path: Path) -> None:
    """The websocket port's refusals never quoted the request: keep it so."""
    log_file = tmp_path / "server.log"
    server = start_logging(start_server, log_file, 2)
    for request_bytes in MALFORMED.values():
        response = http_exchange(server.ws_port, request_bytes)
        assert response is not None and response.status == 400, response
        assert_no_secret(response.body)
        assert "error" in json.loads(response.body)
    logged = wait_until(lambda: log_file.read_text().count("websocket refused (400)")
                        == len(MALFORMED) and log_file.read_text())
    assert_no_secret(logged)


def test_encoded_line_breaks_in_a_path_forge_no_log_line(start_server: StartServer,
                                                         tmp_path: Path) -> None:
    """At -v 2 every path is logged; its decoded line breaks are escaped."""
    log_file = tmp_path / "server.log"
    server = start_logging(start_server, log_file, 2)
    forged = "1999-12-31%2023:59:59,999%20CRITICAL%20websocketserver.server:%20forged"
    for separator in ("%0a", "%0d", "%0d%0a", "%c2%85", "%e2%80%a8", "%e2%80%a9", "%0b%0c"):
        response = http_exchange(port(server),
                                 f"GET /x{separator}{forged} HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                                 "Connection: close\r\n\r\n".encode())
        assert response is not None and response.status == 404, response
    logged = wait_until(lambda: log_file.read_text(encoding="utf-8").count("forged") == 7
                        and log_file.read_text(encoding="utf-8"))
    for line in logged.splitlines():  # splits at every line break a viewer might honour
        assert _RECORD.match(line), f"a line that is not a record: {line!r}"
    assert "GET /x\\n1999-12-31 23:59:59,999 CRITICAL" in logged


def test_services_do_not_inherit_the_servers_secrets(start_server: StartServer,
                                                     tmp_path: Path) -> None:
    """The security token and the cluster secret given through the environment stay in
    the server: a service (a desktop with a terminal, say) does not find them in its own."""
    seen = tmp_path / "service-env.json"
    service = (f"import json, os, sys; open({str(seen)!r}, 'w').write(json.dumps("
               "dict(os.environ))); sys.argv[1:] = [sys.argv[1]]; "
               f"exec(open({str(EXAMPLES / 'echo_server.py')!r}).read())")
    config = tmp_path / "services.json"
    config.write_text(json.dumps({"probe": {"command": [sys.executable, "-c", service,
                                                        "{port}"], "count": 1}}))
    server = start_server("--remote_session_config", str(config), token=None,
                          env={"WEBSOCKETSERVER_SECURITY_TOKEN": TOKEN,
                               "WEBSOCKETSERVER_CLUSTER_SECRET": "cl5ster-s3cret"})
    status, body = server.get_json(f"/v1/reserve/probe?security_token={TOKEN}", auth=False)
    assert status == 200, body

    async def session() -> None:
        async with websockets.connect(server.ws_url(token=body["token"])) as ws:
            await ws.send(b"hello")
            assert await ws.recv() == b"hello"

    asyncio.run(session())
    environment = json.loads(seen.read_text())
    assert "WEBSOCKETSERVER_INSTANCE" in environment  # it is the service's environment
    assert not {name: value for name, value in environment.items()
                if TOKEN in value or "cl5ster-s3cret" in value}
