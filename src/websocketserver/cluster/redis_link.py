"""One pipelined connection to Redis, for the reservation store's script calls.

Why not redis-py's connection pool: it gives each call in flight a connection of its
own and costs 150-250 us of CPU per call; with dozens of reservations in flight that,
not Redis, bounded a cluster's reservations per second. Here every call is written at
once to one connection and the replies are matched to the calls in order (Redis
answers a connection's commands in the order it got them), so calls made together
share a write and a read: about 40 us of CPU a call (measured 2026-11-30, 32 calls in
flight). redis-py still speaks the protocol: it connects (redis://, rediss://,
unix://, AUTH, SELECT), packs the commands and parses the replies.

A call that finds the connection broken (Redis restarted, or the network failed) is
sent once more on a new connection; a call that takes longer than ``timeout`` closes
the connection, so that later calls do not queue behind a Redis that stopped answering.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
from collections import deque
from collections.abc import Sequence
from typing import Any

from redis.asyncio.connection import AbstractConnection, ConnectionPool
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError, RedisError, ResponseError


class _Pipe:
    """An open connection, the calls waiting for their replies (oldest first) and the
    task that reads the replies."""

    def __init__(self, connection: AbstractConnection) -> None:
        self.connection = connection
        self.waiting: deque[asyncio.Future[Any]] = deque()
        self.broken = False
        self.reader = asyncio.create_task(self._read())

    async def send(self, args: Sequence[str | int]) -> Any:
        """Send one command and wait for its reply."""
        reply: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        # Queued with no await before the write in send_packed_command, so the
        # queue's order is the wire's order.
        self.waiting.append(reply)
        try:
            await self.connection.send_packed_command(
                self.connection.pack_command(*args), check_health=False)
        except (RedisError, OSError) as error:
            self.fail(RedisConnectionError(f"sending to Redis failed: {error}"))
        return await reply

    async def _read(self) -> None:
        """Give each reply to the oldest waiting call; on a broken connection, fail them
        all (they may be sent again on a new one)."""
        try:
            while True:
                try:
                    value: Any = await self.connection.read_response()
                except ResponseError as error:  # an error reply: that call's alone
                    value = error
                if not self.waiting:  # nothing sent asks for it: the stream is not ours
                    raise RedisConnectionError("a reply no call was waiting for")
                waiter = self.waiting.popleft()
                if waiter.done():  # its caller gave up (a timeout)
                    continue
                if isinstance(value, ResponseError):
                    waiter.set_exception(value)
                else:
                    waiter.set_result(value)
        except (RedisError, OSError) as error:
            self.fail(RedisConnectionError(f"connection to Redis lost: {error}"))

    def fail(self, error: RedisConnectionError) -> None:
        """Mark the connection broken and fail every waiting call with ``error``."""
        self.broken = True
        while self.waiting:
            waiter = self.waiting.popleft()
            if not waiter.done():
                waiter.set_exception(error)

    async def close(self) -> None:
        """Stop reading, fail what still waits, and close the connection."""
        self.broken = True
        self.reader.cancel()
        await asyncio.gather(self.reader, return_exceptions=True)
        self.fail(RedisConnectionError("connection to Redis closed"))
        with contextlib.suppress(RedisError, OSError):
            await self.connection.disconnect(nowait=True)


class RedisLink:
    """Commands to the Redis at ``url`` over one pipelined connection, opened on first
    use. ``connect_timeout`` bounds opening the connection, ``timeout`` a whole call
    (with its one retry); a call failing raises :class:`redis.exceptions.RedisError`
    or :class:`TimeoutError`. Call :meth:`close` at the end."""

    def __init__(self, url: str, timeout: float, connect_timeout: float) -> None:
        self.timeout = timeout
        # No socket timeout: the reader waits for replies as long as calls wait for
        # them, and each call has its own deadline.
        self._pool = ConnectionPool.from_url(
            url, decode_responses=True, socket_timeout=None,
            socket_connect_timeout=connect_timeout, socket_keepalive=True)
        self._pipe: _Pipe | None = None
        self._connecting = asyncio.Lock()
        self._hashes: dict[str, str] = {}

    async def call(self, *args: str | int) -> Any:
        """Send one command and return its reply."""
        pipe: _Pipe | None = None
        try:
            async with asyncio.timeout(self.timeout):
                pipe = await self._open()
                try:
                    return await pipe.send(args)
                except RedisConnectionError:  # a broken connection: once more, anew
                    pipe = await self._open()
                    return await pipe.send(args)
        except TimeoutError:
            if pipe is self._pipe:  # not one another call already replaced
                await self._drop()
            raise

    async def script(self, source: str, keys: Sequence[str], args: Sequence[str | int]
                     ) -> Any:
        """Run the Lua script ``source`` by its hash, loading it first if Redis does not
        know it (a restarted Redis forgets scripts)."""
        digest = self._hashes.get(source)
        if digest is None:
            digest = self._hashes[source] = hashlib.sha1(source.encode()).hexdigest()
        try:
            return await self.call("EVALSHA", digest, len(keys), *keys, *args)
        except NoScriptError:
            return await self.call("EVAL", source, len(keys), *keys, *args)

    async def close(self) -> None:
        """Close the connection; calls still waiting fail."""
        await self._drop()

    async def _open(self) -> _Pipe:
        """The open connection, opened now if there is none or it broke."""
        if (pipe := self._usable()) is not None:
            return pipe
        async with self._connecting:
            if (pipe := self._usable()) is not None:  # another call connected meanwhile
                return pipe
            await self._drop()
            connection = self._pool.make_connection()  # type: ignore[no-untyped-call]  # not annotated in redis-py
            try:
                await connection.connect()
            except BaseException:
                with contextlib.suppress(RedisError, OSError):
                    await connection.disconnect(nowait=True)
                raise
            self._pipe = _Pipe(connection)
            return self._pipe

    def _usable(self) -> _Pipe | None:
        """The open connection if it still works. (is_connected too: redis-py closes a
        failed connection before the reader sees the failure, and its send would then
        quietly open a new one that no reader reads.)"""
        pipe = self._pipe
        if pipe is not None and not pipe.broken and pipe.connection.is_connected:
            return pipe
        return None

    async def _drop(self) -> None:
        pipe, self._pipe = self._pipe, None
        if pipe is not None:
            await pipe.close()
