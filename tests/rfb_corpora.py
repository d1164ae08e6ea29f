"""RFB (VNC) conversations built by hand, for the browser-side parser (``test_rfb.py``).

A conversation is a list of turns: the bytes the server sends, then the bytes the
browser answers with. Handshakes follow rfbproto.rst for each version and security
type; the messages after ClientInit include every client message type the parser
knows, with the variants a real client (noVNC's ``core/rfb.js``) sends.
"""

from __future__ import annotations

import struct

Turn = tuple[bytes, bytes]  # (server's bytes, the browser's answer)

V33, V37, V38 = b"RFB 003.003\n", b"RFB 003.007\n", b"RFB 003.008\n"
CHALLENGE = bytes(range(100, 116))
RESPONSE = bytes(range(200, 216))
OK = struct.pack("!I", 0)  # SecurityResult
SERVER_INIT = struct.pack("!HHBBBBHHHBBBxxxI", 1024, 768, 32, 24, 0, 1, 255, 255, 255,
                          16, 8, 0, 7) + b"desktop"
EXTENDED_MOUSE_BUTTONS, EXTENDED_CLIPBOARD = -316, 0xC0A1E5CE - (1 << 32)


# -- client messages -------------------------------------------------------------------


def set_pixel_format(bpp: int = 32, depth: int = 24) -> bytes:
    return struct.pack("!Bxxx BBBB HHH BBB xxx", 0, bpp, depth, 0, 1, 255, 255, 255, 16, 8, 0)


def set_encodings(*encodings: int) -> bytes:
    return struct.pack(f"!BxH{len(encodings)}i", 2, len(encodings), *encodings)


def update_request(incremental: int, x: int, y: int, w: int, h: int) -> bytes:
    return struct.pack("!BBHHHH", 3, incremental, x, y, w, h)


def key_event(down: int, keysym: int) -> bytes:
    return struct.pack("!BBxxI", 4, down, keysym)


def pointer_event(mask: int, x: int, y: int, extended: int | None = None) -> bytes:
    """A PointerEvent; ``extended``: the second button mask of an extended one."""
    tail = b"" if extended is None else bytes([extended])
    return struct.pack("!BBHH", 5, mask, x, y) + tail


def cut_text(data: bytes, *, extended: bool = False) -> bytes:
    """A ClientCutText; ``extended``: extended clipboard data (a negative length)."""
    return struct.pack("!Bxxxi", 6, -len(data) if extended else len(data)) + data


def continuous_updates(enable: int, x: int, y: int, w: int, h: int) -> bytes:
    return struct.pack("!BBHHHH", 150, enable, x, y, w, h)


def fence(flags: int, payload: bytes) -> bytes:
    return struct.pack("!BxxxIB", 248, flags, len(payload)) + payload


def xvp(code: int, version: int = 1) -> bytes:
    return struct.pack("!BxBB", 250, version, code)


def desktop_size(width: int, height: int, screens: list[bytes]) -> bytes:
    """A SetDesktopSize; ``screens``: 16 bytes each."""
    return struct.pack("!BxHHBx", 251, width, height, len(screens)) + b"".join(screens)


def screen(ident: int, x: int, y: int, w: int, h: int, flags: int = 0) -> bytes:
    return struct.pack("!IHHHHI", ident, x, y, w, h, flags)


def gii(subtype: int, payload: bytes, *, big: bool = True) -> bytes:
    """A gii message: its length in the byte order the subtype's top bit gives."""
    size = len(payload).to_bytes(2, "big" if big else "little")
    return bytes([253, subtype | (0x80 if big else 0)]) + size + payload


def qemu_key(down: int, keysym: int, keycode: int) -> bytes:
    return struct.pack("!BBHII", 255, 0, down, keysym, keycode)


def qemu_audio(operation: int, sample_format: int = 3, channels: int = 2,
               frequency: int = 44100) -> bytes:
    """A QEMU audio message: enable (0), disable (1) or set the format (2)."""
    head = struct.pack("!BBH", 255, 1, operation)
    if operation != 2:
        return head
    return head + struct.pack("!BBI", sample_format, channels, frequency)


# -- handshakes ------------------------------------------------------------------------


def security_types(*types: int) -> bytes:
    return bytes([len(types), *types])


HANDSHAKES: dict[str, list[Turn]] = {
    "3.8 None": [(V38, V38), (security_types(1, 2), b"\x01"), (OK, b"\x00")],
    "3.8 VNC": [(V38, V38), (security_types(2, 1), b"\x02"), (CHALLENGE, RESPONSE),
                (OK, b"\x00")],
    # 3.7 has no SecurityResult after None: the type and ClientInit come together
    "3.7 None": [(V38, V37), (security_types(1), b"\x01\x00")],
    "3.7 VNC": [(V37, V37), (security_types(16, 2), b"\x02"), (CHALLENGE, RESPONSE),
                (OK, b"\x00")],
    "3.3 None": [(V33, V33), (struct.pack("!I", 1), b"\x00")],
    "3.3 VNC": [(V38, V33), (struct.pack("!I", 2) + CHALLENGE, RESPONSE), (OK, b"\x00")],
}
"""Each handshake up to ClientInit, whose shared flag is 0; the server sends
ServerInit next."""

ENCODINGS = (16, 7, 5, 2, 1, 0, -223, -224, -239, -258, -259, -307, -308, -309, -312,
             EXTENDED_CLIPBOARD)

MESSAGES: list[bytes] = [
    set_pixel_format(),
    set_encodings(*ENCODINGS),
    update_request(0, 0, 0, 1024, 768),
    pointer_event(0x80, 10, 20),  # the back button: 6 bytes, the extension not declared
    key_event(1, 0x61),
    key_event(0, 0x61),
    set_encodings(*ENCODINGS, EXTENDED_MOUSE_BUTTONS),
    set_encodings(),
    pointer_event(0x01, 30, 40),
    pointer_event(0x81, 50, 60, 0x02),  # extended: marker bit and a second mask
    pointer_event(0x80, 50, 60, 0x00),
    update_request(1, 0, 0, 1024, 768),
    cut_text(b"caf\xe9 au lait"),
    cut_text(b""),
    cut_text(struct.pack("!I5I", 0x0100001F, 20 << 20, 0, 0, 0, 0), extended=True),  # caps
    cut_text(struct.pack("!I", 0x08000001), extended=True),  # notify: text
    continuous_updates(1, 0, 0, 1024, 768),
    fence(0x80000003, b"sync"),
    fence(0x00000003, b""),
    fence(0x80000000, bytes(range(64))),
    xvp(2),
    xvp(4),
    desktop_size(1280, 800, [screen(1, 0, 0, 1280, 800)]),
    desktop_size(2560, 800, [screen(1, 0, 0, 1280, 800), screen(2, 1280, 0, 1280, 800)]),
    gii(1, struct.pack("!H", 1)),
    gii(0, b"\x0c\x0a\x00\x00" + bytes(8), big=False),
    gii(3, struct.pack("<I", 7), big=False),
    qemu_key(1, 0x61, 0x1E),
    qemu_key(0, 0xFF53, 0xCD),
    qemu_audio(2),
    qemu_audio(0),
    qemu_audio(1),
    continuous_updates(0, 0, 0, 1024, 768),
    update_request(1, 10, 10, 100, 100),
]
"""One of each message type (and variant), in an order a client could send them."""


def conversation(handshake: str, messages: list[bytes]) -> list[Turn]:
    """The handshake, then ``messages`` after ServerInit."""
    return [*HANDSHAKES[handshake], (SERVER_INIT, b"".join(messages))]
