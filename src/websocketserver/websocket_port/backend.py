"""The backend connection of a tunnel: a connected non-blocking TCP socket.

The connect is done here rather than by uvloop's ``sock_connect``, which would
resolve the address again, through its thread pool; an IP address is parsed once and
remembered.
"""

from __future__ import annotations

import asyncio
import os
import socket

CONNECT_TIMEOUT = 10.0


class BackendError(Exception):
    """The TCP backend could not be reached; the message is a close reason."""


async def connect(host: str, port: int, timeout: float = CONNECT_TIMEOUT) -> socket.socket:
    """A socket connected to ``host:port`` with TCP_NODELAY, or :class:`BackendError`."""
    loop = asyncio.get_running_loop()
    try:
        return await _open_socket(loop, host, port, loop.time() + timeout)
    except TimeoutError:
        raise BackendError(f"backend {host}:{port} did not answer") from None
    except OSError as exc:
        raise BackendError(f"cannot connect to backend {host}:{port}: "
                           f"{exc.strerror or exc}") from None


_Address = tuple[int, int, int, tuple[object, ...]]  # family, type, proto, sockaddr
_numeric: dict[tuple[str, int], list[_Address]] = {}


async def _addresses(loop: asyncio.AbstractEventLoop, host: str, port: int) -> list[_Address]:
    """The addresses to try for ``host``: an IP address is parsed once and remembered
    (no trip through the resolver's threads); a name is looked up every time."""
    known = _numeric.get((host, port))
    if known is not None:
        return known
    try:
        found = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                   flags=socket.AI_NUMERICHOST)
        numeric = True
    except socket.gaierror:
        found = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        numeric = False
    addresses: list[_Address] = [(family, kind, proto, address)
                                  for family, kind, proto, _, address in found]
    if numeric and len(_numeric) < 1024:
        _numeric[(host, port)] = addresses
    return addresses


def _resolve(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


async def _open_socket(loop: asyncio.AbstractEventLoop, host: str, port: int,
                       deadline: float) -> socket.socket:
    """A connected non-blocking TCP socket: each address of ``host`` in turn, until
    ``deadline`` (loop time). The connect is done here rather than by uvloop's
    ``sock_connect``, which would resolve the address again, through its thread pool."""
    error: OSError | None = None
    for family, kind, proto, address in await _addresses(loop, host, port):
        sock = socket.socket(family, kind, proto)
        try:
            sock.setblocking(False)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            try:
                sock.connect(address)
                return sock
            except (BlockingIOError, InterruptedError):
                pass
            connected = loop.create_future()
            fd = sock.fileno()
            loop.add_writer(fd, _resolve, connected)
            timer = loop.call_at(deadline, connected.cancel)
            try:
                await connected
            except asyncio.CancelledError:
                if not connected.cancelled() or loop.time() < deadline:
                    raise  # cancelled from outside, not by the timer
                raise TimeoutError from None
            finally:
                timer.cancel()
                loop.remove_writer(fd)
            code = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if code:
                raise OSError(code, os.strerror(code))
            return sock
        except OSError as exc:
            sock.close()
            error = exc
        except BaseException:
            sock.close()
            raise
    raise error or OSError(f"no address for {host}")
