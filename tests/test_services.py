"""The service manager in-process: lifecycle, failures, reclaiming."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from websocketserver.identity import Identity
from websocketserver.reservations import MemoryStore, State
from websocketserver.services import ServiceError, ServiceManager
from websocketserver.settings import ServiceConfig, Settings

SCRIPT = """
import asyncio
from websocketserver import RemoteServiceScript

class Recorder(RemoteServiceScript):
    calls = []

    async def start(self, index, options):
        Recorder.calls.append(("start", index, dict(options)))
        if options.get("fail"):
            raise RuntimeError("asked to fail")
        if options.get("hang"):
            await asyncio.sleep(3600)
        if options.get("slow"):
            await asyncio.sleep(float(options["slow"]))
        return "127.0.0.1", 4242

    def stop(self, index):
        Recorder.calls.append(("stop", index))
"""


@pytest.fixture
def manager(tmp_path: Path) -> ServiceManager:
    script = tmp_path / "recorder.py"
    script.write_text(SCRIPT)
    settings = Settings(ws_port=1, timeout=0.3, start_timeout=0.5, services=(
        ServiceConfig("rec", script, 2, {}),
        ServiceConfig("locked", script, 1, {"group": "wizards"})))
    return ServiceManager(settings, MemoryStore(), Identity(settings))


def calls(manager: ServiceManager) -> list:
    return type(manager.services["rec"].script).calls


async def test_activate_starts_and_stops(manager: ServiceManager) -> None:
    reservation = await manager.reserve("rec", {"target_pathname": "/f.evsn"}, None)
    async with manager.activate(reservation.token, lambda reason: None) as address:
        assert address == ("127.0.0.1", 4242)
        assert (await manager.store.get(reservation.token)).state is State.ACTIVE
    assert calls(manager) == [("start", 0, {"target_pathname": "/f.evsn"}), ("stop", 0)]
    assert await manager.store.list() == []


async def wait_empty(manager: ServiceManager, timeout: float = 5) -> None:
    for _ in range(int(timeout / 0.05)):
        if not await manager.store.list():
            return
        await asyncio.sleep(0.05)
    raise AssertionError("the slot was not freed")


@pytest.mark.parametrize("options, status", [({"fail": "1"}, 502), ({"hang": "1"}, 504)])
async def test_start_failures_free_the_slot(manager: ServiceManager, options, status) -> None:
    reservation = await manager.reserve("rec", options, None)
    with pytest.raises(ServiceError) as error:
        async with manager.activate(reservation.token, lambda reason: None):
            pass
    assert error.value.status == status
    await wait_empty(manager)  # a hung start holds it one more start_timeout at most
    assert calls(manager)[-1] == ("stop", 0)


async def test_late_start_holds_its_slot_until_stopped(manager: ServiceManager) -> None:
    """A start that returns after its timeout is stopped before its index is reused."""
    slow = await manager.reserve("rec", {"slow": "0.8"}, None)
    with pytest.raises(ServiceError):
        async with manager.activate(slow.token, lambda reason: None):
            pass
    assert [r.index for r in await manager.store.list()] == [0]  # still held
    assert (await manager.reserve("rec", {}, None)).index == 1
    await asyncio.sleep(0.6)  # the slow start returns at 0.8 s
    assert [r.index for r in await manager.store.list()] == [1]
    assert calls(manager)[-2:] == [("stop", 0), ("stop", 0)]


async def test_second_activation_and_unknown_token(manager: ServiceManager) -> None:
    reservation = await manager.reserve("rec", {}, None)
    async with manager.activate(reservation.token, lambda reason: None):
        with pytest.raises(ServiceError) as again:
            async with manager.activate(reservation.token, lambda reason: None):
                pass
        assert again.value.status == 409
    with pytest.raises(ServiceError) as unknown:
        async with manager.activate(reservation.token, lambda reason: None):
            pass
    assert unknown.value.status == 404


async def test_release_of_active_session_calls_its_closer(manager: ServiceManager) -> None:
    reservation = await manager.reserve("rec", {}, None)
    reasons: list[str] = []
    async with manager.activate(reservation.token, reasons.append):
        await manager.release(reservation.token)
        assert reasons == ["reservation released"]


async def test_groups_hide_and_refuse(manager: ServiceManager) -> None:
    assert [s.name for s in manager.visible(None)] == ["rec"]
    with pytest.raises(ServiceError) as refused:
        await manager.reserve("locked", {}, None)
    assert refused.value.status == 403
    assert [s["name"] for s in await manager.status(None)] == ["rec"]


async def test_unused_reservations_are_reclaimed(manager: ServiceManager) -> None:
    await manager.reserve("rec", {}, None)
    manager.start_reclaiming()
    try:
        for _ in range(40):
            if not await manager.store.list():
                break
            await asyncio.sleep(0.05)
        assert await manager.store.list() == []
    finally:
        await manager.close()
