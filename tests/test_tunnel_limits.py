"""The tunnel limits: the total, per client and per user, and what a refusal leaves."""

from __future__ import annotations

import pytest

from websocketserver.core.errors import Refused
from websocketserver.websocket_port.tunnel_limits import TunnelLimits


def test_the_total_limit_refuses_with_503() -> None:
    limits = TunnelLimits(2, 10, 10)
    limits.acquire("a", None)
    limits.acquire("b", None)
    with pytest.raises(Refused) as refused:
        limits.acquire("c", None)
    assert (refused.value.status, refused.value.reason) == (
        503, "server is at its limit of 2 tunnels")
    limits.release("a", None)
    limits.acquire("c", None)
    assert limits.total == 2


def test_per_client_and_per_user_limits_refuse_with_429() -> None:
    limits = TunnelLimits(100, 2, 3)
    limits.acquire("10.0.0.1", "ann")
    limits.acquire("10.0.0.1", "ann")
    with pytest.raises(Refused) as refused:
        limits.acquire("10.0.0.1", None)
    assert (refused.value.status, refused.value.reason) == (
        429, "client 10.0.0.1 is at its limit of 2 tunnels")
    limits.acquire("10.0.0.2", "ann")
    with pytest.raises(Refused) as refused:
        limits.acquire("10.0.0.3", "ann")
    assert refused.value.reason == "user ann is at its limit of 3 tunnels"
    limits.acquire("10.0.0.3", "bob")  # another user, another client
    limits.acquire("10.0.0.3", None)  # anonymous: no per-user count
    assert limits.total == 5


def test_a_refusal_counts_nothing_and_a_release_gives_the_slot_back() -> None:
    limits = TunnelLimits(100, 1, 1)
    limits.acquire("a", "ann")
    for client, user in (("a", None), ("b", "ann")):
        with pytest.raises(Refused):
            limits.acquire(client, user)
    assert limits.total == 1
    limits.release("a", "ann")
    assert limits.total == 0
    limits.acquire("b", "ann")
    limits.acquire("a", None)


def test_many_clients_coming_and_going() -> None:
    """Far more distinct clients over time than are ever open at once: the counts
    of clients that left are dropped, and the others stay right."""
    limits = TunnelLimits(64, 2, 2)
    for n in range(3000):
        client = f"10.1.{n // 250}.{n % 250}"
        limits.acquire(client, f"user{n}")
        limits.acquire(client, None)
        if n >= 20:  # 20 clients stay at their limit throughout
            limits.release(client, f"user{n}")
            limits.release(client, None)
    assert limits.total == 40
    with pytest.raises(Refused):
        limits.acquire("10.1.0.5", None)
    limits.acquire("10.1.0.25", None)
