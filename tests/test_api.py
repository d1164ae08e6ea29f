"""The REST API in-process: authorization, routing, errors, the status page."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from websocketserver.api import RestApi, render_status
from websocketserver.identity import Identity
from websocketserver.reservations import MemoryStore
from websocketserver.services import ServiceManager
from websocketserver.settings import ServiceConfig, Settings

SCRIPT = ("from websocketserver import RemoteServiceScript\n"
          "class S(RemoteServiceScript):\n"
          "    def start(self, index, options): return '127.0.0.1', 1\n"
          "    def stop(self, index): pass\n")


@pytest.fixture
async def api(tmp_path: Path):
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


async def test_token_by_query_or_bearer(api) -> None:
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


async def test_reserve_release_and_errors(api) -> None:
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
async def test_unknown_calls_are_404_json(api, path: str, status: int) -> None:
    client, _ = api
    response = await client.get(path + "?security_token=s3cret")
    assert response.status == status
    assert "error" in await response.json()


async def test_post_is_405(api) -> None:
    client, _ = api
    assert (await client.post("/v1/status?security_token=s3cret")).status == 405


async def test_stop_answers_then_stops(api) -> None:
    client, stopped = api
    response = await client.get("/v1/stop?security_token=s3cret")
    assert response.status == 200 and stopped == [True]


async def test_status_view_escapes_everything(api) -> None:
    client, _ = api
    await client.get("/v1/reserve/viewer?security_token=s3cret&x=<script>alert(1)</script>")
    page = await (await client.get("/v1/status_view?security_token=s3cret")).text()
    assert "<script>alert" not in page and "&lt;b&gt;x&lt;/b&gt;" in page
    assert "viewer" in page and "reserved" in page


def test_render_status_without_services() -> None:
    assert "No services are configured" in render_status([])
    assert json.dumps([])  # the JSON twin is simply []
