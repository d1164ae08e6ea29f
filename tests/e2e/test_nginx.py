"""deploy/nginx.conf with real nginx in front: TLS at nginx, /websockify to the ws port,
no token in its access log; and docs/howto-nginx.md, run as written."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import ssl
import subprocess
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import trustme
import websockets
from playwright.sync_api import Browser

from e2e.runbook import Workspace, demo_page_echoes, runbooks
from e2e.sse import EventReader
from e2e.vnc_support import new_context, require
from support import (
    ROOT,
    EchoBackend,
    StartServer,
    free_port,
    recv_bytes,
    wait_port,
    wait_until,
)

NGINX = shutil.which("nginx") or "/usr/sbin/nginx"
pytestmark = pytest.mark.skipif(not os.path.exists(NGINX),
                                reason="nginx not installed (scripts/install-test-deps)")
CONFIG = Path(__file__).parent / "scripts" / "services.json"


@pytest.fixture
def nginx(tmp_path: Path) -> Iterator[dict[str, Any]]:
    """nginx -c deploy/nginx.conf, a complete file: only its ports, certificate and
    paths (pid, logs, temp files) replaced, no wrapper around it."""
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1", "localhost")
    cert.cert_chain_pems[0].write_to_path(tmp_path / "cert.pem")
    cert.private_key_pem.write_to_path(tmp_path / "key.pem")
    ws_port, http_port, public_port = free_port(), free_port(), free_port()
    config = (ROOT / "deploy" / "nginx.conf").read_text()
    for old, new in (("127.0.0.1:8080", f"127.0.0.1:{ws_port}"),
                     ("127.0.0.1:9090", f"127.0.0.1:{http_port}"),
                     ("listen 443 ssl", f"listen 127.0.0.1:{public_port} ssl"),
                     ("/etc/ssl/certs/viz.example.com.pem", str(tmp_path / "cert.pem")),
                     ("/etc/ssl/private/viz.example.com.key", str(tmp_path / "key.pem")),
                     ("/var/log/nginx/", f"{tmp_path}/"), ("/var/lib/nginx/", f"{tmp_path}/"),
                     ("/run/", f"{tmp_path}/")):
        assert old in config
        config = config.replace(old, new)
    (tmp_path / "nginx.conf").write_text(config)
    proc = subprocess.Popen([NGINX, "-e", "stderr", "-g", "daemon off;", "-c",
                             str(tmp_path / "nginx.conf")])
    context = ssl.create_default_context()
    ca.configure_trust(context)
    try:
        wait_port(public_port, proc=proc)
        yield {"ws": ws_port, "http": http_port, "public": public_port, "ssl": context,
               "access_log": tmp_path / "websocketserver.access.log"}
    finally:
        proc.terminate()
        proc.wait(10)


def test_reserve_and_tunnel_through_nginx(start_server: StartServer, nginx: dict[str, Any]) -> None:
    server = start_server("--remote_session_config", str(CONFIG), "--trusted_proxy",
                          "127.0.0.1", "--verbose", "1", ws_port=nginx["ws"],
                          http_port=nginx["http"])
    base = f"https://127.0.0.1:{nginx['public']}"
    with urllib.request.urlopen(f"{base}/v1/reserve/echo?security_token=K",
                                context=nginx["ssl"]) as response:
        token = json.loads(response.read())["token"]
    with urllib.request.urlopen(f"{base}/index.html", context=nginx["ssl"]) as response:
        assert b"websocketserver demo" in response.read()

    async def session() -> bool:
        url = f"wss://127.0.0.1:{nginx['public']}/websockify?token={token}"
        async with websockets.connect(url, ssl=nginx["ssl"], max_size=None,
                                      additional_headers={"X-Forwarded-For": "203.0.113.9"}
                                      ) as ws:
            data = os.urandom(1 << 20)
            await ws.send(data)
            received = bytearray()
            while len(received) < len(data):
                received += await asyncio.wait_for(recv_bytes(ws), 10)
            return bytes(received) == data

    assert asyncio.run(session())
    # the client address came from nginx's X-Forwarded-For (127.0.0.1 is trusted)
    assert "tunnel open: 203.0.113.9 ->" in server.log()
    with urllib.request.urlopen(f"{base}/v1/release/{token}", context=nginx["ssl"]):
        pass
    log = wait_until(lambda: (text := nginx["access_log"].read_text()).count("\n") >= 4
                     and text)
    assert '"GET /websockify HTTP/1.1" 101' in log and '"GET /v1/release/- HTTP' in log
    assert token not in log and "security_token" not in log


def test_forwarded_for_is_ignored_from_untrusted_peers(start_server: StartServer,
                                                       echo: EchoBackend) -> None:
    server = start_server("--client_port", str(echo.port), "--trusted_proxy", "10.0.0.1",
                          "--verbose", "1")

    async def session() -> None:
        async with websockets.connect(server.ws_url(),
                                      additional_headers={"X-Forwarded-For": "203.0.113.9"}
                                      ) as ws:
            await ws.send(b"x")
            await ws.recv()

    asyncio.run(session())
    assert "tunnel open: 127.0.0.1 ->" in server.log()


def test_events_pass_through_nginx_at_once(start_server: StartServer,
                                           nginx: dict[str, Any]) -> None:
    """/v1/events/{token} through deploy/nginx.conf: each event arrives when it happens,
    not when a buffer fills or the stream ends."""
    start_server("--remote_session_config", str(CONFIG), "--trusted_proxy", "127.0.0.1",
                 ws_port=nginx["ws"], http_port=nginx["http"])
    base = f"https://127.0.0.1:{nginx['public']}"
    with urllib.request.urlopen(f"{base}/v1/reserve/echo?security_token=K",
                                context=nginx["ssl"]) as response:
        token = json.loads(response.read())["token"]
    reader = EventReader(f"{base}/v1/events/{token}", context=nginx["ssl"])
    try:
        assert reader.next(5).data["state"] == "reserved"
        with urllib.request.urlopen(f"{base}/v1/release/{token}", context=nginx["ssl"]):
            pass
        assert reader.next(2).data["event"] == "ended"  # at once, and the stream ends
        assert reader.ended.wait(5)
    finally:
        reader.close()


def test_the_howto_runs_as_written(chromium: Browser, tmp_path: Path) -> None:
    """docs/howto-nginx.md's "Try it on one machine", as written (ports swapped, see
    e2e/runbook.py): the server, nginx with deploy/nginx.conf moved into nginx-try/,
    a reservation through nginx; the demo page through nginx echoes a line over wss,
    and nginx's access log lists the page's requests without its token."""
    require("openssl", "curl", paths=(Path(NGINX),))
    howto = runbooks(ROOT / "docs" / "howto-nginx.md", "howto")["nginx"]
    space = Workspace(tmp_path, novnc=False)
    try:
        server, proxy = howto.blocks["run"]
        reserve, show_log = howto.blocks["call"]
        [url] = howto.blocks["open"]
        space.run(server, wait=("8080", "9090"))  # 8443 is nginx's, in its origin
        space.run(proxy)
        token = json.loads(space.call(reserve))["token"]
        context = new_context(chromium, ignore_https_errors=True)  # the self-signed cert
        try:
            demo_page_echoes(context, space.url(url, token), "hello, nginx")
        finally:
            context.close()
        # nginx logs a websocket or an event stream when it ends, which the page's close
        # has only begun
        wait_until(lambda: all(e in space.call(show_log) for e in ("/websockify", "/v1/events/")))
        log = space.call(show_log)
        assert '"GET /websockify HTTP/1.1" 101' in log, log
        assert '"GET /v1/reserve/echo HTTP/1.1" 200' in log, log
        assert '"GET /v1/events/- HTTP/1.1"' in log, log  # the page follows its session
        assert token not in log and "token=" not in log, log
    finally:
        space.stop()
