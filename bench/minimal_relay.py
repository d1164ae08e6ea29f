"""The least a picows websocket→TCP relay can do: the ceiling of a Python/picows proxy.

Usage: ``python bench/minimal_relay.py [--cert PEM --key PEM] WS_PORT BACKEND_PORT``
(both on 127.0.0.1).  For each websocket connection it opens a TCP connection to the
backend and relays bytes both ways: every data frame's payload to the backend, every
backend read as one binary message.  Flow control is kept (a full transport pauses
reading on the other side), and the ``binary`` subprotocol is answered when offered,
as the other servers do; nothing else: no limits, metrics, checks beyond picows' own,
logging or lifecycle.  Runs until killed.
"""

from __future__ import annotations

import argparse
import asyncio
import ssl

import uvloop
from picows import (
    WSCloseCode,
    WSFrame,
    WSListener,
    WSMsgType,
    WSTransport,
    WSUpgradeRequest,
    WSUpgradeResponse,
    WSUpgradeResponseWithListener,
    ws_create_server,
)

HOST = "127.0.0.1"
DATA = (WSMsgType.BINARY, WSMsgType.TEXT, WSMsgType.CONTINUATION)


class Backend(asyncio.Protocol):
    """The TCP side of one tunnel."""

    def __init__(self, relay: Relay) -> None:
        self.relay = relay

    def data_received(self, data: bytes) -> None:
        self.relay.ws.send(WSMsgType.BINARY, data)

    def connection_lost(self, exc: Exception | None) -> None:
        ws = self.relay.ws
        if not ws.is_close_frame_sent:
            ws.send_close(WSCloseCode.OK)
        ws.disconnect()

    def pause_writing(self) -> None:
        self.relay.ws.underlying_transport.pause_reading()

    def resume_writing(self) -> None:
        self.relay.ws.underlying_transport.resume_reading()


class Relay(WSListener):
    """The websocket side of one tunnel."""

    ws: WSTransport
    backend: asyncio.Transport | None = None

    def __init__(self, backend_port: int) -> None:
        self.backend_port = backend_port
        self.pending: list[bytes] = []
        self.gone = False

    def on_ws_connected(self, transport: WSTransport) -> None:
        self.ws = transport
        asyncio.get_running_loop().create_task(self.connect())

    async def connect(self) -> None:
        try:
            backend, _ = await asyncio.get_running_loop().create_connection(
                lambda: Backend(self), HOST, self.backend_port
            )
        except OSError:
            self.ws.send_close(WSCloseCode.BAD_GATEWAY)
            self.ws.disconnect()
            return
        if self.gone:
            backend.close()
            return
        self.backend = backend
        for data in self.pending:
            backend.write(data)
        self.pending.clear()

    def on_ws_frame(self, transport: WSTransport, frame: WSFrame) -> None:
        if frame.msg_type in DATA:
            data = frame.get_payload_as_bytes()
            if self.backend is None:
                self.pending.append(data)
            else:
                self.backend.write(data)
        elif frame.msg_type == WSMsgType.CLOSE:
            if not transport.is_close_frame_sent:
                transport.send_close(frame.get_close_code())
            transport.disconnect()

    def on_ws_disconnected(self, transport: WSTransport) -> None:
        self.gone = True
        if self.backend is not None:
            self.backend.close()

    def pause_writing(self) -> None:
        if self.backend is not None:
            self.backend.pause_reading()

    def resume_writing(self) -> None:
        if self.backend is not None:
            self.backend.resume_reading()


async def serve(ws_port: int, backend_port: int, context: ssl.SSLContext | None) -> None:
    def factory(request: WSUpgradeRequest) -> WSUpgradeResponseWithListener:
        offered = request.headers.get("Sec-WebSocket-Protocol", "")
        headers = {"Sec-WebSocket-Protocol": "binary"} if "binary" in offered else None
        return WSUpgradeResponseWithListener(
            WSUpgradeResponse.create_101_response(headers), Relay(backend_port)
        )

    server = await ws_create_server(factory, HOST, ws_port, ssl=context, backlog=4096)
    await server.serve_forever()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--cert")
    parser.add_argument("--key")
    parser.add_argument("ws_port", type=int)
    parser.add_argument("backend_port", type=int)
    args = parser.parse_args()
    context = None
    if args.cert:
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(args.cert, args.key)
    uvloop.run(serve(args.ws_port, args.backend_port, context))


if __name__ == "__main__":
    main()
