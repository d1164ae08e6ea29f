"""Who may use and see a token (pure rules). The stores' behaviour is the contract suite
of ``test_store_contract.py``, run against memory and Redis alike."""

from __future__ import annotations

from websocketserver.sessions.reservations import Reservation, may_see, may_use


def test_who_may_use_and_see_a_token() -> None:
    alices = Reservation("t", "svc", 0, {}, owner="alice")
    anonymous = Reservation("u", "svc", 1, {})
    assert may_use(alices, "alice") and may_use(alices, None) and not may_use(alices, "bob")
    assert may_see(alices, "alice") and not may_see(alices, None)
    assert not may_see(alices, "bob")
    assert all(may_use(anonymous, u) and may_see(anonymous, u) for u in (None, "bob"))
