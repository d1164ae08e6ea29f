"""A token typo in stock noVNC in Chromium: the page says why (issue 28, item 2).

Debian's noVNC 1.3 ``vnc.html`` as the distribution ships it, and the noVNC 1.7
library the other browser tests use (whose RFB object reports the refusal as its
``securityfailure`` event; the npm package has no ``vnc.html``).
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from playwright.sync_api import Browser, expect

from e2e.vnc_support import DESKTOP_CONFIG, TIMEOUT_MS, new_context, novnc_site, require_novnc
from support import ServerProcess

DEBIAN_NOVNC = Path("/usr/share/novnc")
REASON = "unknown or expired token"
PAGE = """<!DOCTYPE html>
<html><head><meta charset="utf-8"><title>connecting</title>
<script type="module">
  import RFB from "./core/rfb.js";
  const port = new URLSearchParams(location.search).get("port");
  const rfb = new RFB(document.body, `ws://127.0.0.1:${port}/websockify?token=typo`);
  rfb.addEventListener("securityfailure",
                       (e) => { document.title = "securityfailure: " + e.detail.reason; });
</script></head><body></body></html>
"""


@pytest.fixture(scope="module")
def server(chromium: Browser, tmp_path_factory: pytest.TempPathFactory
           ) -> Iterator[ServerProcess]:
    """The example desktop service (an RFB one), Debian's noVNC under debian/, noVNC
    1.7's library and a page reporting its event at the root."""
    require_novnc()
    if not (DEBIAN_NOVNC / "vnc.html").is_file():
        pytest.skip("Debian's novnc package is not installed (scripts/install-test-deps)")
    where = tmp_path_factory.mktemp("refusals")
    site = novnc_site(where / "www")
    shutil.copytree(DEBIAN_NOVNC, site / "debian", symlinks=True)
    (site / "refused.html").write_text(PAGE)
    started = ServerProcess.start("--remote_session_config", str(DESKTOP_CONFIG),
                                  http_dir=site, log_dir=where)
    yield started
    started.close()


def test_debian_novnc_shows_why_a_token_was_refused(chromium: Browser,
                                                     server: ServerProcess) -> None:
    context = new_context(chromium)
    try:
        page = context.new_page()
        page.goto(server.url(f"/debian/vnc.html?host=127.0.0.1&port={server.ws_port}"
                             "&path=websockify?token=typo&autoconnect=true", auth=False))
        expect(page.locator("#noVNC_status")).to_contain_text(
            f"New connection has been rejected with reason: {REASON}", timeout=TIMEOUT_MS)
    finally:
        context.close()


def test_novnc_17_reports_the_reason(chromium: Browser, server: ServerProcess) -> None:
    context = new_context(chromium)
    try:
        page = context.new_page()
        page.goto(server.url(f"/refused.html?port={server.ws_port}", auth=False))
        expect(page).to_have_title(f"securityfailure: {REASON}", timeout=TIMEOUT_MS)
    finally:
        context.close()
