"""The upstream bookkeeping driven with integers and bytes: no socket, no picows."""

from __future__ import annotations

import ast
from pathlib import Path

from websocketserver.core import upstream
from websocketserver.core.upstream import HIGH_WATER, UpstreamBudget, UpstreamQueue

MiB = 1024 * 1024


def queue(limit: int = 1 << 40) -> tuple[UpstreamQueue, UpstreamBudget]:
    budget = UpstreamBudget(limit)
    up = UpstreamQueue(budget)
    up.connected = True
    return up, budget


# -- the queue ------------------------------------------------------------------------


def test_a_batch_is_sent_at_once_only_when_nothing_waits() -> None:
    up, _ = queue()
    assert not up.append(b"ab") and not up.append(b"cde")
    assert up.flush()  # the queue was empty: send now
    assert up.batch == [] and up.unsent == [b"ab", b"cde"] and up.unsent_bytes == 5
    up.append(b"f")
    assert not up.flush()  # behind what waits, in order: writability sends it
    assert up.unsent == [b"ab", b"cde", b"f"] and up.unsent_bytes == 6


def test_whole_sends_drop_buffers() -> None:
    up, _ = queue()
    up.append(b"ab")
    up.append(b"cde")
    up.append(b"f")
    up.flush()
    assert up.advance(5, up.unsent[:2])  # all it was offered: it may take more
    assert up.unsent == [b"f"] and up.unsent_bytes == 1
    assert up.advance(1, up.unsent[:1])
    assert up.unsent == [] and up.unsent_bytes == 0


def test_a_partial_send_keeps_the_rest_of_a_buffer() -> None:
    up, _ = queue()
    for data in (b"abcd", b"efgh", b"ij"):
        up.append(data)
    up.flush()
    assert not up.advance(6, up.unsent[:3])  # full: wait for writability
    assert [bytes(buf) for buf in up.unsent] == [b"gh", b"ij"]
    assert up.unsent_bytes == 4
    assert not up.advance(1, up.unsent[:2])  # a view of a view
    assert [bytes(buf) for buf in up.unsent] == [b"h", b"ij"]
    assert up.advance(3, up.unsent[:2])
    assert up.unsent == [] and up.unsent_bytes == 0


def test_a_send_of_nothing_keeps_everything() -> None:
    up, _ = queue()
    up.append(b"abc")
    up.flush()
    assert not up.advance(0, up.unsent[:1])
    assert up.unsent == [b"abc"] and up.unsent_bytes == 3


def test_empty_frames_count_as_sent() -> None:
    """An empty message is a buffer of no bytes: offered, it has gone."""
    up, _ = queue()
    for data in (b"ab", b"", b""):
        up.append(data)
    up.flush()
    assert up.advance(2, up.unsent[:3])
    assert up.unsent == []


def test_only_the_offered_head_is_advanced() -> None:
    """The socket is offered IOV_BATCH buffers at most: taking them all says it may
    take more, even with more queued behind them."""
    up, _ = queue()
    for data in (b"a", b"b", b"c", b"d"):
        up.append(data)
    up.flush()
    assert up.advance(2, up.unsent[:2])
    assert up.unsent == [b"c", b"d"] and up.unsent_bytes == 2


def test_before_the_backend_connects_high_water_is_held() -> None:
    up = UpstreamQueue(UpstreamBudget(1 << 40))
    assert not up.append(bytes(HIGH_WATER))  # up to HIGH_WATER: keep reading
    assert up.append(b"x")  # beyond: stop reading the browser
    up.connected = True
    assert up.flush()
    assert up.unsent_bytes == HIGH_WATER + 1
    assert not up.append(bytes(HIGH_WATER + 1))  # connected: the socket decides


def test_clear_drops_everything() -> None:
    up, _ = queue()
    up.append(b"abc")
    up.flush()
    up.append(b"d")
    up.clear()
    assert up.batch == [] and up.unsent == [] and up.unsent_bytes == 0


# -- the budget -----------------------------------------------------------------------


def test_up_to_high_water_is_free() -> None:
    up, budget = queue()
    assert up.held(HIGH_WATER // 2)  # 2 x the partial frame: exactly HIGH_WATER
    assert budget.used == 0 and up.charged == 0


def test_the_charge_follows_the_peak_only_when_it_grows() -> None:
    up, budget = queue()
    assert up.held(MiB)
    assert budget.used == up.charged == 2 * MiB - HIGH_WATER
    assert up.held(MiB // 2)  # less held: the read buffer keeps its size, so does the charge
    assert budget.used == 2 * MiB - HIGH_WATER
    assert up.held(3 * MiB)
    assert up.peak == 3 * MiB and budget.used == 6 * MiB - HIGH_WATER


def test_bytes_waiting_for_the_backend_are_charged_and_refunded() -> None:
    up, budget = queue()
    up.append(bytes(3 * MiB))
    up.flush()
    assert up.charge()
    assert budget.used == 3 * MiB - HIGH_WATER
    up.advance(2 * MiB, up.unsent[:1])
    assert up.charge()  # less waits: part of it is given back
    assert budget.used == up.charged == 0  # 1 MiB waits: within HIGH_WATER


def test_the_budget_is_shared_and_refunded_at_the_end() -> None:
    budget = UpstreamBudget(8 * MiB)
    first, second = UpstreamQueue(budget), UpstreamQueue(budget)
    assert first.held(2 * MiB)
    assert second.held(2 * MiB)
    assert budget.used == 2 * (4 * MiB - HIGH_WATER)
    first.end()
    assert budget.used == 4 * MiB - HIGH_WATER and first.charged == 0
    second.end()
    assert budget.used == 0


def test_overflow_charges_nothing() -> None:
    budget = UpstreamBudget(4 * MiB)
    up = UpstreamQueue(budget)
    assert up.held(2 * MiB)  # 3 MiB charged
    assert not up.held(3 * MiB)  # 5 MiB would exceed 4 MiB: close with 1009
    assert budget.used == up.charged == 3 * MiB


def test_a_budget_filled_by_others_refuses_any_growth() -> None:
    budget = UpstreamBudget(4 * MiB)
    budget.used = 4 * MiB
    up = UpstreamQueue(budget)
    assert up.held(HIGH_WATER // 2)  # nothing beyond HIGH_WATER: nothing to charge
    assert not up.held(HIGH_WATER // 2 + 1)
    assert budget.used == 4 * MiB


def test_a_decrease_is_refunded_even_over_budget() -> None:
    """The limit can only refuse growth: less waiting always gives back."""
    budget = UpstreamBudget(4 * MiB)
    up = UpstreamQueue(budget)
    up.connected = True
    up.append(bytes(4 * MiB))
    up.flush()
    assert up.charge()
    budget.used += 2 * MiB  # others' charges: over the limit now
    up.advance(MiB, up.unsent[:1])
    assert up.charge()
    assert up.charged == 2 * MiB and budget.used == 4 * MiB


def test_nothing_is_charged_after_the_end() -> None:
    """picows may report a read after the connection is gone: it must not leak into
    the budget."""
    up, budget = queue()
    assert up.held(MiB)
    up.end()
    assert up.held(8 * MiB) and up.charge()
    assert budget.used == up.charged == 0


# -- pongs ----------------------------------------------------------------------------


def test_pings_are_answered_at_once_while_the_browser_reads() -> None:
    up, _ = queue()
    assert up.ping(b"1")
    assert up.drained() is None  # nothing owed


def test_while_full_only_the_latest_pong_is_owed_once() -> None:
    up, _ = queue()
    up.filled()
    for payload in (b"1", b"2", b"3"):
        assert not up.ping(payload)
    assert up.drained() == b"3"
    assert up.drained() is None  # once
    assert up.ping(b"4")  # drained: at once again


def test_an_empty_ping_is_owed_too() -> None:
    up, _ = queue()
    up.filled()
    assert not up.ping(b"")
    assert up.drained() == b""


def test_no_io_is_imported() -> None:
    """Part of the sans-I/O core: no asyncio, picows or socket behind these rules."""
    tree = ast.parse(Path(upstream.__file__).read_text())
    imported = {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import)
                for alias in node.names}
    imported |= {node.module or "" for node in ast.walk(tree)
                 if isinstance(node, ast.ImportFrom)}
    assert imported == {"__future__"}
