"""The how-tos in docs/, run as written: their marked blocks (``<!-- howto: NAME KIND -->``).

:mod:`e2e.runbook` runs them in a scratch checkout, and changes only this: the ports
of :data:`e2e.runbook.PORTS` become free ports (in the blocks and in the scratch
checkout's copy of ``deploy/``), ``$HOME`` is a scratch directory (the TLS how-to's
NSS database), and ``novnc/`` is the test's own noVNC page (as in
test_readme_quickstart.py). Each test checks what the how-to promises: the page
trusted through the NSS database, the websocket through nginx or HAProxy, no token in
a front end's access log.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from playwright.sync_api import Browser, Error, expect

from e2e.conftest import CHROMIUM_ARGS
from e2e.runbook import Runbook, Workspace, runbooks
from e2e.vnc_support import CHROMIUM, TIMEOUT_MS, expect_canvas_color, require_novnc
from support import ROOT

DOCS = ROOT / "docs"


def howto(name: str) -> Runbook:
    return runbooks(DOCS / f"howto-{name}.md", "howto")[name]


@pytest.fixture
def workspace(tmp_path: Path) -> Iterator[Workspace]:
    space = Workspace(tmp_path)
    try:
        yield space
    finally:
        space.stop()


def test_the_howtos_have_their_blocks() -> None:
    """The markers are there: removing one must not make the other tests vacuous."""
    found = {name: {kind: len(blocks) for kind, blocks in howto(name).blocks.items()}
             for name in ("tls",)}
    assert found == {"tls": {"call": 4, "run": 1, "open": 1}}


def test_tls_trusted_through_a_new_nss_database(chromium: Browser,
                                                workspace: Workspace) -> None:
    """docs/howto-tls.md on a machine where Chromium never ran: the certificate, the
    server with it, the NSS database created and the certificate trusted in it; a
    Chromium started afterwards shows the desktop over https and wss (no error
    ignored), one started before the trust refuses the page, and the last block takes
    the trust away again."""
    require_novnc("openssl", "certutil", "curl")
    tls = howto("tls")
    make_cert, trust, check, untrust = tls.blocks["call"]
    [run] = tls.blocks["run"]
    [url] = tls.blocks["open"]
    workspace.call(make_cert)
    workspace.run(run)
    url = workspace.url(url)
    assert not (workspace.home / ".pki").exists()  # as if Chromium never ran here

    def chromium_of_home() -> Browser:
        return chromium.browser_type.launch(
            executable_path=CHROMIUM, args=CHROMIUM_ARGS, timeout=TIMEOUT_MS,
            env={**workspace.env, "HOME": str(workspace.home)})

    untrusted = chromium_of_home()
    try:
        with pytest.raises(Error, match="ERR_CERT_AUTHORITY_INVALID"):
            untrusted.new_page().goto(url)
    finally:
        untrusted.close()
    workspace.call(trust)
    assert workspace.call(check) == "200\n"
    trusted = chromium_of_home()
    try:
        page = trusted.new_page(viewport={"width": 1400, "height": 1200})
        page.set_default_timeout(TIMEOUT_MS)
        page.goto(url)
        expect(page.locator("#status")).to_have_text("connected")
        expect_canvas_color(page, "#ffa500", "howto-tls.png")
    finally:
        trusted.close()
    workspace.call(untrust)
    listed = workspace.call('certutil -L -d "sql:$HOME/.pki/nssdb"')
    assert "websocketserver" not in listed


