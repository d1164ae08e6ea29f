"""The RFB (VNC) bytes a browser sends, without I/O: what to forward to the VNC server.

A :class:`ClientStream` is fed the browser's bytes in whatever pieces websocket frames
bring them and answers with exactly the bytes to forward, in order, or a
:class:`Violation` (close the websocket with its code, end). It follows the protocol
(``rfbproto.rst``, RFC 6143) from the client's side:

* **ProtocolVersion**: 3.3, 3.7 or 3.8; anything else is a violation.
* **Security**: only None (1) and VNC Authentication (2) can be followed (the proxy
  negotiates no other). What the browser sends here depends on the server (in 3.3 the
  server picks the type; in 3.7 and 3.8 the browser picks one the server offered), so
  the stream also reads the server's handshake: :meth:`ClientStream.feed_server` is
  given the server's bytes as the browser gets them, up to its security types, and
  *before* they are relayed to the browser. A browser cannot answer bytes it has not
  received, so a browser that sends anything while the stream waits for the server is
  a violation, and no browser bytes are ever held waiting for the server.
  (``needs_server`` says when the server's bytes are no longer wanted.)
* **ClientInit**: always forwarded as ``b"\\x01"``, every client shares the desktop.
* **Messages**, by mode. ``"owner"``: after ClientInit every byte passes untouched and
  unparsed (``passthrough``: the caller may stop calling :meth:`~ClientStream.feed`).
  ``"view"``: every message is parsed; the ones in ``ALLOWED`` (pixel format,
  encodings, update requests, continuous updates, fences) pass, the ones in
  ``DROPPED`` (input, clipboard, resizing, power, gii, QEMU) are removed whole and
  counted in ``dropped``, an unknown type is a violation. A message's type is known
  from its first byte, so no byte of a dropped message is ever forwarded, however the
  stream is cut.

Bounds: the bytes that give a message's length (at most 9; the ProtocolVersion's 12)
are held until complete; the rest is then forwarded or skipped as it comes, never
held, so at most ``MAX_BUFFERED`` browser bytes are held between feeds (of the
server's handshake: at most 256). A ClientCutText over
``MAX_CUT_TEXT`` or a ClientFence over ``MAX_FENCE`` bytes is a violation; gii
messages are bounded by their 16-bit length.

A PointerEvent is 7 bytes instead of 6 when its top button bit is set and the browser
has declared the ExtendedMouseButtons pseudo-encoding (-316) in a SetEncodings, as a
server supporting it reads it (rfbproto, ExtendedMouseButtons); so SetEncodings bodies
are scanned for it.
"""

from __future__ import annotations

import re
import struct
from dataclasses import dataclass
from typing import Literal

POLICY_VIOLATION, BAD_GATEWAY = 1008, 1014
"""Close codes: the browser broke the protocol; the VNC server did (RFC 6455 7.4.1)."""
VERSIONS = {b"RFB 003.003\n": 3, b"RFB 003.007\n": 7, b"RFB 003.008\n": 8}
"""The versions a browser may ask for, and their minor number."""
SECURITY_NONE, SECURITY_VNC = 1, 2
"""The security types that can be followed."""
MAX_CUT_TEXT = 16 << 20
"""Bytes of a ClientCutText's text (or extended clipboard data) allowed."""
MAX_FENCE = 64
"""Payload bytes allowed in a ClientFence (rfbproto, ClientFence)."""
MAX_BUFFERED = 11
"""Browser bytes held between feeds, at most: a ProtocolVersion one byte short."""
EXTENDED_MOUSE_BUTTONS = -316
"""The pseudo-encoding after which a PointerEvent with its top bit set has 7 bytes."""

ALLOWED = {0: "SetPixelFormat", 2: "SetEncodings", 3: "FramebufferUpdateRequest",
           150: "EnableContinuousUpdates", 248: "ClientFence"}
"""Message types a viewer may send: they change what it sees, not the desktop."""
DROPPED = {4: "KeyEvent", 5: "PointerEvent", 6: "ClientCutText", 250: "xvp",
           251: "SetDesktopSize", 253: "gii", 255: "QEMU"}
"""Message types removed from a viewer's stream, counted by name."""

Mode = Literal["owner", "view"]

# A message type -> (bytes that give its length, its whole length if fixed).
_MESSAGES: dict[int, tuple[int, int | None]] = {
    0: (1, 20), 2: (4, None), 3: (1, 10), 4: (1, 8), 5: (2, None), 6: (8, None),
    150: (1, 10), 248: (9, None), 250: (1, 4), 251: (8, None), 253: (4, None),
    255: (4, None)}
_QEMU_AUDIO = {0: 0, 1: 0, 2: 6}  # operation -> body: enable, disable, sample format
_EXTENDED_MOUSE = struct.pack("!i", EXTENDED_MOUSE_BUTTONS)
_SERVER_VERSION = re.compile(rb"RFB \d{3}\.\d{3}\n")
_SHARED = b"\x01"

# Browser states; each reads a header of ``_need`` bytes.
_VERSION, _AWAIT, _SECURITY, _INIT, _MESSAGE, _PASS, _REFUSED, _FAILED = range(8)
# Server states.
_S_VERSION, _S_SECURITY, _S_DONE = range(3)


@dataclass(frozen=True, slots=True)
class Violation:
    """The stream breaks the protocol: close the websocket with ``code`` and ``reason``,
    end; nothing of the feed that brought it is forwarded."""

    code: int
    reason: str


def _browser(reason: str) -> Violation:
    return Violation(POLICY_VIOLATION, reason)


class ClientStream:
    """One browser's bytes to the VNC server, in the order they come.

    State is where the stream stands (a handshake step or a message), the header bytes
    held (``_head``, ``_need`` of them wanted) and, for a message's body, how many bytes
    are left (``_body``), whether they pass (``_keep``) and whether they are scanned
    for the ExtendedMouseButtons pseudo-encoding (``_scan``, ``_carry``: the start of
    an encoding cut by a feed).
    """

    __slots__ = ("mode", "version", "security", "offered", "dropped", "violation",
                 "_state", "_head", "_need", "_body", "_keep", "_scan", "_carry",
                 "_extended_mouse", "_server", "_server_head", "_server_need")

    def __init__(self, mode: Mode) -> None:
        self.mode = mode
        self.version: int | None = None  # the minor version the browser asked for
        self.security: int | None = None  # the agreed security type
        self.offered: frozenset[int] = frozenset()  # the server's types (3.7, 3.8)
        self.dropped = dict.fromkeys(DROPPED.values(), 0)
        self.violation: Violation | None = None
        self._state, self._head, self._need = _VERSION, bytearray(), 12
        self._body, self._keep, self._scan = 0, False, False
        self._carry = b""
        self._extended_mouse = False
        self._server, self._server_head, self._server_need = _S_VERSION, bytearray(), 12

    @property
    def passthrough(self) -> bool:
        """Every further byte passes untouched (owner mode, after ClientInit)."""
        return self._state == _PASS

    @property
    def needs_server(self) -> bool:
        """:meth:`feed_server` still wants the server's bytes."""
        return self._server != _S_DONE and self.violation is None

    @property
    def buffered(self) -> int:
        """Browser bytes held, of a header or an encoding cut by a feed."""
        return len(self._head) + len(self._carry)

    def feed(self, data: bytes) -> bytes | Violation:
        """The bytes to forward to the server for ``data`` from the browser."""
        if self._state == _PASS:
            return data
        if self.violation is not None:
            return self.violation
        out = bytearray()
        pos, end = 0, len(data)
        while pos < end:
            if self._body:
                take = min(self._body, end - pos)
                if self._keep:
                    chunk = data[pos:pos + take]
                    out += chunk
                    if self._scan:
                        self._scan_encodings(chunk)
                self._body -= take
                pos += take
                continue
            if self._state == _PASS:
                out += data[pos:]
                break
            take = min(self._need - len(self._head), end - pos)
            self._head += data[pos:pos + take]
            pos += take
            if len(self._head) < self._need:
                break
            step = self._step(bytes(self._head))
            if isinstance(step, Violation):
                return self._fail(step)
            out += step
        return bytes(out)

    def feed_server(self, data: bytes) -> Violation | None:
        """Read ``data`` from the server, before relaying it to the browser; bytes past
        the security types are ignored."""
        if not self.needs_server:
            return self.violation
        pos, end = 0, len(data)
        while pos < end and self._server != _S_DONE:
            take = min(self._server_need - len(self._server_head), end - pos)
            self._server_head += data[pos:pos + take]
            pos += take
            if len(self._server_head) < self._server_need:
                break
            failure = self._server_step(bytes(self._server_head))
            if failure is not None:
                return self._fail(failure)
        return None

    def _fail(self, violation: Violation) -> Violation:
        self.violation, self._state = violation, _FAILED
        self._head.clear()
        self._carry = b""
        return violation

    def _step(self, head: bytes) -> bytes | Violation:
        """What a complete header says; clears ``_head`` unless more is needed."""
        state = self._state
        if state == _MESSAGE:
            return self._message(head)
        self._head.clear()
        self._need = 1
        if state == _VERSION:
            self.version = VERSIONS.get(head)
            if self.version is None:
                return _browser(f"protocol version {head!r}")
            self._state = _AWAIT
            return head
        if state == _AWAIT:
            return _browser("bytes before the server's security types")
        if state == _REFUSED:
            return _browser("bytes after the server refused the connection")
        if state == _SECURITY:
            kind = head[0]
            if kind not in (SECURITY_NONE, SECURITY_VNC):
                return _browser(f"security type {kind} not supported")
            if kind not in self.offered:
                return _browser(f"security type {kind} not offered")
            self._agree(kind)
            return head
        self._state = _PASS if self.mode == "owner" else _MESSAGE
        return _SHARED  # ClientInit

    def _agree(self, kind: int) -> None:
        """Security ``kind`` agreed: a VNC Authentication response, then ClientInit."""
        self.security, self._state = kind, _INIT
        if kind == SECURITY_VNC:
            self._body, self._keep, self._scan = 16, True, False

    def _message(self, head: bytes) -> bytes | Violation:
        kind = head[0]
        shape = _MESSAGES.get(kind)
        if shape is None:
            return _browser(f"unknown message type {kind}")
        size, fixed = shape
        if len(head) < size:
            self._need = size
            return b""
        body = fixed - size if fixed is not None else self._body_size(kind, head)
        if isinstance(body, Violation):
            return body
        self._head.clear()
        self._need = 1
        self._body, self._keep = body, kind in ALLOWED
        self._scan = kind == 2 and not self._extended_mouse
        if self._keep:
            return head
        self.dropped[DROPPED[kind]] += 1
        return b""

    def _body_size(self, kind: int, head: bytes) -> int | Violation:
        """The body's size of a message of variable length, from its header."""
        if kind == 2:  # SetEncodings: padding, count, 4 bytes each
            return 4 * int.from_bytes(head[2:4])
        if kind == 5:  # PointerEvent: an extended one has a second button mask
            return 5 if head[1] & 0x80 and self._extended_mouse else 4
        if kind == 6:  # ClientCutText: negative for the extended clipboard
            length = abs(int.from_bytes(head[4:8], signed=True))
            if length > MAX_CUT_TEXT:
                return _browser(f"ClientCutText of {length} bytes")
            return length
        if kind == 248:  # ClientFence: padding, flags, length
            if head[8] > MAX_FENCE:
                return _browser(f"ClientFence of {head[8]} bytes")
            return head[8]
        if kind == 251:  # SetDesktopSize: padding, width, height, screens, padding
            return 16 * head[6]
        if kind == 253:  # gii: the top bit of the subtype says the length's byte order
            return int.from_bytes(head[2:4], "big" if head[1] & 0x80 else "little")
        submessage, operation = head[1], int.from_bytes(head[2:4])  # QEMU
        if submessage == 0:  # extended key event: down flag, keysym, keycode
            return 8
        if submessage != 1:
            return _browser(f"QEMU submessage {submessage}")
        if operation not in _QEMU_AUDIO:
            return _browser(f"QEMU audio operation {operation}")
        return _QEMU_AUDIO[operation]

    def _scan_encodings(self, chunk: bytes) -> None:
        words = self._carry + chunk
        whole = len(words) - len(words) % 4
        self._carry = words[whole:]
        if any(words[i:i + 4] == _EXTENDED_MOUSE for i in range(0, whole, 4)):
            self._extended_mouse, self._scan, self._carry = True, False, b""

    def _server_step(self, head: bytes) -> Violation | None:
        """What a complete piece of the server's handshake says; None: go on."""
        if self._server == _S_VERSION:
            if not _SERVER_VERSION.fullmatch(head):
                return Violation(BAD_GATEWAY, f"server protocol version {head!r}")
            self._server, self._server_need = _S_SECURITY, 1
            self._server_head.clear()
            return None
        if self._state != _AWAIT:
            return Violation(BAD_GATEWAY, "server security before the browser's version")
        size = 4 if self.version == 3 else 1 + head[0]  # 3.3: a type; else: count, types
        if len(head) < size:
            self._server_need = size
            return None
        self._server = _S_DONE
        if self.version == 3:
            kind = int.from_bytes(head)
            if kind not in (0, SECURITY_NONE, SECURITY_VNC):
                return Violation(BAD_GATEWAY, f"server chose security type {kind}")
            if kind:
                self._agree(kind)
        elif head[0]:
            self.offered, self._state = frozenset(head[1:]), _SECURITY
        if self._state == _AWAIT:  # a type of 0 or no types: the server refused
            self._state = _REFUSED
        return None


SERVER_VERSION = b"RFB 003.008\n"
"""What the proxy says first when it refuses an RFB page itself (see :func:`refusal`)."""


def refusal(client_version: bytes, reason: str) -> bytes | None:
    """The server's answer to ``client_version`` (the browser's 12 bytes) that refuses
    the connection with ``reason``: no security type, then the reason (3.7 and 3.8),
    or security type 0 and the reason (3.3). None: not an RFB version, no answer.

    Stock noVNC shows a refusal's reason only when it comes this way ("New connection
    has been rejected with reason: ..."); a websocket's close reason it does not show.
    """
    minor = VERSIONS.get(client_version)
    if minor is None:
        return None
    text = reason.encode("utf-8")
    return (b"\x00" if minor >= 7 else b"\x00\x00\x00\x00") + struct.pack("!I", len(text)) + text
