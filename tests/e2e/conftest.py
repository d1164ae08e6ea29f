"""Fixtures of the end-to-end tests that drive a real browser."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from playwright.sync_api import Browser, sync_playwright

from e2e.runbook import Workspace
from e2e.vnc_support import CHROMIUM, require

CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update",
                 "--disable-sync"]


@pytest.fixture(scope="module")
def chromium() -> Iterator[Browser]:
    """Headless Debian Chromium (Playwright never downloads a browser here).

    Module-scoped: Playwright's sync API keeps an event loop running in this thread
    while it lives, and the other tests run event loops of their own.
    """
    require(paths=(Path(CHROMIUM),))
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS,
                                             timeout=30_000)
        yield browser
        browser.close()


@pytest.fixture
def workspace(tmp_path: Path) -> Iterator[Workspace]:
    """A scratch checkout to run the README's and the how-tos' blocks in, its
    processes stopped (and checked gone) at the end."""
    space = Workspace(tmp_path)
    try:
        yield space
    finally:
        space.stop()
