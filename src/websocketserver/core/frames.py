"""RFC 6455 frame rules, without I/O: what to do with each frame a browser sends.

picows parses the bytes of a frame (header, mask, length) in C; everything else that
RFC 6455 asks of a server is decided here, by :class:`FrameChecker`, from plain
values: the opcode, the FIN and RSV bits, the payload. It answers with a
:class:`Verdict`; the tunnel (``tunnel.py``) does what it says. Tests drive it with
values decoded from bytes, no socket (``tests/test_frames.py``).

The frames this server sends are built here too: :func:`frame_header` for the binary
frames that carry the backend's bytes, :func:`close_reason` for close reasons.
"""

from __future__ import annotations

import codecs
import struct
from dataclasses import dataclass

CONTINUATION, TEXT, BINARY, CLOSE, PING, PONG = 0x0, 0x1, 0x2, 0x8, 0x9, 0xA
_CONTROL = (CLOSE, PING, PONG)

PROTOCOL_ERROR, INVALID_TEXT, MESSAGE_TOO_BIG = 1002, 1007, 1009
MAX_CONTROL = 125  # payload bytes allowed in a control frame (RFC 6455 5.5)
MAX_REASON = 123  # bytes allowed in a close reason


@dataclass(frozen=True, slots=True)
class Forward:
    """Relay the payload to the backend."""


@dataclass(frozen=True, slots=True)
class Ignore:
    """Nothing to do (a pong)."""


@dataclass(frozen=True, slots=True)
class Pong:
    """Answer a ping with this payload."""

    payload: bytes


@dataclass(frozen=True, slots=True)
class Closed:
    """The browser closed the websocket with a valid close frame: answer it, end."""

    code: int | None


@dataclass(frozen=True, slots=True)
class Fail:
    """The frame breaks a rule: close with ``code`` and ``reason``, end."""

    code: int
    reason: str


Verdict = Forward | Ignore | Pong | Closed | Fail
FORWARD = Forward()
IGNORE = Ignore()


def wire_close_code(code: int) -> bool:
    """Whether a peer may send this close code (RFC 6455 7.4.1, IANA registry)."""
    return 1000 <= code <= 1003 or 1007 <= code <= 1014 or 3000 <= code <= 4999


class FrameChecker:
    """The rules for one websocket's frames from the browser, in the order they come.

    State is what a message spans: whether a fragmented message is open, its size so
    far, and, for text, the UTF-8 decoder that checks it as fragments arrive (a text
    message must be UTF-8 as a whole, RFC 6455 8.1).
    """

    __slots__ = ("max_message", "_message", "_text")

    def __init__(self, max_message: int) -> None:
        self.max_message = max_message
        self._message: int | None = None  # size so far of an open fragmented message
        self._text: codecs.IncrementalDecoder | None = None

    def check(self, opcode: int, fin: bool, rsv: bool, payload: bytes) -> Verdict:
        """The verdict on one frame; ``rsv``: any reserved bit is set."""
        if rsv:
            return Fail(PROTOCOL_ERROR, "reserved bits set")
        if opcode == BINARY or opcode == TEXT:
            return self._first(opcode, fin, payload)
        if opcode == CONTINUATION:
            return self._continuation(fin, payload)
        if opcode not in _CONTROL:
            return Fail(PROTOCOL_ERROR, f"unknown opcode {opcode}")
        if not fin:
            return Fail(PROTOCOL_ERROR, "fragmented control frame")
        if len(payload) > MAX_CONTROL:
            return Fail(PROTOCOL_ERROR, f"control frame over {MAX_CONTROL} bytes")
        if opcode == PING:
            return Pong(payload)
        if opcode == CLOSE:
            return _close(payload)
        return IGNORE

    def _first(self, opcode: int, fin: bool, payload: bytes) -> Verdict:
        if self._message is not None:
            return Fail(PROTOCOL_ERROR, "new message inside a fragmented one")
        if len(payload) > self.max_message:
            return Fail(MESSAGE_TOO_BIG, f"message over {self.max_message} bytes")
        if opcode == TEXT:
            if fin:
                try:
                    payload.decode("utf-8")
                except UnicodeDecodeError:
                    return Fail(INVALID_TEXT, "text is not UTF-8")
                return FORWARD
            self._text = codecs.getincrementaldecoder("utf-8")()
            if not self._valid_text(payload, False):
                return Fail(INVALID_TEXT, "text is not UTF-8")
        if not fin:
            self._message = len(payload)
        return FORWARD

    def _continuation(self, fin: bool, payload: bytes) -> Verdict:
        if self._message is None:
            return Fail(PROTOCOL_ERROR, "continuation without a message")
        self._message += len(payload)
        if self._message > self.max_message:
            return Fail(MESSAGE_TOO_BIG, f"message over {self.max_message} bytes")
        if self._text is not None and not self._valid_text(payload, fin):
            return Fail(INVALID_TEXT, "text is not UTF-8")
        if fin:
            self._message = self._text = None
        return FORWARD

    def _valid_text(self, payload: bytes, final: bool) -> bool:
        try:
            self._text.decode(payload, final)  # type: ignore[union-attr]
        except UnicodeDecodeError:
            return False
        return True


def _close(payload: bytes) -> Verdict:
    if not payload:
        return Closed(None)
    if len(payload) == 1:
        return Fail(PROTOCOL_ERROR, "close frame of one byte")
    code = int.from_bytes(payload[:2], "big")
    if not wire_close_code(code):
        return Fail(PROTOCOL_ERROR, f"close code {code}")
    try:
        payload[2:].decode("utf-8")
    except UnicodeDecodeError:
        return Fail(INVALID_TEXT, "close reason is not UTF-8")
    return Closed(code)


def frame_size(payload: int) -> int:
    """Bytes a masked client frame with ``payload`` bytes takes on the wire (lengths not
    in their shortest form are refused by picows, so this is exact)."""
    return payload + (6 if payload < 126 else 8 if payload < 65536 else 14)


def close_reason(text: str) -> bytes:
    """Encode ``text`` as a websocket close reason, cut to the protocol's limit."""
    data = text.encode("utf-8")
    if len(data) <= MAX_REASON:
        return data
    return data[: MAX_REASON - 3].decode("utf-8", "ignore").encode("utf-8") + b"..."


_HEADER_SHORT = struct.Struct("!BB").pack
_HEADER_MEDIUM = struct.Struct("!BBH").pack
_HEADER_LONG = struct.Struct("!BBQ").pack


def frame_header(length: int) -> bytes:
    """The header of a final, unmasked binary frame of ``length`` bytes (RFC 6455 5.2)."""
    if length < 126:
        return _HEADER_SHORT(0x82, length)
    if length < 65536:
        return _HEADER_MEDIUM(0x82, 126, length)
    return _HEADER_LONG(0x82, 127, length)
