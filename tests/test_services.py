"""The service manager in-process: lifecycle, failures, reclaiming."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from websocketserver.core.errors import Refused
from websocketserver.identity import Identity
from websocketserver.sessions.reservations import MemoryStore, Reservation, State
from websocketserver.sessions.services import ServiceManager
from websocketserver.settings import ServiceConfig, Settings

SCRIPT = """
import asyncio
from websocketserver import RemoteServiceScript

class Recorder(RemoteServiceScript):
    calls = []
    dead = False  # what alive() answers: True is dead, "raise" raises

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

    def alive(self, index):
        if Recorder.dead == "raise":
            raise OSError("cannot tell")
        return not Recorder.dead
"""


@pytest.fixture
def manager(tmp_path: Path) -> ServiceManager:
    script = tmp_path / "recorder.py"
    script.write_text(SCRIPT)
    settings = Settings(ws_port=1, timeout=0.3, start_timeout=0.5, services=(
        ServiceConfig("rec", script, 2, {}),
        ServiceConfig("locked", script, 1, {"group": "wizards"})))
    return ServiceManager(settings, MemoryStore(), Identity(settings))


def recorder(manager: ServiceManager) -> Any:
    """The ``Recorder`` class of ``SCRIPT``, loaded at run time (so its attributes are Any)."""
    return type(manager.services["rec"].script)


def calls(manager: ServiceManager) -> list[tuple[Any, ...]]:
    found: list[tuple[Any, ...]] = recorder(manager).calls
    return found


async def test_activate_starts_and_stops(manager: ServiceManager) -> None:
    reservation = await manager.reserve("rec", {"target_pathname": "/f.evsn"}, None)
    async with manager.activate(reservation.token, lambda reason: None) as use:
        assert use.address == ("127.0.0.1", 4242)
        stored = await manager.store.get(reservation.token)
        assert stored is not None and stored.state is State.ACTIVE
    assert calls(manager) == [("start", 0, {"target_pathname": "/f.evsn"}), ("stop", 0)]
    assert await manager.store.list() == []


async def wait_empty(manager: ServiceManager, timeout: float = 5) -> None:
    for _ in range(int(timeout / 0.05)):
        if not await manager.store.list():
            return
        await asyncio.sleep(0.05)
    raise AssertionError("the slot was not freed")


@pytest.mark.parametrize("options, status", [({"fail": "1"}, 502), ({"hang": "1"}, 504)])
async def test_start_failures_free_the_slot(manager: ServiceManager, options: dict[str, str],
                                            status: int) -> None:
    reservation = await manager.reserve("rec", options, None)
    with pytest.raises(Refused) as error:
        async with manager.activate(reservation.token, lambda reason: None):
            pass
    assert error.value.status == status
    await wait_empty(manager)  # a hung start holds it one more start_timeout at most
    assert calls(manager)[-1] == ("stop", 0)


async def test_late_start_holds_its_slot_until_stopped(manager: ServiceManager) -> None:
    """A start that returns after its timeout is stopped before its index is reused."""
    slow = await manager.reserve("rec", {"slow": "0.8"}, None)
    with pytest.raises(Refused):
        async with manager.activate(slow.token, lambda reason: None):
            pass
    assert [r.index for r in await manager.store.list()] == [0]  # still held
    assert (await manager.reserve("rec", {}, None)).index == 1
    for _ in range(100):  # the slow start returns at 0.8 s; then index 0 is stopped, freed
        if [r.index for r in await manager.store.list()] == [1]:
            break
        await asyncio.sleep(0.05)
    assert [r.index for r in await manager.store.list()] == [1]
    assert calls(manager)[-2:] == [("stop", 0), ("stop", 0)]


async def test_second_activation_and_unknown_token(manager: ServiceManager) -> None:
    reservation = await manager.reserve("rec", {}, None)
    async with manager.activate(reservation.token, lambda reason: None):
        with pytest.raises(Refused) as again:
            async with manager.activate(reservation.token, lambda reason: None):
                pass
        assert again.value.status == 409
    with pytest.raises(Refused) as unknown:
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
    with pytest.raises(Refused) as refused:
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


def graceful(tmp_path: Path, flag: float, own: float | None = None) -> ServiceManager:
    """A manager whose "rec" service is kept detached ``own`` (None: ``flag``) seconds."""
    script = tmp_path / "recorder.py"
    script.write_text(SCRIPT)
    settings = Settings(ws_port=1, start_timeout=0.5, reconnect_grace=flag, services=(
        ServiceConfig("rec", script, 1, {}, reconnect_grace=own),))
    return ServiceManager(settings, MemoryStore(), Identity(settings))


async def leave(manager: ServiceManager, token: str, keep: bool = True) -> None:
    """A websocket's session on ``token`` whose browser then left."""
    async with manager.activate(token, lambda reason: None) as use:
        use.keep = keep


async def state(manager: ServiceManager, token: str) -> State | None:
    reservation = await manager.store.get(token)
    return reservation.state if reservation else None


async def test_left_instance_is_detached_and_reattached_without_a_start(tmp_path: Path) -> None:
    manager = graceful(tmp_path, 30)
    token = (await manager.reserve("rec", {}, None)).token
    await leave(manager, token)
    assert await state(manager, token) is State.DETACHED
    assert calls(manager)[-1][0] == "start"  # not stopped
    [status] = await manager.status(None)
    [instance] = status["instances"]
    assert instance["state"] == "detached" and 29 < instance["detached_seconds_left"] <= 30
    claimed = await manager.claim(token, None)
    assert isinstance(claimed, Reservation) and claimed.state is State.ACTIVE
    async with manager.activate(token, lambda reason: None, claimed=claimed) as use:
        assert use.address == ("127.0.0.1", 4242)
        with pytest.raises(Refused) as again:  # one websocket at a time
            await manager.claim(token, None)
        assert again.value.status == 409
    assert [c[0] for c in calls(manager)] == ["start", "stop"]  # no second start
    assert await manager.store.list() == []
    assert b'websocketserver_service_reattaches_total{service="rec"} 1.0' in \
        manager.metrics.render(["rec"], [])
    await manager.close()


async def test_detached_instance_is_stopped_when_its_grace_ends(tmp_path: Path) -> None:
    manager = graceful(tmp_path, 0.2)
    token = (await manager.reserve("rec", {}, None)).token
    await leave(manager, token)
    assert await state(manager, token) is State.DETACHED
    await wait_empty(manager)
    assert [c[0] for c in calls(manager)] == ["start", "stop"]
    await manager.reserve("rec", {}, None)  # the one slot is free again
    await manager.close()


async def test_release_or_shutdown_stops_a_detached_instance(tmp_path: Path) -> None:
    manager = graceful(tmp_path, 30)
    token = (await manager.reserve("rec", {}, None)).token
    await leave(manager, token)
    await manager.release(token)
    await wait_empty(manager, timeout=2)
    token = (await manager.reserve("rec", {}, None)).token
    await leave(manager, token)
    await manager.close()  # waits for the stop
    assert await manager.store.list() == []
    assert [c[0] for c in calls(manager)] == ["start", "stop", "start", "stop"]


async def test_a_release_between_claim_and_activate_ends_the_session(tmp_path: Path) -> None:
    """The claimed reservation is passed to activate: a release in between is still
    seen, for a fresh start (after it: stopped) and for a re-attach (no session)."""
    manager = graceful(tmp_path, 30)
    token = (await manager.reserve("rec", {}, None)).token
    claimed = await manager.claim(token, None)
    assert isinstance(claimed, Reservation)  # one instance: held here, never elsewhere
    await manager.release(token)
    with pytest.raises(Refused) as gone:
        async with manager.activate(token, lambda reason: None, claimed=claimed):
            pass
    assert gone.value.status == 410 and await manager.store.list() == []
    assert [c[0] for c in calls(manager)] == ["start", "stop"]
    token = (await manager.reserve("rec", {}, None)).token
    await leave(manager, token)
    claimed = await manager.claim(token, None)
    assert isinstance(claimed, Reservation) and claimed.state is State.ACTIVE
    await manager.release(token)
    with pytest.raises(Refused) as gone:
        async with manager.activate(token, lambda reason: None, claimed=claimed):
            pass
    assert gone.value.status == 410 and await manager.store.list() == []
    assert [c[0] for c in calls(manager)] == ["start", "stop", "start", "stop"]
    await manager.close()


@pytest.mark.parametrize("flag, own, kept", [(0, None, False), (30, None, True),
                                             (30, 0, False), (0, 30, True)])
async def test_the_services_own_grace_overrides_the_flag(tmp_path: Path, flag: float,
                                                         own: float | None, kept: bool) -> None:
    manager = graceful(tmp_path, flag, own)
    token = (await manager.reserve("rec", {}, None)).token
    await leave(manager, token)
    assert await state(manager, token) is (State.DETACHED if kept else None)
    await manager.close()


async def test_a_session_not_kept_is_stopped_despite_a_grace(tmp_path: Path) -> None:
    """Release, shutdown or the service ending: the owner leaves ``keep`` unset."""
    manager = graceful(tmp_path, 30)
    token = (await manager.reserve("rec", {}, None)).token
    await leave(manager, token, keep=False)
    assert await manager.store.list() == []
    await manager.close()


async def test_a_reattach_that_gets_no_websocket_is_detached_again(tmp_path: Path) -> None:
    manager = graceful(tmp_path, 30)
    token = (await manager.reserve("rec", {}, None)).token
    await leave(manager, token)
    await manager.claim(token, None)
    await manager.unclaim(token)  # e.g. refused by a tunnel limit
    assert await state(manager, token) is State.DETACHED
    await manager.claim(token, None)
    await manager.release(token)  # released while re-attaching
    await manager.unclaim(token)
    assert await manager.store.list() == []
    assert [c[0] for c in calls(manager)] == ["start", "stop"]
    await manager.close()


async def test_a_reconnect_racing_the_detach_waits_for_it(tmp_path: Path) -> None:
    """A reload reconnects as the old websocket ends: re-attached, not refused (409)."""
    manager = graceful(tmp_path, 30)
    token = (await manager.reserve("rec", {}, None)).token
    async with manager.activate(token, lambda reason: None) as use:
        use.leave()  # the tunnel stopped relaying; its session has not ended yet
        use.keep = True
        reconnect = asyncio.create_task(manager.claim(token, None))
        await asyncio.sleep(0.05)
        assert not reconnect.done()
    reattached = await reconnect
    assert isinstance(reattached, Reservation) and reattached.state is State.ACTIVE
    await manager.unclaim(token)
    await manager.close()
    assert [c[0] for c in calls(manager)] == ["start", "stop"]


@pytest.mark.parametrize("dead", [True, "raise"])
async def test_a_detached_instance_found_dead_ends_its_session(tmp_path: Path,
                                                               dead: bool | str) -> None:
    """A re-attach first asks the script whether its instance still runs: another
    process may have taken a dead one's port. No (or no answer): refused with 410, the
    instance stopped and its slot freed."""
    manager = graceful(tmp_path, 30)
    token = (await manager.reserve("rec", {}, None)).token
    await leave(manager, token)
    recorder(manager).dead = dead
    with pytest.raises(Refused) as gone:
        await manager.claim(token, None)
    assert gone.value.status == 410 and "ended while detached" in str(gone.value)
    assert await manager.store.list() == []
    assert [c[0] for c in calls(manager)] == ["start", "stop"]
    await manager.reserve("rec", {}, None)  # the one slot is free again
    await manager.close()
