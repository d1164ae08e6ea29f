"""A reservation's life as one table of legal transitions (sans-I/O: no asyncio here).

Every store (memory, Redis) enforces this one table: a transition it does not list
raises :class:`IllegalTransition`, as h11's state machine raises on an event its
table does not allow. The Redis store's Lua scripts get the table from here
(:func:`table_json`), so the rules are written once.

::

    reserved --claimed--> starting --started--> active --left--> detached
    reserved --submitted--> queued --scheduled--> starting      (a batch scheduler)
    detached --reattached--> active        starting --given back--> reserved
    reserved, queued, starting, active, detached --stopping--> stopping
    any state but ended --ended--> ended   (stopped, reclaimed, released unused, or
                                            its instance is gone)

Each transition is one event (its name below), which a page may later be streamed.
An ended reservation stays readable for :data:`ENDED_KEPT` seconds with its
``end_reason``; its slot is free at once.
"""

from __future__ import annotations

import enum
import json


class State(enum.StrEnum):
    RESERVED = "reserved"
    QUEUED = "queued"  # submitted to a batch scheduler, waiting for its resources
    STARTING = "starting"
    ACTIVE = "active"
    DETACHED = "detached"  # started, its websocket gone: kept for a reconnect
    STOPPING = "stopping"
    ENDED = "ended"


TRANSITIONS: dict[State, dict[State, str]] = {
    State.RESERVED: {State.STARTING: "claimed", State.QUEUED: "submitted",
                     State.STOPPING: "stopping", State.ENDED: "ended"},
    State.QUEUED: {State.STARTING: "scheduled", State.STOPPING: "stopping",
                   State.ENDED: "ended"},
    State.STARTING: {State.ACTIVE: "started", State.RESERVED: "given back",
                     State.STOPPING: "stopping", State.ENDED: "ended"},
    State.ACTIVE: {State.DETACHED: "left", State.STOPPING: "stopping",
                   State.ENDED: "ended"},
    State.DETACHED: {State.ACTIVE: "reattached", State.STOPPING: "stopping",
                     State.ENDED: "ended"},
    State.STOPPING: {State.ENDED: "ended"},
    State.ENDED: {},
}
"""From each state, the states it may move to and the event's name."""

ENDED_KEPT = 300.0
"""Seconds an ended reservation stays readable (with its ``end_reason``)."""


class IllegalTransition(Exception):
    """A move the table does not allow: a bug in the caller, never a user's doing."""


def check(old: State, new: State) -> str:
    """The event of ``old`` -> ``new``; raises :class:`IllegalTransition` if illegal."""
    event = TRANSITIONS[old].get(new)
    if event is None:
        raise IllegalTransition(f"{old} -> {new} is not a legal transition")
    return event


def check_all(expected: tuple[State, ...], new: State) -> None:
    """Check a conditional move: from each of ``expected`` to ``new`` must be legal."""
    for old in expected:
        check(old, new)


def table_json() -> str:
    """The table as JSON (state -> [states it may move to]), for the Lua scripts."""
    return json.dumps({str(old): sorted(str(new) for new in moves)
                       for old, moves in TRANSITIONS.items()})
