"""The hot path: relay one websocket to one TCP connection, both ways.

A :class:`Tunnel` is a picows listener: picows parses the browser's frames in C and
calls :meth:`Tunnel.on_ws_frame` for each, so the relay runs in callbacks, without a
task or a queue. The backend connection is a plain non-blocking socket watched with
``loop.add_reader``/``add_writer``: one ``recv`` of up to ``READ_SIZE`` per
readiness event, written out in the same callback (~15-30 % more downstream than
through uvloop's transport, which copies every chunk: ``bench/README.md``).

* **Downstream** (backend → browser), each chunk the backend sends becomes one binary
  frame: header and payload written to the browser's transport in one writev, no
  copy. picows writes the control frames (pong, close, ping) of the same
  connection; both write whole frames, so they never interleave.
* **Upstream** (browser → backend), the payloads of the frames that one read of the
  browser's socket brought are written with one ``sendmsg``, right after the last of
  them (picows marks it). Fragmented messages are relayed fragment by fragment,
  never reassembled.

Backpressure holds both ways with no unbounded buffer: downstream, above
``HIGH_WATER`` bytes waiting in the browser's transport the backend is not read until
it drains; upstream, a batch the backend does not take (or ``HIGH_WATER`` bytes before
it is connected) pauses the browser's socket until written; one pong is owed while the
browser's transport is full; what a tunnel holds upstream beyond ``HIGH_WATER`` is
charged to the process's budget, and a tunnel that would exceed it is closed (1009).
The bookkeeping is :class:`~.upstream.UpstreamQueue`'s, without I/O.

A browser that resets its connection while its socket is not being read (its backend
stalled) is noticed by a check of the socket's TCP state every ``RESET_CHECK`` seconds
while paused, so the tunnel and its slot do not wait for the backend.

The websocket rules picows leaves to its user are :class:`~.frames.FrameChecker`'s
(reserved bits, fragment order, message size, UTF-8, close codes); the tunnel does what
it answers. Its life is one :class:`TunnelState`, moved only along ``_TRANSITIONS``.

(One class on purpose: every indirection per frame or read costs throughput.)
"""

from __future__ import annotations

import asyncio
import enum
import logging
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from picows import WSCloseCode, WSFrame, WSListener, WSProtocolError, WSTransport

from ..core.frames import (
    FORWARD,
    Closed,
    Fail,
    FrameChecker,
    Pong,
    close_reason,
    frame_header,
    frame_size,
    wire_close_code,
)
from ..core.upstream import HIGH_WATER, UpstreamBudget, UpstreamQueue
from . import backend
from .rfb_filter import RfbFilter

log = logging.getLogger("websocketserver.tunnel")

READ_SIZE = 1024 * 1024
"""Largest chunk read from the backend at once, so the largest frame sent."""
IOV_BATCH = 512
"""Buffers per ``sendmsg`` call, well under the kernel's IOV_MAX (1024)."""
CLOSE_TIMEOUT = 10.0
"""How long the browser has to answer our close frame before its socket is closed."""
RESET_CHECK = 1.0
"""Seconds between checks of a paused browser socket's TCP state."""
_TCP_CLOSE = 7  # tcp_info.tcpi_state after a reset (linux/tcp_states.h)

@dataclass
class TunnelStats:
    """What a tunnel carried; logged when it closes."""

    peer: str
    target: str
    started: float = field(default_factory=time.monotonic)
    bytes_up: int = 0  # browser -> backend
    bytes_down: int = 0  # backend -> browser


class TunnelState(enum.IntEnum):
    """Where a tunnel is in its life; ordered, so ``state >= STOPPED`` reads "ended"."""

    CONNECTING = 0  # the websocket is open, the backend not connected yet
    RELAYING = 1  # both connections open: bytes flow
    STOPPED = 2  # relays nothing more; the close handshake may still be under way
    CLOSED = 3  # the browser's connection is gone


_TRANSITIONS = {TunnelState.CONNECTING: {TunnelState.RELAYING, TunnelState.STOPPED},
                TunnelState.RELAYING: {TunnelState.STOPPED},
                TunnelState.STOPPED: {TunnelState.CLOSED}, TunnelState.CLOSED: set()}
_CONNECTING, _RELAYING, _STOPPED, _CLOSED = TunnelState
_CLOSE_OPCODE = 0x8


def _sent_reason(transport: WSTransport) -> str:
    """Why picows closed the websocket by itself (a protocol error it found), if it did."""
    sent = transport.close_handshake.sent if transport.close_handshake else None
    return f"closed with {sent.code.value}: {sent.reason}" if sent is not None else ""


class Tunnel(WSListener):
    """One websocket relayed to one TCP backend.

    picows calls the ``on_ws_*`` methods; the owner calls :meth:`connect` once the
    websocket is open, then awaits :attr:`closed`, which resolves when the browser's
    connection is gone (by then the backend socket is closed too). What the tunnel
    holds (a limit's slot) is given back earlier, see :meth:`when_stopped`.
    """

    __slots__ = ("stats", "reason", "backend_ended", "on_backend_end", "rfb", "_held", "closed",
                 "state", "_checker", "_loop", "_ws", "_browser", "_browser_paused", "_sock",
                 "_fd", "_reading", "_writing", "_up", "_close_timer", "_on_stop",
                 "_unparsed", "_reset_timer")

    def __init__(self, stats: TunnelStats, max_message: int, budget: UpstreamBudget) -> None:
        super().__init__()
        self.stats = stats
        self.reason = ""  # why the tunnel ended, for the log: the first cause wins
        self.backend_ended = False  # the service closed or lost its connection first
        # set by an owner that explains a backend's end itself (a Slurm job's state): the
        # tunnel then stops relaying but holds its close frame until the owner's close()
        self.on_backend_end: Callable[[], None] | None = None
        self.rfb: RfbFilter | None = None  # an RFB service's: a viewer's, an owner's at first
        self._held = False  # a close frame held for on_backend_end's owner
        self.state = _CONNECTING
        self._checker = FrameChecker(max_message)
        self._up = UpstreamQueue(budget)
        self._unparsed = 0  # bytes picows holds that are not a whole frame yet
        self._reset_timer: asyncio.TimerHandle | None = None
        self._loop = asyncio.get_running_loop()
        self.closed: asyncio.Future[None] = self._loop.create_future()
        self._ws: WSTransport | None = None
        self._browser: asyncio.Transport | None = None
        self._browser_paused = False
        self._sock: socket.socket | None = None
        self._fd = -1
        self._reading = False  # the backend socket is watched for reading
        self._writing = False  # unsent data waits for the backend socket
        self._close_timer: asyncio.TimerHandle | None = None
        self._on_stop: Callable[[], None] | None = None

    # -- the owner's side -----------------------------------------------------------

    def _move(self, state: TunnelState) -> None:
        assert state in _TRANSITIONS[self.state], f"{self.state.name} -> {state.name}"
        self.state = state

    async def connect(self, host: str, port: int,
                      timeout: float = backend.CONNECT_TIMEOUT) -> None:
        """Open the backend connection, or raise :class:`~.backend.BackendError`."""
        sock = await backend.connect(host, port, timeout)
        if self.state is not _CONNECTING:
            sock.close()  # the browser left, or the tunnel was closed, meanwhile
            return
        self._move(_RELAYING)
        self._sock = sock
        self._up.connected = True
        self._fd = sock.fileno()
        self._start_reading()
        self._flush_upstream()
        if self._browser_paused and not self._writing:
            self._resume_browser()

    @property
    def stopped(self) -> bool:
        """The tunnel relays nothing more (it is closing, or closed)."""
        return self.state >= _STOPPED

    def when_stopped(self, callback: Callable[[], None]) -> None:
        """Call ``callback`` once, as soon as the tunnel relays nothing more: before its
        close frame or FIN reaches the browser, so that a client which reconnects at
        once finds the slot it held free (at once if it already stopped)."""
        if self.state >= _STOPPED:
            callback()
        else:
            self._on_stop = callback

    def close(self, code: WSCloseCode, reason: str) -> None:
        """End the tunnel: close the backend, send a close frame, await the answer."""
        held, self._held = self._held, False
        ws = self._ws if self.state < _STOPPED or held else None  # None: no close frame
        self._stop(reason)
        if ws is None:
            return
        ws.send_close(code, close_reason(reason))
        if self._browser_paused:
            self._resume_browser()  # to read the browser's answering close frame
        self._close_timer = self._loop.call_later(CLOSE_TIMEOUT, ws.disconnect)

    def _stop(self, reason: str) -> None:
        """Relay nothing more: note why (the first cause wins), close the backend."""
        if not self.reason:
            self.reason = reason
        if self.state >= _STOPPED:
            return
        self._move(_STOPPED)
        self._close_backend()
        callback, self._on_stop = self._on_stop, None
        if callback is not None:
            callback()

    # -- picows callbacks -------------------------------------------------------------

    def on_ws_connected(self, transport: WSTransport) -> None:
        self._ws = transport
        self._browser = browser = transport.underlying_transport
        browser.set_write_buffer_limits(high=HIGH_WATER)

    def on_ws_disconnected(self, transport: WSTransport) -> None:
        self._stop(_sent_reason(transport) or "browser connection lost")
        if self._close_timer is not None:
            self._close_timer.cancel()
        if self._reset_timer is not None:
            self._reset_timer.cancel()
        self._up.end()
        self._move(_CLOSED)
        self.closed.set_result(None)

    def pause_writing(self) -> None:
        """The browser's transport holds more than HIGH_WATER: stop reading the backend."""
        self._up.filled()
        if self._reading:
            self._reading = False
            self._loop.remove_reader(self._fd)

    def resume_writing(self) -> None:
        pong = self._up.drained()
        if pong is not None and self._ws is not None and not self._ws.is_close_frame_sent:
            self._ws.send_pong(pong)
        if self._sock is not None and not self._reading and self.state < _STOPPED:
            self._start_reading()

    # -- what picows holds: called by its protocol around each read (live.py) ------

    def received(self, size: int) -> None:
        """``size`` bytes of the browser's were given to picows."""
        self._unparsed += size

    def parsed(self) -> None:
        """picows has made frames of what it could: the rest it holds is charged."""
        if not self._up.held(self._unparsed):
            self._overflow()

    def _overflow(self) -> None:
        """Closing without waiting for the browser's answer: it is still sending."""
        ws = self._ws if self.state < _STOPPED else None
        reason = f"upstream buffer of {self._up.budget.limit} bytes exhausted"
        self._stop(reason)
        if ws is not None:
            ws.send_close(WSCloseCode.MESSAGE_TOO_BIG, close_reason(reason))
            ws.disconnect()

    def on_ws_frame(self, transport: WSTransport, frame: WSFrame) -> None:
        self._unparsed -= frame_size(frame.payload_size)
        if self.state >= _STOPPED or transport.is_close_frame_sent:
            self._after_close(transport, frame)
            return
        data = frame.get_payload_as_bytes()
        verdict = self._checker.check(frame.msg_type,  # type: ignore[arg-type]  # an IntEnum
                                      frame.fin, frame.rsv1 or frame.rsv2 or frame.rsv3, data)
        if verdict is FORWARD:
            if self.rfb is not None:
                data = self.rfb.upstream(data)  # b"" what a viewer may not send
            self.stats.bytes_up += len(data)
            if data and self._up.append(data) and not self._browser_paused:
                self._pause_browser()  # still connecting: HIGH_WATER bytes are held
            if frame.last_in_buffer:
                self._flush_upstream()  # what one read of the browser brought: one sendmsg
            return
        kind = type(verdict)
        if kind is Pong:
            self._answer_ping(transport, data)
        elif kind is Closed:
            self._flush_upstream()
            self._stop("browser closed the websocket")
            transport.send_close(WSCloseCode.OK)
            transport.disconnect()
            return
        elif kind is Fail:
            assert isinstance(verdict, Fail)
            self._stop(f"protocol error: {verdict.reason}")
            # picows sends the close frame and disconnects, as for its own errors
            raise WSProtocolError(WSCloseCode(verdict.code), verdict.reason)
        if frame.last_in_buffer and self._up.batch:
            self._flush_upstream()

    def _after_close(self, transport: WSTransport, frame: WSFrame) -> None:
        """A close frame went out: only the answer to it matters. (picows parses one
        frame ahead, so a frame may come after the close it sent for the next one.)"""
        self._stop(_sent_reason(transport))
        if frame.msg_type == _CLOSE_OPCODE:  # type: ignore[comparison-overlap]  # IntEnum
            transport.disconnect()

    def _answer_ping(self, transport: WSTransport, payload: bytes) -> None:
        if self._up.ping(payload):  # else owed until the browser reads again
            transport.send_pong(payload)

    # -- upstream: browser -> backend -----------------------------------------------

    def closed_twice(self) -> None:
        """The browser's close frame came with another close behind it (see
        ``tunnels._PicowsLog``): answer the first as usual, ignore the second."""
        ws = self._ws
        if ws is None or ws.is_close_frame_sent or ws.close_handshake is None:
            return
        first = ws.close_handshake.recv
        code = first.code.value if first is not None else -1
        if code == 0 and first is not None and first.reason:
            return  # an explicit code 0 with a reason: invalid, picows' 1002 is right
        if code != 0 and not wire_close_code(code):  # 0, empty: no code (picows reads
            return  # an explicit code 0 alike); an invalid one: picows' 1002 is right
        self._flush_upstream()
        self._stop("browser closed the websocket")
        ws.send_close(WSCloseCode.OK)

    def _pause_browser(self) -> None:
        self._browser_paused = True
        self._browser.pause_reading()  # type: ignore[union-attr]
        self._reset_timer = self._loop.call_later(RESET_CHECK, self._check_reset)

    def _check_reset(self) -> None:
        """A paused socket is not polled, so a reset would go unseen until the backend
        drains: look at its TCP state instead."""
        self._reset_timer = None
        browser = self._browser
        if not self._browser_paused or browser is None or browser.is_closing():
            return
        sock = browser.get_extra_info("socket")
        try:
            state = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 1)[0]
        except (AttributeError, OSError):
            return
        if state == _TCP_CLOSE:
            self._stop("browser connection reset")
            browser.abort()
        else:
            self._reset_timer = self._loop.call_later(RESET_CHECK, self._check_reset)

    def _resume_browser(self) -> None:
        self._browser_paused = False
        if self._reset_timer is not None:
            self._reset_timer.cancel()
            self._reset_timer = None
        browser = self._browser
        if browser is not None and not browser.is_closing():
            browser.resume_reading()

    def inject(self, data: bytes) -> None:  # the proxy's own bytes: a VNC login's answer
        self._up.append(data)
        self._flush_upstream()

    def _flush_upstream(self) -> None:
        up = self._up
        if not up.batch or self._sock is None:
            return
        if up.flush():
            self._send_unsent()
        if up.unsent_bytes and not up.charge():
            self._overflow()

    def _send_unsent(self) -> None:
        """Write what the backend socket takes; wait for writability for the rest."""
        up = self._up
        unsent = up.unsent
        sendmsg = self._sock.sendmsg  # type: ignore[union-attr]
        while unsent:
            chunk = unsent[:IOV_BATCH]
            try:
                sent = sendmsg(chunk)
            except (BlockingIOError, InterruptedError):
                break
            except OSError as exc:
                up.clear()
                self._backend_lost(exc)
                return
            if not up.advance(sent, chunk):
                break  # the socket is full
        if unsent and not self._writing:
            self._writing = True
            self._loop.add_writer(self._fd, self._on_writable)
            if not self._browser_paused:
                self._pause_browser()

    def _on_writable(self) -> None:
        self._send_unsent()
        self._up.charge()  # less waits now: a refund, never refused
        if not self._up.unsent and self._sock is not None:
            self._writing = False
            self._loop.remove_writer(self._fd)
            if self._browser_paused:
                self._resume_browser()

    # -- downstream: backend -> browser ---------------------------------------------

    def _start_reading(self) -> None:
        self._reading = True
        self._loop.add_reader(self._fd, self._on_readable)

    def _on_readable(self) -> None:
        try:
            data = self._sock.recv(READ_SIZE)  # type: ignore[union-attr]
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            self._backend_lost(exc)
            return
        size = len(data)
        if not size:
            self._backend_end(WSCloseCode.OK, "backend closed the connection")
            return
        self.stats.bytes_down += size
        if self.rfb is not None:  # an RFB handshake: read, maybe rewritten
            data = self.rfb.downstream(data)
            size = len(data)
        if size:
            self._browser.writelines((frame_header(size), data))  # type: ignore[union-attr]

    def _backend_lost(self, exc: OSError) -> None:
        self._backend_end(WSCloseCode.INTERNAL_ERROR, f"backend connection lost: {exc}")

    def _backend_end(self, code: WSCloseCode, reason: str) -> None:
        self.backend_ended = True
        explain, self.on_backend_end = self.on_backend_end, None
        if explain is None or self.state >= _STOPPED:
            return self.close(code, reason)
        self._held = self._ws is not None
        self._stop(reason)
        explain()

    def _close_backend(self) -> None:
        sock = self._sock
        if sock is not None:
            self._sock = None
            if self._reading:
                self._loop.remove_reader(self._fd)
            if self._writing:
                self._loop.remove_writer(self._fd)
            self._reading = self._writing = False
            self._up.clear()
            sock.close()
