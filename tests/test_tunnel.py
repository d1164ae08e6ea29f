"""The hot path in-process: byte-exact relay, closing, and backpressure both ways."""

from __future__ import annotations

import asyncio
import os
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from urllib.parse import parse_qsl, urlsplit

import pytest
import websockets
from picows import WSCloseCode, WSUpgradeRequest, ws_create_server

from support import received_close, recv_bytes
from websocketserver.core.upstream import UpstreamBudget
from websocketserver.websocket_port import tunnel as tunnel_module
from websocketserver.websocket_port.backend import BackendError
from websocketserver.websocket_port.tunnel import Tunnel, TunnelStats

FLOOD = 256 * 1024 * 1024
BOUND = 48 * 1024 * 1024  # far below FLOOD: what kernel buffers + our limits may hold
Behaviour = Callable[["Backend", asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]
"""What a :class:`Backend` does with each connection."""
Relay = tuple[Callable[[int], str], list[Tunnel]]
"""The ``relay`` fixture: a URL maker (by the backend's port) and the tunnels opened."""


class Backend:
    """A TCP server whose behaviour each test chooses."""

    def __init__(self, behaviour: Behaviour) -> None:
        self.behaviour = behaviour
        self.server: asyncio.Server | None = None
        self.progress = 0
        self.eof = asyncio.Event()
        self.done = asyncio.Event()

    async def __aenter__(self) -> Backend:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.done.set()
        assert self.server is not None
        self.server.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await self.behaviour(self, reader, writer)
        except ConnectionError:
            pass
        finally:
            writer.close()


async def echo(backend: Backend, reader: asyncio.StreamReader,
                writer: asyncio.StreamWriter) -> None:
    while data := await reader.read(65536):
        writer.write(data)
        await writer.drain()
    backend.eof.set()


async def flood(backend: Backend, reader: asyncio.StreamReader,
                writer: asyncio.StreamWriter) -> None:
    chunk = os.urandom(64 * 1024)
    while backend.progress < FLOOD and not backend.done.is_set():
        writer.write(chunk)
        await writer.drain()
        backend.progress += len(chunk)


async def stall(backend: Backend, reader: asyncio.StreamReader,
                writer: asyncio.StreamWriter) -> None:
    await backend.done.wait()


@pytest.fixture
async def relay() -> AsyncIterator[Relay]:
    """A picows server whose websockets tunnel to ``?port=`` (and ``&host=``); yields a
    URL maker and the list of tunnels opened."""
    tunnels: list[Tunnel] = []
    tasks: set[asyncio.Task[None]] = set()

    async def run(tunnel: Tunnel, host: str, port: int) -> None:
        try:
            await tunnel.connect(host, port)
        except BackendError as exc:
            tunnel.close(WSCloseCode(1011), str(exc))
        await tunnel.closed

    def factory(request: WSUpgradeRequest) -> Tunnel:
        query = dict(parse_qsl(urlsplit(request.path.decode()).query))
        tunnel = Tunnel(TunnelStats(peer="test", target="backend"), max_message=1 << 40,
                        budget=UpstreamBudget(1 << 40))
        tunnels.append(tunnel)
        task = asyncio.get_running_loop().create_task(
            run(tunnel, query.get("host", "127.0.0.1"), int(query["port"])))
        tasks.add(task)
        return tunnel

    server = await ws_create_server(factory, "127.0.0.1", 0, max_frame_size=1 << 40)
    port = server.sockets[0].getsockname()[1]
    yield lambda backend: f"ws://127.0.0.1:{port}/?port={backend}", tunnels
    server.close()
    for tunnel in tunnels:
        tunnel.close(WSCloseCode(1001), "test over")
    await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), 15)


async def test_echo_is_byte_exact_and_counted(relay: Relay) -> None:
    url, tunnels = relay
    async with Backend(echo) as backend:
        async with websockets.connect(url(backend.port), max_size=None) as ws:
            data = os.urandom(3 * 1024 * 1024 + 7)
            await ws.send(data)
            received = bytearray()
            while len(received) < len(data):
                received += await recv_bytes(ws)
            assert received == data
            await ws.send("text")
            assert await ws.recv() == b"text"
            assert tunnels[0]._browser is not None
            browser = tunnels[0]._browser.get_extra_info("socket")
            for sock in (tunnels[0]._sock, browser):  # both sockets
                assert sock is not None
                assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
        await asyncio.wait_for(backend.eof.wait(), 5)  # client close reached the backend
    stats = tunnels[0].stats
    assert stats.bytes_up == stats.bytes_down == len(data) + 4


async def test_backend_named_by_host_name(relay: Relay) -> None:
    """A name goes through the resolver; every address is tried (localhost may be ::1
    first, where the backend does not listen)."""
    url, _ = relay
    async with Backend(echo) as backend:
        async with websockets.connect(url(backend.port) + "&host=localhost") as ws:
            await ws.send(b"by name")
            assert await ws.recv() == b"by name"


async def test_burst_of_small_messages_keeps_order(relay: Relay,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """More messages in one read than one sendmsg takes (IOV_BATCH, made tiny
    here) still reach the backend whole and in order."""
    monkeypatch.setattr(tunnel_module, "IOV_BATCH", 3)
    url, tunnels = relay
    messages = [b"%05d," % i for i in range(3000)]
    async with Backend(echo) as backend:
        async with websockets.connect(url(backend.port), max_size=None) as ws:
            for message in messages:
                await ws.send(message)
            received = bytearray()
            expected = b"".join(messages)
            while len(received) < len(expected):
                received += await asyncio.wait_for(recv_bytes(ws), 5)
            assert received == expected
    assert tunnels[0].stats.bytes_up == len(expected)


async def test_backend_close_ends_websocket_normally(relay: Relay) -> None:
    async def greet(backend: Backend, reader: asyncio.StreamReader,
                    writer: asyncio.StreamWriter) -> None:
        writer.write(b"hello")
        await writer.drain()

    url, _ = relay
    async with Backend(greet) as backend:
        async with websockets.connect(url(backend.port)) as ws:
            assert await ws.recv() == b"hello"
            with pytest.raises(websockets.ConnectionClosedOK) as closed:
                await asyncio.wait_for(ws.recv(), 5)
    assert received_close(closed.value).code == 1000
    assert received_close(closed.value).reason == "backend closed the connection"


async def test_refused_backend_gives_reason(relay: Relay) -> None:
    url, _ = relay
    async with Backend(echo) as backend:
        port = backend.port
    async with websockets.connect(url(port)) as ws:
        with pytest.raises(websockets.ConnectionClosedError) as closed:
            await asyncio.wait_for(ws.recv(), 5)
    assert received_close(closed.value).code == 1011
    assert "cannot connect to backend" in received_close(closed.value).reason


async def test_downstream_backpressure_stops_a_flooding_backend(relay: Relay) -> None:
    """A browser that stops reading must make the backend block, not the server buffer."""
    url, tunnels = relay
    async with Backend(flood) as backend:
        async with websockets.connect(url(backend.port), max_size=None,
                                      max_queue=1, close_timeout=1) as ws:
            await ws.recv()  # the flood has started; now stop reading
            stalled_at = -1
            while backend.progress != stalled_at:  # until the backend is blocked
                stalled_at = backend.progress
                await asyncio.sleep(0.5)
            assert stalled_at < BOUND


async def test_reading_resumes_after_the_browser_drains(relay: Relay) -> None:
    """A browser that stalls, then reads on, gets every byte in order: the backend is
    paused and resumed as often as needed and nothing is lost."""
    total = 64 * 1024 * 1024
    pattern = bytes(range(256)) * 256  # 64 KiB, so offsets are checkable

    async def counted_flood(backend: Backend, reader: asyncio.StreamReader,
                writer: asyncio.StreamWriter) -> None:
        for _ in range(total // len(pattern)):
            writer.write(pattern)
            await writer.drain()

    url, tunnels = relay
    async with Backend(counted_flood) as backend:
        async with websockets.connect(url(backend.port), max_size=None,
                                      max_queue=1) as ws:
            received = bytearray(await recv_bytes(ws))
            await asyncio.sleep(1)  # stalled: the server's reading must pause
            assert not tunnels[0]._reading
            with pytest.raises(websockets.ConnectionClosedOK):
                while True:
                    received += await asyncio.wait_for(recv_bytes(ws), 10)
    assert len(received) == total
    assert received == pattern * (total // len(pattern))


async def test_upstream_backpressure_blocks_a_flooding_browser(relay: Relay) -> None:
    """A backend that stops reading must stall the browser's sends."""
    url, _ = relay
    sent = 0
    chunk = os.urandom(64 * 1024)
    async with Backend(stall) as backend:
        async with websockets.connect(url(backend.port), write_limit=65536,
                                      close_timeout=1) as ws:

            async def send_forever() -> None:
                nonlocal sent
                while sent < FLOOD:
                    await ws.send(chunk)
                    sent += len(chunk)

            sender = asyncio.create_task(send_forever())
            stalled_at = -1
            while sent != stalled_at:  # until the browser is blocked
                stalled_at = sent
                await asyncio.sleep(0.5)
            assert stalled_at < BOUND
            backend.done.set()  # the backend goes away: the tunnel must end
            with pytest.raises(websockets.ConnectionClosed):
                await asyncio.wait_for(sender, 10)


async def test_backend_that_never_answers_times_out_without_leaking() -> None:
    """A SYN that is never answered (the backend's accept queue is full) ends in a
    reason after the timeout, and the half-open socket is closed."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(0)
        port = listener.getsockname()[1]
        fillers = []
        for _ in range(4):  # fill the accept queue: later SYNs are dropped
            filler = socket.socket()
            filler.setblocking(False)
            try:
                filler.connect(("127.0.0.1", port))
            except BlockingIOError:
                pass
            fillers.append(filler)
        fds_before = len(os.listdir("/proc/self/fd"))
        tunnel = Tunnel(TunnelStats(peer="test", target="backend"), max_message=1024,
                        budget=UpstreamBudget(1 << 40))
        with pytest.raises(BackendError, match="did not answer"):
            await tunnel.connect("127.0.0.1", port, timeout=0.5)
        assert len(os.listdir("/proc/self/fd")) == fds_before
        for filler in fillers:
            filler.close()
