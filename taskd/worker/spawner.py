"""The pool's headcount: fork children until the current generation has
``concurrency`` of them, and replace those that did enough.

A child that dies while starting (a task module that does not import) makes
the pool back off (1 s, 2 s, 4 s ... 60 s, :mod:`taskd.worker.pool`): then one
child is forked at a time, after the pause, so a broken deployment does not
fork-bomb. A child that ran ``worker.max_tasks_per_child`` tasks, or whose
memory exceeds ``worker.max_memory_per_child``, is retired after its task and
replaced.
"""
from __future__ import annotations

import asyncio
import logging
import time
from typing import Any, Callable, Optional

from . import lifecycle

log = logging.getLogger("taskd.supervisor")


class Spawner:
    """``host``: the supervisor, read for ``concurrency`` and ``config``; ``shutdown``:
    no more children once it is ``stopping``; ``forked()``: called after forking."""

    def __init__(self, loop: asyncio.AbstractEventLoop, pool: Any, host: Any, shutdown: Any,
                 forked: Callable[[], None]) -> None:
        self.loop, self.pool, self.host = loop, pool, host
        self.shutdown, self.forked = shutdown, forked
        self._timer: Optional[asyncio.TimerHandle] = None   # the back-off's
        self.lifecycle: lifecycle.Observer = lifecycle.NOBODY

    def manage(self) -> None:
        """Fork children until the current generation has ``concurrency`` of them."""
        if self._timer is not None or self.shutdown.stopping:
            return
        pool = self.pool
        missing = self.host.concurrency - len(pool.serving())
        if missing <= 0:
            return
        wait = pool.next_spawn_at - time.monotonic()
        if wait > 0:
            self._timer = self.loop.call_later(wait, self._after_backoff)
            return
        for _ in range(1 if pool.failures else missing):
            pool.spawn()
        self.forked()

    def _after_backoff(self) -> None:
        self._timer = None
        self.manage()

    def recycle(self, child: Any) -> None:
        """Retire ``child`` after its task if it ran enough tasks or uses too much memory."""
        cfg = self.host.config
        max_tasks, max_memory = cfg["worker.max_tasks_per_child"], cfg["worker.max_memory_per_child"]
        if max_tasks and child.tasks_done >= max_tasks:
            log.info("child %d ran %d tasks: replacing it", child.index, child.tasks_done)
            self.lifecycle.child_recycled(child, "max_tasks")
            self.pool.retire(child)
        elif max_memory and child.rss > max_memory:
            log.info("child %d uses %d MiB (limit %d MiB): replacing it",
                     child.index, child.rss >> 20, max_memory >> 20)
            self.lifecycle.child_recycled(child, "max_memory")
            self.pool.retire(child)

    def shrink(self) -> None:
        """One child too many (TTOU): retire the newest idle one, else the newest."""
        serving = self.pool.serving()
        if len(serving) > self.host.concurrency:
            victim = min(serving, key=lambda c: (c.job is not None, -c.index))
            self.pool.retire(victim)
