"""Pages of other sites, in headless Chromium, against a server with no security token
(issue 22, finding 6): they cannot stop it, reserve or release; a DNS-rebound name is
not answered; every answer says who may frame it. Typed URLs, the same-origin
dashboard and clients that are not browsers work as before.

The other site is a page served from 127.0.0.2 (another host, so ``cross-site``); the
rebinding is Chromium's own resolver mapping ``rebind.test`` to 127.0.0.1.
"""

from __future__ import annotations

import functools
import http.server
import json
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from playwright.sync_api import Browser, Page, expect, sync_playwright

from e2e.conftest import CHROMIUM_ARGS
from e2e.vnc_support import CHROMIUM, require
from support import ServerProcess, StartServer, free_port

CONFIG = Path(__file__).parent / "scripts" / "services.json"
SECURITY_HEADERS = {"content-security-policy", "x-content-type-options", "referrer-policy"}


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    """Chromium as the suite's, resolving ``rebind.test`` to 127.0.0.1 (DNS rebinding)."""
    require(paths=(Path(CHROMIUM),))
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=CHROMIUM, timeout=30_000,
            args=[*CHROMIUM_ARGS, "--host-resolver-rules=MAP rebind.test 127.0.0.1"])
        yield browser
        browser.close()


@pytest.fixture
def page(browser: Browser) -> Iterator[Page]:
    context = browser.new_context()
    context.set_default_timeout(20_000)
    yield context.new_page()
    context.close()


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """No security token, no identities: the REST API open to any local caller."""
    tmp_path = tmp_path_factory.mktemp("cross_site")
    server = ServerProcess.start("--remote_session_config", str(CONFIG), token=None,
                                 log_dir=tmp_path)
    yield server
    server.close()


@pytest.fixture(scope="module")
def other_site(tmp_path_factory: pytest.TempPathFactory,
               server: ServerProcess) -> Iterator[str]:
    """http://127.0.0.2:PORT/, serving attack.html: images and no-cors fetches of the
    server's stop, reserve and release, which report when they are done."""
    root = tmp_path_factory.mktemp("other_site")
    api = f"http://127.0.0.1:{server.http_port}/v1"
    (root / "attack.html").write_text(f"""<!DOCTYPE html><body><script>
      const calls = ['{api}/reserve/echo', '{api}/release/x', '{api}/stop'];
      const images = calls.map((url) => new Promise((done) => {{
        const img = new Image(); img.onload = img.onerror = done;
        img.referrerPolicy = 'no-referrer'; img.src = url; }}));
      const fetches = calls.map((url) => fetch(url, {{mode: 'no-cors'}}).catch(() => null));
      Promise.all([...images, ...fetches]).then(() => {{ document.title = 'done'; }});
    </script></body>""")
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(root))
    port = free_port()
    site = http.server.ThreadingHTTPServer(("127.0.0.2", port), handler)
    thread = threading.Thread(target=site.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.2:{port}"
    site.shutdown()
    site.server_close()


def instances(server: ServerProcess) -> int:
    status, body = server.get_json("/v1/status")
    assert status == 200
    return sum(len(service["instances"]) for service in body)


def test_a_page_of_another_site_cannot_stop_or_reserve(server: ServerProcess,
                                                       other_site: str, page: Page) -> None:
    page.goto(f"{other_site}/attack.html")
    expect(page).to_have_title("done")
    assert server.proc.poll() is None, "the server was stopped"
    assert server.get_json("/v1/health")[0] == 200
    assert instances(server) == 0


def test_typed_urls_and_the_same_origin_dashboard_still_work(server: ServerProcess,
                                                            page: Page) -> None:
    response = page.goto(server.url("/v1/reserve/echo"))  # typed into the address bar
    assert response is not None and response.status == 200
    token = json.loads(response.text())["token"]
    page.goto(server.url("/v1/status_view"))
    echo = page.locator("section", has_text="echo")
    expect(echo.locator("h2")).to_contain_text("1 of 2 in use")
    echo.locator("button[data-reserve]").click()
    expect(echo.locator("h2")).to_contain_text("2 of 2 in use")
    echo.locator("button[data-release]").first.click()
    expect(echo.locator("h2")).to_contain_text("1 of 2 in use")  # (the rows are redrawn:
    echo.locator("button[data-release]").first.click()  # a click before would hit the old)
    expect(echo.locator("h2")).to_contain_text("0 of 2 in use")
    assert server.get_json(f"/v1/release/{token}")[0] == 404  # released from the page


def test_a_dns_rebound_name_is_not_answered(server: ServerProcess, page: Page) -> None:
    """A page of rebind.test, the name now resolving to this server, is same-origin
    with it: its Host header gives it away, on both ports."""
    response = page.goto(f"http://rebind.test:{server.http_port}/v1/status")
    assert response is not None and response.status == 421
    assert "--allowed_host" in json.loads(response.text())["error"]
    with socket.create_connection(("127.0.0.1", server.ws_port), timeout=10) as sock:
        sock.sendall(f"GET /?token=x HTTP/1.1\r\nHost: rebind.test:{server.ws_port}\r\n"
                     "Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: "
                     "13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n".encode())
        assert sock.recv(4096).startswith(b"HTTP/1.1 421 ")


@pytest.mark.parametrize("target", ["/", "/no-such-file", "/v1/status", "/v1/nope"])
def test_every_answer_says_who_may_frame_it(server: ServerProcess, target: str) -> None:
    status, headers, _ = server.get(target)
    headers = {name.lower(): value for name, value in headers.items()}
    assert SECURITY_HEADERS <= headers.keys(), (status, headers)
    assert headers["content-security-policy"].startswith("frame-ancestors 'self' ")
    assert headers["x-content-type-options"] == "nosniff"
    assert headers["referrer-policy"] == "no-referrer"


def raw_head(port: int, request: bytes) -> dict[str, str]:
    """The header fields (names lowered) of the answer to ``request``."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(request)
        answer = b""
        while b"\r\n\r\n" not in answer and (chunk := sock.recv(65536)):
            answer += chunk
    fields = answer.partition(b"\r\n\r\n")[0].decode("latin-1").split("\r\n")[1:]
    return {name.lower(): value for name, _, value in (f.partition(": ") for f in fields)}


def test_errors_answered_by_the_parser_carry_them_too(server: ServerProcess) -> None:
    """A malformed request (400) and an over-long head (431), answered before routing."""
    assert server.http_port is not None
    long_head = b"".join(b"X-%d: %s\r\n" % (number, b"a" * 8000) for number in range(5))
    for request in (b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nBad Header: x\r\n\r\n",
                    b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n" + long_head + b"\r\n"):
        assert SECURITY_HEADERS <= raw_head(server.http_port, request).keys()


def test_add_header_overrides_them(start_server: StartServer) -> None:
    server = start_server("--add_header", "Content-Security-Policy=frame-ancestors *",
                          "--add_header", "X-Frame-Options=DENY",
                          "--allowed_origin", "https://portal.example")
    headers = {name.lower(): value for name, value in server.get("/")[1].items()}
    assert headers["content-security-policy"] == "frame-ancestors *"
    assert headers["x-frame-options"] == "DENY" and headers["referrer-policy"] == "no-referrer"


def test_allowed_origins_may_frame_the_pages(start_server: StartServer) -> None:
    server = start_server("--allowed_origin", "https://portal.example/",
                          "--allowed_origin", "null")
    policy = dict(server.get("/")[1])["Content-Security-Policy"]
    assert policy == ("frame-ancestors 'self' http://localhost:* http://127.0.0.1:* "
                      "http://[::1]:* https://localhost:* https://127.0.0.1:* https://[::1]:* "
                      "https://portal.example")
