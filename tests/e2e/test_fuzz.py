"""Property-based fuzzing of one long-running server: no crash, no hang, only proper answers.

Hypothesis, derandomized (the same inputs on every run), generates

* HTTP requests: request lines and headers drawn from valid and hostile parts, then
  mutated byte by byte, sent to either port. Every answer must be a well-formed
  response with a status the server may give; a success (< 400) only for a
  well-formed request line and header block; error bodies without tracebacks or paths.
* websocket frame sequences after a valid handshake, ended by a close frame. A model
  of RFC 6455 predicts the server's answer: the pongs, a prefix of the echoed data,
  and the close code (1000, 1002, 1007 or 1009).

Each input must be answered or closed within 5 s (``Conn``'s deadline) and leave no
traceback in the server log; every ``HEALTH_EVERY`` inputs, and at the end, the server
process must be alive, tunnel and serve a file. Every kind of answer must have been seen.

How many inputs each test sends comes from the Hypothesis profile (tests/conftest.py):
a few hundred in ``scripts/test``, 6,000 with ``WEBSOCKETSERVER_FUZZ=full``
(``bench/nightly.py``).
"""

from __future__ import annotations

import codecs
import io
import re
import struct
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TypeVar
from urllib.parse import unquote_to_bytes

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from corpora import (
    INVALID_DATA,
    NORMAL,
    OP_BINARY,
    OP_CLOSE,
    OP_CONT,
    OP_PING,
    OP_PONG,
    OP_TEXT,
    PROTOCOL_ERROR,
    TOO_BIG,
    WS_KEY,
    close_payload,
    frame,
)
from e2e.test_bad_input import (
    HANDSHAKE_TIMEOUT,
    Conn,
    assert_alive,
    assert_no_leak,
    assert_no_traceback,
    close_code,
    port,
    ws_open,
)
from support import EchoBackend, ServerProcess

INPUTS = settings().max_examples
"""Inputs per test, from the loaded profile (tests/conftest.py)."""
HEALTH_EVERY = 100
MAX_MESSAGE = 256
"""``--max_message_size`` of the fuzzed server: small, so that 1009 is within reach."""
T = TypeVar("T")


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """The one server every fuzz input of this module goes to."""
    backend = EchoBackend()
    process = ServerProcess.start("--client_port", str(backend.port), "--max_message_size",
                                  str(MAX_MESSAGE), "--handshake_timeout", str(HANDSHAKE_TIMEOUT),
                                  log_dir=tmp_path_factory.mktemp("fuzz"))
    yield process
    process.close()
    backend.close()


@pytest.fixture
def new_log(server: ServerProcess) -> Iterator[Callable[[], str]]:
    """What the server has logged since the last call (the first: since the test began)."""
    with server.log_path.open(errors="replace") as log:
        log.seek(0, io.SEEK_END)
        yield log.read


def check_health(server: ServerProcess, inputs: Counter[str]) -> None:
    """Every HEALTH_EVERY inputs: the server process is alive, tunnels and serves files."""
    if inputs.total() % HEALTH_EVERY == 0:
        assert_alive(server)


# -- HTTP requests ---------------------------------------------------------------------

METHODS = [b"GET"] * 4 + [b"HEAD", b"POST", b"PUT", b"DELETE", b"OPTIONS", b"PATCH", b"TRACE",
                         b"CONNECT"]  # GET the most: what both ports serve
BAD_METHODS = [b"PRI", b"get", b"G\xc3\x89T", b"GET GET", b""]
TARGETS = [b"/", b"/index.html", b"/websockify", b"/websockify?token=nope", b"/v1/status",
           b"/v1/status?security_token=K", b"/v1/status_view?security_token=K&fragment=1",
           b"/v1/metrics?security_token=K", b"/v1/reserve/nope?security_token=K&x=1",
           b"/v1/release/nope", b"/v2/status", b"/ensight/v1/x", b"/%2e%2e/%2e%2e/etc/passwd",
           b"/..%2f..%2fetc", b"/index.html%00", b"/%ff%fe", b"/a/../index.html",
           b"/ansys242/x", b"*", b"http://127.0.0.1/index.html", b"127.0.0.1:80"]
VERSIONS = [b"HTTP/1.1", b"HTTP/1.0"]
BAD_VERSIONS = [b"HTTP/0.9", b"HTTP/2.0", b"HTTP/1.2", b"HTTP/1.x", b"HTTP/11", b"http/1.1", b""]
HEADER_NAMES = [b"Host", b"Connection", b"Upgrade", b"Sec-WebSocket-Key",
                b"Sec-WebSocket-Version", b"Sec-WebSocket-Protocol", b"Sec-WebSocket-Extensions",
                b"Origin", b"Content-Length", b"Transfer-Encoding", b"Authorization",
                b"X-User-Key", b"Range", b"If-None-Match", b"If-Modified-Since", b"Expect",
                b"X-Forwarded-For", b"Accept"]
HEADER_VALUES = [b"127.0.0.1", b"Upgrade", b"websocket", b"keep-alive", b"close", WS_KEY,
                 b"13", b"8", b"binary", b"permessage-deflate", b"http://evil", b"0", b"5",
                 b"-1", b"chunked", b"gzip, chunked", b"Bearer K", b"Bearer \xff",
                 b"bytes=0-10", b"bytes=5-1", b"100-continue", b"*", b"\xff\xfe", b""]
HOST = (b"Host", b"127.0.0.1")
UPGRADE_HEADERS = [HOST, (b"Upgrade", b"websocket"), (b"Connection", b"Upgrade"),
                   (b"Sec-WebSocket-Version", b"13"), (b"Sec-WebSocket-Key", WS_KEY)]
STATUSES = {101, 200, 206, 301, 304, 400, 401, 404, 405, 412, 416, 417, 421, 426, 431,
            501, 505}
"""Every status the server may answer these requests with (never 500)."""
HTTP_ANSWERS = {"101", "200", "400", "404", "405", "426"}
"""Answers even the quick run must provoke: upgrades, files, refusals on both ports."""
_TOKEN = rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+"
_REQUEST_LINE = re.compile(_TOKEN + rb" +[^\s]+( +HTTP/\d\.\d)?")
_FIELD_LINE = re.compile(_TOKEN + rb":")
def mostly(valid: st.SearchStrategy[T], hostile: st.SearchStrategy[T]) -> st.SearchStrategy[T]:
    """``valid`` three times in four, else ``hostile``."""
    return st.sampled_from([valid, valid, valid, hostile]).flatmap(lambda chosen: chosen)


mutations = st.lists(st.tuples(st.integers(0, 1 << 16),
                               st.sampled_from(["replace", "insert", "delete"]),
                               st.binary(min_size=1, max_size=4)), min_size=1, max_size=3)


def mutate(data: bytes, edits: list[tuple[int, str, bytes]]) -> bytes:
    """``data`` with bytes replaced, inserted or deleted at the (wrapped) positions."""
    result = bytearray(data)
    for position, kind, chunk in edits:
        at = position % (len(result) + 1)
        if kind == "insert":
            result[at:at] = chunk
        elif kind == "replace":
            result[at:at + len(chunk)] = chunk
        else:
            del result[at:at + len(chunk)]
    return bytes(result)


@st.composite
def http_requests(draw: st.DrawFn) -> bytes:
    """A request of valid parts or, half the time, of hostile parts mutated byte-wise
    and followed by garbage.

    The blank line that ends the header block is not mutated, so that nearly every
    request is complete and gets an answer rather than the handshake timeout.
    """
    hostile = draw(st.booleans())

    def part(valid: st.SearchStrategy[T], bad: st.SearchStrategy[T]) -> T:
        return draw(mostly(valid, bad) if hostile else valid)

    method = part(st.sampled_from(METHODS), st.sampled_from(BAD_METHODS) | st.binary(max_size=8))
    target = part(st.sampled_from(TARGETS), st.binary(max_size=40))
    version = part(st.sampled_from(VERSIONS), st.sampled_from(BAD_VERSIONS))
    if draw(st.booleans()):
        fields = UPGRADE_HEADERS
    else:
        fields = [HOST] + [(part(st.sampled_from(HEADER_NAMES), st.binary(max_size=12)),
                            part(st.sampled_from(HEADER_VALUES), st.binary(max_size=40)))
                           for _ in range(draw(st.integers(0, 5)))]
    head = b" ".join(token for token in (method, target, version) if token) + b"\r\n"
    head += b"".join(name + b": " + value + b"\r\n" for name, value in fields)
    if not hostile:
        return head + b"\r\n"
    request = mutate(head, draw(st.just([]) | mutations)) + b"\r\n" + draw(st.binary(max_size=32))
    assume(b"stop" not in unquote_to_bytes(request).lower())  # /v1/stop would end the run
    return request


def well_formed(request: bytes) -> bool:
    """Whether the request line and header fields follow the HTTP/1.x grammar."""
    head = request.lstrip(b"\r\n").split(b"\r\n\r\n", 1)[0]
    line, *fields = head.split(b"\r\n")
    return bool(_REQUEST_LINE.fullmatch(line)) and all(_FIELD_LINE.match(f) for f in fields)


def test_http_requests(server: ServerProcess, new_log: Callable[[], str]) -> None:
    """Random requests to both ports: a proper answer or a close, never a crash or hang."""
    inputs: Counter[str] = Counter()

    @given(request=http_requests(), port_name=st.sampled_from(["http", "ws"]))
    def probe(request: bytes, port_name: str) -> None:
        with Conn.open(port(server, port_name)) as conn:
            conn.send(request)
            response = conn.response(head_request=request.lstrip(b"\r\n").startswith(b"HEAD "))
        logged = new_log()
        if response is None:
            inputs["closed"] += 1
        else:
            assert_no_traceback(logged)
            inputs[str(response.status)] += 1
            assert response.status in STATUSES, response
            assert response.status >= 400 or well_formed(request), response
        if response is not None and response.status >= 400:
            assert_no_leak(response)
        check_health(server, inputs)

    probe()
    print(f"\nHTTP inputs by answer: {dict(sorted(inputs.items()))}")
    assert inputs.total() >= INPUTS
    assert HTTP_ANSWERS <= inputs.keys(), "some kind of answer was never provoked"
    assert_alive(server)
    assert_no_traceback(new_log())


# -- websocket frames --------------------------------------------------------------------


@dataclass(frozen=True)
class Frame:
    """A frame as generated; :meth:`encode` gives its bytes."""

    opcode: int
    payload: bytes
    fin: bool = True
    rsv: int = 0
    form: int | None = None  # length encoding: 16 or 64 bits; None: the shortest
    length: int | None = None  # a declared length over MAX_MESSAGE, the payload unsent
    mask: bytes = b"\x00\x00\x00\x00"

    @property
    def declared(self) -> int:
        """The payload length the frame header announces."""
        return len(self.payload) if self.length is None else self.length

    @property
    def length_field(self) -> int:
        """The 7-bit length field as sent (126, 127: a 16-, 64-bit length follows)."""
        if self.form == 64 or self.declared > 0xFFFF:
            return 127
        return 126 if self.form == 16 or self.declared > 125 else self.declared

    def encode(self) -> bytes:
        form = {126: 16, 127: 64}.get(self.length_field, 7)
        return frame(self.opcode, b"" if self.length is not None else self.payload,
                     fin=self.fin, rsv=self.rsv, mask=self.mask, length=self.length,
                     form=form)


@dataclass
class Expected:
    """What the server must answer a frame sequence with."""

    pongs: list[bytes]
    data: bytes  # the echo is a prefix of it (the tunnel may close first)
    codes: set[int]  # the close code is one of these
    late_pong: bytes | None = None  # a pong that may follow ``pongs`` or be missing


_VALID_CLOSE_CODES = {1000, 1001, 1002, 1003, 1007, 1008, 1009, 1010, 1011, 1012, 1013, 1014}
_DATA_OPCODES = (OP_CONT, OP_TEXT, OP_BINARY)
_CONTROL_OPCODES = (OP_CLOSE, OP_PING, OP_PONG)


# close codes picows itself lets through (its WSCloseCode enum); the tunnel checks the rest
_PICOWS_CLOSE_CODES = {0, 1000, 1001, 1002, 1003, *range(1006, 1015)}


def parse_error(f: Frame, closed: bool) -> int | None:
    """The close code for a frame that picows refuses while parsing it, before it is
    delivered: its header breaks RFC 6455 §5.2 or the size limit, or it is a close
    frame that picows checks itself (``closed``: a close frame came before it)."""
    control = f.opcode in _CONTROL_OPCODES
    if f.opcode not in _DATA_OPCODES + _CONTROL_OPCODES:
        return PROTOCOL_ERROR
    if control and (not f.fin or f.length_field > 125):
        return PROTOCOL_ERROR
    if (f.length_field == 126 and f.declared < 126) or (
            f.length_field == 127 and (f.declared < 1 << 16 or f.declared >= 1 << 63)):
        return PROTOCOL_ERROR  # the minimal length encoding MUST be used, top bit 0
    if not control and f.declared > MAX_MESSAGE:
        return TOO_BIG
    if f.opcode == OP_CLOSE:
        code = struct.unpack("!H", f.payload[:2])[0] if len(f.payload) >= 2 else 0
        if (code < 3000 and code not in _PICOWS_CLOSE_CODES) or len(f.payload) == 1:
            return PROTOCOL_ERROR
        if not _utf8(f.payload[2:]):
            return INVALID_DATA
        if closed:
            return PROTOCOL_ERROR  # a second close frame
    return None


class _Model:
    """RFC 6455 (§5.2-5.5, §7.4, §8.1) for the frames picows delivers to the tunnel:
    reserved bits, fragment order, the size across fragments, UTF-8 as it arrives
    (text is checked and relayed fragment by fragment), close payloads."""

    def __init__(self) -> None:
        self.pongs: list[bytes] = []
        self.data = b""
        self.message: int | None = None  # the opcode of an unfinished fragmented message
        self.size = 0  # of that message so far
        self.text = codecs.getincrementaldecoder("utf-8")()

    def step(self, f: Frame) -> int | None:
        """Deliver one frame: the close code it ends the connection with, if any."""
        if f.rsv:
            return PROTOCOL_ERROR
        if f.opcode == OP_PING:
            self.pongs.append(f.payload)
        elif f.opcode == OP_CLOSE:
            if len(f.payload) == 1:
                return PROTOCOL_ERROR
            if len(f.payload) >= 2:
                code = struct.unpack("!H", f.payload[:2])[0]
                if code not in _VALID_CLOSE_CODES and not 3000 <= code <= 4999:
                    return PROTOCOL_ERROR
                if not _utf8(f.payload[2:]):
                    return INVALID_DATA
            return NORMAL
        elif f.opcode in (OP_TEXT, OP_BINARY):
            if self.message is not None:
                return PROTOCOL_ERROR
            if f.opcode == OP_TEXT and not self._text_ok(f.payload, f.fin):
                return INVALID_DATA
            if not f.fin:
                self.message, self.size = f.opcode, len(f.payload)
            self.data += f.payload
        elif f.opcode == OP_CONT:
            if self.message is None:
                return PROTOCOL_ERROR
            self.size += len(f.payload)
            if self.size > MAX_MESSAGE:
                return TOO_BIG
            if self.message == OP_TEXT and not self._text_ok(f.payload, f.fin):
                return INVALID_DATA
            if f.fin:
                self.message = None
            self.data += f.payload
        return None

    def _text_ok(self, payload: bytes, final: bool) -> bool:
        try:
            self.text.decode(payload, final)
        except UnicodeDecodeError:
            return False
        if final:
            self.text.reset()
        return True


def _utf8(data: bytes) -> bool:
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def expect(frames: list[Frame]) -> Expected:
    """The model's answer to a frame sequence.

    picows parses one frame ahead: when it refuses a frame while parsing, the close frame
    for it goes out before the frame in front of it is delivered, and the tunnel then
    ignores that frame. Whether the two arrive in one read is up to the kernel, so
    both outcomes are accepted for that frame.
    """
    model = _Model()
    for i, f in enumerate(frames):
        early = parse_error(f, False)
        if early is not None:
            return Expected(model.pongs, model.data, {early})
        following = (parse_error(frames[i + 1], f.opcode == OP_CLOSE)
                     if i + 1 < len(frames) else None)
        pongs = list(model.pongs)
        code = model.step(f)
        if following is not None:
            late = model.pongs[-1] if len(model.pongs) > len(pongs) else None
            codes = {following} if code is None else {code, following}
            if f.opcode == OP_CLOSE and f.payload == b"\0\0" and frames[i + 1].opcode == OP_CLOSE:
                # picows reports close code 0 and an empty close alike; with a second
                # close behind it the tunnel cannot tell them apart (tunnels._PicowsLog)
                codes.add(NORMAL)
            return Expected(pongs, model.data, codes, late)
        if code is not None:
            return Expected(model.pongs, model.data, {code})
    raise AssertionError("a sequence always ends with a close frame")


close_codes = st.sampled_from([1000, 1001, 1003, 1011, 1014, 3000, 4999, 5000, 65535, 0, 999,
                               1004, 1005, 1015, 1016, 2999]) | st.integers(0, 65535)
texts = st.text(max_size=60).map(str.encode)
close_payloads = st.builds(close_payload, close_codes, mostly(texts, st.binary(max_size=40)))
masks = st.binary(min_size=4, max_size=4)
data_frames = st.builds(Frame, opcode=st.sampled_from([OP_BINARY, OP_TEXT, OP_CONT]),
                        payload=st.binary(max_size=64) | texts
                        | st.binary(min_size=MAX_MESSAGE - 32, max_size=MAX_MESSAGE + 8),
                        fin=st.sampled_from([True, True, False]),
                        form=st.sampled_from([None, None, 16, 64]), mask=masks)
control_frames = st.builds(Frame, opcode=st.sampled_from([OP_PING, OP_PONG]),
                           payload=st.binary(max_size=125), mask=masks) \
    | st.builds(Frame, opcode=st.just(OP_CLOSE), payload=close_payloads, mask=masks)
hostile_frames = st.builds(
    Frame, opcode=st.integers(0, 15), payload=st.binary(max_size=MAX_MESSAGE + 40) | texts
    | close_payloads | st.binary(max_size=1), fin=st.booleans(), rsv=st.integers(0, 7),
    form=st.sampled_from([None, 16, 64]),
    length=st.none() | st.integers(MAX_MESSAGE + 1, (1 << 64) - 1), mask=masks)
frames = mostly(data_frames | control_frames, hostile_frames)
sequences = st.lists(data_frames | control_frames, min_size=1, max_size=8) \
    | st.lists(frames, min_size=1, max_size=8)
_CLOSE_FRAME = Frame(OP_CLOSE, close_payload(NORMAL))
WS_ANSWERS = {str(code) for code in (NORMAL, PROTOCOL_ERROR, INVALID_DATA, TOO_BIG)}
"""Every close code the model predicts: even the quick run must provoke each."""


def test_websocket_frames(server: ServerProcess, new_log: Callable[[], str]) -> None:
    """Random frame sequences: the model's answer, never a crash or hang."""
    inputs: Counter[str] = Counter()

    @given(sequence=sequences)
    def probe(sequence: list[Frame]) -> None:
        sequence = [*sequence, _CLOSE_FRAME]
        expected = expect(sequence)
        with ws_open(port(server, "ws")) as conn:
            conn.send(b"".join(f.encode() for f in sequence))
            received = conn.frames_until_closed()
        code = close_code(received)
        inputs[str(code)] += 1
        echoed = b"".join(payload for opcode, payload in received if opcode == OP_BINARY)
        assert code in expected.codes, (expected, received)
        pongs = [p for opcode, p in received if opcode == OP_PONG]
        assert pongs in (expected.pongs, [*expected.pongs, expected.late_pong]), (expected,
                                                                                  received)
        assert expected.data.startswith(echoed), (expected, received)
        assert_no_traceback(new_log())
        check_health(server, inputs)

    probe()
    print(f"\nwebsocket inputs by close code: {dict(sorted(inputs.items()))}")
    assert inputs.total() >= INPUTS
    assert WS_ANSWERS <= inputs.keys(), "some close code was never provoked"
    assert_alive(server)
    assert_no_traceback(new_log())
