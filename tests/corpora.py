"""The byte corpora of the bad-input tests, and the hand-built frames they are made of.

The end-to-end tests (``e2e/test_bad_input.py``, ``e2e/test_fuzz.py``) send these bytes
to a server process; the unit tests (``test_frames.py``, ``test_protocol.py``) feed the
same bytes to the frame rules and the upgrade decision in-process.
"""

from __future__ import annotations

import struct

MAX_MESSAGE = 1024
"""``--max_message_size`` of the servers the corpora are sent to."""
WS_KEY = b"dGhlIHNhbXBsZSBub25jZQ=="  # the sample key of RFC 6455
OP_CONT, OP_TEXT, OP_BINARY, OP_CLOSE, OP_PING, OP_PONG = 0, 1, 2, 8, 9, 10
NORMAL, PROTOCOL_ERROR, INVALID_DATA, TOO_BIG = 1000, 1002, 1007, 1009

# -- frames and upgrade requests built by hand ----------------------------------------


def mask_payload(payload: bytes, key: bytes) -> bytes:
    """``payload`` XOR the repeated 4-byte ``key`` (RFC 6455 §5.3)."""
    size = len(payload)
    stream = (key * (size // 4 + 1))[:size]
    return (int.from_bytes(payload) ^ int.from_bytes(stream)).to_bytes(size)


def frame(opcode: int, payload: bytes = b"", *, fin: bool = True, rsv: int = 0,
          mask: bytes | None = b"\x37\xfa\x21\x3d", length: int | None = None,
          form: int | None = None) -> bytes:
    """One websocket frame, built by hand.

    ``form`` is the length encoding (7, 16 or 64 bits; the shortest by default),
    ``length`` a declared payload length other than the real one, ``mask`` the
    masking key (None: an unmasked frame).
    """
    declared = len(payload) if length is None else length
    form = form or (7 if declared < 126 else 16 if declared < 65536 else 64)
    mask_bit = 0x80 if mask is not None else 0
    head = bytes([(0x80 if fin else 0) | rsv << 4 | opcode])
    if form == 7:
        head += bytes([mask_bit | declared])
    elif form == 16:
        head += bytes([mask_bit | 126]) + struct.pack("!H", declared)
    else:
        head += bytes([mask_bit | 127]) + struct.pack("!Q", declared)
    if mask is None:
        return head + payload
    return head + mask + mask_payload(payload, mask)


def close_payload(code: int, reason: bytes = b"") -> bytes:
    return struct.pack("!H", code) + reason


def upgrade_request(path: bytes = b"/websockify", *, version: bytes = b"HTTP/1.1",
                    headers: bytes | None = None) -> bytes:
    """A websocket upgrade request; ``headers`` replaces the usual upgrade headers."""
    if headers is None:
        headers = (b"Upgrade: websocket\r\nConnection: Upgrade\r\n"
                   b"Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: " + WS_KEY + b"\r\n")
    return b"GET " + path + b" " + version + b"\r\nHost: 127.0.0.1\r\n" + headers + b"\r\n"


# -- bad websocket upgrades: request, status ------------------------------------------

_UPGRADE_ONLY = b"Upgrade: websocket\r\n"
_CONNECTION = b"Connection: Upgrade\r\n"
_UPGRADE = _UPGRADE_ONLY + _CONNECTION
_VERSION = b"Sec-WebSocket-Version: 13\r\n"
_KEY = b"Sec-WebSocket-Key: " + WS_KEY + b"\r\n"
UPGRADE_HEADERS = _UPGRADE + _VERSION + _KEY
"""The headers of a valid upgrade request."""
BAD_UPGRADES = {  # request, status (JSON {"error"} but for the router's 405)
    # not a websocket request (version 13): 426
    "plain GET": (upgrade_request(headers=b""), 426),
    "Upgrade: h2c": (upgrade_request(headers=b"Upgrade: h2c\r\n" + _CONNECTION + _VERSION
                                     + _KEY), 426),
    "no Upgrade header": (upgrade_request(headers=_CONNECTION + _VERSION + _KEY), 426),
    "non-ASCII Upgrade": (upgrade_request(headers=b"Upgrade: w\xe9bsocket\r\n" + _CONNECTION
                                          + _VERSION + _KEY), 426),
    "no Sec-WebSocket-Version": (upgrade_request(headers=_UPGRADE + _KEY), 426),
    "version 12": (upgrade_request(headers=_UPGRADE + b"Sec-WebSocket-Version: 12\r\n" + _KEY),
                   426),
    "version 14": (upgrade_request(headers=_UPGRADE + b"Sec-WebSocket-Version: 14\r\n" + _KEY),
                   426),
    "version not a number": (upgrade_request(headers=_UPGRADE + b"Sec-WebSocket-Version: abc"
                                             b"\r\n" + _KEY), 426),
    "non-ASCII Sec-WebSocket-Version": (upgrade_request(
        headers=_UPGRADE + b"Sec-WebSocket-Version: \xff\r\n" + _KEY), 426),
    # a websocket request that is malformed: 400
    "no Connection: Upgrade": (upgrade_request(headers=_UPGRADE_ONLY + _VERSION + _KEY), 400),
    "non-ASCII Connection": (upgrade_request(headers=_UPGRADE_ONLY + b"Connection: \xff\r\n"
                                             + _VERSION + _KEY), 400),
    "no Sec-WebSocket-Key": (upgrade_request(headers=_UPGRADE + _VERSION), 400),
    "key of 5 bytes": (upgrade_request(headers=_UPGRADE + _VERSION
                                       + b"Sec-WebSocket-Key: c2hvcnQ=\r\n"), 400),
    "key not base64": (upgrade_request(headers=_UPGRADE + _VERSION
                                       + b"Sec-WebSocket-Key: !!!!!!!!!!!!!!!!!!!!!!!!\r\n"),
                       400),
    "non-ASCII key": (upgrade_request(headers=_UPGRADE + _VERSION
                                      + b"Sec-WebSocket-Key: \xc3\xa9\xc3\xa9\r\n"), 400),
    "upgrade over HTTP/1.0": (upgrade_request(version=b"HTTP/1.0"), 400),
    # refused for what it asks for
    "POST upgrade": (upgrade_request().replace(b"GET", b"POST", 1), 405),
    "HEAD upgrade": (upgrade_request().replace(b"GET", b"HEAD", 1), 405),
    "unknown token": (upgrade_request(b"/websockify?token=nope"), 404),
    "empty token": (upgrade_request(b"/websockify?token="), 404),
    "non-UTF-8 token escape": (upgrade_request(b"/websockify?token=%ff"), 404),
}


# -- invalid frames after a valid handshake: bytes, close code --------------------------

_C = close_payload
INVALID_FRAMES = {  # bytes after the handshake, the server's close code
    "RSV1 without an extension": (frame(OP_BINARY, b"x", rsv=4), PROTOCOL_ERROR),
    "RSV2": (frame(OP_BINARY, b"x", rsv=2), PROTOCOL_ERROR),
    "RSV3": (frame(OP_BINARY, b"x", rsv=1), PROTOCOL_ERROR),
    "RSV bits on a ping": (frame(OP_PING, b"x", rsv=2), PROTOCOL_ERROR),
    "opcode 3": (frame(3, b"x"), PROTOCOL_ERROR),
    "opcode 7": (frame(7), PROTOCOL_ERROR),
    "opcode 0xB": (frame(0xB, b"x"), PROTOCOL_ERROR),
    "opcode 0xF": (frame(0xF), PROTOCOL_ERROR),
    "ping of 126 bytes": (frame(OP_PING, b"p" * 126), PROTOCOL_ERROR),
    "pong of 126 bytes": (frame(OP_PONG, b"p" * 126), PROTOCOL_ERROR),
    "close of 126 bytes": (frame(OP_CLOSE, _C(NORMAL, b"r" * 124)), PROTOCOL_ERROR),
    "short ping in a 16-bit length": (frame(OP_PING, b"p", form=16), PROTOCOL_ERROR),
    "fragmented ping": (frame(OP_PING, b"p", fin=False), PROTOCOL_ERROR),
    "fragmented close": (frame(OP_CLOSE, _C(NORMAL), fin=False), PROTOCOL_ERROR),
    "close with a 1-byte payload": (frame(OP_CLOSE, b"\x03"), PROTOCOL_ERROR),
    "close code 0": (frame(OP_CLOSE, _C(0)), PROTOCOL_ERROR),
    "close code 999": (frame(OP_CLOSE, _C(999)), PROTOCOL_ERROR),
    "close code 1004": (frame(OP_CLOSE, _C(1004)), PROTOCOL_ERROR),
    "close code 1005": (frame(OP_CLOSE, _C(1005)), PROTOCOL_ERROR),
    "close code 1015": (frame(OP_CLOSE, _C(1015)), PROTOCOL_ERROR),
    "close code 1016": (frame(OP_CLOSE, _C(1016)), PROTOCOL_ERROR),
    "close code 2999": (frame(OP_CLOSE, _C(2999)), PROTOCOL_ERROR),
    "continuation without a message": (frame(OP_CONT, b"x"), PROTOCOL_ERROR),
    "new message inside a fragmented one": (frame(OP_BINARY, b"a", fin=False)
                                            + frame(OP_TEXT, b"b"), PROTOCOL_ERROR),
    "new fragmented message inside one": (frame(OP_BINARY, b"a", fin=False)
                                          + frame(OP_BINARY, b"b", fin=False), PROTOCOL_ERROR),
    "invalid UTF-8 text": (frame(OP_TEXT, b"\xff\xfe"), INVALID_DATA),
    "overlong UTF-8 text": (frame(OP_TEXT, b"\xc0\xaf"), INVALID_DATA),
    "UTF-16 surrogate in text": (frame(OP_TEXT, b"\xed\xa0\x80"), INVALID_DATA),
    "text ending mid-character": (frame(OP_TEXT, b"a\xce"), INVALID_DATA),
    "invalid UTF-8 across fragments": (frame(OP_TEXT, b"\xce", fin=False)
                                       + frame(OP_CONT, b"\xff"), INVALID_DATA),
    "invalid UTF-8 close reason": (frame(OP_CLOSE, _C(NORMAL, b"\xff\xfe")), INVALID_DATA),
    "message of --max_message_size + 1": (frame(OP_BINARY, b"x" * (MAX_MESSAGE + 1)),
                                          TOO_BIG),
    "fragments adding up to --max_message_size + 1": (
        frame(OP_TEXT, b"x" * (MAX_MESSAGE // 2), fin=False)
        + frame(OP_CONT, b"x" * (MAX_MESSAGE // 2 + 1)), TOO_BIG),
    "declared length 2**40": (frame(OP_BINARY, length=1 << 40), TOO_BIG),
    # RFC 6455 §5.2: "the most significant bit MUST be 0"; "the minimal number of bytes
    # MUST be used to encode the length"
    "declared length with the top bit set": (frame(OP_BINARY, length=1 << 63), PROTOCOL_ERROR),
    "declared length 2**64-1": (frame(OP_TEXT, length=(1 << 64) - 1), PROTOCOL_ERROR),
    "short length in 16 bits": (frame(OP_BINARY, b"abc", form=16), PROTOCOL_ERROR),
    "short length in 64 bits": (frame(OP_BINARY, b"abc", form=64), PROTOCOL_ERROR),
    "16-bit length in 64 bits": (frame(OP_BINARY, b"x" * 200, form=64), PROTOCOL_ERROR),
    "unmasked client frame": (frame(OP_BINARY, b"x", mask=None), PROTOCOL_ERROR),
    "new message after an empty first fragment": (frame(OP_BINARY, b"", fin=False)
                                                  + frame(OP_BINARY, b"new"), PROTOCOL_ERROR),
    "close code 1006": (frame(OP_CLOSE, _C(1006)), PROTOCOL_ERROR),
    "close code 5000": (frame(OP_CLOSE, _C(5000)), PROTOCOL_ERROR),
}


VALID_EDGES = {  # bytes after the handshake, expected pongs, expected echo
    "ping": (frame(OP_PING, b"hello"), [b"hello"], b""),
    "empty ping": (frame(OP_PING), [b""], b""),
    "ping of 125 bytes": (frame(OP_PING, b"p" * 125), [b"p" * 125], b""),
    "unsolicited pong": (frame(OP_PONG, b"q") + frame(OP_BINARY, b"after"), [], b"after"),
    "ping inside a fragmented message": (frame(OP_BINARY, b"ab", fin=False)
                                         + frame(OP_PING, b"p") + frame(OP_CONT, b"cd"),
                                         [b"p"], b"abcd"),
    "UTF-8 character split across fragments": (frame(OP_TEXT, b"\xce", fin=False)
                                               + frame(OP_CONT, b"\xba"), [], b"\xce\xba"),
    "empty fragments around data": (frame(OP_TEXT, b"", fin=False) + frame(OP_CONT, b"x",
                                    fin=False) + frame(OP_CONT, b""), [], b"x"),
    "message of --max_message_size": (frame(OP_BINARY, b"m" * MAX_MESSAGE), [],
                                      b"m" * MAX_MESSAGE),
    "fragments adding up to --max_message_size": (
        frame(OP_BINARY, b"m" * (MAX_MESSAGE // 2), fin=False)
        + frame(OP_CONT, b"m" * (MAX_MESSAGE // 2)), [], b"m" * MAX_MESSAGE),
}
