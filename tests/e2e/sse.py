"""A server-sent events reader for the tests: what a browser's EventSource gets.

On a socket of its own (not urllib: closing a urllib response waits for the read that
another thread is blocked in), so that :meth:`EventReader.close` leaves at once, as a
closed page does.
"""

from __future__ import annotations

import json
import queue
import socket
import ssl
import threading
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit


@dataclass(frozen=True)
class Event:
    """One event of the stream (``data`` parsed as JSON)."""

    id: str | None
    data: dict[str, Any]


class EventReader:
    """GETs ``url`` (with ``headers``; https with ``context``) and reads its events in a
    thread until the stream ends: :meth:`next` takes them in order; :attr:`comments`
    counts the comments."""

    def __init__(self, url: str, headers: dict[str, str] | None = None,
                 timeout: float = 30, context: ssl.SSLContext | None = None) -> None:
        parts = urlsplit(url)
        host, port = parts.hostname or "127.0.0.1", parts.port or 80
        self._sock = socket.create_connection((host, port), timeout)
        if parts.scheme == "https":
            self._sock = (context or ssl.create_default_context()).wrap_socket(
                self._sock, server_hostname=host)
        self._sock.settimeout(None)
        lines = [f"GET {parts.path}?{parts.query} HTTP/1.1", f"Host: {host}:{port}",
                 "Accept: text/event-stream",
                 *(f"{name}: {value}" for name, value in (headers or {}).items())]
        self._sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())
        self._file = self._sock.makefile("rb")
        self.status = int(self._file.readline().split()[1])
        self.headers: dict[str, str] = {}
        while (line := self._file.readline().decode().rstrip("\r\n")):
            name, _, value = line.partition(":")
            self.headers[name.strip()] = value.strip()
        self.comments = 0
        self.ended = threading.Event()
        self._events: queue.Queue[Event] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _chunks(self) -> Any:
        """The body's bytes as they come (chunked transfer coding)."""
        while (size := int(self._file.readline().strip() or b"0", 16)):
            yield self._file.read(size)
            self._file.readline()

    def _read(self) -> None:
        event_id, data, buffer = None, [], b""
        try:
            for chunk in self._chunks():
                buffer += chunk
                while b"\n" in buffer:
                    raw, _, buffer = buffer.partition(b"\n")
                    line = raw.decode()
                    if line.startswith(":"):
                        self.comments += 1
                    elif line.startswith("id: "):
                        event_id = line[4:]
                    elif line.startswith("data: "):
                        data.append(line[6:])
                    elif not line and data:
                        self._events.put(Event(event_id, json.loads("\n".join(data))))
                        event_id, data = None, []
        except (OSError, ValueError):
            pass  # closed
        finally:
            self.ended.set()

    def next(self, timeout: float = 20) -> Event:
        return self._events.get(timeout=timeout)

    def close(self) -> None:
        try:
            self._sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self._sock.close()
