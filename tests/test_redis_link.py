"""The store's pipelined Redis connection against a real redis-server: replies matched
to calls, error replies kept apart, a broken connection retried, a forgotten script
loaded again, a silent Redis timed out."""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

import pytest
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError

from websocketserver.cluster.redis_link import RedisLink

if TYPE_CHECKING:
    from cluster_support import RedisServer

pytest_plugins = ["cluster_support"]

ECHO = "if ARGV[1] % 7 == 3 then return redis.error_reply('odd ' .. ARGV[1]) end " \
       "return ARGV[1]"


@pytest.fixture
async def link(redis_server: RedisServer) -> AsyncIterator[RedisLink]:
    """A link as the store's ACL user (the rights docs/cluster.md gives)."""
    link = RedisLink(redis_server.url, timeout=0.5, connect_timeout=0.5)
    yield link
    await link.close()


def connections(redis_server: RedisServer, user: str = "websocketserver") -> int:
    with redis_server.client() as client:
        return sum(1 for c in client.client_list() if c["user"] == user)


async def test_calls_made_together_share_one_connection_each_gets_its_reply(
        link: RedisLink, redis_server: RedisServer) -> None:
    replies = await asyncio.gather(*(link.script(ECHO, [], [i]) for i in range(400)),
                                   return_exceptions=True)
    for i, reply in enumerate(replies):
        if i % 7 == 3:
            assert isinstance(reply, ResponseError) and str(reply) == f"odd {i}"
        else:
            assert reply == str(i)
    assert connections(redis_server) == 1
    assert await link.call("PING") == "PONG"  # the error replies left it in step


async def test_calls_cut_off_by_a_closed_connection_are_sent_again(
        redis_server: RedisServer) -> None:
    admin = redis_server.url.replace("websocketserver:", "admin:")
    link = RedisLink(admin, timeout=2, connect_timeout=1)
    try:
        first = await link.call("CLIENT", "ID")
        # Redis closes the connection after the kill: the pings queued behind it are
        # never answered there, and go again on a new connection. (The kill's own
        # answer may be lost with the connection too; sent again, it finds no client.)
        kill, *pings = await asyncio.gather(
            link.call("CLIENT", "KILL", "ID", first, "SKIPME", "no"),
            *(link.call("PING") for _ in range(20)))
        assert kill in (0, 1) and pings == ["PONG"] * 20
        assert await link.call("CLIENT", "ID") != first
    finally:
        await link.close()


async def test_a_restarted_redis_is_reconnected_and_its_scripts_loaded_again(
        link: RedisLink, redis_server: RedisServer) -> None:
    assert await link.script(ECHO, [], [1]) == "1"
    redis_server.restart()  # forgets the script, closes the connection
    assert await link.script(ECHO, [], [2]) == "2"
    with redis_server.client() as client:
        client.script_flush()
    assert await link.script(ECHO, [], [4]) == "4"


async def test_a_silent_redis_times_out_and_the_connection_is_replaced(
        link: RedisLink, redis_server: RedisServer) -> None:
    assert redis_server.proc is not None
    assert await link.call("PING") == "PONG"
    redis_server.proc.send_signal(signal.SIGSTOP)
    try:
        began = time.monotonic()
        with pytest.raises(TimeoutError):
            await asyncio.gather(*(link.call("PING") for _ in range(5)))
        assert time.monotonic() - began < 0.5 + 0.3
    finally:
        redis_server.proc.send_signal(signal.SIGCONT)
    assert await link.call("PING") == "PONG"
    deadline = time.monotonic() + 5
    while connections(redis_server) != 1:  # the stalled one was closed
        assert time.monotonic() < deadline
        await asyncio.sleep(0.05)


async def test_redis_down_fails_at_once(link: RedisLink, redis_server: RedisServer) -> None:
    redis_server.kill()
    began = time.monotonic()
    with pytest.raises(RedisConnectionError):
        await link.call("PING")
    assert time.monotonic() - began < 0.5
