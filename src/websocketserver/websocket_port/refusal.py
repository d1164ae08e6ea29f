"""Refusals a page can show: a browser's websocket refused inside the websocket.

Browsers hide the HTTP status of a refused upgrade: a page sees close code 1006 and
nothing else, and noVNC says "Failed to connect to server" for a token typo. So the
gateway answers a browser's upgrade (one with an ``Origin``) whose token is refused
with ``101`` and refuses it here: close code 4000 + the HTTP status it would have had,
with the same reason (``errors.CLOSE_CODES``). Stock noVNC shows no close reason, but
it shows the reason of an RFB security failure; so when the page speaks RFB (see
``gateway``), the refusal first takes that form: the proxy sends its ProtocolVersion,
reads the browser's, and answers no security type and the reason
(:func:`~..core.rfb.refusal`), then closes. A page that does not answer within
``RFB_WAIT`` seconds gets the close code alone.

A disallowed ``Origin``, 429 and 503 are never answered this way (a cross-site page
never gets a ``101``; a client at a limit must not hold a connection open).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from picows import WSCloseCode, WSFrame, WSListener, WSMsgType, WSTransport

from ..core.errors import Refused, refused_close
from ..core.frames import close_reason
from ..core.rfb import SERVER_VERSION, refusal

RFB_WAIT = 2.0
"""Seconds a page has to send its RFB ProtocolVersion before it is closed anyway."""
CLOSE_WAIT = 5.0
"""Seconds the browser has to answer the close frame."""
_VERSION_SIZE = len(SERVER_VERSION)


class Refusal(WSListener):
    """One refused websocket: ``rfb`` refuse at the RFB level first; ``ended`` is called
    once the connection is gone."""

    def __init__(self, refused: Refused, rfb: bool, ended: Callable[[], None]) -> None:
        super().__init__()
        self._refused = refused
        self._rfb = rfb
        self._ended = ended
        self._version = b""
        self._ws: WSTransport | None = None
        self._timer: asyncio.TimerHandle | None = None

    def on_ws_connected(self, transport: WSTransport) -> None:
        self._ws = transport
        if self._rfb:
            transport.send(WSMsgType.BINARY, SERVER_VERSION)
            self._timer = asyncio.get_running_loop().call_later(RFB_WAIT, self._close)
        else:
            self._close()

    def on_ws_frame(self, transport: WSTransport, frame: WSFrame) -> None:
        if frame.msg_type == WSMsgType.CLOSE:
            if not transport.is_close_frame_sent:
                transport.send_close(WSCloseCode.OK)
            transport.disconnect()
        elif (self._rfb and not transport.is_close_frame_sent
              and frame.msg_type in (WSMsgType.BINARY, WSMsgType.TEXT, WSMsgType.CONTINUATION)):
            self._version += frame.get_payload_as_bytes()[:_VERSION_SIZE - len(self._version)]
            if len(self._version) == _VERSION_SIZE:
                answer = refusal(self._version, self._refused.reason)
                if answer is not None:
                    transport.send(WSMsgType.BINARY, answer)
                self._close()

    def on_ws_disconnected(self, transport: WSTransport) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._ended()

    def _close(self) -> None:
        ws = self._ws
        if ws is None or ws.is_close_frame_sent:
            return
        ws.send_close(WSCloseCode(refused_close(self._refused.status)),
                      close_reason(self._refused.reason))
        if self._timer is not None:
            self._timer.cancel()
        self._timer = asyncio.get_running_loop().call_later(CLOSE_WAIT, ws.disconnect)
