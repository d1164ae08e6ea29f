"""The example X desktop (Xvfb + x11vnc) as a Slurm job, seen in noVNC in Chromium.

A module of its own: Playwright's sync API keeps an event loop running in its thread
while the browser is open, which the other Slurm tests' ``asyncio.run`` cannot share.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
from playwright.sync_api import Browser, expect

pytest.register_assert_rewrite("slurm_support", "e2e.slurm_sessions")
from slurm_support import LICENSE, SlurmCluster  # noqa: E402

from e2e.slurm_sessions import job_processes, start, wait_no_job_process  # noqa: E402
from e2e.vnc_support import (  # noqa: E402
    NOVNC,
    TIMEOUT_MS,
    expect_canvas_color,
    new_context,
    novnc_site,
    require,
    require_novnc,
    show_desktop,
)
from support import ROOT, StartServer, wait_until  # noqa: E402

pytest_plugins = ["slurm_support"]

EXAMPLES = ROOT / "examples"


@pytest.fixture(autouse=True)
def clean_queue(slurm: SlurmCluster) -> Iterator[None]:
    yield
    slurm.cancel_all(timeout=15)


def test_the_example_desktop_as_a_slurm_job_in_novnc(
        chromium: Browser, start_server: StartServer, slurm: SlurmCluster,
        tmp_path: Path) -> None:
    """examples/desktop_session.py (Xvfb + x11vnc) run by the node's own python3, where
    websocketserver is not installed: noVNC in Chromium shows its colour; closing the
    page cancels the job and nothing of it is left."""
    require("Xvfb", "x11vnc", "xsetroot")
    require_novnc()
    config = tmp_path / "services.json"
    jobs = slurm.directory / "jobs"
    config.write_text(json.dumps({"desktop": {
        "command": ["python3", str(EXAMPLES / "desktop_session.py"), "--size=1024x768",
                    "--color={color}", "--allow=127.0.0.1", "{port}"],
        "count": 1, "options": {"color": "#3366cc"},
        "slurm": {"sbatch": [f"--output={jobs}/%j.out"]}, "start": "reserve"}}))
    server, mark = start(start_server, slurm, config, http_dir=novnc_site(tmp_path / "www"))
    status, body = server.get_json("/v1/reserve/desktop?color=%23aa3377")
    assert status == 200, body
    token = body["token"]
    context = new_context(chromium)
    try:
        page = context.new_page()
        show_desktop(page, server, f"websockify?token={token}", "#aa3377",
                     "slurm-desktop.png")
        assert {psutil.Process(pid).name() for pid in job_processes(server, mark)} >= {
            "Xvfb", "x11vnc"}
        page.close()
        wait_no_job_process(server, mark, 20)
        wait_until(lambda: not slurm.run("squeue", "-h", "-o", "%i").strip(), 15)
    finally:
        context.close()


def test_the_embed_page_says_queued_for_a_licence_then_shows_the_desktop(
        chromium: Browser, start_server: StartServer, slurm: SlurmCluster,
        tmp_path: Path) -> None:
    """demo/www/embed.html with a Slurm desktop whose licence another session holds:
    the page says so in words (from /v1/events), and connects once the job runs."""
    require("Xvfb", "x11vnc", "xsetroot")
    require_novnc()
    site = tmp_path / "www"
    shutil.copytree(ROOT / "demo" / "www", site)
    for part in ("core", "vendor"):
        shutil.copytree(NOVNC / part, site / part)
    config = tmp_path / "services.json"
    jobs = slurm.directory / "jobs"
    config.write_text(json.dumps({"desktop": {
        "command": ["python3", str(EXAMPLES / "desktop_session.py"), "--size=1024x768",
                    "--color={color}", "--allow=127.0.0.1", "{port}"],
        "count": 2, "options": {"color": "#3366cc"}, "start": "reserve",
        "slurm": {"sbatch": [f"--licenses={LICENSE}:1", f"--output={jobs}/%j.out"]}}}))
    server, mark = start(start_server, slurm, config, http_dir=site, token=None)
    status, holder = server.get_json("/v1/reserve/desktop")
    assert status == 200, holder
    context = new_context(chromium)
    try:
        page = context.new_page()
        page.goto(server.url(f"/embed.html?service=desktop&port={server.ws_port}", auth=False))
        expect(page.locator("#status")).to_have_text("Queued: waiting for a licence",
                                                     timeout=TIMEOUT_MS)
        assert server.get_json(f"/v1/release/{holder['token']}")[0] == 200
        expect(page.locator("#status")).to_have_text("Connected", timeout=TIMEOUT_MS)
        expect_canvas_color(page, "#3366cc", "slurm-embed-queued.png")
        page.close()
        wait_no_job_process(server, mark, 20)
    finally:
        context.close()
