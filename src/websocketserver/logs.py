"""Logging: where the log goes, and what may never be in it.

Every line is formatted by :class:`SafeFormatter`, which

* redacts secrets: the configured security token and cluster secret, the --redis
  password, the values of ``security_token=``,
  ``token=`` and ``user_key=`` parameters and of ``Authorization`` and ``X-User-Key``
  headers, and anything shaped like a reservation token (a GUID); and
* escapes control characters (C0, DEL, C1, U+2028/2029, lone surrogates), so text
  a client sent (a decoded ``%0a`` in a path) cannot forge a line.

It works on the formatted text, so it covers arguments and exceptions as well as the
message. ``--log_format json`` writes each record as one JSON object a line
(:class:`JsonFormatter`) for log shippers, redacted and escaped the same way. A
``--log_file`` is created readable by its owner only (0600).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import re
import stat
import sys
import time
from collections.abc import Callable, Iterable
from datetime import UTC, datetime
from pathlib import Path
from types import TracebackType
from typing import Any, TextIO, TypeAlias
from urllib.parse import quote, urlsplit

from aiohttp.http_exceptions import HttpProcessingError

from .settings import Settings

REDACTED = "***"
FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"

_PARAMETER = re.compile(r"(?i)(?<![\w-])((?:security_)?token|user_key)=[^&\s'\"#]*")
_HEADER = re.compile(r"(?i)(?<![\w-])(authorization|x-user-key)(['\"]?[ \t]*:[ \t]*['\"]?)"
                     r"[^\r\n'\"]*")
_GUID = re.compile(r"(?i)(?<![0-9a-f])[0-9a-f]{8}(?:-[0-9a-f]{4}){3}-[0-9a-f]{12}(?![0-9a-f])")
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029\ud800-\udfff]")
_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}
_ExcInfo: TypeAlias = (tuple[type[BaseException], BaseException, TracebackType | None]
                       | tuple[None, None, None])
_PARSER_REASON = re.compile(r"([A-Za-z][A-Za-z ]*):\n")
"""What llhttp says is wrong, from aiohttp's message (the request bytes follow it)."""


def escape(text: str) -> str:
    """``text`` with every control character written as a backslash escape."""
    return _CONTROL.sub(_escape_one, text)


def _escape_one(match: re.Match[str]) -> str:
    char = match.group()
    code = ord(char)
    return _NAMED.get(char) or (f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}")


class SafeFormatter(logging.Formatter):
    """Redacts ``secrets`` (and the patterns above) and escapes control characters.

    The message is kept on one line. A traceback keeps its line breaks (it is the
    server's own text) but every line of it after the first is indented, so no line
    of it can pass for a log record either.
    """

    def __init__(self, secrets: Iterable[str] = (), fmt: str = FORMAT) -> None:
        super().__init__(fmt)
        forms = {form for secret in secrets if secret
                 for form in (secret, quote(secret, safe=""), _bytes_repr(secret))}
        self._secrets = sorted(forms, key=len, reverse=True)  # a longer form first

    def redact(self, text: str) -> str:
        for secret in self._secrets:
            text = text.replace(secret, REDACTED)
        text = _PARAMETER.sub(rf"\1={REDACTED}", text)
        text = _HEADER.sub(rf"\1\2{REDACTED}", text)
        return _GUID.sub(REDACTED, text)

    def formatMessage(self, record: logging.LogRecord) -> str:
        return escape(self.redact(super().formatMessage(record)))

    def formatException(self, ei: _ExcInfo) -> str:
        return self._block(super().formatException(ei))

    def formatStack(self, stack_info: str) -> str:
        return self._block(super().formatStack(stack_info))

    def _block(self, text: str) -> str:
        lines = self.redact(text).split("\n")
        return "\n    ".join(escape(line) for line in lines)


_STANDARD = {*vars(logging.LogRecord("", 0, "", 0, "", None, None)), "message", "asctime"}
"""A record's own attributes; any other is an ``extra=`` field, written as one."""


class JsonFormatter(SafeFormatter):
    """One JSON object a line: ``time`` (ISO 8601, UTC), ``level``, ``logger``,
    ``message``, each ``extra=`` field, and ``exception`` / ``stack`` when there is one.

    Every text in it is the text format's (redacted, control characters escaped; a
    traceback keeps its line breaks, which JSON escapes), and the line is ASCII, so no
    character in it can end it early for a reader that splits on more than ``\\n``.
    """

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(
                timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": escape(self.redact(record.getMessage())),
        }
        if record.exc_info:
            entry["exception"] = self._lines(logging.Formatter.formatException(
                self, record.exc_info))
        if record.stack_info:
            entry["stack"] = self._lines(record.stack_info)
        for key, value in vars(record).items():
            if key not in _STANDARD and key not in entry:
                entry[key] = value if _number(value) else escape(self.redact(str(value)))
        return json.dumps(entry, ensure_ascii=True)

    def _lines(self, text: str) -> str:
        return "\n".join(escape(line) for line in self.redact(text).split("\n"))


def _number(value: object) -> bool:
    """A JSON number (or true, false, null), written as such rather than as text."""
    return value is None or isinstance(value, bool | int) or (
        isinstance(value, float) and math.isfinite(value))


class Sampled:
    """A kind of log line any client can cause at will (a connection that sends
    nothing, a refused upgrade): at most ``burst`` of them per ``interval`` seconds are
    written, the rest counted, and the next one written says how many were left out.
    So a flood of such clients costs the log a few lines per interval, not one each."""

    def __init__(self, logger: logging.Logger, burst: int = 10, interval: float = 10.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._logger = logger
        self._burst = burst
        self._interval = interval
        self._clock = clock
        self._began = -math.inf
        self._written = 0
        self._left_out = 0

    def warning(self, message: str, *args: object) -> None:
        now = self._clock()
        if now - self._began >= self._interval:
            self._began, self._written = now, 0
        if self._written >= self._burst:
            self._left_out += 1
            return
        self._written += 1
        if self._left_out:
            message += " (and %d more like it not logged)"
            args = (*args, self._left_out)
            self._left_out = 0
        self._logger.warning(message, *args)


def _bytes_repr(secret: str) -> str:
    """How the secret appears in a ``repr()`` of the request bytes (aiohttp's errors)."""
    return repr(secret.encode())[2:-1]


def configure_logging(settings: Settings) -> None:
    """``--verbose``: 0 warnings, 1 one line per tunnel and service event, 2+ debug."""
    if settings.log_file is not None:
        handler: logging.Handler = logging.StreamHandler(_open_private(settings.log_file))
    else:
        handler = logging.StreamHandler(sys.stdout)
    secrets = [secret for secret in (settings.security_token, settings.cluster_secret,
                                     _password(settings.redis)) if secret]
    formatter = JsonFormatter if settings.log_format == "json" else SafeFormatter
    handler.setFormatter(formatter(secrets))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    level = logging.WARNING if settings.verbose <= 0 else (
        logging.INFO if settings.verbose == 1 else logging.DEBUG)
    root.setLevel(level)
    if settings.verbose < 3:
        logging.getLogger("aiohttp").setLevel(max(level, logging.INFO))
        logging.getLogger("aiohttp.server").addFilter(_ClientError(level))
    # start and stop are always reported
    logging.getLogger("websocketserver.server").setLevel(min(level, logging.INFO))


def _password(url: str | None) -> str | None:
    """The password in a ``--redis`` URL, if it has one (it is a secret like the rest)."""
    return urlsplit(url).password if url else None


def _open_private(path: Path) -> TextIO:
    """Open ``path`` for appending, created 0600; an existing regular file is made
    0600 too when we own it (the log holds client addresses and user names)."""
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    try:
        if os.name == "posix" and stat.S_ISREG(os.fstat(fd).st_mode):
            with contextlib.suppress(PermissionError):  # not ours: its owner chose
                os.fchmod(fd, 0o600)
        return open(fd, "a", encoding="utf-8", errors="backslashreplace")
    except BaseException:
        os.close(fd)
        raise


class _ClientError(logging.Filter):
    """aiohttp logs a client's malformed request as an error with a traceback; it is
    the client's fault, not the server's: make it one INFO line (tracebacks: -v 3),
    without the request bytes that aiohttp's message quotes (they may hold secrets).
    A handler's own exception (a 500) stays an error with its traceback."""

    def __init__(self, level: int) -> None:
        super().__init__()
        self.level = level

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        if isinstance(error, HttpProcessingError):
            reason = _PARSER_REASON.match(error.message)
            detail = f": {reason.group(1)}" if reason else ""
            record.msg = f"{record.getMessage()}: {type(error).__name__}{detail}"
            record.args = None
            record.exc_info = record.exc_text = None
            record.levelno, record.levelname = logging.INFO, "INFO"
        return record.levelno >= self.level
