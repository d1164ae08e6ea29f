"""The REST API in-process: authorization, routing, errors, the status page."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from websocketserver.core.errors import Refused
from websocketserver.http_port.api import RestApi
from websocketserver.http_port.dashboard import render_status
from websocketserver.identity import Identity
from websocketserver.sessions.reservations import MemoryStore, Reservation, State
from websocketserver.sessions.services import ServiceManager
from websocketserver.settings import ServiceConfig, Settings

Client = TestClient[web.Request, web.Application]
Api = tuple[Client, list[bool]]
"""The ``api`` fixture: a client of the REST API and the calls of its stop callback."""
UsersApi = tuple[Client, ServiceManager]
"""The ``users_api`` fixture: a client of the REST API and its service manager."""

SCRIPT = ("from websocketserver import RemoteServiceScript\n"
          "class S(RemoteServiceScript):\n"
          "    def start(self, index, options): return '127.0.0.1', 1\n"
          "    def stop(self, index): pass\n")


@pytest.fixture
async def api(tmp_path: Path) -> AsyncIterator[Api]:
    script = tmp_path / "s.py"
    script.write_text(SCRIPT)
    settings = Settings(ws_port=1, security_token="s3cret", services=(
        ServiceConfig("viewer", script, 1, {"file_ext": [".evsn"]}),
        ServiceConfig("<b>x</b>", script, 1, {})))
    services = ServiceManager(settings, MemoryStore(), Identity(settings))
    stopped: list[bool] = []
    rest = RestApi(services, settings.security_token, lambda: stopped.append(True))
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", rest.handle)
    async with TestClient(TestServer(app)) as client:
        yield client, stopped


async def test_token_by_query_or_bearer(api: Api) -> None:
    client, _ = api
    assert (await client.get("/v1/status")).status == 401
    assert (await client.get("/v1/status?security_token=wrong")).status == 401
    assert (await client.get("/v1/status", headers={"Authorization": "Bearer wrong"})).status \
        == 401
    assert (await client.get("/v1/status?security_token=s3cret")).status == 200
    ok = await client.get("/v1/status", headers={"Authorization": "Bearer s3cret"})
    body = await ok.json()
    assert [s["name"] for s in body] == ["viewer", "<b>x</b>"]
    assert body[0]["file_ext"] == [".evsn"]


async def test_reserve_release_and_errors(api: Api) -> None:
    client, _ = api
    response = await client.get("/v1/reserve/viewer?security_token=s3cret&target_pathname=/a")
    token = (await response.json())["token"]
    full = await client.get("/v1/reserve/viewer?security_token=s3cret")
    assert full.status == 503 and "error" in await full.json()
    missing = await client.get("/v1/reserve/nope?security_token=s3cret")
    assert missing.status == 404 and await missing.json() == {"error": "unknown service: nope"}
    released = await client.get(f"/v1/release/{token}")  # the token holder, no secret
    assert released.status == 200
    assert (await client.get(f"/v1/release/{token}")).status == 401  # now unknown


@pytest.mark.parametrize("path, status", [
    ("/v1/", 404), ("/v1/unknown", 404), ("/v1/reserve", 404), ("/v1/reserve/", 404),
    ("/v1/status/extra", 404), ("/v9/status", 404),
])
async def test_unknown_calls_are_404_json(api: Api, path: str, status: int) -> None:
    client, _ = api
    response = await client.get(path + "?security_token=s3cret")
    assert response.status == status
    assert "error" in await response.json()


async def test_post_is_405(api: Api) -> None:
    client, _ = api
    assert (await client.post("/v1/status?security_token=s3cret")).status == 405


async def test_a_head_request_changes_nothing(api: Api) -> None:
    """A probe (a link checker, a monitor) sends HEAD: it stopped the server before."""
    client, stopped = api
    for path in ("/v1/stop", "/v1/reserve/viewer", "/v1/release/x"):
        assert (await client.head(f"{path}?security_token=s3cret")).status == 405
    assert stopped == [] and (await client.head("/v1/status?security_token=s3cret")).ok


async def test_stop_answers_then_stops(api: Api) -> None:
    client, stopped = api
    response = await client.get("/v1/stop?security_token=s3cret")
    assert response.status == 200 and stopped == [True]


async def test_status_view_escapes_everything(api: Api) -> None:
    client, _ = api
    await client.get("/v1/reserve/viewer?security_token=s3cret&x=<script>alert(1)</script>")
    page = await (await client.get("/v1/status_view?security_token=s3cret")).text()
    assert "<script>alert" not in page and "&lt;b&gt;x&lt;/b&gt;" in page
    assert "viewer" in page and "reserved" in page


async def test_status_without_services() -> None:
    """No services: the page says so, and its JSON twin /v1/status is an empty list."""
    assert "No services are configured" in render_status([])
    settings = Settings(ws_port=1, security_token="s3cret")
    services = ServiceManager(settings, MemoryStore(), Identity(settings))
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", RestApi(services, "s3cret", lambda: None).handle)
    async with TestClient(TestServer(app)) as client:
        response = await client.get("/v1/status?security_token=s3cret")
        assert response.status == 200 and await response.json() == []
        page = await client.get("/v1/status_view?security_token=s3cret")
        assert "No services are configured" in await page.text()


@pytest.fixture
async def users_api(tmp_path: Path, request: pytest.FixtureRequest) -> AsyncIterator[UsersApi]:
    """The API with stand-alone identities; the security token is the param (or None)."""
    script = tmp_path / "s.py"
    script.write_text(SCRIPT)
    users = tmp_path / "users.json"
    users.write_text(json.dumps({"alice": "alice-key", "bob": "bob-key"}))
    settings = Settings(ws_port=1, security_token=getattr(request, "param", None),
                        users_file=users, services=(ServiceConfig("viewer", script, 3, {}),))
    services = ServiceManager(settings, MemoryStore(), Identity(settings))
    rest = RestApi(services, settings.security_token, lambda: None)
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", rest.handle)
    async with TestClient(TestServer(app)) as client:
        yield client, services


async def _tokens(client: Client, query: str) -> list[str | None]:
    [viewer] = await (await client.get(f"/v1/status?{query}")).json()
    return [i["token"] for i in viewer["instances"]]


async def test_a_users_token_is_shown_to_that_user_only(users_api: UsersApi) -> None:
    client, _ = users_api
    mine = (await (await client.get("/v1/reserve/viewer?user_key=alice-key")).json())["token"]
    anonymous = (await (await client.get("/v1/reserve/viewer")).json())["token"]
    assert await _tokens(client, "user_key=alice-key") == [mine, anonymous]
    assert await _tokens(client, "user_key=bob-key") == [None, anonymous]
    assert await _tokens(client, "") == [None, anonymous]
    for query in ("user_key=bob-key", "user_key=bob-key&fragment=1"):
        page = await (await client.get(f"/v1/status_view?{query}")).text()
        assert mine[:8] not in page and "another user's" in page
        assert page.count("data-release=") == 1
    page = await (await client.get("/v1/status_view?user_key=alice-key")).text()
    assert f"data-release='{mine}'" in page


@pytest.mark.parametrize("users_api", ["s3cret"], indirect=True)
async def test_the_security_token_holder_sees_and_releases_every_token(users_api: UsersApi) -> None:
    client, _ = users_api
    response = await client.get("/v1/reserve/viewer?user_key=alice-key&security_token=s3cret")
    mine = (await response.json())["token"]
    assert await _tokens(client, "security_token=s3cret") == [mine]
    assert await _tokens(client, "security_token=s3cret&user_key=bob-key") == [mine]
    refused = await client.get(f"/v1/release/{mine}?user_key=bob-key")  # holder, not admin
    assert refused.status == 403 and "error" in await refused.json()
    released = await client.get(f"/v1/release/{mine}?user_key=bob-key&security_token=s3cret")
    assert released.status == 200


async def test_release_of_a_users_token(users_api: UsersApi) -> None:
    client, services = users_api
    mine = (await (await client.get("/v1/reserve/viewer?user_key=alice-key")).json())["token"]
    refused = await client.get(f"/v1/release/{mine}?user_key=bob-key")
    assert refused.status == 403 and "error" in await refused.json()
    assert mine not in (await refused.json())["error"]
    assert len(await services.store.list()) == 1
    assert (await client.get(f"/v1/release/{mine}")).status == 200  # anonymous holder
    mine = (await (await client.get("/v1/reserve/viewer?user_key=alice-key")).json())["token"]
    assert (await client.get(f"/v1/release/{mine}?user_key=alice-key")).status == 200
    assert await services.store.list() == []


async def test_release_while_an_upgrade_holds_the_claim(users_api: UsersApi) -> None:
    """Claimed by a websocket that has not begun to start it: the release still wins."""
    client, services = users_api
    token = (await (await client.get("/v1/reserve/viewer")).json())["token"]
    claimed = await services.claim(token, None)
    assert isinstance(claimed, Reservation)  # one instance: held here, never elsewhere
    assert (await client.get(f"/v1/release/{token}")).status == 200
    with pytest.raises(Refused) as gone:
        async with services.activate(token, lambda reason: None, claimed=claimed):
            pass
    assert gone.value.status == 410
    assert await services.store.list() == []
    token = (await (await client.get("/v1/reserve/viewer")).json())["token"]
    await services.claim(token, None)
    assert (await client.get(f"/v1/release/{token}")).status == 200
    await services.unclaim(token)  # the upgrade gave up instead
    assert await services.store.list() == []


async def test_unclaim_makes_the_token_usable_again(users_api: UsersApi) -> None:
    client, services = users_api
    token = (await (await client.get("/v1/reserve/viewer?user_key=alice-key")).json())["token"]
    with pytest.raises(Refused) as refused:
        await services.claim(token, "bob")
    assert refused.value.status == 403
    await services.claim(token, "alice")
    with pytest.raises(Refused) as in_use:
        await services.claim(token, "alice")
    assert in_use.value.status == 409
    await services.unclaim(token)
    assert [r.state for r in await services.store.list()] == [State.RESERVED]
    claimed = await services.claim(token, None)
    assert isinstance(claimed, Reservation) and claimed.state is State.STARTING


@pytest.mark.parametrize("users_api", [None, "s3cret"], indirect=True)
async def test_where_a_session_comes_from_and_runs_is_for_the_administrator_only(
        users_api: UsersApi, request: pytest.FixtureRequest) -> None:
    """A session's client address, backend and process: in /v1/status and on the page
    of the security token's holder, never of anyone else (without a security token
    nobody is the administrator)."""
    client, _ = users_api
    admin = request.node.callspec.params["users_api"] is not None
    query = "security_token=s3cret" if admin else "user_key=alice-key"
    await client.get(f"/v1/reserve/viewer?{query}")
    [viewer] = await (await client.get(f"/v1/status?{query}")).json()
    shown = {"client", "backend", "pid"} & set(viewer["instances"][0])
    assert shown == ({"client", "backend", "pid"} if admin else set())
    page = await (await client.get(f"/v1/status_view?{query}")).text()
    assert ("<th>backend</th>" in page) is admin
