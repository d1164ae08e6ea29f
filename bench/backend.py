"""TCP backend for the benchmark: stream, sink or echo, chosen per connection.

Run as ``python bench/backend.py PORT``; prints ``READY`` once listening and
serves until SIGTERM/SIGINT.  Each connection first sends a ``common.HEADER``.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
from typing import cast

import uvloop

from common import ACK, HEADER, HOST, MODE_DOWN, MODE_ECHO, MODE_UP, raise_nofile_limit, send_json

PATTERN = bytes(range(256)) * 4096
"""1 MiB of payload that DOWN writes are sliced from."""


class BackendProtocol(asyncio.Protocol):
    """One backend connection; the mode is read from the first HEADER.size bytes."""

    transport: asyncio.Transport  # set by connection_made

    def __init__(self) -> None:
        self.pending = bytearray()
        self.mode: bytes | None = None
        self.total = 0
        self.received = 0
        self.left = 0
        self.chunk = memoryview(b"")
        self.paused = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is no subclass

    def data_received(self, data: bytes) -> None:
        if self.mode is None:
            self.pending += data
            if len(self.pending) < HEADER.size:
                return
            mode, total, chunk = HEADER.unpack_from(self.pending)
            data = bytes(self.pending[HEADER.size :])
            self.pending = bytearray()
            self.start(mode, total, chunk)
        if not data:
            return
        if self.mode == MODE_ECHO:
            self.transport.write(data)
        elif self.mode == MODE_UP:
            self.received += len(data)
            if self.received >= self.total:  # a second ACK means too many bytes
                self.transport.write(ACK.pack(self.received))
        else:
            self.transport.close()  # data in a mode that expects none: fail loudly

    def start(self, mode: bytes, total: int, chunk: int) -> None:
        """Begin serving the command from the header."""
        self.mode = mode
        self.total = total
        if mode == MODE_DOWN:
            if not 0 < chunk <= len(PATTERN):
                self.transport.close()
                return
            self.chunk = memoryview(PATTERN)[:chunk]
            self.left = total
            self.pump()
        elif mode == MODE_UP and total == 0:
            self.transport.write(ACK.pack(0))
        elif mode not in (MODE_UP, MODE_ECHO):
            self.transport.close()

    def pump(self) -> None:
        """Write DOWN data until done or the transport asks us to pause."""
        chunk = self.chunk
        size = len(chunk)
        write = self.transport.write
        while self.left >= size and not self.paused:
            write(chunk)
            self.left -= size
        if 0 < self.left < size and not self.paused:
            write(chunk[: self.left])
            self.left = 0

    def pause_writing(self) -> None:
        self.paused = True

    def resume_writing(self) -> None:
        self.paused = False
        if self.mode == MODE_DOWN and self.left:
            self.pump()


async def serve(port: int) -> None:
    """Listen on 127.0.0.1:port until SIGTERM/SIGINT."""
    loop = asyncio.get_running_loop()
    stop = loop.create_future()

    def request_stop() -> None:
        if not stop.done():
            stop.set_result(None)

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, request_stop)
    server = await loop.create_server(BackendProtocol, HOST, port, backlog=4096)
    send_json({"ready": True})
    async with server:
        await stop


def main() -> None:
    """Entry point."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("port", type=int)
    args = parser.parse_args()
    raise_nofile_limit()
    uvloop.run(serve(args.port))


if __name__ == "__main__":
    main()
