"""The relay channel: whole messages with file descriptors, in order, never blocking.

(The relay processes themselves are exercised through the real command line in
``e2e/test_relay.py``.)"""

from __future__ import annotations

import asyncio
import os
import socket
from typing import Any

import pytest

from websocketserver.settings import Settings
from websocketserver.websocket_port.channel import Channel, Ended, HandOver, decode
from websocketserver.websocket_port.relay import _Relay


def test_messages_and_descriptors_arrive_in_order_past_a_full_buffer() -> None:
    async def scenario() -> None:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        ours.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        received: list[tuple[tuple[Any, ...], bytes]] = []
        done = asyncio.get_running_loop().create_future()

        def on_message(message: tuple[Any, ...], fds: list[int]) -> None:
            with os.fdopen(fds[0], "rb") as pipe:
                received.append((message, pipe.read()))
            if len(received) == 200:
                done.set_result(None)

        sender = Channel(ours)
        sender.attach(lambda m, f: None, lambda: None)
        for n in range(200):  # far more than 4 KiB: the rest waits for writability
            read_end, write_end = os.pipe()
            os.write(write_end, b"%d" % n)
            os.close(write_end)
            sender.send(HandOver(n, b"k" * 100, True, b"", "peer"), [read_end])
        assert sender._queue, "the socket buffer should have filled"
        receiver = Channel(theirs)
        receiver.attach(on_message, lambda: None)
        await asyncio.wait_for(done, 10)
        assert received == [(HandOver(n, b"k" * 100, True, b"", "peer"), b"%d" % n)
                            for n in range(200)]
        assert not sender._queue  # every descriptor was sent, and closed on this side
        ours.close()
        theirs.close()

    asyncio.run(scenario())


def test_the_other_end_closing_is_reported_once() -> None:
    async def scenario() -> None:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        ends: list[str] = []
        gone = asyncio.get_running_loop().create_future()

        def on_eof() -> None:
            ends.append("eof")
            gone.set_result(None)

        channel = Channel(ours)
        channel.attach(lambda m, f: None, on_eof)
        theirs.close()
        await asyncio.wait_for(gone, 10)
        read_end, write_end = os.pipe()
        channel.send(Ended(1, 0, 0), [read_end])  # after the end: dropped, not raised
        assert not channel._queue
        os.close(write_end)
        with pytest.raises(OSError):  # the channel closed the descriptor it was given
            os.fstat(read_end)
        assert ends == ["eof"] and not channel.open

    asyncio.run(scenario())


def test_a_hand_over_without_its_socket_is_reported_as_ended() -> None:
    """At its open-file limit a relay gets the message but not the descriptor: the main
    process must still hear that the tunnel is over, to release its limits."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    relay = _Relay(Settings(ws_port=1, client_port=2), Channel(ours))
    relay._on_message(HandOver(7, b"key", True, b"", "127.0.0.1"), [])
    theirs.settimeout(5)
    data, fds, _, _ = socket.recv_fds(theirs, 4096, 1)
    message = decode(data)
    assert isinstance(message, Ended) and message == Ended(7, 0, 0) and fds == []
    ours.close()
    theirs.close()
