"""Structured tasks: each has an owner that awaits it, a failure is logged once with
its label and ends only its own task."""

from __future__ import annotations

import asyncio
import logging

import pytest

from websocketserver.settings import Settings
from websocketserver.tasks import Tasks
from websocketserver.websocket_port.live import LiveTunnels


async def test_a_failing_task_is_logged_once_and_ends_only_itself(
        caplog: pytest.LogCaptureFixture) -> None:
    tasks = Tasks(logging.getLogger("websocketserver.test"))
    sibling_ended = asyncio.Event()

    async def sibling() -> None:
        await asyncio.sleep(0.05)
        sibling_ended.set()

    async def broken() -> None:
        raise RuntimeError("a bug")

    tasks.spawn(sibling(), "sibling")
    tasks.spawn(broken(), "tunnel from 10.0.0.1")
    await tasks.wait()
    assert sibling_ended.is_set() and len(tasks) == 0
    failures = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert [r.getMessage() for r in failures] == [
        "tunnel from 10.0.0.1 failed: RuntimeError: a bug"]


async def test_cancel_ends_every_task_and_waits_for_it() -> None:
    tasks = Tasks(logging.getLogger("websocketserver.test"))
    cleaned = []

    async def forever(name: str) -> None:
        try:
            await asyncio.sleep(3600)
        finally:
            cleaned.append(name)

    for name in ("a", "b"):
        tasks.spawn(forever(name), name)
    await asyncio.sleep(0)
    await tasks.cancel()
    assert sorted(cleaned) == ["a", "b"] and len(tasks) == 0


async def test_an_error_inside_a_tunnels_task_reaches_the_servers_log(
        caplog: pytest.LogCaptureFixture) -> None:
    """What a bug in a connection's task looks like: one ERROR line of the server's
    log naming the connection (it surfaced only as asyncio's "exception was never
    retrieved"), and the other tunnels' tasks go on; close() still returns."""
    live = LiveTunnels(Settings(ws_port=1), lambda _: None, lambda _: None)
    other = asyncio.Event()

    async def upgrade() -> None:
        raise KeyError("token")

    async def serving() -> None:
        await asyncio.sleep(0.05)
        other.set()

    live.spawn(upgrade(), "upgrade from 192.0.2.7:51000")
    live.spawn(serving(), "tunnel from 192.0.2.8")
    await live.close(5)
    assert other.is_set()
    assert [(r.name, r.getMessage()) for r in caplog.records if r.levelno == logging.ERROR
            ] == [("websocketserver.tunnels",
                   "upgrade from 192.0.2.7:51000 failed: KeyError: 'token'")]
