"""The frame rules in-process, no socket: :class:`FrameChecker` driven with values, and
with the bytes of the end-to-end bad-input corpus, decoded here as picows would."""

from __future__ import annotations

import struct

import pytest

from corpora import INVALID_FRAMES, MAX_MESSAGE, VALID_EDGES
from websocketserver.core.frames import (
    FORWARD,
    IGNORE,
    Closed,
    Fail,
    FrameChecker,
    Pong,
    close_reason,
    frame_header,
    frame_size,
)

Decoded = tuple[int, bool, bool, bytes]  # opcode, fin, rsv, payload

PARSER_CASES = {  # refused by picows' parser before any frame reaches the checker
    "short ping in a 16-bit length", "declared length 2**40",
    "declared length with the top bit set", "declared length 2**64-1",
    "short length in 16 bits", "short length in 64 bits", "16-bit length in 64 bits",
    "unmasked client frame",
}


def decode(data: bytes) -> list[Decoded] | None:
    """The frames in ``data``; None where picows' parser refuses them (a length not in
    its shortest form or with the top bit set, an unmasked frame, a frame cut short)."""
    frames = []
    while data:
        first, second = data[0], data[1]
        length, offset = second & 0x7F, 2
        if length == 126:
            (length,), offset = struct.unpack("!H", data[2:4]), 4
            if length < 126:
                return None
        elif length == 127:
            (length,), offset = struct.unpack("!Q", data[2:10]), 10
            if length < 1 << 16 or length >> 63:
                return None
        if not second & 0x80 or len(data) < offset + 4 + length:
            return None
        key = data[offset:offset + 4]
        masked = data[offset + 4:offset + 4 + length]
        payload = bytes(b ^ key[i % 4] for i, b in enumerate(masked))
        frames.append((first & 0x0F, bool(first & 0x80), bool(first & 0x70), payload))
        data = data[offset + 4 + length:]
    return frames


@pytest.mark.parametrize(("name", "data", "code"),
                         [(n, d, c) for n, (d, c) in INVALID_FRAMES.items()], ids=INVALID_FRAMES)
def test_invalid_frames_fail_with_their_code(name: str, data: bytes, code: int) -> None:
    """Every case of the end-to-end corpus that reaches the checker fails as there."""
    frames = decode(data)
    if frames is None:
        assert name in PARSER_CASES
        return
    assert name not in PARSER_CASES
    checker = FrameChecker(MAX_MESSAGE)
    verdicts = [checker.check(*f) for f in frames]
    failures = [v for v in verdicts if isinstance(v, Fail)]
    assert failures and isinstance(verdicts[-1], Fail), verdicts
    assert failures[0].code == code


@pytest.mark.parametrize(("data", "pongs", "echo"), VALID_EDGES.values(), ids=VALID_EDGES)
def test_valid_edge_cases_pass(data: bytes, pongs: list[bytes], echo: bytes) -> None:
    frames = decode(data)
    assert frames is not None
    checker = FrameChecker(MAX_MESSAGE)
    got_pongs, forwarded = [], b""
    for opcode, fin, rsv, payload in frames:
        verdict = checker.check(opcode, fin, rsv, payload)
        if verdict is FORWARD:
            forwarded += payload
        elif isinstance(verdict, Pong):
            got_pongs.append(verdict.payload)
        else:
            assert verdict is IGNORE, verdict
    assert got_pongs == pongs and forwarded == echo


def test_close_frames() -> None:
    checker = FrameChecker(100)
    assert checker.check(0x8, True, False, b"") == Closed(None)
    assert checker.check(0x8, True, False, struct.pack("!H", 4000) + b"bye") == Closed(4000)
    assert checker.check(0x8, True, False, struct.pack("!H", 1005)) == Fail(
        1002, "close code 1005")


def test_message_size_counts_across_fragments() -> None:
    checker = FrameChecker(10)
    assert checker.check(0x2, False, False, b"x" * 6) is FORWARD
    assert checker.check(0x0, False, False, b"x" * 4) is FORWARD
    assert checker.check(0x0, True, False, b"x") == Fail(1009, "message over 10 bytes")


def test_text_is_checked_as_fragments_arrive() -> None:
    """A character split across fragments is fine; a bad byte fails at its fragment,
    before the message ends, and a message's state ends with it."""
    checker = FrameChecker(100)
    assert checker.check(0x1, False, False, b"\xce") is FORWARD
    assert checker.check(0x0, True, False, b"\xba") is FORWARD
    assert checker.check(0x1, False, False, b"ok") is FORWARD
    assert checker.check(0x0, False, False, b"\xff") == Fail(1007, "text is not UTF-8")
    fresh = FrameChecker(100)
    assert fresh.check(0x1, False, False, b"a\xce") is FORWARD  # unfinished, not wrong
    assert fresh.check(0x0, True, False, b"") == Fail(1007, "text is not UTF-8")


def test_frame_sizes_and_headers() -> None:
    assert [frame_size(n) for n in (0, 125, 126, 65535, 65536)] == [6, 131, 134, 65543,
                                                                    65550]
    assert frame_header(5) == b"\x82\x05"
    assert frame_header(200) == b"\x82\x7e\x00\xc8"
    assert frame_header(1 << 20) == b"\x82\x7f" + (1 << 20).to_bytes(8, "big")


def test_close_reason_is_cut_on_a_character() -> None:
    reason = close_reason("é" * 100)
    assert len(reason) <= 123 and reason.endswith(b"...")
    reason.decode("utf-8")
