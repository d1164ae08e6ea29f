"""The browser-side RFB parser in-process, no socket: :class:`ClientStream` fed the
conversations of ``rfb_corpora.py`` whole, byte by byte and cut at every point, random
message sequences (Hypothesis) cut anywhere, and the protocol errors."""

from __future__ import annotations

import struct
from collections.abc import Iterable, Iterator

import pytest
from hypothesis import given
from hypothesis import strategies as st

from rfb_corpora import (
    CHALLENGE,
    EXTENDED_CLIPBOARD,
    EXTENDED_MOUSE_BUTTONS,
    HANDSHAKES,
    MESSAGES,
    OK,
    RESPONSE,
    V33,
    V37,
    V38,
    Turn,
    continuous_updates,
    conversation,
    cut_text,
    desktop_size,
    fence,
    gii,
    key_event,
    pointer_event,
    qemu_audio,
    qemu_key,
    security_types,
    set_encodings,
    update_request,
    xvp,
)
from websocketserver.core.rfb import (
    ALLOWED,
    BAD_GATEWAY,
    DROPPED,
    MAX_BUFFERED,
    MAX_CUT_TEXT,
    MAX_FENCE,
    POLICY_VIOLATION,
    ClientStream,
    Mode,
    Violation,
    refusal,
)

VIEWABLE = {0, 2, 3, 150, 248}  # the message types a viewer's stream keeps
NAMES = {4: "KeyEvent", 5: "PointerEvent", 6: "ClientCutText", 250: "xvp",
         251: "SetDesktopSize", 253: "gii", 255: "QEMU"}  # the ones it drops
MODES: list[Mode] = ["owner", "view"]

Outcome = tuple[bytes, Violation | None]  # what reached the server, the violation


def converse(stream: ClientStream, turns: list[Turn], cuts: Iterable[int] = ()) -> Outcome:
    """Play ``turns``: the server's bytes to ``feed_server``, then the browser's answer
    to ``feed``, cut at the offsets ``cuts`` of the browser's stream. Checks the bound
    on held bytes after each feed."""
    out, offset, cuts = bytearray(), 0, sorted(cuts)
    for server, client in turns:
        violation = stream.feed_server(server)
        if violation is not None:
            return bytes(out), violation
        for piece in pieces(client, offset, cuts):
            got = stream.feed(piece)
            assert stream.buffered <= MAX_BUFFERED
            if isinstance(got, Violation):
                return bytes(out), got
            out += got
        offset += len(client)
    return bytes(out), None


def pieces(data: bytes, start: int, cuts: list[int]) -> Iterator[bytes]:
    """``data``, at offset ``start`` of the browser's stream, cut at ``cuts``."""
    edges = [0, *(c - start for c in cuts if start < c < start + len(data)), len(data)]
    for begin, end in zip(edges, edges[1:], strict=False):
        yield data[begin:end]


def expected(handshake: str, messages: list[bytes], mode: Mode) -> bytes:
    """What the server should get: the handshake with ClientInit's shared flag 1, then
    every message (owner) or the allowed ones (view)."""
    client = b"".join(answer for _, answer in HANDSHAKES[handshake])
    kept = messages if mode == "owner" else [m for m in messages if m[0] in VIEWABLE]
    return client[:-1] + b"\x01" + b"".join(kept)


def dropped(messages: list[bytes]) -> dict[str, int]:
    counts = dict.fromkeys(NAMES.values(), 0)
    for message in messages:
        if message[0] in NAMES:
            counts[NAMES[message[0]]] += 1
    return counts


def started(mode: Mode, handshake: str = "3.8 None") -> ClientStream:
    """A stream past ClientInit."""
    stream = ClientStream(mode)
    assert converse(stream, HANDSHAKES[handshake])[1] is None
    return stream


def test_the_tables_are_the_decided_ones() -> None:
    assert set(ALLOWED) == VIEWABLE and DROPPED == NAMES


# -- the corpora -----------------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("handshake", HANDSHAKES)
def test_a_conversation_gives_the_same_bytes_however_it_is_cut(handshake: str,
                                                               mode: Mode) -> None:
    """Whole (each answer in one feed), byte by byte, and in two pieces at every
    point; every message type is in the corpus."""
    turns = conversation(handshake, MESSAGES)
    size = sum(len(answer) for _, answer in turns)
    want = expected(handshake, MESSAGES, mode)
    counts = dropped(MESSAGES) if mode == "view" else dropped([])
    for cuts in [(), range(size), *([point] for point in range(1, size))]:
        stream = ClientStream(mode)
        assert converse(stream, turns, cuts) == (want, None), cuts
        assert stream.dropped == counts
        assert (stream.version, stream.security) == (int(handshake[2]),
                                                    1 if "None" in handshake else 2)
        assert stream.passthrough is (mode == "owner") and not stream.needs_server


def test_the_corpus_has_every_message_type() -> None:
    assert {m[0] for m in MESSAGES} == VIEWABLE | set(NAMES)


# -- random messages, cut anywhere -----------------------------------------------------

U8, U16, U32 = st.integers(0, 0xFF), st.integers(0, 0xFFFF), st.integers(0, 0xFFFFFFFF)
ENCODING = st.one_of(st.sampled_from([EXTENDED_MOUSE_BUTTONS, EXTENDED_CLIPBOARD, 0, 7, 16]),
                     st.integers(-(1 << 31), (1 << 31) - 1))


def fixed(kind: int, size: int) -> st.SearchStrategy[bytes]:
    return st.binary(min_size=size - 1, max_size=size - 1).map(lambda rest: bytes([kind]) + rest)


MESSAGE: dict[int, st.SearchStrategy[bytes]] = {  # PointerEvents depend on what came before
    0: fixed(0, 20),
    2: st.lists(ENCODING, max_size=40).map(lambda encodings: set_encodings(*encodings)),
    3: fixed(3, 10),
    4: fixed(4, 8),
    6: st.builds(lambda data, extended: cut_text(data, extended=extended),
                 st.binary(max_size=300), st.booleans()),
    150: fixed(150, 10),
    248: st.builds(fence, U32, st.binary(max_size=MAX_FENCE)),
    250: fixed(250, 4),
    251: st.builds(desktop_size, U16, U16,
                   st.lists(st.binary(min_size=16, max_size=16), max_size=4)),
    253: st.builds(lambda subtype, payload, big: gii(subtype, payload, big=big),
                   st.integers(0, 127), st.binary(max_size=300), st.booleans()),
    255: st.one_of(st.builds(qemu_key, U16, U32, U32),
                   st.builds(qemu_audio, st.sampled_from([0, 1, 2]), U8, U8, U32)),
}
KINDS = sorted([*MESSAGE, 5])


@st.composite
def client_messages(draw: st.DrawFn) -> list[bytes]:
    """Valid messages of every type, as an honest client sends them: a PointerEvent
    with its top bit set is extended once ExtendedMouseButtons was declared."""
    messages: list[bytes] = []
    extended = False
    for kind in draw(st.lists(st.sampled_from(KINDS), max_size=25)):
        if kind == 5:
            mask = draw(U8)
            second = draw(U8) if extended and mask & 0x80 else None
            messages.append(pointer_event(mask, draw(U16), draw(U16), second))
            continue
        message = draw(MESSAGE[kind])
        if kind == 2 and (EXTENDED_MOUSE_BUTTONS,) in struct.iter_unpack("!i", message[4:]):
            extended = True
        messages.append(message)
    return messages


def cut_anywhere(data: st.DataObject, turns: list[Turn]) -> set[int]:
    size = sum(len(answer) for _, answer in turns)
    return data.draw(st.sets(st.integers(1, size - 1), max_size=30), label="cuts")


@given(st.sampled_from(sorted(HANDSHAKES)), client_messages(), st.data())
def test_a_viewer_forwards_exactly_its_allowed_messages(handshake: str,
                                                        messages: list[bytes],
                                                        data: st.DataObject) -> None:
    """What reaches the server is the allowed messages joined, byte for byte: no byte
    of a dropped message, however the stream is cut; each drop is counted."""
    turns = conversation(handshake, messages)
    stream = ClientStream("view")
    assert converse(stream, turns, cut_anywhere(data, turns)) == (
        expected(handshake, messages, "view"), None)
    assert stream.dropped == dropped(messages)


@given(st.sampled_from(sorted(HANDSHAKES)), client_messages(), st.binary(max_size=200),
       st.data())
def test_an_owner_forwards_everything_after_client_init(handshake: str,
                                                        messages: list[bytes],
                                                        garbage: bytes,
                                                        data: st.DataObject) -> None:
    """Messages a viewer loses and bytes that are no message at all pass alike."""
    messages = [*messages, garbage]
    turns = conversation(handshake, messages)
    stream = ClientStream("owner")
    assert converse(stream, turns, cut_anywhere(data, turns)) == (
        expected(handshake, messages, "owner"), None)


def allowed_messages(data: bytes) -> bool:
    """``data`` is allowed messages, the last perhaps cut short (a reference parser)."""
    sizes = {0: 20, 3: 10, 150: 10}
    pos = 0
    while pos < len(data):
        kind, head = data[pos], data[pos:pos + 9]
        if kind in sizes:
            pos += sizes[kind]
        elif kind == 2 and len(head) >= 4:
            pos += 4 + 4 * int.from_bytes(head[2:4])
        elif kind == 248 and len(head) == 9 and head[8] <= MAX_FENCE:
            pos += 9 + head[8]
        else:
            return kind in (2, 248) and len(head) < (4 if kind == 2 else 9)
    return True


@given(st.lists(st.one_of(*MESSAGE.values(), st.builds(pointer_event, U8, U16, U16),
                          st.binary(max_size=6))).map(b"".join), st.data())
def test_a_viewer_forwards_only_allowed_messages_whatever_it_sends(noise: bytes,
                                                                   data: st.DataObject) -> None:
    """Messages mixed with random bytes: what reaches the server is still allowed
    messages only, until a violation (1008) ends the stream."""
    turns = conversation("3.8 None", [noise])
    forwarded, violation = converse(ClientStream("view"), turns, cut_anywhere(data, turns))
    assert allowed_messages(forwarded[len(V38) + 2:])
    assert violation is None or violation.code == POLICY_VIOLATION


# -- the handshake ---------------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("flag", [0, 1, 0xFF])
def test_client_init_is_always_shared(mode: Mode, flag: int) -> None:
    stream = ClientStream(mode)
    turns = [*HANDSHAKES["3.8 None"][:-1], (OK, bytes([flag]) + update_request(0, 0, 0, 9, 9))]
    assert converse(stream, turns) == (V38 + b"\x01\x01" + update_request(0, 0, 0, 9, 9),
                                       None)


def test_an_owner_is_not_parsed_after_client_init() -> None:
    """ClientInit and what follows it in the same feed; then each feed passes as is."""
    stream = ClientStream("owner")
    converse(stream, HANDSHAKES["3.8 None"][:-1])
    assert stream.feed(b"\x00\x07unknown" + key_event(1, 0x61)) == (
        b"\x01\x07unknown" + key_event(1, 0x61))
    assert stream.passthrough
    for data in [b"\xfc", cut_text(b"x", extended=True)[:5], fence(0, bytes(100))]:
        assert stream.feed(data) is data
    assert stream.feed_server(b"anything") is None


@pytest.mark.parametrize("version", [b"RFB 003.005\n", b"RFB 003.006\n", b"RFB 004.001\n",
                                     b"RFB 003.008\r", b"GET / HTTP/1", b"ID:123456\0\0\0"])
def test_a_version_not_3_3_3_7_or_3_8_is_a_violation(version: bytes) -> None:
    stream = ClientStream("view")
    assert stream.feed_server(V38) is None
    assert stream.feed(version[:11]) == b"" and stream.buffered == 11
    failure = Violation(POLICY_VIOLATION, f"protocol version {version!r}")
    assert stream.feed(version[11:] + b"\x01") == failure
    assert stream.feed(b"\x01") == failure and stream.feed_server(b"\x01\x01") == failure
    assert stream.buffered == 0 and not stream.needs_server


def violation(turns: list[Turn], mode: Mode = "view") -> Violation | None:
    """The violation playing ``turns`` ends in; checks nothing after it is forwarded."""
    stream = ClientStream(mode)
    _, found = converse(stream, turns)
    if found is not None:
        assert stream.feed(update_request(0, 0, 0, 1, 1)) == found
        assert stream.feed_server(b"\x00") == found
    return found


@pytest.mark.parametrize(("turns", "reason"), [
    ([(V38, V38), (security_types(1, 16), b"\x10")], "security type 16 not supported"),
    ([(V38, V38), (security_types(1, 2), b"\x00")], "security type 0 not supported"),
    ([(V38, V37), (security_types(1), b"\x02" + RESPONSE)], "security type 2 not offered"),
    ([(V38, V38 + b"\x01")], "bytes before the server's security types"),
    ([(V38, V33 + RESPONSE)], "bytes before the server's security types"),
    ([(V38, V38), (b"\x00\x00\x00\x02no", b"\x00")],
     "bytes after the server refused the connection"),
    ([(V33, V33), (b"\x00\x00\x00\x00\x00\x00\x00\x02no", b"\x00")],
     "bytes after the server refused the connection"),
], ids=["unknown type", "type 0", "type not offered", "type before the offer",
        "3.3 response before the type", "refused", "refused in 3.3"])
def test_the_browser_breaking_the_security_handshake(turns: list[Turn], reason: str) -> None:
    assert violation(turns) == Violation(POLICY_VIOLATION, reason)
    assert violation(turns, "owner") == Violation(POLICY_VIOLATION, reason)


@pytest.mark.parametrize(("turns", "reason"), [
    ([(b"RFB 3.8\n\n\n\n\n", b"")], "server protocol version b'RFB 3.8\\n\\n\\n\\n\\n'"),
    ([(V38 + security_types(1), V38)], "server security before the browser's version"),
    ([(V33, V33), (struct.pack("!I", 16), b"")], "server chose security type 16"),
])
def test_a_server_the_stream_cannot_follow(turns: list[Turn], reason: str) -> None:
    assert violation(turns) == Violation(BAD_GATEWAY, reason)


def test_a_refusal_without_more_from_the_browser_is_no_violation() -> None:
    stream = ClientStream("view")
    assert converse(stream, [(V38, V38), (b"\x00\x00\x00\x02no", b"")]) == (V38, None)
    assert not stream.needs_server and stream.security is None


@pytest.mark.parametrize("handshake", ["3.8 VNC", "3.3 VNC", "3.3 None"])
def test_server_bytes_past_the_security_types_are_not_read(handshake: str) -> None:
    """The challenge, SecurityResult and ServerInit may be given or not."""
    turns = [(server[:4] if server in (CHALLENGE, OK) else server, answer)
             for server, answer in HANDSHAKES[handshake]]
    assert converse(ClientStream("view"), turns) == (expected(handshake, [], "view"), None)


# -- messages --------------------------------------------------------------------------


@pytest.mark.parametrize("kind", [1, 7, 8, 20, 127, 128, 149, 249, 252, 254])
def test_an_unknown_message_type_closes_a_viewer(kind: int) -> None:
    """With 1008; nothing of the feed that brought it is forwarded, nor after."""
    stream = started("view")
    request = update_request(1, 0, 0, 9, 9)
    assert stream.feed(request) == request
    failure = Violation(POLICY_VIOLATION, f"unknown message type {kind}")
    assert stream.feed(request + bytes([kind]) + request) == failure
    assert stream.feed(request) == failure and stream.buffered == 0


@pytest.mark.parametrize(("message", "reason"), [
    (fence(0, bytes(MAX_FENCE + 1)), "ClientFence of 65 bytes"),
    (cut_text(b"")[:4] + struct.pack("!i", MAX_CUT_TEXT + 1), "ClientCutText of 16777217 bytes"),
    (cut_text(b"")[:4] + struct.pack("!i", -MAX_CUT_TEXT - 1), "ClientCutText of 16777217 bytes"),
    (cut_text(b"")[:4] + struct.pack("!i", -(1 << 31)), "ClientCutText of 2147483648 bytes"),
    (qemu_key(1, 2, 3)[:1] + b"\x02\x00\x00", "QEMU submessage 2"),
    (qemu_audio(3), "QEMU audio operation 3"),
])
def test_messages_over_their_bounds_close_a_viewer(message: bytes, reason: str) -> None:
    stream = started("view")
    assert stream.feed(message) == Violation(POLICY_VIOLATION, reason)
    assert started("owner").feed(message) == message


def test_long_messages_stream_through_unheld() -> None:
    """A cut text as long as allowed is skipped, SetEncodings of 65535 encodings
    forwarded, as they come; an encoding cut by a feed still counts."""
    stream = started("view")
    assert stream.feed(cut_text(b"")[:4] + struct.pack("!i", -MAX_CUT_TEXT)) == b""
    chunk = bytes(1 << 20)
    assert all(stream.feed(chunk) == b"" for _ in range(16))
    encodings = set_encodings(*range(65534), EXTENDED_MOUSE_BUTTONS)
    forwarded = bytearray()
    for start in range(0, len(encodings), 999):
        got = stream.feed(encodings[start:start + 999])
        assert isinstance(got, bytes) and stream.buffered <= MAX_BUFFERED
        forwarded += got
    assert forwarded == encodings
    request = update_request(0, 0, 0, 9, 9)
    assert stream.feed(pointer_event(0x80, 1, 2, 0x01) + request) == request
    assert stream.dropped["ClientCutText"] == stream.dropped["PointerEvent"] == 1


def test_a_pointer_event_is_extended_only_once_declared() -> None:
    """Before ExtendedMouseButtons, the top bit is the back button of a 6-byte event;
    after, it marks a 7-byte one (rfbproto), as the server reads it."""
    stream = started("view")
    request = update_request(0, 0, 0, 9, 9)  # 3, 0, ...: a 7th byte would misframe it
    assert stream.feed(pointer_event(0x80, 1, 2) + request) == request
    declared = set_encodings(EXTENDED_MOUSE_BUTTONS)
    assert [stream.feed(declared[i:i + 1]) for i in range(8)] == [b""] * 3 + [
        declared[:4], declared[4:5], declared[5:6], declared[6:7], declared[7:8]]
    assert stream.feed(pointer_event(0x80, 1, 2, 0x03) + request) == request
    assert stream.feed(pointer_event(0x7F, 1, 2) + request) == request
    assert stream.dropped["PointerEvent"] == 3


def test_each_dropped_type_is_counted_by_name() -> None:
    stream = started("view", "3.3 VNC")
    sent = [key_event(1, 0x61), pointer_event(1, 2, 3), cut_text(b"x"), xvp(2),
            desktop_size(9, 9, []), gii(1, b"\x00\x01"), qemu_key(1, 2, 3), qemu_audio(0),
            continuous_updates(1, 0, 0, 9, 9)]
    assert stream.feed(b"".join(sent)) == continuous_updates(1, 0, 0, 9, 9)
    assert stream.dropped == {"KeyEvent": 1, "PointerEvent": 1, "ClientCutText": 1,
                              "xvp": 1, "SetDesktopSize": 1, "gii": 1, "QEMU": 2}


def test_a_refusal_answers_each_version_as_its_client_reads_it() -> None:
    reason = "unknown or expired token"
    body = struct.pack("!I", len(reason)) + reason.encode()
    assert refusal(b"RFB 003.008\n", reason) == b"\x00" + body  # no security type
    assert refusal(b"RFB 003.007\n", reason) == b"\x00" + body
    assert refusal(b"RFB 003.003\n", reason) == b"\x00\x00\x00\x00" + body  # type 0
    assert refusal(b"RFB 003.889\n", reason) is None  # not a version this proxy speaks
    assert refusal(b"GET / HTTP/1", reason) is None
    assert refusal(b"RFB 003.008\n", "é") == b"\x00\x00\x00\x00\x02" + "é".encode()
