"""Helpers of the VNC end-to-end tests: binaries, a desktop of our own, RFB, noVNC, pixels."""

from __future__ import annotations

import io
import json
import os
import select
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import psutil
import pytest
from PIL import Image
from playwright.sync_api import Browser, BrowserContext, Page, expect

from support import EXAMPLES, ROOT, ServerProcess, free_port, marked_processes
from websocketserver.scripts import wait_listening

DESKTOP_CONFIG = EXAMPLES / "desktop_services.json"
NOVNC = ROOT / ".test-deps" / "node_modules" / "@novnc" / "novnc"
ARTIFACTS = ROOT / "test-artifacts"
CHROMIUM = "/usr/bin/chromium"
X_BINARIES = ("Xvfb", "x11vnc", "xsetroot")
INSTALL_HINT = "run scripts/install-test-deps"
TIMEOUT_MS = 30_000  # Playwright's waits in the browser tests
MIN_FRACTION = 0.95  # of a noVNC canvas in the desktop's colour


def require(*binaries: str, paths: tuple[Path, ...] = ()) -> None:
    """Skip when something is missing and we may not install it; fail when we may."""
    missing = [b for b in binaries if shutil.which(b) is None]
    missing += [str(p) for p in paths if not p.exists()]
    if not missing:
        return
    message = f"missing {', '.join(missing)} ({INSTALL_HINT})"
    if os.geteuid() != 0:
        pytest.skip(message)
    pytest.fail(message)


def require_novnc(*binaries: str) -> None:
    """:func:`require` what a browser test of a desktop needs: X, noVNC, ``binaries``."""
    require(*X_BINARIES, *binaries, paths=(NOVNC / "core" / "rfb.js",))


def desktop_options() -> dict[str, Any]:
    """The common options of the ``desktop`` service of the example config."""
    options: dict[str, Any] = json.loads(DESKTOP_CONFIG.read_text())["desktop"]["options"]
    return options


def configured_size(index: int) -> tuple[int, int]:
    """The screen size the example config gives instance ``index``."""
    sizes = desktop_options()["sizes"]
    width, height = sizes[index % len(sizes)].split("x")
    return int(width), int(height)


def instance_processes(server: ServerProcess) -> list[str]:
    """Sorted names of the live service-instance processes of ``server``."""
    below = {p.pid for p in server.descendants()}
    names = []
    for proc in marked_processes():
        if proc.pid in below:
            try:
                names.append(proc.name())
            except psutil.Error:
                continue
    return sorted(names)


def instances(server: ServerProcess, service: str = "desktop", **kwargs: Any
              ) -> list[dict[str, Any]]:
    """The ``/v1/status`` instances of ``service``."""
    status, body = server.get_json("/v1/status", **kwargs)
    assert status == 200, body
    found: list[dict[str, Any]] = next(s for s in body if s["name"] == service)["instances"]
    return found


def reserve(server: ServerProcess, query: str = "", **kwargs: Any) -> str:
    """Reserve a desktop; return its token."""
    status, body = server.get_json(f"/v1/reserve/desktop{query}", **kwargs)
    assert status == 200, body
    token: str = body["token"]
    return token


def read_display(ready: BinaryIO, timeout: float) -> int:
    """The display number Xvfb writes to its ``-displayfd`` once it accepts clients."""
    data = b""
    while not data.endswith(b"\n"):
        if not select.select([ready], [], [], timeout)[0]:
            raise TimeoutError(f"Xvfb was not ready within {timeout:g} s")
        chunk = ready.read(16)
        if not chunk:
            raise RuntimeError("Xvfb exited before its display was ready")
        data += chunk
    return int(data)


class XDesktop:
    """Xvfb painted ``color`` and x11vnc on a free port: a desktop the test owns.

    With ``vnc=False`` only Xvfb runs (to occupy ``display``).
    """

    def __init__(self, size: str = "800x600", color: str = "#ff8800",
                 display: int | None = None, vnc: bool = True, timeout: float = 20.0) -> None:
        self.port = free_port()
        self._procs: list[subprocess.Popen[bytes]] = []
        read_fd, write_fd = os.pipe()
        where = [] if display is None else [f":{display}"]
        try:
            with os.fdopen(read_fd, "rb", buffering=0) as ready:
                try:
                    self._spawn(["Xvfb", *where, "-screen", "0", f"{size}x24", "-nolisten",
                                 "tcp", "-noreset", "-displayfd", str(write_fd)],
                                pass_fds=[write_fd])
                finally:
                    os.close(write_fd)
                self.display = f":{read_display(ready, timeout)}"
            subprocess.run(["xsetroot", "-display", self.display, "-solid", color],
                           check=True, timeout=timeout)
            if vnc:
                x11vnc = self._spawn(["x11vnc", "-display", self.display, "-rfbport",
                                      str(self.port), "-localhost", "-forever", "-shared",
                                      "-nopw", "-quiet"])
                wait_listening(self.port, timeout, x11vnc)
        except BaseException:
            self.close()
            raise

    def _spawn(self, argv: list[str], **kwargs: Any) -> subprocess.Popen[bytes]:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, start_new_session=True,
                                **kwargs)
        self._procs.append(proc)
        return proc

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self._procs if p.poll() is None]

    def close(self) -> None:
        """SIGTERM everything (Xvfb last, so x11vnc ends cleanly), then SIGKILL."""
        for proc in reversed(self._procs):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    def __enter__(self) -> XDesktop:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@dataclass(frozen=True)
class ServerInit:
    """What an RFB server says about its framebuffer after the handshake."""

    width: int
    height: int
    name: str


class RfbStream:
    """Exact-size reads over the binary messages of a ``websockets`` connection."""

    def __init__(self, ws: Any) -> None:
        self._ws = ws
        self._buffer = bytearray()

    async def read(self, size: int) -> bytes:
        while len(self._buffer) < size:
            message = await self._ws.recv()
            assert isinstance(message, bytes), f"text frame from the tunnel: {message!r}"
            self._buffer += message
        data = bytes(self._buffer[:size])
        del self._buffer[:size]
        return data


async def rfb_handshake(ws: Any) -> ServerInit:
    """Speak RFB 3.8 with security type None up to the ServerInit message."""
    stream = RfbStream(ws)
    version = await stream.read(12)
    assert version[:8] == b"RFB 003." and version[11:] == b"\n", version
    await ws.send(b"RFB 003.008\n")
    (count,) = await stream.read(1)
    assert count > 0, "server refused the connection"
    types = await stream.read(count)
    assert 1 in types, f"no security type None offered: {list(types)}"
    await ws.send(b"\x01")
    result = int.from_bytes(await stream.read(4), "big")
    assert result == 0, f"security handshake failed: {result}"
    await ws.send(b"\x01")  # ClientInit: shared
    header = await stream.read(24)
    width, height = int.from_bytes(header[0:2], "big"), int.from_bytes(header[2:4], "big")
    name = await stream.read(int.from_bytes(header[20:24], "big"))
    return ServerInit(width, height, name.decode("utf-8", "replace"))


NOVNC_PAGE = """<!DOCTYPE html>
<html>
<head>
<meta charset="utf-8">
<title>noVNC test page</title>
<!-- vnc_lite.html's query interface: host, port, path (default websockify,
     e.g. websockify?token=T), scale; wss when this page came over https -->
<style>
  html, body { margin: 0; height: 100%; background: #000; }
  body { display: flex; flex-direction: column; }
  #status { font: 12px sans-serif; color: #fff; padding: 2px; }
  #screen { flex: 1; overflow: hidden; }
</style>
<script type="module">
  import RFB from "./core/rfb.js";

  function query(name, fallback) {
    const match = location.href.match(new RegExp("[?&]" + name + "=([^&#]*)"));
    return match ? decodeURIComponent(match[1]) : fallback;
  }
  const status = (text) => { document.getElementById("status").textContent = text; };
  const scheme = location.protocol === "https:" ? "wss" : "ws";
  const url = scheme + "://" + query("host", location.hostname) + ":"
      + query("port", location.port) + "/" + query("path", "websockify");
  const rfb = new RFB(document.getElementById("screen"), url);
  rfb.scaleViewport = query("scale", "false") === "true";
  rfb.addEventListener("connect", () => status("connected"));
  rfb.addEventListener("disconnect",
                       (e) => status(e.detail.clean ? "disconnected" : "failed"));
  status("connecting");
</script>
</head>
<body><div id="status">loading</div><div id="screen"></div></body>
</html>
"""


def novnc_site(where: Path) -> Path:
    """A web root at ``where``: the installed noVNC library and :data:`NOVNC_PAGE`.

    The npm package ships the library only (``core/``, ``vendor/``), not noVNC's
    ``vnc.html``/``vnc_lite.html`` pages, so the page is ours.
    """
    for part in ("core", "vendor"):
        shutil.copytree(NOVNC / part, where / part)
    (where / "vnc_lite.html").write_text(NOVNC_PAGE)
    return where


def color_fraction(png: bytes, color: str, tolerance: int = 6) -> float:
    """Fraction of the pixels of ``png`` within ``tolerance`` of ``#rrggbb``, per channel."""
    want = [int(color[i:i + 2], 16) for i in (1, 3, 5)]
    image = Image.open(io.BytesIO(png)).convert("RGB")
    colors = image.getcolors(image.width * image.height) or []
    near = sum(count for count, rgb in colors
               if isinstance(rgb, tuple)  # an RGB image's colours are (r, g, b)
               and all(abs(have - w) <= tolerance for have, w in zip(rgb, want, strict=True)))
    return near / (image.width * image.height)


def new_context(browser: Browser, width: int = 1024, height: int = 800,
                ignore_https_errors: bool = False) -> BrowserContext:
    """A browser context of that window size whose waits give up after :data:`TIMEOUT_MS`."""
    context = browser.new_context(viewport={"width": width, "height": height},
                                  ignore_https_errors=ignore_https_errors)
    context.set_default_timeout(TIMEOUT_MS)
    return context


def expect_canvas_color(page: Page, color: str, artifact: str, timeout: float = 20) -> None:
    """Wait until noVNC's canvas shows ``color`` (#rrggbb) on :data:`MIN_FRACTION` of it.

    The last screenshot is kept as ``artifact`` in :data:`ARTIFACTS`, to look at on failure.
    """
    canvas = page.locator("#screen canvas")
    deadline = time.monotonic() + timeout
    while True:  # the first framebuffer update follows the connect shortly
        png = canvas.screenshot()
        fraction = color_fraction(png, color)
        if fraction >= MIN_FRACTION or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    ARTIFACTS.mkdir(exist_ok=True)
    (ARTIFACTS / artifact).write_bytes(png)
    assert fraction >= MIN_FRACTION, \
        f"only {fraction:.1%} of the canvas is {color}; see {ARTIFACTS / artifact}"


def show_desktop(page: Page, server: ServerProcess, path: str, color: str,
                 artifact: str) -> None:
    """Open :data:`NOVNC_PAGE` on websocket ``path``; assert its canvas shows ``color``."""
    query = f"host=127.0.0.1&port={server.ws_port}&scale=true&path={path}"
    page.goto(server.url(f"/vnc_lite.html?{query}", auth=False))
    expect(page.locator("#status")).to_have_text("connected", timeout=TIMEOUT_MS)
    expect_canvas_color(page, color, artifact)
