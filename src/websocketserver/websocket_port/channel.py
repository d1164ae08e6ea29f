"""The channel between the main process and a relay process, and its messages.

One end of a ``SOCK_SEQPACKET`` Unix socket pair per process: whole messages, with
file descriptors when one is handed over (``SCM_RIGHTS``), sent without ever blocking
the event loop. The messages are the small typed records below.
"""

from __future__ import annotations

import asyncio
import os
import pickle
import socket
from collections.abc import Callable
from typing import NamedTuple


class HandOver(NamedTuple):
    """Main -> relay: adopt this websocket (its socket travels as the descriptor)."""

    tunnel_id: int
    key: bytes  # the checked Sec-WebSocket-Key
    binary: bool  # answer the "binary" subprotocol
    tail: bytes  # what the browser sent after its request
    peer: str  # the client address the limits counted


class Opened(NamedTuple):
    """Relay -> main: the tunnel's backend is connected."""

    tunnel_id: int
    target: str


class Ended(NamedTuple):
    """Relay -> main: the tunnel relays nothing more (its slot is free)."""

    tunnel_id: int
    bytes_up: int
    bytes_down: int


class Stop(NamedTuple):
    """Main -> relay: close every tunnel with ``reason`` and exit."""

    reason: str


Message = HandOver | Opened | Ended | Stop
_KINDS: tuple[type[Message], ...] = (HandOver, Opened, Ended, Stop)
_TAGS = {kind: tag for tag, kind in enumerate(_KINDS)}
"""On the wire a message is a plain tuple, its kind's tag first: pickling a tuple
costs a microsecond, a class instance eight (three messages a tunnel, see the
tunnels/s row of the benchmark)."""


def encode(message: Message) -> bytes:
    return pickle.dumps((_TAGS[type(message)], *message), pickle.HIGHEST_PROTOCOL)


def decode(data: bytes) -> Message:
    tag, *fields = pickle.loads(data)
    message: Message = _KINDS[tag]._make(fields)
    return message


MAX_MESSAGE = 64 * 1024
"""Largest message on a channel; a hand-over with a longer tail stays in the main
process (a tail is what a client sent after its request, before the ``101``)."""

class Channel:
    """One end of a ``SOCK_SEQPACKET`` pair: whole messages, optionally with file
    descriptors, sent without ever blocking the event loop."""

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        self._queue: list[tuple[bytes, list[int]]] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._on_message: Callable[[Message, list[int]], None] = lambda _m, _f: None
        self._on_eof: Callable[[], None] = lambda: None
        self.open = True

    def attach(self, on_message: Callable[[Message, list[int]], None],
               on_eof: Callable[[], None]) -> None:
        """Start reading in the running loop."""
        self._loop = asyncio.get_running_loop()
        self._on_message, self._on_eof = on_message, on_eof
        self._sock.setblocking(False)
        self._loop.add_reader(self._sock.fileno(), self.receive)

    def send(self, message: Message, fds: list[int] | None = None) -> None:
        """Send ``message``; the channel owns ``fds`` and closes them once sent."""
        if not self.open:  # the other process is gone: nobody to tell
            for fd in fds or ():
                os.close(fd)
            return
        data = encode(message)
        self._queue.append((data, fds or []))
        if len(self._queue) == 1:
            self._flush()

    def _flush(self) -> None:
        queue = self._queue
        while queue and self.open:
            data, fds = queue[0]
            try:
                socket.send_fds(self._sock, [data], fds)
            except (BlockingIOError, InterruptedError):
                if self._loop is not None:
                    self._loop.add_writer(self._sock.fileno(), self._writable)
                return
            except OSError:
                self._closed()
                return
            queue.pop(0)
            for fd in fds:
                os.close(fd)

    def _writable(self) -> None:
        assert self._loop is not None
        self._loop.remove_writer(self._sock.fileno())
        self._flush()

    def receive(self) -> None:
        """Handle every message waiting now (the loop calls this when some arrive)."""
        while self.open:
            try:
                data, fds, _flags, _ = socket.recv_fds(self._sock, MAX_MESSAGE, 1)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                data, fds = b"", []
            if not data:
                self._closed()
                return
            self._on_message(decode(data), fds)

    def _closed(self) -> None:
        if not self.open:
            return
        self.open = False
        if self._loop is not None:
            self._loop.remove_reader(self._sock.fileno())
            self._loop.remove_writer(self._sock.fileno())
        for _, fds in self._queue:
            for fd in fds:
                os.close(fd)
        self._queue.clear()
        self._sock.close()
        self._on_eof()
