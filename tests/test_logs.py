"""The log: secrets redacted, control characters escaped, the file private (0600); the
same in its JSON form (``--log_format json``)."""

from __future__ import annotations

import json
import logging
import os
import stat
import sys
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
from aiohttp.http_exceptions import LineTooLong

from websocketserver.cli import parse_settings
from websocketserver.logs import (
    REDACTED,
    JsonFormatter,
    SafeFormatter,
    Sampled,
    configure_logging,
    escape,
)
from websocketserver.settings import Settings

TOKEN = "Tok3n/s3cret+9f2c"
GUID = "0B6E3C1E-5d7a-4c1f-9e2b-7a4d2c9f1e80"


def record(msg: str, *args: object, exc: bool = False) -> logging.LogRecord:
    exc_info = sys.exc_info() if exc else None
    return logging.LogRecord("websocketserver.test", logging.INFO, __file__, 1, msg, args,
                             exc_info)


def formatted(msg: str, *args: object) -> str:
    return SafeFormatter([TOKEN]).format(record(msg, *args))


SECRETS = [
    f"token {TOKEN} in an argument",
    "percent-encoded: /v1/status?x=Tok3n%2Fs3cret%2B9f2c",
    f"bytes repr: {TOKEN.encode()!r}",
    "GET /v1/status?security_token=other&x=1",
    "GET /websockify?token=other",
    "GET /?user_key=other",
    "Authorization: Bearer other",
    "{'Authorization': 'Bearer other', 'Host': 'h'}",
    "X-User-Key: other",
    f"reservation {GUID} released",
]
"""Texts holding a secret: TOKEN (the configured one), ``other`` or GUID."""


@pytest.mark.parametrize("text", SECRETS)
def test_secrets_in_arguments_are_redacted(text: str) -> None:
    line = formatted("%s", text)
    assert TOKEN not in line and "other" not in line and GUID not in line
    assert REDACTED in line


def test_what_is_no_secret_stays() -> None:
    line = formatted("GET %s", "/v1/status?csrf_token=1&page=2 from 10.0.0.1")
    assert line.endswith("GET /v1/status?csrf_token=1&page=2 from 10.0.0.1")


def test_secrets_in_an_exception_are_redacted() -> None:
    try:
        raise ValueError(f"bad request line: GET /?security_token={TOKEN}")
    except ValueError:
        line = SafeFormatter([TOKEN]).format(record("failed", exc=True))
    assert "ValueError: bad request line" in line
    assert TOKEN not in line


@pytest.mark.parametrize(("char", "escaped"), [
    ("\n", "\\n"), ("\r", "\\r"), ("\t", "\\t"), ("\x00", "\\x00"), ("\x1b", "\\x1b"),
    ("\x7f", "\\x7f"), ("\x85", "\\x85"), ("\x9f", "\\x9f"), ("\u2028", "\\u2028"),
    ("\u2029", "\\u2029"), ("\udcff", "\\udcff"),
])
def test_control_characters_are_escaped(char: str, escaped: str) -> None:
    assert escape(f"a{char}b") == f"a{escaped}b"
    line = formatted("GET %s", f"/x{char}1999-12-31 23:59:59,999 ERROR forged")
    assert len(line.splitlines()) == 1
    assert line.endswith(f"GET /x{escaped}1999-12-31 23:59:59,999 ERROR forged")


def test_printable_text_is_unchanged() -> None:
    assert escape("/café/ü €\\x") == "/café/ü €\\x"


def test_a_traceback_keeps_its_lines_but_cannot_forge_one() -> None:
    try:
        raise RuntimeError("bug\n1999-12-31 23:59:59,999 ERROR forged\x1b[2J")
    except RuntimeError:
        text = SafeFormatter().format(record("failed", exc=True))
    first, *rest = text.split("\n")
    assert first.endswith("failed")
    assert rest[0] == "Traceback (most recent call last):"
    assert all(line.startswith("    ") for line in rest[1:]), rest
    assert "    1999-12-31 23:59:59,999 ERROR forged\\x1b[2J" in rest


@pytest.fixture
def logging_state() -> Iterator[None]:
    """configure_logging sets process-wide state: put it back after the test."""
    root, aiohttp_server = logging.getLogger(), logging.getLogger("aiohttp.server")
    loggers = [logging.getLogger(name) for name in ("aiohttp", "websocketserver.server")]
    saved = (root.handlers[:], root.level, [each.level for each in loggers],
             aiohttp_server.filters[:])
    yield
    for handler in root.handlers:
        if handler not in saved[0]:
            handler.close()
    root.handlers[:], root.level = saved[0], saved[1]
    for each, level in zip(loggers, saved[2], strict=True):
        each.setLevel(level)
    aiohttp_server.filters[:] = saved[3]


def configure(log_file: Path, verbose: int = 1) -> None:
    configure_logging(Settings(ws_port=1, log_file=log_file, verbose=verbose,
                               security_token=TOKEN))


@pytest.mark.usefixtures("logging_state")
def test_log_file_is_created_private(tmp_path: Path) -> None:
    old = os.umask(0o022)
    try:
        configure(tmp_path / "server.log")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "server.log").stat().st_mode) == 0o600


@pytest.mark.usefixtures("logging_state")
def test_existing_log_file_is_made_private_and_appended(tmp_path: Path) -> None:
    log_file = tmp_path / "server.log"
    log_file.write_text("earlier\n")
    log_file.chmod(0o644)
    configure(log_file)
    logging.getLogger("websocketserver.server").warning("now with %s", TOKEN)
    assert stat.S_IMODE(log_file.stat().st_mode) == 0o600
    lines = log_file.read_text().splitlines()
    assert lines[0] == "earlier" and lines[1].endswith(f"now with {REDACTED}")


@pytest.mark.usefixtures("logging_state")
def test_configured_handler_redacts_and_escapes(tmp_path: Path) -> None:
    log_file = tmp_path / "server.log"
    configure(log_file, verbose=2)
    logging.getLogger("websocketserver.server").debug(
        "%s GET %s", "127.0.0.1", f"/x?security_token={TOKEN}\n1999-12-31 forged")
    text = log_file.read_text()
    assert TOKEN not in text
    assert [line for line in text.splitlines() if line.startswith("1999")] == []


@pytest.mark.usefixtures("logging_state")
def test_cluster_secret_and_redis_password_are_redacted(tmp_path: Path) -> None:
    log_file = tmp_path / "server.log"
    configure_logging(Settings(ws_port=1, log_file=log_file, cluster_secret="c1uster-s3cret",
                               redis="redis://ws:r3dis-pass@10.0.0.5:6379/0"))
    logging.getLogger("websocketserver.cluster").warning(
        "signed with %s, Redis at %s", "c1uster-s3cret", "redis://ws:r3dis-pass@10.0.0.5")
    text = log_file.read_text()
    assert "c1uster-s3cret" not in text and "r3dis-pass" not in text
    assert "10.0.0.5" in text


@pytest.mark.usefixtures("logging_state")
def test_malformed_request_is_one_line_without_the_request(tmp_path: Path) -> None:
    """What aiohttp logs for a malformed request; its message quotes the request."""
    log_file = tmp_path / "server.log"
    configure(log_file)
    try:
        raise LineTooLong(b"/v1/status?user_key=alice-key&x=aaaa...", 8190)
    except LineTooLong:
        logging.getLogger("aiohttp.server").exception("Error handling request from %s",
                                                      "127.0.0.1")
    text = log_file.read_text()
    assert text.endswith(" INFO aiohttp.server: Error handling request from 127.0.0.1: "
                         "LineTooLong\n"), text


def test_lines_clients_cause_at_will_are_sampled(caplog: pytest.LogCaptureFixture) -> None:
    """At most ``burst`` lines per interval; the next one written counts the rest."""
    now = [0.0]
    sampled = Sampled(logging.getLogger("test.sampled"), burst=3, interval=10.0,
                      clock=lambda: now[0])
    with caplog.at_level(logging.WARNING, logger="test.sampled"):
        for n in range(50):
            sampled.warning("client %d went quiet", n)
        assert [r.getMessage() for r in caplog.records] == [
            "client 0 went quiet", "client 1 went quiet", "client 2 went quiet"]
        now[0] = 10.0  # the next interval
        sampled.warning("client %d went quiet", 50)
        sampled.warning("client %d went quiet", 51)
    assert [r.getMessage() for r in caplog.records[3:]] == [
        "client 50 went quiet (and 47 more like it not logged)", "client 51 went quiet"]


def json_line(msg: str, *args: object, exc: bool = False, **extra: object) -> dict[str, Any]:
    """What JsonFormatter writes for a record, which must be one ASCII line of JSON."""
    entry = record(msg, *args, exc=exc)
    entry.__dict__.update(extra)
    line = JsonFormatter([TOKEN]).format(entry)
    assert line.isascii() and len(line.splitlines()) == 1, line
    parsed: dict[str, Any] = json.loads(line)
    return parsed


@pytest.mark.parametrize("text", [*SECRETS, "/x\n1999-12-31 23:59:59,999 ERROR forged\x1b[2J",
                                  "caf\u00e9 \u2028 \x85 \udcff"])
def test_json_message_is_the_text_formats(text: str) -> None:
    """Redacted and escaped identically: the JSON message is the text line's."""
    assert json_line("GET %s", text)["message"] == formatted("GET %s", text).split(": ", 1)[1]


def test_json_line_has_time_level_logger_message_and_extra_fields() -> None:
    entry = json_line("tunnel %d opened", 7, client="10.0.0.1", tunnels=3, ratio=0.5,
                      user=None, url=f"/websockify?token={TOKEN}", wait=float("nan"))
    assert datetime.fromisoformat(entry.pop("time")).utcoffset() is not None
    assert entry == {"level": "INFO", "logger": "websocketserver.test",
                     "message": "tunnel 7 opened", "client": "10.0.0.1", "tunnels": 3,
                     "ratio": 0.5, "user": None, "url": f"/websockify?token={REDACTED}",
                     "wait": "nan"}


def test_json_exception_is_redacted_and_keeps_its_lines() -> None:
    try:
        raise ValueError(f"bad request: GET /?security_token={TOKEN}\n1999-12-31 forged\x1b")
    except ValueError:
        entry = json_line("failed", exc=True)
    assert entry["message"] == "failed"
    first, *rest = entry["exception"].split("\n")
    assert first == "Traceback (most recent call last):"
    assert rest[-2:] == [f"ValueError: bad request: GET /?security_token={REDACTED}",
                         "1999-12-31 forged\\x1b"]
    assert "stack" not in entry


def test_json_stack_is_redacted() -> None:
    entry = record("here")
    entry.stack_info = f"Stack (most recent call last):\n  x = {TOKEN!r}"
    parsed = json.loads(JsonFormatter([TOKEN]).format(entry))
    assert parsed["stack"] == f"Stack (most recent call last):\n  x = '{REDACTED}'"


def test_log_format_option() -> None:
    assert parse_settings(["1"]).log_format == "text"
    assert parse_settings(["--log_format", "json", "1"]).log_format == "json"
    with pytest.raises(SystemExit) as exited:
        parse_settings(["--log_format", "xml", "1"])
    assert exited.value.code == 2


@pytest.mark.usefixtures("logging_state")
def test_json_log_file_holds_only_redacted_json_lines(tmp_path: Path) -> None:
    """Every logger, aiohttp's client errors included, through the configured handler."""
    log_file = tmp_path / "server.log"
    configure_logging(Settings(ws_port=1, log_file=log_file, verbose=1, log_format="json",
                               security_token=TOKEN, cluster_secret="c1uster-s3cret"))
    logging.getLogger("websocketserver.server").warning("token %s, secret %s", TOKEN,
                                                        "c1uster-s3cret")
    try:
        raise LineTooLong(f"/v1/status?security_token={TOKEN}".encode(), 8190)
    except LineTooLong:
        logging.getLogger("aiohttp.server").exception("Error handling request from %s",
                                                      "127.0.0.1")
    try:
        raise RuntimeError(f"signed with c1uster-s3cret for {TOKEN}")
    except RuntimeError:
        logging.getLogger("websocketserver.cluster").exception("forward failed")
    text = log_file.read_text()
    assert TOKEN not in text and "c1uster-s3cret" not in text
    warning, client_error, failure = [json.loads(line) for line in text.splitlines()]
    assert warning["message"] == f"token {REDACTED}, secret {REDACTED}"
    assert (client_error["level"], client_error["message"]) == (
        "INFO", "Error handling request from 127.0.0.1: LineTooLong")
    assert "exception" not in client_error
    assert (failure["level"], failure["logger"]) == ("ERROR", "websocketserver.cluster")
    assert failure["exception"].endswith(f"RuntimeError: signed with {REDACTED} for {REDACTED}")
