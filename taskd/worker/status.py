"""What the supervisor tells systemd and ``ps`` about itself.

``READY=1`` once: connected, and a child has imported the task modules (a
deployment whose modules do not import never reports ready). Every few
seconds ``STATUS=`` and, under a systemd watchdog, ``WATCHDOG=1``, sent from
the loop itself, so a loop that stalls stops the pings and systemd notices.
The process title, ``taskd: supervisor [queues] busy/total busy``, is
refreshed by the same 1 s tick, not per task: setting the title on every task
cost about 10% of the supervisor's time.
"""
from __future__ import annotations

import asyncio
import collections
import logging
from typing import Any, Optional

from setproctitle import setproctitle

from .pool import BUSY, IDLE

log = logging.getLogger("taskd.supervisor")


class Status:
    """``host``: the supervisor, read for ``queues`` and ``concurrency``; ``link`` (the
    broker link), ``shutdown`` and ``reloader`` are read for their state."""

    def __init__(self, loop: asyncio.AbstractEventLoop, host: Any, pool: Any, dispatcher: Any,
                 counters: collections.Counter, notifier: Any, shutdown: Any,
                 reloader: Any = None, link: Any = None) -> None:
        self.loop, self.host, self.pool, self.dispatcher = loop, host, pool, dispatcher
        self.counters, self.notifier, self.shutdown = counters, notifier, shutdown
        self.reloader, self.link = reloader, link
        self.announced = False
        self._title: Optional[str] = None
        self._ticks = 0

    def announce_ready(self) -> None:
        """READY=1 to systemd, once (see the module's notes)."""
        if self.announced or self.link.reconnecting or self.shutdown.stopping:
            return
        if not any(c.state in (IDLE, BUSY) for c in self.pool.serving()):
            return
        self.announced = True
        log.info("ready")
        self.notifier.ready(self.line())

    def tick(self) -> None:
        """Every second until stopping: the title; STATUS= every 5 s; WATCHDOG=1."""
        if self.shutdown.stopping:
            return
        self.update_title()
        self._ticks += 1
        notifier = self.notifier
        if self._ticks % 5 == 1:
            notifier.status(self.line())
        if notifier.watchdog_interval:
            notifier.watchdog()
        self.loop.call_later(min(1.0, notifier.watchdog_interval or 1.0), self.tick)

    def line(self) -> str:
        counters = self.counters
        line = (f"{len(self.pool.busy())}/{len(self.pool.serving())} busy, "
                f"{counters['succeeded']} ok, {counters['failed']} failed, "
                f"{len(self.dispatcher.schedule)} held")
        if self.link.reconnecting:
            line += ", broker: reconnecting"
        last = self.reloader.last
        if last and not last["ok"]:
            line += f", last reload failed: {last['errors'][0]}"
        return line

    def update_title(self) -> None:
        title = (f"taskd: supervisor [{','.join(self.host.queues)}] "
                 f"{len(self.pool.busy())}/{self.host.concurrency} busy")
        if title != self._title:
            self._title = title
            setproctitle(title)
