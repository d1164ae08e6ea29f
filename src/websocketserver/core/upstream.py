"""What a tunnel holds of the browser's, without I/O: the bookkeeping of ``tunnel.py``.

A :class:`UpstreamQueue` is told what happened (frames appended, bytes the backend
socket took, what picows holds, pings, the browser's transport filling and
draining) and answers what to do (send now, pause the browser, close with 1009,
send a pong); the :class:`~.tunnel.Tunnel` makes the socket calls. So the rules
are tested with integers, and no asyncio, picows or socket is imported here.

* **Bytes for the backend**: the frames of one read of the browser's socket form a
  batch, queued behind whatever the backend socket has not taken yet, and sent in
  order; a buffer the socket took in part stays queued as the view of its rest.
  Before the backend is connected, up to ``HIGH_WATER`` bytes are held; beyond,
  the browser's socket should stop being read.
* **The budget**: picows holds a frame whole until its last byte, and its read
  buffer keeps the size it grew to. What a tunnel holds beyond ``HIGH_WATER``
  (twice its largest partial frame, plus bytes waiting for the backend) is charged
  to the process's :class:`UpstreamBudget`; a tunnel that would exceed it is to be
  closed with 1009, so many tunnels of large messages cannot exhaust memory
  together. The charge is recomputed only when the peak grows or the waiting bytes
  change, and refunded whole when the tunnel ends.
* **Pongs**: while the browser's transport is above ``HIGH_WATER``, pings are
  answered by one pong, with the latest payload, once it drains (RFC 6455 5.5.3
  allows answering only the most recent ping), so a ping flood from a browser that
  never reads queues nothing.
"""

from __future__ import annotations

HIGH_WATER = 1024 * 1024
"""Bytes waiting in one direction before the sending side stops being read."""


class UpstreamBudget:
    """Upstream bytes that the tunnels of one process hold beyond ``HIGH_WATER`` each.

    One per process (the main one and each relay): ``--max_upstream_buffer``.
    """

    __slots__ = ("limit", "used")

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0


class UpstreamQueue:
    """One tunnel's upstream bookkeeping: its queue, its charge, its owed pong.

    ``batch`` and ``unsent`` are read by the tunnel, which hands ``unsent`` to
    ``sendmsg``; they change only through the methods.
    """

    __slots__ = ("batch", "unsent", "unsent_bytes", "connected", "pending", "peak",
                 "charged", "ended", "full", "pong", "budget")

    def __init__(self, budget: UpstreamBudget) -> None:
        self.budget = budget
        self.batch: list[bytes] = []  # the frames of the current read of the browser
        self.unsent: list[bytes | memoryview] = []  # what the backend has not taken
        self.unsent_bytes = 0  # the bytes in unsent
        self.connected = False  # the backend is connected: batches are sent
        self.pending = 0  # bytes appended before the backend was connected
        self.peak = 0  # the most picows held: its read buffer keeps that size
        self.charged = 0  # what this tunnel holds of the budget
        self.ended = False  # refunded: nothing more is charged
        self.full = False  # the browser's transport is above HIGH_WATER
        self.pong: bytes | None = None  # the pong owed once it drains

    # -- the queue ----------------------------------------------------------------

    def append(self, data: bytes) -> bool:
        """Add one frame's payload to the batch. True: stop reading the browser (more
        than ``HIGH_WATER`` bytes wait for a backend not connected yet)."""
        self.batch.append(data)
        if self.connected:
            return False
        self.pending += len(data)
        return self.pending > HIGH_WATER

    def flush(self) -> bool:
        """Queue the batch behind what waits (so the order is kept). True: nothing
        waited, send now; else the socket is full and its writability will send."""
        batch = self.batch
        waiting = bool(self.unsent)
        self.unsent.extend(batch)
        self.unsent_bytes += sum(map(len, batch))
        batch.clear()
        return not waiting

    def advance(self, sent: int, chunk: list[bytes | memoryview]) -> bool:
        """The socket took ``sent`` bytes of ``chunk``, the head of ``unsent`` that it
        was offered: drop what went, keep the rest of a buffer it took in part. True:
        it took all of ``chunk`` (it may take more)."""
        self.unsent_bytes -= sent
        done = 0
        for buf in chunk:
            if sent < len(buf):
                break
            sent -= len(buf)
            done += 1
        unsent = self.unsent
        del unsent[:done]
        if sent:
            unsent[0] = memoryview(unsent[0])[sent:]
        return done == len(chunk)

    def clear(self) -> None:
        """Drop everything queued: the backend is gone."""
        self.batch.clear()
        self.unsent.clear()
        self.unsent_bytes = 0

    # -- the budget ---------------------------------------------------------------

    def held(self, unparsed: int) -> bool:
        """picows holds ``unparsed`` bytes that are not a whole frame yet, after a
        read: charge it if that is more than ever. False: over budget (close with
        1009)."""
        if unparsed > self.peak:
            self.peak = unparsed
            return self.charge()
        return True

    def charge(self) -> bool:
        """Bring this tunnel's charge to what it holds beyond ``HIGH_WATER`` now. False:
        the increase would exceed the budget, nothing is charged (close with 1009).
        A decrease is always refunded."""
        if self.ended:
            return True
        charge = max(0, 2 * self.peak + self.unsent_bytes - HIGH_WATER)
        budget = self.budget
        if charge > self.charged and budget.used + charge - self.charged > budget.limit:
            return False
        budget.used += charge - self.charged
        self.charged = charge
        return True

    def end(self) -> None:
        """The browser's connection is gone: give the charge back, charge no more."""
        self.budget.used -= self.charged
        self.charged = 0
        self.ended = True

    # -- pongs --------------------------------------------------------------------

    def ping(self, payload: bytes) -> bool:
        """A ping came. True: answer it now; False: the browser's transport is full,
        the pong is owed (only the latest ping's) until :meth:`drained`."""
        if self.full:
            self.pong = payload
            return False
        return True

    def filled(self) -> None:
        """The browser's transport went above ``HIGH_WATER``."""
        self.full = True

    def drained(self) -> bytes | None:
        """The browser's transport went below its low-water mark: the pong owed, if any
        (once)."""
        self.full = False
        pong, self.pong = self.pong, None
        return pong
