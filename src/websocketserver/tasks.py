"""Background tasks with an owner that awaits them and logs their failures once.

Every task the server starts belongs to a :class:`Tasks` of the component that started
it, which waits for them (or cancels them) when it closes, in reverse order of start-up
like the rest. ``asyncio.TaskGroup`` would cancel a failed task's siblings; here a
task's error ends only its own connection or session: it is logged once, with the
task's label (a connection's peer or a session's id, never a token), and the others
go on. Without an owner, such an error surfaced only as asyncio's "exception was never
retrieved", outside the server's log.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, TypeVar

T = TypeVar("T")


class Tasks:
    """The running tasks of one owner; ``spawn`` them, then ``wait`` or ``cancel``."""

    def __init__(self, log: logging.Logger) -> None:
        self._log = log
        self._running: set[asyncio.Task[Any]] = set()

    def spawn(self, coroutine: Coroutine[Any, Any, T], label: str) -> asyncio.Task[T]:
        """Run ``coroutine`` as a task of this owner; ``label`` names it in the log."""
        task = asyncio.get_running_loop().create_task(coroutine, name=label)
        self._running.add(task)
        task.add_done_callback(self._finished)
        return task

    def retry(self, change: Callable[[], Awaitable[None]], label: str, every: float,
              errors: type[Exception]) -> None:
        """Try ``change`` again every ``every`` seconds, in a task, until it no longer
        raises ``errors`` (a store that does not answer: a slot is not held for ever)."""
        async def again() -> None:
            while True:
                await asyncio.sleep(every)
                with contextlib.suppress(errors):
                    await change()
                    return
        self.spawn(again(), label)

    def _finished(self, task: asyncio.Task[Any]) -> None:
        self._running.discard(task)
        if not task.cancelled() and (exc := task.exception()) is not None:
            self._log.error("%s failed: %s: %s", task.get_name(), type(exc).__name__, exc,
                            exc_info=exc)

    def __len__(self) -> int:
        return len(self._running)

    async def wait(self, timeout: float | None = None) -> None:
        """Wait until every task has ended (at most ``timeout`` seconds)."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                while self._running:
                    await asyncio.gather(*self._running, return_exceptions=True)

    async def cancel(self) -> None:
        """Cancel every task and wait until each has ended."""
        running = list(self._running)
        for task in running:
            task.cancel()
        await asyncio.gather(*running, return_exceptions=True)
