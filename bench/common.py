"""Shared wire protocol and small helpers for the benchmark processes.

Every benchmark connection starts with a fixed-size header that tells the
backend what to do.  The proxies forward it as raw bytes like any other data.
"""

from __future__ import annotations

import json
import resource
import socket
import struct
import sys
from typing import Any

HEADER = struct.Struct("!4sQQ")
"""mode tag, total byte count, write size."""

ACK = struct.Struct("!Q")
"""Sent by the backend after it has sunk ``total`` bytes: the count it received."""

MODE_DOWN = b"DOWN"
"""Backend writes ``total`` bytes in ``chunk``-sized writes."""

MODE_UP = b"UP\0\0"
"""Backend reads ``total`` bytes, then sends an ACK with the count."""

MODE_ECHO = b"ECHO"
"""Backend echoes everything after the header."""

HOST = "127.0.0.1"


class BenchError(Exception):
    """A run that must be reported as an error, not as a number."""


def header(mode: bytes, total: int = 0, chunk: int = 0) -> bytes:
    """Encode a backend command header."""
    return HEADER.pack(mode, total, chunk)


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that is free right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


def raise_nofile_limit() -> int:
    """Raise this process's soft RLIMIT_NOFILE to the hard limit; return it."""
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


def send_json(obj: dict[str, Any]) -> None:
    """Write one JSON line to stdout (the control channel of worker processes)."""
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()
