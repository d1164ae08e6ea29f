"""http_port/events.py in-process: comments keep an idle stream open; limits hold.

A real aiohttp server on a loopback port and a memory store; the heartbeat is shortened
(the server's is 15 s) so that a comment comes within the test.
"""

from __future__ import annotations

import asyncio

from aiohttp import web

from websocketserver.core.errors import Refused
from websocketserver.http_port.events import MAX_PER_CLIENT, EventStreams
from websocketserver.metrics import Metrics
from websocketserver.sessions.reservations import MemoryStore, State


async def test_an_idle_stream_gets_comments_then_its_changes() -> None:
    store = MemoryStore()
    reservation = await store.reserve("s", 1, {})
    streams = EventStreams(store, lambda r: {"state": str(r.state), "seconds_left": None},
                           Metrics(), heartbeat=0.2)

    async def handler(request: web.BaseRequest) -> web.StreamResponse:
        current = await store.get(reservation.token)
        assert current is not None
        try:
            return await streams.stream(request, current, "client")
        except Refused as refused:
            return web.json_response({"error": refused.reason}, status=refused.status)

    runner = web.ServerRunner(web.Server(handler))
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET /events HTTP/1.1\r\nHost: x\r\n\r\n")
        received = b""
        while received.count(b": keep-alive") < 2:
            received += await asyncio.wait_for(reader.read(4096), 5)
        assert b'"state": "reserved"' in received and streams.open == 1
        await store.claim(reservation.token, None)
        while b'"state": "starting"' not in received:
            received += await asyncio.wait_for(reader.read(4096), 5)
        others = [await asyncio.open_connection("127.0.0.1", port)
                  for _ in range(MAX_PER_CLIENT)]
        for _, other in others:
            other.write(b"GET /events HTTP/1.1\r\nHost: x\r\n\r\n")
        answers = [await asyncio.wait_for(r.read(12), 5) for r, _ in others]
        assert answers.count(b"HTTP/1.1 429") == 1  # the 11th of one client
        writer.close()
        for _, other in others:
            other.close()
        for _ in range(50):  # a reader that left is noticed within a second
            if streams.open == 0:
                break
            await asyncio.sleep(0.1)
        assert streams.open == 0
        current = await store.get(reservation.token)
        assert current is not None and current.state is State.STARTING
    finally:
        await runner.cleanup()
