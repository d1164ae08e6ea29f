"""What one token's holder is told of its session: ``/v1/status/{token}`` and each event
of ``/v1/events/{token}`` (the same fields); and its instance in ``/v1/status``.

Pure: the reservation (from any instance's store, ended ones included) and the clock
in, a JSON-able dict out. ``seconds_left`` is the time until the first of what ends the
session on its own (``ends`` says which): the reconnect grace of a detached session,
``--timeout`` of a reservation never used, the time limit of a running Slurm job.
"""

from __future__ import annotations

import time
from typing import Any

from ..core.lifecycle import State
from .job import SHOWN
from .reservations import Reservation

NOTHING: dict[str, object] = {"bytes_up": 0, "bytes_down": 0, "viewers": [],
                              "client": None, "backend": None, "pid": None}
"""What is known of a session that no instance has figures of (not yet started)."""
ADMIN_ONLY = ("client", "backend", "pid")
"""An instance's fields for the administrator only: where its user connects from,
and what serves the session where."""
WARNINGS = (300.0, 60.0)
"""Seconds before a session's end at which its event stream warns (5 and 1 minute)."""


def describe(reservation: Reservation, grace: float, timeout: float,
             now: float | None = None, wall: float | None = None) -> dict[str, Any]:
    """The token's session as its page sees it. ``grace``: its service's reconnect
    grace; ``timeout``: ``--timeout``; ``now`` the monotonic clock, ``wall`` the epoch
    (for a job's time limit), both read when not given."""
    now = time.monotonic() if now is None else now
    wall = time.time() if wall is None else wall
    job = reservation.job or {}
    left: list[tuple[float, str]] = []
    if reservation.state is State.RESERVED:
        left.append((reservation.changed + timeout - now, "timeout"))
    if reservation.state is State.DETACHED:
        left.append((reservation.changed + grace - now, "reconnect grace"))
    if job.get("ends_at") is not None and reservation.state is not State.ENDED:
        left.append((float(job["ends_at"]) - wall, "time limit"))
    seconds, ends = min(left) if left else (None, None)
    return {"service": reservation.service, "index": reservation.index,
            "state": str(reservation.state), "node": reservation.node,
            "job_id": job.get("job_id"), "job_node": job.get("job_node"),
            "queue_reason": job.get("queue_reason"),
            "expected_start": job.get("expected_start"),
            "seconds_left": None if seconds is None else round(max(0.0, seconds), 1),
            "ends": ends, "end_reason": reservation.end_reason}


def instance(reservation: Reservation, show_token: bool, admin: bool, grace: float,
             here: dict[str, object] | None) -> dict[str, Any]:
    """``reservation``'s instance in ``/v1/status``: its token only if ``show_token``,
    :data:`ADMIN_ONLY` fields to the ``admin``; ``here``: what this instance knows of
    its session (None: it runs on another instance, whose figures are the store's)."""
    carried = {**NOTHING, **(here if here is not None else reservation.figures or {})}
    found: dict[str, Any] = {
        "index": reservation.index, "token": reservation.token if show_token else None,
        "timestamp": reservation.timestamp, "options": reservation.options,
        "state": str(reservation.state), "owner": reservation.owner,
        **{key: value for key, value in carried.items()
           if admin or key not in ADMIN_ONLY}}
    if reservation.node is not None:
        found["node"] = reservation.node
    if reservation.job is not None:  # shared: any instance shows it
        found.update({key: reservation.job.get(key) for key in SHOWN})
    if reservation.state is State.DETACHED:
        found["detached_seconds_left"] = round(
            max(0.0, reservation.changed + grace - time.monotonic()), 1)
    return found
